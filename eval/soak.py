"""Soak benchmark: a long offloaded run stays healthy (host memory flat, no threads left, same outputs).

The trained model in ``../shared/data/models/qwen3moe-tiny-code`` (Qwen3-MoE, 6 MoE layers of 32
experts, top-4, 1,024-token context; fp32 here) is loaded with ``moecache.from_pretrained`` at 25% of
its experts (48 slots), with prefetch (``--predictor``, depth 1) and hybrid execution
(``--hybrid``: misses run on the C++ CPU pool while prefetches go through the C++ copy worker) on the
CPU. It decodes ``--requests`` greedy requests, each a ``--prompt``-byte slice of the held-out sample
plus ``--new`` new tokens (every request within the 1,024-token context), ``--requests x --new``
decode steps in all (default 1,200). Then ``remove()``, and the model generates once more.

Reported:

* host memory (RSS, ``/proc/self/status``, after ``gc.collect()``) after each request; growth from the
  end of the warm-up (the first request) to the end, as a share (goal < 1%);
* threads (``/proc/self/task``) before ``offload`` and after ``remove()``, and the names of any left;
* outputs against the unpatched model (transformers, same weights, same prompts): tokens equal per
  request; where one differs, the reference's top-2 logit gap at the first difference (hybrid
  execution sums a CPU expert in another order: tokens are equal where that gap is clear);
* that the model after ``remove()`` generates the unpatched model's tokens.

Runs niced on one torch thread and one CPU-pool thread (a shared machine)::

    nice python eval/soak.py                  # ~1,200 decode steps: eval/results/soak.{json,md}
    python eval/soak.py --requests 2 --new 20 --out-dir /tmp/soak    # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(os.path.dirname(ROOT), "shared", "data", "models", "qwen3moe-tiny-code")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_names() -> list[str]:
    out = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return out


def prompts(n: int, length: int) -> list[str]:
    with open(os.path.join(MODEL, "heldout_sample.txt"), encoding="ascii", errors="replace") as f:
        text = f.read()
    text = "".join(c if ord(c) < 128 else " " for c in text)
    step = max(1, (len(text) - length) // max(1, n))
    return [text[i * step:i * step + length] for i in range(n)]


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new", type=int, default=200, help="new tokens per request (default 200)")
    ap.add_argument("--prompt", type=int, default=160, help="prompt bytes per request (default 160)")
    ap.add_argument("--slots", type=int, default=48, help="pool slots (default 48 = 25%% of 6 x 32)")
    ap.add_argument("--predictor", default="temporal")
    ap.add_argument("--hybrid", default="cpu", help="hybrid rule: cpu (every miss on the CPU pool), auto, copy")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "eval", "results"))
    args = ap.parse_args()
    if args.prompt + args.new > 1024:
        ap.error(f"--prompt + --new = {args.prompt + args.new} exceeds the model's 1,024-token context")
    if not os.path.isdir(MODEL):
        print(f"soak: {MODEL} is absent; nothing to run", file=sys.stderr)
        return 0
    os.environ.setdefault("MOECACHE_CPU_THREADS", "1")
    try:
        os.nice(10)
    except OSError:
        pass
    import torch
    from transformers import AutoModelForCausalLM

    import moecache
    from moecache import default_model as dm

    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    texts = prompts(args.requests, args.prompt)
    inputs = [torch.tensor([dm.encode(t)]) for t in texts]

    # the unpatched reference: tokens and per-step logits
    plain = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ref_tokens, ref_logits = [], []
    with torch.no_grad():
        for x in inputs:
            out = plain.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 attention_mask=torch.ones_like(x), output_logits=True, return_dict_in_generate=True)
            ref_tokens.append(out.sequences[0, x.shape[1]:].clone())
            ref_logits.append(torch.stack([lg[0] for lg in out.logits]))
    del plain, out
    gc.collect()

    threads_before = thread_names()
    py_threads_before = {t.name for t in threading.enumerate()}
    model = moecache.from_pretrained(MODEL, cache_slots=args.slots, device="cpu", dtype=torch.float32,
                                     predictor=args.predictor, prefetch_depth=1, hybrid=args.hybrid)
    handle = model.moecache
    threads_running = thread_names()
    rss: list[int] = []
    per_request = []
    decode_s = 0.0
    with torch.no_grad():
        for i, x in enumerate(inputs):
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 attention_mask=torch.ones_like(x))
            decode_s += time.perf_counter() - t0
            got = out[0, x.shape[1]:]
            diff = (got != ref_tokens[i]).nonzero()
            first = int(diff[0]) if len(diff) else None
            gap = None
            if first is not None:
                top2 = ref_logits[i][first].topk(2).values
                gap = float(top2[0] - top2[1])
            per_request.append({"request": i, "prompt_tokens": int(x.shape[1]), "new_tokens": args.new,
                                "tokens_equal": first is None, "first_difference": first,
                                "reference_top2_gap_there": gap})
            gc.collect()
            rss.append(rss_bytes())
            print(f"request {i}: {'equal' if first is None else f'differs at {first} (gap {gap:.3g})'}, "
                  f"RSS {rss[-1] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    stats = handle.stats()
    handle.remove()
    gc.collect()
    time.sleep(0.2)  # let joined threads leave /proc
    threads_after = thread_names()
    left = sorted(set(threads_after) - set(threads_before)) if len(threads_after) > len(threads_before) else []
    py_left = sorted({t.name for t in threading.enumerate()} - py_threads_before)
    with torch.no_grad():
        x = inputs[0]
        again = model.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                               attention_mask=torch.ones_like(x))[0, x.shape[1]:]
    after_remove_equal = bool(torch.equal(again, ref_tokens[0]))

    warm = rss[0]
    growth = (rss[-1] - warm) / warm if len(rss) > 1 else None
    peak_growth = (max(rss[1:]) - warm) / warm if len(rss) > 1 else None  # the worst point, not only the end
    decode_steps = args.requests * (args.new - 1)  # per request: one prompt call, then new - 1 decode calls
    result = {
        "benchmark": "soak", "date": started.isoformat(timespec="seconds"),
        "command": "nice python eval/soak.py " + " ".join(sys.argv[1:]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or None,
        "machine": machine(), "torch_threads": torch.get_num_threads(),
        "cpu_pool_threads": int(os.environ["MOECACHE_CPU_THREADS"]),
        "config": {"model": "qwen3moe-tiny-code", "dtype": "float32", "device": "cpu", "slots": args.slots,
                   "share": args.slots / (6 * 32), "predictor": args.predictor, "prefetch_depth": 1,
                   "hybrid": args.hybrid, "requests": args.requests, "prompt_bytes": args.prompt,
                   "new_tokens": args.new, "engine": stats.get("engine") or handle.config.get("engine")},
        "decode_steps": decode_steps, "decode_wall_s": decode_s,
        "rss_after_each_request_bytes": rss, "rss_growth_after_warmup": growth,
        "rss_peak_growth_after_warmup": peak_growth,
        "threads_before_offload": len(threads_before), "threads_while_offloaded": len(threads_running),
        "threads_after_remove": len(threads_after), "threads_left": left, "python_threads_left": py_left,
        "requests_tokens_equal": sum(r["tokens_equal"] for r in per_request), "per_request": per_request,
        "after_remove_tokens_equal": after_remove_equal,
        "stats": {k: stats.get(k) for k in ("hit_rate", "misses", "copies", "prefetch_issued", "prefetch_useful",
                                             "cpu_kernel", "cpu_kernel_experts", "cpu_layers", "hybrid_rule",
                                             "decode_tokens") if k in stats},
        "total_wall_s": time.perf_counter() - t_start,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    from moecache.atomic import write_json_atomic, write_text_atomic

    write_json_atomic(os.path.join(args.out_dir, "soak.json"), result)
    write_text_atomic(os.path.join(args.out_dir, "soak.md"), markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    c = r["config"]
    rss = r["rss_after_each_request_bytes"]
    growth = r["rss_growth_after_warmup"]
    peak = r["rss_peak_growth_after_warmup"]
    lines = [
        "# Soak: a long offloaded run on the CPU",
        "",
        f"- date {r['date']}, commit {r['git_commit']}, machine: {r['machine']['cpu']} ({r['machine']['cores']} cores), "
        f"torch threads {r['torch_threads']}, CPU-pool threads {r['cpu_pool_threads']}",
        f"- command: `{r['command']}`",
        f"- model qwen3moe-tiny-code, {c['dtype']} on {c['device']}, {c['slots']} slots ({c['share']:.0%} of the "
        f"experts), predictor {c['predictor']} depth 1, hybrid {c['hybrid']}, engine {c['engine']}",
        f"- {c['requests']} requests of {c['prompt_bytes']} prompt tokens + {c['new_tokens']} new tokens: "
        f"{r['decode_steps']} decode steps in {r['decode_wall_s']:.1f} s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| RSS after the warm-up request | {rss[0] / 2**20:.1f} MiB |",
        f"| RSS at the end | {rss[-1] / 2**20:.1f} MiB |",
        f"| growth after warm-up, at the end (goal < 1%) | {'-' if growth is None else f'{growth:+.3%}'} |",
        f"| growth after warm-up, at its peak | {'-' if peak is None else f'{peak:+.3%}'} |",
        f"| threads before offload / offloaded / after remove() | {r['threads_before_offload']} / "
        f"{r['threads_while_offloaded']} / {r['threads_after_remove']} |",
        f"| threads left after remove() | {', '.join(r['threads_left'] + r['python_threads_left']) or 'none'} |",
        f"| requests with tokens equal to the unpatched model | {r['requests_tokens_equal']} of {c['requests']} |",
        f"| model after remove(): tokens equal | {r['after_remove_tokens_equal']} |",
        "",
        "RSS after each request (MiB): " + ", ".join(f"{v / 2**20:.1f}" for v in rss),
        "",
    ]
    for p in r["per_request"]:
        if not p["tokens_equal"]:
            lines.append(f"- request {p['request']}: first difference at new token {p['first_difference']}, where the "
                         f"unpatched model's top-2 logit gap is {p['reference_top2_gap_there']:.3g}")
    lines.append(f"Runtime stats: {json.dumps(r['stats'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
