"""Benchmark: peak host memory of ``moecache.from_pretrained`` on a multi-GB checkpoint (goal: model
size plus one layer).

    python eval/from_pretrained_memory.py [--layers 4] [--device cuda] [--dir DIR] [--baseline] [--out FILE]
    python eval/from_pretrained_memory.py --tiny      # CPU smoke test (seconds)
    python eval/from_pretrained_memory.py --scale 4 --expert-dtype int4 --device cpu --gpu-memory 1GiB
        # Mixtral's shape with every dimension divided by 4 (the encoder's clipping search is CPU-bound)

1. Writes a Mixtral-8x7B-shape checkpoint (hidden 4096, 8 experts of 4096 x 14336, bf16) with
   ``--layers`` decoder layers, in the Hub's per-expert layout (``...block_sparse_moe.experts.N.w1``):
   the tensor names are those ``save_pretrained`` writes for a small model of the same family and depth
   (saved first), scaled to the full dimensions; values are random, written shard by shard (2 GiB).
2. Loads it in a fresh process with ``moecache.from_pretrained`` while a thread samples
   ``/proc/self/status`` every 2 ms: peak resident memory in all (VmHWM, exact: the kernel's own peak),
   anonymous (the host store, weights, temporaries), file-backed (mapped checkpoint pages) and shared.
   The peak is split in two phases: *reading* (the checkpoint read into the host store and the model,
   the experts encoded on the way when compressed) and *offload* (``moecache.offload`` builds the pool
   and its buffers: on ``--device cpu`` these live in host memory, on a GPU host on the GPU); VmHWM is
   reset between them (``/proc/self/clear_refs``). Module imports (transformers' model class and its
   conversion rules) happen before the baseline reading, so code pages are not counted as data.
   Budgets: bf16 (as stored) -- the checkpoint's bytes plus one MoE layer's experts; ``--expert-dtype
   int4`` (or int8), issue 16's target -- the compressed store plus one bf16 MoE layer's experts plus the
   non-expert weights.
3. ``--baseline``: the same for transformers' ``AutoModelForCausalLM.from_pretrained`` on the CPU.

Writes one JSON object (machine, date, command, sizes, peaks, times) to ``--out`` atomically. A failed
loading process is reported with its exit status, a one-line summary and the tail of its stderr (also
kept in the JSON), and the script exits non-zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FULL = {"hidden": 4096, "kv": 1024, "intermediate": 14336, "vocab": 32000}
# Tiny dimensions, pairwise distinct, so every tiny shape maps to one full shape.
TINY = {"hidden": 24, "kv": 12, "intermediate": 40, "vocab": 50}


def mixtral_config(dims: dict[str, int], layers: int) -> Any:
    from transformers import MixtralConfig

    heads = 32 if dims["hidden"] == 4096 else max(4, dims["hidden"] // 128)
    head_dim = dims["hidden"] // heads
    return MixtralConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=dims["kv"] // head_dim, head_dim=head_dim, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                         dtype="bfloat16")


def write_checkpoint(path: str, layers: int, dims: dict[str, int], shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """The per-expert checkpoint at full ``dims``; returns its byte count and tensor names."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    scale = {TINY[k]: dims[k] for k in TINY}
    with tempfile.TemporaryDirectory() as tiny_dir:
        tiny = MixtralForCausalLM(mixtral_config(TINY, layers)).to(torch.bfloat16)
        tiny.save_pretrained(tiny_dir)
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        for name in sorted(os.listdir(tiny_dir)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(tiny_dir, name), framework="pt") as f:
                    for key in f.keys():
                        shapes[key] = tuple(f.get_slice(key).get_shape())
    os.makedirs(path, exist_ok=True)
    mixtral_config(dims, layers).save_pretrained(path)
    # Random values drawn on the GPU where there is one (the CPU takes minutes for 10 GB).
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_size = total = 0
    shards: list[list[str]] = []
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            files.append(name)
            shards.append(list(shard))
            shard, shard_size = {}, 0

    for key in sorted(shapes):
        full = tuple(scale.get(d, d) for d in shapes[key])
        t = torch.empty(full, dtype=torch.bfloat16, device=dev)
        t.normal_(0.0, 0.02, generator=gen) if "norm" not in key else t.fill_(1.0)
        t = t.cpu()
        nbytes = t.numel() * t.element_size()
        if shard_size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        shard_size += nbytes
        total += nbytes
    flush()
    for name, keys in zip(files, shards):
        for key in keys:
            weight_map[key] = name
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    expert_bytes = sum(n for k, n in ((k, _numel(shapes[k], scale) * 2) for k in shapes) if ".experts." in k)
    return {"checkpoint_bytes": total, "expert_bytes": expert_bytes, "layer_expert_bytes": expert_bytes // layers,
            "tensors": len(shapes), "shards": len(files)}


