"""The timing model against hand-computed event timelines, the hardware profile and the bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.predictors import PREDICTORS, Predictor
from moecache.cost import MISS_RULES, default_profile, load_profile
from moecache.cost.hardware import MIB, calibrated_terms, lookup, uncalibrated_profile
from moecache.sim import Schedule, lower_bound, simulate, split_time

from tests.simtools import make_trace, unit_profile

# Two tokens, two MoE layers, 4 experts, top-1: token 0 picks (0, 1), token 1 picks (0, 2).
# Keys: layer 0 expert 0 = 0; layer 1 experts 1, 2 = 5, 6. One slot per layer.
TOKENS = [[0, 1], [0, 2]]


def lru(cap=1, layers=2, experts=4, top_k=1, scope="layer"):
    return new_policy("lru", cap, layers, experts, top_k=top_k, scope=scope)


def test_copy_timeline_by_hand():
    # copy 1 ms, GPU 0.5 ms per expert, non-expert 1 ms per layer:
    # g0: non-expert 0 -> 1; key 0 misses: copy 1 -> 2; compute 2 -> 2.5
    # g1: non-expert 2.5 -> 3.5; key 5 misses: copy 3.5 -> 4.5; compute 4.5 -> 5
    # g2: non-expert 5 -> 6; key 0 hits (copy ended at 2: ready); compute 6 -> 6.5
    # g3: non-expert 6.5 -> 7.5; key 6 misses (evicts 5): copy 7.5 -> 8.5; compute 8.5 -> 9
    # total 9 ms / 2 tokens; GPU busy 4 x 1 + 4 x 0.5 = 6 -> stall 3 ms.
    # bound: Belady also loads 3 times (3 ms of copies) < 6 ms of GPU work -> 6 ms, ratio 1.5
    r = simulate(Schedule(make_trace(TOKENS, num_experts=4)), lru(), hardware=unit_profile())
    assert (r.time_ms, r.gpu_busy_ms, r.copy_busy_ms) == (9.0, 6.0, 3.0)
    assert r.est_ms_per_token == 4.5 and r.stall_ms_per_token == 1.5
    assert (r.hits, r.ready, r.loads) == (1, 1, 3)
    assert r.bound_ms == 6.0 and r.bound_ms_per_token == 3.0 and r.ratio == 1.5
    assert r.bytes_per_token == 1.5e6


def test_prefetch_timeline_by_hand():
    # The oracle prefetches one layer ahead (budget 1):
    # g0: t_route 1; key 0 misses: copy 1 -> 2; prefetch key 5 (layer 1 is empty): copy 2 -> 3;
    #     compute key 0: 2 -> 2.5
    # g1: t_route 3.5; key 0 (next token, layer 0) is resident; key 5 hits and is ready (3 <= 3.5);
    #     compute 3.5 -> 4
    # g2: t_route 5; key 0 hits, ready; prefetch key 6 for g3 evicts key 5 (used: not wasted);
    #     copy 5 -> 6; compute key 0: 5 -> 5.5
    # g3: t_route 6.5; past the end the oracle is uniform; expert 0 ranks first and is resident;
    #     key 6 hits, ready (6 <= 6.5); compute 6.5 -> 7
    # total 7 ms: 3.5 ms/token, stall 0.5 ms/token; 3 copies; precision 2/2, recall 2/(2+1)
    pred = PREDICTORS.get("oracle")(2, 4, 1)
    r = simulate(Schedule(make_trace(TOKENS, num_experts=4)), lru(), pred, depth=1, budget=1,
                 hardware=unit_profile())
    assert r.time_ms == 7.0 and r.gpu_busy_ms == 6.0
    assert (r.hits, r.ready, r.loads, r.prefetches, r.prefetch_used, r.prefetch_wasted) == (3, 3, 1, 2, 2, 0)
    assert r.prefetch_precision == 1.0 and r.prefetch_recall == pytest.approx(2 / 3)
    assert r.bytes_per_token == 1.5e6 and r.wasted_bytes_per_token == 0.0
    assert r.ratio == pytest.approx(7.0 / 6.0)


def test_hit_but_not_ready():
    # Copies take 3 ms. g0: t_route 1; key 0 copy 1 -> 4; prefetch key 5: copy 4 -> 7;
    # compute key 0: 4 -> 4.5. g1: t_route 5.5; key 5 is resident (a hit) but its copy ends at 7:
    # not ready; compute waits: 7 -> 7.5.
    pred = PREDICTORS.get("oracle")(2, 4, 1)
    log: list = []
    r = simulate(Schedule(make_trace(TOKENS[:1], num_experts=4)), lru(), pred, depth=1, budget=1,
                 hardware=unit_profile(copy_ms=3.0), record=log, bound=False)
    assert [o for *_x, o in log] == ["copy", "hit"]
    assert (r.hits, r.ready) == (1, 0)
    assert r.time_ms == 7.5


class AlwaysThree(Predictor):
    """A predictor that is always wrong here: expert 3 at every layer."""

    name = "always3"

    def observe(self, layer, experts, hidden=None):
        pass

    def predict(self, layer, depth):
        return self.normalise(np.eye(self.num_experts)[[3]])


def test_wasted_prefetch():
    # One slot per layer; every prefetch fetches expert 3, which no token uses:
    # g0: key 0 misses; prefetch key 7 (layer 1, empty)
    # g1: key 5 misses and evicts the unused key 7 (wasted 1); prefetch key 3, evicting key 0
    # g2: key 0 misses, evicts key 3 (wasted 2); prefetch key 7, evicting key 5
    # g3: key 6 misses, evicts key 7 (wasted 3); prefetch key 3 (evicting 0), still unused at the end
    r = simulate(Schedule(make_trace(TOKENS, num_experts=4)), lru(), AlwaysThree(2, 4, 1), depth=1,
                 hardware=unit_profile(), bound=False)
    assert (r.hits, r.loads, r.prefetches, r.prefetch_used, r.prefetch_wasted) == (0, 4, 4, 0, 3)
    assert r.prefetch_precision == 0.0 and r.prefetch_recall == 0.0
    assert r.wasted_bytes_per_token == 3 * 1e6 / 2 and r.bytes_per_token == 8 * 1e6 / 2


def test_cpu_rule_timeline_by_hand():
    # Every miss runs on the CPU (2 ms), nothing is cached:
    # g0: t_route 1, CPU 1 -> 3; g1: t_route 4, CPU 4 -> 6; g2: t_route 7, CPU 7 -> 9;
    # g3: t_route 10, CPU 10 -> 12. GPU busy 4 (non-expert only): stall 8.
    r = simulate(Schedule(make_trace(TOKENS, num_experts=4)), lru(), hardware=unit_profile(), miss_rule="cpu")
    assert r.time_ms == 12.0 and r.gpu_busy_ms == 4.0 and r.cpu_busy_ms == 8.0
    assert (r.hits, r.loads, r.cpu_runs) == (0, 0, 4)
    # bound with the CPU: Belady-with-bypass misses (3 here: 0, 5, 6 -- the second key 0 hits),
    # split between copy (1 ms) and CPU (2 ms): 3 * 1 * 2 / 3 = 2 ms; GPU non-expert 4 ms -> 4.
    assert r.bound_ms == 4.0


def test_min_rule_by_hand():
    # One token, one layer, top-2 (experts 0 and 1), 2 slots. t_route = 1.
    # key 0: copy path 1 + 1 + 0.5 = 2.5, CPU path 1 + 2 = 3 -> copy (engine busy until 2);
    # key 1: copy path 2 + 1 + 0.5 = 3.5, CPU path 3 -> CPU.
    # GPU: key 0 ready at 2 -> 2.5; the CPU result at 3 -> the step ends at 3.
    trace = make_trace([[(0, 1)]], num_experts=4, top_k=2)
    log: list = []
    r = simulate(Schedule(trace), lru(cap=2, layers=1, top_k=2), hardware=unit_profile(), miss_rule="min",
                 record=log, bound=False)
    assert [(k, o) for _g, k, _c, o in log] == [(0, "copy"), (1, "cpu")]
    assert r.time_ms == 3.0 and (r.loads, r.cpu_runs) == (1, 1)


def test_policy_rule_follows_admission():
    # belady_bypass declines keys never used again: they run on the CPU.
    trace = make_trace([[0], [1], [0]], num_experts=4)
    pol = new_policy("belady_bypass", 1, 1, 4)
    log: list = []
    simulate(Schedule(trace), pol, hardware=unit_profile(), miss_rule="policy", record=log, bound=False)
    assert [o for *_x, o in log] == ["copy", "cpu", "hit"]


def test_batched_step_runs_in_waves():
    # One step of 3 tokens needing experts 0, 1, 2 at one layer with 2 slots: wave 1 = keys 0, 1
    # (misses, copies 1 -> 2 and 2 -> 3, compute 2 -> 2.5 and 3 -> 3.5), wave 2 = key 2, issued
    # when wave 1's compute ended (3.5): copy 3.5 -> 4.5, compute 4.5 -> 5. Non-expert time is
    # read at 3 tokens (flat table: 1 ms).
    trace = make_trace([[0], [1], [2]], num_experts=4, step=[0, 0, 0])
    sched = Schedule(trace)
    assert sched.num_units == 1 and sched.groups(0) == [([0, 1, 2], [1, 1, 1])]
    r = simulate(sched, lru(cap=2, layers=1), hardware=unit_profile(), bound=False)
    assert r.time_ms == 5.0 and r.loads == 3


def test_miss_rules_registry():
    assert set(MISS_RULES.names()) == {"copy", "cpu", "min", "policy", "auto"}
    assert not MISS_RULES.get("copy").uses_cpu and MISS_RULES.get("min").uses_cpu
    with pytest.raises(ConfigError, match="valid names"):
        simulate(Schedule(make_trace(TOKENS, num_experts=4)), lru(), hardware=unit_profile(), miss_rule="teleport")


# -- bound ---------------------------------------------------------------------------------------

def test_split_time():
    assert split_time(1.0, [2.0, 2.0, 2.0]) == 2.0       # 3 misses: copy 2, CPU 1 -> both 2 ms
    assert split_time(1.0, []) == 0.0
    assert split_time(1.0, [10.0]) == pytest.approx(10 / 11)   # one miss split 10:1
    assert split_time(1.0, [0.1, 0.1]) == pytest.approx(0.2 / 1.1)  # copy takes 0.18 of one miss
    # the copy engine takes the misses that are dearest on the CPU
    assert split_time(1.0, [5.0, 0.5, 0.5]) == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["copy", "cpu", "policy", "min", "auto"])
@pytest.mark.parametrize("name", ["lru", "lfu", "activation", "belady", "belady_bypass"])
def test_estimate_never_beats_the_bound(rule, name):
    rng = np.random.default_rng(3)
    tokens = [[rng.choice(6, 2, replace=False) for _ in range(3)] for _ in range(30)]
    trace = make_trace(tokens, num_experts=6, top_k=2)
    for hw in (unit_profile(), unit_profile(copy_ms=0.2, cpu=0.4), unit_profile(copy_ms=4.0, gpu=0.1)):
        p = new_policy(name, 3, 3, 6, top_k=2)
        r = simulate(Schedule(trace), p, hardware=hw, miss_rule=rule)
        assert r.ratio >= 1.0 - 1e-12, (rule, name, r.time_ms, r.bound_ms)


def test_bound_is_cached_per_schedule():
    sched = Schedule(make_trace(TOKENS, num_experts=4))
    a = lower_bound(sched, 1, "layer", unit_profile(), False)
    assert lower_bound(sched, 1, "layer", unit_profile(), False) is a
    assert a.misses == 3 and a.policy == "belady"


# -- hardware profile ----------------------------------------------------------------------------

def test_default_profile_matches_the_measured_rows():
    # the measured rows are the uncalibrated profile; the default scales their CPU table by the frozen fit
    p = uncalibrated_profile(336 * MIB)  # Mixtral row
    assert p.gpu(1) == 0.14 and p.cpu(1) == 5.8 and p.cpu(64) == 7.8
    assert p.copy_ms == pytest.approx(6.4, rel=0.1)
    d = default_profile(336 * MIB)
    scale = calibrated_terms()["cpu_table_scale"]
    assert d.cpu(1) == 5.8 * scale and d.cpu(64) == 7.8 * scale
    assert d.copy_ms == p.copy_ms and d.gpu_ms == p.gpu_ms
    # the default runs a step's experts in one grouped kernel: this row's expert is weight-read bound, so
    # what it adds to the kernel is about its own measured 1-token time
    assert d.expert_kernel == "grouped" and d.gpu(1) == pytest.approx(p.gpu(1), rel=0.02)
    # the non-expert time: the frozen measured table (null experts) where the fit recorded one, else hardware.md's
    measured = calibrated_terms().get("non_expert_ms")
    if measured:
        assert d.non_expert_ms == {int(t): float(ms) for t, ms in measured.items()}
        assert d.non_expert(1) == float(measured["1"]) + d.expert_launch_ms != p.non_expert(1) + d.expert_launch_ms
    else:
        assert d.non_expert(1) == p.non_expert(1) + d.expert_launch_ms
    q = default_profile(9 * MIB)
    assert q.copy_ms == pytest.approx(0.19, rel=0.1)
    # between rows: linear in MiB (16.5 -> 0.43, 47 -> 0.77 on the CPU)
    mid = uncalibrated_profile(int(31.75 * MIB))
    assert mid.cpu(1) == pytest.approx((0.43 + 0.77) / 2)
    # the GPU's large-batch point adds the FLOPs at 400 TFLOP/s
    assert p.gpu(4096) == pytest.approx(0.14 + 4095 * 336 * MIB / 4e14 * 1e3)
    with pytest.raises(ConfigError, match="bytes-per-expert"):
        default_profile(None)


def test_table_lookup():
    t = {1: 1.0, 3: 2.0}
    assert [lookup(t, n) for n in (1, 2, 3, 5)] == [1.0, 1.5, 2.0, 3.0]
    assert lookup({4: 7.0}, 100) == 7.0 and lookup(t, 0) == 1.0


def test_profile_from_json(tmp_path):
    f = tmp_path / "hw.json"
    f.write_text(json.dumps({"copy_bandwidth_gbps": 25.0, "gpu_ms": {"1": 0.2, "8": 0.4}}))
    p = load_profile(f, bytes_per_expert=50_000_000)
    assert p.copy_ms == pytest.approx(default_profile(50_000_000).copy_latency_ms + 2.0)
    assert p.gpu(4) == pytest.approx(0.2 + 3 * 0.2 / 7) and p.source == str(f)
    assert p.expert_kernel == "per_expert" and p.expert_launch_ms == 0.0  # its own table, not the grouped kernel
    assert p.cpu_ms == default_profile(50_000_000).cpu_ms
    f.write_text(json.dumps({"copy_bandwith_gbps": 25.0}))
    with pytest.raises(ConfigError, match="unknown field"):
        load_profile(f, bytes_per_expert=1000)
    f.write_text(json.dumps({"gpu_ms": {"0": 1.0}}))
    with pytest.raises(ConfigError, match="tokens >= 1"):
        load_profile(f, bytes_per_expert=1000)
    f.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(f, bytes_per_expert=1000)
