"""The hidden-state predictor (``hidden_state``) against the trace-only ones on qwen3moe-tiny-code.

    python eval/hidden_predictor.py [--model DIR] [--train-chunks 768] [--chunk-bytes 512] [--epochs 6] [--hidden-units 128]
                                    [--max-samples 160000] [--batch 1024] [--lr 4e-3] [--repeats 5]
                                    [--out-dir eval/results] [--work build/hidden_traces]

Data (both recorded with ``moecache.record(model, path, hidden_states=True)``, fp32 on the CPU, one
prefill forward pass of ``--chunk-bytes`` bytes per request, cached under ``--work``):

* fit: ``--train-chunks`` chunks of Python sources from this machine's installed packages (the site
  packages of the running interpreter, NumPy and SciPy excluded, files in sorted order, ASCII only),
  taken evenly spaced over that corpus. This is NOT the model's held-out sample; the model was
  trained on similar text (Python packages other than NumPy and SciPy), so this is in-distribution
  text it may have seen, which is what a user recording their own workload would have.
* score: chunks 48-95 of ``heldout_sample.txt`` (NumPy/SciPy sources the model never saw), the very
  text ``eval/gate_lookahead.py`` scores, so the tables compare.

Predictors: ``hidden_state`` (fitted on the fit trace's hidden states and routing), and for
reference ``learned`` and ``transition`` fitted on the same fit trace, and ``gate_lookahead`` (the
model's own routers). Recall@top_k at depth 1 and 2, split into same-token and next-token targets
(``moecache.predict_eval.measure_recall``, one request per row, batch of rows packed).

Speed: at batch 1 (one row), per layer one ``observe`` then one ``predict`` per depth, as the
runtime calls them, timed over every layer of ``--timing-tokens`` tokens; "per call" is that time
divided by the number of depths (an observe is shared by the depths). ``--repeats`` interleaved
repeats (predictor after predictor, then again), median and range reported, in wall time and in the
thread's CPU time (the machine is shared: CPU time is what the call itself costs, wall time adds
waiting for a core), one BLAS/OpenMP thread. The fitted ``hidden_state`` is saved under ``--work``
and reused by a later run with the same fit text and parameters. Writes ``hidden_predictor.json`` and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "qwen3moe-tiny-code"
EXCLUDED_PACKAGES = ("numpy", "scipy")


def training_text(total: int, chunk: int) -> tuple[list[bytes], str]:
    """``total // chunk`` chunks of ASCII Python source from the installed packages (not NumPy/SciPy)."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in site.rglob("*.py")
                   if p.relative_to(site).parts[0] not in EXCLUDED_PACKAGES and "-info" not in p.parts[0])
    corpus = bytearray()
    for p in files:
        try:
            b = p.read_bytes()
        except OSError:
            continue
        if b.isascii() and b.strip():
            corpus += b + b"\x02"  # id 2 ends a file, as in the model's training data
    n = len(corpus) // chunk
    count = total // chunk
    if n < count:
        raise SystemExit(f"only {n} chunks of Python source under {site}; lower --train-chunks")
    starts = np.linspace(0, n - 1, count).astype(np.int64) * chunk
    return [bytes(corpus[s:s + chunk]) for s in starts], f"{len(files)} .py files under {site} (NumPy/SciPy excluded), {len(corpus):,} bytes"


