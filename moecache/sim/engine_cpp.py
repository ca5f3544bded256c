"""The C++ replay engine: packs a schedule, a policy and a predictor into arrays for ``moecache._C.sim_replay``.

``simulate(..., engine=...)`` (``moecache.sim.simulator``) picks the engine: ``python`` is the readable
reference (``engine_python``), ``cpp`` runs the same replay in ``csrc/sim_core.cpp``, ``auto`` (the default) takes
``cpp`` where the extension is built (and not disabled by ``MOECACHE_DISABLE_EXT=1``) and the
configuration is supported, else ``python``. Both give identical result rows: the C++ core does
every float operation in the reference's order, and whatever the reference computes with a library
call whose last bit may differ from libm (numpy's vectorised ``power``) or with the hardware profile
is computed here by those very calls and handed over as tables (costs per token count, powers
``g ** n``), so they are the very same doubles.

Supported by ``cpp``: every policy in ``CPP_POLICIES`` (all registered ones) with its registered
class (not a subclass), both scopes, every miss rule, step and decode schedules, the per-need
``record``, prefetch with the rules of ``PREFETCH_CODES`` at any depth and budget, and any
predictor the simulator accepts:

* the trace-only predictors of ``CPP_PREDICTORS`` (prior, temporal, transition; the registered
  classes) run inside the C++ core, from their fitted arrays; the predictor object is left
  untouched;
* every other predictor (activation_matrix, learned, oracle, subclasses, ...) runs in Python,
  called exactly as the reference calls it (``reset`` / ``observe`` / ``predict`` at the same steps),
  and streams what the replay reads of its answers (per step and depth the prediction summed over
  the unit's rows, and the mean row the ``predicted`` policy takes) in chunks of at most
  ``STREAM_CHUNK_DOUBLES`` doubles: the core asks for the next chunk when it has used the last one,
  never for an array of the whole trace.

The policy object must be fresh (nothing inserted or accessed yet: the core starts from an empty
cache) and is left untouched. The GIL is released during the C++ replay (a streamed predictor takes
it back only while it computes the next chunk), so replays in threads run in parallel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .._ext import extension
from ..cost.hardware import HardwareProfile
from ..cost.timing import MissRule
from ..errors import ConfigError
from ..policies.base import POLICIES, Policy
from ..predictors import transition
from ..predictors.base import PREDICTORS
from ..registry import Registry
from .results import SimResult, describe_predictor
from .schedule import Schedule

#: Engine names accepted by ``simulate(engine=...)`` and ``moecache bench --sim-engine``.
ENGINES = ("auto", "python", "cpp")

#: Miss rule name -> code of csrc/sim_core.cpp (MissCode).
MISS_CODES = {"copy": 0, "cpu": 1, "policy": 2, "min": 3}

#: Prefetch rule name -> code of csrc/sim_core.cpp (PrefetchCode).
PREFETCH_CODES = {"topk": 0, "fill": 1}

OUTCOMES = ("hit", "copy", "cpu")  # csrc/sim_core.cpp Outcome codes 0, 1, 2

#: The sim_replay interface this module speaks (the extension's ``sim_core_version``).
CORE_VERSION = 2

#: A streamed predictor's chunk: at most this many doubles (steps x slots x experts; 512 KiB).
STREAM_CHUNK_DOUBLES = 1 << 16

#: Layout thresholds of the C++ score-policy order structure (-1: the core's defaults, scan pools of
#: up to 64 slots, park the protected keys of waves of 17+ keys). Results never depend on them; the
#: tests set them to 0 to force the heap layout and parking on small traces.
TUNING = {"scan_max": -1, "park_min": -1}


@dataclass(frozen=True)
class Packed:
    """A policy as the C++ core takes it: code (PolicyCode), one int and one float parameter, static
    placement's pinned mask and fitting counts (empty for other policies), and further options of
    sim_replay's ``extra`` (``tables(schedule)`` adds those that depend on the schedule)."""

    code: int
    int_param: int = 0
    float_param: float = 0.0
    pinned: np.ndarray | None = None
    counts: np.ndarray | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tables: Callable[[Schedule], dict[str, Any]] | None = None


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


def _powers(g: float) -> Callable[[Schedule], dict[str, Any]]:
    """The powers ``g ** n`` for n = 0..units (a layer's step count never exceeds the units), made by
    the calls activation.py makes: Python's ``float ** int`` in ``on_access`` (libm pow) and numpy's
    ``power`` in ``probability`` (vectorised; it may differ from libm in the last bit, but it is
    elementwise, so the value of each n does not depend on the array around it)."""

    def tables(schedule: Schedule) -> dict[str, Any]:
        n = schedule.num_units + 1
        acc = np.array([g ** i for i in range(n)], np.float64)
        rank = np.ascontiguousarray(g ** np.arange(n).astype(np.float64), np.float64)
        return {"pow_acc": acc, "pow_rank": rank}

    return tables


