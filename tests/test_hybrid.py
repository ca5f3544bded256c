"""Hybrid CPU-GPU expert execution (CPU-only here): the C++ kernel against torch on every path, the
decision rule shared with the simulator, the calibration cache, and the runtime with every miss,
none and half of them on the CPU, against the unpatched model."""

from __future__ import annotations

import json
import os

import numpy as np
import time

import pytest
import torch

from moecache._ext import extension
from moecache.errors import ConfigError
from moecache.runtime import offload
from moecache.runtime import hybrid as hy
from moecache.runtime import calibration as cal, cpu_kernel as ck, hybrid_rules as hr
from moecache.cost.hardware import HardwareProfile, load_profile
from moecache.sim import Schedule, simulate
from moecache.cost.timing import MISS_RULES, REUSE_CREDIT_MAX, Timeline, choose_copy, reuse_credit, reuse_rate

from .tiny_models import tiny_model

needs_ext = pytest.mark.skipif(extension() is None, reason="moecache._C not built")
PROMPT = [[5, 6, 7, 8, 9, 10, 11]]
#: The C++ kernels' names; what each machine runs depends on its CPU (tests accept the fallbacks).
CPP_KERNELS = ("avx512", "avx2", "portable")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # One intra-op thread on the 2-core CI machine; calibrations cached in a temporary folder; the
    # kernel variable unset unless a test sets it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv(cal.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(hy.ENV_KERNEL, raising=False)
    yield
    torch.set_num_threads(n)


# -- the C++ kernel against torch ----------------------------------------------------------------------

