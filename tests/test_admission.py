"""The prefetch admission rule (moecache.admission) and its use by the simulator and the runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache.admission import (PredictorGate, VictimReuse, admit_prefetch, candidate_probability, check_admission,
                                lead_ms, outcome_values, prefetch_value, victim_worth)
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


def test_reuse_rate_counts_evictions_wanted_back_before_the_next_one():
    r = VictimReuse(2)
    assert r.rate() == 0.0
    r.evicted(1, 0)
    r.evicted(2, 0)
    r.demanded(1, 0)  # pool 0 evicted again since: keeping 1 would only have sent 2 out instead
    assert (r.evicted_n, r.wanted_back) == (2, 0)
    r.demanded(2, 0)  # wanted back before any other eviction from its pool: a regret
    assert (r.evicted_n, r.wanted_back) == (2, 1) and r.rate() == 1 / 3
    r.demanded(2, 0)  # already counted (a CPU run leaves it out: a second access is no second regret)
    r.evicted(9, 1)
    r.inserted(9)  # a copy (say a prefetch) put it back first
    r.demanded(9, 1)
    r.demanded(7, 1)  # never evicted
    assert r.wanted_back == 1 and r.rate() == 1 / 4
    r.evicted(3, 0)
    r.evicted(4, 1)  # another pool's eviction does not clear pool 0's
    r.demanded(3, 0)
    assert (r.evicted_n, r.wanted_back) == (5, 2) and r.rate() == 2 / 6


def test_victim_worth_is_the_larger_of_prediction_and_reuse():
    assert victim_worth(0.1, 0.25) == 0.25 and victim_worth(0.4, 0.25) == 0.4 and victim_worth(0.0, 0.0) == 0.0
    # a candidate the predictor's view of the victim lets through is refused once the victim's re-demand
    # rate says giving it up costs more than the candidate is likely to save
    assert admit_prefetch(0.3, victim_worth(0.0, 0.0), 0.0, 10.0, 10.0, 1.0)
    assert not admit_prefetch(0.3, victim_worth(0.0, 0.35), 0.0, 10.0, 10.0, 1.0)
    assert admit_prefetch(0.5, victim_worth(0.0, 0.35), 0.0, 10.0, 10.0, 1.0)


def _skewed_prefetch_sim(engine: str, worth=None, monkeypatch=None):
    """lru with 3 slots per layer over routing that picks 2 of 8 experts, half of them three times as often as
    the others: the prior's candidates are worth little more than its view of the victims, while what lru
    gives up is often wanted back."""
    rng = np.random.default_rng(1)
    pick = np.array([3, 3, 3, 3, 1, 1, 1, 1]) / 16
    rows = [[list(rng.choice(8, 2, replace=False, p=pick)) for _ in range(3)] for _ in range(400)]
    trace = make_trace(rows, num_experts=8, top_k=2, seq=np.zeros(400, dtype=np.int64), bytes_per_expert=3_000_000)
    m = trace.meta
    pol = new_policy("lru", 3, m.num_layers, m.num_experts, top_k=m.top_k, scope="layer")
    pol.fit(np.ones((m.num_layers, m.num_experts)))
    pred = PREDICTORS.get("prior")(m.num_layers, m.num_experts, m.top_k)
    pred.fit(trace)
    if worth is not None:
        import moecache.sim.engine_python as ep

        monkeypatch.setattr(ep, "victim_worth", worth)
    return simulate(Schedule(trace, decode_stream=True), pol, pred, depth=1, hardware=_hw(0.05), admission="cost",
                    bound=False, engine=engine, budget=4)


def test_simulator_prices_victims_at_the_reuse_rate(monkeypatch):
    """The simulator's rule prices each victim at ``victim_worth(its prediction, the re-demand rate)``: the rate
    it hands over is counted as evictions are made and wanted back (not 0 here), a worth raised above the
    prediction refuses copies the prediction alone lets through, and the C++ engine, which counts the rate
    at the same points, gives the identical row."""
    import moecache.sim.engine_python as ep
    from moecache._ext import extension

    seen = []
    real = ep.victim_worth

    def spy(pred, rate):
        seen.append((pred, rate))
        return real(pred, rate)

    monkeypatch.setattr(ep, "victim_worth", spy)
    with_rate = _skewed_prefetch_sim("python")
    assert seen and max(rate for _p, rate in seen) > 0.0 and all(0.0 <= rate < 1.0 for _p, rate in seen)
    assert all(real(p, r) >= p for p, r in seen)
    dearer = _skewed_prefetch_sim("python", worth=lambda pred, rate: max(pred, rate + 0.5), monkeypatch=monkeypatch)
    assert dearer.prefetches < with_rate.prefetches
    assert dearer.extra["prefetch_refused"] > with_rate.extra["prefetch_refused"]
    monkeypatch.undo()
    if extension() is not None:
        assert _skewed_prefetch_sim("cpp").row() == with_rate.row()


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
    with pytest.raises(ConfigError, match="unknown prefetch admission 'maybe'; choose one of: gated, cost, none"):
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
    assert calls and all(len(a) == 7 for a in calls)


def _runtime_run(admission: str, predictor_ms: float, copy_ms: float = 0.3, clock: str = "model",
                 new_tokens: int = 12, predictor="temporal", forced=None):
    import torch

    from moecache.runtime import offload
    from tests.tiny_models import tiny_model

    torch.manual_seed(0)
    m = tiny_model("qwen3_moe", num_hidden_layers=4)
    # the sync copy engine: the worker thread's timing (a queued prefetch taken or cancelled first) would make
    # two runs' counts differ, and the gate's determinism is what these tests check
    h = offload(m, cache_slots=12, device="cpu", predictor=predictor, prefetch_depth=2, admission=admission,
                engine="sync")
    rt = h.runtime
    rt.admission_clock = clock
    rt._profile = HardwareProfile(bytes_per_expert=rt.copy_bytes, copy_bandwidth_gbps=1e6, copy_latency_ms=copy_ms,
                                  gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test",
                                  predictor_host_ms=predictor_ms)
    with torch.no_grad():
        if forced is not None:
            from moecache.forced_routing import run_forced

            run_forced(m, forced, prefill=1)
        else:
            m.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=new_tokens, do_sample=False)
    s = h.stats()
    gate = rt.gate
    h.remove()
    return s, gate


def test_runtime_prices_victims_at_its_reuse_rate(monkeypatch):
    """The runtime books every eviction, insert and demand miss in its VictimReuse and hands the rule
    ``victim_worth(prediction, its rate)``; the gate's ledger books the prediction alone."""
    import moecache.runtime.core as core

    seen, booked = [], []
    real_worth, real_outcome = core.victim_worth, core.outcome_values

    def worth(pred, rate):
        seen.append((pred, rate))
        return real_worth(pred, rate)

    def outcome(victim_pred, *a):
        booked.append(victim_pred)
        return real_outcome(victim_pred, *a)

    monkeypatch.setattr(core, "victim_worth", worth)
    monkeypatch.setattr(core, "outcome_values", outcome)
    import torch

    from moecache.runtime import offload
    from tests.tiny_models import tiny_model

    torch.manual_seed(0)
    m = tiny_model("qwen3_moe", num_hidden_layers=4)
    h = offload(m, cache_slots=12, device="cpu", predictor="temporal", prefetch_depth=2, admission="gated")
    rt = h.runtime
    rt._profile = HardwareProfile(bytes_per_expert=rt.copy_bytes, copy_bandwidth_gbps=1e6, copy_latency_ms=1e-3,
                                  gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test",
                                  predictor_host_ms=0.0)
    with torch.no_grad():
        m.generate(torch.tensor([[1, 2, 3, 4, 5]]), max_new_tokens=12, do_sample=False)
    s, reuse = h.stats(), rt.reuse
    h.remove()
    assert reuse.evicted_n == s["evictions"] > 0 and 0 < reuse.wanted_back <= s["misses"]
    assert seen and any(rate > 0.0 for _p, rate in seen)
    assert all(0.0 <= rate < 1.0 for _p, rate in seen)
    assert booked and set(booked) <= {p for p, _r in seen} | {0.0}


