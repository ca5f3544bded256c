"""Compressed experts in the runtime: where the compressed bytes live and where they are expanded.

The host store holds every expert in its compressed row (``moecache.quant.ExpertCodec``) and every copy
moves that row. Two pool modes (``pool_mode``):

* ``compressed``: the GPU pool holds compressed rows (about 3.5x as many int4 experts in the same
  bytes). Before a layer's kernel its needed experts are expanded from their slots into a small dense
  *scratch* of ``scratch_experts`` slots, and the kernel reads the scratch: expert ``e`` of the layer
  sits in scratch slot ``scratch_of[e]``. A layer that needs more experts than the scratch holds runs
  in rounds of at most that many (the runtime's round path, which gives the same sums).
* ``expanded``: the pool holds dense experts; the copy still moves the compressed row, into a
  compressed *landing* slot of the same index, and the slot is expanded from it the first time the
  kernel needs that expert after the copy (``expanded_key`` remembers which expert each dense slot
  holds). Each pool slot costs its dense bytes plus its compressed bytes.

The expansion is ``ExpertCodec.expand_rows``: torch, on the pool's device, the reference every fused
kernel is compared against.

``choose_pool_mode`` is the default (``pool_mode="auto"``), from the one cost model (``moecache.cost``):
the compressed pool holds more experts (fewer copies) but expands every expert a kernel reads; the
expanded pool holds fewer but expands once per copy. For each mode it takes the slots the budget gives
(the compressed pool's budget less its dense scratch; the expanded pool's slot costs dense plus
compressed bytes), a hit rate of ``slots / experts`` (LRU's under even routing: no trace is known at
``offload``; global LRU on the recorded traces comes close to it once a step's experts fit), and the
expected time of one MoE layer's batch-1 decode step on ``moecache.cost.timing.Timeline`` (the
simulator's resources, ``with_format``'s costs: per-use expansion on each expert's GPU time, or
per-copy expansion on each copy), the number of misses drawn binomially from the hit rate; the
faster mode wins (the expanded one on a tie). Given ``cache_slots`` (a slot count), both pools hold
the same experts, so the expanded one is never slower; a mode whose pool cannot hold one layer's
experts is out. The hardware is ``hw`` or the calibrated H100 profile (``default_profile``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..quant import ExpertCodec
from .pool import SlotPool

POOL_MODES = ("compressed", "expanded")


def layer_step_ms(hw: Any, hit_rate: float, top_k: int) -> float:
    """Expected ms of one MoE layer's batch-1 decode step under ``hw`` (a ``HardwareProfile``, with its format's
    costs), each of the ``top_k`` experts a hit with probability ``hit_rate`` (module docstring)."""
    from math import comb

    from ..cost.timing import Timeline

    miss = min(1.0, max(0.0, 1.0 - hit_rate))
    total = 0.0
    for j in range(top_k + 1):
        p = comb(top_k, j) * miss ** j * (1.0 - miss) ** (top_k - j)
        if p == 0.0:
            continue
        tl = Timeline()
        t = tl.non_expert(hw.non_expert(1))
        h = t + hw.layer_host_ms
        jobs = [(0.0, i, hw.gpu(1)) for i in range(top_k - j)]
        for i in range(j):  # the step's misses, copied one after another
            h += hw.copy_host_ms
            jobs.append((tl.issue_copy(h, hw.copy_ms), top_k - j + i, hw.gpu(1)))
        tl.join(h)
        tl.compute(jobs, hw.slowdown)
        total += p * tl.gpu
    return total


def pool_mode_costs(*, total: int, top_k: int, codec: ExpertCodec, budget_bytes: int | None,
                    cache_slots: int | None, scratch_experts: int, hw: Any = None) -> dict[str, dict[str, float]]:
    """Per pool mode the cost model's view (module docstring): ``{"slots", "hit_rate", "layer_ms"}``; a mode
    whose pool cannot hold ``top_k`` experts is left out."""
    from ..cost.hardware import default_profile, with_format

    dense, packed = codec.dense.slot_bytes, codec.slot_bytes
    base = hw if hw is not None else default_profile(dense)
    out: dict[str, dict[str, float]] = {}
    for mode in POOL_MODES:
        if cache_slots is not None:
            slots = min(int(cache_slots), total)
        elif mode == "compressed":
            slots = min(total, max(0, int(budget_bytes) - scratch_experts * dense) // packed)
        else:
            slots = min(total, max(0, int(budget_bytes)) // (dense + packed))
        if slots < top_k:
            continue
        hit = slots / total
        out[mode] = {"slots": slots, "hit_rate": hit,
                     "layer_ms": layer_step_ms(with_format(base, codec.fmt, mode), hit, top_k)}
    return out


def choose_pool_mode(pool_mode: str, *, total: int, budget_bytes: int | None, cache_slots: int | None,
                     codec: ExpertCodec, top_k: int = 1, scratch_experts: int | None = None, hw: Any = None) -> str:
    """``pool_mode`` ("auto", "compressed", "expanded") -> the mode to build: "auto" is the cost model's
    faster mode (``pool_mode_costs``; module docstring)."""
    if pool_mode not in ("auto",) + POOL_MODES:
        raise ConfigError(f"unknown pool_mode {pool_mode!r}; valid: auto, compressed, expanded")
    if pool_mode != "auto":
        return pool_mode
    if cache_slots is None and budget_bytes is None:
        raise ValueError("choose_pool_mode needs budget_bytes or cache_slots")
    costs = pool_mode_costs(total=total, top_k=top_k, codec=codec, budget_bytes=budget_bytes,
                            cache_slots=cache_slots, scratch_experts=top_k if scratch_experts is None else
                            scratch_experts, hw=hw)
    if not costs:
        return "compressed"  # neither fits: the budget check names the least memory that works
    return min(costs, key=lambda m: (costs[m]["layer_ms"], m != "expanded"))


class Expander:
    """The dense experts a kernel reads, per pool mode (module docstring).

    ``compute`` is the pool-like object whose ``views`` the shells read and ``num_slots`` they index
    (the scratch, or the dense pool); ``prepare(layer, experts, slots)`` makes those experts readable
    there and returns their compute indices; ``lut`` maps this layer's expert id -> compute index
    (the indexer shells read it).
    """

    def __init__(self, codec: ExpertCodec, mode: str, pool: SlotPool, num_experts: int, scratch_experts: int):
        self.codec = codec
        self.mode = mode
        self.pool = pool  # what the copies land in (compressed rows)
        self.E = int(num_experts)
        if mode == "compressed":
            self.compute = SlotPool(codec.dense, scratch_experts, pool.device)
            self.capacity = int(scratch_experts)
        elif mode == "expanded":
            self.compute = SlotPool(codec.dense, pool.num_slots, pool.device)
            self.capacity = pool.num_slots
            self.expanded_key = np.full(pool.num_slots, -1, dtype=np.int64)
        else:
            raise ConfigError(f"unknown pool_mode {mode!r}; valid: {', '.join(POOL_MODES)}")
        self.lut = np.full(self.E, -1, dtype=np.int64)
        self.expansions = 0

    @property
    def nbytes(self) -> int:
        return self.compute.nbytes

    def prepare(self, layer: int, experts: list[int], slots: list[int]) -> list[int]:
        """Expand what the kernel needs for ``experts`` (this layer's, resident in pool ``slots``)."""
        self.lut.fill(-1)
        if self.mode == "compressed":
            if len(experts) > self.capacity:
                raise RuntimeError(f"moecache internal error: {len(experts)} experts for a scratch of {self.capacity}")
            n = len(slots)
            if n:
                src = self.pool.data[torch.as_tensor(slots, device=self.pool.device)] if n > 1 else \
                    self.pool.data[slots[0]:slots[0] + 1]
                self.codec.expand_rows(src, self.compute.data[:n])
                self.expansions += n
            self.lut[np.asarray(experts, dtype=np.int64)] = np.arange(n)
            return list(range(n))
        key_base = layer * self.E
        stale = [s for e, s in zip(experts, slots) if self.expanded_key[s] != key_base + e]
        if stale:
            idx = torch.as_tensor(stale, device=self.pool.device)
            dense = torch.empty((len(stale), self.codec.dense.slot_numel), dtype=self.codec.dense.dtype,
                                device=self.pool.device)
            self.codec.expand_rows(self.pool.data[idx], dense)
            self.compute.data[idx] = dense
            self.expansions += len(stale)
            for e, s in zip(experts, slots):
                self.expanded_key[s] = key_base + e
        if experts:
            self.lut[np.asarray(experts, dtype=np.int64)] = np.asarray(slots, dtype=np.int64)
        return list(slots)

    def forget(self, slot: int) -> None:
        """Slot ``slot`` gets new bytes (a copy or a cancelled one): its dense image is stale."""
        if self.mode == "expanded":
            self.expanded_key[slot] = -1

    def close(self) -> None:
        self.compute.close()


class LowPrecisionCopies:
    """The per-miss precision rule's second copy (``moecache.miss_precision``): every expert once more in the
    rule's low format in a host store of its own, a landing of ``top_k`` rows of that format on the pool's
    device, and a copy engine from the one to the other. A miss served low lands in the landing and is expanded
    into its (dense) pool slot before the kernel; the runtime (``Runtime._copy_low``) does both."""

    def __init__(self, rule: Any, codec: ExpertCodec, store: Any, landing: SlotPool, engine: Any):
        self.rule = rule
        self.below = float(rule.below)
        self.codec = codec
        self.store = store
        self.landing = landing
        self.engine = engine

    def close(self) -> None:
        self.engine.close()
        self.landing.close()
