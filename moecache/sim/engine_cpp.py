"""The C++ replay engine: packs a schedule and a policy into arrays for ``moecache._C.sim_replay``.

``simulate(..., engine=...)`` (``moecache.sim.replay``) picks the engine: ``python`` is the readable
reference, ``cpp`` runs the same replay in ``csrc/sim_core.cpp``, ``auto`` (the default) takes
``cpp`` where the extension is built (and not disabled by ``MOECACHE_DISABLE_EXT=1``) and the
configuration is supported, else ``python``. Both give identical result rows: the C++ core does
every float operation in the reference's order, and the per-token-count costs (non-expert, GPU,
CPU) are computed here by the same ``HardwareProfile`` methods and handed over as tables, so they
are the very same doubles.

Supported by ``cpp``: the policies in ``CPP_POLICIES`` (lru, fifo, lfu, lrfu, static, belady,
belady_bypass) with their registered classes (not subclasses), both scopes, every miss rule, step
and decode schedules, the per-need ``record``; the policy object must be fresh (nothing inserted or
accessed yet: the core starts from an empty cache) and is left untouched. Not supported (the
Python engine runs them): predictors and prefetch, the ``activation`` and ``predicted`` policies.
The GIL is released during the C++ replay, so replays in threads run in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .._ext import extension
from ..errors import ConfigError
from ..policies.base import POLICIES, Policy
from ..registry import Registry
from .hardware import HardwareProfile
from .results import SimResult
from .schedule import Schedule
from .timing import MissRule

#: Engine names accepted by ``simulate(engine=...)`` and ``moecache bench --engine``.
ENGINES = ("auto", "python", "cpp")

#: Miss rule name -> code of csrc/sim_core.cpp (MissCode).
MISS_CODES = {"copy": 0, "cpu": 1, "policy": 2, "min": 3}

OUTCOMES = ("hit", "copy", "cpu")  # csrc/sim_core.cpp Outcome codes 0, 1, 2

#: Layout thresholds of the C++ score-policy order structure (-1: the core's defaults, scan pools of
#: up to 64 slots, park the protected keys of waves of 17+ keys). Results never depend on them; the
#: tests set them to 0 to force the heap layout and parking on small traces.
TUNING = {"scan_max": -1, "park_min": -1}


@dataclass(frozen=True)
class Packed:
    """A policy as the C++ core takes it: code (PolicyCode), one int and one float parameter, and
    static placement's pinned mask and fitting counts (empty for other policies)."""

    code: int
    int_param: int = 0
    float_param: float = 0.0
    pinned: np.ndarray | None = None
    counts: np.ndarray | None = None


#: Policy name -> packer(policy) -> Packed. A policy not listed here runs on the Python engine.
CPP_POLICIES: Registry[Callable[[Policy], Packed]] = Registry("C++ policy")


@CPP_POLICIES.register("lru", "least recently used")
def _lru(p: Policy) -> Packed:
    return Packed(0)


@CPP_POLICIES.register("fifo", "first in, first out")
def _fifo(p: Policy) -> Packed:
    return Packed(1)


@CPP_POLICIES.register("lfu", "least frequently used with halving; int parameter = halving period in accesses")
def _lfu(p: Policy) -> Packed:
    return Packed(2, int_param=int(p._period))  # type: ignore[attr-defined]


@CPP_POLICIES.register("lrfu", "CRF score; float parameter = lam, the very double the Python policy uses")
def _lrfu(p: Policy) -> Packed:
    return Packed(3, float_param=float(p.lam))  # type: ignore[attr-defined]


@CPP_POLICIES.register("static", "pinned by fitting counts, LRU scratch slots")
def _static(p: Policy) -> Packed:
    n = p.num_layers * p.num_experts
    pinned = np.zeros(n, np.uint8)
    if p.pinned:  # type: ignore[attr-defined]
        pinned[np.fromiter(p.pinned, np.int64)] = 1  # type: ignore[attr-defined]
    counts = np.ascontiguousarray(np.asarray(p._count, np.int64).reshape(-1))  # type: ignore[attr-defined]
    return Packed(4, pinned=pinned, counts=counts)


@CPP_POLICIES.register("belady", "offline MIN")
def _belady(p: Policy) -> Packed:
    return Packed(5)


@CPP_POLICIES.register("belady_bypass", "offline MIN with bypass")
def _belady_bypass(p: Policy) -> Packed:
    return Packed(6)


def unsupported(policy: Policy, predictor: Any = None, depth: int = 0) -> str | None:
    """Why the C++ engine cannot run this configuration, or None when it can."""
    if predictor is not None or depth:
        return "predictors and prefetch run on the Python engine only"
    if policy.name not in CPP_POLICIES:
        return f"policy {policy.name!r} has no C++ version (C++ policies: {', '.join(CPP_POLICIES.names())})"
    if type(policy) is not POLICIES.get(policy.name):
        return f"{type(policy).__name__} is a subclass of the registered {policy.name!r} policy"
    patched = sorted(k for k, v in vars(policy).items() if callable(v))
    if patched:
        return f"the policy object's method(s) {patched} were replaced on the instance (the C++ core would skip them)"
    if len(policy) or policy.clock:
        return "the policy object was used before (the C++ replay starts from an empty cache)"
    return None