def test_runtime_gate_is_the_shared_one_and_deterministic(monkeypatch):
    """The runtime builds moecache.admission.PredictorGate; on the model clock two runs issue, refuse and
    skip exactly the same; a predictor costlier than anything its prefetches can save is turned off."""
    import moecache.runtime.core as core

    built = []
    real = core.PredictorGate

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(core, "PredictorGate", Spy)
    keys = ("prefetch_issued", "prefetch_refused", "prefetch_useful", "predictor_skipped", "hits", "misses")
    costly = [_runtime_run("gated", predictor_ms=50.0) for _ in range(2)]
    assert [{k: s[k] for k in keys} for s, _g in costly][0] == [{k: s[k] for k in keys} for s, _g in costly][1]
    s, gate = costly[0]
    assert built and isinstance(gate, real) and gate.predictor_ms == 50.0
    assert s["predictor_skipped"] > 0 and gate.stats()["layers_off"] > 0
    # forced, predictable routing (each layer takes the previous layer's experts): the predictions pay
    trace = _cyclic_trace(L=4, E=8, K=2, tokens=100)
    pred = PREDICTORS.get("transition")(4, 8, 2, max_depth=2)
    pred.fit(trace)
    pays, gate = _runtime_run("gated", predictor_ms=0.05, predictor=pred, forced=trace)
    assert pays["predictor_skipped"] == 0 and gate.stats()["layers_off"] == 0
    assert pays["prefetch_useful"] > 0.9 * pays["prefetch_issued"] > 0
    wasted, gate = _runtime_run("gated", predictor_ms=0.05, forced=trace)  # temporal: last token's, always wrong
    assert wasted["predictor_skipped"] > 0
    plain, gate = _runtime_run("cost", predictor_ms=50.0)
    assert plain["predictor_skipped"] == 0 and gate is None