def torch_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The specification, in float64: down(silu(gate x) * (up x)) with gate_up = [gate; up]."""
    i = down.shape[1]
    h = x.double() @ gate_up.double().t()
    return (torch.nn.functional.silu(h[:, :i]) * h[:, i:]) @ down.double().t()


def _expected_kernel(requested: str) -> str:
    f = extension().cpu_features()
    best = "avx512" if f["avx512f"] else ("avx2" if f["avx2"] and f["fma"] else "portable")
    order = ["portable", "avx2", "avx512"]
    return requested if order.index(requested) <= order.index(best) else best


@needs_ext
def test_kernel_many_tasks_with_more_threads_than_cores():
    """Oversubscribed pool (8 threads on this machine's few cores), many small tasks in a row, a
    waiter that sleeps between them: every task ends (a task ends when its items are done, not when
    every thread has passed, so late workers cannot hold it) with the 1-thread results bit for bit."""
    C = extension()
    gen = torch.Generator().manual_seed(3)
    H, I = 64, 48
    gu, d = torch.randn(2 * I, H, generator=gen).bfloat16(), torch.randn(H, I, generator=gen).bfloat16()
    xs = [torch.randn(n, H, generator=gen) for n in (1, 2, 1, 5, 1, 3) * 10]
    results = []
    for threads in (1, 8):
        pool = C.CpuExpertPool(threads, "auto")
        outs = []
        for i, x in enumerate(xs):
            out = torch.empty(x.shape[0], H)
            t = pool.submit(H, I, 1, [x.data_ptr()], [x.shape[0]], [gu.data_ptr()], [d.data_ptr()], [out.data_ptr()])
            if i % 7 == 0:
                time.sleep(0.002)  # the workers go back to sleep before some tasks
            pool.wait(t)
            outs.append(out)
        assert pool.counters()[0] == len(xs)
        pool.close()
        results.append(outs)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch(kernel, dtype):
    C = extension()
    pool = C.CpuExpertPool(2, kernel)
    # A CPU without the instructions gets the best kernel it has, never an illegal instruction.
    assert pool.kernel() == _expected_kernel(kernel) and pool.threads() == 2
    gen = torch.Generator().manual_seed(0)
    # (hidden, intermediate, tokens): odd sizes exercise the vector tails, 1-9 tokens every token block.
    for H, I, P in ((32, 16, 1), (37, 19, 3), (130, 70, 9), (64, 48, 5), (17, 3, 2), (256, 96, 4)):
        gate_up = torch.randn(2 * I, H, generator=gen).to(dtype)
        down = torch.randn(H, I, generator=gen).to(dtype)
        x = torch.randn(P, H, generator=gen)
        out = torch.full((P, H), float("nan"))
        t = pool.submit(H, I, 1 if dtype == torch.bfloat16 else 0, [x.data_ptr()], [P], [gate_up.data_ptr()],
                        [down.data_ptr()], [out.data_ptr()])
        assert pool.wait(t) >= 0
        ref = torch_ffn(x, gate_up, down)
        # fp32 accumulation of exact (bf16 -> fp32) weights: relative error ~1e-7 per sum.
        scale = ref.abs().max().item()
        assert (out.double() - ref).abs().max().item() <= 2e-5 * scale, (kernel, dtype, H, I, P)
    tasks, experts, rows, ms = pool.counters()
    assert (tasks, experts, rows) == (6, 6, 24) and ms > 0
    pool.close()


@needs_ext
def test_kernel_task_of_several_experts_and_threads():
    """One task with experts of different token counts, on 1 and 3 threads: identical outputs (each
    output element is one dot product in a fixed order, whoever computes it)."""
    C = extension()
    gen = torch.Generator().manual_seed(1)
    H, I = 96, 40
    ws = [(torch.randn(2 * I, H, generator=gen).bfloat16(), torch.randn(H, I, generator=gen).bfloat16())
          for _ in range(3)]
    sizes = [1, 6, 3]
    x = torch.randn(sum(sizes), H, generator=gen)
    results = []
    for threads in (1, 3):
        pool = C.CpuExpertPool(threads, "auto")
        out = torch.empty(sum(sizes), H)
        offs = np.cumsum([0] + sizes[:-1])
        t = pool.submit(H, I, 1, [x[o:].data_ptr() for o in offs], sizes, [w[0].data_ptr() for w in ws],
                        [w[1].data_ptr() for w in ws], [out[o:].data_ptr() for o in offs])
        pool.wait(t)
        with pytest.raises(ValueError, match="ticket"):
            pool.wait(t)  # a ticket is waited once
        pool.close()
        results.append(out)
        for (gu, d), o, n in zip(ws, offs, sizes):
            ref = torch_ffn(x[o:o + n], gu, d)
            assert (out[o:o + n].double() - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert torch.equal(results[0], results[1])


@needs_ext
@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_tokens_together_equal_tokens_one_by_one(kernel, dtype):
    """Token blocking: many tokens in one job (register blocks of rows x tokens, chunk-major order
    past one token block) give exactly the bits of each token run alone, and torch's result. Shapes
    cross the 1024-element summation chunks with tails in both phases; 13 and 70 tokens take the
    chunk-major path with partial token blocks."""
    C = extension()
    pool = C.CpuExpertPool(3, kernel)
    gen = torch.Generator().manual_seed(2)
    wt = 1 if dtype == torch.bfloat16 else 0
    for H, I, P in ((1100, 70, 13), (130, 1030, 70), (37, 19, 5)):
        gate_up = torch.randn(2 * I, H, generator=gen).to(dtype)
        down = torch.randn(H, I, generator=gen).to(dtype)
        x = torch.randn(P, H, generator=gen)
        together = torch.full((P, H), float("nan"))
        pool.wait(pool.submit(H, I, wt, [x.data_ptr()], [P], [gate_up.data_ptr()], [down.data_ptr()],
                              [together.data_ptr()]))
        alone = torch.full((P, H), float("nan"))
        for p in range(P):
            pool.wait(pool.submit(H, I, wt, [x[p:].data_ptr()], [1], [gate_up.data_ptr()], [down.data_ptr()],
                                  [alone[p:].data_ptr()]))
        assert torch.equal(together, alone), (kernel, dtype, H, I, P)
        ref = torch_ffn(x, gate_up, down)
        assert (together.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item(), (kernel, H, I, P)
    pool.close()


@needs_ext
def test_prewake_then_task_or_none():
    """prewake() announces a task: the workers spin for it, take it when it comes, and go back to
    sleep when it does not; close() still returns while they spin."""
    import time

    C = extension()
    pool = C.CpuExpertPool(2, "auto")
    gen = torch.Generator().manual_seed(3)
    H, I = 24, 10
    gate_up, down = torch.randn(2 * I, H, generator=gen), torch.randn(H, I, generator=gen)
    x = torch.randn(2, H, generator=gen)
    for pause in (0.0, 0.005):  # the task within the spin window, then after it ended (workers asleep again)
        pool.prewake()
        time.sleep(pause)
        out = torch.full((2, H), float("nan"))
        pool.wait(pool.submit(H, I, 0, [x.data_ptr()], [2], [gate_up.data_ptr()], [down.data_ptr()], [out.data_ptr()]))
        ref = torch_ffn(x, gate_up, down)
        assert (out.double() - ref).abs().max() <= 2e-5 * ref.abs().max()
    assert pool.counters()[0] == 2
    pool.prewake()
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 1.0
    pool.prewake()  # closed: nothing to wake, no error


@needs_ext
def test_kernel_selection_falls_back_to_what_the_cpu_has():
    # (avx2, fma, avx512f) -> kernel, for each request: never an instruction set the CPU lacks.
    choose = extension().choose_cpu_kernel
    table = {(False, False, False): "portable", (True, False, False): "portable", (True, True, False): "avx2",
             (True, True, True): "avx512"}
    for feats, best in table.items():
        assert choose("auto", *feats) == best and choose("avx512", *feats) == best
        assert choose("portable", *feats) == "portable"
        assert choose("avx2", *feats) == ("avx2" if best != "portable" else "portable")


@needs_ext
def test_kernel_bad_arguments_are_clear_errors():
    C = extension()
    with pytest.raises(ValueError, match="unknown CPU kernel 'sse9'.*portable"):
        C.CpuExpertPool(1, "sse9")
    pool = C.CpuExpertPool(1, "auto")
    with pytest.raises(ValueError, match="differ in length"):
        pool.submit(4, 4, 0, [0], [1, 2], [0], [0], [0])
    with pytest.raises(ValueError, match="wtype"):
        pool.submit(4, 4, 7, [], [], [], [], [])
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(4, 4, 0, [], [], [], [], [])


@needs_ext
def test_read_bandwidth_probe_reads_everything():
    C = extension()
    pool = C.CpuExpertPool(1, "auto")
    buf = torch.ones(3 * 2**18 + 5)  # not a multiple of the 1 MiB items
    ms, total = pool.read(buf.data_ptr(), buf.numel() * 4)
    assert total == buf.numel() and ms > 0
    pool.close()


# -- the decision rule ---------------------------------------------------------------------------------

def _profile(copy_ms=1.0, gpu=0.5, cpu=None) -> HardwareProfile:
    return HardwareProfile(bytes_per_expert=10**6, copy_bandwidth_gbps=10**6 / (copy_ms * 1e6), copy_latency_ms=0.0,
                           gpu_ms={1: gpu}, cpu_ms=cpu or {1: 2.0}, non_expert_ms={1: 1.0}, source="test")


def test_choose_copy_by_hand():
    # copy path: max(t, copy_free) + copy + gpu - credit; CPU path: max(t, cpu_free) + cpu; ties copy.
    assert choose_copy(0.0, 0.0, 0.0, 1.0, 0.5, 2.0) is True      # 1.5 vs 2
    assert choose_copy(0.0, 1.0, 0.0, 1.0, 0.5, 2.0) is False     # 2.5 vs 2
    assert choose_copy(0.0, 0.5, 0.0, 1.0, 0.5, 2.0) is True      # 2 vs 2: tie -> copy
    assert choose_copy(3.0, 1.0, 0.0, 1.0, 0.5, 2.0) is True      # both start at t = 3
    assert choose_copy(0.0, 1.0, 0.0, 1.0, 0.5, 2.0, reuse_credit_ms=0.5) is True  # 2.5 - 0.5 vs 2: tie
    # The simulator's 'min' miss rule is this very function without a credit, its 'auto' rule with the
    # credit of the replay's own reuse counts (declined misses aside).
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, cf, pf, cp, g, c = rng.uniform(0, 3, 6).round(1)
        hits, copies = (int(v) for v in rng.integers(0, 20, 2))
        tl = Timeline()
        tl.copy, tl.cpu, tl.hits, tl.copies = cf, pf, hits, copies
        assert MISS_RULES.get("min").decide(tl, t, cp, g, c, True) == choose_copy(t, cf, pf, cp, g, c)
        assert MISS_RULES.get("auto").decide(tl, t, cp, g, c, True) == \
            choose_copy(t, cf, pf, cp, g, c, reuse_credit(hits, copies, c))
        assert MISS_RULES.get("auto").decide(tl, t, cp, g, c, False) is False


def test_reuse_estimate_and_credit():
    # Hits per copy, pulled to the prior 0.5 while copies are few; the credit caps it.
    assert reuse_rate(0, 0) == 0.5 and reuse_rate(30, 20) == pytest.approx(32 / 24)
    assert reuse_credit(0, 0, 10.0) == pytest.approx(REUSE_CREDIT_MAX * 10.0)
    assert reuse_credit(300, 100, 10.0) == pytest.approx(REUSE_CREDIT_MAX * 10.0)   # capped
    assert reuse_credit(0, 196, 10.0) == pytest.approx(2 / 200 * 10.0)              # copies never reused


def _executor(rule: str, costs: HardwareProfile | None = None) -> hy.HybridExecutor:
    from moecache.runtime.stats import RuntimeCounters

    return hy.HybridExecutor(hy.HybridConfig(rule=rule), hy.CpuKernel(), costs, RuntimeCounters())


def _no_reuse(ex: hy.HybridExecutor) -> hy.HybridExecutor:
    """Copies seen never to be reused: the credit is ~0 and ``auto`` compares finish times only."""
    ex.copies = 10**6
    return ex


def test_auto_rule_matches_the_simulators_min_rule_without_reuse():
    # tests/test_timing.py::test_min_rule_by_hand: copy 1, GPU 0.5, CPU 2: key 0 copied (1.5 < 2),
    # key 1 then waits for the copy engine (2.5 > 2): CPU.
    ex = _no_reuse(_executor("auto", _profile()))
    assert ex.decide([(0, 1), (1, 1)]) == [True, False]
    assert (ex.counters.decide_copy, ex.counters.decide_cpu) == (1, 1)


def test_reuse_credit_flips_a_decision():
    # One miss, CPU 1.4 ms against copy 1 + GPU 0.5: the CPU finishes first (1.4 < 1.5), but the copy
    # also caches the expert: credited 0.4 x 1.4 (the prior's 0.5 hits per copy, capped), 0.94 < 1.4.
    ex = _executor("auto", _profile(cpu={1: 1.4}))
    assert ex.decide([(0, 1)]) == [True]
    # Copies seen never to be reused: no credit, the CPU again.
    ex = _no_reuse(_executor("auto", _profile(cpu={1: 1.4})))
    ex.copy_until = 0.0
    assert ex.decide([(0, 1)]) == [False]
    # The runtime counts the hits it is told of (a layer without misses too) and the copies it issued.
    ex = _executor("auto", _profile(cpu={1: 1.4}))
    assert ex.decide([], hits=6) == [] and ex.hits == 6
    ex.copies_issued(3)
    assert ex.copies == 3 and reuse_rate(ex.hits, ex.copies) == pytest.approx((6 + 2) / (3 + 4))


@pytest.mark.parametrize("cpu_ms", [2.82, 3.35, 4.0])
def test_two_misses_of_a_layer_split_one_each_at_realistic_costs(cpu_ms):
    """Mixtral at batch 1 on the GPU machine: copy 6.41 ms, marginal GPU 0.15 ms, CPU 2.8 (calibrated
    alone) to 4.0 ms (live, copies running). Two misses: the first on the CPU, the second copied, so
    that both finish about together and the pool fills. Without the credit, at 2.82 ms both would
    go to the CPU (5.64 < 6.56) and nothing would ever be cached. A third miss goes to the CPU again."""
    costs = HardwareProfile(bytes_per_expert=352321536, copy_bandwidth_gbps=352321536 / 6.41e6,
                            copy_latency_ms=0.0, gpu_ms={1: 0.15}, cpu_ms={1: cpu_ms}, non_expert_ms={1: 1.0})
    ex = _executor("auto", costs)
    assert ex.decide([(3, 1), (5, 1)]) == [False, True]
    ex.copy_until = 0.0
    assert ex.decide([(3, 1), (5, 1), (6, 1)]) == [False, True, False]
    if cpu_ms < 3.2:
        tl = Timeline()
        tl.issue_cpu(0.0, cpu_ms)
        assert not choose_copy(0.0, tl.copy, tl.cpu, costs.copy_ms, 0.15, cpu_ms)  # 'min' keeps it on the CPU


def test_tokens_per_expert_and_copy_backlog_flip_the_decision():
    costs = _profile(copy_ms=6.4, gpu=0.14, cpu={1: 5.8, 64: 7.8})  # the Mixtral row of hardware.md
    ex = _no_reuse(_executor("auto", costs))
    assert ex.decide([(3, 1)]) == [False]        # batch 1: the CPU (5.8 ms) beats copy + GPU (6.54 ms)
    ex.copy_until = 0.0
    assert ex.decide([(3, 64)]) == [True]        # 64 tokens on the expert: 7.8 ms on the CPU, copy wins
    # Two misses at batch 1: the first on the CPU, the second then finds the CPU busy: copied.
    assert ex.decide([(3, 1), (4, 1)]) == [False, True]
    # A copy backlog (prefetches queued) makes even a 64-token expert go to the CPU.
    ex.copies_issued(2)
    assert ex.decide([(5, 64)]) == [False]


def test_online_cpu_cost_follows_the_kernels_measurements():
    costs = _profile(cpu={1: 1.0, 4: 2.0})
    online = hy.OnlineCosts(costs)
    assert online.cpu(1) == 1.0 and online.cpu(4) == 2.0 and online.copy_ms == costs.copy_ms
    online.observe_cpu([1, 4], 6.0)   # modelled 3 ms, measured 6: ratio 2, EWMA step
    assert online.cpu_scale == pytest.approx(1.0 + hr.CPU_EWMA * (2.0 - 1.0))
    for _ in range(60):
        online.observe_cpu([1], 2.0)
    assert online.cpu_scale == pytest.approx(2.0) and online.cpu(4) == pytest.approx(4.0)
    online.observe_cpu([1], 1e6)      # a preempted worker moves it by at most the clamp
    assert online.cpu_scale == pytest.approx(2.0 + hr.CPU_EWMA * (hr.CPU_RATIO_CLAMP[1] - 2.0))
    # The decision follows: calibrated, the CPU (1.0) beats copy 1 + GPU 0.5 - credit 0.4; measured
    # twice as slow, it loses (2.0 > 1.5 - 0.8).
    ex = _executor("auto", _profile(cpu={1: 1.0}))
    assert ex.decide([(0, 1)]) == [False]
    for _ in range(60):
        ex.costs.observe_cpu([1], 2.0)
    ex.copy_until = 0.0
    assert ex.decide([(0, 1)]) == [True]


def test_simulators_auto_rule_counts_reuse_and_runs_in_python():
    from moecache.policies import new_policy

    from .test_timing import make_trace

    # One layer, 1 slot; expert 0 needed by 4 tokens in a row. CPU 1.4 against copy 1 + GPU 0.5:
    # 'min' runs every need on the CPU; 'auto' credits the copy (prior 0.5, capped 0.4) and caches it.
    trace = make_trace([[0], [0], [0], [0]], num_experts=4)
    hw = _profile(cpu={1: 1.4})
    for rule, outcomes in (("min", ["cpu"] * 4), ("auto", ["copy", "hit", "hit", "hit"])):
        log: list = []
        r = simulate(Schedule(trace), new_policy("lru", 1, 1, 4), hardware=hw, miss_rule=rule, record=log,
                     bound=False, engine="auto")
        assert [o for *_x, o in log] == outcomes, rule
    assert r.hits == 3 and r.loads == 1
    with pytest.raises(ConfigError, match="miss rule 'auto' has no C.. version"):
        simulate(Schedule(trace), new_policy("lru", 1, 1, 4), hardware=hw, miss_rule="auto", engine="cpp")


def test_forced_rules_and_config_errors():
    assert _executor("cpu").decide([(0, 1), (1, 50)]) == [False, False]
    assert _executor("copy").decide([(0, 1), (1, 50)]) == [True, True]
    half = _executor("half")
    assert half.decide([(0, 1), (1, 1), (2, 1)]) + half.decide([(3, 1)]) == [False, True, False, True]
    with pytest.raises(ConfigError, match="needs costs"):
        _executor("auto")
    with pytest.raises(ConfigError, match="unknown hybrid rule 'fastest'.*auto, copy, cpu, half"):
        hy.HybridConfig.resolve("fastest")
    with pytest.raises(ConfigError, match="CPU kernel 'sse9'.*portable"):
        hy.HybridConfig.resolve(hy.HybridConfig(kernel="sse9"))
    assert hy.HybridConfig.resolve(False) is None and hy.HybridConfig.resolve(True).rule == "auto"
    m = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="hybrid rule"):
        offload(m, cache_slots=4, device="cpu", hybrid="fastest")
    assert not hasattr(m, "moecache")  # refused before the model was touched


@needs_ext
def test_prefill_tokens_per_expert_favour_the_copy():
    """With a CPU cost that grows with tokens per expert, a 7-token prefill copies its busy experts
    and the 1-token decode step runs its misses on the CPU: one rule, different decisions."""
    costs = HardwareProfile(bytes_per_expert=10**6, copy_bandwidth_gbps=1.0, copy_latency_ms=0.0, gpu_ms={1: 0.0},
                            cpu_ms={1: 0.0, 2: 10.0}, non_expert_ms={1: 1.0}, source="test")  # copy 1 ms
    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", profile=costs))
    x = torch.tensor(PROMPT)
    with torch.no_grad():
        m(x)
        s = h.stats()
        assert s["decisions"]["copy"] > 0 and s["cpu_experts"] == s["decisions"]["cpu"]
        h.reset_stats()
        h.runtime.hybrid.copy_until = 0.0
        m(x[:, :1])  # one token: every miss costs 0 ms on the CPU
        s = h.stats()
    h.remove()
    assert s["decisions"]["copy"] == 0 and s["decisions"]["cpu"] == s["misses"] > 0


# -- calibration and its cache ----------------------------------------------------------------------

@needs_ext
def test_calibration_is_measured_cached_and_reused(monkeypatch, tmp_path):
    d = str(tmp_path / "cal")
    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", cache_dir=d))
    desc = h.stats()["config"]["hybrid"]
    path = desc["calibration"]
    h.remove()
    assert path.startswith(d) and os.path.isfile(path)
    key = json.load(open(path[:-5] + ".key.json"))
    assert key["layout"]["kinds"] == {"gate_up_proj": [32, 32], "down_proj": [32, 16]}
    # The cached profile is a hardware profile the simulator reads as it is.
    assert load_profile(path).copy_ms == pytest.approx(desc["costs"]["copy_ms"])
    costs = desc["costs"]
    assert set(costs["cpu_ms"]) == set(cal.CPU_TOKENS) and set(costs["gpu_ms"]) == set(cal.GPU_TOKENS)
    assert costs["copy_ms"] > 0 and all(v > 0 for v in costs["cpu_ms"].values())

    def no_measuring(*a, **k):
        raise AssertionError("calibrated again although a cached calibration matches")

    monkeypatch.setattr(hy, "calibrate", no_measuring)
    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", cache_dir=d))
    assert h.stats()["config"]["hybrid"]["costs"] == costs
    h.remove()
    # Another expert shape is another cache entry; recalibrate=True and a broken file measure again.
    for cfg, why in ((hy.HybridConfig("auto", cache_dir=d, recalibrate=True), "recalibrate"),):
        with pytest.raises(AssertionError, match="calibrated again"):
            offload(tiny_model("qwen3_moe"), cache_slots=4, device="cpu", hybrid=cfg)
    open(path, "w").write("{broken")
    with pytest.raises(AssertionError, match="calibrated again"):
        offload(tiny_model("qwen3_moe"), cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", cache_dir=d))
    with pytest.raises(AssertionError, match="calibrated again"):
        offload(tiny_model("qwen3_moe", moe_intermediate_size=24), cache_slots=4, device="cpu",
                hybrid=hy.HybridConfig("auto", cache_dir=d))


def test_calibration_times_gpu_back_to_back_and_cpu_on_rotating_experts():
    """The GPU time is the marginal one (``back_to_back`` calls timed together, divided); every CPU
    run reads another expert than the one before (weights from memory, as a miss's are)."""
    from moecache.runtime.hoststore import HostAllocator, HostStore
    from moecache.runtime.layout import SlotLayout
    from moecache.runtime.pool import SlotPool

    m = tiny_model("mixtral")
    experts = m.model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    layout = SlotLayout.from_module(experts, E)
    store = HostStore(layout, 2, E, HostAllocator(pin=False))
    store.fill_random(seed=0, std=0.02)
    pool = SlotPool(layout, 2, torch.device("cpu"))
    calls = {"shell": 0}

    def shell(x, idx, w):
        calls["shell"] += 1
        return x

    class Recording(hy.CpuKernel):
        name = "recording"

        def __init__(self):
            self.runs = []

        def submit(self, layer, experts, x, sizes):
            self.runs.append((layer, tuple(experts), tuple(sizes)))
            return x, 0.5

        def wait(self, handle):
            return handle

    kernel = Recording()
    prof = hy.calibrate(store, pool, shell, kernel, 32, reps=3, back_to_back=5)
    # Per token count: a warm-up and 3 timed measurements of 5 calls each.
    assert calls["shell"] == len(cal.GPU_TOKENS) * (1 + 3) * 5
    assert len(kernel.runs) == len(cal.CPU_TOKENS) * (1 + 3)
    keys = [(layer, e[0]) for layer, e, _n in kernel.runs]
    assert all(a != b for a, b in zip(keys, keys[1:])) and len(set(keys)) == min(len(keys), 2 * E)  # in turn
    assert [n for *_x, (n,) in kernel.runs] == [n for n in cal.CPU_TOKENS for _ in range(4)]
    assert set(prof.cpu_ms) == set(cal.CPU_TOKENS) and all(v >= 0 for v in prof.gpu_ms.values())


def test_given_profile_skips_calibration(monkeypatch, tmp_path):
    monkeypatch.setattr(hy, "calibrate", lambda *a, **k: pytest.fail("calibrated although a profile was given"))
    f = tmp_path / "hw.json"
    f.write_text(json.dumps({"copy_bandwidth_gbps": 1.0, "copy_latency_ms": 0.0, "gpu_ms": {"1": 0.1},
                             "cpu_ms": {"1": 1e9}}))  # the CPU never wins
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", profile=str(f)))
    m.generate(torch.tensor(PROMPT), max_new_tokens=3, do_sample=False)
    s = h.stats()
    h.remove()
    assert s["config"]["hybrid"]["calibration"] == str(f)
    assert s["decisions"]["cpu"] == 0 and s["decisions"]["copy"] == s["misses"] > 0


# -- the runtime ------------------------------------------------------------------------------------

@needs_ext
def test_runtime_adapts_the_cpu_cost_and_reports_the_rule_inputs():
    """A profile that overstates the CPU 1000-fold: the kernel's measured times pull the cost down
    (clamped per job), and stats report it with the reuse estimate and the host time per CPU layer."""
    costs = HardwareProfile(bytes_per_expert=10**6, copy_bandwidth_gbps=1e-3, copy_latency_ms=0.0, gpu_ms={1: 0.0},
                            cpu_ms={1: 100.0, 64: 200.0}, non_expert_ms={1: 1.0}, source="test")  # copy 1 s
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu", hybrid=hy.HybridConfig("auto", profile=costs))
    _gen(m, 4)
    s = h.stats()
    h.remove()
    assert s["decisions"]["cpu"] == s["misses"] > 0 and s["cpu_layers"] > 8
    lo = hr.CPU_RATIO_CLAMP[0]
    assert lo <= s["cpu_cost_scale"] < lo + (1 - lo) * (1 - hr.CPU_EWMA) ** 8
    assert s["reuse_rate"] == pytest.approx(reuse_rate(s["hits"], s["copies"]))
    assert s["cpu_launch_ms_per_layer"] > 0 and s["cpu_merge_ms_per_layer"] > 0




def _gen(m, n=8, prompt=PROMPT):
    return m.generate(torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      return_dict_in_generate=True, output_logits=True)


def _assert_close_run(out, ref, logit_tol: float, gap: float):
    """Logits within ``logit_tol`` and tokens equal at every step while the reference's top-2 logit
    gap exceeds ``gap`` (past a near-tie the continuation may differ, so the comparison stops there)."""
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert (a.float() - b.float()).abs().max().item() <= logit_tol, step
        top2 = b.float().topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min().item() <= gap:
            return
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step


@needs_ext
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "olmoe", "phimoe"])
def test_every_none_and_half_of_the_misses_on_the_cpu_fp32(family):
    ref = _gen(tiny_model(family))
    for rule in ("cpu", "half", "copy"):
        m = tiny_model(family)
        if family == "olmoe":
            m.set_experts_implementation("eager")  # the indexer shell in the pair-by-pair GPU path
        h = offload(m, cache_slots=4, device="cpu", hybrid=rule)
        out = _gen(m)
        s = h.stats()
        h.remove()
        d = s["decisions"]
        assert d["copy"] + d["cpu"] == s["misses"] > 0
        assert s["cpu_experts"] == d["cpu"] == s["cpu_kernel_experts"]
        assert s["cpu_kernel"] in CPP_KERNELS and s["config"]["hybrid"]["kernel_reason"] is None
        if rule == "copy":  # nothing on the CPU: the path of hybrid=False, bit for bit
            assert d["cpu"] == 0 and s["cpu_tokens"] == 0
            assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
        else:
            assert d["cpu"] > 0 and s["cpu_tokens"] >= d["cpu"]
            assert d["copy"] == (0 if rule == "cpu" else pytest.approx(d["cpu"], abs=L_LAYERS))
            # fp32 on both sides, different summation order: ~1e-7 relative.
            _assert_close_run(out, ref, logit_tol=1e-4, gap=1e-3)


