"""How much should a copy be credited for the cache hits it earns? The simulator's ``auto`` miss rule
(``moecache.cost.timing.reuse_credit``) over a grid of caps on the hits per copy it credits, against
the CPU time per expert, on the real Mixtral routing. This grid chose ``REUSE_CREDIT_MAX``.

Setup (the shape of ``eval/hybrid_decode.py``'s decode run): the Mixtral-8x7B trace at 4 evenly
spread layers (0, 8, 16, 24), the first 64 decode tokens of each of its 4 sequences, one token per
step (decode stream), LRU over the whole pool (global scope) of 8 or 16 of the 32 experts, no
prefetch. Costs: the GPU machine's copy of one 336 MiB expert (6.41 ms, measured by the hybrid
calibration on the H200, eval/results/hybrid_decode.json), marginal GPU time 0.15 ms per expert,
non-expert time 0.86 ms per layer, CPU time per expert at one token swept over 2.5-5.5 ms (the H200
host measured 2.8 ms calibrated alone, 3.4 ms live, 4.0 ms under copies). Caps: 0 (no credit: the
``min`` rule), 0.25, 0.4, 0.5 and none (the measured hits per copy as they are).

    .venv/bin/python eval/hybrid_credit_grid.py        # ~1 min on 2 cores: eval/results/hybrid_credit_grid.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moecache.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from moecache.cost import timing  # noqa: E402
from moecache.cost.hardware import HardwareProfile  # noqa: E402

EXPERT_BYTES = 352321536
COPY_MS = 6.41
GPU_MS = 0.15
NON_EXPERT_MS = 0.86
CPU_MS = (2.5, 2.82, 3.35, 4.0, 4.5, 5.5)
CAPS = (0.0, 0.25, 0.4, 0.5, math.inf)
SLOTS = (8, 16)


def profile(cpu1: float) -> HardwareProfile:
    return HardwareProfile(bytes_per_expert=EXPERT_BYTES, copy_bandwidth_gbps=EXPERT_BYTES / (COPY_MS * 1e6),
                           copy_latency_ms=0.0, gpu_ms={1: GPU_MS}, cpu_ms={1: cpu1},
                           non_expert_ms={1: NON_EXPERT_MS}, source="eval/hybrid_credit_grid.py")


def run(trace: Any, slots: int, hw: HardwareProfile, rule: str, cap: float | None = None) -> dict[str, float]:
    from moecache.policies import new_policy
    from moecache.sim import Schedule, simulate

    m = trace.meta
    pol = new_policy("lru", slots, m.num_layers, m.num_experts, top_k=m.top_k, scope="global")
    saved = timing.REUSE_CREDIT_MAX
    if cap is not None:
        timing.REUSE_CREDIT_MAX = cap
    try:
        r = simulate(Schedule(trace, decode_stream=True), pol, hardware=hw, miss_rule=rule, bound=False,
                     engine="python")
    finally:
        timing.REUSE_CREDIT_MAX = saved
    return {"ms_per_token": r.time_ms / r.tokens, "hit_rate": r.hits / r.accesses, "copies": r.loads,
            "cpu_runs": r.cpu_runs}


def cap_name(cap: float) -> str:
    return "none" if math.isinf(cap) else f"{cap:g}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Reuse credit of the hybrid `auto` rule: the cap on hits per copy (simulator)", "",
             f"Date {res['date']}, host {res['host']} (simulation only). Command: `{res['command']}`.", "",
             res["setup"], "",
             "ms per decode token (hit rate); **bold**: the fastest cap of the row.", "",
             "| CPU ms/expert | slots | copy only | " + " | ".join(f"cap {cap_name(c)}" for c in CAPS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in CAPS) + " |"]
    for row in res["rows"]:
        best = min(v["ms_per_token"] for v in row["caps"].values())
        cells = []
        for c in CAPS:
            v = row["caps"][cap_name(c)]
            txt = f"{v['ms_per_token']:.2f} ({v['hit_rate']:.2f})"
            cells.append(f"**{txt}**" if v["ms_per_token"] == best else txt)
        lines.append(f"| {row['cpu_ms']} | {row['slots']} | {row['copy']['ms_per_token']:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Chosen: `REUSE_CREDIT_MAX = {timing.REUSE_CREDIT_MAX}` (moecache/cost/timing.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import hybrid_decode as hd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "eval", "results"))
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    trace, pick = hd.load_trace(4, args.tokens)
    rows = []
    for cpu1 in CPU_MS:
        hw = profile(cpu1)
        for slots in SLOTS:
            row = {"cpu_ms": cpu1, "slots": slots, "copy": run(trace, slots, hw, "copy"),
                   "caps": {cap_name(c): run(trace, slots, hw, "auto", c) for c in CAPS}}
            rows.append(row)
            times = ", ".join(f"{k} {v['ms_per_token']:.2f}" for k, v in row["caps"].items())
            print(f"cpu {cpu1} slots {slots}: {times}", flush=True)
    cmd = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])))
    res = {"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "trace_layers": pick, "tokens_per_sequence": args.tokens,
           "setup": (f"Mixtral trace layers {pick}, {args.tokens} decode tokens x {len(trace.sequences())} sequences, "
                     f"decode stream, LRU (global), no prefetch; copy {COPY_MS} ms, GPU {GPU_MS} ms per expert, "
                     f"non-expert {NON_EXPERT_MS} ms per layer, CPU at one token as in the first column."),
           "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "hybrid_credit_grid")
    write_json_atomic(stem + ".json", res)
    write_text_atomic(stem + ".md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
