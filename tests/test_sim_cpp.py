"""The C++ replay engine against the Python reference: identical result rows and need logs.

The reference runs with the extension disabled (``MOECACHE_DISABLE_EXT=1``), the C++ engine with
``engine="cpp"``; rows (bound included) and per-need records are compared with ``==``. Covered:
every policy, both scopes, every miss rule, capacities from top_k to all experts, step and decode
schedules, and with predictors: the C++ ones (prior, temporal, transition) and streamed Python ones
(oracle, activation_matrix, learned, subclasses), prefetch depths 0-3 with both rules and budgets.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from moecache._ext import ENV_DISABLE, extension
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.cost import HardwareProfile, default_profile
from moecache.sim import Schedule, simulate
from moecache.sim import engine_cpp
from moecache.sim.engine_cpp import choose_engine, ported_policies, ported_predictors, predictor_mode
from moecache.trace import PHASE_DECODE, RoutingBlock, Trace, TraceMeta, count_ids
from moecache.trace.importers import read_sources

from tests.simtools import make_trace

pytestmark = pytest.mark.skipif(extension() is None or not hasattr(extension(), "sim_replay"),
                                reason="moecache._C with sim_replay is not built")

MISS_RULES = ("copy", "cpu", "policy", "min")
#: (policy, parameters) pairs covering every C++ policy that needs no predictor and the parameter edge cases.
CONFIGS = [("lru", {}), ("fifo", {}), ("lfu", {}), ("lfu", {"half_life": 0}), ("lfu", {"half_life": 1}),
           ("lrfu", {}), ("lrfu", {"half_life": 0.5}), ("static", {}), ("static", {"scratch": 1}),
           ("activation", {}), ("activation", {"half_life": 0}), ("activation", {"alpha": 2.0, "half_life": 3.0}),
           ("belady", {}), ("belady_bypass", {})]
#: ... and those that read a predictor's scores.
SCORE_CONFIGS = [("predicted", {}), ("predicted", {"half_life": 0, "alpha": 4.0})]
#: (predictor, parameters): the C++ predictors with their edge cases, and streamed Python ones.
PRED_CONFIGS = [("prior", {}), ("prior", {"alpha": 0.0}), ("temporal", {}), ("temporal", {"decay": 1.0, "strength": 0.0}),
                ("temporal", {"decay": 0.0, "strength": 3.0}), ("transition", {}), ("transition", {"combine": "mean"}),
                ("oracle", {}), ("activation_matrix", {"library_size": 2, "matches": 1})]


@contextlib.contextmanager
def ext_disabled():
    """The Python reference paths (as the ``no_ext`` fixture, but usable inside hypothesis tests)."""
    old = os.environ.get(ENV_DISABLE)
    os.environ[ENV_DISABLE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV_DISABLE]
        else:
            os.environ[ENV_DISABLE] = old


def _policy(name, params, cap, trace, scope):
    m = trace.meta
    p = new_policy(name, cap, m.num_layers, m.num_experts, top_k=m.top_k, scope=scope, **params)
    if p.needs_fit:
        p.fit(count_ids(trace))
    return p


def _profile(bytes_per_expert: int = 3_000_000, **terms: float) -> HardwareProfile:
    # uneven token-count tables, so batched units interpolate and no two costs are round numbers;
    # ``terms``: the calibrated host and interference terms (0 where not given)
    return HardwareProfile(bytes_per_expert=bytes_per_expert, copy_bandwidth_gbps=23.7, copy_latency_ms=0.013,
                           gpu_ms={1: 0.071, 3: 0.093, 16: 0.41}, cpu_ms={1: 0.37, 4: 1.13, 32: 7.9},
                           non_expert_ms={1: 0.0517, 8: 0.2, 64: 1.3}, source="test", **terms)


#: The calibrated terms: all off, or uneven values of the size the fit finds (each term on alone, too).
host_terms = st.one_of(
    st.just({}),
    st.fixed_dictionaries({}, optional={"layer_host_ms": st.floats(0.0, 0.5), "copy_host_ms": st.floats(0.0, 0.2),
                                        "predictor_host_ms": st.floats(0.0, 0.4),
                                        "prefetch_host_ms": st.floats(0.0, 0.1),
                                        "copy_slowdown": st.floats(0.0, 0.3),
                                        "hybrid_layer_ms": st.floats(0.0, 1.0),
                                        "predictor_host_by_name": st.dictionaries(
                                            st.sampled_from(["prior", "temporal", "transition", "oracle", "learned"]),
                                            st.floats(0.0, 0.6), max_size=3)}))


def _predictor(name, params, trace, depths=()):
    """A predictor for ``trace`` (fitted on it where it needs fitting); transition deep enough for ``depths``."""
    if name is None:
        return None
    from moecache.predictors import PREDICTORS

    m = trace.meta
    params = dict(params)
    if name == "transition" and "max_depth" not in params:
        params["max_depth"] = max([1, *depths])
    pred = PREDICTORS.get(name)(m.num_layers, m.num_experts, m.top_k, **params)
    if pred.needs_fit or name == "temporal":
        pred.fit(trace)
    return pred


def both(trace, name, params, cap, scope, miss_rule, *, decode=False, hw=None, bound=True, pred=None, depth=0,
         prefetch="topk", budget=None, admission="gated", copy_queue=None):
    """(reference row, reference log), (C++ row, C++ log); ``pred`` = (predictor name, parameters); ``copy_queue``
    None: the simulator's default (the runtime's copy worker)."""
    hw = hw or _profile()
    out = []
    for engine in ("python", "cpp"):
        log: list = []
        sched = Schedule(trace, decode_stream=decode, name="t")
        pol = _policy(name, params, cap, trace, scope)
        depths = list(range(1, depth + 1)) + ([trace.meta.num_layers] if pol.uses_scores else [])
        predictor = _predictor(*pred, trace, depths) if pred else None
        kw = dict(hardware=hw, miss_rule=miss_rule, record=log, bound=bound, depth=depth, prefetch=prefetch,
                  budget=budget, admission=admission)
        if copy_queue is not None:
            kw["copy_queue"] = copy_queue
        if engine == "python":
            with ext_disabled():
                r = simulate(sched, pol, predictor, **kw)
        else:
            r = simulate(sched, pol, predictor, engine="cpp", **kw)
        out.append((r.row(), log))
    return out


@st.composite
def traces(draw):
    L = draw(st.integers(1, 3))
    E = draw(st.integers(2, 8))
    K = draw(st.integers(1, min(3, E)))
    n = draw(st.integers(1, 40))
    rows = []
    for _ in range(n):
        tok = []
        for _l in range(L):
            ids = draw(st.lists(st.integers(0, E - 1), min_size=K, max_size=K, unique=True))
            # occasionally a missing / dropped id, or one listed twice
            if draw(st.integers(0, 9)) == 0:
                ids[draw(st.integers(0, K - 1))] = draw(st.sampled_from([-1, -2, ids[0]]))
            tok.append(ids)
        rows.append(tok)
    seq = sorted(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    seq = [s if draw(st.booleans()) or i == 0 else seq[i - 1] for i, s in enumerate(seq)]
    step = draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n))
    step = sorted(step) if draw(st.booleans()) else step  # sorted: long batched units
    scope = draw(st.sampled_from(["layer", "global"]))
    total = E if scope == "layer" else L * E
    cap = draw(st.integers(K, total))
    trace = make_trace(rows, num_experts=E, top_k=K, seq=seq, step=step)
    return trace, scope, cap


@contextlib.contextmanager
def tuning(heap: bool):
    """``heap``: force the C++ score policies' heap layout with parking, and activation / predicted's
    per-layer sorted lists (small traces would otherwise always use the scan layouts)."""
    old = dict(engine_cpp.TUNING)
    if heap:
        engine_cpp.TUNING.update(scan_max=0, park_min=0, wait_scan_max=0)
    try:
        yield
    finally:
        engine_cpp.TUNING.update(old)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.sampled_from(CONFIGS), st.sampled_from(MISS_RULES), st.booleans(), st.booleans(), host_terms)
def test_random_traces_identical(case, config, miss_rule, decode, heap, terms):
    trace, scope, cap = case
    name, params = config
    with tuning(heap):
        (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, miss_rule, decode=decode,
                                              hw=_profile(**terms))
    assert got == ref
    assert got_log == ref_log


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.integers(1, 70), st.data())
def test_normalise_identical(rows, experts, data):
    # the core's Predictor.normalise, row by row, on scores that overflow (several capping rounds),
    # vanish, tie or span many magnitudes
    from moecache.predictors.base import Predictor

    top_k = data.draw(st.integers(1, experts))
    value = st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.floats(1e-300, 1e300), st.sampled_from([1e-9, 0.5, 7.0]))
    scores = np.array(data.draw(st.lists(value, min_size=rows * experts, max_size=rows * experts)),
                      np.float64).reshape(rows, experts)
    with np.errstate(all="ignore"):  # sums of huge scores overflow: both sides must then agree on inf / nan
        ref = Predictor(1, experts, top_k).normalise(scores)
    got = extension().sim_normalise(__import__("torch").from_numpy(scores), top_k).numpy()
    np.testing.assert_array_equal(got, ref)


def test_every_cpp_port_is_covered():
    # the differential tests run every policy and predictor that has a C++ port (a port is optional)
    assert {n for n, _p in CONFIGS + SCORE_CONFIGS} == set(ported_policies())
    assert {n for n, _p in PRED_CONFIGS} >= set(ported_predictors())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.sampled_from(CONFIGS + SCORE_CONFIGS + SCORE_CONFIGS), st.sampled_from(PRED_CONFIGS),
       st.integers(0, 3), st.sampled_from(["topk", "fill"]), st.one_of(st.none(), st.integers(1, 8)),
       st.sampled_from(MISS_RULES), st.booleans(), st.booleans(), host_terms,
       st.sampled_from(["gated", "cost", "none"]), st.floats(0.0, 0.3))
def test_random_traces_with_predictors_identical(case, config, pred, depth, prefetch, budget, miss_rule, decode, heap,
                                                 terms, admission, scan):
    # the default copy model, the runtime's copy worker (queued prefetches cancelled or promoted at their
    # target, demand first, a scan policy's host time per eviction), on both engines
    trace, scope, cap = case
    name, params = config
    evict = {"evict_host_by_name": {"activation": scan, "predicted": scan}} if scan > 0 else {}
    if name not in ("predicted",) and depth == 0:
        depth = 1  # a predictor without prefetch changes nothing for the other policies
    with tuning(heap):
        try:
            (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, miss_rule, decode=decode,
                                                  pred=pred, depth=depth, prefetch=prefetch, budget=budget,
                                                  hw=_profile(**terms, **evict), admission=admission)
        except ConfigError as e:  # prior with alpha 0 cannot be fitted on a trace with an empty layer
            assert "no routing at layers" in str(e)
            reject()
    assert got == ref
    assert got_log == ref_log


@pytest.mark.parametrize("copy_queue", ["fifo", "worker"])
@pytest.mark.parametrize("admission", ["none", "cost", "gated"])
def test_transition_batched_product_identical(admission, copy_queue):
    # The smallest case found where the engines parted (8 experts, a batched unit of two rows, then one):
    # the reference's batched product fold summed each row in the order of an F-ordered copy (sequential,
    # not numpy's pairwise row sum), so its prefetch scores differed in the last bits from the core's and
    # from the same rows predicted alone, and one prefetch tie went the other way.
    trace = make_trace([[[3]], [[4]], [[2]]], num_experts=8, top_k=1, step=[2, 2, 3])
    (ref, ref_log), (got, got_log) = both(trace, "lru", {}, 2, "layer", "copy", pred=("transition", {}), depth=2,
                                          budget=1, admission=admission, copy_queue=copy_queue)
    assert got == ref
    assert got_log == ref_log
    assert ref["prefetch_skipped"] + ref["prefetches"] > 0  # the prefetch path ran


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.sampled_from(CONFIGS + SCORE_CONFIGS), st.sampled_from(PRED_CONFIGS), st.integers(1, 3),
       st.sampled_from(["topk", "fill"]), st.one_of(st.none(), st.integers(1, 8)), st.sampled_from(MISS_RULES),
       st.booleans(), st.booleans(), host_terms, st.sampled_from(["gated", "cost", "none"]), st.floats(0.0, 0.3))
def test_fifo_copy_queue_identical(case, config, pred, depth, prefetch, budget, miss_rule, decode, heap, terms,
                                   admission, scan):
    # the FIFO copy model (copy_queue="fifo": every copy in issue order, a scan policy's host time per insert) on
    # both engines; the default, the runtime's copy worker, is what every other test here runs
    trace, scope, cap = case
    name, params = config
    evict = {"evict_host_by_name": {"activation": scan, "predicted": scan}} if scan > 0 else {}
    with tuning(heap):
        try:
            (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, miss_rule, decode=decode,
                                                  pred=pred, depth=depth, prefetch=prefetch, budget=budget,
                                                  hw=_profile(**terms, **evict), admission=admission,
                                                  copy_queue="fifo")
        except ConfigError as e:
            assert "no routing at layers" in str(e)
            reject()
    assert got == ref
    assert got_log == ref_log


# -- prefixes of the real traces -----------------------------------------------------------------

def _real(routing_dir: Path, which: str) -> Trace:
    base = routing_dir
    files = {
        "deepseek": sorted((base / "deepseek-v2-lite-chat__moe-beyond" / "training_data_eamc").glob("*.csv"))[:2],
        "mixtral": [base / "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe" / "gsm8k_2_routing.jsonl"],
        "qwen": [base / "qwen1.5-moe-a2.7b-chat__vllm-moe-logger" / "moe_layer0.jsonl"],
    }[which]
    _src, imported, _d = read_sources([str(f) for f in files])
    t = imported[0]
    trace = Trace(t.meta, t.block)
    seqs = trace.sequences()[:3]
    return trace.select_sequences(seqs)


@pytest.mark.parametrize("which", ["deepseek", "mixtral", "qwen"])
def test_real_trace_prefixes_identical(routing_dir, which):
    trace = _real(routing_dir, which)
    m = trace.meta
    hw = default_profile(m.bytes_per_expert)
    rng = np.random.default_rng(len(which))
    for name, params in CONFIGS:
        for scope in ("layer", "global"):
            total = m.num_experts if scope == "layer" else m.num_layers * m.num_experts
            cap = max(m.top_k, int(total * rng.choice([0.15, 0.3, 0.6])))
            rule = MISS_RULES[int(rng.integers(len(MISS_RULES)))]
            decode = bool(rng.integers(2))
            (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, rule, decode=decode, hw=hw)
            assert got == ref, (name, scope, cap, rule, decode)
            assert got_log == ref_log
            assert got["accesses"] == Schedule(trace).accesses


#: (policy, parameters, predictor, predictor parameters, depth, prefetch rule, budget, scope, miss rule, decode)
REAL_PRED_CASES = [
    ("lru", {}, "transition", {}, 2, "topk", None, "layer", "copy", True),
    ("predicted", {}, "temporal", {}, 1, "fill", None, "global", "copy", False),
    ("belady_bypass", {}, "prior", {}, 1, "topk", None, "layer", "min", True),
    ("activation", {}, "oracle", {}, 1, "topk", None, "global", "policy", False),
    ("lrfu", {}, "activation_matrix", {"library_size": 2}, 2, "fill", 2, "global", "copy", True),
    ("static", {}, "transition", {"combine": "mean"}, 1, "topk", 3, "layer", "cpu", False),
    ("belady", {}, "learned", {"max_depth": 1, "max_samples": 200}, 1, "topk", None, "layer", "copy", True),
]


@pytest.mark.parametrize("which,tokens", [("deepseek", None), ("mixtral", 60), ("qwen", 400)])
def test_real_trace_prefixes_with_predictors_identical(routing_dir, which, tokens):
    trace = _real(routing_dir, which)
    if tokens is not None:
        trace = trace.select(slice(0, tokens))
    m = trace.meta
    hw = default_profile(m.bytes_per_expert)
    prefetched = refused = exercised = 0
    for name, params, pname, pparams, depth, rule, budget, scope, miss, decode in REAL_PRED_CASES:
        total = m.num_experts if scope == "layer" else m.num_layers * m.num_experts
        cap = max(m.top_k, total // 4)
        (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, miss, decode=decode, hw=hw,
                                              pred=(pname, pparams), depth=depth, prefetch=rule, budget=budget)
        assert got == ref, (name, pname, scope)
        assert got_log == ref_log
        prefetched += ref["prefetches"] > 0
        refused += ref["prefetch_refused"] > 0
        exercised += ref["prefetches"] + ref["prefetch_refused"] > 0
    # the prefetch paths were exercised: copies issued and refused by the admission rule
    assert exercised >= len(REAL_PRED_CASES) - 2 and prefetched >= 1 and refused >= 1


@contextlib.contextmanager
def wait_layout(sorted_lists: bool):
    """activation / predicted in the C++ core: per-layer sorted lists (True) or the pool scan (False),
    in either scope, whatever the pool's size."""
    old = dict(engine_cpp.TUNING)
    engine_cpp.TUNING.update(wait_scan_max=0 if sorted_lists else 1 << 40)
    try:
        yield
    finally:
        engine_cpp.TUNING.update(old)


