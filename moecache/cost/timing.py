"""The discrete-event timing model: three resources, each serving its work in issue order, and the host.

Resources: the copy engine (host to GPU copies), the GPU (one stream) and the CPU (one worker
pool running missed experts). Each keeps the time it becomes free; a job issued at ``t`` on a
resource starts at ``max(t, free)`` and ends ``duration`` later. Per replay step (one unit of
tokens at one MoE layer), with ``n`` tokens in the unit and ``c`` tokens routed to an expert:

1. the GPU runs the layer's non-expert work, ``non_expert(n)``, from when it finished the previous
   step; it ends at ``t_route`` (the router's choice is known; the layer's expert compute starts);
2. the host then works ``layer_host_ms`` (routing sync, policy) before it issues anything: its
   clock ``h = t_route + layer_host_ms``; demand misses are issued at ``h``: a copy (``copy_ms``)
   on the copy engine, each first costing the host ``copy_host_ms`` (so ``h`` advances), or a CPU
   run (``cpu(c)``) on the CPU, as the miss rule says;
3. the GPU computes the step's experts one after another in order of ``(ready, key)``, where
   ``ready`` is when the expert's copy ended (0 for long-resident ones), launched once the host has
   issued the misses (not before ``h``); each starts at ``max(gpu free, ready)`` and takes
   ``gpu(c)``; the step's experts are done when the GPU is done and every CPU run of the step has
   ended, plus ``hybrid_layer_ms`` where the step ran experts on the CPU;
4. prefetches chosen at this layer are then issued on the copy engine: the host first spends
   ``predictor_host_ms`` on the predictor, then ``prefetch_host_ms`` per prefetch, each issued at
   the host's clock; the next step starts when the GPU is done and the host has finished.

A policy whose eviction scans the pool (``evict_host_by_name``) adds its host time per insert to each
demand copy's ``copy_host_ms`` and each prefetch's ``prefetch_host_ms``. With the ``grouped`` expert
kernel (the calibrated profile: the runtime runs a step's experts in one kernel), ``gpu(c)`` is what one
expert adds to that kernel (its weight read and FLOPs) and the kernel's fixed cost
(``expert_launch_ms``) runs with the non-expert work of every step, on the same stream.

While a copy is in flight (the copy engine busy past the kernel's start), a GPU kernel, the
non-expert work included, takes ``1 + copy_slowdown`` times its time. The host terms and the
slowdown are the calibrated terms of the hardware profile (``moecache.cost.hardware``); all 0 (the
uncalibrated model), the host clock equals ``t_route`` and nothing waits for it.

When a batched step needs more experts than a pool holds, it runs in waves of at most
``capacity`` experts (hits first, then misses by key); a later wave's copies are issued when the
previous wave's compute ended, since they overwrite its slots. An access is *ready* when it is a
hit whose copy had ended by ``t_route``. The estimated time is when the last step ends; stall is
that minus the GPU's busy time (the GPU waiting for copies, CPU runs or the host). Simplifications:
copies never overlap each other, a slot is reusable as soon as its expert is evicted, moving
activations to and from the CPU costs only the fixed ``hybrid_layer_ms``, and a prefetch in flight
can be evicted (its copy still counts).

Miss rules (``MISS_RULES``): how a demand miss is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry


class Timeline:
    """Free times and busy totals of the copy engine, GPU and CPU (ms), and the two counts the
    ``auto`` miss rule estimates reuse from: copies issued (demand and prefetch) and needs served
    from the cache (``hits``, counted by the replay, one per expert need)."""

    __slots__ = ("gpu", "copy", "cpu", "gpu_busy", "copy_busy", "cpu_busy", "copies", "hits")

    def __init__(self) -> None:
        self.gpu = self.copy = self.cpu = 0.0
        self.gpu_busy = self.copy_busy = self.cpu_busy = 0.0
        self.copies = self.hits = 0

    def non_expert(self, ms: float, slow: float = 1.0) -> float:
        """Run the layer's non-expert GPU work (``slow`` times longer while a copy is in flight);
        returns ``t_route``."""
        if self.copy > self.gpu:
            ms = ms * slow
        self.gpu += ms
        self.gpu_busy += ms
        return self.gpu

    def issue_copy(self, t: float, ms: float) -> float:
        """A copy issued at ``t``; returns its end."""
        start = t if t > self.copy else self.copy
        self.copy = start + ms
        self.copy_busy += ms
        self.copies += 1
        return self.copy

    def issue_cpu(self, t: float, ms: float) -> float:
        """A CPU run issued at ``t``; returns its end."""
        start = t if t > self.cpu else self.cpu
        self.cpu = start + ms
        self.cpu_busy += ms
        return self.cpu

    def compute(self, jobs: list[tuple[float, int, float]], slow: float = 1.0) -> None:
        """GPU expert compute: ``jobs`` of ``(ready, key, ms)``, run in ``(ready, key)`` order; a job
        starting while a copy is in flight takes ``slow`` times ``ms``."""
        jobs.sort()
        gpu = self.gpu
        busy = self.gpu_busy
        copy = self.copy
        for ready, _key, ms in jobs:
            if ready > gpu:
                gpu = ready
            if copy > gpu:
                ms = ms * slow
            gpu += ms
            busy += ms
        self.gpu = gpu
        self.gpu_busy = busy

    def join(self, t: float) -> None:
        """The GPU's next work waits for ``t`` (a CPU run's result, the host's launch)."""
        if t > self.gpu:
            self.gpu = t


