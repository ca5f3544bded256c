"""One replay on the engine asked for: the C++ core (``engine_cpp``) where it runs the configuration, the
Python reference (``engine_python``) otherwise; the two give identical result rows."""

from __future__ import annotations

from typing import Any

from ..cost.hardware import HardwareProfile
from ..cost.timing import MissRule
from ..policies.base import Policy
from .engine_cpp import choose_engine, replay_cpp
from .engine_python import replay_python
from .results import SimResult
from .schedule import Schedule


def run_engine(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *, engine: str = "auto",
               predictor: Any = None, depth: int = 0, prefetch: str = "topk", budget: int | None = None,
               admission: str = "cost", capacity_label: str | None = None,
               record: list[tuple[int, int, int, str]] | None = None) -> SimResult:
    """Replay on ``engine`` (``python``, ``cpp`` or ``auto``, as ``engine_cpp.choose_engine`` takes it); no bound."""
    if engine != "python" and choose_engine(engine, policy, predictor, depth, prefetch, rule.name) == "cpp":
        return replay_cpp(schedule, policy, hw, rule, predictor=predictor, depth=depth, prefetch=prefetch,
                          budget=budget, admission=admission, capacity_label=capacity_label, record=record)
    return replay_python(schedule, policy, hw, rule, predictor=predictor, depth=depth, prefetch=prefetch,
                         budget=budget, admission=admission, capacity_label=capacity_label, record=record)
