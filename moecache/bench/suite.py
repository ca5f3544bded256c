"""The policy benchmark suite: ``moecache bench --suite CONFIG -o DIR``.

A suite replays a grid of configurations (traces x scopes x capacities x expert formats x policies x
predictors x prefetch depths) through the simulator and writes tables and plots of demand hit rate, ready rate,
bytes per token and estimated ms per token, each also as a ratio to its bound.

**Config**: ``moecache.bench.config`` (TOML or JSON; relative paths start at the config
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

Planning: ``moecache.bench.plan``; journal and lock: ``moecache.bench.journal``.

Outputs in DIR (``moecache.bench.report``): ``results.md``, ``results.csv``, ``skipped.csv``,
``<metric>.png`` and ``<metric>_ratio.png`` for the four metrics (``moecache.bench.plots``), ``meta.json`` and
the journal ``rows.jsonl``.
Engine: each run goes through ``moecache.sim.engine_cpp.choose_engine`` and ``simulate``, as
``moecache bench`` does (``--sim-engine``, default auto: the C++ core where it is built and supports the
configuration, else the Python reference); each row names its engine. The engines give identical rows,
so the engine is not part of a row's key.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from ..errors import ConfigError
from ..policies import new_policy
from ..sim.engine_cpp import ENGINES, choose_engine
from ..sim.simulator import simulate
from .config import BF16, NONE, Settings, Suite, TraceSpec, format_label, load_config
from .journal import JOURNAL, DirLock, Journal
from .plan import Config, Plan, format_hardware, plan_suite, prepare
from .plots import require_matplotlib
from .report import write_outputs


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
                   hardware=format_hardware(prep.hardware, cfg.fmt), miss_rule=st.miss_rule,
                   capacity_label=cfg.capacity, engine=engine, copy_queue=st.copy_queue)
    row = res.row()
    if cfg.fmt != BF16:
        row["expert_format"] = format_label(cfg.fmt)
    row["policy_detail"], row["predictor_detail"] = row["policy"], row["predictor"]
    row.update(policy=cfg.policy.label, predictor=NONE if cfg.predictor is None else cfg.predictor.label,
               depth=cfg.depth, fit=prep.fit_note, engine=engine, key=task.key)
    return task.key, row, time.perf_counter() - t0


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
              log: Callable[[str], None] | None = None, ray: bool = False, ray_address: str | None = None,
              ray_traces: str = "auto") -> SuiteResult:
    """Plan, run what the journal in ``out`` lacks (in ``jobs`` processes, or as Ray tasks with ``ray``
    on a local instance or the cluster at ``ray_address``: ``moecache.bench.ray``; on ``engine`` as
    ``moecache.sim.engine_cpp.choose_engine`` takes it), and write the outputs."""
    t_start = time.time()
    log = log or (lambda msg: None)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 processes, got {jobs}")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if ray:  # Ray is an optional extra: imported only when asked for
        from .ray import TRACE_TRANSPORTS, check_reachable, execute_ray, require_ray

        require_ray()
        if ray_traces not in TRACE_TRANSPORTS:
            raise ConfigError(f"unknown --ray-traces {ray_traces!r}; valid: {', '.join(TRACE_TRANSPORTS)}")
        if ray_address is not None:
            check_reachable(ray_address)
    suite = load_config(config)
    if suite.plots:
        require_matplotlib()
    plan = plan_suite(suite)
    for t in suite.traces:
        log(f"{t.name}: {plan.infos[t.name].fit_note}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    journal = Journal(os.path.join(out, JOURNAL))
    with DirLock(out):
        have = journal.load()
        wanted = {r.key for r in plan.runs}
        loaded = sum(1 for k in have if k in wanted)
        stale = len(have) - loaded
        todo = [Task(r.key, _spec(suite, r.config.trace), plan.infos[r.config.trace].identity, suite.settings,
                     r.config, r.slots, engine) for r in plan.runs if r.key not in have]
        bar = tqdm(total=len(plan.runs), initial=loaded, desc="suite", unit="run", disable=not progress)

        def done(key: str, row: dict[str, Any], seconds: float) -> None:
            journal.append(key, row, seconds)
            bar.set_postfix_str(f"{row['trace']} {row['scope']} {row['capacity_label']} {row['policy']}", refresh=False)
            bar.update(1)

        try:
            if ray:
                execute_ray(todo, run_task, done, address=ray_address, traces=ray_traces, progress=bar, log=log)
            else:
                _execute(todo, jobs, done)
        finally:
            bar.close()
        records = journal.load()
    rows = [records[r.key]["row"] for r in plan.runs]
    files = write_outputs(out, plan, rows)
    seconds = time.time() - t_start
    meta = _meta(plan, records, command, computed=len(todo), loaded=loaded, stale=stale, torn=journal.torn,
                 seconds=round(seconds, 1))
    meta["runs"] = _history(os.path.join(out, "meta.json")) + [
        {k: meta[k] for k in ("date", "command", "commit", "computed", "loaded", "seconds")}]
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