@dataclass(frozen=True)
class MissRule:
    """How a demand miss is served. ``decide`` returns True to copy (and cache), False to run on the CPU."""

    name: str
    #: The rule may run misses on the CPU (the lower bound then uses Belady-with-bypass).
    uses_cpu: bool
    #: The rule asks the policy's ``admit`` (a declined miss runs on the CPU).
    asks_policy: bool
    decide: Callable[[Timeline, float, float, float, float, bool], bool]


MISS_RULES: Registry[MissRule] = Registry("miss rule")


def _register(rule: MissRule, help: str) -> None:
    MISS_RULES.register(rule.name, help)(rule)


# decide(timeline, t_issue, copy_ms, gpu_ms, cpu_ms, admitted) -> copy?
_register(MissRule("copy", False, False, lambda tl, t, cp, g, c, adm: True),
          "always copy the missed expert to the GPU and cache it (the default)")
_register(MissRule("cpu", True, False, lambda tl, t, cp, g, c, adm: False),
          "always run the missed expert on the CPU; nothing is cached on a miss (only prefetches fill the cache)")
_register(MissRule("policy", True, True, lambda tl, t, cp, g, c, adm: adm),
          "copy and cache what the policy admits, run what it declines on the CPU")


#: Expected cache hits per copy before any copy was seen (``reuse_rate``'s prior) ...
REUSE_PRIOR = 0.5
#: ... weighted as this many copies: the estimate moves to the measured rate as copies accumulate.
REUSE_PRIOR_COPIES = 4.0
#: The most hits per copy ``reuse_credit`` credits (see there).
REUSE_CREDIT_MAX = 0.4


def reuse_rate(hits: int, copies: int) -> float:
    """Cache hits per copy so far (every cached expert arrived by a copy), pulled towards
    ``REUSE_PRIOR`` while there are few copies."""
    return (hits + REUSE_PRIOR * REUSE_PRIOR_COPIES) / (copies + REUSE_PRIOR_COPIES)


def reuse_credit(hits: int, copies: int, cpu_ms: float) -> float:
    """What caching a missed expert is expected to save later (ms): each later hit it earns is a miss
    that would otherwise cost about a CPU run of the same size; hits per copy so far estimate how many.

    Capped at ``REUSE_CREDIT_MAX`` hits: the average reuse of the copies made overstates what one
    *more* copy earns (it evicts a victim that loses its hits, and returns diminish). Uncapped, the
    credit copies single misses; without any credit, a CPU slightly faster than a copy leaves the
    pool empty. ``eval/hybrid_credit_grid.py`` chose the cap with this simulator over a grid of CPU
    costs (its figures, and where the cap errs: ``eval/results/hybrid_credit_grid.md``, summarised in
    docs/results.md).
    With copies seldom reused (fewer hits per copy than the cap) the credit shrinks towards 0, the
    ``min`` rule."""
    rate = reuse_rate(hits, copies)
    return (rate if rate < REUSE_CREDIT_MAX else REUSE_CREDIT_MAX) * cpu_ms


def choose_copy(t: float, copy_free: float, cpu_free: float, copy_ms: float, gpu_ms: float, cpu_ms: float,
                reuse_credit_ms: float = 0.0) -> bool:
    """The hybrid decision for one missed expert: True = copy it (and compute on the GPU), False = run
    it on the CPU. Finish times given the queues now (free at ``copy_free`` and ``cpu_free``): copy
    path = copy end + GPU compute - ``reuse_credit_ms`` (a copy also caches the expert: the later
    misses it saves, ``reuse_credit``; 0 compares finish times alone); CPU path = CPU end. Ties go
    to the copy.

    Called greedily per miss in key order with the queues advanced by each decision, a layer's misses
    split between the two so that they finish about together: with a CPU run a little shorter than a
    copy, the first of two misses runs on the CPU and the second is copied (its copy then ends before
    a second CPU run would).

    The one rule shared by the simulator's ``min`` (no credit) and ``auto`` miss rules and the
    runtime's ``auto`` hybrid rule (``moecache.runtime.hybrid``), so estimates and measurements use
    the same decisions."""
    copy_done = (t if t > copy_free else copy_free) + copy_ms + gpu_ms - reuse_credit_ms
    cpu_done = (t if t > cpu_free else cpu_free) + cpu_ms
    return not cpu_done < copy_done


def _min_rule(tl: Timeline, t: float, copy_ms: float, gpu_ms: float, cpu_ms: float, admitted: bool) -> bool:
    if not admitted:
        return False
    return choose_copy(t, tl.copy, tl.cpu, copy_ms, gpu_ms, cpu_ms)


_register(MissRule("min", True, True, _min_rule),
          "whichever finishes first given the current queues (copy + GPU compute vs CPU run); "
          "declined misses run on the CPU")


def _auto_rule(tl: Timeline, t: float, copy_ms: float, gpu_ms: float, cpu_ms: float, admitted: bool) -> bool:
    if not admitted:
        return False
    return choose_copy(t, tl.copy, tl.cpu, copy_ms, gpu_ms, cpu_ms, reuse_credit(tl.hits, tl.copies, cpu_ms))


_register(MissRule("auto", True, True, _auto_rule),
          "'min' with the copy credited for the cache hits it earns (timing.reuse_credit: hits per copy so "
          "far, capped, x the CPU run); the runtime's hybrid='auto'. Python engine only")
