"""``simulate``: one policy (and optionally a predictor and prefetch) replayed over a schedule, with its
lower bound; the entry point of the simulator. The replay itself is ``engine_python`` (the reference
loop, whose docstring gives the step order) or ``engine_cpp`` (the same replay in C++)."""

from __future__ import annotations

from typing import Any

from ..admission import DEFAULT_ADMISSION, check_admission
from ..cost.hardware import HardwareProfile, default_profile, with_format
from ..cost.timing import MISS_RULES, MissRule
from ..errors import ConfigError
from ..policies.base import Policy
from .bound import lower_bound
from .copy_queue import COPY_QUEUES, DEFAULT_COPY_QUEUE
from .engine_python import check_config
from .engines import run_engine
from .prefetch import PREFETCH_RULES
from .results import SimResult
from .schedule import Schedule


def simulate(schedule: Schedule, policy: Policy, predictor: Any = None, *, depth: int = 0,
             prefetch: str = "topk", budget: int | None = None, admission: str = DEFAULT_ADMISSION,
             hardware: HardwareProfile | None = None,
             miss_rule: str = "copy", bound: Any = True, capacity_label: str | None = None,
             record: list[tuple[int, int, int, str]] | None = None, engine: str = "auto",
             miss_precision: Any = None, copy_queue: str = DEFAULT_COPY_QUEUE) -> SimResult:
    """Replay ``schedule`` through ``policy`` (and ``predictor``); return one result row.

    ``bound``: True computes the lower bound (``moecache.sim.bound``, cached on the schedule), a
    ``Bound`` uses that one, False leaves it out. ``budget``: prefetches per target layer
    (default ``top_k`` times the unit's tokens, at most the expert count). ``record``: a list that
    receives ``(step, key, tokens, outcome)`` for every need as it is served, outcome ``"hit"``,
    ``"copy"`` (a miss copied in) or ``"cpu"`` (a miss run on the CPU): hits of a step first, then
    its misses, each in ascending key order. ``engine``: ``python`` (the reference loop of
    ``engine_python``), ``cpp`` (the same replay in csrc/sim/, identical rows; see
    ``engine_cpp``) or ``auto`` (cpp where built and supported). ``admission``: the prefetch
    admission rule (``moecache.admission``: ``gated``, the default: the cost rule and the predictor gate;
    ``cost``: the rule alone, the predictor asked at every layer; ``none``: every candidate issued).
    ``miss_precision``: a ``moecache.miss_precision.MissPrecisionRule``: misses with a small gate share are
    copied in its lower-precision format (landing row + expansion, as the runtime does) and upgraded when
    reused; outcomes ``"copy_low"`` and ``"upgrade"`` in ``record``. Needs a trace with gate weights, the
    "copy" miss rule and full-precision experts; runs on the Python engine (``engines.PRECISION_WHY``).
    ``copy_queue``: ``worker`` (the default, what the runtime runs: its copy worker, prefetches queued by
    priority, cancelled at their target layer where the routing did not pick them, demand copies ahead of
    them; ``moecache.sim.copy_queue``) or ``fifo`` (every copy, demand or prefetch, on the copy engine in
    issue order); both engines. The row's ``extra["copy_queue"]`` names the model that ran.
    """
    check_config(schedule, policy, predictor, depth)
    rule = MISS_RULES.get(miss_rule)
    if depth:
        PREFETCH_RULES.get(prefetch)  # an unknown rule is an error before anything runs
    check_admission(admission)
    if copy_queue not in COPY_QUEUES:
        raise ConfigError(f"unknown copy queue {copy_queue!r}: choose one of {', '.join(COPY_QUEUES)}")
    if budget is not None and budget < 1:
        raise ConfigError(f"prefetch budget must be >= 1 experts per layer, got {budget}")
    hw = hardware or default_profile(schedule.meta.bytes_per_expert)
    precision = None
    bound_hw = hw
    if miss_precision is not None:
        precision, bound_hw = precision_costs(miss_precision, schedule, hw, miss_rule)
    res = run_engine(schedule, policy, hw, rule, engine=engine, predictor=predictor, depth=depth, prefetch=prefetch,
                     budget=budget, admission=admission, capacity_label=capacity_label, record=record,
                     precision=precision, copy_queue=copy_queue)
    return _with_bound(res, schedule, policy, bound_hw, rule, bound)


def precision_costs(rule: Any, schedule: Schedule, hw: HardwareProfile, miss_rule: str
                    ) -> tuple[tuple[Any, float, int], HardwareProfile]:
    """The per-miss precision rule's ``(rule, low copy time, low copy bytes)`` for the replay, and the profile the lower bound
    reads (the low copy's: every load costs at least that much), after checking the configuration."""
    if not schedule.has_weights:
        raise ConfigError("the per-miss precision rule needs gate weights and this trace records none; use a trace "
                          "recorded with weights, or leave --low-precision-misses out")
    if miss_rule != "copy":
        raise ConfigError(f"the per-miss precision rule chooses how a miss is copied; it runs with --miss-rule copy, "
                          f"not {miss_rule!r}")
    if hw.copy_bytes_per_expert is not None:
        raise ConfigError(f"low-precision misses copy a lower-precision version of full-precision experts; the "
                          f"experts here are already {hw.expert_format}: drop --expert-dtype or --low-precision-misses")
    low_hw = with_format(hw, rule.fmt, "expanded")
    return (rule, low_hw.copy_ms, low_hw.copy_bytes), low_hw


def _with_bound(res: SimResult, schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule,
                bound: Any) -> SimResult:
    """Attach the lower bound (``bound`` as in ``simulate``) to a result row."""
    if bound is True:
        bound = lower_bound(schedule, policy.capacity, policy.scope, hw, rule.uses_cpu)
    if bound:
        res.bound_ms = bound.total_ms
    return res
