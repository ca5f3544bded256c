"""Where a decode layer's CPU-expert time goes on this machine: a probe of the pieces that
``eval/hybrid_decode.py`` only sees summed (``eval/results/hybrid_diag/README.md``).

Mixtral-8x7B expert shape (``--layers``, default 2), random bf16 experts in the pinned host store.
Measures, each as median / p90 / max over ``--reps``:

* the host's view: vCPUs, threads per core, transparent huge pages, the CPU time stolen by the
  hypervisor during each part (``/proc/stat``);
* a small device-to-host copy (one hidden row, 8 KiB) into pageable memory (what ``launch`` does)
  and into a pinned buffer with an event, idle and right after a CPU-pool task;
* one CPU task of two experts at one token: back to back, after an idle gap (the workers asleep),
  after the gap with ``prewake`` first, and while the main thread spins in a GPU synchronisation;
* the decode itself (``hybrid="cpu"``, every miss on the CPU; ``auto``; copy-only), with each launch
  timed and the CPU seconds of the process's threads by name; ``cpu+torch_cpu_op`` adds, before each
  launch, the small torch CPU op the launch used to run (a gather and a conversion of one row).

    python3 eval/hybrid_probe.py --out-dir OUT      # GPU machine, ~2 min (results: hybrid_diag/probe.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "eval"))

from moecache.atomic import write_json_atomic  # noqa: E402
from moecache.runtime import hybrid as hy
from moecache.runtime import cpu_kernel as ck  # noqa: E402


def dist(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": statistics.median(s), "p90": s[int(0.9 * (len(s) - 1))], "max": s[-1], "min": s[0], "n": len(s)}


def steal_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[7], sum(v)  # steal, total


def sysinfo() -> dict[str, Any]:
    out: dict[str, Any] = {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                           "torch_threads": torch.get_num_threads()}
    for name, cmd in (("lscpu", ["lscpu"]),):
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except Exception as e:  # noqa: BLE001 - a probe: record what is missing
            out[name] = repr(e)
    for p in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
              "/sys/fs/cgroup/cpu.max", "/proc/sys/kernel/sched_min_granularity_ns"):
        try:
            with open(p) as f:
                out[p] = f.read().strip()
        except OSError as e:
            out[p] = repr(e)
    out["perf"] = subprocess.run("command -v perf nsys", shell=True, capture_output=True, text=True).stdout
    return out


def timed(fn: Callable[[], Any], reps: int, between: Callable[[], Any] | None = None) -> tuple[list[float], float]:
    """ms of each call of ``fn`` (``between`` runs untimed before each); and the steal share."""
    out = []
    s0, t0 = steal_jiffies()
    for _ in range(reps):
        if between is not None:
            between()
        a = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - a))
    s1, t1 = steal_jiffies()
    return out, (s1 - s0) / max(1, t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    dev = torch.device("cuda")
    from hybrid_decode import build, load_trace

    res: dict[str, Any] = {"sys": sysinfo()}
    print(res["sys"]["lscpu"], {k: v for k, v in res["sys"].items() if k != "lscpu"}, flush=True)
    model, store = build(False, args.layers, dev, torch.bfloat16)
    model.set_experts_implementation("batched_mm")
    kernel = ck.CppKernel(store, ck.default_threads(), "auto", pin=True)
    H = 4096
    keys = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    turn = iter(range(1 << 62))
    x = torch.randn(1, H).to(torch.bfloat16)
    x2 = torch.cat([x, x])

    def task() -> float:
        layer, e = keys[next(turn) % len(keys)]
        e2 = (e + 1) % store.num_experts
        lo, hi = min(e, e2), max(e, e2)
        return kernel.wait(kernel.submit(layer, [lo, hi], x2, [1, 1]))[1]

    hidden = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    pinned = torch.empty(1, H, dtype=torch.bfloat16, pin_memory=True)
    ev = torch.cuda.Event()

    def d2h_pageable() -> None:
        hidden.to("cpu")

    def d2h_pinned() -> None:
        pinned.copy_(hidden, non_blocking=True)
        ev.record()
        ev.synchronize()

    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def gpu_busy(ms: float = 2.0) -> None:  # roughly ms of GPU work, then a spinning sync
        n = max(1, int(ms / 0.12))
        for _ in range(n):
            a @ a
        torch.cuda.synchronize()

    for _ in range(3):
        task()
        gpu_busy()
    R = args.reps
    parts: dict[str, Any] = {}

    def record(name: str, fn: Callable[[], Any], between: Callable[[], Any] | None = None,
               inner: Callable[[], list[float]] | None = None) -> None:
        if inner is not None:
            s0, t0 = steal_jiffies()
            xs = inner()
            s1, t1 = steal_jiffies()
            steal = (s1 - s0) / max(1, t1 - t0)
        else:
            xs, steal = timed(fn, R, between)
        parts[name] = {**dist(xs), "steal_share": steal}
        print(f"{name:48s} median {parts[name]['median']:.3f} p90 {parts[name]['p90']:.3f} "
              f"max {parts[name]['max']:.3f} ms  steal {steal:.3f}", flush=True)

    record("d2h pageable, idle", d2h_pageable)
    record("d2h pinned+event, idle", d2h_pinned)
    record("d2h pageable after a CPU task", d2h_pageable, between=task)
    record("d2h pinned+event after a CPU task", d2h_pinned, between=task)
    record("d2h pageable after gpu_busy", d2h_pageable, between=gpu_busy)
    record("d2h pageable after prewake", d2h_pageable, between=kernel.prewake)
    record("task (2 experts) back to back", lambda: None, inner=lambda: [task() for _ in range(R)])

    def gap_tasks(gap_s: float, prewake: bool) -> list[float]:
        out = []
        for _ in range(R):
            time.sleep(gap_s)
            if prewake:
                kernel.prewake()
                time.sleep(0.0003)
            out.append(task())
        return out

    record("task after 3 ms sleep", lambda: None, inner=lambda: gap_tasks(0.003, False))
    record("task after 3 ms sleep, prewake 0.3 ms before", lambda: None, inner=lambda: gap_tasks(0.003, True))
    record("task after 20 ms sleep", lambda: None, inner=lambda: gap_tasks(0.02, False))

    def busy_tasks() -> list[float]:
        out = []
        for _ in range(R):
            gpu_busy()
            out.append(task())
        return out

    record("task after 2 ms gpu_busy (spinning sync)", lambda: None, inner=busy_tasks)
    kernel.close()
    res["parts"] = parts

    # The decode, every miss on the CPU, each launch's pieces timed.
    from moecache.forced_routing import run_forced
    from moecache.runtime import offload

    trace, _pick = load_trace(args.layers, args.tokens)
    pieces: list[tuple[float, float, float]] = []
    orig_launch = hy.HybridExecutor.launch

    def thread_cpu() -> dict[str, float]:
        """CPU seconds so far of this process's threads, by name (the pool's and copy worker's are named)."""
        out: dict[str, float] = {}
        base = f"/proc/{os.getpid()}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/comm") as f:
                    name = f.read().strip()
                with open(f"{base}/{tid}/stat") as f:
                    v = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = "main" if int(tid) == os.getpid() else name
            out[name] = out.get(name, 0.0) + (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
        return out

    def torch_cpu_op() -> None:  # what launch did before: a torch CPU op (wakes torch's OpenMP threads)
        rows = torch.from_numpy(np.zeros(2, dtype=np.int64))
        torch.zeros(1, H, dtype=torch.bfloat16)[rows].to(torch.float32).contiguous()

    for mode, extra in (("cpu", None), ("cpu", torch_cpu_op), ("auto", None), ("copy", None)):
        name = mode + ("+torch_cpu_op" if extra else "")
        h = offload(model, cache_slots=2 * args.layers, device="cuda", host_store=store, own_store=False,
                    hybrid=False if mode == "copy" else mode)
        run_forced(model, trace, sequences=1, max_tokens=6, prefill=1)
        h.reset_stats()
        pieces.clear()

        def launch(self, layer, hidden, weights, ids, experts, extra=extra):  # noqa: ANN001 - a probe's patch
            t0 = time.perf_counter()
            if extra is not None:
                extra()
            t1 = time.perf_counter()
            work = orig_launch(self, layer, hidden, weights, ids, experts)
            t2 = time.perf_counter()
            pieces.append((1e3 * (t1 - t0), 1e3 * (t2 - t1), work.launch_ms))
            return work

        hy.HybridExecutor.launch = launch
        c0 = thread_cpu()
        s0, tt0 = steal_jiffies()
        r = run_forced(model, trace, prefill=1).as_dict()
        s1, tt1 = steal_jiffies()
        c1 = thread_cpu()
        hy.HybridExecutor.launch = orig_launch
        st = h.stats()
        row = {"ms_per_token": r["ms_per_decode_token"], "steal_share": (s1 - s0) / max(1, tt1 - tt0),
               "decode_s": r.get("decode_s"),
               "thread_cpu_s": {k: round(c1[k] - c0.get(k, 0.0), 3) for k in c1 if c1[k] - c0.get(k, 0.0) > 0},
               "extra_op_ms": dist([p[0] for p in pieces]) if pieces else None,
               "launch_ms": dist([p[1] for p in pieces]) if pieces else None,
               **{k: st.get(k) for k in ("cpu_ms", "cpu_experts", "cpu_launch_parts_ms_per_layer", "cpu_wait_ms",
                                         "cpu_layers", "sync_ms_per_layer", "decisions", "hit_rate", "cpu_cost_scale")}}
        if st.get("cpu_experts"):
            row["cpu_ms_per_expert"] = st["cpu_ms"] / st["cpu_experts"]
        res["decode_" + name] = row
        print(name, json.dumps(row, default=str), flush=True)
        h.remove(restore=False)
    store.close()
    os.makedirs(args.out_dir, exist_ok=True)
    write_json_atomic(os.path.join(args.out_dir, "hybrid_probe.json"), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
