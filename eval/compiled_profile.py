"""Where a decode step's time goes, eager against compiled (issue 20, item 2), with ``torch.profiler``.

Same bench as ``eval/compiled_decode.py`` (shape, random weights, replayed routing). Configurations
(``--configs``): ``lru-eager``, ``lru-compiled``, ``oracle-eager``, ``oracle-compiled`` (see that script), at
``--fraction`` (25%), batch ``--batch`` (1). Each is warmed up (compiles and captures), then ``--steps`` decode
steps are profiled (CPU and CUDA activities) with named ranges added around the runtime's parts (the script
wraps them; nothing in the runtime changes):

* ``step``: one decode call of the model, synchronised at its end so that its device work falls inside it;
* ``moe.layer``: one experts call (``Runtime.run_layer``); within it ``moe.acquire`` (policy, demand copies
  and waits queued), ``moe.kernel`` (the experts kernel launch), ``moe.prefetch`` (predictor and prefetch
  queueing); the routing sync is the ``aten::_to_copy``/``aten::copy_`` of the ids to the host inside it;
* ``piece``: a compiled piece (graph replay) between two experts calls.

The table per configuration, per decode step (means over the profiled steps):

* host: wall time of the step; ``segments``: the profiler's top-level events in the step outside the experts
  calls (eager: the model's own ops and launches; compiled: the pieces); ``experts calls``: the ``moe.layer``
  ranges, split into routing sync wait, acquire, kernel launch, prefetch and the rest; ``accounted`` = (segments
  + experts calls) / wall: what the events cover (the rest is Python between them);
* device: kernel time (sum over compute kernels), host-to-device copy time (the copy engine: expert copies),
  device-to-host copies, and the runtime's own stall count (compute stream waiting for copies).

Results: JSON and Markdown next to it (card, date, command), plus the Chrome traces under ``--trace-dir``.

    PYTHONUNBUFFERED=1 python eval/compiled_profile.py --model deepseek --steps 16 \\
        --out eval/results/compiled_profile.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _shapes import build_model, get_shape, machine, prepare_trace, sync  # noqa: E402
from compiled_decode import CANDIDATES  # noqa: E402
from e2e_harness import Bench, Budget, Candidate, measure_copy, offload_kwargs, plan_batches  # noqa: E402

from moecache.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.forced_routing import run_forced  # noqa: E402
from moecache.runtime import offload  # noqa: E402
from moecache.runtime import compiled as compiled_mod  # noqa: E402

CONFIGS = ("lru-eager", "lru-compiled", "oracle-eager", "oracle-compiled")
SYNC_OPS = ("aten::_to_copy", "aten::to", "aten::copy_")


def _ranged(obj: Any, attr: str, name: str) -> Any:
    """Wrap ``obj.attr`` in a profiler range; returns the original to restore."""
    fn = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    setattr(obj, attr, wrapped)
    return fn


class Ranges:
    """The named ranges of the module docstring, installed for one profile and removed after."""

    def __init__(self, model: torch.nn.Module, dev: torch.device, handle: Any):
        rt = handle.runtime
        # On the runtime instance (its methods call each other through self) ...
        self.saved = [(rt, a, None) for a, n in (("_acquire", "moe.acquire"), ("_kernel", "moe.kernel"),
                                                  ("_prefetch", "moe.prefetch")) if _ranged(rt, a, n)]
        # ... and on the experts modules, which hold the bound run_layer they were built with.
        self.experts = [getattr(layer.block, handle.adapter.experts_attr) for layer in rt.layers]
        self.runs = [mod._run for mod in self.experts]
        for mod, fn in zip(self.experts, self.runs):
            def run(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
                with torch.profiler.record_function("moe.layer"):
                    return _fn(*args, **kwargs)
            object.__setattr__(mod, "_run", run)
        self.saved.append((compiled_mod.Piece, "forward", _ranged(compiled_mod.Piece, "forward", "piece")))
        self.model = model
        self.dev = dev
        model_call = model.forward

        def step(*args: Any, **kwargs: Any) -> Any:
            x = kwargs.get("input_ids")
            if x is None or x.shape[1] != 1:
                return model_call(*args, **kwargs)
            with torch.profiler.record_function("step"):
                out = model_call(*args, **kwargs)
                sync(dev)
            return out
        model.forward = step

    def remove(self) -> None:
        for owner, attr, fn in self.saved:
            if fn is None:
                del owner.__dict__[attr]  # back to the class's method
            else:
                setattr(owner, attr, fn)
        for mod, fn in zip(self.experts, self.runs):
            object.__setattr__(mod, "_run", fn)
        del self.model.forward


def _span(e: Any) -> tuple[float, float]:
    return float(e.time_range.start), float(e.time_range.end)


def attribute(events: list[Any]) -> dict[str, Any]:
    """Per-step means (ms) from the profiler's events (module docstring)."""
    from torch.autograd import DeviceType

    steps = [e for e in events if e.name == "step" and e.device_type == DeviceType.CPU]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    acc = {k: 0.0 for k in ("wall", "segments", "experts_calls", "routing_sync", "acquire", "kernel_launch",
                            "prefetch", "experts_other", "kernels", "copy_h2d", "copy_d2h")}
    for s in steps:
        a, b = _span(s)
        acc["wall"] += b - a
        for c in s.cpu_children:
            d = c.cpu_time_total
            if c.name != "moe.layer":
                acc["segments"] += d
                continue
            acc["experts_calls"] += d
            inner = 0.0
            for g in c.cpu_children:
                key = {"moe.acquire": "acquire", "moe.kernel": "kernel_launch", "moe.prefetch": "prefetch"}.get(g.name)
                if key is None and g.name in SYNC_OPS:
                    key = "routing_sync"
                if key is not None:
                    acc[key] += g.cpu_time_total
                    inner += g.cpu_time_total
            acc["experts_other"] += max(0.0, d - inner)
        for e in device:
            x, y = _span(e)
            if x < a or x > b:
                continue
            name = e.name.lower()
            if "memcpy" in name and "htod" in name:
                acc["copy_h2d"] += y - x
            elif "memcpy" in name and "dtoh" in name:
                acc["copy_d2h"] += y - x
            elif "memcpy" not in name and "memset" not in name:
                acc["kernels"] += y - x
    n = max(1, len(steps))
    out = {k: v / n / 1e3 for k, v in acc.items()}  # us -> ms per step
    out["steps"] = len(steps)
    out["accounted"] = (out["segments"] + out["experts_calls"]) / out["wall"] if out["wall"] else None
    return out