def test_offload_refuses_an_unknown_admission():
    from moecache.runtime import offload
    from tests.tiny_models import tiny_model

    m = tiny_model("qwen3_moe", num_hidden_layers=2)
    with pytest.raises(ConfigError, match="unknown prefetch admission 'sometimes'; choose one of: gated, cost, none"):
        offload(m, cache_slots=12, device="cpu", predictor="temporal", admission="sometimes")


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



def test_prediction_target_predictor_options():
    """A candidate's predictor may carry constructor options (``learned:window=3``): they reach the predictor,
    variants are fitted separately, and a malformed option is a one-line error."""
    pt = _eval_module("prediction_target")
    assert pt.predictor_spec("learned:window=12:C=0.5:model=ridge") == ("learned", {"window": 12, "C": 0.5,
                                                                                   "model": "ridge"})
    assert pt.predictor_spec("transition") == ("transition", {})
    for bad in ("learned:window", "learned:=3", "learned:window="):
        with pytest.raises(ConfigError, match="is not key=value"):
            pt.predictor_spec(bad)
    trace = _trace(L=4, tokens=300)
    fitted = pt.Fitted(trace, trace.meta)
    wide, plain = fitted.get("learned:window=3", "lru"), fitted.get("learned", "lru")
    assert wide.window == 3 and plain.window == 2
    assert wide.coef.shape[-1] == 4 * trace.meta.num_experts and plain.coef.shape[-1] == 3 * trace.meta.num_experts
    assert len(fitted.cache) == 2
    assert any("learned:window=" in str(c[1]) for c in pt.CANDIDATES)
    row = pt.replay(trace, fitted, "lru", "learned:window=3", 2, _hw(0.3), budget=2)
    assert row["predictor"] == "learned:window=3" and row["prefetches"] > 0
    assert pt.label(row) == "lru + learned:window=3 D=2 B=2k"

# -- the predictor gate ------------------------------------------------------------------------------


def test_outcome_values_are_the_rule_at_prob_0_and_1():
    for args in ((0.2, 0.0, 1.0, 1.0, 0.5, 0.1), (0.0, 0.3, 1.0, 4.0, 2.0, 0.0), (0.5, 0.5, 1.0, 1.0, 4.0, 0.05)):
        vp, backlog, first, lead, copy, host = args
        if_unused, bonus = outcome_values(vp, backlog, first, lead, copy, host)
        assert if_unused == pytest.approx(prefetch_value(0.0, vp, backlog, first, lead, copy, host))
        assert if_unused + bonus == pytest.approx(prefetch_value(1.0, vp, backlog, first, lead, copy, host))


def test_gate_turns_a_layer_off_probes_and_turns_it_back_on():
    gate = PredictorGate(2, predictor_ms=0.2, span=4, probe_every=5, min_calls=3)
    # layer 0: every call issues one prefetch that is never used: worth -0.2 - 0.05 per call
    calls = 0
    for _ in range(3):
        assert gate.open(0)
        gate.issued(0, -0.05)
        calls += 1
    assert not gate.open(0)  # three calls seen, estimate below zero: off
    assert [gate.open(0) for _ in range(5)] == [False, False, False, False, True]  # the 5th visit is a probe
    assert gate.probes == 1 and not gate.on[0]
    # the probe's prefetches are used and pay well: the next probe folds it and turns the layer on
    gate.used(0, 3.0)
    assert [gate.open(0) for _ in range(5)] == [False, False, False, False, True]
    assert gate.on[0] and gate.probes == 1
    # layer 1 pays from the start and is never turned off
    for _ in range(20):
        assert gate.open(1)
        gate.issued(1, -0.05)
        gate.used(1, 0.5)
    assert gate.on[1]
    assert gate.stats()["layers_off"] == 0


