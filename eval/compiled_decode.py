"""Compiled decode against eager, side by side in one run (issue 20): is the decode step still bound by the host?

One shape per invocation (``eval/_shapes.py``: real sizes, random weights, every expert generated into one
pinned host store), routing replayed from the shape's real trace (``moecache.forced_routing``, teacher-forced),
as ``eval/e2e_compare.py`` does; its bench helpers (``eval/e2e_harness.py``: batch plans, warm-up + timed
replay, copy timing, fitted predictors, the oracle that reads the replay ahead) are reused as they are.

Configurations (``--configs``, names below; ``eager`` / ``compiled`` = the same offload without / with
``compile=True``, whose decode steps run as CUDA-graph pieces around the eager experts call):

* ``resident-eager``: every expert on the GPU, unpatched transformers, ``batched_mm`` experts;
* ``resident-hf-compile``: the same model under transformers' own recipe, the reference: a static KV cache and
  ``torch.compile(fullgraph=True, mode="reduce-overhead")`` of the whole forward for decode steps (prefill eager);
* ``pool-all-eager`` / ``pool-all-compiled``: ``moecache.offload`` with a pool that holds every expert, all
  preloaded (no miss: what the runtime's path costs by itself);
* ``lru-eager`` / ``lru-compiled``: ``--fraction`` (25%) of expert memory, LRU over one global pool, no prefetch;
* ``oracle-eager`` / ``oracle-compiled``: the same with prefetch one layer ahead by the oracle that reads the
  replay's routing (``ReplayOracle``): perfect predictions, the ceiling of prefetch on this machine;
* ``learned-eager`` / ``learned-compiled``: prefetch one layer ahead by the learned predictor (fitted on the
  sequences not replayed), at probability >= 0.5: a real predictor.

Each configuration is set up, warmed up (``--warm-steps`` decode steps: compiles and captures the graphs), reset
and timed on the batch's sequences (``--tokens`` rows each: 1 prefill row then decode). ``--repeats R`` runs the
whole list R times, interleaved (config 1, 2, ..., then again), and reports per configuration the median
tokens/s of its runs with the range; ratios (the issue's targets) are taken between medians.

Time guard: ``--time-budget`` seconds for the whole run (default 540: each command fits in 9 minutes), shared
among the runs left; results are written (JSON and the Markdown next to it, atomically) after every run.

    PYTHONUNBUFFERED=1 python eval/compiled_decode.py --model deepseek --batch 1 --repeats 3 \\
        --configs resident-eager,resident-hf-compile,pool-all-compiled,lru-eager,lru-compiled \\
        --out eval/results/compiled_decode_deepseek_b1.json
    python eval/compiled_decode.py --model deepseek --quick --compile-backend aot_eager --out /tmp/cd.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _shapes import (build_model, get_shape, machine, materialise_experts, prepare_trace,  # noqa: E402
                     release_experts, sync)
from e2e_harness import (Bench, Budget, Candidate, _error_row, _timed, measure_copy, offload_kwargs,  # noqa: E402
                         plan_batches)

from moecache.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.runtime import offload  # noqa: E402

#: The offloaded candidates, by configuration name prefix.
CANDIDATES = {"lru": "lru", "oracle": "lru+oracle:depth=1", "learned": "lru+learned:depth=1:min_prob=0.5"}
CONFIGS = ("resident-eager", "resident-hf-compile", "pool-all-eager", "pool-all-compiled", "lru-eager",
           "lru-compiled", "oracle-eager", "oracle-compiled", "learned-eager", "learned-compiled")
DEFAULT_CONFIGS = CONFIGS
#: The issue's targets: (text, numerator config(s), denominator config(s), factor). Several configs: the best.
TARGETS = (
    ("pool-all compiled >= 2x resident eager batched_mm", ("pool-all-compiled",), ("resident-eager",), 2.0),
    ("best compiled at 25% >= 2x best eager at 25%", ("lru-compiled", "oracle-compiled", "learned-compiled"),
     ("lru-eager", "learned-eager"), 2.0),
    ("oracle prefetch >= 1.2x LRU (compiled)", ("oracle-compiled",), ("lru-compiled",), 1.2),
    ("real predictor >= 1.05x LRU (compiled)", ("learned-compiled",), ("lru-compiled",), 1.05),
    ("moonshot: best compiled at 25% >= 0.9x pool-all compiled", ("lru-compiled", "learned-compiled"),
     ("pool-all-compiled",), 0.9),
)


# -- transformers' own compile of the all-resident model (the reference) ------------------------------

_HF_COMPILED: dict[tuple[int, str], Any] = {}

class HFCompiled:
    """The resident model's decode under transformers' recipe: a ``StaticCache`` per request (made here; the
    replay brings an empty dynamic one), ``torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")``
    for one-token calls, the prefill eager."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, backend: str = "inductor"):
        import inspect

        self.model = model
        self.max_cache_len = max_cache_len
        self.original = model.forward
        params = inspect.signature(self.original).parameters
        self.cache_arg = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        self.takes_position = "cache_position" in params
        # reduce-overhead: inductor with CUDA graphs (transformers' default compile config); another backend for
        # CPU smoke runs only
        opts = dict(mode="reduce-overhead") if backend == "inductor" else dict(backend=backend)
        # One compiled function per model and backend, kept across runs (the repeats then reuse its graphs).
        key = (id(model), backend)
        if key not in _HF_COMPILED:
            _HF_COMPILED[key] = torch.compile(self.original, fullgraph=True, dynamic=False, **opts)
        self.compiled = _HF_COMPILED[key]
        self.caches: dict[int, Any] = {}
        self.length = 0
        model.forward = self.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from transformers import StaticCache

        x = kwargs["input_ids"]
        rows, tokens = x.shape
        cache = kwargs.get(self.cache_arg)
        if not isinstance(cache, StaticCache):
            cache = self.caches.get(rows)
            if cache is None:
                cache = self.caches[rows] = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            cache.reset()
            self.length = 0
            kwargs[self.cache_arg] = cache
        self.length += tokens
        if tokens > 1:
            return self.original(*args, **kwargs)
        if self.takes_position:
            kwargs["cache_position"] = torch.arange(self.length - 1, self.length, device=x.device)
        return self.compiled(*args, **kwargs)

    def remove(self) -> None:
        del self.model.forward
        self.caches.clear()


