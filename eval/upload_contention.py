"""Do background expert copies delay the decode's own small work on the compute stream?

At batch 1 a prefetch that knows every next expert (``e2e_compare.py``'s ``lru+oracle:depth=1``) removes the
copy stall (22 ms/token) but the step gets no faster. This probe times, with CUDA events on the compute
stream, three things a decode layer does, each idle and while expert-sized copies (``--mib``, default the
DeepSeek-V2-Lite expert, 16.5 MiB, pinned host -> GPU) run back to back on another stream:

* ``upload``: a small host-to-device copy of 26 int64 indices from pageable memory (the runtime sends
  each layer's slot ids so), then a kernel that reads it;
* ``upload_pinned``: the same from a pinned buffer;
* ``kernels``: 30 small kernels with no copy (a layer's launches).

Per variant: the median device time and the median host time of issuing it, over ``--reps`` rounds.

    python3 eval/upload_contention.py --out OUT/upload_contention.json     # GPU machine, ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moecache.atomic import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--mib", type=float, default=16.5, help="size of one background copy (an expert)")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    numel = int(args.mib * 2**20) // 2
    host = torch.empty((4, numel), dtype=torch.bfloat16, pin_memory=True)
    pool = torch.empty((4, numel), dtype=torch.bfloat16, device=dev)
    side = torch.cuda.Stream(dev)
    compute = torch.cuda.current_stream(dev)
    idx_np = np.arange(26, dtype=np.int64)
    idx_pinned = torch.from_numpy(idx_np).pin_memory()
    table = torch.randn(64, device=dev)
    x = torch.randn(256, device=dev)

    def upload() -> None:
        i = torch.from_numpy(idx_np).to(dev, non_blocking=True)
        table[i].sum()

    def upload_pinned() -> None:
        i = idx_pinned.to(dev, non_blocking=True)
        table[i].sum()

    def kernels() -> None:
        y = x
        for _ in range(30):
            y = y * 1.0001

    def background(n: int) -> None:
        with torch.cuda.stream(side):
            for j in range(n):
                pool[j % 4].copy_(host[j % 4], non_blocking=True)

    out: dict[str, dict[str, float]] = {}
    for name, fn in (("upload", upload), ("upload_pinned", upload_pinned), ("kernels", kernels)):
        for busy in (False, True):
            dev_ms, host_ms = [], []
            for _ in range(args.reps + 1):
                torch.cuda.synchronize(dev)
                if busy:
                    background(4)  # ~1.3 ms of copies at 50 GB/s, queued before the work below
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(compute)
                t0 = time.perf_counter()
                fn()
                host_ms.append(1e3 * (time.perf_counter() - t0))
                b.record(compute)
                b.synchronize()
                dev_ms.append(a.elapsed_time(b))
            key = f"{name}{'_during_copies' if busy else ''}"
            out[key] = {"device_ms": statistics.median(dev_ms[1:]), "host_ms": statistics.median(host_ms[1:]),
                        "device_ms_max": max(dev_ms[1:])}
            print(f"{key:32s} device {out[key]['device_ms']:.3f} ms (max {out[key]['device_ms_max']:.3f})  "
                  f"host {out[key]['host_ms']:.3f} ms", flush=True)
    torch.cuda.synchronize(dev)
    res = {"card": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python3 eval/upload_contention.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "copy_mib": args.mib, "reps": args.reps, "results": out}
    write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
