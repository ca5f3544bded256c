"""Hybrid CPU-GPU expert execution at batch 1: decode speed against copy-only misses, the simulator's
estimate next to each measurement, and the CPU kernel's bandwidth against the host's.

Model: the Mixtral-8x7B expert shape (hidden 4096, intermediate 14336, 8 experts, top-2; 336 MiB
per expert in bf16) with ``--layers`` (4) decoder layers and the real attention shape (32 heads, 8
KV heads, vocabulary 32000), random bf16 weights: built on the meta device, the non-expert weights
materialised on the GPU, every expert generated into the pinned host store. Routing is replayed
(``moecache.forced_routing``) from the real Mixtral trace ``../shared/data/routing/
mixtral-8x7b-instruct-v0.1-fp8__speculative-moe`` (imported with ``moecache.trace.importers``):
trace layers evenly spread over the 32 (0, 8, 16, 24 for 4), the first ``--tokens`` decode
tokens of each of its 4 sequences, tokens with a missing record dropped.

Configurations, all with the same pool (``--slots``, default 2 of 8 experts per layer = 25%), LRU:
all experts resident (unpatched; its time less the experts' measured marginal GPU time gives the
non-expert time per layer the simulator needs); copy-only misses (``hybrid=False``);
``hybrid="auto"`` (the calibrated cost model, its CPU cost adapted online, the copy credited for the
hits it earns: ``moecache.cost.timing.reuse_credit``); ``hybrid="cpu"`` (every miss on the CPU); all
without prefetch, and copy-only and auto again with prefetch (``--predictor``, default temporal,
depth 1: ``+pf`` rows). Per row: ms per decode token (best of ``--passes`` timed passes after a
warm-up, cache warm), tokens/s, speed-up over copy-only, hit rate, decisions, CPU kernel time, the
hybrid rule's live inputs (CPU cost scale, reuse rate) and host ms per layer with CPU experts
(launching them, merging them), and the simulator's estimate (``moecache.sim.simulate``, the same
trace, LRU, capacity, predictor and miss rule: copy / auto / cpu, with the hardware profile the
runtime calibrated on this machine, its CPU times scaled as the auto run measured them).

Kernel bandwidth: the host's multi-threaded read bandwidth (the CPU pool's own threads summing 2
GiB of the host store) against the kernel's effective bandwidth (expert bytes / time, one token,
rotating over experts so nothing is cached), alone and while host-to-GPU copies of other experts
run on a CUDA stream (whose bandwidth is reported too); and the kernel's time for one expert with
1-64 tokens against one token (token blocking).

    python eval/hybrid_decode.py                 # GPU, ~5 min: eval/results/hybrid_decode.{json,md}
    python eval/hybrid_decode.py --quick --out-dir /tmp/hyb    # CPU smoke run, tiny shape, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "eval"))  # eval/_shapes.py

from moecache.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from moecache.families import find_moe_blocks, get_family  # noqa: E402
from moecache.forced_routing import run_forced  # noqa: E402
from moecache.runtime import offload  # noqa: E402
from moecache.runtime import hybrid as hy
from moecache.runtime import calibration as cal, cpu_kernel as ck  # noqa: E402
from moecache.runtime.hoststore import HostStore  # noqa: E402

# The published Mixtral routing logs; MOECACHE_MIXTRAL_ROUTING points elsewhere (the GPU machine has no ../shared).
TRACE_DIR = os.environ.get("MOECACHE_MIXTRAL_ROUTING") or os.path.join(
    os.path.dirname(ROOT), "shared", "data", "routing", "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")
TRACE_LAYERS = 32
TARGET_SPEEDUP = 1.3
TARGET_BANDWIDTH = 0.7
#: Tokens per expert of the kernel's token sweep.
SWEEP_TOKENS = (1, 2, 4, 8, 16, 64)


def machine() -> dict[str, Any]:
    import transformers

    from moecache._ext import extension, extension_status

    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "host": platform.node(), "cpu": cal._cpu_model(), "cpu_count": os.cpu_count(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "extension": extension_status()}
    C = extension()
    if C is not None:
        info["cpu_features"] = C.cpu_features()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# -- model and trace --------------------------------------------------------------------------------

def build(quick: bool, layers: int, dev: torch.device, dtype: torch.dtype, seed: int = 0
          ) -> tuple[nn.Module, HostStore]:
    """Meta build; non-experts random on ``dev``; experts random straight into the (pinned) host store
    (the shared builder of ``eval/_shapes.py``, Mixtral-8x7B shape with ``layers`` layers)."""
    from _shapes import build_model, mixtral_config

    return build_model(mixtral_config(quick, layers), "mixtral", dev, dtype, seed)


@torch.no_grad()
def set_resident(model: nn.Module, store: HostStore | None, dev: torch.device) -> None:
    """Put the store's experts on ``dev`` as the experts modules' parameters (None: back to meta)."""
    for i, b in enumerate(find_moe_blocks(model, get_family("mixtral"))):
        for name, p in list(b.experts._parameters.items()):
            value = store.layer_views(i)[name].to(dev, copy=True) if store is not None else \
                torch.empty(p.shape, dtype=p.dtype, device="meta")
            b.experts._parameters[name] = nn.Parameter(value, requires_grad=False)


def load_trace(layers: int, tokens: int) -> tuple[Any, list[int]]:
    """The real Mixtral routing at ``layers`` evenly spread trace layers, ``tokens`` per sequence."""
    from moecache.trace import Trace, TraceMeta
    from moecache.trace.importers import read_sources
    from moecache.trace.schema import RoutingBlock

    paths = sorted(glob.glob(os.path.join(TRACE_DIR, "*_routing.jsonl")))
    if not paths:
        raise SystemExit(f"no Mixtral routing files under {TRACE_DIR}")
    _src, traces, _defects = read_sources(paths)
    full = traces[0].trace()
    pick = [round(i * TRACE_LAYERS / layers) for i in range(layers)]
    ids = full.ids[:, pick, :]
    weights = full.weights[:, pick, :]
    keep = np.zeros(len(full), dtype=bool)
    for s in full.sequences():
        rows = np.nonzero((full.seq == s) & (ids >= 0).all(axis=(1, 2)))[0][:tokens]
        keep[rows] = True
    meta = TraceMeta(**{**full.meta.to_json(), "moe_layers": list(range(layers))})
    block = RoutingBlock(full.seq[keep], full.pos[keep], full.token[keep], full.step[keep], full.phase[keep],
                         np.ascontiguousarray(ids[keep]), np.ascontiguousarray(weights[keep]))
    trace = Trace(meta, block)
    return trace, pick


# -- decode runs ------------------------------------------------------------------------------------

def run_config(model: nn.Module, trace: Any, passes: int, warm_tokens: int, handle: Any = None) -> dict[str, Any]:
    """Warm up, then ``passes`` timed replays of every sequence; the fastest pass counts."""
    run_forced(model, trace, sequences=1, max_tokens=warm_tokens, prefill=1)
    if handle is not None:
        handle.reset_stats()
    results = [run_forced(model, trace, prefill=1).as_dict() for _ in range(passes)]
    ms = [r["ms_per_decode_token"] for r in results]
    row = {"ms_per_token": min(ms), "ms_per_token_passes": ms, "tokens_per_s": 1e3 / min(ms),
           "decode_tokens_per_pass": results[0]["decode_tokens"]}
    if handle is not None:
        s = handle.stats()
        for key in ("hit_rate", "misses", "accesses", "decisions", "cpu_experts", "cpu_tokens", "cpu_ms",
                    "cpu_wait_ms", "cpu_kernel", "cpu_kernel_experts", "stall_s", "bytes_copied", "copies",
                    "host_ms_per_layer", "sync_ms_per_layer", "layer_calls", "prefetch_issued", "prefetch_useful",
                    "cpu_layers", "cpu_launch_ms_per_layer", "cpu_launch_parts_ms_per_layer", "cpu_merge_ms_per_layer", "cpu_cost_scale",
                    "reuse_rate"):
            row[key] = s.get(key)
        row["hybrid"] = s["config"]["hybrid"]
    return row


def simulate_row(trace: Any, slots: int, profile: Any, rule: str, predictor: str | None = None) -> dict[str, Any]:
    from moecache.policies import new_policy
    from moecache.predictors import PREDICTORS
    from moecache.sim import Schedule, simulate

    m = trace.meta
    sched = Schedule(trace, decode_stream=True)
    pol = new_policy("lru", slots, m.num_layers, m.num_experts, top_k=m.top_k, scope="global")
    pred = PREDICTORS.get(predictor)(m.num_layers, m.num_experts, m.top_k) if predictor else None
    r = simulate(sched, pol, pred, depth=1 if pred is not None else 0, hardware=profile, miss_rule=rule, bound=False,
                 engine="python")
    return {"miss_rule": rule, "predictor": predictor, "ms_per_token": r.time_ms / r.tokens,
            "hit_rate": r.hits / r.accesses, "loads": r.loads, "cpu_runs": r.cpu_runs, "tokens": r.tokens}


# -- kernel bandwidth -------------------------------------------------------------------------------

def kernel_bandwidth(store: HostStore, dev: torch.device, reps: int) -> dict[str, Any]:
    """Host read GB/s (pool threads) vs the kernel's effective GB/s, alone and under H2D copies."""
    kernel = ck.CppKernel(store, ck.default_threads(), os.environ.get(hy.ENV_KERNEL, "auto") or "auto",
                          pin=dev.type == "cuda")
    kinds = {k.name: k for k in store.layout.kinds}
    H, I = kinds["down_proj"].shape
    expert_bytes = (kinds["gate_up_proj"].numel + kinds["down_proj"].numel) * store.layout.element_size
    # The read probe sums a whole layer block of the store (the kernel's own memory) as floats.
    block = store.blocks[0].view(-1).view(torch.float32)
    read = [kernel.read_bandwidth(block) for _ in range(reps)]
    keys = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    x = torch.randn(1, H).to(store.layout.dtype)
    turn = iter(range(1 << 62))

    def run_experts(n: int, x: torch.Tensor = x) -> list[float]:
        out = []
        for _ in range(n):
            layer, e = keys[next(turn) % len(keys)]
            out.append(kernel.wait(kernel.submit(layer, [e], x, [x.shape[0]]))[1])
        return out

    run_experts(2)  # warm-up
    alone = run_experts(reps)
    res: dict[str, Any] = {
        "kernel": kernel.name, "threads": kernel.threads, "expert_bytes": expert_bytes,
        "read_gbps": statistics.median(read), "read_gbps_all": read,
        "kernel_ms": statistics.median(alone), "kernel_gbps": expert_bytes / (statistics.median(alone) * 1e6),
    }
    res["kernel_vs_read"] = res["kernel_gbps"] / res["read_gbps"]
    # Token blocking: one expert with n tokens (a batch's or a prefill's rows) against one token.
    flops = 2 * 3 * H * I
    sweep = []
    for n in SWEEP_TOKENS:
        xn = torch.randn(n, H).to(store.layout.dtype)
        ms = statistics.median(run_experts(max(3, reps // 2), xn))
        sweep.append({"tokens": n, "ms": ms, "vs_one_token": ms / res["kernel_ms"], "gflops": n * flops / (ms * 1e6)})
    res["token_sweep"] = sweep
    if dev.type == "cuda":
        row_bytes = store.layout.slot_bytes
        dst = torch.empty(store.layout.slot_numel, dtype=store.layout.dtype, device=dev)
        stream = torch.cuda.Stream(dev)
        n_copies = max(8, int(reps * 1.5 * 2))

        def copies(n: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                a.record()
                for i in range(n):
                    dst.copy_(store.row(i % (store.num_layers * store.num_experts)), non_blocking=True)
                b.record()
            return a, b

        a, b = copies(n_copies)
        b.synchronize()
        res["copy_gbps_alone"] = n_copies * row_bytes / (a.elapsed_time(b) * 1e6)
        a, b = copies(n_copies)  # queued: they run while the kernel runs below
        under = run_experts(reps)
        busy = not b.query()
        b.synchronize()
        res["copy_gbps_with_kernel"] = n_copies * row_bytes / (a.elapsed_time(b) * 1e6)
        res["kernel_ms_with_copies"] = statistics.median(under)
        res["kernel_gbps_with_copies"] = expert_bytes / (statistics.median(under) * 1e6)
        res["kernel_vs_read_with_copies"] = res["kernel_gbps_with_copies"] / res["read_gbps"]
        res["copies_outlasted_kernel_runs"] = busy
    kernel.close()
    return res


# -- report -----------------------------------------------------------------------------------------

def _f(x: Any, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(res: dict[str, Any]) -> str:
    m, d = res["machine"], res["decode"]
    card = m.get("gpu", "CPU only")
    lines = [
        "# Hybrid CPU-GPU expert execution at batch 1",
        "",
        f"Card: {card}; CPU: {m['cpu']} ({m['cpu_count']} cores); date {m['date']}; torch {m['torch']}, "
        f"transformers {m['transformers']}.",
        f"Command: `{res['command']}`" + (" (quick: tiny shape on the CPU, not a measurement)" if res["quick"] else ""),
        "",
        f"Model: {d['model']}, {d['layers']} layers, {d['dtype']}; routing: {d['trace']} (trace layers "
        f"{d['trace_layers']}), {d['sequences']} sequences, {d['tokens_per_sequence']} tokens each; pool "
        f"{d['slots']} of {d['total_experts']} experts, LRU; prefetch only in the `+pf` rows ({d.get('predictor')}, "
        "depth 1). Simulator: same trace, LRU, capacity, predictor and miss rule (copy / auto / cpu), with the "
        "profile the runtime calibrated here (CPU times scaled as the auto run measured them) and the measured "
        "non-expert time.",
        "",
        "| configuration | ms/token | tokens/s | speed-up vs copy | simulator ms/token | hit rate "
        "| misses copied / on CPU (all passes) | CPU kernel ms/token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in d["rows"]:
        misses, on_cpu = row.get("misses"), row.get("cpu_experts")
        split = "" if misses is None else f"{misses - on_cpu} / {on_cpu}"
        n = (row.get("decode_tokens_per_pass") or 0) * len(row["ms_per_token_passes"])
        cpu_per_tok = None if row.get("cpu_ms") is None or not n else row["cpu_ms"] / n
        sim = row.get("simulated") or {}
        lines.append(
            f"| {row['config']} | {_f(row['ms_per_token'])} | {_f(row['tokens_per_s'], '.1f')} | "
            f"{_f(row.get('speedup_vs_copy'))} | {_f(sim.get('ms_per_token'))} | {_f(row.get('hit_rate'), '.3f')} | "
            f"{split} | {_f(cpu_per_tok)} |")
    sp = d.get("speedup_auto_vs_copy")
    lines += ["", f"Speed-up of hybrid auto over copy-only misses (both without prefetch): **{_f(sp)}x** (target "
                  f"{TARGET_SPEEDUP}x: {'met' if sp is not None and sp >= TARGET_SPEEDUP else 'NOT met'})."]
    hyb = [r for r in d["rows"] if r.get("hybrid")]
    if hyb:
        lines += ["", "Hybrid rows: the rule's live inputs and the host time of a layer with CPU experts "
                      "(launch: decision to kernel running, the hidden rows' sync included; merge: after the "
                      "wait, copy back, weighting, scatter).", "",
                  "| configuration | CPU cost scale (measured / calibrated) | reuse rate (hits per copy) | "
                  "layers with CPU experts | launch ms/layer | CPU wait ms/layer | merge ms/layer |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in hyb:
            n = r.get("cpu_layers") or 0
            wait = r["cpu_wait_ms"] / n if n and r.get("cpu_wait_ms") is not None else None
            lines.append(f"| {r['config']} | {_f(r.get('cpu_cost_scale'))} | {_f(r.get('reuse_rate'))} | {n} | "
                         f"{_f(r.get('cpu_launch_ms_per_layer'), '.3f')} | {_f(wait)} | "
                         f"{_f(r.get('cpu_merge_ms_per_layer'), '.3f')} |")
    prof = d.get("sim_profile")
    if prof:
        def table(t: dict[str, float]) -> str:
            return ", ".join(f"{n} tok {ms:.3f}" for n, ms in t.items())

        copy_ms = prof["bytes_per_expert"] / (prof["copy_bandwidth_gbps"] * 1e6)
        lines += ["", f"Simulator profile: copy {copy_ms:.2f} ms; "
                      f"GPU (marginal) {table(prof['gpu_ms'])} ms; CPU {table(prof['cpu_ms'])} ms; non-expert "
                      f"{table(prof['non_expert_ms'])} ms per layer; {prof['source']}."]
    k = res.get("kernel_bandwidth")
    if k:
        lines += ["", "## CPU kernel bandwidth", "",
                  f"Kernel {k['kernel']}, {k['threads']} threads, one expert of {k['expert_bytes'] / 2**20:.0f} MiB at "
                  "1 token.", "",
                  "| measurement | GB/s | share of host read |", "| --- | --- | --- |",
                  f"| host read (pool threads, fp32 sum) | {_f(k['read_gbps'], '.1f')} | 1.00 |",
                  f"| kernel alone ({_f(k['kernel_ms'])} ms per expert) | {_f(k['kernel_gbps'], '.1f')} | "
                  f"{_f(k['kernel_vs_read'])} |"]
        if "kernel_gbps_with_copies" in k:
            lines += [f"| kernel during H2D copies ({_f(k['kernel_ms_with_copies'])} ms) | "
                      f"{_f(k['kernel_gbps_with_copies'], '.1f')} | {_f(k['kernel_vs_read_with_copies'])} |",
                      f"| H2D copies alone | {_f(k['copy_gbps_alone'], '.1f')} | |",
                      f"| H2D copies during the kernel | {_f(k['copy_gbps_with_kernel'], '.1f')} | |"]
        lines += ["", f"Target: kernel at least {TARGET_BANDWIDTH:.0%} of the host read bandwidth: "
                      f"{'met' if k['kernel_vs_read'] >= TARGET_BANDWIDTH else 'NOT met'} alone."]
        if k.get("token_sweep"):
            lines += ["", "One expert with n tokens (token blocking: the weights are read once per job):", "",
                      "| tokens | ms | x one token | GFLOP/s |", "| --- | --- | --- | --- |"]
            lines += [f"| {r['tokens']} | {_f(r['ms'])} | {_f(r['vs_one_token'])} | {_f(r['gflops'], '.0f')} |"
                      for r in k["token_sweep"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "eval", "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shape on the CPU (smoke run of the script)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=None, help="pool slots (default: 2 per layer)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per sequence (default 64; quick 6)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="kernel bandwidth repetitions (default 20; quick 3)")
    ap.add_argument("--impl", default="batched_mm", help="experts implementation (batched_mm, grouped_mm)")
    ap.add_argument("--configs", default="resident,copy,auto,cpu,copy+pf,auto+pf",
                    help="resident, copy, auto, cpu, copy+pf, auto+pf (+pf: with prefetch)")
    ap.add_argument("--predictor", default="temporal", help="the +pf rows' predictor (depth 1)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    quick = args.quick
    tokens = args.tokens or (6 if quick else 64)
    reps = args.reps or (3 if quick else 20)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    L, E = args.layers, 8
    slots = args.slots or 2 * L
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    cmd = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])))
    res: dict[str, Any] = {"command": cmd, "quick": quick, "machine": machine()}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "hybrid_decode")

    t0 = time.perf_counter()
    trace, pick = load_trace(L, tokens)
    model, store = build(quick, L, dev, dtype)
    model.set_experts_implementation(args.impl)
    sync(dev)
    print(f"built in {time.perf_counter() - t0:.1f} s: {L} layers, {store.nbytes / 2**30:.2f} GiB of experts "
          "on the host", flush=True)
    decode: dict[str, Any] = {"model": "Mixtral-8x7B expert shape" + (" (quick: tiny)" if quick else ""),
                              "layers": L, "dtype": str(dtype).replace("torch.", ""),
                              "experts_implementation": args.impl,
                              "trace": os.path.basename(TRACE_DIR), "trace_layers": pick,
                              "sequences": len(trace.sequences()), "tokens_per_sequence": tokens,
                              "slots": slots, "total_experts": L * E, "expert_bytes": store.layout.slot_bytes,
                              "predictor": args.predictor, "rows": []}
    res["decode"] = decode
    rows = decode["rows"]
    warm = min(8, tokens)
    if "resident" in configs:
        set_resident(model, store, dev)
        row = {"config": "resident (all experts on the GPU)", **run_config(model, trace, args.passes, warm)}
        set_resident(model, None, dev)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  resident: {row['ms_per_token']:.2f} ms/token", flush=True)
    profile = None
    cpu_scale = None
    names = {"copy": "copy-only misses (hybrid off)", "auto": "hybrid auto",
             "cpu": "hybrid cpu (every miss on the CPU)",
             "copy+pf": f"copy-only misses + prefetch ({args.predictor})",
             "auto+pf": f"hybrid auto + prefetch ({args.predictor})"}
    for name, spec, rule in (("copy", False, "copy"), ("auto", "auto", "auto"), ("cpu", "cpu", "cpu"),
                             ("copy+pf", False, "copy"), ("auto+pf", "auto", "auto")):
        if name not in configs:
            continue
        pf = name.endswith("+pf")
        h = offload(model, cache_slots=slots, device=str(dev), host_store=store, own_store=False, hybrid=spec,
                    predictor=args.predictor if pf else None, prefetch_depth=1 if pf else 0)
        if h.runtime.hybrid is not None and h.runtime.hybrid.profile is not None:
            profile = h.runtime.hybrid.profile
        row = {"config": names[name], "key": name, "miss_rule": rule, "predictor": args.predictor if pf else None,
               **run_config(model, trace, args.passes, warm, h)}
        if name == "auto":
            cpu_scale = row.get("cpu_cost_scale")
        h.remove(restore=False)
        rows.append(row)
        print(f"  {name}: {row['ms_per_token']:.2f} ms/token, decisions {row.get('decisions')}, hit rate "
              f"{row.get('hit_rate')}", flush=True)
        write_json_atomic(stem + ".json", res)
    copy_ms = next((r["ms_per_token"] for r in rows if r.get("key") == "copy"), None)
    for r in rows:
        if copy_ms is not None and r.get("key"):
            r["speedup_vs_copy"] = copy_ms / r["ms_per_token"]
    auto = next((r for r in rows if r.get("key") == "auto"), None)
    decode["speedup_auto_vs_copy"] = auto.get("speedup_vs_copy") if auto else None

    # The simulator with the calibrated profile (CPU times as the auto run measured them) and the
    # measured non-expert time per layer.
    if profile is None and any(r.get("key") for r in rows):  # auto did not run: calibrate (or read the cache)
        h = offload(model, cache_slots=slots, device=str(dev), host_store=store, own_store=False, hybrid="auto")
        profile = h.runtime.hybrid.profile
        h.remove(restore=False)
    resident = next((r for r in rows if r["config"].startswith("resident")), None)
    if profile is not None:
        from moecache.cost.hardware import HardwareProfile

        hw = HardwareProfile(**{**profile.to_json()})
        sources = [profile.source]
        if cpu_scale is not None:
            hw.cpu_ms = {n: ms * cpu_scale for n, ms in hw.cpu_ms.items()}
            sources.append(f"CPU times x {cpu_scale:.3f} (the auto run's measured / calibrated)")
        if resident is not None:
            experts_gpu = L * 2 * profile.gpu(1)
            hw.non_expert_ms = {1: max(0.0, (resident["ms_per_token"] - experts_gpu) / L)}
            sources.append("non-expert time from the resident run")
        hw.source = "; ".join(sources)
        hw._cache.clear()
        decode["sim_profile"] = hw.to_json()
        for r in rows:
            if r.get("key"):
                r["simulated"] = simulate_row(trace, slots, hw, r["miss_rule"], r.get("predictor"))
    write_json_atomic(stem + ".json", res)

    res["kernel_bandwidth"] = kernel_bandwidth(store, dev, reps)
    kb = res["kernel_bandwidth"]
    print(f"  kernel {kb['kernel']}: {kb['kernel_gbps']:.1f} GB/s vs host read {kb['read_gbps']:.1f} GB/s "
          f"({kb['kernel_vs_read']:.0%})", flush=True)
    store.close()
    write_json_atomic(stem + ".json", res)
    write_text_atomic(stem + ".md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
