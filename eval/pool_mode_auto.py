"""The ``pool_mode="auto"`` rule against the simulator's replay: for int4 g64 experts at 25% of the bf16 expert
memory, each pool mode's estimate by the rule (``moecache.runtime.compressed.pool_mode_costs``: slots, even-routing
hit rate, one decode step on the timing model, times the MoE layers) next to ``moecache bench``'s global-LRU
replay of the recorded trace in that mode, and the mode the rule picks.

    python eval/pool_mode_auto.py [--traces build/suite_traces/deepseek-v2-lite,build/suite_traces/mixtral]
                                  [--out eval/results/pool_mode_auto.json]

Traces are built by ``eval/suite_traces.py``; a missing one is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Expert shapes of the traces' models: hidden, expert intermediate, MoE layers, experts, top-k.
SHAPES = {"deepseek-v2-lite": (2048, 1408, 26, 64, 6), "mixtral": (4096, 14336, 32, 8, 2)}


def codec_for(hidden: int, inter: int, fmt: Any) -> Any:
    """The compressed row of a SwiGLU expert of this shape (transformers' stacked layout, bf16)."""
    import torch

    from moecache.quant import ExpertCodec

    kinds = (SimpleNamespace(name="gate_up_proj", shape=(2 * inter, hidden), numel=2 * inter * hidden),
             SimpleNamespace(name="down_proj", shape=(hidden, inter), numel=hidden * inter))
    dense = SimpleNamespace(kinds=kinds, dtype=torch.bfloat16, storage="stacked", slot_bytes=3 * hidden * inter * 2,
                            names=("gate_up_proj", "down_proj"))
    return ExpertCodec(dense, fmt)


def main(argv: list[str] | None = None) -> int:
    from moecache.quant import ExpertFormat
    from moecache.runtime.compressed import POOL_MODES, choose_pool_mode, pool_mode_costs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default="build/suite_traces/deepseek-v2-lite,build/suite_traces/mixtral")
    ap.add_argument("--capacity", type=float, default=0.25, help="share of the bf16 expert memory (default 0.25)")
    ap.add_argument("--out", help="write the JSON result here (atomically)")
    args = ap.parse_args(argv)
    fmt = ExpertFormat("int4", 64)
    rows = []
    for trace in args.traces.split(","):
        path = Path(trace) if Path(trace).is_absolute() else ROOT / trace
        name = path.name
        if name not in SHAPES:
            print(f"skip {trace}: no expert shape known for {name!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            continue
        if not path.exists():
            print(f"skip {trace}: not built (python eval/suite_traces.py)", file=sys.stderr)
            continue
        hidden, inter, layers, experts, top_k = SHAPES[name]
        codec = codec_for(hidden, inter, fmt)
        total = layers * experts
        budget = int(args.capacity * total * codec.dense.slot_bytes)
        costs = pool_mode_costs(total=total, top_k=top_k, codec=codec, budget_bytes=budget, cache_slots=None,
                                scratch_experts=top_k)
        pick = choose_pool_mode("auto", total=total, budget_bytes=budget, cache_slots=None, codec=codec, top_k=top_k,
                                scratch_experts=top_k)
        for mode in POOL_MODES:
            cmd = [sys.executable, "-m", "moecache", "bench", str(path), "--policies", "lru", "--scope", "global",
                   "--decode-stream", "--capacity", f"{args.capacity:.0%}", "--expert-dtype", "int4",
                   "--group-size", "64", "--pool-mode", mode, "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                print(f"{name} {mode}: moecache bench failed ({done.returncode}): {tail}", file=sys.stderr)
                return 1
            r = json.loads(done.stdout)[0]
            c = costs.get(mode)
            rows.append({"trace": name, "pool_mode": mode, "auto_picks": pick,
                         "rule_slots": None if c is None else c["slots"],
                         "rule_hit_rate": None if c is None else c["hit_rate"],
                         "rule_ms_per_token": None if c is None else c["layer_ms"] * layers,
                         "replay_slots": r["capacity"], "replay_hit_rate": r["demand_hit_rate"],
                         "replay_ms_per_token": r["est_ms_per_token"], "replay_stall_ms_per_token": r["stall_ms_per_token"],
                         "command": " ".join(["python"] + cmd[1:])})
            print(f"{name} {mode}: rule {rows[-1]['rule_ms_per_token']} ms/token, replay "
                  f"{r['est_ms_per_token']:.2f} ms/token; auto picks {pick}", file=sys.stderr)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
           "format": fmt.describe(), "capacity": args.capacity, "rows": rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        from moecache.atomic import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
