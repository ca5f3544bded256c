"""Fit variants of ``hidden_state`` compared on the FIT text alone (the held-out text is never read).

    python eval/hidden_predictor_variants.py [--max-samples 40000] [--depth 1] [--val-every 8]
                                             [--variants before,skip,default] [--work build/hidden_traces]
                                             [--out-dir eval/results]

The configuration of ``eval/hidden_predictor.py`` is chosen here, so that its held-out figures carry no
selection: the fit trace that script records (``--work``/fit-768x512, recorded by it first) is split by
sequence, every ``--val-every``-th sequence scored and the rest fitted on, with a small sample budget
(``--max-samples`` per layer, depth ``--depth`` only) so that a variant fits in minutes on 2 cores.
The validation text is the same kind of text as the fit text (Python sources of the installed
packages), so its recall sits below or above the held-out text's; only the differences between
variants matter. Variants (the ``hidden_state`` parameters they set):

* ``before``: the defaults before the linear skip (``linear_skip=False``, batch 512, lr 2e-3);
* ``skip``: the linear skip, batch 512, lr 2e-3;
* ``default``: the current defaults (the skip, batch 1024, lr 4e-3).

Writes ``hidden_predictor_variants.json`` and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "before": {"linear_skip": False, "batch": 512, "lr": 2e-3},
    "skip": {"linear_skip": True, "batch": 512, "lr": 2e-3},
    "default": {},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-samples", type=int, default=40000, help="training samples per layer")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--val-every", type=int, default=8, help="every n-th sequence of the fit trace is scored")
    ap.add_argument("--variants", default="before,skip,default", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "hidden_traces")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"unknown variant(s) {unknown or names}: choose from {sorted(VARIANTS)}")
    if args.val_every < 2 or args.depth < 1:
        raise SystemExit("--val-every must be >= 2 and --depth >= 1")
    fit_path = args.work / "fit-768x512"
    if not fit_path.exists():
        print(f"skip: no fit trace at {fit_path}: run eval/hidden_predictor.py first (it records it)")
        return 0

    import torch

    from moecache.atomic import write_json_atomic, write_text_atomic
    from moecache.predict_eval import measure_recall
    from moecache.predictors import PREDICTORS
    from moecache.trace import open_trace

    torch.set_num_threads(2)
    started = time.time()
    trace = open_trace(fit_path)
    seqs = trace.sequences()
    val_mask = np.isin(trace.seq, seqs[args.val_every - 1::args.val_every])
    train, val = trace.select(~val_mask), trace.select(val_mask)
    val_hidden = np.asarray(val.hidden, np.float32)
    m = trace.meta
    rows = []
    for name in names:
        params = {"max_depth": args.depth, "max_samples": args.max_samples, **VARIANTS[name]}
        t0 = time.time()
        pred = PREDICTORS.get("hidden_state")(m.num_layers, m.num_experts, m.top_k, **params).fit(train)
        fit_s = time.time() - t0
        r = measure_recall(pred, val, (args.depth,), hidden=val_hidden, rows=48, label="fit text, validation part")[0]
        rows.append({"variant": name, "params": dict(pred.params), "recall": r.recall(),
                     "recall_same_token": r.recall_at_offset(0), "recall_next_token": r.recall_at_offset(1),
                     "targets": r.targets, "fit_seconds": round(fit_s, 1)})
        print(rows[-1], file=sys.stderr)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores), torch {torch.__version__}, "
                      "2 torch threads for the fits",
           "command": "python eval/hidden_predictor_variants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "train_tokens": len(train), "val_tokens": len(val), "depth": args.depth, "rows": rows,
           "seconds": round(time.time() - started, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(args.out_dir / "hidden_predictor_variants.json"), out)
    md = ["# hidden_state fit variants, compared on the fit text only (qwen3moe-tiny-code)", "",
          f"- date: {out['date']}; machine: {out['machine']}",
          f"- command: `{out['command']}` ({out['seconds']:.0f} s in all)",
          f"- split: the fit trace of `eval/hidden_predictor.py` by sequence: every {args.val_every}th sequence scored "
          f"({len(val):,} tokens), the rest fitted on ({len(train):,} tokens, at most {args.max_samples:,} samples per "
          "layer); the held-out text is not read",
          f"- recall@{m.top_k} at depth {args.depth}; 'next token' = targets past the last MoE layer", "",
          "| variant | params | recall | same token | next token | fit s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = {k: r["params"][k] for k in ("linear_skip", "batch", "lr")}
        md.append(f"| {r['variant']} | {p} | {r['recall']:.4f} | {r['recall_same_token']:.4f} | "
                  f"{r['recall_next_token']:.4f} | {r['fit_seconds']:.0f} |")
    write_text_atomic(str(args.out_dir / "hidden_predictor_variants.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
