"""Benchmark: read a 1M-token x 32-layer x top-2 trace with every id materialised (goal: < 1 s).

    python eval/trace_read_speed.py [--tokens 1000000] [--layers 32] [--top-k 2] [--repeat 5] [--out FILE]

Writes the trace once into a temporary folder (chunked as the recorder would write it), drops nothing from the
page cache on purpose (a warm read, as a tool reading a trace twice sees it), then times `open_trace` plus a full
pass over the ids (so nothing stays lazy). Prints one JSON object; with --out, also writes it there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date

import numpy as np

from moecache.trace import RoutingBlock, TraceMeta, open_trace, write_trace


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, L, K = args.tokens, args.layers, args.top_k
    meta = TraceMeta(num_experts=args.experts, top_k=K, moe_layers=list(range(L)), model="synthetic",
                     weights="renormalized", id_order="score")
    ids = rng.integers(0, args.experts, size=(n, L, K), dtype=np.int16)
    weights = rng.random((n, L, K), dtype=np.float32)
    seq = np.repeat(np.arange(n // 1000 + 1), 1000)[:n]
    block = RoutingBlock.build(ids, seq=seq, pos=np.arange(n) % 1000, step=np.arange(n), phase=1, weights=weights)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace")
        t0 = time.perf_counter()
        write_trace(path, meta, [block], chunk_rows=args.chunk_rows)
        write_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            t = open_trace(path)
            checksum = int(t.ids.sum(dtype=np.int64))  # touches every id
            times.append(time.perf_counter() - t0)
            assert len(t) == n and checksum == int(ids.sum(dtype=np.int64))
            del t
    result = {
        "benchmark": "trace_read",
        "tokens": n, "layers": L, "top_k": K, "chunks": -(-n // args.chunk_rows),
        "bytes_on_disk": size,
        "write_s": round(write_s, 3),
        "read_s_median": round(statistics.median(times), 3),
        "read_s_all": [round(x, 3) for x in times],
        "goal_s": 1.0,
        "machine": f"{platform.node() or 'unknown'} ({os.cpu_count()} cores, {platform.machine()})",
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        from moecache.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