#: (policy, parameters, predictor, prefetch depth): activation, and predicted with a C++ predictor
#: (temporal) and a streamed one (oracle), with and without prefetch.
WAIT_CASES = [("activation", {}, None, 0), ("activation", {"alpha": 2.0, "half_life": 0}, None, 0),
              ("predicted", {}, "temporal", 1), ("predicted", {"half_life": 3.0}, "oracle", 0)]


def _wait_run(trace, name, params, pname, depth, cap, scope, decode, engine, hw):
    pol = _policy(name, params, cap, trace, scope)
    pred = _predictor(pname, {}, trace, [trace.meta.num_layers]) if pname else None
    log: list = []
    ctx = ext_disabled() if engine == "python" else contextlib.nullcontext()
    with ctx:
        r = simulate(Schedule(trace, decode_stream=decode, name="t"), pol, pred, engine=engine, hardware=hw,
                     bound=False, depth=depth, record=log)
    return r.row(), log


@pytest.mark.parametrize("which", ["deepseek", "mixtral"])
def test_wait_order_layouts_equal_reference_on_real_traces(routing_dir, which):
    # both layouts of activation / predicted give the Python reference's rows and need logs (every
    # victim), in both scopes, with small and large pools (small: many evictions; large: few)
    trace = _real(routing_dir, which)
    if which == "mixtral":
        trace = trace.select(slice(0, 80))
    m = trace.meta
    hw = default_profile(m.bytes_per_expert)
    for i, (name, params, pname, depth) in enumerate(WAIT_CASES):
        for scope in ("layer", "global"):
            total = m.num_experts if scope == "layer" else m.num_layers * m.num_experts
            for frac in (0.15, 0.6):
                cap = max(m.top_k, int(total * frac))
                decode = (i + int(frac > 0.5)) % 2 == 0
                args = (trace, name, params, pname, depth, cap, scope, decode)
                ref = _wait_run(*args, "python", hw)
                case = (name, params, pname, scope, cap, decode)
                assert ref[0]["loads"] > cap, case  # victims were chosen
                for sorted_lists in (True, False):
                    with wait_layout(sorted_lists):
                        assert _wait_run(*args, "cpp", hw) == ref, (case, sorted_lists)


