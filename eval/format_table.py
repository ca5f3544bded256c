"""Estimated ms/token per expert format at 25% of the bf16 expert memory (the timing model, H100 profile).

    python eval/format_table.py [--traces build/suite_traces/deepseek-v2-lite,build/suite_traces/mixtral]

Runs ``moecache bench TRACE --decode-stream --capacity 25% --scope global --policies lru,belady
--expert-dtype FMT [--pool-mode MODE]`` for bf16, int8 g64, int4 g64 and int4 g128 in both pool modes, and the
per-miss precision rule (HOBBIT: bf16 experts, misses with a small gate share copied as int4 g64,
``--low-precision-misses int4 --low-precision-below SHARE``) at two thresholds, and writes ``eval/results/compressed_formats.md`` (and ``.json``). The memory of 25% of the experts in bf16
holds more compressed experts (``moecache.cost.hardware.slots_for_format``); copies move the compressed
bytes; every expert a kernel reads keeps the bf16 compute time, plus the expansion (an assumed device
throughput, ``EXPAND_GBPS``; the compressed pool expands per use, the expanded pool per copy). Build the
traces with ``eval/suite_traces.py`` first.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMATS = [("bf16", None), ("int8", 64), ("int4", 64), ("int4", 128)]
#: The per-miss precision rule's rows: (low format, group size, gate share below which a miss is copied low).
MIXED = [("int4", 64, 0.5), ("int4", 64, 1.0)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="build/suite_traces/deepseek-v2-lite,build/suite_traces/mixtral")
    ap.add_argument("--capacity", default="25%")
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "compressed_formats.md")
    args = ap.parse_args()
    rows = []
    for trace in args.traces.split(","):
        if not (ROOT / trace).exists():
            print(f"skip {trace}: not built (python eval/suite_traces.py)", file=sys.stderr)
            continue
        for name, g in FORMATS:
            for mode in (["-"] if name == "bf16" else ["compressed", "expanded"]):
                cmd = [sys.executable, "-m", "moecache", "bench", trace, "--policies", "lru,belady", "--capacity",
                       args.capacity, "--scope", "global", "--decode-stream", "--expert-dtype", name, "--json",
                       "--quiet"]
                if g:
                    cmd += ["--group-size", str(g)]
                if mode != "-":
                    cmd += ["--pool-mode", mode]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                for r in json.loads(out):
                    r.update(format=name if g is None else f"{name} g{g}", pool_mode=mode,
                             trace_path=trace)
                    rows.append(r)
                print(f"{trace} {name} {g} {mode}", file=sys.stderr)
        for low, g, below in MIXED:
            label = f"bf16, misses below {below:g} as {low} g{g}"
            cmd = [sys.executable, "-m", "moecache", "bench", trace, "--policies", "lru,belady", "--capacity",
                   args.capacity, "--scope", "global", "--decode-stream", "--low-precision-misses", low,
                   "--group-size", str(g), "--low-precision-below", str(below), "--json", "--quiet"]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. a trace without gate weights: stated in the table
                why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                rows.append({"trace": Path(trace).name, "format": label, "pool_mode": "dense + low landing",
                             "trace_path": trace, "not_run": why})
            else:
                for r in json.loads(done.stdout):
                    r.update(format=label, pool_mode="dense + low landing", trace_path=trace)
                    rows.append(r)
            print(f"{trace} mixed {low} {g} {below}", file=sys.stderr)
    stamp = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}, command: "
             f"`python eval/format_table.py --traces {args.traces} --capacity {args.capacity}`")
    lines = ["# Compressed experts in the timing model: estimated ms/token at 25% of the bf16 expert memory", "",
             stamp, "",
             "The default hardware profile (shared/docs/hardware.md's H100 tables with the calibrated host terms of "
             "moecache/cost/profiles/h100_calibrated.json; stall = time beyond the GPU's work, host time included); "
             "batch-1 decode stream; global pool; copies only (no prefetch, "
             "no CPU). `slots`: experts the same memory holds in that format and pool mode. Expansion cost is "
             "an assumption (moecache/cost/hardware.py EXPAND_GBPS), not a measurement. Per-miss precision rows: "
             "bf16 experts whose misses with a gate share below the threshold are copied as int4 g64 into a "
             "landing of top_k rows (out of the same memory) and expanded into their slots (MiB/copy: full / low); a reused low copy is upgraded (a full copy); "
             "replayed on the Python engine; lossy (quality: docs/compressed_experts.md); its bound counts every "
             "load at the low copy's cost. Its second host copy costs the int4 size of every expert "
             "(about 27% of the bf16 experts' host memory).", "",
             "| trace | format | pool | slots | MiB/copy | policy | hit rate | est ms/token | stall ms/token | bound ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_run" in r:
            lines.append(f"| {r['trace']} | {r['format']} | {r['pool_mode']} | - | - | - | not run: {r['not_run']} "
                         "| - | - | - |")
            continue
        if "low_copies" in r:  # per-miss precision: full and low copy sizes, and how the misses went
            low_mib = r["low_copy_bytes"] / 2**20
            lines.append(f"| {r['trace']} | {r['format']} | {r['pool_mode']} | {r['capacity']} | "
                         f"{r['bytes_per_expert'] / 2**20:.1f} / {low_mib:.1f} | {r['policy']} | "
                         f"{r['demand_hit_rate']:.3f} ({r['low_copies']} low, {r['upgrades']} upgraded) | "
                         f"{r['est_ms_per_token']:.2f} | {r['stall_ms_per_token']:.2f} | {r['bound_ms_per_token']:.2f} |")
            continue
        lines.append(f"| {r['trace']} | {r['format']} | {r['pool_mode']} | {r['capacity']} | "
                     f"{r['bytes_per_expert'] / 2**20:.1f} | {r['policy']} | {r['demand_hit_rate']:.3f} | "
                     f"{r['est_ms_per_token']:.2f} | {r['stall_ms_per_token']:.2f} | {r['bound_ms_per_token']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from moecache.atomic import write_json_atomic, write_text_atomic

    write_text_atomic(str(args.out), "\n".join(lines) + "\n")
    write_json_atomic(str(args.out.with_suffix(".json")), {"stamp": stamp, "rows": rows})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
