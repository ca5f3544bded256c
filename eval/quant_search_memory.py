"""Peak temporaries and time of the int4 clipping search (``moecache.quant.quantize_matrix``) on one expert matrix,
the whole matrix at once against blocks of ``ROW_CHUNK_ELEMENTS`` weights (what loading does): live malloc bytes
(glibc ``mallinfo2``) sampled on a thread, one torch thread, median of ``--repeats`` interleaved runs.

    python eval/quant_search_memory.py [--shape 3584x1024] [--repeats 3] [--out eval/results/quant_search_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(w: Any, fmt: Any, chunk: int, in_use: Any) -> tuple[int, float]:
    import moecache.quant as Q

    Q.ROW_CHUNK_ELEMENTS = chunk
    base = in_use()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    Q.quantize_matrix(w, fmt)
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    return peak[0] - base, dt


def main(argv: list[str] | None = None) -> int:
    import torch

    import moecache.quant as Q
    from from_pretrained_memory import _malloc_in_use

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="3584x1024", help="ROWSxCOLS of the matrix (out x in)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    in_use = _malloc_in_use()
    if in_use is None:
        print("glibc mallinfo2 is not available here", file=sys.stderr)
        return 1
    rows, cols = (int(x) for x in args.shape.lower().split("x"))
    torch.set_num_threads(1)
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    fmt = Q.ExpertFormat("int4", 64)
    default = Q.ROW_CHUNK_ELEMENTS
    runs: dict[str, list[tuple[int, float]]] = {"whole": [], "blocks": []}
    for _ in range(args.repeats):
        runs["whole"].append(measure(w, fmt, 1 << 62, in_use))
        runs["blocks"].append(measure(w, fmt, default, in_use))
    Q.ROW_CHUNK_ELEMENTS = default
    out: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": 1,
                           "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                           "shape": [rows, cols], "format": fmt.describe(), "row_chunk_elements": default}
    for name, rs in runs.items():
        peaks, times = [p for p, _ in rs], [t for _, t in rs]
        out[name] = {"peak_bytes_median": statistics.median(peaks), "peak_bytes_range": [min(peaks), max(peaks)],
                     "peak_bytes_per_weight": statistics.median(peaks) / (rows * cols),
                     "seconds_median": statistics.median(times), "seconds_range": [min(times), max(times)]}
        print(f"{name}: peak temporaries {statistics.median(peaks) / 2**20:.1f} MiB "
              f"({statistics.median(peaks) / (rows * cols):.1f} bytes/weight), {statistics.median(times):.2f} s "
              f"(range {min(times):.2f}-{max(times):.2f})", file=sys.stderr)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        from moecache.atomic import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