#: Traces where two layers of a global pool tie for the largest wait and the later layer holds the least
#: recent candidate (found by a random search; such ties are rare in random traces): (tokens' ids per
#: layer, top-1 of 4, 3 layers; activation parameters).
CROSS_LAYER_TIES = [
    ([[1, 1, 0], [1, 2, 2], [2, 1, 3], [0, 2, 3], [0, 0, 1]], {"half_life": 1.0, "alpha": 2.0}),
    ([[2, 1, 0], [2, 0, 2], [3, 1, 3], [2, 2, 2], [3, 3, 3], [1, 3, 0], [1, 0, 0], [2, 1, 0], [0, 3, 3],
      [0, 1, 3], [3, 1, 0], [0, 0, 2]], {"half_life": 1.0, "alpha": 1.0}),
]


@pytest.mark.parametrize("ids, params", CROSS_LAYER_TIES)
def test_wait_order_ties_across_layers_equal_reference(ids, params):
    # the sorted lists compare the tied layers' candidates by (last, key), as the scan does
    trace = make_trace([[[e] for e in tok] for tok in ids], num_experts=4, top_k=1)
    for sorted_lists in (True, False):
        with wait_layout(sorted_lists):
            (ref, ref_log), (got, got_log) = both(trace, "activation", params, 4, "global", "copy", decode=True,
                                                  bound=False)
        assert got == ref and got_log == ref_log, sorted_lists


