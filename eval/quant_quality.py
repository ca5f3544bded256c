"""Quality of the compressed expert formats on the trained qwen3moe-tiny-code model, and the kernels' error.

    python eval/quant_quality.py bpb --formats bf16,int8,int4:64 [--chunks N] [--threads 1]
    python eval/quant_quality.py agree --formats int8,int4:64 [--tokens 256]
    python eval/quant_quality.py report            # writes eval/results/quant_quality.md from the JSON

``bpb``: bits per byte of the model (bf16 on the CPU) on ``heldout_sample.txt`` (NumPy/SciPy sources the
model never saw in training), cut into consecutive 512-byte chunks, each one sequence; every byte after
the first of a chunk is predicted (511 per chunk); the whole file unless ``--chunks`` says fewer. A
format ``NAME[:GROUP][-rtn]`` quantizes the routed experts in place with ``moecache.quant`` (exactly the
weights the offloaded runtime computes with): ``-rtn`` is plain round-to-nearest over each group's range,
without it the clipping search weighted by calibration activations. Calibration text is training-like
data, never the held-out file: ASCII ``.py`` files of this machine's installed packages (NumPy and
SciPy excluded, as in training), ``--calib-chunks`` chunks of 512 bytes. Results are merged into
``eval/results/quant_quality.json`` (one key per format and chunk count), so formats can run as
separate processes (each well under ten minutes on the 2-core VM).

``--cpu-kernel exact|fast`` (``bpb`` only, compressed formats): instead of quantizing in place, the bf16
model is offloaded with ``expert_dtype`` (moecache's own quantization: the clipping search on the plain
weight error, no calibration) and one cache slot per layer, with every miss run by the C++ CPU kernel
from the compressed rows in that ``quant_mode`` (``HybridConfig(rule="cpu")``): the fast mode's quality
against the exact one on the same codes. Entries are keyed ``FORMAT@cpu-MODE``.

``agree``: greedy decoding of 256 tokens from 8 prompts (the first bytes of held-out chunks spread
through the file), the fraction of generated tokens equal to the bf16 model's, position by position.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import hashlib
import json
import math
import platform
import site
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "qwen3moe-tiny-code"
RESULTS = ROOT / "eval" / "results" / "quant_quality.json"
CHUNK = 512


def calibration_chunks(n: int, vocab: int) -> list[list[int]]:
    """``n`` chunks of 512 bytes of ASCII ``.py`` files (at least 4 KiB) of the installed packages (no numpy, no
    scipy), files picked deterministically by a hash of their path, each chunk from an offset inside the file."""
    roots = [Path(p) for p in site.getsitepackages()]
    files = []
    for r in roots:
        for f in r.rglob("*.py"):
            top = f.relative_to(r).parts[0]
            if top.startswith(("numpy", "scipy")):
                continue
            files.append(f)
    files.sort(key=lambda f: hashlib.sha256(str(f.relative_to(f.parents[len(f.parents) - 1])).encode()).hexdigest())
    out: list[list[int]] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if len(data) < 8 * CHUNK or max(data) >= vocab:
            continue
        # From inside the file (its head is mostly licence text and imports), at an offset set by its path.
        at = int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) % (len(data) - CHUNK)
        out.append(list(data[at:at + CHUNK]))
        if len(out) == n:
            break
    return out


def parse_format(spec: str):
    from moecache.quant import resolve_format

    rtn = spec.endswith("-rtn")
    name = spec[:-4] if rtn else spec
    if name == "bf16":
        return None, False
    base, _, g = name.partition(":")
    return resolve_format(base, int(g) if g else None), rtn


_HESSIANS: dict[int, dict] = {}


def load_model(model_dir: Path, spec: str, calib_chunks: int):
    import torch
    from transformers import AutoModelForCausalLM

    from moecache.quant import collect_importance, quantize_dequantize_

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    fmt, rtn = parse_format(spec)
    if fmt is not None:
        imp = None
        if not rtn and calib_chunks:
            if calib_chunks not in _HESSIANS:  # the bf16 model's, shared by every format of this run
                _HESSIANS[calib_chunks] = collect_importance(model, calibration_chunks(calib_chunks,
                                                                                       model.config.vocab_size))
            imp = _HESSIANS[calib_chunks]
        quantize_dequantize_(model, fmt, importance=imp, search=not rtn)
    return model


def offload_cpu_kernel(model, spec: str, mode: str, threads: int):
    """``model`` offloaded with the format of ``spec`` (no ``-rtn``), one slot per layer, every miss on the C++
    CPU kernel in ``mode``; returns the offload handle."""
    from moecache.runtime import offload
    from moecache.runtime.hybrid import HybridConfig

    fmt, rtn = parse_format(spec)
    if fmt is None or rtn:
        raise SystemExit(f"--cpu-kernel takes compressed formats without -rtn (offload quantizes itself); got {spec!r}")
    layers = model.config.num_hidden_layers
    return offload(model, cache_slots=layers, device="cpu", engine="sync", expert_dtype=fmt.name,
                   group_size=fmt.group_size, hybrid=HybridConfig(rule="cpu", threads=threads, quant_mode=mode))


def bits_per_byte(model, data: bytes, chunks: int, batch: int, progress: bool) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    total_nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for s in tqdm(range(0, chunks, batch), desc="chunks", unit="batch", disable=not progress):
            n = min(batch, chunks - s)
            ids = torch.tensor(list(data[s * CHUNK:(s + n) * CHUNK]), dtype=torch.long).view(n, CHUNK)
            logits = model(ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            total_nats += float(loss)
            total_bytes += n * (CHUNK - 1)
    return total_nats / total_bytes / math.log(2), total_bytes


def greedy(model, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens,
                               eos_token_id=None, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def _merge(key: str, value: dict) -> None:
    from moecache.atomic import write_text_atomic

    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(str(RESULTS), json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("bpb", "agree", "report"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--formats", default="bf16")
    ap.add_argument("--chunks", type=int, default=0, help="512-byte chunks (0: the whole file)")
    ap.add_argument("--start", type=int, default=0, help="first chunk (to split the file over several runs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-chunks", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-kernel", choices=("exact", "fast"), default=None,
                    help="bpb through the offloaded model's C++ CPU kernel in this quant_mode (see above)")
    args = ap.parse_args()
    if args.cpu_kernel and args.what != "bpb":
        ap.error("--cpu-kernel goes with bpb")
    import torch

    torch.set_num_threads(args.threads)
    if args.what == "report":
        return report()
    if not (args.model / "config.json").is_file():
        print(f"model not found at {args.model}", file=sys.stderr)
        return 2
    data = (args.model / "heldout_sample.txt").read_bytes()
    chunks = args.chunks or len(data) // CHUNK - args.start
    data = data[args.start * CHUNK:]
    progress = sys.stderr.isatty()
    for spec in args.formats.split(","):
        t0 = time.perf_counter()
        handle = None
        if args.cpu_kernel:
            model = load_model(args.model, "bf16", 0)
            handle = offload_cpu_kernel(model, spec, args.cpu_kernel, args.threads)
        else:
            model = load_model(args.model, spec, args.calib_chunks)
        t1 = time.perf_counter()
        fmt, rtn = parse_format(spec)
        method = "bf16" if fmt is None else ("round-to-nearest" if rtn else
                                             ("GPTQ" if args.calib_chunks else "clipping search"))
        if handle is not None:
            method = f"offload's clipping search, CPU kernel {args.cpu_kernel} mode"
        stamp = {"method": method, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.node(),
                 "threads": args.threads, "command": " ".join(sys.argv), "calib_chunks": args.calib_chunks,
                 "quantize_s": round(t1 - t0, 1)}
        if args.what == "bpb":
            bpb, n = bits_per_byte(model, data, chunks, args.batch, progress)
            stamp.update(bits_per_byte=bpb, predicted_bytes=n, chunks=chunks, start=args.start,
                         eval_s=round(time.perf_counter() - t1, 1))
            if handle is not None:
                st = handle.stats()
                stamp.update(cpu_kernel=st["cpu_kernel"], cpu_experts=st["cpu_experts"],
                             cpu_kernel_experts=st["cpu_kernel_experts"])
                handle.remove()
                spec = f"{spec}@cpu-{args.cpu_kernel}"
            _merge(f"bpb/{spec}/{args.start}+{chunks}", stamp)
            print(f"{spec}: {bpb:.5f} bits/byte over {n} bytes ({chunks} chunks) in {time.perf_counter() - t1:.0f} s")
        else:
            step = len(data) // CHUNK // 8  # prompts spread through the file
            prompts = [list(data[i * step * CHUNK:i * step * CHUNK + 64]) for i in range(8)]
            toks = greedy(model, prompts, args.tokens)
            _merge(f"gen/{spec}/{args.tokens}", {**stamp, "tokens": toks})
            print(f"{spec}: generated {sum(map(len, toks))} tokens in {time.perf_counter() - t1:.0f} s")
    return 0


def report() -> int:
    from moecache.atomic import write_text_atomic

    data = json.loads(RESULTS.read_text())
    lines = ["# Compressed experts: quality on qwen3moe-tiny-code", "",
             "Written by `python eval/quant_quality.py report` from `quant_quality.json` (each entry keeps its "
             "date, machine, thread count and command). bf16 compute on the CPU; formats quantize the routed "
             "experts in place with `moecache.quant` (the weights the offloaded runtime computes with).", "",
             "## Bits per byte on heldout_sample.txt", "",
             "| format | method | chunks x 512 B | bits/byte | vs bf16 | quantize s | eval s |",
             "|---|---|---|---|---|---|---|"]
    bpb = {k: v for k, v in data.items() if k.startswith("bpb/")}
    for key in sorted(bpb, key=lambda k: (k.split("/")[2], k)):
        _, spec, chunks = key.split("/")
        v = bpb[key]
        base = bpb.get(f"bpb/bf16/{chunks}")
        start, _, n = chunks.partition("+")
        chunks = f"{n} from chunk {start}"
        rel = "" if base is None else f"{(v['bits_per_byte'] / base['bits_per_byte'] - 1) * 100:+.3f}%"
        lines.append(f"| {spec} | {v.get('method', '')} | {chunks} | {v['bits_per_byte']:.5f} | {rel} | {v['quantize_s']} | "
                     f"{v.get('eval_s', '')} |")
    gen = {k: v for k, v in data.items() if k.startswith("gen/")}
    if gen:
        lines += ["", "## Greedy agreement with bf16", "", "| format | tokens | agreement | first divergence (median) |",
                  "|---|---|---|---|"]
        for key in sorted(gen):
            _, spec, n = key.split("/")
            ref = gen.get(f"gen/bf16/{n}")
            if ref is None or spec == "bf16":
                continue
            same = tot = 0
            firsts = []
            for a, b in zip(gen[key]["tokens"], ref["tokens"]):
                same += sum(x == y for x, y in zip(a, b))
                tot += len(b)
                firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b)))
            firsts.sort()
            lines.append(f"| {spec} | {n} x {len(ref['tokens'])} | {same / tot:.3f} | {firsts[len(firsts) // 2]} |")
    out = RESULTS.with_suffix(".md")
    write_text_atomic(str(out), "\n".join(lines) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
