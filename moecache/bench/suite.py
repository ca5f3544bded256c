"""The policy benchmark suite: ``moecache bench --suite CONFIG -o DIR``.

A suite replays a grid of configurations (traces x scopes x capacities x policies x predictors x
prefetch depths) through the simulator and writes tables and plots of demand hit rate, ready rate,
bytes per token and estimated ms per token, each also as a ratio to its bound.

**Config**: ``moecache.sim.suite_config`` (TOML or JSON; relative paths start at the config
file's folder; every name is checked against the registries before any work).

**Fitting.** Each trace is split once: static placement and learned predictors are fitted on its
leading ``fit_share`` of sequences (or of tokens, with ``fit_by = "tokens"``), and every row of that
trace scores the same rest (optionally only its first ``scored_sequences`` / ``scored_tokens``), so
no row is scored on what it was fitted on, and all rows of a trace are comparable. The split is
stated per trace in the outputs.

**Grid.** Every combination is either run or *skipped with a stated reason* (listed in
``results.md`` and ``skipped.csv``), never dropped silently: see ``SKIP_RULES`` (e.g. a prefetch
depth without a predictor), global scope on a one-layer trace (the same as layer scope), a slot count
below the trace's top_k, a capacity that resolves to the same slots as another one (the one that asks
for that many slots most exactly runs), and a combination that the simulator refuses for the trace's
shape, found by a dry run on a tiny synthetic trace of that shape before any work (``Probe``; e.g.
``predicted``, which needs predictions a whole token ahead, with a ``transition`` predictor fitted to
fewer layers).

**Bound.** The bound row of a (trace, scope, capacity) is the offline policy that is optimal for the
miss rule, ``belady`` (copy) or ``belady_bypass`` (rules that may run a miss on the CPU), without
predictor or prefetch; it is added to the grid when the config leaves it out. Ratios: hit rate,
ready rate and bytes per token divided by the bound row's; ms per token divided by the lower bound
of ``moecache.sim.bound`` (the ``ratio`` of a result row). Under the copy rule in a decode stream,
a demand-only policy's hit ratio is at most 1, every row's bytes ratio at least 1 and every ms ratio
at least 1; a prefetching row can exceed a hit ratio of 1 (Belady is the optimum of demand loading).

**Resumable.** Each finished configuration is appended to ``DIR/rows.jsonl`` as one JSON line
(flushed and fsynced) under its key: a hash of the normalised configuration, the settings, the
hardware profile and the trace's identity (its name, split, and a hash of its manifest and ids). A
rerun loads the rows whose keys it plans and computes only the others; a torn last line (a kill
mid-write) is dropped and its row recomputed. The result files are written from the journal in grid
order, so an interrupted and resumed run ends with the same bytes as an uninterrupted one. Only
``meta.json`` (machine, date, command, commit, counts, timings) differs between runs.

Outputs in DIR (``moecache.sim.suite_report``): ``results.md``, ``results.csv``, ``skipped.csv``,
``<metric>.png`` and ``<metric>_ratio.png`` for the four metrics (``suite_plots``), ``meta.json`` and
the journal ``rows.jsonl``.
Engine: each run goes through ``moecache.sim.engine_cpp.choose_engine`` and ``simulate``, as
``moecache bench`` does (``--engine``, default auto: the C++ core where it is built and supports the
configuration, else the Python reference); each row names its engine. The engines give identical rows,
so the engine is not part of a row's key.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, MoecacheError
from .suite_config import NONE, Settings, Spec, Suite, TraceSpec, load_config, parse_config

#: Bumped when a row's content changes meaning: old journals then recompute instead of mixing.
SCHEMA = 1
JOURNAL = "rows.jsonl"

__all__ = ["load_config", "parse_config", "plan_suite", "run_suite", "Plan", "Journal", "SuiteResult"]


# -- traces: identity, split, preparation -----------------------------------------------------------------

def trace_identity(path: str) -> str:
    """A hash of the trace's manifest and its ids: a rebuilt trace with other routing gets a new key."""
    from ..trace.store import MANIFEST

    h = hashlib.sha256()
    with open(os.path.join(path, MANIFEST), "rb") as f:
        manifest = f.read()
    h.update(manifest)
    for chunk in json.loads(manifest).get("chunks", []):
        with open(os.path.join(path, chunk["name"], "ids.npy"), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def split_trace(trace: Any, spec: TraceSpec) -> tuple[Any, Any, str]:
    """``(fit part, scored part, statement)`` as the module docstring describes."""
    if spec.fit_by == "sequences":
        seqs = trace.sequences()
        n_fit = int(math.floor(len(seqs) * spec.fit_share))
        if n_fit < 1 or n_fit >= len(seqs):
            raise ConfigError(f"trace {spec.name!r}: cannot fit on the leading {spec.fit_share:.0%} of its "
                              f"{len(seqs)} sequence(s) and score the rest; change fit_share, or set "
                              "fit_by = \"tokens\" for a trace that is one stream")
        rest = seqs[n_fit:]
        if spec.scored_sequences is not None:
            rest = rest[:spec.scored_sequences]
        score = trace.select_sequences(rest)
        note = (f"fitted on the leading {n_fit} of {len(seqs)} sequences ({spec.fit_share:.0%}); scored on the "
                f"next {len(rest)} sequences ({len(score):,} tokens)")
        return trace.select_sequences(seqs[:n_fit]), score, note
    n = len(trace)
    cut = int(math.floor(n * spec.fit_share))
    if cut < 1 or cut >= n:
        raise ConfigError(f"trace {spec.name!r}: cannot fit on the leading {spec.fit_share:.0%} of its {n} tokens "
                          "and score the rest; change fit_share")
    end = n if spec.scored_tokens is None else min(n, cut + spec.scored_tokens)
    idx = np.arange(n)
    note = (f"fitted on the leading {cut:,} of {n:,} tokens in recorded order ({spec.fit_share:.0%}); scored on "
            f"the next {end - cut:,} tokens")
    return trace.select(idx < cut), trace.select((idx >= cut) & (idx < end)), note


def hardware_for(settings: Settings, bytes_per_expert: int | None) -> Any:
    from ..cost.hardware import default_profile, load_profile

    if settings.hardware:
        return load_profile(settings.hardware, bytes_per_expert)
    return default_profile(bytes_per_expert)


@dataclass
class TraceInfo:
    """What the planner knows about a trace (read in the main process)."""

    spec: TraceSpec
    dims: tuple[int, int, int]
    identity: str
    fit_note: str
    tokens: int
    mode: str
    hardware: dict[str, Any]
    hardware_text: str


def describe_trace(spec: TraceSpec, settings: Settings) -> TraceInfo:
    from ..trace import open_trace

    trace = open_trace(spec.path)
    _fit, score, note = split_trace(trace, spec)
    m = trace.meta
    try:
        hw = hardware_for(settings, m.bytes_per_expert)
    except ConfigError as e:
        raise ConfigError(f"trace {spec.name!r}: {e}") from None
    return TraceInfo(spec=spec, dims=(m.num_layers, m.num_experts, m.top_k), identity=trace_identity(spec.path),
                     fit_note=note, tokens=len(score), mode="decode" if spec.decode_stream else "step",
                     hardware=hw.to_json(), hardware_text=hw.describe())


@dataclass
class Prepared:
    """A trace ready to replay (in the process that runs its rows): schedule, fitting data, predictors."""

    schedule: Any
    fit: Any
    counts: np.ndarray
    hardware: Any
    fit_note: str
    predictors: dict[Spec, Any] = field(default_factory=dict)

    def predictor(self, spec: Spec | None) -> Any:
        """A fresh copy of the predictor, fitted once per trace on the fit part."""
        if spec is None:
            return None
        fitted = self.predictors.get(spec)
        if fitted is None:
            from ..predictors import PREDICTORS

            s = self.schedule
            fitted = PREDICTORS.get(spec.name)(s.num_layers, s.num_experts, s.top_k, **spec.kwargs())
            if fitted.needs_fit:
                fitted.fit(self.fit)
            self.predictors[spec] = fitted
        return copy.deepcopy(fitted)


_PREPARED: dict[tuple[TraceSpec, str, Settings], Prepared] = {}


def prepare(spec: TraceSpec, settings: Settings, identity: str = "") -> Prepared:
    """Prepared trace, cached per process (the latest two: tasks arrive trace by trace); ``identity``
    (``trace_identity``) keeps a rebuilt trace at the same path from reusing the old one."""
    key = (spec, identity, settings)
    got = _PREPARED.get(key)
    if got is not None:
        return got
    from ..trace import count_ids, open_trace
    from .schedule import Schedule

    trace = open_trace(spec.path)
    fit, score, note = split_trace(trace, spec)
    prep = Prepared(schedule=Schedule(score, decode_stream=spec.decode_stream, name=spec.name), fit=fit,
                    counts=count_ids(fit), hardware=hardware_for(settings, trace.meta.bytes_per_expert),
                    fit_note=note)
    while len(_PREPARED) >= 2:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = prep
    return prep


# -- the grid --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One grid point."""

    trace: str
    scope: str
    capacity: str
    policy: Spec
    predictor: Spec | None
    depth: int

    @property
    def label(self) -> str:
        """``policy`` alone, or ``policy + predictor D=d``."""
        if self.predictor is None:
            return self.policy.label + (f" D={self.depth}" if self.depth else "")
        return f"{self.policy.label} + {self.predictor.label} D={self.depth}"


@dataclass(frozen=True)
class Run:
    config: Config
    key: str
    slots: int
    order: tuple[int, ...]


@dataclass(frozen=True)
class Skip:
    config: Config
    reason: str
    order: tuple[int, ...]


def _policy_class(spec: Spec) -> Any:
    from ..policies import POLICIES

    return POLICIES.get(spec.name)


def _predictor_offline(spec: Spec | None) -> bool:
    """A predictor that reads the future (the oracle) is a ceiling, not an online scheme."""
    if spec is None:
        return False
    from ..predictors import PREDICTORS

    return hasattr(PREDICTORS.get(spec.name), "set_future")


#: Combinations that make no sense, in the order they are tested: (reason, test(policy, predictor, depth)).
SKIP_RULES: tuple[tuple[str, Callable[[Spec, Spec | None, int], bool]], ...] = (
    ("prefetch depth > 0 needs a predictor",
     lambda pol, pred, d: d > 0 and pred is None),
    ("the policy evicts by predictions: it needs a predictor",
     lambda pol, pred, d: pred is None and _policy_class(pol).uses_scores),
    ("offline policies run demand-only: no predictor, no prefetch",
     lambda pol, pred, d: pred is not None and _policy_class(pol).offline),
    ("without prefetch this policy does not read the predictor: the same as predictor none",
     lambda pol, pred, d: pred is not None and d == 0 and not _policy_class(pol).uses_scores),
)


class Probe:
    """A dry run of each combination on a tiny synthetic trace of the real trace's shape, before any work:
    a combination that the simulator refuses for that shape (e.g. ``predicted``, which asks for predictions
    one token ahead, with a ``transition`` predictor fitted to fewer layers) is skipped with the simulator's
    own message as its reason, instead of failing the sweep midway."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._traces: dict[tuple[int, int, int], Any] = {}
        self._seen: dict[tuple, str | None] = {}

    def _trace(self, dims: tuple[int, int, int]) -> Any:
        got = self._traces.get(dims)
        if got is None:
            from ..trace import PHASE_DECODE, RoutingBlock, Trace, TraceMeta

            L, E, K = dims
            n = 2  # one sequence of two tokens (every layer asks its predictions), ids distinct per token
            ids = np.array([[[(t + l + j) % E for j in range(K)] for l in range(L)] for t in range(n)], np.int64)
            meta = TraceMeta(num_experts=E, top_k=K, moe_layers=list(range(L)), model="probe",
                             bytes_per_expert=1_000_000)
            block = RoutingBlock.build(ids, seq=0, pos=np.arange(n),
                                       step=np.arange(n), phase=PHASE_DECODE)
            got = self._traces[dims] = Trace(meta, block)
        return got

    def __call__(self, dims: tuple[int, int, int], pol: Spec, pred: Spec | None, depth: int) -> str | None:
        """Why the simulator refuses the combination on a trace of shape ``dims``, or None. Probed once per
        shape and combination, in layer scope at the smallest capacity (top_k slots)."""
        key = (dims, pol, pred, depth)
        if key not in self._seen:
            self._seen[key] = self._run(*key)
        return self._seen[key]

    def _run(self, dims: tuple[int, int, int], pol: Spec, pred: Spec | None, depth: int) -> str | None:
        from ..policies import new_policy
        from ..predictors import PREDICTORS
        from ..trace import count_ids
        from .replay import simulate
        from .schedule import Schedule

        L, E, K = dims
        trace = self._trace(dims)
        try:  # building and fitting on a toy trace may fail for reasons of its own: then there is no verdict
            policy = new_policy(pol.name, K, L, E, top_k=K, scope="layer", **pol.kwargs())
            if policy.needs_fit:
                policy.fit(count_ids(trace))
            predictor = None
            if pred is not None:
                predictor = PREDICTORS.get(pred.name)(L, E, K, **pred.kwargs())
                if predictor.needs_fit:
                    predictor.fit(trace)
        except Exception:  # noqa: BLE001
            return None
        try:
            simulate(Schedule(trace, decode_stream=True), policy, predictor, depth=depth,
                     prefetch=self.settings.prefetch_rule, budget=self.settings.prefetch_budget,
                     miss_rule=self.settings.miss_rule, bound=False, engine="python")
        except ConfigError as e:
            return f"the simulator refuses it for this trace: {e}"
        return None


def row_key(cfg: Config, slots: int, info: TraceInfo, settings: Settings) -> str:
    """The journal key of a configuration: a hash of everything that determines its row."""
    s = info.spec
    doc = {
        "schema": SCHEMA,
        "trace": [s.name, info.identity, s.decode_stream, s.fit_share, s.fit_by, s.scored_sequences, s.scored_tokens],
        "hardware": info.hardware,
        "settings": [settings.miss_rule, settings.prefetch_rule, settings.prefetch_budget],
        "scope": cfg.scope, "capacity": cfg.capacity, "slots": slots,
        "policy": [cfg.policy.name, list(cfg.policy.params)],
        "predictor": None if cfg.predictor is None else [cfg.predictor.name, list(cfg.predictor.params)],
        "depth": cfg.depth,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Plan:
    suite: Suite
    infos: dict[str, TraceInfo]
    runs: list[Run]
    skipped: list[Skip]

    def bound_config(self, cfg: Config) -> Config:
        return Config(cfg.trace, cfg.scope, cfg.capacity, self.suite.bound, None, 0)


def _slots(cap: str, dims: tuple[int, int, int], scope: str) -> tuple[int | None, str | None]:
    from .capacity import resolve_capacity

    L, E, K = dims
    if not cap.endswith("%") and int(cap) < K:
        return None, f"{cap} slots is below the trace's top_k={K}"
    return resolve_capacity(cap, L, E, K, scope), None


def _capacity_skips(caps: list[str], dims: tuple[int, int, int],
                    scope: str) -> dict[str, tuple[int | None, str | None]]:
    """Slots and skip reason per capacity. Capacities that resolve to the same slots would give identical
    rows: the one that asks for that many slots most exactly is run (e.g. 25% of 8 experts = 2 slots, not
    10%, which is raised to top_k = 2), ties to config order, and the others are skipped naming it."""
    L, E, _K = dims
    total = E if scope == "layer" else L * E
    out = {c: _slots(c, dims, scope) for c in caps}
    groups: dict[int, list[str]] = {}
    for c in caps:
        if out[c][1] is None:
            groups.setdefault(out[c][0], []).append(c)  # type: ignore[arg-type]
    for slots, same in groups.items():
        asked = {c: float(c[:-1]) / 100.0 * total if c.endswith("%") else float(c) for c in same}
        keep = min(same, key=lambda c: (abs(asked[c] - slots), same.index(c)))
        for c in same:
            if c != keep:
                out[c] = (slots, f"{c} resolves to {slots} slots, the same as {keep}")
    return out


def expand(suite: Suite, infos: dict[str, TraceInfo]) -> Plan:
    """Every grid point, run or skipped with its reason, in config order."""
    runs: list[Run] = []
    skipped: list[Skip] = []
    probe = Probe(suite.settings)
    for ti, tspec in enumerate(suite.traces):
        info = infos[tspec.name]
        for si, scope in enumerate(suite.scopes):
            scope_why = ("the trace has one MoE layer: global scope is the same as layer scope"
                         if scope == "global" and info.dims[0] == 1 and "layer" in suite.scopes else None)
            caps = _capacity_skips(suite.capacities, info.dims, scope)
            for ci, cap in enumerate(suite.capacities):
                slots, cap_why = caps[cap]
                for pi, pol in enumerate(suite.policies):
                    for qi, pred in enumerate(suite.predictors):
                        for di, depth in enumerate(suite.depths):
                            cfg = Config(tspec.name, scope, cap, pol, pred, depth)
                            order = (ti, si, ci, pi, qi, di)
                            why = scope_why or cap_why or next(
                                (r for r, test in SKIP_RULES if test(pol, pred, depth)), None) \
                                or probe(info.dims, pol, pred, depth)
                            if why:
                                skipped.append(Skip(cfg, why, order))
                                continue
                            assert slots is not None  # no slots is a capacity skip above
                            runs.append(Run(cfg, row_key(cfg, slots, info, suite.settings), slots, order))
    return Plan(suite, infos, runs, skipped)


def plan_suite(suite: Suite) -> Plan:
    infos = {t.name: describe_trace(t, suite.settings) for t in suite.traces}
    return expand(suite, infos)


# -- one run -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    key: str
    trace: TraceSpec
    identity: str
    settings: Settings
    config: Config
    slots: int
    engine: str = "auto"   # not part of the key: the engines give identical rows


def run_task(task: Task) -> tuple[str, dict[str, Any], float]:
    """Replay one configuration; returns ``(key, row, seconds)``. Runs in a worker process."""
    from ..policies import new_policy
    from .engine_cpp import choose_engine
    from .replay import simulate

    t0 = time.perf_counter()
    prep = prepare(task.trace, task.settings, task.identity)
    cfg, s, st = task.config, prep.schedule, task.settings
    policy = new_policy(cfg.policy.name, task.slots, s.num_layers, s.num_experts, top_k=s.top_k, scope=cfg.scope,
                        **cfg.policy.kwargs())
    if policy.needs_fit:
        policy.fit(prep.counts)
    pred = prep.predictor(cfg.predictor)
    engine = choose_engine(task.engine, policy, pred, cfg.depth, prefetch=st.prefetch_rule, miss_rule=st.miss_rule)
    res = simulate(s, policy, pred, depth=cfg.depth, prefetch=st.prefetch_rule, budget=st.prefetch_budget,
                   hardware=prep.hardware, miss_rule=st.miss_rule, capacity_label=cfg.capacity, engine=engine)
    row = res.row()
    row["policy_detail"], row["predictor_detail"] = row["policy"], row["predictor"]
    row.update(policy=cfg.policy.label, predictor=NONE if cfg.predictor is None else cfg.predictor.label,
               depth=cfg.depth, fit=prep.fit_note, engine=engine, key=task.key)
    return task.key, row, time.perf_counter() - t0


# -- the journal -------------------------------------------------------------------------------------------

class Journal:
    """Append-only JSON lines ``{"key", "row", "seconds"}``, each flushed and fsynced as it is written."""

    def __init__(self, path: str):
        self.path = path
        self.torn = 0
        self._dir_synced = False

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by key (the first of a key wins). A torn last line is dropped and the file cut back to the
        last complete line, so appends continue cleanly; a bad complete line is an error."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a kill mid-write leaves a prefix without its newline
            self.torn += 1
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        out: dict[str, dict[str, Any]] = {}
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                key, _row = rec["key"], rec["row"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise MoecacheError(f"{self.path}:{n}: not a suite row record; delete that line (or the file, to "
                                    "recompute everything) and run again") from None
            out.setdefault(key, rec)
        return out

    def append(self, key: str, row: dict[str, Any], seconds: float) -> None:
        line = json.dumps({"key": key, "row": row, "seconds": round(seconds, 4)}, sort_keys=True, allow_nan=False)
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if not self._dir_synced:  # the file's own entry in its folder, once (it may have just been created)
            from ..atomic import fsync_dir

            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self._dir_synced = True


class _DirLock:
    """One suite run per output folder at a time (an advisory lock on its journal)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, JOURNAL)
        self.fd: int | None = None

    def __enter__(self) -> "_DirLock":
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise MoecacheError(f"another suite run is writing {os.path.dirname(self.path)}; wait for it or use "
                                "another -o folder") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)