# -- one run of one configuration ---------------------------------------------------------------------

def _row(name: str, bench: Bench, plan: Any, share: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"config": name}
    try:
        row.update(fn())
    except Exception as exc:  # noqa: BLE001  (one failing configuration must not end the run)
        row.update(_error_row(exc))
    finally:
        if bench.dev.type == "cuda":
            torch.cuda.empty_cache()
    row.pop("_units", None)
    return row


def run_resident(bench: Bench, plan: Any, share: float, hf_compile: bool, backend: str) -> dict[str, Any]:
    materialise_experts(bench.model, bench.store, bench.dev, bench.shape.family)
    wrapper = None
    try:
        bench.model.set_experts_implementation("batched_mm")
        if hf_compile:
            wrapper = HFCompiled(bench.model, bench.tokens + 8, backend)
        out = _timed(bench, plan, share, bench.tokens - 1)
        out["experts_implementation"] = "batched_mm"
        return out
    finally:
        if wrapper is not None:
            wrapper.remove()
        release_experts(bench.model, bench.shape.family)


def run_offloaded(bench: Bench, plan: Any, share: float, cand: Candidate, compiled: bool, pool_all: bool,
                  backend: str) -> dict[str, Any]:
    bench.model.set_experts_implementation("batched_mm")
    kw = offload_kwargs(bench, cand)
    if pool_all:
        kw["cache_slots"] = bench.total
        kw["policy"] = "lru"
    if compiled:
        kw.update(compile=backend, max_cache_len=bench.tokens + 8, max_batch_size=plan.batch)
    handle = offload(bench.model, **kw)
    try:
        extra: dict[str, Any] = {}
        if pool_all:
            extra["preloaded_experts"] = handle.preload([(layer, e) for layer in range(bench.L)
                                                         for e in range(bench.E)])
        out = _timed(bench, plan, share, bench.tokens - 1, handle,
                     lookahead=getattr(kw.get("predictor"), "lookahead", None))
        out.update(extra, label=cand.label, compile=backend if compiled else None)
        s = handle.stats()
        if "compile" in s:
            out["compile_stats"] = s["compile"]
        return out
    finally:
        handle.remove(restore=False)


def runner(name: str, backend: str) -> Callable[[Bench, Any, float], dict[str, Any]]:
    if name == "resident-eager":
        return lambda b, p, s: run_resident(b, p, s, False, backend)
    if name == "resident-hf-compile":
        return lambda b, p, s: run_resident(b, p, s, True, backend)
    head, _, mode = name.rpartition("-")
    compiled = mode == "compiled"
    if head == "pool-all":
        return lambda b, p, s: run_offloaded(b, p, s, Candidate.parse("lru"), compiled, True, backend)
    cand = Candidate.parse(CANDIDATES[head])
    return lambda b, p, s: run_offloaded(b, p, s, cand, compiled, False, backend)


