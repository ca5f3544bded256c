"""The C++ replay engine against the Python reference: identical result rows and need logs.

The reference runs with the extension disabled (``MOECACHE_DISABLE_EXT=1``), the C++ engine with
``engine="cpp"``; rows (bound included) and per-need records are compared with ``==``.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecache._ext import ENV_DISABLE, extension
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.sim import HardwareProfile, Schedule, default_profile, simulate
from moecache.sim import engine_cpp
from moecache.sim.engine_cpp import CPP_POLICIES, choose_engine
from moecache.trace import PHASE_DECODE, RoutingBlock, Trace, TraceMeta, count_ids
from moecache.trace.importers import read_sources

from tests.simtools import make_trace

pytestmark = pytest.mark.skipif(extension() is None or not hasattr(extension(), "sim_replay"),
                                reason="moecache._C with sim_replay is not built")

MISS_RULES = ("copy", "cpu", "policy", "min")
#: (policy, parameters) pairs covering every C++ policy and the parameter edge cases.
CONFIGS = [("lru", {}), ("fifo", {}), ("lfu", {}), ("lfu", {"half_life": 0}), ("lfu", {"half_life": 1}),
           ("lrfu", {}), ("lrfu", {"half_life": 0.5}), ("static", {}), ("static", {"scratch": 1}),
           ("belady", {}), ("belady_bypass", {})]


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


def _profile(bytes_per_expert: int = 3_000_000) -> HardwareProfile:
    # uneven token-count tables, so batched units interpolate and no two costs are round numbers
    return HardwareProfile(bytes_per_expert=bytes_per_expert, copy_bandwidth_gbps=23.7, copy_latency_ms=0.013,
                           gpu_ms={1: 0.071, 3: 0.093, 16: 0.41}, cpu_ms={1: 0.37, 4: 1.13, 32: 7.9},
                           non_expert_ms={1: 0.0517, 8: 0.2, 64: 1.3}, source="test")


def both(trace, name, params, cap, scope, miss_rule, *, decode=False, hw=None, bound=True):
    """(reference row, reference log), (C++ row, C++ log)."""
    hw = hw or _profile()
    out = []
    for engine in ("python", "cpp"):
        log: list = []
        sched = Schedule(trace, decode_stream=decode, name="t")
        pol = _policy(name, params, cap, trace, scope)
        if engine == "python":
            with ext_disabled():
                r = simulate(sched, pol, hardware=hw, miss_rule=miss_rule, record=log, bound=bound)
        else:
            r = simulate(sched, pol, hardware=hw, miss_rule=miss_rule, record=log, bound=bound, engine="cpp")
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
    """``heap``: force the C++ score policies' heap layout with parking (small traces would
    otherwise always use the scan layout)."""
    old = dict(engine_cpp.TUNING)
    if heap:
        engine_cpp.TUNING.update(scan_max=0, park_min=0)
    try:
        yield
    finally:
        engine_cpp.TUNING.update(old)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(), st.sampled_from(CONFIGS), st.sampled_from(MISS_RULES), st.booleans(), st.booleans())
def test_random_traces_identical(case, config, miss_rule, decode, heap):
    trace, scope, cap = case
    name, params = config
    with tuning(heap):
        (ref, ref_log), (got, got_log) = both(trace, name, params, cap, scope, miss_rule, decode=decode)
    assert got == ref
    assert got_log == ref_log


def test_every_cpp_policy_is_covered():
    assert {n for n, _p in CONFIGS} == set(CPP_POLICIES.names())


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


def test_golden_mixtral_hits(routing_dir):
    # tests/test_policies.py pins these demand hits for the Python engine; the C++ engine must match
    from tests.simtools import mixtral_prefix
    from tests.test_policies import GOLDEN_HITS

    trace = mixtral_prefix(routing_dir)
    checked = 0
    for (name, scope, cap), hits in GOLDEN_HITS.items():
        if name not in CPP_POLICIES:
            continue
        pol = _policy(name, {}, cap, trace, scope)
        r = simulate(Schedule(trace), pol, miss_rule="policy", bound=False, engine="cpp")
        assert r.hits == hits, (name, scope, cap)
        checked += 1
    assert checked == 3 * len(CPP_POLICIES)


# -- engine choice, errors, the GIL --------------------------------------------------------------

def test_engine_choice_and_fallback():
    trace = make_trace([[0], [1], [2]], num_experts=4)
    pol = new_policy("activation", 2, 1, 4)
    assert choose_engine("auto", pol) == "python"
    with pytest.raises(ConfigError, match="no C\\+\\+ version"):
        simulate(Schedule(trace), pol, engine="cpp")
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


def test_gil_released_during_replay():
    rng = np.random.default_rng(0)
    n, L, E, K = 200_000, 4, 16, 2
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

    cpp_ok = "lru,fifo,lfu,lrfu,static,belady,belady_bypass"
    ref = bench(cpp_ok + ",activation", "--engine", "python", "--jobs", "1")
    auto = bench(cpp_ok + ",activation", "--jobs", "2")  # default engine: auto, runs in 2 threads
    cpp = bench(cpp_ok, "--engine", "cpp", "--jobs", "2")
    assert {r["engine"] for r in ref} == {"python"} and {r["engine"] for r in cpp} == {"cpp"}
    # auto: cpp where supported, python for activation (no C++ version); each row says which
    assert {(r["policy"].split("(")[0], r["engine"]) for r in auto} == \
        {(n, "cpp") for n in cpp_ok.split(",")} | {("activation", "python")}

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "engine"} for r in rows]

    assert strip(auto) == strip(ref)
    assert strip(cpp) == [r for r in strip(ref) if not r["policy"].startswith("activation")]
    # an explicit --engine cpp that cannot run says why
    assert main(["bench", path, "--policies", "activation", "--engine", "cpp", "--quiet"]) == 2
    assert "no C++ version" in capsys.readouterr().err
    # the table's footer states the engine
    assert main(["bench", path, "--policies", "lru", "--quiet"]) == 0
    assert "engine cpp (2 runs)" in capsys.readouterr().out


def test_id_listed_twice_widens_the_cost_tables():
    # one row listing expert 2 twice: a count (2) above the unit's rows (1), beyond the first tables
    trace = make_trace([[(2, 2)], [(0, 2)], [(2, 2)]], num_experts=4, top_k=2)
    (ref, ref_log), (got, got_log) = both(trace, "lru", {}, 2, "layer", "min")
    assert got == ref and got_log == ref_log
    assert [c for _g, _k, c, _o in got_log] == [2, 1, 1, 2]
