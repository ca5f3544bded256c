"""Prefetching configurations against the bound: bytes moved and estimated time per token.

    python eval/prefetch_table.py [--out eval/results/prefetch_table.md] [--deepseek-prompts 180]

For every multi-layer real trace in ../shared/data/routing (Mixtral, Llama-4-Maverick, and
DeepSeek-V2-Lite's first prompts replayed as decode streams; the Qwen logs are single-layer runs
in batched order, where no cross-layer prefetch applies), runs `moecache bench` with LRU at 25% of
the experts per layer (layer scope) without prefetch and with each predictor prefetching 1 and 2
MoE layers ahead (default `topk` rule, miss rule `copy`, the H100 hardware profile). Learned
predictors are fitted on a leading share of the sequences, which are not scored (stated per trace).
The `oracle` predictor reads the future: it is the ceiling of prediction, not an online scheme.
Writes a Markdown table (+ JSON beside it) with machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

ROUTING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "routing")
PREDICTORS = [(None, 0), ("temporal", 1), ("temporal", 2), ("transition", 1), ("transition", 2),
              ("learned", 1), ("learned", 2), ("oracle", 1), ("oracle", 2)]
FIELDS = ("demand_hit_rate", "ready_rate", "bytes_per_token", "wasted_bytes_per_token", "est_ms_per_token",
          "stall_ms_per_token", "bound_ms_per_token")


def moecache(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "moecache", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"moecache {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def prepare(tmp: str, deepseek_prompts: int, llama_requests: int) -> list[tuple[str, str, list[str], str]]:
    """(name, trace path, extra bench args, fitting statement)."""
    from moecache.trace import open_trace

    mix = os.path.join(ROUTING, "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")
    moecache("trace", "import", os.path.join(mix, "gsm8k_2_routing.jsonl"), os.path.join(mix, "humaneval_2_routing.jsonl"),
             "-o", f"{tmp}/mixtral", "-q")
    moecache("trace", "import", os.path.join(ROUTING, "llama-4-maverick-17b-128e-instruct__patterns-behind-chaos-subset"),
             "-o", f"{tmp}/llama_all", "-q")
    moecache("trace", "import", os.path.join(ROUTING, "deepseek-v2-lite-chat__moe-beyond", "training_data_eamc"),
             "-o", f"{tmp}/deepseek_all", "-q")
    ds = open_trace(f"{tmp}/deepseek_all")
    ds.select_sequences(ds.sequences()[:deepseek_prompts]).save(f"{tmp}/deepseek")
    ll = open_trace(f"{tmp}/llama_all")
    ll.select_sequences(ll.sequences()[:llama_requests]).save(f"{tmp}/llama")
    return [
        ("mixtral (4 requests, decode)", f"{tmp}/mixtral", ["--fit-share", "0.5"], "fitted on the leading 2 of 4 requests"),
        (f"llama4-mmlu (first {llama_requests} requests)", f"{tmp}/llama", ["--fit-share", "0.5", "--decode-stream"],
         "fitted on the leading half of the requests; prefill chunks replayed token by token"),
        (f"deepseek ({deepseek_prompts} prompts as decode streams)", f"{tmp}/deepseek", ["--fit-share", "0.667", "--decode-stream"],
         "fitted on the leading two thirds of the prompts, the rest replayed token by token"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/prefetch_table.md")
    ap.add_argument("--deepseek-prompts", type=int, default=180)
    ap.add_argument("--llama-requests", type=int, default=235)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="bench processes at once")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, path, extra, fit in prepare(tmp, args.deepseek_prompts, args.llama_requests):
            for pred, depth in PREDICTORS:
                cmd = ["bench", path, "--policies", "lru", "--capacity", "25%", "--scope", "layer", "--json", "--quiet", *extra]
                if pred:
                    cmd += ["--predictor", pred, "--prefetch-depth", str(depth)]
                jobs.append((name, fit, pred, depth, cmd))

        def run(job):
            name, fit, pred, depth, cmd = job
            r = json.loads(moecache(*cmd))[0]
            print(f"{name:40s} {pred or 'none':10s} d{depth} hit {r['demand_hit_rate']:.3f} ready {r['ready_rate']:.3f} "
                  f"{r['bytes_per_token'] / 2**30:.2f} GiB/tok {r['est_ms_per_token']:.1f} ms/tok", flush=True)
            return {"trace": name, "fit": fit, "predictor": pred or "none", "depth": depth, **{k: r[k] for k in FIELDS}}

        # Each run is its own process (the simulator is single-threaded Python); results keep job order.
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = list(pool.map(run, jobs))
    lines = ["# Prefetching against the bound: LRU at 25% of experts per layer, H100 profile", "",
             f"- date: {datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs",
             f"- command: `python {' '.join(sys.argv)}` ({time.time() - t0:.0f} s)",
             "- estimated times come from the simulator's timing model with the H100 hardware profile "
             "(../shared/docs/hardware.md), not from a GPU run; bound = max(total GPU time, copy time of Belady's misses)",
             "- `oracle` reads the future (ceiling of prediction); the best online row per trace is marked *", ""]
    for name in dict.fromkeys(r["trace"] for r in rows):
        sub = [r for r in rows if r["trace"] == name]
        online = [r for r in sub if r["predictor"] not in ("oracle",)]
        best = min(online, key=lambda r: r["est_ms_per_token"])
        lines += [f"## {name}", "", f"{sub[0]['fit']}.", "",
                  "| predictor | depth | demand hit | ready | GiB moved/token | wasted GiB/token | est. ms/token | stall ms/token | bound ms/token | est./bound |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sub:
            mark = " *" if r is best else ""
            lines.append(f"| {r['predictor']}{mark} | {r['depth']} | {r['demand_hit_rate']:.4f} | {r['ready_rate']:.4f} | "
                         f"{r['bytes_per_token'] / 2**30:.3f} | {r['wasted_bytes_per_token'] / 2**30:.3f} | "
                         f"{r['est_ms_per_token']:.1f} | {r['stall_ms_per_token']:.1f} | {r['bound_ms_per_token']:.1f} | "
                         f"{r['est_ms_per_token'] / r['bound_ms_per_token']:.2f} |")
        lines.append("")
    from moecache.atomic import write_json_atomic, write_text_atomic

    write_text_atomic(args.out, "\n".join(lines) + "\n")
    write_json_atomic(os.path.splitext(args.out)[0] + ".json", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