L_LAYERS = 3  # "half" alternates over all misses; per layer the split may be off by one


@needs_ext
def test_bf16_cpu_experts_within_tolerance():
    """bf16: CPU experts accumulate in fp32 and round once, the GPU path rounds its GEMMs to bf16:
    logits within 0.05 (a few bf16 ulps at these magnitudes), tokens equal where the gap is clear."""
    ref = _gen(tiny_model("mixtral").to(torch.bfloat16))
    m = tiny_model("mixtral").to(torch.bfloat16)
    h = offload(m, cache_slots=4, device="cpu", hybrid="half")
    out = _gen(m)
    s = h.stats()
    h.remove()
    assert s["cpu_experts"] > 0 and s["cpu_kernel"] in CPP_KERNELS
    _assert_close_run(out, ref, logit_tol=0.05, gap=0.1)


@needs_ext
def test_rounds_prefetch_and_cpu_experts_together():
    """7-token prefill, 3 slots (the GPU experts stream through in rounds), temporal prefetch, half
    of the misses on the CPU; a second request reuses the warm cache."""
    ref = _gen(tiny_model("qwen3_moe"), 10)
    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=3, device="cpu", predictor="temporal", prefetch_depth=2, hybrid="half", admission="none")
    out = _gen(m, 10)
    out2 = _gen(m, 10)
    s = h.stats()
    h.remove()
    assert s["cpu_experts"] > 0 and s["prefetch_issued"] > 0
    for o in (out, out2):
        _assert_close_run(o, ref, logit_tol=1e-4, gap=1e-3)


