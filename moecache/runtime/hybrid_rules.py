"""The hybrid executor's decision rules: how a missed expert is served (copied to the GPU or run on
the CPU), and the costs the ``auto`` rule reads while the model runs (``OnlineCosts``). The ``auto``
rule is the cost model's ``choose_copy`` with its reuse credit (``moecache.cost.timing``), the very
rule of the simulator's ``auto`` miss rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


from ..cost.hardware import HardwareProfile
from ..cost.timing import Timeline, choose_copy, reuse_credit
from ..registry import Registry

#: Weight of the newest measured/modelled CPU time ratio in the online CPU cost (EWMA) ...
CPU_EWMA = 0.2
#: ... and the range one measurement may move it by (a preempted worker is not the machine's speed).
CPU_RATIO_CLAMP = (0.25, 4.0)


class OnlineCosts:
    """The costs a rule reads while the model runs: the calibrated profile, with the CPU time scaled by
    what this run's own CPU jobs cost (EWMA of measured / modelled ms). Measured is what a layer's CPU
    experts put on its critical path: the host's launch (gathering and copying their rows, starting
    the kernel), the kernel's own time (slowed by copies running at the same time, which a calibration
    on an idle machine misses) and the merge after the wait; so the scale also spreads the hybrid
    path's fixed cost per layer over its CPU experts (it matters for small experts, whose CPU run is
    short next to that fixed cost). Copy and GPU times stay as calibrated: the copy engine's copies
    are not timed one by one."""

    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        self.copy_ms = profile.copy_ms
        self.cpu_scale = 1.0
        self.samples = 0

    def gpu(self, tokens: int) -> float:
        return self.profile.gpu(tokens)

    def cpu(self, tokens: int) -> float:
        return self.profile.cpu(tokens) * self.cpu_scale

    def observe_cpu(self, sizes: Sequence[int], measured_ms: float) -> None:
        """One CPU job of experts with ``sizes`` tokens each took ``measured_ms``."""
        modelled = sum(self.profile.cpu(n) for n in sizes)
        if modelled <= 0.0 or measured_ms <= 0.0:
            return
        lo, hi = CPU_RATIO_CLAMP
        ratio = min(hi, max(lo, measured_ms / modelled))
        self.cpu_scale += CPU_EWMA * (ratio - self.cpu_scale)
        self.samples += 1


class LayerQueues:
    """What a rule reads when it decides one MoE layer's misses: the costs, the copy engine's and the
    CPU's queues as a ``Timeline`` in ms from now (the simulator's own type), and the runtime's reuse
    counts (needs served from the pool and copies issued, as the simulator counts them)."""

    def __init__(self, costs: OnlineCosts | None, copy_backlog_ms: float, seen: int, hits: int = 0, copies: int = 0):
        self.costs = costs
        self.tl = Timeline()
        self.tl.copy = copy_backlog_ms
        self.tl.hits, self.tl.copies = hits, copies
        self.seen = seen  # misses decided before this layer (by this runtime)


@dataclass(frozen=True)
class DecisionRule:
    """How a missed expert is served: ``decide(queues, key, tokens)`` is True to copy it."""

    name: str
    needs_costs: bool
    decide: Callable[[LayerQueues, int, int], bool]


HYBRID_RULES: Registry[DecisionRule] = Registry("hybrid rule")


def _auto(q: LayerQueues, key: int, tokens: int) -> bool:
    c, tl = q.costs, q.tl
    cpu = c.cpu(tokens)
    return choose_copy(0.0, tl.copy, tl.cpu, c.copy_ms, c.gpu(tokens), cpu, reuse_credit(tl.hits, tl.copies, cpu))


for _rule, _help in ((DecisionRule("auto", True, _auto),
                      "copy unless the CPU finishes first, the copy credited for the hits caching earns "
                      "(measured costs; the simulator's 'auto' miss rule)"),
                     (DecisionRule("cpu", False, lambda q, key, n: False),
                      "every miss on the CPU; nothing copied on a miss (only prefetches fill the pool)"),
                     (DecisionRule("copy", False, lambda q, key, n: True), "every miss copied (hybrid off)"),
                     (DecisionRule("half", False, lambda q, key, n: q.seen % 2 == 1),
                      "every second miss on the CPU, starting with the CPU (for tests)")):
    HYBRID_RULES.register(_rule.name, _help)(_rule)
