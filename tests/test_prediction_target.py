"""eval/prediction_target.py's predictor additions: the calibrated wide-window candidate and the recall table.

(The split, report and option parsing are covered in tests/test_admission.py.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from moecache.cost.hardware import HardwareProfile
from tests.simtools import make_trace


def _pt():
    path = Path(__file__).resolve().parent.parent / "eval" / "prediction_target.py"
    spec = importlib.util.spec_from_file_location("_eval_prediction_target", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rule_trace(tokens: int = 400, L: int = 3, E: int = 8, K: int = 2, seed: int = 0):
    """Layer l + 1 repeats layer l's experts most of the time; sequences of 50 tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(tokens):
        row = [list(rng.choice(E, K, replace=False))]
        for _ in range(L - 1):
            row.append(row[-1] if rng.random() < 0.8 else list(rng.choice(E, K, replace=False)))
        rows.append(row)
    return make_trace(rows, num_experts=E, top_k=K, seq=np.repeat(np.arange(tokens // 50), 50),
                      bytes_per_expert=3_000_000)


def test_calibrated_candidate_replays_and_recall_table_splits_offsets():
    pt = _pt()
    assert any(pred == pt.CALIBRATED and d in (1, 2) for _, pred, d in pt.CANDIDATES)
    assert pt.predictor_spec(pt.CALIBRATED) == ("learned", {"window": pt.WIDE_WINDOW, "calibrate": "isotonic"})
    trace = _rule_trace()
    fit, _, rep = pt.three_way(trace, None, None, None)
    fitted = pt.Fitted(fit, trace.meta)
    hw = HardwareProfile(bytes_per_expert=3_000_000, copy_bandwidth_gbps=1e6, copy_latency_ms=0.3,
                         gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test")
    row = pt.replay(rep, fitted, "lru", pt.CALIBRATED, 1, hw, budget=2)
    assert row["prefetches"] > 0 and pt.label(row) == f"lru + {pt.CALIBRATED} D=1 B=2k"
    got = pt.predictor_recalls(rep, fitted, ["learned", "transition"])
    assert [(r["predictor"], r["depth"]) for r in got] == [("learned", 1), ("learned", 2), ("transition", 1),
                                                            ("transition", 2)]
    learned_d1 = got[0]
    # layer l + 1 copies layer l 80% of the time: within the token, depth 1 is well predicted; the next token's
    # layer 0 is random, so its targets are not
    assert learned_d1["same_token"] > 0.75 and learned_d1["next_token"] < 0.5
    assert learned_d1["recall@2top_k"] >= learned_d1["recall@top_k"]
    # the whole is the targets' weighted mix of the two parts: between them
    lo, hi = sorted((learned_d1["same_token"], learned_d1["next_token"]))
    assert lo <= learned_d1["recall@top_k"] <= hi


def test_learned_levers_base_feature_set_is_learneds_own():
    """eval/learned_levers.py's base blocks are exactly ``learned``'s (same layers, same token), so its offline
    replay measures the predictor that runs; the extra sets add the target's neighbours and older tokens."""
    path = Path(__file__).resolve().parent.parent / "eval" / "learned_levers.py"
    spec = importlib.util.spec_from_file_location("_eval_learned_levers", path)
    lv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lv)
    from moecache.predictors.learned import feature_layers

    L = 5
    for window in (1, 2, 4, 7):
        for l in range(L):
            for d in (1, 2, 3):
                t = (l + d) % L
                assert lv.blocks(l, t, L, window, 0, 0) == [(fl, -off) for fl, off in feature_layers(l, t, L, window)]
    # after layer 3 of 5 targeting layer 0 of the next token: its neighbour 1 (this token's), the token before
    assert lv.blocks(3, 0, 5, 1, 1, 1) == [(3, 0), (0, 0), (1, 0), (0, 1)]
    assert lv.blocks(1, 3, 5, 1, 1, 2) == [(1, 0), (2, 1), (3, 1), (4, 1), (3, 2), (3, 3)]


def test_copy_queue_option_reaches_every_replay(monkeypatch):
    # --copy-queue (default worker: the runtime's copy worker) reaches the replay: the simulator ran that model
    pt = _pt()
    trace = _rule_trace()
    fit, _, rep = pt.three_way(trace, None, None, None)
    fitted = pt.Fitted(fit, trace.meta)
    hw = HardwareProfile(bytes_per_expert=3_000_000, copy_bandwidth_gbps=1e3, copy_latency_ms=0.3,
                         gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test")
    seen = []
    real = pt.simulate
    ran = []

    def spy(*a, **kw):
        seen.append(kw["copy_queue"])
        res = real(*a, **kw)
        ran.append(res.extra["copy_queue"])
        return res

    monkeypatch.setattr(pt, "simulate", spy)
    assert pt.COPY_QUEUE == "worker"
    worker = pt.replay(rep, fitted, "lru", "learned", 2, hw, budget=2)
    monkeypatch.setattr(pt, "COPY_QUEUE", "fifo")
    fifo = pt.replay(rep, fitted, "lru", "learned", 2, hw, budget=2)
    assert seen == ["worker", "fifo"]
    assert ran == ["worker", "fifo"] and worker["ms_per_token"] > 0 and fifo["ms_per_token"] > 0
