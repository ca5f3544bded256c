"""Decode speed of the offloading runtime at batch 1: offloaded vs all experts resident.

Two models, bf16 on the GPU (fp32 on the CPU):

1. the random-weights default-family model (``moecache.default_model.default_model``, 157M parameters), greedy ``generate``;
2. the DeepSeek-V2-Lite shape (27 layers, 64 routed experts top-6, 2 shared, hidden 2048, expert
   intermediate 1408), random weights: built on the meta device, non-expert weights materialised on
   the GPU, every expert generated straight into the pinned host store (per layer, on the GPU, then
   copied down); routing replayed (``moecache.forced_routing``) from the real trace
   ``../shared/data/routing/deepseek-v2-lite-chat__moe-beyond`` (prefill logs replayed token by
   token as a decode stream), imported with ``moecache.trace.importers``.

Configurations per model: all experts resident (unpatched; ``batched_mm`` and ``grouped_mm``);
the runtime with a pool of every expert (so its per-layer overhead shows: no copies once warm);
the runtime at ``--fraction`` (25%) of expert memory with no predictor and with learned
predictors. Reported per row: ms per decode token, tokens/s, hit/ready rates, stall, bytes copied,
host overhead per MoE layer (runtime code) and the per-layer overhead against the resident run
``(ms/token(offload 100%) - ms/token(resident)) / MoE layers``, plus peak GPU memory.

    python eval/runtime_decode.py --out eval/results/runtime_decode.json            # GPU, ~8 min
    python eval/runtime_decode.py --out /tmp/rd.json --quick                          # CPU smoke, tiny sizes

Everything runs in one process; the JSON is written atomically at the end (and after each model,
so a crash keeps what finished).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # eval/_shapes.py

from moecache.atomic import write_json_atomic  # noqa: E402
from moecache.default_model import default_model, encode  # noqa: E402
from moecache.forced_routing import run_forced  # noqa: E402
from moecache.runtime import offload  # noqa: E402

# The DeepSeek-V2-Lite builders are shared with eval/e2e_compare.py.
from _shapes import (TRACE_DIR, build_deepseek, load_trace, machine, materialise_experts,  # noqa: E402,F401
                     peak, peak_reset, release_experts, sync)

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


# -- the default model ----------------------------------------------------------------------------

def time_generate(model: nn.Module, x: torch.Tensor, n: int, dev: torch.device, repeats: int,
                  handle: Any = None) -> dict[str, float]:
    """Median decode ms/token from (T(n new tokens) - T(1 new token)) / (n - 1), greedy."""
    def run(k: int) -> float:
        sync(dev)
        t = time.perf_counter()
        model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        sync(dev)
        return time.perf_counter() - t

    run(4)  # warm-up
    if handle is not None:
        handle.reset_stats()
    firsts, fulls = [], []
    for _ in range(repeats):
        firsts.append(run(1))
        fulls.append(run(n))
    first, full = statistics.median(firsts), statistics.median(fulls)
    ms = 1e3 * (full - first) / (n - 1)
    return {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "first_token_s": first}


def runtime_row(handle: Any) -> dict[str, Any]:
    s = handle.stats()
    keep = ("hit_rate", "ready_rate", "prefetch_precision", "prefetch_issued", "misses", "evictions", "bytes_copied",
            "stall_s", "host_ms_per_layer", "sync_ms_per_layer", "decode_tokens", "decode_tokens_per_s")
    row = {k: s.get(k) for k in keep}
    row["runtime_config"] = s["config"]
    return row


def bench_default(dev: torch.device, quick: bool, tokens: int, fraction: float, repeats: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    overrides = dict(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=32, intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16) if quick else {}
    x = torch.tensor([encode(PROMPT)], device=dev)
    rows = []
    for impl in ("batched_mm", "grouped_mm"):
        model = default_model(dtype=dtype, experts_implementation=impl, **overrides).to(dev)
        L = model.config.num_hidden_layers
        total = L * model.config.num_experts
        peak_reset(dev)
        res = time_generate(model, x, tokens, dev, repeats)
        rows.append({"config": "resident", "experts_implementation": impl, **res, "peak_gpu_bytes": peak(dev)})
        base = res["ms_per_token"]
        configs = [("offload-100%", total, None, 0)]
        if impl == "batched_mm":
            configs += [(f"offload-{fraction:.0%}", max(1, int(total * fraction)), None, 0),
                        (f"offload-{fraction:.0%}+temporal-d1", max(1, int(total * fraction)), "temporal", 1)]
        for name, slots, pred, depth in configs:
            h = offload(model, cache_slots=max(slots, model.config.num_experts_per_tok), device=str(dev),
                        predictor=pred, prefetch_depth=depth)
            peak_reset(dev)
            res = time_generate(model, x, tokens, dev, repeats, handle=h)
            row = {"config": name, "experts_implementation": impl, **res, "peak_gpu_bytes": peak(dev),
                   **runtime_row(h)}
            if name == "offload-100%":
                row["overhead_ms_per_moe_layer_vs_resident"] = (res["ms_per_token"] - base) / L
            rows.append(row)
            h.remove()
        del model
        gc.collect()
    return {"model": "embedded default (Qwen3-MoE shape, random)", "dtype": str(dtype), "decode_tokens": tokens,
            "rows": rows}


# -- DeepSeek-V2-Lite shape -----------------------------------------------------------------------

def bench_deepseek(dev: torch.device, quick: bool, sequences: int, tokens: int, fraction: float,
                   trace_dir: str, repeats: int, configs: set[str] | None = None) -> dict[str, Any]:
    from moecache.predictors import PREDICTORS

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    if os.path.isfile(os.path.join(trace_dir, "manifest.json")):
        from moecache.trace import open_trace

        trace = open_trace(trace_dir)  # a trace imported beforehand (moecache trace import)
    else:
        trace = load_trace(trace_dir, files=sequences + 40)
    seq_ids = [int(s) for s in trace.sequences()]
    lengths = {s: int((trace.seq == s).sum()) for s in seq_ids}
    bench_seqs = [s for s in seq_ids if lengths[s] >= tokens][:sequences]
    if len(bench_seqs) < sequences:  # not enough long prompts: take the longest ones
        bench_seqs = sorted(seq_ids, key=lambda s: -lengths[s])[:sequences]
    fit_trace = trace.select_sequences([s for s in seq_ids if s not in bench_seqs])
    t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, store = build_deepseek(quick, dev, dtype)
    sync(dev)
    t_build = time.perf_counter() - t0
    L, E, k = 26, 64, 6
    total = L * E
    slots = int(total * fraction)

    def run(name: str, impl: str, **kw: Any) -> dict[str, Any]:
        """Warm up, then ``passes`` timed replays of the benchmark sequences; the fastest pass counts."""
        model.set_experts_implementation(impl)
        handle = None
        if kw:
            handle = offload(model, device=str(dev), host_store=store, own_store=False, **kw)
        run_forced(model, trace, sequences=bench_seqs[:1], max_tokens=min(32, tokens), prefill=1)  # warm-up
        if handle is not None:
            handle.reset_stats()
        peak_reset(dev)
        passes = [run_forced(model, trace, sequences=bench_seqs, max_tokens=tokens, prefill=1).as_dict()
                  for _ in range(repeats)]
        ms = [p["ms_per_decode_token"] for p in passes]
        row = {"config": name, "experts_implementation": impl, "ms_per_token": min(ms), "ms_per_token_passes": ms,
               "tokens_per_s": 1e3 / min(ms), "decode_tokens": passes[0]["decode_tokens"],
               "peak_gpu_bytes": peak(dev)}
        if handle is not None:
            row.update(runtime_row(handle))  # counts over every timed pass
            handle.remove(restore=False)
        passes_txt = ", ".join(f"{x:.2f}" for x in ms)
        print(f"  {name:34s} {impl:10s} {row['ms_per_token']:8.2f} ms/token  (passes {passes_txt})",
              flush=True)
        return row

    def resident(impl: str, label: str, sync_per_layer: bool = False) -> dict[str, Any]:
        """All experts on the GPU, unpatched. ``sync_per_layer``: plus one host copy of the routing per
        MoE layer (what the runtime's decision needs), to separate that cost from the runtime's own."""
        materialise_experts(model, store, dev)
        hooks = []
        if sync_per_layer:
            from moecache.families import find_moe_blocks, get_family

            def routing_to_host(_mod: nn.Module, args: tuple) -> None:
                args[1].cpu()  # the sync the runtime makes per MoE layer, alone

            hooks = [b.experts.register_forward_pre_hook(routing_to_host)
                     for b in find_moe_blocks(model, get_family("deepseek_v2"))]
        row = run(label, impl)
        for h in hooks:
            h.remove()
        release_experts(model)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return row

    pct = f"{fraction:.0%}"
    plan: list[tuple[str, Any]] = [
        ("resident", lambda: resident("batched_mm", "resident")),
        ("resident+sync", lambda: resident("batched_mm", "resident+sync", sync_per_layer=True)),
        ("offload-100%", lambda: run("offload-100%", "batched_mm", cache_slots=total)),
        ("resident-grouped", lambda: resident("grouped_mm", "resident")),
        ("offload", lambda: run(f"offload-{pct}", "batched_mm", cache_slots=slots)),
    ]
    for pname, depth in (("temporal", 1), ("transition", 1)):
        if pname in PREDICTORS:
            def with_pred(pname: str = pname, depth: int = depth) -> dict[str, Any]:
                pred = PREDICTORS.get(pname)(L, E, k)
                pred.fit(fit_trace)
                return run(f"offload-{pct}+{pname}-d{depth}", "batched_mm", cache_slots=slots, predictor=pred,
                           prefetch_depth=depth)
            plan.append((f"offload+{pname}", with_pred))
    plan += [
        ("offload-grouped", lambda: run(f"offload-{pct}", "grouped_mm", cache_slots=slots)),
        ("offload-stream", lambda: run(f"offload-{pct} (python stream engine)", "batched_mm", cache_slots=slots,
                                       engine="stream" if dev.type == "cuda" else "sync")),
        # The GPU's speed drifts over a run: the resident references again at the end.
        ("resident-again", lambda: resident("batched_mm", "resident (again)")),
        ("resident+sync-again", lambda: resident("batched_mm", "resident+sync (again)", sync_per_layer=True)),
        ("offload-100%-again", lambda: run("offload-100% (again)", "batched_mm", cache_slots=total)),
    ]
    rows = [fn() for key, fn in plan if configs is None or key in configs]

    def best(prefix: str) -> float | None:
        ms = [x["ms_per_token"] for x in rows if x["config"].split(" (")[0] == prefix
              and x["experts_implementation"] == "batched_mm"]
        return min(ms) if ms else None

    res, res_sync, off = best("resident"), best("resident+sync"), best("offload-100%")
    overhead = {"resident_ms": res, "resident_sync_ms": res_sync, "offload_100_ms": off}
    if res is not None and off is not None:
        overhead["runtime_vs_resident_ms_per_moe_layer"] = (off - res) / L
    if res is not None and res_sync is not None:
        overhead["routing_sync_ms_per_moe_layer"] = (res_sync - res) / L
    if res_sync is not None and off is not None:
        overhead["runtime_beyond_sync_ms_per_moe_layer"] = (off - res_sync) / L
    store.close()
    return {"model": "DeepSeek-V2-Lite shape (random weights, routing replayed)", "dtype": str(dtype),
            "trace": os.path.basename(trace_dir), "sequences": bench_seqs, "tokens_per_sequence": tokens,
            "fit_sequences": len(fit_trace.sequences()), "moe_layers": L, "timed_passes": repeats, "slots": slots,
            "total_experts": total,
            "expert_bytes": store.layout.slot_bytes, "host_store_bytes": total * store.layout.slot_bytes,
            "setup_s": {"trace": t_trace, "build": t_build}, "per_layer_overhead": overhead, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where to write the JSON results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of expert memory in the pool")
    ap.add_argument("--default-tokens", type=int, default=None, help="decode tokens per default-model run")
    ap.add_argument("--deepseek-sequences", type=int, default=None)
    ap.add_argument("--deepseek-tokens", type=int, default=None, help="rows replayed per sequence")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--trace-dir", default=TRACE_DIR, help="the raw trace folder, or a moecache trace of it")
    ap.add_argument("--configs", help="DeepSeek configurations to run (comma-separated keys: resident, "
                    "resident+sync, offload-100%%, resident-grouped, offload, offload+temporal, offload+transition, "
                    "offload-grouped, offload-stream, resident-again, resident+sync-again, offload-100%%-again)")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-deepseek", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    q = args.quick
    out: dict[str, Any] = {"machine": machine(), "args": vars(args), "results": {}}
    t_start = time.perf_counter()
    if not args.skip_default:
        print("embedded default model", flush=True)
        out["results"]["default"] = bench_default(dev, q, args.default_tokens or (8 if q else 128), args.fraction,
                                                  args.repeats or (1 if q else 3))
        write_json_atomic(args.out, out)
    if not args.skip_deepseek:
        print("DeepSeek-V2-Lite shape", flush=True)
        out["results"]["deepseek_v2_lite"] = bench_deepseek(
            dev, q, args.deepseek_sequences or (1 if q else 2), args.deepseek_tokens or (12 if q else 112),
            args.fraction, args.trace_dir, args.repeats or (1 if q else 2),
            set(args.configs.split(",")) if args.configs else None)
    out["wall_s"] = time.perf_counter() - t_start
    write_json_atomic(args.out, out)
    print(f"wrote {args.out} in {out['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