# -- summary ------------------------------------------------------------------------------------------

def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: median tokens/s and ms/step over its ok runs, with the range."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        ok = [r for r in rows if r["config"] == name and r.get("status") == "ok" and r.get("tokens_per_s")]
        if not ok:
            bad = [r for r in rows if r["config"] == name]
            out[name] = {"runs": 0, "status": bad[-1].get("status", "?").splitlines()[0]}
            continue
        tps = [r["tokens_per_s"] for r in ok]
        ms = [r["ms_per_step"] for r in ok]
        med = sorted(ok, key=lambda r: r["tokens_per_s"])[len(ok) // 2]
        out[name] = {"runs": len(ok), "tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps),
                     "tokens_per_s_max": max(tps), "ms_per_step": statistics.median(ms),
                     "runs_tokens_per_s": tps, "hit_rate": med.get("hit_rate"),
                     "stall_ms_per_step": med.get("stall_ms_per_step"), "host_ms_per_layer": med.get("host_ms_per_layer"),
                     "compile_stats": med.get("compile_stats"), "status": "ok"}
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    res = []
    for text, num, den, factor in TARGETS:
        a = [summary[c]["tokens_per_s"] for c in num if summary.get(c, {}).get("runs")]
        b = [summary[c]["tokens_per_s"] for c in den if summary.get(c, {}).get("runs")]
        if not a or not b:
            res.append({"target": text, "value": None, "met": None, "why": "not measured in this run"})
            continue
        v = max(a) / max(b)
        res.append({"target": text, "value": v, "met": v >= factor, "factor": factor})
    return res


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def write_markdown(path: str, out: dict[str, Any]) -> None:
    m, st = out["machine"], out["setup"]
    lines = [f"# Compiled decode: {st['title']}, {st['moe_layers']} MoE layers", "",
             f"- card: {m.get('gpu', 'no GPU')} (CUDA {m.get('cuda')}), torch {m['torch']}, transformers "
             f"{m['transformers']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads",
             f"- date: {m['date']}",
             f"- command: `{out['command']}`",
             f"- {st['slots']} of {st['total_experts']} experts on the GPU in the offloaded rows "
             f"({100 * st['fraction']:.0f}%); expert copy {_f(out['copy']['ms_per_expert'], '.3f')} ms; "
             f"{st['tokens_per_sequence']} rows per sequence, {st['warm_steps']} warm-up steps; compiled pieces: "
             f"{st['compile_backend']}", ""]
    for b, entry in out["batches"].items():
        lines += [f"## batch {b}", "", "| configuration | tokens/s (median) | range | runs | ms/step | hit rate | "
                  "stall ms/step | host ms/layer | graphs (pieces / replays) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in entry.get("summary", {}).items():
            if not s.get("runs"):
                lines.append(f"| {name} | - | - | 0 | - | - | - | - | {s.get('status', '')[:80]} |")
                continue
            cs = s.get("compile_stats") or {}
            g = f"{cs.get('pieces')} / {cs.get('replays')}" if cs else "-"
            hr = None if s.get("hit_rate") is None else 100 * s["hit_rate"]
            lines.append(f"| {name} | {s['tokens_per_s']:.2f} | {s['tokens_per_s_min']:.2f}-{s['tokens_per_s_max']:.2f} "
                         f"| {s['runs']} | {s['ms_per_step']:.1f} | {_f(hr, '.1f')} | "
                         f"{_f(s.get('stall_ms_per_step'), '.1f')} | {_f(s.get('host_ms_per_layer'), '.3f')} | {g} |")
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for t in entry.get("targets", []):
            met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['target']} | {_f(t['value'])} | {met} {t.get('why', '')} |")
        lines.append("")
    write_text_atomic(path, "\n".join(lines))


# -- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=("deepseek", "mixtral"))
    ap.add_argument("--out", required=True, help="JSON results (a .md is written next to it)")
    ap.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated of: {', '.join(CONFIGS)}")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=None, help="first N MoE layers (default: the shape's)")
    ap.add_argument("--tokens", type=int, default=None, help="rows replayed per sequence (default 64)")
    ap.add_argument("--sequences", type=int, default=None, help="sequences per batch size (default 2 at batch 1, b)")
    ap.add_argument("--warm-steps", type=int, default=None, help="decode steps of the warm-up (default 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default 540)")
    ap.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    ap.add_argument("--trace", default=None, help="moecache trace folder or raw source folder")
    ap.add_argument("--trace-files", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise ConfigError(f"--configs: unknown {', '.join(bad)}; valid: {', '.join(CONFIGS)}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: at least 1")
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    q = args.quick
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    budget = Budget(args.time_budget or (240.0 if q else 540.0), reserve_s=10.0 if q else 20.0)
    tokens = args.tokens or (10 if q else 64)
    warm_steps = args.warm_steps or (3 if q else 8)
    shape = get_shape(args.model)
    command = "python " + " ".join(shlex.quote(a) for a in ["eval/compiled_decode.py"] + list(
        sys.argv[1:] if argv is None else argv))

    t0 = time.perf_counter()
    raw = shape.load_trace(args.trace or shape.trace_dir, args.trace_files or (12 if q else 160))
    trace = prepare_trace(raw, args.layers or shape.default_layers)
    L = trace.meta.num_layers
    per_batch = {b: args.sequences for b in batches} if args.sequences else {}
    plans, fit_ids, notes, plan_errors = plan_batches(trace, batches, tokens, warm_steps, per_batch)
    fit_trace = trace.select_sequences(fit_ids[:160])
    model, store = build_model(shape.make_config(q, L), shape.family, dev, dtype, args.seed)
    sync(dev)
    E, k = store.num_experts, trace.meta.top_k
    slots = int(L * E * args.fraction)
    copy = measure_copy(store, dev)
    bench = Bench(shape=shape, model=model, store=store, trace=trace, fit_trace=fit_trace, dev=dev, dtype=dtype,
                  L=L, E=E, k=k, slots=slots, fraction=args.fraction, tokens=tokens, warm_steps=warm_steps,
                  accelerate_steps=0, budget=budget, copy=copy, min_share_s=0.5 if q else 2.0)
    if any(c.startswith("learned") for c in configs):
        bench.predictor("learned")  # fitted once, before the clock of any run
    setup_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "machine": machine(), "command": command, "args": vars(args), "copy": copy, "batches": {},
        "setup": {"title": shape.title, "model": shape.key, "moe_layers": L, "experts": E, "top_k": k,
                  "total_experts": L * E, "slots": slots, "fraction": args.fraction, "dtype": str(dtype),
                  "tokens_per_sequence": tokens, "warm_steps": warm_steps, "compile_backend": args.compile_backend,
                  "notes": notes, "setup_s": setup_s, "expert_bytes": store.layout.slot_bytes}}
    md = os.path.splitext(args.out)[0] + ".md"
    print(f"{shape.title}: {L} MoE layers x {E} experts, {slots} slots at {args.fraction:.0%}; copy "
          f"{copy['ms_per_expert']:.3f} ms/expert; set-up {setup_s:.0f} s", flush=True)

    def save() -> None:
        out["wall_s"] = budget.elapsed()
        write_json_atomic(args.out, out)
        write_markdown(md, out)

    runs = [(b, rep, c) for b in batches if b not in plan_errors for rep in range(args.repeats) for c in configs]
    for b in batches:
        out["batches"][str(b)] = {"error": plan_errors[b]} if b in plan_errors else {"rows": []}
    for i, (b, rep, name) in enumerate(runs):
        entry = out["batches"][str(b)]
        share = budget.left() / max(1, len(runs) - i)
        if share < bench.min_share_s:
            row = {"config": name, "status": f"skipped: time budget spent ({share:.1f} s left for it)"}
        else:
            print(f"batch {b} run {rep + 1}: {name} ... {budget.left():.0f} s left", flush=True)
            row = _row(name, bench, plans[b], share, lambda: runner(name, args.compile_backend)(bench, plans[b], share))
        row["run"] = rep + 1
        entry["rows"].append(row)
        print(f"  {name:22s} {_f(row.get('tokens_per_s'), '8.2f')} tokens/s {_f(row.get('ms_per_step'), '8.1f')} "
              f"ms/step  {row['status'].splitlines()[0][:100]}", flush=True)
        entry["summary"] = summarise(entry["rows"])
        entry["targets"] = targets(entry["summary"])
        save()
    store.close()
    save()
    print(f"wrote {args.out} and {md} in {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
