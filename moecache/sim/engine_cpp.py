"""The C++ replay engine: packs a schedule, a policy and a predictor into arrays for ``moecache._C.sim_replay``.

``simulate(..., engine=...)`` (``moecache.sim.simulator``) picks the engine: ``python`` is the readable
reference (``engine_python``), ``cpp`` runs the same replay in ``csrc/sim/``, ``auto`` (the default) takes
``cpp`` where the extension is built (and not disabled by ``MOECACHE_DISABLE_EXT=1``) and the
configuration is supported, else ``python``. Both give identical result rows: the C++ core does
every float operation in the reference's order, and whatever the reference computes with a library
call whose last bit may differ from libm (numpy's vectorised ``power``) or with the hardware profile
is computed here by those very calls and handed over as tables (costs per token count, powers
``g ** n``), so they are the very same doubles.

Supported by ``cpp``: every policy whose class has a C++ port (``Policy.cpp_port``, defined in the
policy's own module; ``ported_policies()``), as its registered class (not a subclass), both scopes,
the miss rules of ``MISS_CODES``, step and decode schedules, the per-need ``record``, prefetch with
the rules of ``PREFETCH_CODES`` at any depth and budget, and any predictor the simulator accepts. A
policy without a port runs on the Python engine: a port is an accelerator, not a duty.

* predictors with a port (``Predictor.cpp_port``: prior, temporal, transition; the registered
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
from typing import Any, Iterator

import numpy as np

from .._ext import extension
from ..cost.hardware import HardwareProfile
from ..cost.timing import MissRule
from ..admission import (ADMISSION_CODES, DEFAULT_ADMISSION, GATE_MIN_CALLS, GATE_PROBE_EVERY, GATE_SPAN,
                         check_admission)
from ..errors import ConfigError
from ..policies.base import POLICIES, CppPort, Policy
from ..predictors.base import PREDICTORS, Predictor
from .copy_queue import DEFAULT_COPY_QUEUE
from .results import SimResult, describe_predictor
from .schedule import Schedule

#: Engine names accepted by ``simulate(engine=...)`` and ``moecache bench --sim-engine``.
ENGINES = ("auto", "python", "cpp")

#: Miss rule name -> code of csrc/sim/codes.h (MissCode).
MISS_CODES = {"copy": 0, "cpu": 1, "policy": 2, "min": 3}

#: Prefetch rule name -> code of csrc/sim/codes.h (PrefetchCode).
PREFETCH_CODES = {"topk": 0, "fill": 1}

OUTCOMES = ("hit", "copy", "cpu")  # csrc/sim/codes.h Outcome codes 0, 1, 2

#: The sim_replay interface this module speaks (the extension's ``sim_core_version``).
CORE_VERSION = 6

#: A streamed predictor's chunk: at most this many doubles (steps x slots x experts; 512 KiB).
STREAM_CHUNK_DOUBLES = 1 << 16

#: Layout thresholds of the C++ order structures (-1: the core's defaults). ``scan_max``, ``park_min``:
#: the score-policy heaps scan pools of up to 64 slots and park the protected keys of waves of 17+ keys;
#: ``wait_scan_max``: activation / predicted scan layer-scope pools and global pools of up to 32 slots
#: and keep larger ones sorted per layer (>= 0: pools of up to this many slots scan, in either scope).
#: Results never depend on them; the tests set them to 0 to force the ordered layouts on small traces.
TUNING = {"scan_max": -1, "park_min": -1, "wait_scan_max": -1}


def ported_policies() -> list[str]:
    """Registered policies with a C++ port (their class defines ``cpp_port``)."""
    return [n for n in POLICIES.names() if POLICIES.get(n).cpp_port is not Policy.cpp_port]


def ported_predictors() -> list[str]:
    """Registered predictors that can run inside the C++ core (their class defines ``cpp_port``)."""
    return [n for n in PREDICTORS.names() if PREDICTORS.get(n).cpp_port is not Predictor.cpp_port]


def _native_predictor(pred: Any, depths: list[int]) -> dict[str, Any] | None:
    """The C++ core's options for ``pred`` (its ``cpp_port``), or None when it must stream from Python
    (no port, a subclass, a replaced method)."""
    name = getattr(pred, "name", None)
    if name not in PREDICTORS or type(pred) is not PREDICTORS.get(name):
        return None
    if any(callable(v) for k, v in vars(pred).items() if k != "_combine"):
        return None
    return pred.cpp_port(depths)


def predictor_mode(predictor: Any) -> str | None:
    """How the C++ engine runs ``predictor``: ``"cpp"``, ``"stream"`` (Python, chunks) or None."""
    if predictor is None:
        return None
    return "cpp" if _native_predictor(predictor, []) is not None else "stream"


def unsupported(policy: Policy, predictor: Any = None, depth: int = 0, prefetch: str = "topk",
                miss_rule: str = "copy") -> str | None:
    """Why the C++ engine cannot run this configuration, or None when it can."""
    if miss_rule not in MISS_CODES:
        return f"miss rule {miss_rule!r} has no C++ version (C++ rules: {', '.join(MISS_CODES)})"
    if policy.name not in POLICIES or type(policy) is not POLICIES.get(policy.name):
        return f"{type(policy).__name__} is not the registered {policy.name!r} policy (a subclass or an unregistered class)"
    if type(policy).cpp_port is Policy.cpp_port:
        return f"policy {policy.name!r} has no C++ port (ported: {', '.join(ported_policies())}); it runs in Python"
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
                      "built before the current csrc/sim/); build it with `python setup.py build_ext "
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
        # (no slots: a predictor that only runs, depth 0 and a policy without scores; its host time still counts)
        steps = max(1, min(schedule.num_steps, STREAM_CHUNK_DOUBLES // max(1, slots * E)))
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
                       prefetch: str, budget: int | None, admission: str = DEFAULT_ADMISSION
                       ) -> tuple[dict[str, Any], _PredictionStream | None]:
    """sim_replay options of the predictor and prefetch; the stream object when it runs in Python."""
    if predictor is None:
        return {}, None
    opts: dict[str, Any] = {"depth": depth, "score_depth": score_depth, "budget": int(budget or 0),
                            "prefetch_rule": PREFETCH_CODES.get(prefetch, 0),
                            "admission": ADMISSION_CODES[check_admission(admission)],
                            "gate_span": GATE_SPAN, "gate_probe_every": GATE_PROBE_EVERY,
                            "gate_min_calls": GATE_MIN_CALLS}
    depths = sorted(set(range(1, depth + 1)) | ({score_depth} if score_depth else set()))
    native = _native_predictor(predictor, depths)
    if native is not None:
        opts.update(native)
        return opts, None
    stream = _PredictionStream(schedule, predictor, depth, score_depth)
    opts.update({"predictor": 0, "fill": stream.fill, "buf": stream.buf})
    return opts, stream


def replay_cpp(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *,
               predictor: Any = None, depth: int = 0, prefetch: str = "topk", budget: int | None = None,
               admission: str = DEFAULT_ADMISSION, capacity_label: str | None = None,
               record: list | None = None, copy_queue: str = DEFAULT_COPY_QUEUE) -> SimResult:
    """One replay on the C++ core (configuration already checked by ``simulate``); no bound."""
    C = extension()
    if C is None:
        raise ConfigError("the C++ extension moecache._C is not built or is disabled by MOECACHE_DISABLE_EXT")
    packed = policy.cpp_port()
    if packed is None:
        raise ConfigError(f"policy {policy.name!r} has no C++ port for these parameters; use --sim-engine python")
    score_depth = int(policy.score_depth() or 0) if policy.uses_scores else 0
    pred_opts, stream = _predictor_options(schedule, predictor, depth, score_depth, prefetch, budget,
                                           admission)
    # A streamed predictor is driven once (a retry would feed it the trace twice): wide tables at once.
    for wide in ((True,) if stream is not None else (False, True)):
        try:
            return _call(C, schedule, policy, hw, rule, packed, pred_opts, wide, budget, capacity_label, record,
                         predictor, depth, prefetch, admission, copy_queue)
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


def _call(C: Any, schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, packed: CppPort,
          pred_opts: dict[str, Any], wide: bool, budget: int | None, capacity_label: str | None,
          record: list | None, predictor: Any, depth: int, prefetch: str, admission: str = DEFAULT_ADMISSION,
          copy_queue: str = DEFAULT_COPY_QUEUE) -> SimResult:
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
    # the calibrated host and interference terms (the same doubles the reference reads)
    # (a scan policy's host time per insert rides on each copy's and prefetch's host cost)
    evict = hw.evict_host(policy.name)
    extra.update(layer_host_ms=hw.layer_host_ms, copy_host_ms=hw.copy_host_ms + evict,
                 predictor_host_ms=hw.predictor_host(getattr(predictor, "name", None)),
                 prefetch_host_ms=hw.prefetch_host_ms + evict, hybrid_layer_ms=hw.hybrid_layer_ms, slowdown=hw.slowdown,
                 evict_host_ms=evict, worker_queue=int(copy_queue == "worker"))
    if TUNING["wait_scan_max"] >= 0:
        extra["wait_scan_max"] = int(TUNING["wait_scan_max"])
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
     pf_skipped, pf_refused, gated, gate_calls, gate_probes, gate_skipped, gate_off, cancelled) = counts.tolist()
    gate = {"predictor_calls": gate_calls, "predictor_probes": gate_probes, "predictor_skipped": gate_skipped,
            "layers_off": gate_off} if gated else {}
    time_ms, gpu_busy, copy_busy, cpu_busy = times.tolist()
    if record is not None:
        record.extend((g, k, c, OUTCOMES[o]) for g, k, c, o in rec.tolist())
    return SimResult(
        trace=schedule.name, policy=policy.describe(), scope=policy.scope, capacity=policy.capacity,
        capacity_label=capacity_label or str(policy.capacity), predictor=describe_predictor(predictor),
        prefetch=prefetch if depth else None, depth=depth, budget=budget, miss_rule=rule.name, mode=schedule.mode,
        bytes_per_expert=hw.copy_bytes, hardware=hw.source, tokens=schedule.tokens, accesses=accesses,
        hits=hits, ready=ready, needs=needs, loads=loads, cpu_runs=cpu_runs, prefetches=prefetches,
        prefetch_used=pf_used, prefetch_wasted=pf_wasted, time_ms=time_ms, gpu_busy_ms=gpu_busy,
        copy_busy_ms=copy_busy, cpu_busy_ms=cpu_busy,
        extra=({"prefetch_skipped": pf_skipped, "prefetch_refused": pf_refused, "admission": admission}
               if depth else {})
        | {"copy_queue": copy_queue} | ({"copies_cancelled": cancelled} if copy_queue == "worker" else {}) | gate,
    )
