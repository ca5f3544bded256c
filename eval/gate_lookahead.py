"""Gate lookahead against the trace-only predictors on the trained qwen3moe-tiny-code model (real weights).

    python eval/gate_lookahead.py [--model DIR] [--chunks 96] [--chunk-bytes 512] [--threads 1] [--out FILE] [--quiet]

The model (6 MoE layers, 32 experts, top-4, byte tokens) runs in fp32 on the CPU over the first
``chunks * chunk_bytes`` bytes of its held-out text (``heldout_sample.txt``: NumPy and SciPy
sources it never saw), one forward pass per chunk; forward hooks collect each MoE block's input
hidden state and the routing (``moecache.predictors.gate_lookahead.capture``). Each chunk is one
request. The first half of the chunks (``head`` split: one part of the text) fits the trace-only
predictors and the prior behind gate lookahead's next-token fallback; every predictor is scored on
the second half, at depth 1 and 2. Writes a Markdown table (and a .json beside it).
"""

from __future__ import annotations

import os

# The machine these run on is small and shared: extra BLAS threads only contend there. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "qwen3moe-tiny-code"


def record(model_dir: Path, chunks: int, chunk_bytes: int, quiet: bool):
    """``(trace, hidden, model)`` for ``chunks`` consecutive chunks of the held-out text."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moecache.errors import TraceFormatError
    from moecache.predictors.gate_lookahead import capture
    from moecache.trace import PHASE_PREFILL, RoutingBlock, Trace, TraceMeta

    if quiet:
        hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    path = model_dir / "heldout_sample.txt"
    data = path.read_bytes()[: chunks * chunk_bytes]
    if len(data) < chunks * chunk_bytes:
        raise TraceFormatError(f"only {len(data)} bytes; {chunks} chunks of {chunk_bytes} need more", str(path))
    if max(data) >= model.config.vocab_size:
        raise TraceFormatError(f"byte {max(data)} is outside the model's {model.config.vocab_size}-token vocabulary "
                               "(the model reads ASCII only)", str(path))
    blocks, hidden = [], []
    from tqdm.auto import tqdm

    for s in tqdm(range(chunks), desc="forward passes", unit="chunk", disable=quiet or not sys.stderr.isatty()):
        ids, h = capture(model, list(data[s * chunk_bytes:(s + 1) * chunk_bytes]))
        blocks.append(RoutingBlock.build(ids, seq=s, pos=np.arange(len(ids)), token=list(data[s * chunk_bytes:(s + 1) * chunk_bytes]),
                                         phase=PHASE_PREFILL))
        hidden.append(h)
    L = ids.shape[1]
    meta = TraceMeta(num_experts=int(model.config.num_experts), top_k=int(model.config.num_experts_per_tok),
                     moe_layers=list(range(L)), model="qwen3moe-tiny-code", family="qwen3_moe",
                     source=f"{path.name}, first {chunks} x {chunk_bytes} bytes, fp32 CPU forward")
    return Trace(meta, RoutingBlock.concat(blocks)), np.concatenate(hidden), model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--chunks", type=int, default=96)
    ap.add_argument("--chunk-bytes", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "gate_lookahead.md")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on the shared 2-core machine a 512-byte forward pass took "
                         "0.13 s on one thread and 0.8-1.2 s on two)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from moecache.atomic import write_json_atomic, write_text_atomic
    from moecache.predict_eval import evaluate
    from moecache.predictors import PREDICTORS
    from moecache.predictors.gate_lookahead import GateLookaheadPredictor

    t0 = time.perf_counter()
    trace, hidden, model = record(args.model, args.chunks, args.chunk_bytes, args.quiet)
    t_rec = time.perf_counter() - t0
    L, E, k = trace.num_layers, trace.meta.num_experts, trace.meta.top_k
    order = ["prior", "temporal", "transition", "activation_matrix", "learned"]
    names = [n for n in PREDICTORS.names() if n != "oracle" and not PREDICTORS.get(n).needs_model]
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
    preds = [PREDICTORS.get(n)(L, E, k) for n in names]
    preds += [GateLookaheadPredictor.from_model(model), GateLookaheadPredictor.from_model(model, rescale="norm")]
    rows = []
    for p in preds:
        rows += evaluate([p], trace, (1, 2), mode="head", hidden=hidden, label="qwen3moe-tiny-code heldout",
                         progress=not args.quiet)
    elapsed = time.perf_counter() - t0
    command = "python eval/gate_lookahead.py " + " ".join(sys.argv[1:])
    n_fit = args.chunks // 2
    lines = [
        "# Gate lookahead vs trace-only predictors on qwen3moe-tiny-code (real weights, held-out text)", "",
        f"- date: {date.today().isoformat()}; machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores), "
        f"torch {torch.__version__} (CPU, fp32, threads: {torch.get_num_threads()})",
        f"- command: `{command.strip()}` ({elapsed:.0f} s in all, {t_rec:.0f} s of it recording)",
        f"- text: the first {args.chunks} x {args.chunk_bytes} bytes of heldout_sample.txt, one request per chunk; "
        f"chunks 0-{n_fit - 1} fit the trace-only predictors (and the fallback prior), chunks {n_fit}-{args.chunks - 1} "
        f"are scored ({len(trace) - n_fit * args.chunk_bytes:,} tokens x {L} MoE layers).",
        f"- model: {L} MoE layers, {E} experts, top-{k}. recall@m = share of the truly selected experts among the "
        "predictor's m most likely (ties to the lowest id); 'same token' / 'next token' split recall@k by where the "
        "target is (depth d from layer l targets layer l+d of the same token when l+d < L, else the next token, where "
        "gate lookahead falls back to the temporal estimate).",
        "",
        f"| predictor | depth | recall@{k} | recall@{2 * k} | precision@{2 * k} | recall@{k}, same token | recall@{k}, next token | us / layer-step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # fit time is in the .json (fit_seconds); us / layer-step = time inside the predictor per request row and layer
    for r in rows:
        label = r.predictor + ("" if r.predictor != "gate_lookahead" else f" (rescale={r.params['rescale']})")
        us = 1e6 * r.seconds / max(r.layer_steps, 1)
        lines.append(f"| {label} | {r.depth} | {r.recall():.3f} | {r.recall(2 * k):.3f} | {r.precision(2 * k):.3f} | "
                     f"{r.recall_at_offset(0):.3f} | {r.recall_at_offset(1):.3f} | {us:.1f} |")
    lines.append("")
    write_text_atomic(str(args.out), "\n".join(lines))
    write_json_atomic(str(args.out.with_suffix(".json")), [r.to_json() for r in rows])
    if not args.quiet:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