@needs_ext
def test_portable_kernel_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv(hy.ENV_KERNEL, "portable")
    ref = _gen(tiny_model("mixtral"), 4)
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu", hybrid="cpu")
    out = _gen(m, 4)
    s = h.stats()
    h.remove()
    assert s["cpu_kernel"] == "portable" and s["cpu_kernel_experts"] == s["cpu_experts"] > 0
    _assert_close_run(out, ref, logit_tol=1e-4, gap=1e-3)


def test_torch_fallback_without_extension_and_for_other_layouts(no_ext):
    ref = _gen(tiny_model("mixtral"), 4)
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu", hybrid="cpu")
    out = _gen(m, 4)
    s = h.stats()
    h.remove()
    assert s["cpu_kernel"] == "torch" and "not built or is disabled" in s["config"]["hybrid"]["kernel_reason"]
    assert s["cpu_kernel_experts"] == s["cpu_experts"] > 0
    _assert_close_run(out, ref, logit_tol=1e-4, gap=1e-3)


def test_torch_kernel_for_a_layout_the_cpp_kernel_does_not_compute():
    # GPT-OSS: interleaved, transposed gate_up with biases and a clamped gate.
    ref = _gen(tiny_model("gpt_oss"), 4)
    m = tiny_model("gpt_oss")
    h = offload(m, cache_slots=4, device="cpu", hybrid="cpu")
    out = _gen(m, 4)
    s = h.stats()
    h.remove()
    assert s["cpu_kernel"] == "torch" and s["cpu_experts"] > 0
    assert "gate_up_proj_bias" in s["config"]["hybrid"]["kernel_reason"]
    _assert_close_run(out, ref, logit_tol=1e-4, gap=1e-3)


