"""CPU expert kernels on compressed experts against the bf16 kernel, at batch 1, on real expert shapes.

    python eval/quant_cpu_kernels.py [--shapes deepseek,mixtral,gptoss] [--repeats 7] [--threads 1] [--no-fp32]
                                     [--rotate-mb 768] [--out-dir eval/results] [--quick]

For each shape (DeepSeek-V2-Lite: hidden 2048, intermediate 1408, top-6; Mixtral-8x7B: 4096 x 14336,
top-2; GPT-OSS-20B: 2880 x 2880, top-4, with its biases and clamped SwiGLU) one call of the C++ pool
``moecache._C.CpuExpertPool`` runs the layer's top-k experts on one token each, as the hybrid runtime
submits a layer's CPU experts: ``bf16`` (the dense kernel), ``int8 g64``, ``int4 g64``, ``int4 g128`` and
``mxfp4`` (the compressed kernels, dequantizing in registers; bf16 compute dtype). GPT-OSS's bf16 row runs
the dense kernel on the concatenated SiLU layout of the same size (the dense kernel does not take
GPT-OSS's transposed layout; the bytes read are the same). ``int8 g64 (fp32 compute)`` and ``int4 g64 (fp32
compute)`` run the same rows for an fp32 model (no rounding of the weights to bf16; int8 then takes the
factorised per-group form), SiLU shapes only (GPT-OSS's biases are stored in the compute dtype). Every
compressed format also runs in the fast mode (``... fast``: ``submit_quant(..., fast=True)``, int16
activations and integer dot products; ``moecache.runtime.cpu_kernel.QUANT_MODES``) on the same rows.

Each format's experts rotate over a set of at least ``--rotate-mb`` MiB, so every call reads its experts
from memory, not from the caches. Repeats are interleaved (each repeat runs every format once, and one
multi-threaded read of the bf16 block with the same threads: the host's read bandwidth in the same run).
Reported: median wall ms per call (``prewake``, submit, wait: what the runtime pays), its range, the
speed-up over bf16 (ratio of medians), the effective bandwidth (compressed bytes the call reads / time)
against the host's, and the kernel's error against the torch reference (``cpu_kernel.reference_ffn``:
float64 sums over moecache.quant's dequantized weights; for bf16, float64 sums over the bf16 weights):
max |err| and max |err| / max |reference|. Also, per format, one expert run over and over from the caches
(``--hot-repeats``), with the bf16 and the fp32 compute dtype: the kernels' instruction cost without the
memory, and what rounding the weights to bf16 adds. Writes ``quant_cpu_kernels.json`` and ``.md``.
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
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecache._ext import extension  # noqa: E402
from moecache.atomic import write_json_atomic  # noqa: E402
from moecache.quant import ExpertCodec, ExpertFormat  # noqa: E402
from moecache.runtime import cpu_kernel as ck  # noqa: E402
from moecache.runtime.layout import SlotLayout  # noqa: E402

#: name -> (hidden, intermediate, top-k, GPT-OSS math)
SHAPES = {"deepseek": (2048, 1408, 6, False), "mixtral": (4096, 14336, 2, False), "gptoss": (2880, 2880, 4, True)}
QUICK = {"deepseek": (256, 128, 6, False), "mixtral": (512, 256, 2, False), "gptoss": (320, 320, 4, True)}
FORMATS = [("bf16", 0), ("int8", 64), ("int4", 64), ("int4", 128), ("mxfp4", 32)]
#: formats also run (from memory) with an fp32 compute dtype: no rounding of the weights to bf16
FP32_ROWS, FP32 = ("int8", "int4"), " (fp32 compute)"
#: suffix of the fast-mode rows
FAST = " fast"
ALPHA, LIMIT = 1.702, 7.0


def _bf16_random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """bf16 values of magnitude 2^-7 .. 2^-6 with random sign and mantissa (no subnormals, no specials)."""
    r = torch.randint(0, 256, shape, generator=gen, dtype=torch.int16)
    bits = ((r & 0x80) << 8) | (120 << 7) | (r & 0x7F)
    return bits.view(torch.bfloat16)


class _Meta(nn.Module):
    def __init__(self, H: int, I: int, gpt_oss: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        kw = {"device": "meta", "dtype": dtype}
        if gpt_oss:
            self.gate_up_proj = nn.Parameter(torch.empty(1, H, 2 * I, **kw))
            self.gate_up_proj_bias = nn.Parameter(torch.empty(1, 2 * I, **kw))
            self.down_proj = nn.Parameter(torch.empty(1, I, H, **kw))
            self.down_proj_bias = nn.Parameter(torch.empty(1, H, **kw))
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(1, 2 * I, H, **kw))
            self.down_proj = nn.Parameter(torch.empty(1, H, I, **kw))


def compressed_rows(H: int, I: int, gpt_oss: bool, fmt: str, group: int, n: int, seed: int,
                    dtype: torch.dtype = torch.bfloat16) -> tuple[ExpertCodec, torch.Tensor]:
    """``n`` compressed experts: random codes, scales and zeros in the ranges a quantizer produces."""
    codec = ExpertCodec(SlotLayout.from_module(_Meta(H, I, gpt_oss, dtype), 1), ExpertFormat(fmt, group),
                        transposed=gpt_oss)
    rows = torch.empty((n, codec.slot_numel), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    for e in range(n):
        for name, v in codec.views(rows[e:e + 1]).items():
            sub = name.split("/")[1]
            if sub in ("q", "blocks"):
                v.copy_(torch.randint(0, 256, v.shape, generator=gen, dtype=torch.uint8))
            elif sub == "scale":
                v.copy_((torch.rand(v.shape, generator=gen) * 0.004 + 0.001).to(torch.float16))
            elif sub == "zero":
                lo, hi = (100, 156) if fmt == "int8" else (5, 11)
                v.copy_(torch.randint(lo, hi, v.shape, generator=gen, dtype=torch.uint8))
            elif sub == "scales":
                v.copy_(torch.randint(118, 122, v.shape, generator=gen, dtype=torch.uint8))
            else:  # biases (bf16)
                v.copy_((torch.randn(v.shape, generator=gen) * 0.1).to(torch.bfloat16))
    return codec, rows


def bench_shape(C, name: str, H: int, I: int, k: int, gpt_oss: bool, args) -> dict:
    pool = C.CpuExpertPool(args.threads, "auto")
    act = ck.ACT_GPT_OSS if gpt_oss else ck.ACT_SILU
    gen = torch.Generator().manual_seed(0)
    rotate = args.rotate_mb * 2**20
    dense_bytes = 3 * H * I * 2
    n_bf16 = max(2 * k, -(-rotate // dense_bytes))
    t0 = time.perf_counter()
    gu = _bf16_random((n_bf16, 2 * I, H), gen)
    dn = _bf16_random((n_bf16, H, I), gen)
    fmts, skipped = {}, []
    for fmt, g in FORMATS[1:]:
        if H % g or I % g:  # GPT-OSS's 2880 takes groups of 32 or 64
            skipped.append(f"{fmt} g{g}")
            continue
        codec, _ = compressed_rows(H, I, gpt_oss, fmt, g, 0, 0)
        n = max(2 * k, -(-rotate // codec.slot_numel))
        codec, rows = compressed_rows(H, I, gpt_oss, fmt, g, n, seed=hash((fmt, g)) % 1000)
        label = f"{fmt} g{g}" if fmt != "mxfp4" else "mxfp4"
        # (codec, rows, offsets, bf16 compute, reference codec, fast mode, where in the rotation set it starts)
        fmts[label] = (codec, rows, ck.quant_offsets(codec), True, codec, False, 0)
        fmts[label + FAST] = (codec, rows, ck.quant_offsets(codec), True, codec, True, n // 3)
        if fmt in FP32_ROWS and g == 64 and not gpt_oss and not args.no_fp32:  # an fp32 compute dtype
            codec32, _ = compressed_rows(H, I, gpt_oss, fmt, g, 0, 0, torch.float32)
            fmts[label + FP32] = (codec, rows, ck.quant_offsets(codec), False, codec32, False, 2 * n // 3)
    print(f"[{name}] built rotation sets in {time.perf_counter() - t0:.1f} s", flush=True)
    x = torch.randn(k, H, generator=gen).bfloat16().float()  # a bf16 model's hidden rows
    out = torch.empty(k, H)
    xs = [x[i:i + 1].data_ptr() for i in range(k)]
    outs = [out[i:i + 1].data_ptr() for i in range(k)]
    turn = {"bf16": 0, **{f: 0 for f in fmts}}

    def call(fmt: str) -> float:
        j = turn[fmt]
        t0 = time.perf_counter()
        pool.prewake()
        if fmt == "bf16":
            es = [(j * k + i) % n_bf16 for i in range(k)]
            t = pool.submit(H, I, 1, xs, [1] * k, [gu[e].data_ptr() for e in es], [dn[e].data_ptr() for e in es], outs)
        else:
            codec, rows, offs, bf16, _, fast, base = fmts[fmt]
            # the variants of one format read other thirds of their shared rotation set (not what the last one read)
            es = [(base + j * k + i) % rows.shape[0] for i in range(k)]
            t = pool.submit_quant(H, I, ck.QUANT_FORMAT_CODES[codec.fmt.name], codec.fmt.group_size, bf16, act, ALPHA,
                                  LIMIT, offs, xs, [1] * k, [rows[e].data_ptr() for e in es], outs, fast)
        pool.wait(t)
        turn[fmt] = j + 1
        return 1e3 * (time.perf_counter() - t0)

    names = ["bf16", *fmts]
    for f in names:  # warm-up: page faults, the workers' first wake-up
        call(f)
    times: dict[str, list[float]] = {f: [] for f in names}
    read_gbps: list[float] = []
    read_bytes = gu.numel() * 2
    for rep in range(args.repeats):
        for f in names:
            times[f].append(call(f))
        ms, _ = pool.read(gu.data_ptr(), read_bytes)
        read_gbps.append(read_bytes / (ms * 1e6))
        print(f"[{name}] repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{f} {times[f][-1]:.2f}" for f in names)
              + f" ms; read {read_gbps[-1]:.1f} GB/s", flush=True)
    host = statistics.median(read_gbps)
    # In cache: one expert over and over (its weights stay in the caches), the pool's own ms per call, with
    # a bf16 and an fp32 compute dtype (no rounding of the weights): the kernels' instruction cost.
    hot: dict[str, dict[str, float]] = {}
    hot_ms: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.hot_repeats):
        for f in names:
            if f.endswith(FP32):  # measured below, with its bf16 twin's rows
                continue
            for bf16 in ((True,) if f == "bf16" or f.endswith(FAST) or args.no_fp32 else (True, False)):
                if f == "bf16":
                    t = pool.submit(H, I, 1, [x[:1].data_ptr()], [1], [gu[0].data_ptr()], [dn[0].data_ptr()],
                                    [out[:1].data_ptr()])
                else:
                    codec, rows, offs, _, _, fast, _ = fmts[f]
                    t = pool.submit_quant(H, I, ck.QUANT_FORMAT_CODES[codec.fmt.name], codec.fmt.group_size, bf16,
                                          act, ALPHA, LIMIT, offs, [x[:1].data_ptr()], [1], [rows[0].data_ptr()],
                                          [out[:1].data_ptr()], fast)
                hot_ms.setdefault((f, bf16), []).append(pool.wait(t))
    weights = 3 * H * I
    for (f, bf16), v in hot_ms.items():
        hot[f + ("" if bf16 else " (fp32 compute)")] = {
            "median_ms": statistics.median(v), "min_ms": min(v), "gweights_per_s": weights / (statistics.median(v) * 1e6)}
    # Errors against the reference: one expert per format, k token rows.
    errors = {}
    e_out = torch.empty(k, H)
    for f in names:
        if f == "bf16":
            t = pool.submit(H, I, 1, [x.data_ptr()], [k], [gu[0].data_ptr()], [dn[0].data_ptr()], [e_out.data_ptr()])
            pool.wait(t)
            h = x.double() @ gu[0].double().t()
            ref = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ dn[0].double().t()
            del h
        else:
            codec, rows, offs, bf16, ref_codec, fast, _ = fmts[f]
            t = pool.submit_quant(H, I, ck.QUANT_FORMAT_CODES[codec.fmt.name], codec.fmt.group_size, bf16, act, ALPHA,
                                  LIMIT, offs, [x.data_ptr()], [k], [rows[0].data_ptr()], [e_out.data_ptr()], fast)
            pool.wait(t)
            ref = ck.reference_ffn(ref_codec, rows[0], x, act, ALPHA, LIMIT)
        d = (e_out.double() - ref).abs().max().item()
        errors[f] = {"max_abs": d, "max_rel": d / ref.abs().max().item()}
        del ref
    bf_med = statistics.median(times["bf16"])
    rows_out = {}
    for f in names:
        med = statistics.median(times[f])
        nbytes = k * (dense_bytes if f == "bf16" else fmts[f][0].slot_numel)
        rows_out[f] = {"median_ms": med, "min_ms": min(times[f]), "max_ms": max(times[f]), "all_ms": times[f],
                       "speedup_vs_bf16": bf_med / med, "bytes_per_call": nbytes,
                       "effective_gbps": nbytes / (med * 1e6), "fraction_of_host_read": nbytes / (med * 1e6) / host,
                       **errors[f]}
    result = {"shape": name, "hidden": H, "intermediate": I, "experts_per_call": k, "gpt_oss_math": gpt_oss,
              "skipped": [f"{f}: its group size does not divide {H} / {I}" for f in skipped],
              "kernel": pool.kernel(), "quant_kernel": pool.quant_kernel(), "quant_kernel_fast": pool.quant_kernel(True),
              "threads": pool.threads(),
              "rotation_experts": {"bf16": n_bf16, **{f: fmts[f][1].shape[0] for f in fmts}},
              "host_read_gbps": {"median": host, "min": min(read_gbps), "max": max(read_gbps)},
              "formats": rows_out, "in_cache_one_expert": hot}
    pool.close()
    return result


def _machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "features": extension().cpu_features(),
            "torch": torch.__version__, "python": platform.python_version()}


def write_md(res: dict, path: Path) -> None:
    lines = [f"# CPU expert kernels on compressed experts (batch 1)", "",
             f"{res['date']} on {res['machine']['cpu']} ({res['machine']['cores']} cores); command: "
             f"`{res['command']}`; load average {res['load_average_start']} at the start, {res['load_average_end']} "
             f"at the end{' (other jobs shared the machine)' if res['shared'] else ''}.", "",
             "Wall ms per call of the layer's top-k experts, one token each (median of interleaved repeats, range); "
             "speed-up = bf16 median / format median; effective GB/s = compressed bytes read per call / median; "
             "error = kernel against the float64 torch reference (max |err|, and over max |reference|).", ""]
    for s in res["shapes"]:
        h = s["host_read_gbps"]
        lines += [f"## {s['shape']}: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['experts_per_call']} "
                  f"experts per call{', GPT-OSS biases and clamp' if s['gpt_oss_math'] else ''}", "",
                  f"Kernels {s['kernel']} (bf16) / {s['quant_kernel']} (compressed) / {s['quant_kernel_fast']} (compressed, "
                  f"fast), {s['threads']} thread(s); host "
                  f"read {h['median']:.1f} GB/s (range {h['min']:.1f}-{h['max']:.1f}) with the same threads.", "",
                  "| format | ms (median) | range | speed-up vs bf16 | MB per call | effective GB/s | of host read "
                  "| max abs err | max rel err |", "|---|---|---|---|---|---|---|---|---|"]
        for f, r in s["formats"].items():
            lines.append(f"| {f} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | "
                         f"{r['speedup_vs_bf16']:.2f}x | {r['bytes_per_call'] / 2**20:.1f} | {r['effective_gbps']:.1f} | "
                         f"{100 * r['fraction_of_host_read']:.0f}% | {r['max_abs']:.2e} | {r['max_rel']:.2e} |")
        lines += [f"Not run: {x}." for x in s["skipped"]]
        lines += ["", f"One expert over and over ({res['hot_repeats']} interleaved repeats, the pool's ms per call; its "
                  "weights stay in the last-level cache where they fit, not for Mixtral; fp32 compute = no rounding "
                  "of the weights to bf16):", "",
                  "| kernel | ms (median) | min | G weights/s |", "|---|---|---|---|"]
        lines += [f"| {f} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['gweights_per_s']:.1f} |"
                  for f, r in s["in_cache_one_expert"].items()]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="deepseek,mixtral,gptoss", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median reported; at least 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU pool threads (the runtime's default here: cores - 2)")
    p.add_argument("--hot-repeats", type=int, default=15, help="repeats of the in-cache measurement")
    p.add_argument("--rotate-mb", type=int, default=768, help="MiB each format's experts rotate over")
    p.add_argument("--out-dir", default=str(ROOT / "eval" / "results"))
    p.add_argument("--name", default="quant_cpu_kernels", help="output file stem")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; not a measurement)")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32-compute rows (a shorter run)")
    args = p.parse_args()
    C = extension()
    if C is None:
        sys.exit("moecache._C is not built; build it (python setup.py build_ext --inplace) and rerun")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        sys.exit(f"unknown shape(s) {bad}; valid: {', '.join(SHAPES)}")
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    torch.set_num_threads(1)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
           "command": " ".join(["python", "eval/quant_cpu_kernels.py", *sys.argv[1:]]),
           "load_average_start": [round(v, 2) for v in os.getloadavg()], "repeats": args.repeats,
           "hot_repeats": args.hot_repeats, "shapes": []}
    for s in shapes:
        H, I, k, gpt = (QUICK if args.quick else SHAPES)[s]
        res["shapes"].append(bench_shape(C, s, H, I, k, gpt, args))
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    res["shared"] = max(res["load_average_start"][0], res["load_average_end"][0]) > 1.5
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / f"{args.name}.json"), res)
    write_md(res, out / f"{args.name}.md")
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
