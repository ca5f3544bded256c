"""The prefetch admission rule (moecache.admission) and its use by the simulator and the runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache.admission import admit_prefetch, candidate_probability, check_admission, lead_ms, prefetch_value
from moecache.cost.hardware import HardwareProfile
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.predictors import PREDICTORS
from moecache.sim import Schedule, simulate
from tests.simtools import make_trace


def test_late_copy_is_never_issued():
    # the copy engine is busy past the target layer: even a certain need is refused
    assert not admit_prefetch(1.0, 0.0, backlog_ms=2.0, first_ms=2.0, lead=2.0, copy_ms=0.5)
    assert prefetch_value(1.0, 0.0, 3.0, 2.0, 2.0, 0.5) == -math.inf
    assert admit_prefetch(1.0, 0.0, backlog_ms=1.9, first_ms=2.0, lead=2.0, copy_ms=0.5)  # part of a stall saved


def test_victim_worth_more_is_kept():
    assert admit_prefetch(0.6, 0.5, 0.0, 10.0, 10.0, 1.0)
    assert not admit_prefetch(0.5, 0.6, 0.0, 10.0, 10.0, 1.0)
    assert not admit_prefetch(0.5, 0.5, 0.0, 10.0, 10.0, 1.0)  # a tie changes nothing: not worth a copy


def test_overrun_of_a_wasted_copy_counts():
    # next layer is the target, lead 1, copy 4: right saves 1 ms, wrong delays its copies 3 ms -> p > 0.75
    assert not admit_prefetch(0.7, 0.0, 0.0, 1.0, 1.0, 4.0)
    assert admit_prefetch(0.8, 0.0, 0.0, 1.0, 1.0, 4.0)


def test_a_deeper_copy_blocking_the_next_layer_pays_for_it_either_way():
    # target two layers ahead (lead 4), next layer in 1 ms: the copy (2 ms) runs 1 ms into the next layer,
    # whose demand copies wait whether the prediction is right or not
    assert prefetch_value(0.9, 0.0, 0.0, 1.0, 4.0, 2.0) == pytest.approx(0.9 * 2.0 - 1.0)
    assert not admit_prefetch(0.4, 0.0, 0.0, 1.0, 4.0, 2.0)
    # the same copy with the next layer as its target: only a wrong one costs the block
    assert prefetch_value(0.4, 0.0, 0.0, 1.0, 1.0, 2.0) == pytest.approx(0.4 * 1.0 - 0.6 * 1.0)
    assert admit_prefetch(0.4, 0.0, 0.0, 4.0, 4.0, 2.0)  # nothing blocked: worth it


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 50), st.floats(0.01, 50), st.integers(0, 3),
       st.floats(0.01, 10))
def test_value_is_monotone(p, v, backlog, first, more, copy):
    """More likely candidates, cheaper victims and shorter queues never turn an admission into a refusal."""
    lead = first * (1 + more)
    if admit_prefetch(p, v, backlog, first, lead, copy):
        assert admit_prefetch(min(1.0, p + 0.1), v, backlog, first, lead, copy)
        assert admit_prefetch(p, max(0.0, v - 0.1), backlog, first, lead, copy)
        assert admit_prefetch(p, v, backlog * 0.5, first, lead, copy)
        assert p > v


def test_host_time_of_issuing_counts():
    # nothing blocked, victim free: 0.5 * 1 ms saved against 0.4 ms of host time is issued, against 0.6 not
    assert admit_prefetch(0.5, 0.0, 0.0, 4.0, 4.0, 1.0, host_ms=0.4)
    assert not admit_prefetch(0.5, 0.0, 0.0, 4.0, 4.0, 1.0, host_ms=0.6)


def test_probability_and_lead():
    assert candidate_probability(0.3) == 0.3 and candidate_probability(2.5) == 1.0
    assert lead_ms(3, 1.0, 0.25) == 1.5 and lead_ms(1, 2.0, 9.0) == 2.0
    assert check_admission("cost") == "cost"
    with pytest.raises(ConfigError, match="unknown prefetch admission 'maybe'; choose one of: cost, none"):
        check_admission("maybe")


def _trace(L: int = 2, E: int = 8, K: int = 2, tokens: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [[list(rng.choice(E, K, replace=False)) for _ in range(L)] for _ in range(tokens)]
    return make_trace(rows, num_experts=E, top_k=K, seq=np.repeat(np.arange(tokens // 50), 50),
                      bytes_per_expert=3_000_000)


def _hw(copy_ms: float) -> HardwareProfile:
    return HardwareProfile(bytes_per_expert=3_000_000, copy_bandwidth_gbps=1e6, copy_latency_ms=copy_ms,
                           gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test")


def _sim(trace, hw: HardwareProfile, admission: str):
    m = trace.meta
    pol = new_policy("lru", 3, m.num_layers, m.num_experts, top_k=m.top_k)
    pol.fit(np.ones((m.num_layers, m.num_experts)))
    pred = PREDICTORS.get("temporal")(m.num_layers, m.num_experts, m.top_k)
    pred.fit(trace)
    return simulate(Schedule(trace, decode_stream=True), pol, pred, depth=1, hardware=hw, admission=admission,
                    bound=False, engine="python")


def test_simulator_refuses_what_cannot_pay():
    """Random routing (nothing to predict), copies far slower than a layer: every prefetch is late or a loss,
    so the rule issues none and the run is no slower than without prefetch; ``none`` issues them and pays."""
    trace = _trace()
    slow = _hw(copy_ms=5.0)
    gated, ungated = _sim(trace, slow, "cost"), _sim(trace, slow, "none")
    assert gated.prefetches == 0 and gated.extra["prefetch_refused"] > 0
    assert ungated.prefetches > 0 and ungated.time_ms > gated.time_ms
    # cheap copies with a long lead: the same candidates now pay and are issued
    fast = _sim(trace, _hw(copy_ms=0.01), "cost")
    assert fast.prefetches > 0


def test_bad_admission_is_refused_before_running():
    trace = _trace(tokens=50)
    with pytest.raises(ConfigError, match="unknown prefetch admission"):
        _sim(trace, _hw(1.0), "always")


def test_runtime_uses_the_same_rule(monkeypatch):
    """The runtime asks moecache.admission: copies far slower than a layer are refused, ``none`` issues them."""
    import torch

    import moecache.runtime.core as core
    from moecache.runtime import offload
    from tests.tiny_models import tiny_model

    calls = []
    real = core.admit_prefetch

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(core, "admit_prefetch", spy)
    issued = {}
    for admission, copy_ms in (("cost", 1e4), ("none", 1e4), ("cost", 1e-6)):
        m = tiny_model("qwen3_moe", num_hidden_layers=4)
        h = offload(m, cache_slots=12, device="cpu", predictor="temporal", prefetch_depth=2)
        rt = h.runtime
        rt.admission = admission
        rt._profile = HardwareProfile(bytes_per_expert=rt.copy_bytes, copy_bandwidth_gbps=1e6, copy_latency_ms=copy_ms,
                                      gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test")
        with torch.no_grad():
            m.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=8, do_sample=False)
        s = h.stats()
        issued[(admission, copy_ms)] = (s["prefetch_issued"], s["prefetch_refused"])
        h.remove()
    assert issued[("cost", 1e4)][0] == 0 and issued[("cost", 1e4)][1] > 0
    assert issued[("none", 1e4)][0] > 0 and issued[("none", 1e4)][1] == 0
    assert issued[("cost", 1e-6)][0] > 0
    assert calls and all(len(a) == 6 for a in calls)


def _eval_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "eval" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_eval_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prediction_target_three_way_split_and_report():
    """Fit, choose and report parts are disjoint runs of sequences in order; the report's gap closed is
    (LRU - chosen) / (LRU - bound)."""
    pt = _eval_module("prediction_target")
    trace = _trace(tokens=450)  # 9 sequences of 50 tokens
    fit, choose, rep = pt.three_way(trace, None, 2, None)
    assert [len(p.sequences()) for p in (fit, choose, rep)] == [3, 2, 3]
    seqs = [set(np.asarray(p.seq).tolist()) for p in (fit, choose, rep)]
    assert seqs[0] == {0, 1, 2} and seqs[1] == {3, 4} and seqs[2] == {6, 7, 8}
    fitted = pt.Fitted(fit, trace.meta)
    chosen = {"policy": "lru", "predictor": "temporal", "depth": 1}
    out = pt.report(rep, fitted, chosen, _hw(0.3))
    lru, got, bound = out["lru"]["ms_per_token"], out["chosen"]["ms_per_token"], out["bound_ms_per_token"]
    assert bound <= got and bound < lru
    assert out["gap_closed"] == pytest.approx((lru - got) / (lru - bound))
    with pytest.raises(SystemExit, match="three-way split needs at least 3"):
        pt.three_way(_trace(tokens=100), None, None, None)
