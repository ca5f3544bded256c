"""Benchmark: decode time per token with and without ``moecache.record`` (goal on GPU, batch 1: < 3 %).

    python eval/record_overhead.py [--device cuda] [--layers 8] [--runs 7] [--new-tokens 128] [--out FILE]
    python eval/record_overhead.py --tiny          # CPU smoke test with tiny sizes (seconds)

A random Qwen3-MoE of realistic width (hidden 2048, 128 experts of 2048 x 768, top-8: the
Qwen3-30B-A3B shape) with only a few layers, in bf16 on the GPU. Each run times ``generate`` for
1 and for ``1 + new_tokens`` tokens (greedy, ``min_new_tokens`` so every run decodes the same
count) and takes decode ms/token = (t(1 + n) - t(1)) / n, so the prefill is left out. Runs
alternate between recording off and on after warm-up of both; medians are reported, and the
median of each "on" run's change against the "off" run just before it (paired, so drift cancels). With
recording on, each run writes its own trace; ``close_ms`` (writing what is left and finalising)
is reported apart, since it happens once per recording, not per token.

Also reported: the recorder's own host time per forward call (``RoutingRecorder.host_seconds``),
which is the overhead where the host bounds decode (launch-bound small models) and is hidden
behind GPU work otherwise, and the spread of the baseline runs (an overhead below it is noise).

Prints one JSON object (machine, versions, date, configuration, per-run times, medians, overhead in
percent, trace rows and bytes, peak GPU memory); with --out, also writes it there atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch


def build_model(args: argparse.Namespace):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 8), head_dim=args.hidden // args.heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompt, n: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    sync(device)
    return time.perf_counter() - t0


def one_run(model, prompt, args, record: bool, tmp: str, index: int) -> dict:
    import moecache

    if not record:
        t1 = timed_generate(model, prompt, 1, args.device)
        tn = timed_generate(model, prompt, 1 + args.new_tokens, args.device)
        return {"decode_ms": (tn - t1) / args.new_tokens * 1e3, "prefill_s": t1}
    path = os.path.join(tmp, f"trace-{index}")
    with moecache.record(model, path, flush_rows=args.flush_rows) as rec:
        t1 = timed_generate(model, prompt, 1, args.device)
        tn = timed_generate(model, prompt, 1 + args.new_tokens, args.device)
        t0 = time.perf_counter()
    close_ms = (time.perf_counter() - t0) * 1e3
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    rows = rec.rows
    shutil.rmtree(path)
    return {"decode_ms": (tn - t1) / args.new_tokens * 1e3, "prefill_s": t1, "close_ms": close_ms,
            "rows": rows, "trace_bytes": size, "host_us_per_call": rec.host_seconds / rec.calls * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--flush-rows", type=int, default=16384)
    ap.add_argument("--experts-impl", default=None, help="transformers experts implementation (default: its own)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes, few tokens")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tiny:
        args.device, args.layers, args.hidden, args.heads, args.moe_intermediate = "cpu", 2, 64, 4, 32
        args.experts, args.top_k, args.vocab, args.prompt, args.new_tokens, args.runs = 8, 2, 256, 8, 8, 2
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    model = build_model(args)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=gen).to(args.device)
    tmp = tempfile.mkdtemp(prefix="moecache-record-overhead-")
    try:
        one_run(model, prompt, args, False, tmp, -1)  # warm-up: kernels, allocator, pinned pool
        one_run(model, prompt, args, True, tmp, -2)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        off, on = [], []
        for i in range(args.runs):  # alternate, so drift hits both modes alike
            off.append(one_run(model, prompt, args, False, tmp, i))
            on.append(one_run(model, prompt, args, True, tmp, i))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med_off = statistics.median(r["decode_ms"] for r in off)
    med_on = statistics.median(r["decode_ms"] for r in on)
    host_us = statistics.median(r["host_us_per_call"] for r in on)
    result = {
        "benchmark": "record_overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "decode_ms_per_token": {"off": med_off, "on": med_on},
        "overhead_pct": (med_on - med_off) / med_off * 100.0,
        # Each "on" run against the "off" run just before it, so slow drift cancels; the median of those.
        "paired_overhead_pct": statistics.median((b["decode_ms"] - a["decode_ms"]) / a["decode_ms"] * 100.0
                                                 for a, b in zip(off, on)),
        # The spread of the baseline: an overhead smaller than this is not resolved by the medians.
        "off_spread_pct": (max(r["decode_ms"] for r in off) - min(r["decode_ms"] for r in off)) / med_off * 100.0,
        # The recorder's own host time per forward call (its per-call hooks), as a share of a decode
        # step: the overhead where the host bounds decode, hidden where the GPU does.
        "recorder_host_us_per_call": host_us,
        "recorder_host_pct_of_step": host_us / 1e3 / med_off * 100.0,
        "tokens_per_s": {"off": args.batch * 1e3 / med_off, "on": args.batch * 1e3 / med_on},
        "close_ms_median": statistics.median(r["close_ms"] for r in on),
        "trace_rows_per_run": on[0]["rows"],
        "trace_bytes_per_run": on[0]["trace_bytes"],
        "runs": {"off": off, "on": on},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
    }
    text = json.dumps(result, indent=1)
    print(text)
    print(f"decode ms/token: off {med_off:.3f}  on {med_on:.3f}  overhead {result['overhead_pct']:+.2f}% "
          f"(paired {result['paired_overhead_pct']:+.2f}%) "
          f"(baseline spread {result['off_spread_pct']:.1f}%); recorder host time {host_us:.0f} us/call = "
          f"{result['recorder_host_pct_of_step']:.2f}% of a step "
          f"({args.device}, {result['machine']['gpu'] or 'cpu'}, batch {args.batch}, {args.layers} layers)",
          file=sys.stderr)
    if args.out:
        from moecache.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
