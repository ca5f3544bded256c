"""Compressed formats in the simulator (``moecache bench --expert-dtype``): copies move the compressed bytes, the
compute stays that of the dense expert plus the expansion (unlike a smaller ``--bytes-per-expert``, which
shrinks it), and the lower bound follows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moecache.cost import default_profile
from moecache.cost.hardware import slots_for_format, with_format
from moecache.policies import new_policy
from moecache.quant import ExpertFormat
from moecache.sim import Schedule, simulate
from moecache.sim.bound import lower_bound
from moecache.trace import RoutingBlock, Trace, TraceMeta

MIB = 2**20


def _schedule(layers=4, experts=16, top_k=2, rows=40, seed=1) -> Schedule:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(rows)]).astype(np.int16)
    meta = TraceMeta(num_experts=experts, top_k=top_k, moe_layers=list(range(layers)), model="synthetic",
                     bytes_per_expert=64 * MIB)
    return Schedule(Trace(meta, RoutingBlock.build(ids, seq=0, pos=np.arange(rows), phase=0)), decode_stream=True)


def _run(s: Schedule, hw, slots=16):
    return simulate(s, new_policy("lru", slots, s.num_layers, s.num_experts, top_k=s.top_k, scope="global"),
                    hardware=hw)


@pytest.mark.parametrize("fmt", [ExpertFormat("int4", 64), ExpertFormat("int8", 128)])
def test_compressed_pool_keeps_the_compute_and_adds_the_expansion(fmt):
    s = _schedule()
    # no copy/compute interference: shorter copies would slow fewer kernels, and this checks the format's own terms
    hw = dataclasses.replace(default_profile(64 * MIB), copy_slowdown=0.0)
    hw_c = with_format(hw, fmt, "compressed")
    dense, comp = _run(s, hw), _run(s, hw_c)
    assert hw_c.copy_bytes < hw.copy_bytes and hw_c.copy_ms < hw.copy_ms
    assert hw_c.gpu(1) == pytest.approx(hw.gpu(1) + hw_c.expand_ms) and hw_c.expand_ms > 0
    # The same policy and slots: the same needs, each computed at the dense time plus one expansion.
    assert comp.needs == dense.needs and comp.loads == dense.loads
    assert comp.gpu_busy_ms == pytest.approx(dense.gpu_busy_ms + comp.needs * hw_c.expand_ms)
    assert comp.bytes_per_token == pytest.approx(dense.bytes_per_token * hw_c.copy_bytes / hw.copy_bytes)
    assert hw.gpu(1) < hw_c.gpu(1)
    # The bound follows: its GPU term has the expansion, its copy term the compressed copies.
    b, bc = lower_bound(s, 16, "global", hw, False), lower_bound(s, 16, "global", hw_c, False)
    assert bc.gpu_ms == pytest.approx(b.gpu_ms + comp.needs * hw_c.expand_ms)
    assert bc.miss_ms == pytest.approx(b.misses * hw_c.copy_ms) and bc.misses == b.misses
    assert comp.bound_ms == pytest.approx(bc.total_ms) and comp.bound_ms <= comp.time_ms + 1e-9


def test_expanded_pool_expands_once_per_copy_and_holds_fewer_slots():
    s = _schedule()
    hw = default_profile(64 * MIB)
    fmt = ExpertFormat("int4", 64)
    hw_e, hw_c = with_format(hw, fmt, "expanded"), with_format(hw, fmt, "compressed")
    dense, exp = _run(s, hw), _run(s, hw_e)
    assert hw_e.gpu(1) == hw.gpu(1) and hw_e.expand_ms == 0.0
    assert exp.gpu_busy_ms == pytest.approx(dense.gpu_busy_ms)
    assert hw_e.copy_ms == pytest.approx(hw_c.copy_ms + hw_c.expand_ms)
    b, be = lower_bound(s, 16, "global", hw, False), lower_bound(s, 16, "global", hw_e, False)
    assert be.gpu_ms == pytest.approx(b.gpu_ms) and be.miss_ms == pytest.approx(b.misses * hw_e.copy_ms)
    # Slots in the memory of 16 dense experts: more compressed ones, fewer dense-plus-landing ones.
    assert slots_for_format(16, 64, hw_c, "compressed") > 16 > slots_for_format(16, 64, hw_e, "expanded")