def profile_config(name: str, bench: Bench, plan: Any, steps: int, backend: str, trace_dir: str | None
                   ) -> dict[str, Any]:
    head, _, mode = name.rpartition("-")
    cand = Candidate.parse(CANDIDATES[head])
    bench.model.set_experts_implementation("batched_mm")
    kw = offload_kwargs(bench, cand)
    if mode == "compiled":
        kw.update(compile=backend, max_cache_len=bench.tokens + steps + 8, max_batch_size=plan.batch)
    lookahead = getattr(kw.get("predictor"), "lookahead", None)
    handle = offload(bench.model, **kw)
    ranges = None
    try:
        run_forced(bench.model, bench.trace, sequences=plan.warm, max_tokens=1 + bench.warm_steps, prefill=1,
               batch=plan.batch, lookahead=lookahead)
        handle.reset_stats()
        ranges = Ranges(bench.model, bench.dev, handle)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if bench.dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            res = run_forced(bench.model, bench.trace, sequences=plan.groups[0], max_tokens=1 + steps, prefill=1,
                         batch=plan.batch, lookahead=lookahead)
        wall = time.perf_counter() - t0
        row = attribute(list(prof.events()))
        s = handle.stats()
        row.update(config=name, status="ok", decode_steps=res.decode_steps,
                   stall_ms_per_step=1e3 * s["stall_s"] / max(1, res.decode_steps), hit_rate=s["hit_rate"],
                   profiled_wall_s=wall, compile_stats=s.get("compile"))
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            path = os.path.join(trace_dir, f"{name}.json")
            prof.export_chrome_trace(path)
            row["chrome_trace"] = path
        return row
    finally:
        if ranges is not None:
            ranges.remove()
        handle.remove(restore=False)
        if bench.dev.type == "cuda":
            torch.cuda.empty_cache()