def test_swiglu_layout_check():
    from moecache.families import detect_family, find_moe_blocks

    def check(family):
        m = tiny_model(family)
        b = find_moe_blocks(m, detect_family(m))[0].experts
        kinds = {n: tuple(p.shape[1:]) for n, p in b.named_parameters(recurse=False)}
        return ck.swiglu_mismatch(b, kinds, torch.float32)

    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe"):
        assert check(family) is None, family
    assert check("gpt_oss") is not None
    m = tiny_model("mixtral")
    b = find_moe_blocks(m, detect_family(m))[0].experts
    b.act_fn = torch.nn.GELU()
    assert "GELU" in ck.swiglu_mismatch(b, {"gate_up_proj": (32, 32), "down_proj": (32, 16)}, torch.float32)
    assert "float16" in ck.swiglu_mismatch(tiny_model("mixtral").model.layers[0].mlp.experts,
                                           {"gate_up_proj": (64, 32), "down_proj": (32, 32)}, torch.float16)


def test_hybrid_off_has_no_executor_and_zero_counts():
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu")
    _gen(m, 2)
    s = h.stats()
    h.remove()
    assert h.runtime.hybrid is None and s["config"]["hybrid"] is None
    assert s["decisions"] == {"copy": 0, "cpu": 0} and s["cpu_experts"] == 0 and "cpu_kernel" not in s