def record(model, chunks: list[bytes], path: Path, batch: int = 16) -> None:
    import torch

    import moecache

    if path.exists():
        return
    tmp = path.with_name(path.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    with moecache.record(model, tmp, hidden_states=True):
        with torch.no_grad():
            for i in range(0, len(chunks), batch):
                x = torch.tensor([list(c) for c in chunks[i:i + batch]], dtype=torch.long)
                model(input_ids=x, use_cache=False)
    os.replace(tmp, path)


def time_calls(pred, trace, depths, tokens: int) -> tuple[float, float]:
    """(wall, thread CPU) seconds per (observe + predict at every depth) / len(depths) at batch 1: per
    predictor call, as the runtime makes them (one request, a fresh reset)."""
    ids = np.asarray(trace.ids[:tokens], np.int64)
    hid = np.asarray(trace.hidden[:tokens], np.float32)
    L = trace.meta.num_layers
    pred.reset()
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(tokens):
        for l in range(L):
            pred.observe(l, ids[i, l][None, :], hid[i, l][None, :])
            for d in depths:
                pred.predict(l, d)
    calls = tokens * L * len(depths)
    return (time.perf_counter() - t0) / calls, (time.thread_time() - c0) / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--train-chunks", type=int, default=768)
    ap.add_argument("--chunk-bytes", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--hidden-units", type=int, default=128)
    ap.add_argument("--max-samples", type=int, default=160000, help="training samples per (depth, layer)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timing-tokens", type=int, default=200)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "hidden_traces")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    if not args.model.exists():
        print(f"skip: no model at {args.model} (../shared absent)")
        return 0

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moecache.predict_eval import measure_recall
    from moecache.predictors import PREDICTORS, Predictor
    from moecache.predictors.gate_lookahead import GateLookaheadPredictor
    from moecache.trace import open_trace

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    cb = args.chunk_bytes
    args.work.mkdir(parents=True, exist_ok=True)
    fit_chunks, corpus_note = training_text(args.train_chunks * cb, cb)
    held = (args.model / "heldout_sample.txt").read_bytes()[: 96 * cb]
    score_chunks = [held[i * cb:(i + 1) * cb] for i in range(48, 96)]
    t0 = time.time()
    fit_path = args.work / f"fit-{args.train_chunks}x{cb}"
    score_path = args.work / f"heldout-48-95x{cb}"
    record(model, fit_chunks, fit_path)
    record(model, score_chunks, score_path)
    record_s = time.time() - t0
    fit, score = open_trace(fit_path), open_trace(score_path)
    print(f"fit trace {len(fit):,} tokens, score trace {len(score):,} tokens (recorded in {record_s:.0f} s)",
          file=sys.stderr)

    depths = (1, 2)
    rows, preds = [], []
    hs = PREDICTORS.get("hidden_state")(fit.meta.num_layers, fit.meta.num_experts, fit.meta.top_k,
                                        max_depth=max(depths), hidden_units=args.hidden_units, epochs=args.epochs,
                                        max_samples=args.max_samples, batch=args.batch, lr=args.lr)
    saved = args.work / ("hidden_state-" + fit_path.name + "-" + "-".join(f"{k}{v}" for k, v in sorted(hs.params.items())))
    t0 = time.time()
    loaded = (saved / "predictor.json").exists()
    if loaded:
        hs = Predictor.load(saved)
        hs_fit_s = json.loads((saved / "fit_seconds.json").read_text())["seconds"]
        print(f"hidden_state: loaded the fit saved in {saved}", file=sys.stderr)
    else:
        torch.set_num_threads(2)  # the fit only (both cores of the CI-sized machine); timing below runs on one
        hs.fit(fit)
        torch.set_num_threads(1)
        hs_fit_s = time.time() - t0
        saved.mkdir(parents=True, exist_ok=True)
        (saved / "fit_seconds.json").write_text(json.dumps({"seconds": round(hs_fit_s, 1)}))
        hs.save(saved)  # predictor.json last: its presence means a complete save
    preds.append(("hidden_state", hs, hs_fit_s))
    for name in ("learned", "transition"):
        p = PREDICTORS.get(name)(fit.meta.num_layers, fit.meta.num_experts, fit.meta.top_k)
        t0 = time.time()
        p.fit(fit)
        preds.append((name, p, time.time() - t0))
    gl = GateLookaheadPredictor.from_model(model).fit(fit)
    preds.append(("gate_lookahead", gl, 0.0))
    hidden = np.asarray(score.hidden, np.float32)
    for name, p, fit_s in preds:
        for r in measure_recall(p, score, depths, hidden=hidden, label="qwen3moe-tiny-code heldout 48-95", rows=48):
            rows.append({"predictor": name, "depth": r.depth, "recall": r.recall(), "recall_2k": r.recall(2 * r.top_k),
                         "recall_same_token": r.recall_at_offset(0), "recall_next_token": r.recall_at_offset(1),
                         "targets": r.targets, "fit_seconds": round(fit_s, 1)})
            print(rows[-1], file=sys.stderr)

    # speed at batch 1, interleaved repeats
    load_before = os.getloadavg()
    timing: dict[str, list[tuple[float, float]]] = {name: [] for name, _p, _s in preds}
    for _ in range(args.repeats):
        for name, p, _s in preds:
            wall, cpu = time_calls(p, score, depths, args.timing_tokens)
            timing[name].append((wall * 1e6, cpu * 1e6))
    load_after = os.getloadavg()
    speed = {}
    for n, v in timing.items():
        wall, cpu = [x[0] for x in v], [x[1] for x in v]
        speed[n] = {"median_us": statistics.median(wall), "min_us": min(wall), "max_us": max(wall),
                    "cpu_median_us": statistics.median(cpu), "cpu_min_us": min(cpu), "cpu_max_us": max(cpu)}

    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores), "
                      f"torch {torch.__version__}, numpy {np.__version__}, BLAS/OMP threads 1",
           "command": "python eval/hidden_predictor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "fit_text": f"{args.train_chunks} x {cb} bytes: {corpus_note}", "fit_tokens": len(fit),
           "score_text": f"heldout_sample.txt chunks 48-95 x {cb} bytes", "score_tokens": len(score),
           "hidden_state_params": hs.params, "hidden_state_fit_reused": loaded, "rows": rows, "speed_us_per_call_batch1": speed,
           "repeats": args.repeats, "load_average_before_timing": [round(x, 1) for x in load_before],
           "load_average_after_timing": [round(x, 1) for x in load_after],
           "seconds": round(time.time() - started, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from moecache.atomic import write_json_atomic, write_text_atomic

    write_json_atomic(str(args.out_dir / "hidden_predictor.json"), out)
    md = ["# Hidden-state predictor on qwen3moe-tiny-code (real weights, held-out text)", "",
          f"- date: {out['date']}; machine: {out['machine']}",
          f"- command: `{out['command']}` ({out['seconds']:.0f} s in all)",
          f"- fit: {out['fit_text']} ({len(fit):,} tokens, recorded with hidden states)",
          f"- score: {out['score_text']} ({len(score):,} tokens x 6 MoE layers), never used for fitting",
          f"- hidden_state: {hs.params}; fit {hs_fit_s:.0f} s" + (" (saved by an earlier run with the same fit text and "
                                                             "parameters, reused)" if loaded else ""),
          "- recall@4 = share of the truly selected experts (top-4 of 32) among the predictor's 4 most likely; "
          "'next token' = targets past the last MoE layer (depth d from layer l with l + d >= 6).",
          "- us/call: at batch 1 (one row), per layer one observe + one predict per depth (1 and 2), divided by "
          f"the 2 depths; median of {args.repeats} interleaved repeats over {args.timing_tokens} tokens x 6 layers, "
          "range in brackets; 'CPU' is the calling thread's CPU time, 'wall' adds waiting for a core; one BLAS/OMP "
          f"thread; load average {out['load_average_before_timing']} before and {out['load_average_after_timing']} "
          "after timing (the machine is shared with other jobs: wall figures are inflated by them).",
          "- split: fitted on the fit text only; every recall figure is on the held-out text.", "",
          "| predictor | depth | recall@4 | recall@8 | recall@4 same token | recall@4 next token | us/call CPU | us/call wall |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = speed[r["predictor"]]
        md.append(f"| {r['predictor']} | {r['depth']} | {r['recall']:.3f} | {r['recall_2k']:.3f} | "
                  f"{r['recall_same_token']:.3f} | {r['recall_next_token']:.3f} | "
                  f"{s['cpu_median_us']:.1f} [{s['cpu_min_us']:.1f}-{s['cpu_max_us']:.1f}] | "
                  f"{s['median_us']:.1f} [{s['min_us']:.1f}-{s['max_us']:.1f}] |")
    write_text_atomic(str(args.out_dir / "hidden_predictor.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