def test_wait_order_layouts_agree_on_longer_real_trace(routing_dir):
    # the C++ core alone on a longer DeepSeek-V2-Lite prefix (too long for the Python reference):
    # sorted lists and pool scan choose the same victims, every capacity from top_k to most of the pool
    base = routing_dir / "deepseek-v2-lite-chat__moe-beyond" / "training_data_eamc"
    _src, imported, _d = read_sources([str(f) for f in sorted(base.glob("*.csv"))[:2]])
    trace = Trace(imported[0].meta, imported[0].block)
    trace = trace.select_sequences(trace.sequences()[:40])
    m = trace.meta
    hw = default_profile(m.bytes_per_expert)
    for name, params, pname, depth in WAIT_CASES:
        for scope, caps in (("layer", (m.top_k, 13, 40)), ("global", (m.top_k, 33, 200, 1200))):
            for cap in caps:
                for decode in (True, False):
                    runs = []
                    for sorted_lists in (True, False):
                        with wait_layout(sorted_lists):
                            runs.append(_wait_run(trace, name, params, pname, depth, cap, scope, decode, "cpp", hw))
                    assert runs[0] == runs[1], (name, pname, scope, cap, decode)
                    # the pool filled and evicted (demand copies and prefetches both insert)
                    assert runs[0][0]["loads"] + runs[0][0]["prefetches"] > cap


