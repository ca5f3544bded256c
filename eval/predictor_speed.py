"""Benchmark: host time of a predictor's per-layer call (``observe``, then ``predict`` at each depth), the
runtime's per-layer cost, at batch 1 and batch 8.

    python eval/predictor_speed.py [--trace PATH] [--predictors prior,temporal,transition,learned,...]
                                   [--batch 1 8] [--depth 2] [--repeats 5] [--threads 1]
                                   [--out eval/results/predictor_speed]

Fits each predictor on the trace's leading ``--fit-seqs`` sequences, then feeds it the following tokens as the
runtime does at decode: for each token, layer by layer, ``observe(l, ids)`` and then ``predict(l, d)`` for
``d = 1..depth`` (at batch ``B``, ``B`` sequences side by side, one row each). A predictor is ``NAME`` or
``NAME:key=value:...`` (constructor options). Every ``learned`` entry is also timed as ``...[dense]``: the
same fitted coefficients scored by the dense product ``x @ coef.T`` on multi-hot features
(``DenseLearnedPredictor``, how ``learned`` scored before the gather-and-sum).

The variants run interleaved (repeat 1 of every variant, then repeat 2, ...); each repeat times every call of
its pass (after one untimed warm-up pass), and the figure is the median over repeats of the per-layer mean
(range: min..max over repeats). BLAS threads are limited to ``--threads`` (threadpoolctl). Writes OUT.json
and OUT.md with machine, date, load average and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "eval"))

from moecache.atomic import write_text_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.predictors import PREDICTORS  # noqa: E402
from moecache.predictors.learned import DenseLearnedPredictor  # noqa: E402
from prediction_target import predictor_spec  # noqa: E402

SUITE_DEEPSEEK = os.path.join(ROOT, "build", "suite_traces", "deepseek-v2-lite")
DENSE = "[dense]"


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"learned:window=12"`` -> ``("learned", {"window": 12})`` (prediction_target's parser)."""
    try:
        return predictor_spec(spec)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def batches(trace: Any, start: int, rows: int, tokens: int) -> np.ndarray:
    """``(tokens, rows, L, k)`` ids: ``rows`` sequences from sequence ``start`` on, side by side (the first
    ``tokens`` of each; sequences shorter than that are skipped)."""
    out = []
    for s in trace.sequences()[start:]:
        ids = np.asarray(trace.select_sequences([s]).ids)
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == rows:
            break
    if len(out) < rows:
        raise SystemExit(f"the trace has fewer than {rows} sequences of {tokens}+ tokens after the fitting part; "
                         "lower --tokens")
    return np.stack(out, axis=1).astype(np.int64)