@needs_ext
def test_reset_stats_and_summary():
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu", hybrid="cpu")
    _gen(m, 3)
    assert "hybrid cpu: misses copied 0, on the CPU" in h.summary()
    h.reset_stats()
    s = h.stats()
    assert s["cpu_experts"] == s["cpu_kernel_experts"] == 0 and s["cpu_ms"] == 0.0
    assert s["cpu_layer_parts_ms"] is None  # no layer with CPU experts since the reset
    t0 = time.perf_counter()
    _gen(m, 2)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    s = h.stats()
    assert s["cpu_experts"] == s["cpu_kernel_experts"] > 0
    parts = s["cpu_layer_parts_ms"]
    assert set(parts) == {"launch", "gpu_experts", "wait", "merge", "scatter"}
    assert all(v >= 0.0 for v in parts.values()) and parts["launch"] > 0.0
    assert parts["launch"] == pytest.approx(s["cpu_launch_ms_per_layer"])
    assert sum(parts.values()) * s["cpu_layers"] < wall_ms  # parts of the layers, inside the calls' time
    h.remove()


@needs_ext
def test_cli_generate_hybrid_on_the_trained_model(tiny_model_dir, capsys):
    from moecache.cli import main

    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "6",
               "--hybrid", "cpu", "--check", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "identical to the unpatched model's" in err and "hybrid cpu: misses copied 0, on the CPU" in err


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("rule", ["half", "auto"])
def test_cuda_hybrid_close_to_unpatched(rule):
    """On CUDA: pinned staging, async copies back, the copy worker and the CPU pool at once (bf16)."""
    def model():
        m = tiny_model("mixtral").to(torch.bfloat16)
        m.set_experts_implementation("batched_mm")
        return m.to("cuda").eval()

    def gen(m, n=12):
        return m.generate(torch.tensor(PROMPT, device="cuda"), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)

    ref = gen(model())
    m = model()
    h = offload(m, cache_slots=4, device="cuda", predictor="temporal", prefetch_depth=1, hybrid=rule)
    out = gen(m)
    s = h.stats()
    h.remove()
    assert s["cpu_kernel"] in CPP_KERNELS and s["cpu_kernel_experts"] == s["cpu_experts"]
    if rule == "half":
        assert s["cpu_experts"] > 0
    _assert_close_run(out, ref, logit_tol=0.05, gap=0.1)