def choose_engine(engine: str, policy: Policy, predictor: Any = None, depth: int = 0) -> str:
    """``"cpp"`` or ``"python"`` for ``engine`` in ``ENGINES``; an explicit ``cpp`` that cannot run
    raises ``ConfigError`` saying why."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if engine == "python":
        return "python"
    why = unsupported(policy, predictor, depth)
    ext = extension()
    if ext is None or not hasattr(ext, "sim_replay"):
        why = why or ("the C++ extension moecache._C is not built or is disabled by MOECACHE_DISABLE_EXT (or was "
                      "built before csrc/sim_core.cpp); build it with `python setup.py build_ext --inplace`")
    if why is None:
        return "cpp"
    if engine == "cpp":
        raise ConfigError(f"engine cpp cannot run this configuration: {why}; use engine python (--engine python)")
    return "python"


def _tables(schedule: Schedule, hw: HardwareProfile, wide: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cost tables indexed by token count: non_expert(rows), gpu(c), cpu(c); the same doubles as
    the Python profile returns. An expert's count in a unit is at most its rows unless a row lists
    an id twice; the core reports a count beyond the table and the caller retries ``wide`` (up to
    rows x top_k), so the common case costs a few thousand profile calls, not top_k times more."""
    rows = np.diff(schedule.unit_start)
    max_rows = int(rows.max())
    ne = np.zeros(max_rows + 1, np.float64)
    for r in np.unique(rows).tolist():
        ne[r] = hw.non_expert(r)
    max_c = max_rows * schedule.top_k if wide else max_rows
    gpu = np.zeros(max_c + 1, np.float64)
    cpu = np.zeros(max_c + 1, np.float64)
    for c in range(1, max_c + 1):
        gpu[c] = hw.gpu(c)
        cpu[c] = hw.cpu(c)
    return ne, gpu, cpu


def replay_cpp(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *,
               budget: int | None = None, capacity_label: str | None = None,
               record: list | None = None) -> SimResult:
    """One replay on the C++ core (configuration already checked by ``simulate``); no bound."""
    import torch

    C = extension()
    if C is None:
        raise ConfigError("the C++ extension moecache._C is not built or is disabled by MOECACHE_DISABLE_EXT")
    # ids are range-checked by the core itself (same message as the trace reader's)
    ids = np.ascontiguousarray(schedule.ids, dtype=np.int64)
    packed = CPP_POLICIES.get(policy.name)(policy)
    empty_u8 = torch.zeros(0, dtype=torch.uint8)
    empty_i64 = torch.zeros(0, dtype=torch.int64)
    for wide in (False, True):
        ne, gpu, cpu = _tables(schedule, hw, wide)
        try:
            return _call(C, torch, schedule, policy, hw, rule, ids, packed, ne, gpu, cpu, empty_u8, empty_i64,
                         budget, capacity_label, record)
        except RuntimeError as e:
            msg = str(e)
            if msg.startswith("ConfigError: "):
                raise ConfigError(msg[len("ConfigError: "):]) from None
            if not (msg.startswith("TableTooShort: ") and not wide):
                raise
    raise AssertionError("unreachable: the wide tables cover every count")


def _call(C: Any, torch: Any, schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule,
          ids: np.ndarray, packed: Packed, ne: np.ndarray, gpu: np.ndarray, cpu: np.ndarray, empty_u8: Any,
          empty_i64: Any, budget: int | None, capacity_label: str | None, record: list | None) -> SimResult:
    """One call of the core (the arrays are views, nothing is copied) and its result row."""
    counts, times, rec = C.sim_replay(
        torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(schedule.unit_start, np.int64)),
        torch.from_numpy(ne), torch.from_numpy(gpu), torch.from_numpy(cpu), float(hw.copy_ms),
        int(schedule.num_experts), int(policy.capacity), policy.scope == "global", packed.code,
        int(packed.int_param), float(packed.float_param),
        torch.from_numpy(packed.pinned) if packed.pinned is not None else empty_u8,
        torch.from_numpy(packed.counts) if packed.counts is not None else empty_i64,
        MISS_CODES[rule.name], record is not None, int(TUNING["scan_max"]), int(TUNING["park_min"]))
    accesses, hits, ready, needs, loads, cpu_runs = counts.tolist()
    time_ms, gpu_busy, copy_busy, cpu_busy = times.tolist()
    if record is not None:
        record.extend((g, k, c, OUTCOMES[o]) for g, k, c, o in rec.tolist())
    from .replay import describe_predictor

    return SimResult(
        trace=schedule.name, policy=policy.describe(), scope=policy.scope, capacity=policy.capacity,
        capacity_label=capacity_label or str(policy.capacity), predictor=describe_predictor(None),
        prefetch=None, depth=0, budget=budget, miss_rule=rule.name, mode=schedule.mode,
        bytes_per_expert=hw.bytes_per_expert, hardware=hw.source, tokens=schedule.tokens, accesses=accesses,
        hits=hits, ready=ready, needs=needs, loads=loads, cpu_runs=cpu_runs, prefetches=0,
        prefetch_used=0, prefetch_wasted=0, time_ms=time_ms, gpu_busy_ms=gpu_busy,
        copy_busy_ms=copy_busy, cpu_busy_ms=cpu_busy, extra={},
    )
