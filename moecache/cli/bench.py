"""``moecache bench``: replay routing traces through cache policies (and a predictor) and report.

One run per (trace, scope, capacity, policy); each prints one row with its whole configuration,
the hit and ready rates, prefetch precision and recall, bytes moved, and the timing model's ms per
token against the lower bound. ``--list`` names every policy, predictor, prefetch rule and miss rule.
``--suite CONFIG -o DIR`` runs a whole grid from a config instead, resumable, with tables and plots
(``moecache.bench``).

Fitting: static placement and learned predictors are fitted on ``--fit TRACE``; without it, on the
leading ``--fit-share`` of each trace's sequences, which are then not scored (by any run of that
trace, so all rows of a trace score the same tokens). The share used is stated on stderr and in
every JSON row (``fit``).

Engines: ``--sim-engine cpp`` replays in the compiled core (csrc/sim/, results identical to the
Python reference), ``--sim-engine python`` in the reference; the default ``auto`` takes cpp where the
extension is built and the configuration is supported (every registered policy and prefetch rule;
predictors prior, temporal and transition run in the core, the others stream their predictions
from Python: ``moecache.sim.engine_cpp``), else python. Every JSON row names its ``engine`` and the
table's footer counts them. Runs go in ``--jobs`` threads (the C++ core releases the GIL).

Copy model: ``--copy-queue worker`` (the default) replays the runtime's copy worker (prefetches queued by
priority, the unneeded ones cancelled at their target layer, demand copies ahead of them), ``fifo`` every copy
in issue order (``moecache.sim.copy_queue``); without prefetch both give the same rows but for a scan policy's
host time. Every JSON row names its ``copy_queue`` and the table's footer states it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import sys
from typing import Any

from ..admission import ADMISSIONS, DEFAULT_ADMISSION, check_admission
from ..errors import ConfigError
from ..registry import split_spec
from .options import DeprecatedFlag

#: ``moecache.sim.engine_cpp.ENGINES``, spelled out so that building the parser imports no simulator.
SIM_ENGINES = ("auto", "python", "cpp")
#: ``moecache.sim.copy_queue.COPY_QUEUES`` (the default first), spelled out for the same reason.
COPY_QUEUES = ("worker", "fifo")


def _parse_policy(spec: str) -> tuple[str, dict[str, str]]:
    """``name`` or ``name:key=value:key=value``."""
    return split_spec(spec, "policy parameter")


def _parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _scopes(text: str) -> list[str]:
    from ..policies import SCOPES

    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in SCOPES]
    if bad or not out:
        raise ConfigError(f"unknown scope(s) {bad or text!r}; valid: {', '.join(SCOPES)} (comma-separated for both)")
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from ..policies import POLICIES
    from ..predictors import PREDICTORS
    from ..cost import MISS_RULES
    from ..sim import PREFETCH_RULES

    tables = {"policies": POLICIES, "predictors": PREDICTORS, "prefetch_rules": PREFETCH_RULES,
              "miss_rules": MISS_RULES}
    listing = {k: {n: reg.describe(n) for n in reg.names()} for k, reg in tables.items()}
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    for i, (k, items) in enumerate(listing.items()):
        if i:
            print()
        print(k.replace("_", " ") + ":")
        width = max(len(n) for n in items) if items else 0
        for n, d in items.items():
            print(f"  {n.ljust(width)}  {d}")
    return 0


def _dims(trace: Any) -> tuple[int, int, int]:
    m = trace.meta
    return m.num_layers, m.num_experts, m.top_k


def _split_fit(trace: Any, share: float) -> tuple[Any, Any, str]:
    seqs = trace.sequences()
    n_fit = int(math.floor(len(seqs) * share))
    if n_fit < 1 or n_fit >= len(seqs):
        raise ConfigError(f"{trace.path or 'trace'}: cannot fit on the leading {share:.0%} of {len(seqs)} sequence(s) "
                          "and score the rest; pass --fit OTHER_TRACE or change --fit-share")
    fit = trace.select_sequences(seqs[:n_fit])
    score = trace.select_sequences(seqs[n_fit:])
    return fit, score, f"leading {share:.0%} of sequences ({n_fit} of {len(seqs)}), not scored"


def fit_depth_params(pred_cls: Any, params: dict[str, Any], depth: int, policies: list[tuple[str, dict]],
                     num_layers: int) -> dict[str, Any]:
    """``params`` with ``max_depth`` raised to the deepest prediction the runs will ask for.

    A fitted predictor (``learned``, ``transition``) only answers depths up to its ``max_depth``; the
    runs ask for ``1..depth`` (prefetch) and, for a policy with scores (``predicted``), its
    ``score_depth`` (a whole token ahead: ``num_layers``). Without an explicit ``max_depth`` it is
    raised to cover them; an explicit one that is too shallow is refused here, before any fitting.
    """
    from ..policies import POLICIES

    if "max_depth" not in inspect.signature(pred_cls.__init__).parameters:
        return params
    need = depth
    for name, pparams in policies:
        cls = POLICIES.get(name)
        if cls.uses_scores:
            # a throwaway instance of the run's shape answers score_depth (one slot, one expert)
            need = max(need, int(cls(1, num_layers, 1, **pparams).score_depth() or 0))
    if need <= 0:
        return params
    if "max_depth" in params:
        if int(params["max_depth"]) < need:
            raise ConfigError(f"--predictor-param max_depth={params['max_depth']} is below the depth {need} the runs "
                              f"ask for (prefetch depth {depth}; 'predicted' wants a whole token, {num_layers} layers); "
                              f"pass max_depth={need} or leave it out")
        return params
    default = inspect.signature(pred_cls.__init__).parameters["max_depth"].default
    return {**params, "max_depth": max(int(default), need)}


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..policies import POLICIES, new_policy
    from ..predictors import PREDICTORS
    from ..cost import MISS_RULES, default_profile, load_profile
    from ..sim import PREFETCH_RULES, Schedule, format_table, parse_capacities, resolve_capacity, simulate
    from ..cost.hardware import slots_for_format, with_format
    from ..miss_precision import resolve_rule, slots_with_landing
    from ..quant import resolve_format
    from ..sim.engine_cpp import choose_engine
    from ..trace import count_ids, open_trace

    from .. import validate as V

    for flag, value in (("--hardware", args.hardware), ("--suite", args.suite)):
        if value:
            V.input_file(flag, value)  # before anything opens it: a pipe would block
    V.count("--jobs", args.jobs, minimum=1)
    check_admission(args.admission)
    if args.list:
        return cmd_list(args)
    if (args.suite or args.out) and args.copy_queue is not None:
        raise ConfigError(f"--copy-queue {args.copy_queue} applies to trace runs; a suite takes its copy model from "
                          f"its config (copy_queue = \"{args.copy_queue}\"): set it there and drop --copy-queue")
    if (args.suite or args.out) and args.admission != DEFAULT_ADMISSION:
        raise ConfigError(f"--admission {args.admission} applies to trace runs; a suite runs the default admission "
                          f"({DEFAULT_ADMISSION}): drop --admission or run the traces without --suite/-o")
    if args.suite or args.out:
        return cmd_suite(args)
    copy_queue = args.copy_queue or COPY_QUEUES[0]
    if args.ray is not None:
        raise ConfigError("--ray runs a suite's grid: give --suite CONFIG -o DIR with it")
    if not args.traces:
        raise ConfigError("give at least one TRACE folder (convert published logs with `moecache trace import`), "
                          "or --list")
    policies = [_parse_policy(s) for s in args.policies.split(",") if s.strip()]
    if not policies:
        raise ConfigError("--policies is empty; e.g. --policies lru,lfu,belady (see --list)")
    for name, params in policies:
        POLICIES.get(name)
    MISS_RULES.get(args.miss_rule)
    PREFETCH_RULES.get(args.prefetch_rule)
    pred_cls = PREDICTORS.get(args.predictor) if args.predictor else None
    pred_params = _parse_kv(args.predictor_param, "--predictor-param")
    depth = args.prefetch_depth if args.prefetch_depth is not None else (1 if pred_cls else 0)
    if depth and pred_cls is None:
        raise ConfigError(f"--prefetch-depth {depth} needs --predictor NAME (see --list)")
    low_rule = resolve_rule(args.low_precision_misses, args.low_precision_below,
                            args.group_size) if args.low_precision_misses else None
    fmt = resolve_format(args.expert_dtype, None if low_rule is not None else args.group_size)
    if fmt is None and args.expert_dtype.lower() not in ("bf16", "bfloat16", "auto"):
        raise ConfigError(f"--expert-dtype {args.expert_dtype}: the timing model's experts are bf16; "
                          "use bf16, int8 or int4")
    if low_rule is not None and fmt is not None:
        raise ConfigError(f"--low-precision-misses copies a lower-precision version of bf16 experts; the experts are "
                          f"already {fmt.describe()}: drop --expert-dtype {args.expert_dtype} or --low-precision-misses")
    if low_rule is not None and args.miss_rule != "copy":
        raise ConfigError(f"--low-precision-misses chooses how a miss is copied; it runs with --miss-rule copy, "
                          f"not {args.miss_rule!r}")
    if low_rule is not None and args.sim_engine == "cpp":
        from ..sim.engines import PRECISION_WHY
        raise ConfigError(f"--sim-engine cpp cannot run --low-precision-misses: {PRECISION_WHY}; use --sim-engine "
                          "python or auto")
    scopes = _scopes(args.scope)
    caps = parse_capacities(args.capacity)
    needs_fit = any(POLICIES.get(n).needs_fit for n, _ in policies) or bool(pred_cls and pred_cls.needs_fit)
    if not 0.0 < args.fit_share < 1.0:
        raise ConfigError(f"--fit-share must be in (0, 1), got {args.fit_share}")
    fit_trace = open_trace(args.fit) if args.fit else None

    # Plan every run first, so the progress bar knows the total.
    plans = []
    for path in args.traces:
        trace = open_trace(path)
        name = os.path.basename(os.path.normpath(trace.path or path))
        fit_note = None
        fitting = None
        if needs_fit:
            if fit_trace is not None:
                if _dims(fit_trace) != _dims(trace):
                    raise ConfigError(f"--fit trace has {_dims(fit_trace)} (layers, experts, top_k) but {name} has "
                                      f"{_dims(trace)}; fit on a trace of the same model")
                fitting, fit_note = fit_trace, f"--fit {args.fit}"
            else:
                fitting, trace, fit_note = _split_fit(trace, args.fit_share)
            print(f"moecache bench: {name}: fitted on {fit_note}", file=sys.stderr)
        bpe = args.bytes_per_expert or trace.meta.bytes_per_expert
        hw = load_profile(args.hardware, bpe) if args.hardware else default_profile(bpe)
        hw = with_format(hw, fmt, args.pool_mode)
        sched = Schedule(trace, decode_stream=args.decode_stream, name=name)
        if low_rule is not None and not sched.has_weights:
            raise ConfigError(f"--low-precision-misses needs gate weights and trace {name} records none; "
                              "use a trace recorded with weights, or leave --low-precision-misses out")
        # The low copies' landing (top_k rows, as the runtime builds it) comes out of the same memory.
        low_bytes = with_format(hw, low_rule.fmt, "expanded").copy_bytes if low_rule is not None else 0
        predictor = None
        if pred_cls is not None:
            L, E, K = _dims(trace)
            predictor = pred_cls(L, E, K, **fit_depth_params(pred_cls, pred_params, depth, policies, L))
            if predictor.needs_fit:
                predictor.fit(fitting)
        counts = count_ids(fitting) if fitting is not None else None
        for scope in scopes:
            for cap in caps:
                slots = resolve_capacity(cap, *_dims(trace), scope)
                L_, E_, _k = _dims(trace)
                if low_rule is not None:
                    slots = max(_k, slots_with_landing(slots, L_ if scope == "layer" else 1, _k, hw.bytes_per_expert,
                                                       low_bytes))
                else:
                    slots = max(_k, slots_for_format(slots, E_ if scope == "layer" else L_ * E_, hw, args.pool_mode))
                for pname, params in policies:
                    plans.append((sched, hw, predictor, counts, fit_note, scope, cap, slots, pname, params))

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 threads, got {args.jobs}")
    bar = tqdm(total=len(plans), desc="bench", unit="run", disable=args.quiet or not sys.stderr.isatty())

    def run(plan: tuple) -> dict[str, Any]:
        sched, hw, predictor, counts, fit_note, scope, cap, slots, pname, params = plan
        L, E, K = sched.num_layers, sched.num_experts, sched.top_k
        policy = new_policy(pname, slots, L, E, top_k=K, scope=scope, **params)
        if policy.needs_fit:
            policy.fit(counts)
        pred = copy.deepcopy(predictor) if predictor is not None else None
        engine = "python" if low_rule is not None else \
            choose_engine(args.sim_engine, policy, pred, depth, args.prefetch_rule, args.miss_rule)
        res = simulate(sched, policy, pred, depth=depth, prefetch=args.prefetch_rule, budget=args.prefetch_budget,
                       hardware=hw, miss_rule=args.miss_rule, capacity_label=cap, engine=engine,
                       miss_precision=low_rule, admission=args.admission, copy_queue=copy_queue)
        row = res.row()
        row["fit"] = fit_note
        row["engine"] = engine
        bar.set_postfix_str(f"{sched.name} {scope} {cap} {pname}")
        bar.update(1)
        return row

    # The C++ engine releases the GIL during a replay, so runs in threads go in parallel.
    if args.jobs == 1 or len(plans) < 2:
        rows = [run(plan) for plan in plans]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(run, plans))  # results in plan order
    bar.close()

    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        hws = sorted({r["hardware"] for r in rows})
        engines = ", ".join(f"{e} ({sum(r['engine'] == e for r in rows)} runs)"
                            for e in sorted({r["engine"] for r in rows}))
        print(f"\nhardware: {'; '.join(hws)}; miss rule {args.miss_rule}; copy model {copy_queue}; "
              f"{'decode stream' if args.decode_stream else 'batched steps as recorded'}; engine {engines}")
    return 0


#: ``--ray`` without an address: start a local Ray instance.
RAY_LOCAL = "local"


def cmd_suite(args: argparse.Namespace) -> int:
    """``--suite CONFIG -o DIR``: the resumable grid of ``moecache.bench`` (its traces come from the config)."""
    from ..bench import run_suite

    if not (args.suite and args.out):
        raise ConfigError("a suite needs both --suite CONFIG and -o DIR (the folder for its rows, tables and plots)")
    if args.traces:
        raise ConfigError("--suite takes its traces from the config; give no TRACE arguments")
    use_ray = args.ray is not None
    address = None if args.ray in (None, RAY_LOCAL) else args.ray
    where = (f"--ray{'' if address is None else ' ' + address} --ray-traces {args.ray_traces}" if use_ray
             else f"--jobs {args.jobs}")
    command = f"moecache bench --suite {args.suite} -o {args.out} {where} --sim-engine {args.sim_engine}"
    res = run_suite(args.suite, args.out, jobs=args.jobs, progress=not args.quiet and sys.stderr.isatty(),
                    engine=args.sim_engine, command=command,
                    log=lambda msg: print(f"moecache bench: {msg}", file=sys.stderr),
                    ray=use_ray, ray_address=address, ray_traces=args.ray_traces)
    print(f"{len(res.rows)} configurations: {res.computed} computed now, {res.loaded} loaded from "
          f"{args.out}/rows.jsonl" + (f" ({res.torn} torn line dropped)" if res.torn else "")
          + f"; {len(res.plan.skipped)} combinations skipped (see results.md); {res.seconds:.0f} s")
    print("wrote " + ", ".join(res.files))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="replay traces through cache policies: hit rates, bytes moved, estimated ms/token",
        description="Replay routing traces through expert-cache policies (optionally with a predictor that "
                    "prefetches D MoE layers ahead) and report demand hit rate, ready rate, prefetch precision "
                    "and recall, bytes moved and the timing model's ms/token against its lower bound.")
    p.add_argument("traces", nargs="*", metavar="TRACE", help="moecache trace folder(s)")
    p.add_argument("--list", action="store_true", help="name every policy, predictor, prefetch rule and miss rule")
    p.add_argument("--policies", default="lru,belady",
                   help="comma-separated policies, each NAME or NAME:key=value[:key=value] (default lru,belady)")
    p.add_argument("--predictor", metavar="NAME", help="predictor for prefetching and the 'predicted' policy")
    p.add_argument("--predictor-param", action="append", metavar="KEY=VALUE", help="predictor parameter (repeatable)")
    p.add_argument("--prefetch-depth", type=int, metavar="D",
                   help="prefetch up to D MoE layers ahead (default 1 with --predictor, 0 without)")
    p.add_argument("--prefetch-rule", default="topk", metavar="NAME", help="prefetch rule (default topk; see --list)")
    p.add_argument("--prefetch-budget", type=int, metavar="B",
                   help="experts fetched per target layer (default top_k x tokens of the step)")
    p.add_argument("--admission", default=DEFAULT_ADMISSION, metavar="NAME",
                   help=f"prefetch admission rule: {', '.join(ADMISSIONS)} (default {DEFAULT_ADMISSION}: each prefetch "
                        "weighed against its copy, block and victim, and the predictor not asked at layers whose "
                        "prefetches do not pay for its host time; cost: the weighing alone; none: every candidate)")
    p.add_argument("--copy-queue", choices=COPY_QUEUES,
                   help="the simulator's copy model: worker (default: the runtime's copy worker, prefetches queued "
                        "by priority and cancelled at their target layer where the routing did not pick them, demand "
                        "copies ahead of them) or fifo (every copy, demand or prefetch, in issue order); a suite sets "
                        "it in its config (copy_queue)")
    p.add_argument("--capacity", default="25%,50%",
                   help="comma-separated capacities: a share of the experts (25%%) or slots per pool (12)")
    p.add_argument("--scope", default="layer", help="layer, global, or layer,global for both (default layer)")
    p.add_argument("--fit", metavar="TRACE", help="fit static placement and learned predictors on this trace")
    p.add_argument("--fit-share", type=float, default=0.2,
                   help="without --fit: fit on this leading share of each trace's sequences, not scored (default 0.2)")
    p.add_argument("--decode-stream", action="store_true", help="replay every token on its own, even prefill steps")
    p.add_argument("--miss-rule", default="copy", metavar="NAME",
                   help="how a demand miss is served: copy, cpu, policy, min (default copy; see --list)")
    p.add_argument("--hardware", metavar="FILE", help="hardware profile JSON (default: the calibrated H100 profile; "
                   "fields left out keep its values)")
    p.add_argument("--bytes-per-expert", type=int, metavar="N", help="override the trace's expert size in bytes")
    p.add_argument("--expert-dtype", default="bf16", metavar="FMT",
                   help="experts' format: bf16 (default), int8 or int4 (copies move the compressed bytes, the "
                        "compute stays that of the bf16 expert, plus the expansion; a %% capacity is a share of "
                        "the bf16 expert memory, which holds more compressed experts)")
    p.add_argument("--group-size", type=int, default=None, help="int8/int4 group size: 32, 64 (default), 128")
    p.add_argument("--pool-mode", default="compressed", choices=("compressed", "expanded"),
                   help="with --expert-dtype: the GPU pool holds compressed experts (each expanded when a kernel "
                        "reads it) or dense ones (expanded once per copy; each slot also keeps its compressed landing)")
    p.add_argument("--low-precision-misses", metavar="FMT", choices=("int8", "int4"),
                   help="per-miss precision (HOBBIT): a miss whose gate share is below --low-precision-below is "
                        "copied as an int8/int4 copy (group size --group-size) and expanded into its slot; a reused "
                        "low copy is upgraded to bf16. Needs a trace with gate weights; runs on the Python engine")
    p.add_argument("--low-precision-below", type=float, default=0.5, metavar="SHARE",
                   help="with --low-precision-misses: the gate share below which a miss is copied low (the expert's "
                        "weight over its token's top-k sum, times top_k: 1.0 = an even split; default 0.5)")
    p.add_argument("--sim-engine", default="auto", choices=SIM_ENGINES,
                   help="simulator engine: cpp (csrc/sim/, identical results), python (the reference) or auto "
                        "(default: cpp where built and the configuration is supported, else python); "
                        "each row states the engine that ran it")
    p.add_argument("--engine", dest="sim_engine", action=DeprecatedFlag, new_flag="--sim-engine", choices=SIM_ENGINES)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="runs in parallel threads (default: the CPU count; the C++ engine releases the GIL)")
    p.add_argument("--suite", metavar="CONFIG",
                   help="run the grid of a suite config (TOML/JSON; see moecache.bench.suite) in --jobs processes, "
                        "resumable, into -o DIR")
    p.add_argument("-o", "--out", metavar="DIR", help="with --suite: folder for rows.jsonl, results.md/.csv, plots")
    p.add_argument("--ray", nargs="?", const=RAY_LOCAL, metavar="ADDRESS",
                   help="with --suite: run the configurations as Ray tasks, on a local Ray instance, or on the "
                        "cluster at ADDRESS (HOST:PORT, or 'auto' for the one `ray start` made here); needs "
                        "pip install 'moecache-offload[ray]'")
    p.add_argument("--ray-traces", default="auto", choices=("auto", "path", "store"),
                   help="with --ray: how workers reach the traces: their paths (every node reads them), or Ray's "
                        "object store (default auto: paths on a local instance, the object store on a cluster)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
