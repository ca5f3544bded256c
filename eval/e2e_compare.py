"""End-to-end decode comparison on the GPU machine (issue #8): moecache against the other schemes.

One model run per invocation: a real-size shape with random weights (``eval/_shapes.py``: built on
meta, every expert generated straight into one pinned host store, built once and reused by every
configuration), routing replayed from the shape's real trace (``moecache.forced_routing``, teacher-forced;
``batch=b`` runs b sequences side by side, step by step, each group for its common length).

Configurations (``--configs``), all at ``--fraction`` (25%) of expert memory on the GPU except (a):

* (a) ``resident``: every expert on the GPU, unpatched; ``batched_mm`` and ``grouped_mm`` both
  timed, the faster reported; skipped where the experts do not fit in free GPU memory. The
  offloaded configurations then run on the experts implementation that won at that batch size.
* (b) ``accelerate``: ``accelerate.dispatch_model`` with a device map under the same budget: every
  non-expert module on the GPU (as in all other configurations) plus the experts modules of the
  first ``floor(fraction x layers)`` MoE layers; the other layers' experts mapped to ``"cpu"``,
  which accelerate keeps in host memory (here: views of the pinned host store) and copies to the
  GPU at every forward. (``infer_auto_device_map`` with the same ``max_memory`` would also move
  later layers' attention to the CPU and reserve room for the largest layer; the explicit map keeps
  the comparison about experts.) Very slow: ``--accelerate-steps`` decode steps only. On a CPU-only
  run the offloaded experts go to "disk" (accelerate does not offload to the CPU it computes on).
* (c) ``lru-layer``: ``moecache.offload(policy=LRU with one pool per MoE layer, no predictor,
  prefetch_depth=0)``: on-demand LRU per layer without prefetch, mixtral-offloading's scheme.
  ``slots // layers`` slots per layer.
* (d) ``fiddler``: ``offload(hybrid="cpu", policy=static)``: every miss computed on the CPU from
  host memory, nothing copied on a miss. As Fiddler places the most popular experts on the GPU at
  load time, the static placement (fitted on sequences not replayed; one scratch slot) is copied
  into the pool before the run (``handle.preload()``).
* (e) ``moecache``: each of ``--candidates`` (policy, predictor, prefetch depth, hybrid), timed in
  this same run; the fastest by measured decode tokens/s is reported as (e). A candidate with the
  ``oracle`` predictor (``lru+oracle:depth=1``) is not a scheme anyone can run: its predictor reads the
  replay's routing ahead (``ReplayOracle``), so it measures the ceiling of prefetch on this machine
  (perfect predictions, the runtime's real copies and host work); such rows are reported but never
  chosen as (e).
* (n) ``null experts``: the replay with every routed-experts module answering zeros at once, no
  expert kernel: the measured time of everything around the experts (router, attention, shared
  experts, lm_head, the replay's own work) at this shape and batch, which the timing model's
  non-expert term needs (``eval/calibrate_timing.py`` reads it). Not a scheme; never in the bound.

Measurement per configuration: set up, a short warm-up replay (``--warm-steps`` decode steps on a
group of sequences not timed where the trace has one, else the first timed group), then the timed
replay of the batch's groups: one prefill call of one row per sequence, then decode steps
(``--tokens`` rows per sequence at most). tokens/s = decode tokens (b per step) / decode wall
time; ms/step = decode wall time / steps. Hit, ready rate, stall and bytes come from
``handle.stats()`` over the timed replay (its prefill calls included).

Lower bound per batch size, on the steps each configuration actually replayed (its warm-up
included, misses counted in its timed decode steps): Belady's MIN with every slot of the budget in
one pool (the fewest misses any policy or prefetch can have, ``moecache.sim``) x the copy time of
one expert measured in this run (pinned host store to the GPU, one expert per copy), against the
measured all-resident time per step of (a): ``bound = max(copy, compute)`` (copies can overlap
compute; ``serial = copy + compute`` is reported too). Where (d) ran and measured its CPU time per
expert, a second figure bounds the miss service when misses may run on the CPU: Belady-with-bypass
misses split optimally between the copy engine and the CPU (``moecache.sim.bound.split_time``).

Machine noise: the same configuration on the same GPU machine has run 10-30% apart from one process to
the next (and more between machines). ``--repeats R`` runs the whole list of configurations R times,
round-robin, and pools each configuration's runs (its decode tokens over its decode seconds); the
Markdown lists every run's tokens/s.

Time guard: ``--time-budget`` seconds for the whole run (default 540, i.e. 9 minutes, model build
included); each configuration's timed replay gets a share of what is left (weights: ``WEIGHTS``)
and stops its decode steps when the share is spent (``run_forced(time_limit_s=...)``), so its
sequences may be cut; configurations reached with no time left are reported as skipped.

    python eval/e2e_compare.py --model deepseek --batch 1 --repeats 2 --out eval/results/e2e_deepseek_b1.json
    python eval/e2e_compare.py --model deepseek --batch 8 --repeats 2 --out eval/results/e2e_deepseek_b8.json
    python eval/e2e_compare.py --model mixtral --layers 16 --batch 1 --repeats 2 --out eval/results/e2e_mixtral.json
    python eval/e2e_compare.py --model deepseek --quick --out /tmp/e2e.json          # CPU smoke run

``--trace`` takes a moecache trace folder (``moecache trace import SRC -o build/NAME``) or the raw
source folder (default: ``../shared/data/routing/<the shape's trace>``). The JSON and a Markdown
table next to it (same name, ``.md``) are written atomically after every configuration.

The machinery lives in ``eval/e2e_harness.py``, the targets in ``eval/e2e_targets.py``; this script
parses the options and runs the configurations.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _shapes import build_model, get_shape, machine, prepare_trace, sync  # noqa: E402
from e2e_harness import (CONFIG_KEYS, DEFAULT_CANDIDATES, HYBRID_BUILT, RUN_ORDER, SPEC_SYNTAX, WEIGHTS,  # noqa: E402
                         BatchPlan, Bench, Budget, Candidate, attach_bounds, fmt, make_best, measure_copy,
                         plan_batches, public_rows, run_accelerate, run_fiddler, run_lru_layer, run_null_experts,
                         run_resident,
                         write_markdown)
from e2e_targets import check_targets  # noqa: E402

from moecache.atomic import write_json_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402


def parse_configs(text: str) -> list[str]:
    keys = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in keys if c not in CONFIG_KEYS]
    if bad or not keys:
        raise ConfigError(f"--configs {text!r}: unknown {bad}; valid: {', '.join(CONFIG_KEYS)} (comma-separated)")
    return [c for c in RUN_ORDER if c in keys]


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch {text!r}: write batch sizes as integers, e.g. 1,8") from None
    if not out or min(out) < 1:
        raise ConfigError(f"--batch {text!r}: batch sizes must be >= 1")
    return out


def runners(candidates: list[Candidate]) -> dict[str, Callable[[Bench, BatchPlan], list[dict[str, Any]]]]:
    return {"a": run_resident, "b": run_accelerate, "c": run_lru_layer, "d": run_fiddler, "e": make_best(candidates),
            "n": run_null_experts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=("deepseek", "mixtral"))
    ap.add_argument("--out", required=True, help="JSON results (a .md is written next to it)")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of expert memory on the GPU")
    ap.add_argument("--configs", default="a,b,c,d,e", help="which of a,b,c,d,e,n (module docstring)")
    ap.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                    help="(e)'s candidates, comma-separated, each " + SPEC_SYNTAX + " (the old "
                    "policy[@layer]+predictor-dN+pP+wW+hybrid-MODE still parses, with a warning)")
    ap.add_argument("--layers", type=int, default=None,
                    help="MoE layers (default: all 26 for deepseek, 16 of 32 for mixtral, whose 32 need 84 GiB "
                    "of host memory)")
    ap.add_argument("--tokens", type=int, default=None, help="rows replayed per sequence (1 prefill + decode)")
    ap.add_argument("--sequences", type=int, default=None, help="sequences per batch size (default 2 at batch 1, b)")
    ap.add_argument("--warm-steps", type=int, default=None)
    ap.add_argument("--accelerate-steps", type=int, default=None, help="decode steps for (b)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default 540)")
    ap.add_argument("--trace", default=None, help="moecache trace folder or raw source folder")
    ap.add_argument("--trace-files", type=int, default=None, help="raw DeepSeek folder: prompt files to read")
    ap.add_argument("--fit-sequences", type=int, default=None,
                    help="fit predictors and static placement on at most this many sequences (default 160)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (smoke run of the whole pipeline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the configurations this many times, round-robin (machine noise shifts between runs: "
                    "each configuration's speed is then pooled over its runs)")
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    q = args.quick
    budget = Budget(args.time_budget or (240.0 if q else 540.0), reserve_s=15.0 if q else 30.0)
    shape = get_shape(args.model)
    configs = parse_configs(args.configs)
    batches = parse_batches(args.batch)
    candidates = [Candidate.parse(c) for c in args.candidates.split(",") if c.strip()]
    if "e" in configs and not candidates:
        raise ConfigError("--candidates is empty; (e) needs at least one")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: run the configurations at least once")
    if not 0 < args.fraction < 1:
        raise ConfigError(f"--fraction {args.fraction}: a share of expert memory strictly between 0 and 1")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tokens = args.tokens or (10 if q else 128)
    warm_steps = args.warm_steps or (3 if q else 8)
    command = "python " + " ".join(shlex.quote(a) for a in (["eval/e2e_compare.py"] + list(
        sys.argv[1:] if argv is None else argv)))

    t0 = time.perf_counter()
    raw = shape.load_trace(args.trace or shape.trace_dir, args.trace_files or (12 if q else 160))
    trace = prepare_trace(raw, args.layers or shape.default_layers)
    L = trace.meta.num_layers
    per_batch = {b: args.sequences for b in batches} if args.sequences else {}
    plans, fit_ids, notes, plan_errors = plan_batches(trace, batches, tokens, warm_steps, per_batch)
    if not fit_ids:
        raise ConfigError("every sequence of the trace is replayed; none is left to fit predictors and static "
                          "placement: use fewer --sequences or a larger trace (--trace-files)")
    fit_ids = fit_ids[:args.fit_sequences or 160]
    fit_trace = trace.select_sequences(fit_ids)
    t_trace = time.perf_counter() - t0
    config = shape.make_config(q, L)
    t0 = time.perf_counter()
    model, store = build_model(config, shape.family, dev, dtype, args.seed)
    sync(dev)
    t_build = time.perf_counter() - t0
    E, k = store.num_experts, trace.meta.top_k
    if (store.num_layers, E) != (L, trace.meta.num_experts):
        raise ConfigError(f"model has {store.num_layers} MoE layers x {E} experts, the trace {L} x "
                          f"{trace.meta.num_experts}")
    slots = int(L * E * args.fraction)
    from moecache.runtime.offload import non_expert_bytes

    nonexpert = non_expert_bytes(model, {id(p) for p in model.parameters() if p.device.type == "meta"})
    copy = measure_copy(store, dev)
    bench = Bench(shape=shape, model=model, store=store, trace=trace, fit_trace=fit_trace, dev=dev, dtype=dtype,
                  L=L, E=E, k=k, slots=slots, fraction=args.fraction, tokens=tokens, warm_steps=warm_steps,
                  accelerate_steps=args.accelerate_steps or (2 if q else 4), budget=budget, copy=copy,
                  min_share_s=0.5 if q else 2.0)
    t0 = time.perf_counter()
    if "e" in configs:
        from moecache.predictors import PREDICTORS

        for cand in sorted({c for c in candidates if c.predictor}, key=lambda c: c.predictor_spec):
            if not getattr(PREDICTORS.get(cand.predictor), "needs_model", False):
                bench.predictor(cand.predictor_spec)
    t_fit = time.perf_counter() - t0
    weights = {c: WEIGHTS[c] * (len(candidates) if c == "e" else 1) for c in configs}
    budget.weights_left = sum(weights.values()) * len(plans) * args.repeats

    out: dict[str, Any] = {
        "machine": machine(), "command": command, "args": {**vars(args), "time_budget": budget.total_s},
        "setup": {"title": shape.title, "model": shape.key, "family": shape.family, "moe_layers": L,
                  "full_moe_layers": shape.full_moe_layers, "dtype": str(dtype).replace("torch.", ""),
                  "trace": os.path.basename(os.path.normpath(args.trace or shape.trace_dir)),
                  "trace_rows": len(trace), "trace_sequences": len(trace.sequences()),
                  "rows_dropped_missing_layer": trace.drops.get("e2e_rows_missing_a_layer", 0),
                  "fit_sequences": len(fit_ids), "tokens_per_sequence": tokens, "warm_steps": warm_steps,
                  "experts": E, "top_k": k, "total_experts": L * E, "slots": slots,
                  "expert_bytes": store.layout.slot_bytes, "host_store_bytes": store.nbytes,
                  "host_pinned": bool(store.pinned), "nonexpert_bytes": nonexpert,
                  "setup_s": {"trace": t_trace, "build": t_build, "fit": t_fit}, "hybrid_built": HYBRID_BUILT,
                  "candidates": [c.label for c in candidates], "notes": notes,
                  "plans": {b: {"groups": p.groups, "warm": p.warm, "warm_is_timed": p.warm_is_timed}
                            for b, p in plans.items()}},
        "copy": copy, "batches": {}}
    md = os.path.splitext(args.out)[0] + ".md"
    print(f"{shape.title}: {L} MoE layers, {L * E} experts ({store.nbytes / 2**30:.1f} GiB host), {slots} slots; "
          f"copy {copy['ms_per_expert']:.3f} ms/expert; build {t_build:.0f} s", flush=True)

    def save() -> None:
        out["wall_s"] = budget.elapsed()
        write_json_atomic(args.out, out)
        write_markdown(md, out)

    run_of = runners(candidates)
    for b in batches:
        if b in plan_errors:
            out["batches"][str(b)] = {"error": plan_errors[b]}
            continue
        plan = plans[b]
        rows: list[dict[str, Any]] = []
        entry: dict[str, Any] = {"rows": rows}
        out["batches"][str(b)] = entry
        for rep, c in [(rep, c) for rep in range(args.repeats) for c in configs]:
            print(f"batch {b}: ({c}){f' run {rep + 1}' if args.repeats > 1 else ''} ... {budget.left():.0f} s left",
                  flush=True)
            got = run_of[c](bench, plan)
            for r in got:
                r["run"] = rep + 1
                print(f"  {r['config']} {r['label']:40s} {fmt(r.get('tokens_per_s'), '8.2f')} tokens/s "
                      f"{fmt(r.get('ms_per_step'), '8.1f')} ms/step  {r['status'].splitlines()[0][:100]}", flush=True)
            rows.extend(got)
            entry["rows"] = rows
            out["batches"][str(b)] = {**entry, "rows": public_rows(rows)}
            save()
        entry["bound_summary"] = attach_bounds(bench, rows)
        entry["targets"] = check_targets(shape.key, b, rows)
        entry["rows"] = public_rows(rows)
        out["batches"][str(b)] = entry
        save()
    store.close()
    save()
    print(f"wrote {args.out} and {md} in {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