# -- running -----------------------------------------------------------------------------------------------

@dataclass
class SuiteResult:
    plan: Plan
    rows: list[dict[str, Any]]
    computed: int
    loaded: int
    stale: int
    torn: int
    files: list[str]
    seconds: float


def _watch_parent(parent: int) -> None:
    """Worker initializer: exit when the main process is gone. A killed sweep (SIGKILL: no cleanup) would
    otherwise leave its workers blocked on the task queue forever."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="suite-parent-watch", daemon=True).start()


def _execute(tasks: list[Task], jobs: int, done: Callable[[str, dict[str, Any], float], None]) -> None:
    """Run tasks in this process (jobs 1) or in ``jobs`` worker processes; ``done`` gets each result as it
    comes. The journal is only written here, in the main process."""
    if jobs <= 1 or len(tasks) < 2:
        for t in tasks:
            done(*run_task(t))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: fresh interpreters, no fork of a process holding threads (progress bar, torch)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_watch_parent, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(run_task, t) for t in tasks]
        for f in as_completed(futures):
            done(*f.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_suite(config: str | os.PathLike, out: str | os.PathLike, *, jobs: int = 1, progress: bool = False,
              engine: str = "auto", command: str | None = None,
              log: Callable[[str], None] | None = None) -> SuiteResult:
    """Plan, run what the journal in ``out`` lacks (in ``jobs`` processes, on ``engine`` as
    ``moecache.sim.engine_cpp.choose_engine`` takes it), and write the outputs."""
    t_start = time.time()
    log = log or (lambda msg: None)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 processes, got {jobs}")
    from .engine_cpp import ENGINES

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    suite = load_config(config)
    if suite.plots:
        from .suite_plots import require_matplotlib

        require_matplotlib()
    plan = plan_suite(suite)
    for t in suite.traces:
        log(f"{t.name}: {plan.infos[t.name].fit_note}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    journal = Journal(os.path.join(out, JOURNAL))
    with _DirLock(out):
        have = journal.load()
        wanted = {r.key for r in plan.runs}
        loaded = sum(1 for k in have if k in wanted)
        stale = len(have) - loaded
        todo = [Task(r.key, _spec(suite, r.config.trace), plan.infos[r.config.trace].identity, suite.settings,
                     r.config, r.slots, engine) for r in plan.runs if r.key not in have]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.runs), initial=loaded, desc="suite", unit="run", disable=not progress)

        def done(key: str, row: dict[str, Any], seconds: float) -> None:
            journal.append(key, row, seconds)
            bar.set_postfix_str(f"{row['trace']} {row['scope']} {row['capacity_label']} {row['policy']}", refresh=False)
            bar.update(1)

        try:
            _execute(todo, jobs, done)
        finally:
            bar.close()
        records = journal.load()
    rows = [records[r.key]["row"] for r in plan.runs]
    from .suite_report import write_outputs

    files = write_outputs(out, plan, rows)
    seconds = time.time() - t_start
    meta = _meta(plan, records, command, computed=len(todo), loaded=loaded, stale=stale, torn=journal.torn,
                 seconds=round(seconds, 1))
    meta["runs"] = _history(os.path.join(out, "meta.json")) + [
        {k: meta[k] for k in ("date", "command", "commit", "computed", "loaded", "seconds")}]
    from ..atomic import write_json_atomic

    write_json_atomic(os.path.join(out, "meta.json"), meta)
    return SuiteResult(plan, rows, len(todo), loaded, stale, journal.torn, files + [os.path.join(out, "meta.json")],
                       seconds)


def _spec(suite: Suite, name: str) -> TraceSpec:
    return next(t for t in suite.traces if t.name == name)


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + working tree changes" if dirty else "")


def _history(path: str) -> list[dict[str, Any]]:
    """The finished runs an earlier meta.json of this folder lists (a resumed sweep keeps its whole story;
    a run killed before its end wrote none: its rows' seconds are in the journal)."""
    try:
        with open(path) as f:
            runs = json.load(f).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return runs if isinstance(runs, list) else []


def _meta(plan: Plan, records: dict[str, dict[str, Any]], command: str | None, **counts: Any) -> dict[str, Any]:
    secs = [(records[r.key].get("seconds", 0.0), r.config.label, r.config.trace, r.config.scope, r.config.capacity)
            for r in plan.runs]
    suite = plan.suite
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "command": command or " ".join(sys.argv),
        "commit": _git_commit(),
        "config": {"path": suite.source, "sha256_16": suite.digest},
        "fit": {t.name: plan.infos[t.name].fit_note for t in suite.traces},
        "rows": len(plan.runs), "skipped": len(plan.skipped), **counts,
        "seconds_per_row_total": round(sum(s[0] for s in secs), 1),
        "slowest": [{"seconds": s, "config": c, "trace": t, "scope": sc, "capacity": cap}
                    for s, c, t, sc, cap in sorted(secs, key=lambda x: -x[0])[:5]],
    }
