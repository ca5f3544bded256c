"""One replay on the engine asked for: the C++ core (``engine_cpp``) where it runs the configuration, the
Python reference (``engine_python``) otherwise; the two give identical result rows."""

from __future__ import annotations

from typing import Any

from ..admission import DEFAULT_ADMISSION
from ..cost.hardware import HardwareProfile
from ..cost.timing import MissRule
from ..errors import ConfigError
from ..policies.base import Policy
from .copy_queue import DEFAULT_COPY_QUEUE
from .engine_cpp import choose_engine, replay_cpp
from .engine_python import replay_python
from .results import SimResult
from .schedule import Schedule

#: Why a replay with the per-miss precision rule runs on the Python engine.
PRECISION_WHY = ("the per-miss precision rule (low-precision misses, upgrades on reuse) is implemented in the "
                 "Python reference only")


def run_engine(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *, engine: str = "auto",
               predictor: Any = None, depth: int = 0, prefetch: str = "topk", budget: int | None = None,
               admission: str = DEFAULT_ADMISSION, capacity_label: str | None = None,
               record: list[tuple[int, int, int, str]] | None = None, precision: Any = None,
               copy_queue: str = DEFAULT_COPY_QUEUE) -> SimResult:
    """Replay on ``engine`` (``python``, ``cpp`` or ``auto``, as ``engine_cpp.choose_engine`` takes it); no bound.
    ``precision``: ``(MissPrecisionRule, low_copy_ms, low_copy_bytes)`` or None (``moecache.miss_precision``). The C++ core does
    not implement the per-miss precision rule: such a replay runs on the Python reference (``PRECISION_WHY``);
    asking for ``cpp`` explicitly is an error saying so. ``copy_queue``: ``worker`` (the default,
    the runtime's copy worker) or ``fifo`` (``moecache.sim.copy_queue``), on either engine."""
    if precision is not None:
        if engine == "cpp":
            raise ConfigError(f"engine cpp cannot run this configuration: {PRECISION_WHY}; use engine python "
                              "(--sim-engine python)")
        engine = "python"
    if engine != "python" and choose_engine(engine, policy, predictor, depth, prefetch, rule.name) == "cpp":
        return replay_cpp(schedule, policy, hw, rule, predictor=predictor, depth=depth, prefetch=prefetch,
                          budget=budget, admission=admission, capacity_label=capacity_label, record=record,
                          copy_queue=copy_queue)
    return replay_python(schedule, policy, hw, rule, predictor=predictor, depth=depth, prefetch=prefetch,
                         budget=budget, admission=admission, capacity_label=capacity_label, record=record,
                         precision=precision, copy_queue=copy_queue)