def time_pass(pred: Any, ids: np.ndarray, depth: int) -> dict[str, float]:
    """One pass over ``ids`` ``(tokens, rows, L, k)``: mean microseconds of observe, of the predicts and of both,
    per layer."""
    pred.reset()
    T, _, L, _ = ids.shape
    t_obs = t_pred = 0.0
    clock = time.perf_counter
    for t in range(T):
        for layer in range(L):
            row = ids[t, :, layer]
            a = clock()
            pred.observe(layer, row)
            b = clock()
            for d in range(1, depth + 1):
                pred.predict(layer, d)
            c = clock()
            t_obs += b - a
            t_pred += c - b
    n = T * L
    return {"observe_us": 1e6 * t_obs / n, "predict_us": 1e6 * t_pred / n, "layer_us": 1e6 * (t_obs + t_pred) / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=SUITE_DEEPSEEK,
                    help="moecache trace folder (default: the suite's DeepSeek-V2-Lite)")
    ap.add_argument("--predictors", default="prior,temporal,transition,learned,learned:window=12")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--depth", type=int, default=2, help="predict(l, d) for d = 1..depth after each observe")
    ap.add_argument("--tokens", type=int, default=40, help="tokens per row timed in each pass")
    ap.add_argument("--fit-seqs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl)")
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "predictor_speed"))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.depth < 1 or min(args.batch) < 1:
        raise SystemExit("--repeats, --depth and --batch must be >= 1")
    if not os.path.isdir(args.trace):
        raise SystemExit(f"{args.trace} not found: build the suite traces (eval/suite_traces.py) or pass --trace")
    from threadpoolctl import threadpool_limits

    from moecache.trace import open_trace

    trace = open_trace(args.trace)
    m = trace.meta
    L, E, k = m.num_layers, m.num_experts, m.top_k
    seqs = trace.sequences()
    fit = trace.select_sequences(seqs[:args.fit_seqs])
    variants: list[tuple[str, Any]] = []
    for spec in args.predictors.split(","):
        name, opts = parse_spec(spec)
        cls = PREDICTORS.get(name)
        if name == "learned":
            opts.setdefault("max_depth", args.depth)
        pred = cls(L, E, k, **opts)
        t0 = time.time()
        if pred.needs_fit or name == "temporal":
            pred.fit(fit)
        print(f"fitted {spec} in {time.time() - t0:.1f} s", flush=True)
        variants.append((spec, pred))
        if name == "learned":
            variants.append((spec + DENSE, DenseLearnedPredictor.from_fitted(pred)))
    ids_by_batch = {b: batches(trace, args.fit_seqs, b, args.tokens) for b in args.batch}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {s: {b: [] for b in args.batch} for s, _ in variants}
    load = [os.getloadavg()[0]]
    t0 = time.time()
    with threadpool_limits(limits=args.threads):
        for b in args.batch:  # warm-up, untimed: lazily built tables and caches
            for _spec, pred in variants:
                time_pass(pred, ids_by_batch[b][:2], args.depth)
        for r in range(args.repeats):
            for b in args.batch:
                for spec, pred in variants:
                    runs[spec][b].append(time_pass(pred, ids_by_batch[b], args.depth))
            load.append(os.getloadavg()[0])
            print(f"repeat {r + 1}/{args.repeats} done ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for spec, _ in variants:
        for b in args.batch:
            reps = runs[spec][b]
            row = {"predictor": spec, "batch": b}
            for key in ("observe_us", "predict_us", "layer_us"):
                vals = [x[key] for x in reps]
                row[key] = statistics.median(vals)
                row[key + "_range"] = [min(vals), max(vals)]
            rows.append(row)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
                       f"{os.cpu_count()} CPUs", "numpy": np.__version__, "blas_threads": args.threads,
            "load_average_1min": [round(x, 2) for x in load],
            "command": "python eval/predictor_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "trace": m.model, "layers": L, "experts": E, "top_k": k, "depth": args.depth,
            "tokens_per_pass": args.tokens, "repeats": args.repeats, "fit_seqs": args.fit_seqs}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_text_atomic(args.out + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Predictor cost per MoE layer: observe, then predict at depths 1.." + str(args.depth), "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}, numpy {meta['numpy']}, "
             f"BLAS threads {args.threads}; load average (1 min) over the run {min(load):.2f}-{max(load):.2f}",
             f"- command: `{meta['command']}`",
             f"- trace: {m.model} ({L} layers, {E} experts, top-{k}); fitted on {args.fit_seqs} sequences, timed on "
             f"{args.tokens} tokens per row of the following ones",
             f"- median of {args.repeats} interleaved repeats of every variant, microseconds per MoE layer "
             "(range: min-max over the repeats); `[dense]`: the same coefficients scored by the dense product "
             "(how `learned` scored before the gather)", "",
             "| predictor | batch | observe us | predict us (all depths) | per layer us | per layer range |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lo, hi = row["layer_us_range"]
        lines.append(f"| {row['predictor']} | {row['batch']} | {row['observe_us']:.1f} | {row['predict_us']:.1f} | "
                     f"{row['layer_us']:.1f} | {lo:.1f}-{hi:.1f} |")
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