def test_golden_mixtral_hits(routing_dir):
    # tests/test_policies.py pins these demand hits for the Python engine; the C++ engine must match
    from tests.simtools import mixtral_prefix
    from tests.test_policies import GOLDEN_HITS, _ready

    trace = mixtral_prefix(routing_dir)
    checked = 0
    for (name, scope, cap), hits in GOLDEN_HITS.items():
        if name not in ported_policies():
            continue
        pol, pred = _ready(name, cap, 32, 8, 2, scope, trace)  # predicted: the oracle (streamed)
        r = simulate(Schedule(trace), pol, pred, miss_rule="policy", bound=False, engine="cpp")
        assert r.hits == hits, (name, scope, cap)
        checked += 1
    assert checked == 3 * len(ported_policies())


# -- engine choice, errors, the GIL --------------------------------------------------------------

def test_engine_choice_and_fallback():
    from moecache.policies.lru import LRU
    from moecache.predictors import PREDICTORS

    trace = make_trace([[0], [1], [2]], num_experts=4)
    # auto takes cpp for every registered policy, with or without a predictor and prefetch
    assert choose_engine("auto", new_policy("activation", 2, 1, 4)) == "cpp"
    temporal = PREDICTORS.get("temporal")(1, 4, 1)
    assert choose_engine("auto", new_policy("predicted", 2, 1, 4), temporal, 2, "fill") == "cpp"
    assert predictor_mode(temporal) == "cpp"
    assert predictor_mode(PREDICTORS.get("oracle")(1, 4, 1)) == "stream"

    class Renamed(LRU):  # a subclass: its hooks would be skipped by the core
        pass

    sub = Renamed(2, 1, 4)
    assert choose_engine("auto", sub) == "python"
    with pytest.raises(ConfigError, match="subclass"):
        simulate(Schedule(trace), sub, engine="cpp")
    assert choose_engine("auto", new_policy("lru", 2, 1, 4), temporal, 1, "no_such_rule") == "python"
    with pytest.raises(ConfigError, match="unknown engine"):
        simulate(Schedule(trace), new_policy("lru", 2, 1, 4), engine="fortran")
    assert choose_engine("auto", new_policy("lru", 2, 1, 4)) == "cpp"
    used = new_policy("lru", 2, 1, 4)
    used.access(0)
    assert choose_engine("auto", used) == "python"
    with ext_disabled():
        assert choose_engine("auto", new_policy("lru", 2, 1, 4)) == "python"
        with pytest.raises(ConfigError, match="not built or is disabled"):
            simulate(Schedule(trace), new_policy("lru", 2, 1, 4), engine="cpp")


