"""Benchmark: host time of a predictor's ``observe`` and ``predict`` at batch 1, the runtime's per-layer cost.

    python eval/predictor_speed.py [--trace build/ds_trace] [--tokens 200] [--out FILE]

Fits each trace-only predictor on the trace, then feeds it one token at a time, layer by layer, as
the runtime does at batch-1 decode (``observe(l, ids)``, then ``predict(l, 1)``), and reports the
mean microseconds per call. The trace defaults to the DeepSeek-V2-Lite routing (imported from
``../shared`` when no moecache trace folder is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "eval"))

from moecache.atomic import write_json_atomic  # noqa: E402
from moecache.predictors import PREDICTORS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=None, help="moecache trace folder (default: the DeepSeek-V2-Lite routing)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--predictors", default="prior,temporal,transition,learned")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import _shapes as S

    trace = S.prepare_trace(S.open_routing(args.trace or S.TRACE_DIR), None)
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    ids = np.asarray(trace.ids[: args.tokens]).astype(np.int64)
    rows: dict[str, dict[str, float]] = {}
    for name in args.predictors.split(","):
        pred = PREDICTORS.get(name)(L, E, k).fit(trace)
        pred.reset()
        t_obs = t_pred = 0.0
        n = 0
        for t in range(ids.shape[0]):
            for layer in range(L):
                row = ids[t, layer][None, :]
                a = time.perf_counter()
                pred.observe(layer, row)
                b = time.perf_counter()
                pred.predict(layer, 1)
                c = time.perf_counter()
                t_obs += b - a
                t_pred += c - b
                n += 1
        rows[name] = {"observe_us": 1e6 * t_obs / n, "predict_us": 1e6 * t_pred / n, "calls": n}
        print(f"{name:>12}: observe {rows[name]['observe_us']:.1f} us, predict {rows[name]['predict_us']:.1f} us "
              f"({n} calls)")
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "trace": trace.meta.model, "layers": L, "experts": E, "top_k": k, "rows": rows}
    if args.out:
        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