def test_thread_count_leaves_two_cores_and_reads_the_environment(monkeypatch):
    from moecache.runtime import hybrid as hy

    monkeypatch.delenv(ck.ENV_THREADS, raising=False)
    monkeypatch.setattr(hy.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert ck.default_threads() == 14
    monkeypatch.setattr(hy.os, "sched_getaffinity", lambda pid: {0, 1})
    assert ck.default_threads() == 1
    monkeypatch.setenv(ck.ENV_THREADS, "5")
    assert ck.default_threads() == 5
    for bad in ("0", "x"):
        monkeypatch.setenv(ck.ENV_THREADS, bad)
        with pytest.raises(ConfigError, match=ck.ENV_THREADS):
            ck.default_threads()


@pytest.mark.gpu
@needs_ext
def test_cuda_launch_runs_no_torch_cpu_op(monkeypatch):
    """A torch op computing on host tensors wakes torch's OpenMP threads, which then spin on the pool's
    cores (each expert ~2x slower on the H100 machine: eval/results/hybrid_diag/README.md). The launch
    moves the rows to the host and gathers them with numpy only; the kernel's submit takes them as they are."""
    from torch.utils._python_dispatch import TorchDispatchMode

    NO_COMPUTE = ("aten::view", "aten::empty", "aten::lift_fresh", "aten::detach", "aten::alias")

    class HostOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            name = func._schema.name  # allocating or aliasing host memory computes nothing
            if flat and all(t.device.type == "cpu" for t in flat) and not name.startswith(NO_COMPUTE):
                self.ops.append(str(func))
            return out

    m = tiny_model("mixtral").to(torch.bfloat16).to("cuda").eval()
    h = offload(m, cache_slots=4, device="cuda", hybrid="cpu")
    mode = HostOps()
    launch = hy.HybridExecutor.launch
    launched = []

    def watched(self, *a, **k):
        with mode:
            work = launch(self, *a, **k)
        launched.append(work)
        return work

    monkeypatch.setattr(hy.HybridExecutor, "launch", watched)
    m.generate(torch.tensor(PROMPT, device="cuda"), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    h.remove()
    assert launched, "no layer ran an expert on the CPU"
    assert not mode.ops, f"torch CPU ops during the launch: {mode.ops}"
