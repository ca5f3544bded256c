"""Precision chosen per miss (``moecache.miss_precision``, HOBBIT-style): the rule, the runtime's tokens on the
CPU, runtime and simulator serving the same misses low on one trace, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecache.cost import default_profile
from moecache.errors import ConfigError
from moecache.forced_routing import run_forced
from moecache.miss_precision import (FULL, LOW, UPGRADE, MissPrecisionRule, copy_precision, gate_shares,
                                     resolve_rule, slots_with_landing)
from moecache.policies import new_policy
from moecache.quant import ExpertFormat, quantize_dequantize_
from moecache.runtime import offload
from moecache.sim import Schedule, simulate
from moecache.trace import RoutingBlock, Trace, TraceMeta

from .tiny_models import tiny_model

PROMPT = [[5, 17, 33, 8, 61, 12]]


def _model():
    return tiny_model("qwen3_moe", moe_intermediate_size=32)


# -- the rule -------------------------------------------------------------------------------------------

def test_copy_precision_verdicts():
    assert copy_precision(None, 0.2, 0.5) == LOW
    assert copy_precision(None, 0.5, 0.5) == FULL  # at the threshold: full
    assert copy_precision(None, 1.5, 0.5) == FULL
    assert copy_precision(True, 0.01, 0.5) == UPGRADE  # reused while low: upgraded whatever its share
    assert copy_precision(True, 1.9, 0.5) == UPGRADE
    assert copy_precision(False, 0.01, 0.5) is None  # a full copy is never downgraded


def test_gate_shares_are_normalised_per_token_and_maxed_over_tokens():
    ids = np.array([[3, 5], [5, 1], [-1, 3]])
    w = np.array([[0.9, 0.1], [0.3, 0.1], [0.7, 0.3]], dtype=np.float32)
    s = gate_shares(ids, w)
    # token 0: 3 -> 0.9 / 1.0 * 2, 5 -> 0.2; token 1: 5 -> 0.3 / 0.4 * 2 = 1.5, 1 -> 0.5; token 2: 3 -> 0.6
    assert set(s) == {1, 3, 5}
    assert s[3] == pytest.approx(1.8) and s[5] == pytest.approx(1.5) and s[1] == pytest.approx(0.5)
    # DeepSeek-style weights that do not sum to 1 give the same shares as their renormalised version.
    assert gate_shares(ids, w * 0.3)[5] == pytest.approx(1.5)
    # A token whose weights sum to 0 (or NaN) counts as an even split.
    assert gate_shares(np.array([[2, 4]]), np.array([[0.0, 0.0]]))[2] == 1.0
    assert gate_shares(np.array([[2, 4]]), np.array([[np.nan, 0.5]]))[4] == 1.0


def test_landing_comes_out_of_the_pool_memory():
    assert slots_with_landing(16, 1, 8, 100, 30) == (1600 - 240) // 100
    assert slots_with_landing(16, 4, 8, 100, 30) == (6400 - 240) // 400  # one landing shared by 4 layer pools
    assert slots_with_landing(1, 1, 64, 100, 30) == 0


def test_resolve_rule_and_bad_input():
    assert resolve_rule(None) is None
    r = resolve_rule("INT4", 0.25, 32)
    assert r == MissPrecisionRule(ExpertFormat("int4", 32), 0.25)
    assert r.describe() == "int4 g32 below share 0.25"
    assert r.host_bytes(10, 2 * 4096) == 10 * int(np.ceil(4096 * (4 + 24 / 32) / 8))
    with pytest.raises(ConfigError, match="low_precision_misses"):
        resolve_rule("fp8")
    with pytest.raises(ConfigError, match="low_precision_below"):
        resolve_rule("int4", 0.0)
    with pytest.raises(ConfigError, match="low_precision_below"):
        resolve_rule("int4", "half")
    with pytest.raises(ConfigError, match="group_size"):
        resolve_rule("int8", 0.5, 48)


# -- the runtime on the CPU -----------------------------------------------------------------------------

def test_runtime_serves_misses_low_then_upgrades_on_reuse():
    """Every miss low (threshold above any share), every expert fits: the first forward computes the model
    with its experts quantize-dequantized (the low copy), the second (all hits, all upgraded) the model itself."""
    x = torch.tensor(PROMPT)
    ref = _model()
    with torch.no_grad():
        full = ref(x).logits
    low_ref = quantize_dequantize_(_model(), ExpertFormat("int4", 32))
    with torch.no_grad():
        low = low_ref(x).logits
    assert not torch.equal(full, low)
    m = _model()
    h = offload(m, cache_slots=24, device="cpu", engine="sync", low_precision_misses="int4", group_size=32,
                low_precision_below=100.0)
    with torch.no_grad():
        first = m(x).logits
    s = h.stats()
    assert torch.equal(first, low)
    assert s["misses"] > 0 and s["low_copies"] == s["misses"] and s["upgrades"] == 0
    with torch.no_grad():
        second = m(x).logits
    s2 = h.stats()
    assert torch.equal(second, full)
    assert s2["misses"] == s["misses"] and s2["upgrades"] == s2["hits"] > 0
    cfg = s2["config"]
    assert cfg["low_precision_misses"] == "int4 g32 below share 100"
    assert cfg["low_copy_host_bytes"] == 3 * 8 * cfg["low_copy_bytes_per_expert"] > 0
    assert s2["bytes_copied"] == (s2["copies"] - s2["low_copies"]) * cfg["dense_expert_bytes"] + \
        s2["low_copies"] * cfg["low_copy_bytes_per_expert"]
    assert "misses copied low" in h.summary() and "MiB of host memory" in h.summary()
    h.remove()
    assert torch.equal(m(x).logits, full)  # remove() puts the full weights back


def test_runtime_tiny_threshold_is_the_plain_runtime():
    x = torch.tensor(PROMPT)
    with torch.no_grad():
        full = _model()(x).logits
    m = _model()
    h = offload(m, cache_slots=3, device="cpu", engine="sync", low_precision_misses="int8", group_size=32,
                low_precision_below=1e-9)
    with torch.no_grad():
        got = m(x).logits
    assert torch.equal(got, full)
    assert h.stats()["low_copies"] == 0 and h.stats()["misses"] > 0
    h.remove()


def test_offload_bad_input_changes_nothing():
    m = _model()
    before = m.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    cases = [(dict(low_precision_misses="int2"), "low_precision_misses"),
             (dict(low_precision_misses="int4", low_precision_below=-1), "low_precision_below"),
             (dict(low_precision_misses="int4", group_size=48), "group_size"),
             (dict(low_precision_misses="int4", expert_dtype="int8"), "already be int8"),
             (dict(low_precision_misses="int4", hybrid="cpu"), "hybrid"),
             (dict(low_precision_misses="int4", compile=True), "compile")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            offload(m, cache_slots=4, device="cpu", engine="sync", **{"group_size": 32, **kw})
        assert "\n" not in str(e.value)
        assert getattr(m, "moecache", None) is None
        assert torch.equal(m.model.layers[0].mlp.experts.gate_up_proj, before)
    with pytest.raises(ConfigError, match="kernel"):
        offload(tiny_model("dbrx"), cache_slots=4, device="cpu", low_precision_misses="int4", group_size=32)


# -- runtime and simulator agree --------------------------------------------------------------------------

def _trace(layers=3, experts=8, top_k=2, rows=10, seqs=2, seed=3) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(rows * seqs)]).astype(np.int16)
    w = rng.random(ids.shape).astype(np.float32) ** 2
    w /= w.sum(axis=2, keepdims=True)
    meta = TraceMeta(num_experts=experts, top_k=top_k, moe_layers=list(range(layers)), model="synthetic",
                     weights="renormalized", bytes_per_expert=2 * 3 * 32 * 32)
    block = RoutingBlock.build(ids, seq=np.repeat(np.arange(seqs), rows), pos=np.tile(np.arange(rows), seqs),
                               token=rng.integers(3, 90, rows * seqs), phase=0, weights=w)
    return Trace(meta, block)


@pytest.mark.parametrize("slots,below", [(6, 0.7), (10, 0.9)])
def test_runtime_and_simulator_serve_the_same_misses_low(slots, below):
    tr = _trace()
    m = _model()
    h = offload(m, cache_slots=slots, device="cpu", engine="sync", prefetch_depth=0, policy="lru",
                low_precision_misses="int4", group_size=32, low_precision_below=below)
    rt = h.runtime
    low_seen: list[int] = []
    copy_low = rt._copy_low

    def logged(slots_, keys):
        low_seen.extend(keys)
        return copy_low(slots_, keys)

    rt._copy_low = logged
    run_forced(m, tr, prefill=1)  # one token per call: the simulator's decode stream
    s = h.stats()
    h.remove()

    sched = Schedule(tr, decode_stream=True)
    L, E, K = 3, 8, 2
    pol = new_policy("lru", slots, L, E, top_k=K, scope="global")
    record: list = []
    res = simulate(sched, pol, miss_precision=resolve_rule("int4", below, 32), record=record, bound=False)
    sim_low = [key for _g, key, _c, out in record if out == "copy_low"]
    assert s["low_copies"] > 0 and s["upgrades"] > 0  # the trace exercises both
    assert low_seen == sim_low
    assert s["misses"] == res.loads and s["hits"] == sum(1 for r in record if r[3] in ("hit", "upgrade"))
    assert s["upgrades"] == res.extra["upgrades"] == sum(1 for r in record if r[3] == "upgrade")


def test_worker_estimate_counts_full_copies_and_upgrades_not_low_copies(monkeypatch):
    # as the runtime's ``_copied``: a low copy goes through its own landing engine and is not in the backlog
    # estimate the admission rule reads; an upgrade is a full copy and is
    from moecache.sim.copy_queue import WorkerQueue

    counted = []
    real = WorkerQueue.note_issued
    monkeypatch.setattr(WorkerQueue, "note_issued", lambda self, t: counted.append(t) or real(self, t))
    sched = Schedule(_trace(), decode_stream=True)
    res = simulate(sched, new_policy("lru", 6, 3, 8, top_k=2, scope="global"), bound=False,
                   miss_precision=resolve_rule("int4", 0.7, 32), copy_queue="worker")
    assert res.extra["low_copies"] > 0 and res.extra["upgrades"] > 0
    assert len(counted) == res.loads - res.extra["low_copies"] + res.extra["upgrades"]


def test_simulator_rule_checks_and_engine_routing():
    tr = _trace()
    sched = Schedule(tr, decode_stream=True)
    rule = resolve_rule("int4", 0.5, 32)
    pol = new_policy("lru", 6, 3, 8, top_k=2, scope="global")
    with pytest.raises(ConfigError, match="engine cpp cannot run.*precision rule.*Python reference only"):
        simulate(sched, pol, miss_precision=rule, engine="cpp", bound=False)
    with pytest.raises(ConfigError, match="--miss-rule copy"):
        simulate(sched, new_policy("lru", 6, 3, 8, top_k=2, scope="global"), miss_precision=rule,
                 miss_rule="cpu", bound=False)
    no_w = Trace(TraceMeta(**{**tr.meta.to_json(), "weights": "absent"}),
                 RoutingBlock.build(tr.ids, seq=tr.seq, pos=tr.pos, token=tr.token, phase=0))
    with pytest.raises(ConfigError, match="gate weights"):
        simulate(Schedule(no_w, decode_stream=True), new_policy("lru", 6, 3, 8, top_k=2, scope="global"),
                 miss_precision=rule, bound=False)
    # engine auto with the rule runs the Python reference; the low copies make the replay no slower, and
    # the bound (read at the low copy's cost) stays below the estimate.
    hw = default_profile(64 * 2**20)  # experts of a real size: copies cost more than their latency
    full = simulate(sched, new_policy("lru", 6, 3, 8, top_k=2, scope="global"), hardware=hw)
    mixed = simulate(sched, new_policy("lru", 6, 3, 8, top_k=2, scope="global"), miss_precision=rule, hardware=hw)
    assert mixed.extra["low_copies"] > 0
    assert mixed.time_ms < full.time_ms
    assert mixed.bound_ms <= mixed.time_ms and mixed.bound_ms <= full.bound_ms
    assert mixed.bytes_per_token < full.bytes_per_token


def test_bench_cli_option_and_its_errors(tmp_path, capsys):
    import json

    from moecache.cli import main

    tr = _trace(rows=12, seqs=4)
    Trace(TraceMeta(**{**tr.meta.to_json(), "bytes_per_expert": 64 * 2**20}), tr._block).save(tmp_path / "w")
    no_w = Trace(TraceMeta(**{**tr.meta.to_json(), "weights": "absent"}),
                 RoutingBlock.build(tr.ids, seq=tr.seq, pos=tr.pos, token=tr.token, phase=0))
    no_w.save(tmp_path / "nw")
    base = ["bench", str(tmp_path / "w"), "--decode-stream", "--capacity", "50%", "--policies", "lru", "--quiet",
            "--json", "--scope", "global"]
    assert main(base + ["--low-precision-misses", "int4", "--group-size", "32"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["engine"] == "python" and row["low_copies"] > 0 and row["low_precision_misses"].startswith("int4 g32")
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)[0]
    assert row["bytes_per_token"] < plain["bytes_per_token"]
    assert row["capacity"] <= plain["capacity"]  # the landing comes out of the same memory
    for extra, msg in [(["--expert-dtype", "int4"], "already int4 g64"), (["--sim-engine", "cpp"], "Python reference"),
                       (["--miss-rule", "cpu"], "--miss-rule copy"), (["--low-precision-below", "0"], "must be > 0")]:
        assert main(base + ["--low-precision-misses", "int4"] + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    nw = base[:]
    nw[1] = str(tmp_path / "nw")
    assert main(nw + ["--low-precision-misses", "int8"]) == 2
    assert "needs gate weights" in capsys.readouterr().err