COLUMNS = (("wall", "step wall"), ("segments", "segments"), ("experts_calls", "experts calls"),
           ("routing_sync", "routing sync"), ("acquire", "acquire"), ("kernel_launch", "experts launch"),
           ("prefetch", "prefetch"), ("experts_other", "experts other"), ("kernels", "GPU kernels"),
           ("copy_h2d", "H2D copies"), ("copy_d2h", "D2H copies"), ("stall_ms_per_step", "stall"))


def write_markdown(path: str, out: dict[str, Any]) -> None:
    m = out["machine"]
    lines = [f"# Decode step attribution: {out['setup']['title']}, batch {out['setup']['batch']}, "
             f"{out['setup']['fraction']:.0%} of expert memory", "",
             f"- card: {m.get('gpu', 'no GPU')} (CUDA {m.get('cuda')}), torch {m['torch']}, {m['cpu_count']} CPUs",
             f"- date: {m['date']}", f"- command: `{out['command']}`",
             "- ms per decode step (means over the profiled steps); host columns nest as: step wall = segments + "
             "experts calls + unaccounted; experts calls = routing sync + acquire + launch + prefetch + other", "",
             "| config | " + " | ".join(c for _, c in COLUMNS) + " | accounted |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for r in out["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r.get('status', '')[:120]} |")
            continue
        vals = " | ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k, _ in COLUMNS)
        acc = "-" if r.get("accounted") is None else f"{100 * r['accounted']:.0f}%"
        lines.append(f"| {r['config']} | {vals} | {acc} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek", choices=("deepseek", "mixtral"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled per configuration")
    ap.add_argument("--warm-steps", type=int, default=8)
    ap.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    ap.add_argument("--trace", default=None)
    ap.add_argument("--trace-dir", default=None, help="write each configuration's Chrome trace here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(c not in CONFIGS for c in configs):
        raise ConfigError(f"--configs: valid are {', '.join(CONFIGS)}")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = get_shape(args.model)
    trace = prepare_trace(shape.load_trace(args.trace or shape.trace_dir, 12 if args.quick else 160),
                          args.layers or shape.default_layers)
    tokens = args.steps + 1
    plans, fit_ids, _notes, errors = plan_batches(trace, [args.batch], tokens, args.warm_steps, {})
    if errors:
        raise ConfigError(errors[args.batch])
    L = trace.meta.num_layers
    model, store = build_model(shape.make_config(args.quick, L), shape.family, dev, dtype, args.seed)
    E, k = store.num_experts, trace.meta.top_k
    slots = int(L * E * args.fraction)
    bench = Bench(shape=shape, model=model, store=store, trace=trace, fit_trace=trace.select_sequences(fit_ids[:160]),
                  dev=dev, dtype=dtype, L=L, E=E, k=k, slots=slots, fraction=args.fraction, tokens=tokens,
                  warm_steps=args.warm_steps, accelerate_steps=0, budget=Budget(1e9), copy=measure_copy(store, dev))
    command = "python " + " ".join(shlex.quote(a) for a in ["eval/compiled_profile.py"] + list(
        sys.argv[1:] if argv is None else argv))
    out: dict[str, Any] = {"machine": machine(), "command": command, "args": vars(args), "rows": [],
                           "setup": {"title": shape.title, "moe_layers": L, "batch": args.batch,
                                     "fraction": args.fraction, "slots": slots, "steps": args.steps}}
    md = os.path.splitext(args.out)[0] + ".md"
    for name in configs:
        print(f"profiling {name} ...", flush=True)
        try:
            row = profile_config(name, bench, plans[args.batch], args.steps, args.compile_backend, args.trace_dir)
        except Exception as exc:  # noqa: BLE001
            row = {"config": name, "status": f"error: {type(exc).__name__}: {exc}"}
        out["rows"].append(row)
        acc = row.get("accounted")
        print(f"  {name}: {row.get('wall', 0):.2f} ms/step, accounted "
              f"{'-' if acc is None else f'{100 * acc:.0f}%'}  {row['status'][:100]}", flush=True)
        write_json_atomic(args.out, out)
        write_markdown(md, out)
    store.close()
    print(f"wrote {args.out} and {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
