"""Does prefetch ever cost time? Every prefetching configuration of the suite against the same policy without it.

    python eval/prefetch_admission.py [--suite eval/suite.toml] [--traces NAME ...] [--jobs 2]
                                      [--out eval/results/prefetch_admission]

Reads the suite (``eval/suite.toml``: its traces, built by ``eval/suite_traces.py``, their fit/score
split, capacities, scopes, miss rule and hardware profile), takes its online policies (the offline
bounds run demand-only) and its predictors plus ``learned`` (fitted on the fit part like the others:
every predictor but ``temporal``'s warm start is scored on routing it was not fitted on), and replays
every configuration that prefetches (depth >= 1) and its partner without prefetch: the same policy at
the same capacity and scope with no predictor, or, for a policy that evicts by predictions
(``predicted``), the same predictor at depth 0. Prefetches pass the shared admission rule
(``moecache.admission``, the simulator's default, ``gated``: each copy weighed, and the predictor gate not
asking the predictor at layers whose prefetches do not pay for its host time; the tables count the
predictor's calls and the layer visits it skipped). The goal (issue 17): no prefetching configuration
more than 2% slower than its partner, on every trace and capacity. The simulator's copy model is the suite's
(``copy_queue``, default ``worker``: the runtime's copy worker) unless ``--copy-queue`` says otherwise; the
report states it. Writes ``OUT.json`` (every pair)
and ``OUT.md`` (the worst pair per trace and capacity, and every pair over the goal), with machine,
date and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moecache.admission import DEFAULT_ADMISSION  # noqa: E402
from moecache.atomic import write_text_atomic  # noqa: E402
from moecache.bench.config import Spec, load_config  # noqa: E402
from moecache.bench.plan import Config, plan_suite, policy_class  # noqa: E402
from moecache.bench.suite import Task, run_task  # noqa: E402
from moecache.sim.copy_queue import COPY_QUEUES  # noqa: E402

GOAL = 1.02


def _run(task: Task) -> tuple[str, dict, float]:
    return run_task(task)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default=os.path.join(HERE, "suite.toml"))
    ap.add_argument("--traces", nargs="*", help="suite trace names (default: every one)")
    ap.add_argument("--no-learned", action="store_true", help="leave the learned predictor out")
    ap.add_argument("--policies", nargs="*", help="a subset of the suite's online policies (default: all)")
    ap.add_argument("--predictors", nargs="*", help="a subset of the predictors (default: the suite's + learned)")
    ap.add_argument("--capacities", nargs="*", help="a subset of the suite's capacities")
    ap.add_argument("--scopes", nargs="*", help="a subset of the suite's scopes")
    ap.add_argument("--copy-queue", choices=COPY_QUEUES,
                    help="the simulator's copy model (default: the suite's, whose default is worker, the runtime's "
                    "copy worker; fifo: every copy in issue order)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prefetch_admission"))
    args = ap.parse_args(argv)

    suite = load_config(args.suite)
    traces = [t for t in suite.traces if not args.traces or t.name in args.traces]
    unknown = set(args.traces or ()) - {t.name for t in suite.traces}
    if unknown:
        raise SystemExit(f"unknown trace(s) {sorted(unknown)}; the suite has {[t.name for t in suite.traces]}")
    missing = [t.path for t in traces if not os.path.isdir(t.path)]
    if missing:
        raise SystemExit(f"trace {missing[0]} not built: run eval/suite_traces.py first")
    preds = list(suite.predictors) + ([] if args.no_learned else [Spec("learned")])
    if args.predictors:
        preds = [None] + [p for p in preds if p is not None and p.name in args.predictors]
    pols = [p for p in suite.policies if not policy_class(p).offline and (not args.policies or p.name in args.policies)]
    if args.copy_queue:
        suite = dataclasses.replace(suite, settings=dataclasses.replace(suite.settings, copy_queue=args.copy_queue))
    suite = dataclasses.replace(suite, traces=traces, predictors=preds, policies=pols,
                                capacities=[c for c in suite.capacities if not args.capacities or c in args.capacities],
                                scopes=[c for c in suite.scopes if not args.scopes or c in args.scopes])
    plan = plan_suite(suite)
    spec = {t.name: t for t in traces}
    tasks = [Task(r.key, spec[r.config.trace], plan.infos[r.config.trace].identity, suite.settings, r.config,
                  r.slots) for r in plan.runs]
    t0 = time.time()
    rows: dict[Config, dict] = {}
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        by_key = {t.key: t for t in tasks}
        for i, (key, row, _s) in enumerate(pool.map(_run, tasks, chunksize=8), 1):
            rows[by_key[key].config] = row
            if i % 10 == 0 or i == len(tasks):
                print(f"  {i}/{len(tasks)} runs ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.time() - t0

    pairs = []
    for cfg, row in rows.items():
        if cfg.depth == 0:
            continue
        uses_scores = policy_class(cfg.policy).uses_scores
        base = dataclasses.replace(cfg, predictor=cfg.predictor if uses_scores else None, depth=0)
        if base not in rows:
            continue
        b = rows[base]
        pairs.append({
            "trace": cfg.trace, "capacity": cfg.capacity, "scope": cfg.scope, "policy": cfg.policy.label,
            "predictor": cfg.predictor.label, "depth": cfg.depth, "ms_per_token": row["est_ms_per_token"],
            "baseline_ms_per_token": b["est_ms_per_token"], "ratio": row["time_ms"] / b["time_ms"],
            "prefetches": row["prefetches"], "prefetch_refused": row.get("prefetch_refused", 0),
            "prefetch_used": row["prefetch_used"], "predictor_calls": row.get("predictor_calls"),
            "predictor_skipped": row.get("predictor_skipped"), "layers_off": row.get("layers_off")})
    worst: dict[tuple[str, str], dict] = {}
    for p in pairs:
        k = (p["trace"], p["capacity"])
        if k not in worst or p["ratio"] > worst[k]["ratio"]:
            worst[k] = p
    over = sorted((p for p in pairs if p["ratio"] > GOAL), key=lambda p: -p["ratio"])
    best = defaultdict(float)
    for p in pairs:
        best[(p["trace"], p["capacity"])] = min(best[(p["trace"], p["capacity"])] or 9e9, p["ratio"])
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
                       f"{os.cpu_count()} CPUs", "jobs": args.jobs,
            "command": "python eval/prefetch_admission.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(seconds, 1), "runs": len(tasks), "pairs": len(pairs), "goal": GOAL,
            "copy_queue": suite.settings.copy_queue,
            "hardware": {t: plan.infos[t].hardware_text for t in spec},
            "fit": {t: plan.infos[t].fit_note for t in spec}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_text_atomic(args.out + ".json", json.dumps({"meta": meta, "pairs": pairs}, indent=1) + "\n")
    helped = sum(1 for p in pairs if p["ratio"] < 1.0)
    lines = ["# Prefetch against no prefetch, every suite trace and capacity "
             f"(admission rule `{DEFAULT_ADMISSION}`)", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{meta['command']}` "
             f"({meta['seconds']:.0f} s, {len(tasks)} replays, {args.jobs} processes)",
             "- estimated ms/token from the simulator's timing model with the suite's hardware profile "
             "(the default profile, scaled to each trace's expert size); not a GPU run; copy model "
             f"`{suite.settings.copy_queue}`" + (" (the runtime's copy worker)" if suite.settings.copy_queue == "worker"
                                                 else " (every copy in issue order)"),
             "- pair: a prefetching configuration (online policy, predictor, depth 1-2, scope) and the same policy "
             "at the same capacity and scope without prefetch (`predicted`: the same predictor at depth 0); "
             "ratio = prefetching time / partner time; goal: every ratio <= 1.02",
             f"- predictors fitted on the fit part and scored on held-out routing: "
             f"{', '.join(p.label for p in preds if p is not None)}; policies: "
             f"{', '.join(p.label for p in pols)}; capacities: {', '.join(suite.capacities)}; "
             f"scopes: {', '.join(suite.scopes)}", "",
             f"**{len(over)} of {len(pairs)} pairs over the goal.** {helped} of {len(pairs)} faster than without "
             "prefetch.", "",
             "| trace | capacity | worst pair | ratio | best ratio | prefetches issued / refused | "
             "predictor asked / skipped (layers off at the end) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (tr, cap), p in sorted(worst.items()):
        lines.append(f"| {tr} | {cap} | {p['policy']} ({p['scope']}) + {p['predictor']} D={p['depth']} | "
                     f"{p['ratio']:.4f} | {best[(tr, cap)]:.4f} | {p['prefetches']:,} / {p['prefetch_refused']:,} | "
                     + (f"{p['predictor_calls']:,} / {p['predictor_skipped']:,} ({p['layers_off']}) |"
                        if p.get("predictor_calls") is not None else "every layer |"))
    if over:
        lines += ["", "## Pairs over the goal", "", "| trace | capacity | scope | policy | predictor | depth | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p['trace']} | {p['capacity']} | {p['scope']} | {p['policy']} | {p['predictor']} | "
                  f"{p['depth']} | {p['ratio']:.4f} |" for p in over]
    lines += ["", "## Fit / score split", ""] + [f"- {t}: {n}" for t, n in meta["fit"].items()]
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines[9:9 + len(worst) + 3]))
    return 0 if not over else 1


if __name__ == "__main__":
    raise SystemExit(main())