def test_a_policy_without_a_port_runs_in_python():
    """A registered policy that defines no ``cpp_port`` (the common case for a new one) runs on the
    Python engine under ``auto``; ``cpp`` says why it cannot."""
    from moecache.policies import POLICIES
    from moecache.policies.base import Policy

    class MostRecent(Policy):  # evicts the most recently inserted expert
        name = "test_most_recent"

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._stack: list[int] = []

        def on_insert(self, key: int) -> None:
            self._stack.append(key)

        def on_evict(self, key: int) -> None:
            self._stack.remove(key)

        def victim(self, pool, protected):
            return next((k for k in reversed(self._stack) if k not in protected), None)

    POLICIES.register("test_most_recent", "test only")(MostRecent)
    try:
        assert "test_most_recent" not in ported_policies()
        trace = make_trace([[0], [1], [2], [0], [1]], num_experts=4)
        pol = new_policy("test_most_recent", 2, 1, 4)
        assert choose_engine("auto", pol) == "python"
        with pytest.raises(ConfigError, match="no C\\+\\+ port"):
            simulate(Schedule(trace), pol, engine="cpp")
        res = simulate(Schedule(trace), pol)  # auto: the Python engine
        # 0, 1 missed; 2 evicts 1 (the newest); 0 hits; 1 misses again
        assert (res.hits, res.loads) == (1, 4)
    finally:
        POLICIES._items.pop("test_most_recent")
        POLICIES._help.pop("test_most_recent")