def _numel(shape: tuple[int, ...], scale: dict[int, int]) -> int:
    n = 1
    for d in shape:
        n *= scale.get(d, d)
    return n


def _malloc_in_use() -> Any:
    """A function returning the bytes this process holds from malloc now (glibc ``mallinfo2``: in use in the
    arenas plus mmapped chunks; torch's CPU tensors included), or None where there is no ``mallinfo2``. Unlike
    the resident size it leaves out memory the allocator keeps after a free (fragmentation)."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2

    def in_use() -> int:
        m = fn()
        return int(m.uordblks + m.hblkhd)
    return in_use


class RssSampler:
    """Peak VmRSS / RssAnon / RssFile / RssShmem of this process, and of its live malloc bytes (``Malloc``),
    sampled on a thread."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Malloc")
    _in_use = _malloc_in_use()

    def __init__(self, period_s: float = 0.002):
        self.period_s = period_s
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out: dict[str, int] = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in RssSampler.FIELDS or key == "VmHWM":
                    out[key] = int(rest.split()[0]) * 1024
        if RssSampler._in_use is not None:
            out["Malloc"] = RssSampler._in_use()
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.read().items():
                if k in self.peak and v > self.peak[k]:
                    self.peak[k] = v
            time.sleep(self.period_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak["VmHWM"] = self.read()["VmHWM"]

    def next_phase(self) -> dict[str, int]:
        """The peaks so far (VmHWM exact, the rest sampled); then both start again from the current size."""
        done = dict(self.peak)
        done["VmHWM"] = self.read()["VmHWM"]
        try:  # "5" resets the kernel's peak resident size (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            done["hwm_reset_failed"] = 1
        now = self.read()
        self.peak = {k: now.get(k, 0) for k in self.FIELDS}
        return done


def load_child(path: str, how: str, device: str, gpu_memory: str, expert_dtype: str = "auto",
               group_size: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Runs in a fresh process: load, sample memory, generate a few tokens."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    before = RssSampler.read()
    import_t = time.perf_counter()
    import moecache  # noqa: F401  (imports before the baseline reading is taken)
    import moecache.loading
    from transformers import AutoConfig, AutoModelForCausalLM

    # Code pages of the model class and of the conversion rules are not data: imported before the baseline.
    config = AutoConfig.from_pretrained(path)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # noqa: B018  (imports modeling_<family>)
    import transformers.conversion_mapping  # noqa: F401
    import transformers.core_model_loading  # noqa: F401

    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context before the baseline reading
    base = RssSampler.read()
    t0 = time.perf_counter()
    phases: dict[str, Any] = {}
    with RssSampler() as s:
        if how == "moecache":
            offload = moecache.loading.offload

            @functools.wraps(offload)  # the same signature: from_pretrained checks its arguments against it
            def offload_after_reading(*a: Any, **kw: Any) -> Any:
                # The checkpoint is read (and encoded): the reading phase ends here.
                phases["reading"] = s.next_phase()
                phases["reading_s"] = time.perf_counter() - t0
                return offload(*a, **kw)

            moecache.loading.offload = offload_after_reading
            try:
                model = moecache.from_pretrained(path, gpu_memory=gpu_memory, device=device,
                                                 expert_dtype=expert_dtype, group_size=group_size)
            finally:
                moecache.loading.offload = offload
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        t1 = time.perf_counter()
    if phases:
        phases["offload"] = dict(s.peak)
    x = torch.tensor([[1, 5, 9, 13]], device=next(model.parameters()).device if how != "moecache" else device)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False)
    row: dict[str, Any] = {"how": how, "torch_threads": torch.get_num_threads(), "load_s": t1 - t0, "import_s": t0 - import_t, "rss_before_import": before["VmRSS"],
                           "rss_baseline": base["VmRSS"], "baseline": base, "peak": s.peak, "tokens": out[0].tolist(), **phases}
    if how == "moecache":
        st = model.moecache.stats()
        row["stats"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str))}
        row["stats"].update({f"config_{k}": v for k, v in st["config"].items() if isinstance(v, (int, float, str))})
    return row


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--gpu-memory", default="8GiB")
    p.add_argument("--dir", help="checkpoint folder (default: a temporary folder, removed at the end)")
    p.add_argument("--baseline", action="store_true", help="also load with transformers on the CPU")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU smoke test)")
    p.add_argument("--scale", type=int, default=1,
                   help="divide Mixtral's hidden, kv, intermediate and vocab sizes by this (a CPU-sized run)")
    p.add_argument("--expert-dtype", default="auto",
                   help="moecache's expert format (auto: bf16 as stored; int8/int4: compressed while loading)")
    p.add_argument("--group-size", type=int, default=None, help="with --expert-dtype int8/int4")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the loading process (default: torch's; 1 avoids spinning threads on a "
                        "shared machine, where the encoder's many small operations slow down badly with more)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--child", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(load_child(args.child[0], args.child[1], args.device, args.gpu_memory, args.expert_dtype,
                                    args.group_size, args.threads)))
        return 0
    if args.scale < 1 or any(v % args.scale for v in FULL.values()):
        p.error(f"--scale must be a positive divisor of every dimension {FULL}")
    dims = {"hidden": 64, "kv": 32, "intermediate": 160, "vocab": 128} if args.tiny else \
        {k: v // args.scale for k, v in FULL.items()}
    folder = args.dir or tempfile.mkdtemp(prefix="moecache_ckpt_")
    result: dict[str, Any] = {"machine": machine(), "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                              "layers": args.layers, "dims": dims, "device": args.device}
    try:
        t0 = time.perf_counter()
        result["checkpoint"] = write_checkpoint(folder, args.layers, dims)
        result["checkpoint"]["write_s"] = time.perf_counter() - t0
        print(f"wrote {result['checkpoint']['checkpoint_bytes'] / 2**30:.2f} GiB in "
              f"{result['checkpoint']['write_s']:.1f} s", file=sys.stderr)
        runs = []
        for how in ["moecache"] + (["transformers"] if args.baseline else []):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", folder, how, "--device", args.device,
                   "--gpu-memory", args.gpu_memory, "--expert-dtype", args.expert_dtype]
            if args.group_size is not None:
                cmd += ["--group-size", str(args.group_size)]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                failure = child_failure(how, out.returncode, out.stderr)
                print(failure["summary"], file=sys.stderr)
                print("\n".join(failure["stderr_tail"]), file=sys.stderr)
                runs.append(failure)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["stderr_tail"] = out.stderr.strip().splitlines()[-5:]
            ck = result["checkpoint"]
            row["peak_over_baseline"] = row["peak"]["VmHWM"] - row["rss_baseline"]
            row["goal_bytes"] = ck["checkpoint_bytes"] + ck["layer_expert_bytes"]
            if how == "moecache" and args.expert_dtype not in ("auto", "bf16"):
                # Compressed experts: the goal is the compressed store + one bf16 layer + the non-expert weights.
                store = row["stats"]["config_host_store_bytes"]
                row["goal_bytes"] = store + ck["layer_expert_bytes"] + (ck["checkpoint_bytes"] - ck["expert_bytes"])
            row["peak_over_baseline_vs_goal"] = row["peak_over_baseline"] / row["goal_bytes"]
            if "reading" in row:
                row["reading_peak_over_baseline"] = row["reading"]["VmHWM"] - row["rss_baseline"]
                row["reading_peak_vs_goal"] = row["reading_peak_over_baseline"] / row["goal_bytes"]
            runs.append(row)
            print(f"{how}: load {row['load_s']:.1f} s, peak RSS over baseline "
                  f"{row['peak_over_baseline'] / 2**30:.2f} GiB (anon {row['peak']['RssAnon'] / 2**30:.2f}, "
                  f"file {row['peak']['RssFile'] / 2**30:.2f}); goal {row['goal_bytes'] / 2**30:.2f} GiB",
                  file=sys.stderr)
        result["runs"] = runs
        failed = [r for r in runs if "error" in r]
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from moecache.atomic import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 1 if failed else 0


def child_failure(how: str, returncode: int, stderr: str, tail: int = 40) -> dict[str, Any]:
    """A failed loading process as a result row: a one-line summary (the last line of its stderr that names an
    error, else the last line) and the tail of its stderr."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line.lower() or "Killed" in line]
    last = (errors or lines or ["(no stderr; killed by a signal?)" if returncode < 0 else "(no stderr)"])[-1].strip()
    return {"how": how, "error": last, "returncode": returncode,
            "summary": f"{how}: the loading process exited with status {returncode}: {last}",
            "stderr_tail": lines[-tail:]}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