def _activation_like(code: int) -> Callable[[Policy], Packed]:
    def pack(p: Policy) -> Packed:
        g = float(p.g)  # type: ignore[attr-defined]
        return Packed(code, options={"alpha": float(p.params["alpha"]), "g": g}, tables=_powers(g))

    return pack


CPP_POLICIES.register("activation", "request activation ratio and layer distance; powers of g as tables")(
    _activation_like(7))
CPP_POLICIES.register("predicted", "activation with the predictor's next-token probabilities (scores streamed or "
                                   "computed in C++)")(_activation_like(8))

#: Predictor name -> packer(predictor, depths) -> sim_replay options of a predictor computed in C++.
#: Any other predictor streams its predictions from Python (``_PredictionStream``).
CPP_PREDICTORS: Registry[Callable[[Any, list[int]], dict[str, Any]]] = Registry("C++ predictor")


def _prior_array(pred: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(pred.prior, np.float64).reshape(-1))


@CPP_PREDICTORS.register("prior", "normalised per-layer prior")
def _pred_prior(pred: Any, depths: list[int]) -> dict[str, Any]:
    return {"predictor": 1, "prior": _prior_array(pred)}


@CPP_PREDICTORS.register("temporal", "decayed per-row counts blended with the prior")
def _pred_temporal(pred: Any, depths: list[int]) -> dict[str, Any]:
    return {"predictor": 2, "prior": _prior_array(pred), "decay": float(pred.decay), "strength": float(pred.strength)}


@CPP_PREDICTORS.register("transition", "fitted conditionals, product or mean combine")
def _pred_transition(pred: Any, depths: list[int]) -> dict[str, Any]:
    too_deep = [d for d in depths if d > pred.max_depth]
    if too_deep:  # the reference raises this at its first predict(), before any expert is served
        d = too_deep[0]
        raise ConfigError(f"transition was fitted up to depth {pred.max_depth}, asked for {d}: "
                          f"build it with max_depth={d} and fit again")
    return {"predictor": 3, "prior": _prior_array(pred), "max_depth": int(pred.max_depth),
            "cond": np.ascontiguousarray(np.asarray(pred.cond, np.float64).reshape(-1)),
            "product": int(pred._combine is transition._product)}


def _native_predictor(pred: Any) -> Callable[[Any, list[int]], dict[str, Any]] | None:
    """The C++ packer for ``pred``, or None when it must stream from Python (a subclass, a
    replaced method, an unregistered combine rule)."""
    name = getattr(pred, "name", None)
    if name not in CPP_PREDICTORS or name not in PREDICTORS or type(pred) is not PREDICTORS.get(name):
        return None
    if any(callable(v) for k, v in vars(pred).items() if k != "_combine"):
        return None
    if name == "transition":
        if pred._combine not in (transition._product, transition._mean):
            return None
    return CPP_PREDICTORS.get(name)


def predictor_mode(predictor: Any) -> str | None:
    """How the C++ engine runs ``predictor``: ``"cpp"``, ``"stream"`` (Python, chunks) or None."""
    if predictor is None:
        return None
    return "cpp" if _native_predictor(predictor) is not None else "stream"


def unsupported(policy: Policy, predictor: Any = None, depth: int = 0, prefetch: str = "topk",
                miss_rule: str = "copy") -> str | None:
    """Why the C++ engine cannot run this configuration, or None when it can."""
    if miss_rule not in MISS_CODES:
        return f"miss rule {miss_rule!r} has no C++ version (C++ rules: {', '.join(MISS_CODES)})"
    if policy.name not in CPP_POLICIES:
        return f"policy {policy.name!r} has no C++ version (C++ policies: {', '.join(CPP_POLICIES.names())})"
    if type(policy) is not POLICIES.get(policy.name):
        return f"{type(policy).__name__} is a subclass of the registered {policy.name!r} policy"
    patched = sorted(k for k, v in vars(policy).items() if callable(v))
    if patched:
        return f"the policy object's method(s) {patched} were replaced on the instance (the C++ core would skip them)"
    if len(policy) or policy.clock:
        return "the policy object was used before (the C++ replay starts from an empty cache)"
    if depth and prefetch not in PREFETCH_CODES:
        return f"prefetch rule {prefetch!r} has no C++ version (C++ rules: {', '.join(sorted(PREFETCH_CODES))})"
    return None