def _toy(n=60, L=3, E=8, K=2, seqs=4, seed=5):
    rng = np.random.default_rng(seed)
    toks = [[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(n)]
    return make_trace(toks, num_experts=E, top_k=K, seq=np.repeat(np.arange(seqs), n // seqs))


def test_streamed_predictions_arrive_in_bounded_chunks(monkeypatch):
    # a streamed (Python) predictor: the core asks for a few steps at a time, never the whole trace
    trace = _toy()
    steps = Schedule(trace, decode_stream=True).num_steps
    fills: list[tuple[int, int]] = []
    orig = engine_cpp._PredictionStream.fill

    def spy(self):
        n = orig(self)
        fills.append((n, self.buf.size))
        return n

    monkeypatch.setattr(engine_cpp._PredictionStream, "fill", spy)
    monkeypatch.setattr(engine_cpp, "STREAM_CHUNK_DOUBLES", 3 * 2 * 8)  # 3 steps of 2 slots x 8 experts
    (ref, ref_log), (got, got_log) = both(trace, "predicted", {}, 3, "layer", "copy", decode=True,
                                          pred=("oracle", {}), depth=1)
    assert got == ref and got_log == ref_log
    assert [n for n, _ in fills] == [3] * (steps // 3) + ([steps % 3] if steps % 3 else [])
    assert {size for _n, size in fills} == {3 * 2 * 8}


class _Subtemporal:
    """Builds a subclass of the temporal predictor (so it streams from Python) that may raise."""

    @staticmethod
    def make(trace, fail_at=None):
        from moecache.predictors.temporal import TemporalPredictor

        class Sub(TemporalPredictor):
            calls = 0

            def observe(self, layer, experts, hidden=None):
                Sub.calls += 1
                if fail_at is not None and Sub.calls == fail_at:
                    raise ValueError(f"boom at observe {fail_at}")
                super().observe(layer, experts, hidden)

        m = trace.meta
        return Sub(m.num_layers, m.num_experts, m.top_k).fit(trace)


def test_streamed_predictor_without_slots_equals_reference():
    # a streamed predictor with nothing to stream (prefetch depth 0, a policy without scores) still runs
    # and costs its host time per layer, as in the reference (it divided by zero slots before)
    trace = _toy()
    hw = _profile(predictor_host_ms=0.25)
    (ref, ref_log), (got, got_log) = both(trace, "activation", {}, 3, "layer", "copy", hw=hw, pred=("oracle", {}),
                                          depth=0)
    assert got == ref and got_log == ref_log
    (plain, _), _cpp = both(trace, "activation", {}, 3, "layer", "copy", hw=hw)
    assert ref["hits"] == plain["hits"] and ref["time_ms"] > plain["time_ms"]


def test_streamed_subclass_equals_native_and_reference():
    trace = _toy()
    rows = []
    for engine, make in (("python", _Subtemporal.make), ("cpp", _Subtemporal.make), ("cpp", None)):
        m = trace.meta
        pred = make(trace) if make else _predictor("temporal", {}, trace)
        assert predictor_mode(pred) == ("cpp" if make is None else "stream")
        pol = new_policy("predicted", 4, m.num_layers, m.num_experts, top_k=m.top_k, scope="global")
        ctx = ext_disabled() if engine == "python" else contextlib.nullcontext()
        with ctx:
            rows.append(simulate(Schedule(trace), pol, pred, depth=2, engine=engine, hardware=_profile()).row())
    assert rows[0] == rows[1] == rows[2]
    assert rows[0]["prefetches"] > 0


def test_streamed_predictor_error_surfaces_like_the_reference(monkeypatch):
    trace = _toy()
    monkeypatch.setattr(engine_cpp, "STREAM_CHUNK_DOUBLES", 4 * 1 * 8)
    errors = []
    for engine in ("python", "cpp"):
        pred = _Subtemporal.make(trace, fail_at=10)
        m = trace.meta
        pol = new_policy("lru", 3, m.num_layers, m.num_experts, top_k=m.top_k)
        ctx = ext_disabled() if engine == "python" else contextlib.nullcontext()
        with ctx, pytest.raises(ValueError) as e:
            simulate(Schedule(trace), pol, pred, depth=1, engine=engine)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1] == (ValueError, "boom at observe 10")


def test_predictor_errors_are_the_same():
    trace = _toy()
    m = trace.meta
    msgs = []
    for engine in ("python", "cpp"):
        ctx = ext_disabled() if engine == "python" else contextlib.nullcontext()
        with ctx:
            shallow = _predictor("transition", {"max_depth": 2}, trace)
            pol = new_policy("lru", 3, m.num_layers, m.num_experts, top_k=m.top_k)
            with pytest.raises(ConfigError) as e:  # deeper than fitted
                simulate(Schedule(trace), pol, shallow, depth=3, engine=engine)
            msgs.append(str(e.value))
            pol = new_policy("predicted", 3, m.num_layers, m.num_experts, top_k=m.top_k)
            with pytest.raises(ConfigError) as e:  # predicted wants depth L = 3
                simulate(Schedule(trace), pol, shallow, engine=engine)
            msgs.append(str(e.value))
    assert msgs[:2] == msgs[2:]
    assert "fitted up to depth 2, asked for 3" in msgs[0]


def test_bad_input_same_errors():
    meta = TraceMeta(num_experts=4, top_k=2, moe_layers=[0], bytes_per_expert=10)
    msgs = []
    for disable in (True, False):
        ctx = ext_disabled() if disable else contextlib.nullcontext()
        with ctx:
            errs = []
            with pytest.raises(Exception) as e:  # ids beyond the declared expert count
                Trace(meta, RoutingBlock.build(np.array([[[0, 4]]]), seq=0, phase=PHASE_DECODE))
            errs.append((type(e.value), str(e.value)))
            with pytest.raises(ConfigError) as e:  # capacity below top-k
                new_policy("lru", 1, 1, 4, top_k=2)
            errs.append((type(e.value), str(e.value)))
            empty = Trace(meta, RoutingBlock.build(np.zeros((0, 1, 2), np.int64), seq=0, phase=PHASE_DECODE))
            with pytest.raises(ConfigError) as e:  # empty trace
                simulate(Schedule(empty), new_policy("lru", 2, 1, 4, top_k=2))
            errs.append((type(e.value), str(e.value)))
            msgs.append(errs)
    assert msgs[0] == msgs[1]
    assert "out of range" in msgs[0][0][1] and "below top_k" in msgs[0][1][1] and "empty" in msgs[0][2][1]


def test_cpp_engine_checks_ids_itself():
    # a schedule whose ids were altered after validation: the C++ path refuses it with a clear error
    trace = make_trace([[0], [1]], num_experts=4)
    sched = Schedule(trace)
    sched.ids[1, 0, 0] = 9
    with pytest.raises(ConfigError, match="expert id 9 out of range"):
        simulate(sched, new_policy("lru", 2, 1, 4), engine="cpp", bound=False)


@pytest.mark.parametrize("with_predictor", [False, True])
def test_gil_released_during_replay(with_predictor):
    rng = np.random.default_rng(0)
    n, L, E, K = (200_000 if not with_predictor else 40_000), 4, 16, 2
    ids = np.argsort(rng.random((n, L, E)), axis=2)[:, :, :K].astype(np.int64)
    meta = TraceMeta(num_experts=E, top_k=K, moe_layers=list(range(L)), bytes_per_expert=10)
    sched = Schedule(Trace(meta, RoutingBlock.build(ids, seq=0, phase=PHASE_DECODE)), decode_stream=True)
    gap = [0.0]
    ticks = [0]
    done = threading.Event()

    def spin():  # the longest pause between two of its iterations is how long it was kept off the GIL
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            if now - last > gap[0]:
                gap[0] = now - last
            last = now
            ticks[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.02)
    gap[0] = 0.0
    t0 = time.perf_counter()
    if with_predictor:  # temporal runs inside the core: no Python at all during the replay
        from moecache.predictors import PREDICTORS

        pred = PREDICTORS.get("temporal")(L, E, K)
        r = simulate(sched, new_policy("predicted", 4, L, E, top_k=K), pred, depth=1, engine="cpp", bound=False)
    else:
        r = simulate(sched, new_policy("belady", 4, L, E, top_k=K), engine="cpp", bound=False)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    assert r.accesses == n * L * K
    # Holding the GIL through the replay would stop the spinner for about the whole call; released,
    # it only waits for the interpreter's switch interval (5 ms) while Python code runs.
    assert took > 0.05, took
    assert gap[0] < took / 3, (gap[0], took)


def test_bench_engine_flag(tmp_path, capsys):
    from moecache.cli import main

    rng = np.random.default_rng(3)
    toks = [[rng.choice(8, 2, replace=False) for _ in range(4)] for _ in range(60)]
    path = make_trace(toks, num_experts=8, top_k=2, seq=np.repeat(np.arange(6), 10)).save(tmp_path / "t")

    def bench(policies: str, *extra: str) -> list[dict]:
        code = main(["bench", path, "--policies", policies, "--capacity", "3,50%", "--scope", "layer,global",
                     "--miss-rule", "min", "--json", "--quiet", *extra])
        out, _err = capsys.readouterr()
        assert code == 0
        return json.loads(out)

    every = "lru,fifo,lfu,lrfu,static,activation,belady,belady_bypass"
    ref = bench(every, "--sim-engine", "python", "--jobs", "1")
    auto = bench(every, "--jobs", "2")  # default engine: auto, runs in 2 threads
    cpp = bench(every, "--sim-engine", "cpp", "--jobs", "2")
    assert {r["engine"] for r in ref} == {"python"} and {r["engine"] for r in cpp} == {"cpp"}
    # auto: cpp for every policy now; each row says which engine ran it
    assert {r["engine"] for r in auto} == {"cpp"}

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "engine"} for r in rows]

    assert strip(auto) == strip(ref) == strip(cpp)
    # with a predictor (in C++: temporal; streamed from Python: oracle) and prefetch
    for pred in ("temporal", "oracle"):
        extra = ("--predictor", pred, "--prefetch-depth", "2", "--prefetch-rule", "fill")
        ref = bench("lru,predicted,belady", "--sim-engine", "python", "--jobs", "1", *extra)
        cpp = bench("lru,predicted,belady", "--jobs", "2", *extra)
        assert {r["engine"] for r in cpp} == {"cpp"}
        # every row weighed prefetches (the admission rule issues or refuses each; both engines alike)
        assert strip(cpp) == strip(ref) and all(r["prefetches"] + r["prefetch_refused"] > 0 for r in ref)
        if pred == "oracle":
            assert all(r["prefetches"] > 0 for r in ref)
    # an explicit --sim-engine cpp that cannot run says why
    with ext_disabled():
        assert main(["bench", path, "--policies", "lru", "--sim-engine", "cpp", "--quiet"]) == 2
    assert "not built or is disabled" in capsys.readouterr().err
    # the table's footer states the engine
    assert main(["bench", path, "--policies", "lru", "--quiet"]) == 0
    assert "engine cpp (2 runs)" in capsys.readouterr().out


def test_id_listed_twice_widens_the_cost_tables():
    # one row listing expert 2 twice: a count (2) above the unit's rows (1), beyond the first tables
    trace = make_trace([[(2, 2)], [(0, 2)], [(2, 2)]], num_experts=4, top_k=2)
    (ref, ref_log), (got, got_log) = both(trace, "lru", {}, 2, "layer", "min")
    assert got == ref and got_log == ref_log
    assert [c for _g, _k, c, _o in got_log] == [2, 1, 1, 2]
