"""Host time of one small host-to-device upload (6 int64 routing indices) while the compute stream has
~60 ms of work queued: from pageable memory (``torch.from_numpy(a).to(dev, non_blocking=True)``, what
the runtime does) and through a pinned staging buffer. Neither waits for the queued work; each still
costs the host ~0.1-0.2 ms, which is why the runtime sends a layer's index arrays up in one copy.

    python3 eval/upload_cost.py          # GPU machine, seconds; prints one line per variant
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch


def main() -> int:
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    idx = np.arange(6, dtype=np.int64)

    def busy() -> None:
        for _ in range(40):
            a @ a

    def pageable() -> None:
        torch.from_numpy(idx).to(dev, non_blocking=True)

    def pinned() -> None:
        staged = torch.empty(idx.shape, dtype=torch.int64, pin_memory=True)
        staged.numpy()[...] = idx
        staged.to(dev, non_blocking=True)

    for name, fn in (("pageable", pageable), ("pinned staging", pinned)):
        ms = []
        for _ in range(20):
            busy()
            t0 = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        busy()
        torch.cuda.synchronize()
        queued = 1e3 * (time.perf_counter() - t0)
        print(f"upload of 6 int64 while the stream has {queued:.1f} ms queued: {name}: "
              f"median {statistics.median(ms):.3f} ms, max {max(ms):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