def choose_engine(engine: str, policy: Policy, predictor: Any = None, depth: int = 0, prefetch: str = "topk",
                  miss_rule: str = "copy") -> str:
    """``"cpp"`` or ``"python"`` for ``engine`` in ``ENGINES``; an explicit ``cpp`` that cannot run
    raises ``ConfigError`` saying why."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if engine == "python":
        return "python"
    why = unsupported(policy, predictor, depth, prefetch, miss_rule)
    ext = extension()
    if ext is None or getattr(ext, "sim_core_version", 1) < CORE_VERSION:
        why = why or ("the C++ extension moecache._C is not built or is disabled by MOECACHE_DISABLE_EXT (or was "
                      "built before the current csrc/sim_core.cpp); build it with `python setup.py build_ext "
                      "--inplace`")
    if why is None:
        return "cpp"
    if engine == "cpp":
        raise ConfigError(f"engine cpp cannot run this configuration: {why}; use engine python (--sim-engine python)")
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


class _PredictionStream:
    """A Python predictor driven over the schedule exactly as ``engine_python.replay_python`` drives it, writing
    what the replay reads into ``buf`` chunk by chunk.

    Per step, slot ``d - 1`` (d = 1..depth) gets ``predict(l, d).sum(axis=0)`` (the prefetch scores)
    and the last slot, when the policy wants scores, ``predict(l, score_depth).mean(axis=0)``: the
    very numpy calls of the reference. ``fill()`` (called by the core, with the GIL) writes the next
    ``len(buf)`` steps and returns how many it wrote; when the predictor raises, it returns the steps
    before the failing one, then -1, and ``error`` holds the exception for the caller to re-raise,
    so the failure surfaces at the same step as in the reference.
    """

    def __init__(self, schedule: Schedule, predictor: Any, depth: int, score_depth: int):
        self.schedule, self.predictor = schedule, predictor
        self.depth, self.score_depth = depth, score_depth
        slots = depth + (1 if score_depth else 0)
        E = schedule.num_experts
        steps = max(1, min(schedule.num_steps, STREAM_CHUNK_DOUBLES // (slots * E)))
        self.buf = np.zeros((steps, slots, E), np.float64)
        self.error: BaseException | None = None
        self._steps = self._iterate()

    def _iterate(self) -> Iterator[list[np.ndarray]]:
        s, pred = self.schedule, self.predictor
        L = s.num_layers
        depths = sorted(set(range(1, self.depth + 1)) | ({self.score_depth} if self.score_depth else set()))
        future = None
        if hasattr(pred, "set_future"):  # a cursor of its own over the schedule's (shared, read-only) use lists
            future = copy.copy(s.future)
            pred.set_future(future)
        rows_seen = -1
        for u in range(s.num_units):
            rows = s.rows(u)
            if s.new_request[u] or rows != rows_seen:
                pred.reset()
                rows_seen = rows
            uids = s.unit_ids(u)
            for l in range(L):
                if future is not None:
                    future.seek(u * L + l)
                pred.observe(l, uids[:, l, :])
                preds = {d: pred.predict(l, d) for d in depths}
                out = [preds[d].sum(axis=0) for d in range(1, self.depth + 1)]
                if self.score_depth:
                    out.append(preds[self.score_depth].mean(axis=0))
                yield out

    def fill(self) -> int:
        if self.error is not None:
            return -1
        n = 0
        try:
            while n < len(self.buf):
                slots = next(self._steps)
                for j, v in enumerate(slots):
                    self.buf[n, j] = v
                n += 1
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 (re-raised by replay_cpp at the failing step)
            self.error = e
            return n if n else -1
        return n


def _predictor_options(schedule: Schedule, predictor: Any, depth: int, score_depth: int,
                       prefetch: str, budget: int | None) -> tuple[dict[str, Any], _PredictionStream | None]:
    """sim_replay options of the predictor and prefetch; the stream object when it runs in Python."""
    if predictor is None:
        return {}, None
    opts: dict[str, Any] = {"depth": depth, "score_depth": score_depth, "budget": int(budget or 0),
                            "prefetch_rule": PREFETCH_CODES.get(prefetch, 0)}
    native = _native_predictor(predictor)
    if native is not None:
        depths = sorted(set(range(1, depth + 1)) | ({score_depth} if score_depth else set()))
        opts.update(native(predictor, depths))
        return opts, None
    stream = _PredictionStream(schedule, predictor, depth, score_depth)
    opts.update({"predictor": 0, "fill": stream.fill, "buf": stream.buf})
    return opts, stream


def replay_cpp(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *,
               predictor: Any = None, depth: int = 0, prefetch: str = "topk", budget: int | None = None,
               capacity_label: str | None = None, record: list | None = None) -> SimResult:
    """One replay on the C++ core (configuration already checked by ``simulate``); no bound."""
    C = extension()
    if C is None:
        raise ConfigError("the C++ extension moecache._C is not built or is disabled by MOECACHE_DISABLE_EXT")
    packed = CPP_POLICIES.get(policy.name)(policy)
    score_depth = int(policy.score_depth() or 0) if policy.uses_scores else 0
    pred_opts, stream = _predictor_options(schedule, predictor, depth, score_depth, prefetch, budget)
    # A streamed predictor is driven once (a retry would feed it the trace twice): wide tables at once.
    for wide in ((True,) if stream is not None else (False, True)):
        try:
            return _call(C, schedule, policy, hw, rule, packed, pred_opts, wide, budget, capacity_label, record,
                         predictor, depth, prefetch)
        except RuntimeError as e:
            msg = str(e)
            if msg.startswith("PredictionStreamError: "):
                if stream is not None and stream.error is not None:
                    raise stream.error from None
                raise
            if msg.startswith("ConfigError: "):
                raise ConfigError(msg[len("ConfigError: "):]) from None
            if not (msg.startswith("TableTooShort: ") and not wide):
                raise
    raise AssertionError("unreachable: the wide tables cover every count")


def _call(C: Any, schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, packed: Packed,
          pred_opts: dict[str, Any], wide: bool, budget: int | None, capacity_label: str | None,
          record: list | None, predictor: Any, depth: int, prefetch: str) -> SimResult:
    """One call of the core (the arrays are views, nothing is copied) and its result row."""
    import torch  # loaded only when the C++ core runs: the simulator itself needs no torch

    t = torch.from_numpy
    ids = np.ascontiguousarray(schedule.ids, dtype=np.int64)  # range-checked by the core itself
    ne, gpu, cpu = _tables(schedule, hw, wide)
    extra: dict[str, Any] = {"new_request": t(np.ascontiguousarray(schedule.new_request, np.uint8))}
    extra.update(packed.options)
    if packed.tables is not None:
        extra.update(packed.tables(schedule))
    extra.update(pred_opts)
    extra = {k: t(v) if isinstance(v, np.ndarray) else v for k, v in extra.items()}
    empty_u8 = torch.zeros(0, dtype=torch.uint8)
    empty_i64 = torch.zeros(0, dtype=torch.int64)
    counts, times, rec = C.sim_replay(
        t(ids), t(np.ascontiguousarray(schedule.unit_start, np.int64)), t(ne), t(gpu), t(cpu), float(hw.copy_ms),
        int(schedule.num_experts), int(policy.capacity), policy.scope == "global", packed.code,
        int(packed.int_param), float(packed.float_param),
        t(packed.pinned) if packed.pinned is not None else empty_u8,
        t(packed.counts) if packed.counts is not None else empty_i64,
        MISS_CODES[rule.name], record is not None, int(TUNING["scan_max"]), int(TUNING["park_min"]), extra)
    (accesses, hits, ready, needs, loads, cpu_runs, prefetches, pf_used, pf_wasted,
     pf_skipped) = counts.tolist()
    time_ms, gpu_busy, copy_busy, cpu_busy = times.tolist()
    if record is not None:
        record.extend((g, k, c, OUTCOMES[o]) for g, k, c, o in rec.tolist())
    return SimResult(
        trace=schedule.name, policy=policy.describe(), scope=policy.scope, capacity=policy.capacity,
        capacity_label=capacity_label or str(policy.capacity), predictor=describe_predictor(predictor),
        prefetch=prefetch if depth else None, depth=depth, budget=budget, miss_rule=rule.name, mode=schedule.mode,
        bytes_per_expert=hw.bytes_per_expert, hardware=hw.source, tokens=schedule.tokens, accesses=accesses,
        hits=hits, ready=ready, needs=needs, loads=loads, cpu_runs=cpu_runs, prefetches=prefetches,
        prefetch_used=pf_used, prefetch_wasted=pf_wasted, time_ms=time_ms, gpu_busy_ms=gpu_busy,
        copy_busy_ms=copy_busy, cpu_busy_ms=cpu_busy,
        extra={"prefetch_skipped": pf_skipped} if depth else {},
    )