def test_gate_parameters_are_checked():
    with pytest.raises(ConfigError, match="predictor gate needs span >= 1"):
        PredictorGate(2, 0.1, probe_every=0)


def _cyclic_trace(L: int = 4, E: int = 16, K: int = 2, tokens: int = 400):
    """Token t takes experts (t * K + j) % E at every layer: the next layer's experts are this layer's,
    which the transition predictor learns exactly; an LRU cache of a few slots misses them all."""
    rows = [[[(t * K + j) % E for j in range(K)] for _ in range(L)] for t in range(tokens)]
    return make_trace(rows, num_experts=E, top_k=K, seq=np.repeat(np.arange(tokens // 100), 100),
                      bytes_per_expert=3_000_000)


def _gated_hw(copy_ms: float, predictor_ms: float) -> HardwareProfile:
    return HardwareProfile(bytes_per_expert=3_000_000, copy_bandwidth_gbps=1e6, copy_latency_ms=copy_ms,
                           gpu_ms={1: 0.1}, cpu_ms={1: 0.4}, non_expert_ms={1: 0.5}, source="test",
                           predictor_host_ms=predictor_ms, layer_host_ms=0.1)


def _sim_with(trace, hw, admission, predictor="transition", depth=1, engine="python", cap=4):
    m = trace.meta
    pol = new_policy("lru", cap, m.num_layers, m.num_experts, top_k=m.top_k)
    pol.fit(np.ones((m.num_layers, m.num_experts)))
    kw = {"max_depth": depth} if predictor == "transition" else {}
    pred = PREDICTORS.get(predictor)(m.num_layers, m.num_experts, m.top_k, **kw)
    pred.fit(trace)
    sched = Schedule(trace, decode_stream=True)
    return simulate(sched, pol, pred, depth=depth, hardware=hw, admission=admission, bound=False, engine=engine)


def test_gate_turns_off_where_prediction_cannot_pay():
    """Random routing with a costly predictor: the gate stops asking it at every layer (probing at its
    bounded rate), and the run is faster than asking it at every layer."""
    trace = _trace(L=4, tokens=400)
    hw = _gated_hw(copy_ms=0.3, predictor_ms=1.0)
    gated = _sim_with(trace, hw, "gated", predictor="temporal")
    always = _sim_with(trace, hw, "cost", predictor="temporal")
    visits = trace.meta.num_layers * 400
    assert gated.extra["layers_off"] == 4
    assert gated.extra["predictor_calls"] < visits / 10
    assert gated.extra["predictor_calls"] + gated.extra["predictor_skipped"] == visits
    assert gated.extra["predictor_probes"] > 0
    assert gated.time_ms < always.time_ms
    assert "predictor_calls" not in always.extra


def test_gate_stays_on_where_prediction_pays():
    trace = _cyclic_trace()
    hw = _gated_hw(copy_ms=0.3, predictor_ms=0.05)
    gated = _sim_with(trace, hw, "gated")
    always = _sim_with(trace, hw, "cost")
    assert gated.extra["layers_off"] == 0 and gated.extra["predictor_skipped"] == 0
    assert gated.prefetches == always.prefetches > 0 and gated.time_ms == always.time_ms
    m = trace.meta
    pol = new_policy("lru", 4, m.num_layers, m.num_experts, top_k=m.top_k)
    pol.fit(np.ones((m.num_layers, m.num_experts)))
    bare = simulate(Schedule(trace, decode_stream=True), pol, hardware=hw, bound=False, engine="python")
    assert gated.time_ms < bare.time_ms


def test_gate_is_the_same_in_both_engines():
    """Bit-identical rows (counts, gate totals, times) from the Python reference and the C++ core, on a trace
    where the gate turns layers off and one where it stays on."""
    from moecache._ext import extension

    if extension() is None:
        pytest.skip("the C++ extension is not built")
    for trace, hw in ((_trace(L=4, tokens=400), _gated_hw(0.3, 1.0)), (_cyclic_trace(), _gated_hw(0.3, 0.05)),
                      (_trace(L=4, tokens=400, seed=3), _gated_hw(0.05, 0.02))):
        for pred in ("temporal", "transition"):
            for depth in (1, 2):
                py = _sim_with(trace, hw, "gated", predictor=pred, depth=depth)
                cpp = _sim_with(trace, hw, "gated", predictor=pred, depth=depth, engine="cpp")
                assert py.row() == cpp.row()
