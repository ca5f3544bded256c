"""Recall of every expert predictor at depth 1 and 2 on the real routing traces in ../shared/data/routing.

    python eval/predictor_recall.py [--routing DIR] [--out eval/results/predictor_recall.md] [--quiet]
                                    [--only NAME ...] [--sources NAME ...]

Each trace is split into a fitting part and a scored part that share no sequence (``moecache.
predict_eval.split``): every other sequence fits (``alternate``) where a trace has several, and for
the one-stream Qwen logs the first half of the real records fits and the second half is scored
(``stream``). Every predictor is fitted on the fitting part (the ones that need no fitting still
learn their fallback prior there) and replayed token by token on the scored part.

The traces are read from the published files with ``moecache.trace.importers`` (format detected
from the content; warm-up and missing records handled and counted there). ``gate_lookahead`` needs
hidden states, which no published trace has: see ``eval/gate_lookahead.py`` for it on the trained
model.
"""

from __future__ import annotations

import os

# The machine these run on is small and shared: extra BLAS threads only contend there (a 64x192 by
# 192x64 product took 0.23 ms on one thread, 6 ms on two). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from moecache.predict_eval import evaluate
from moecache.predictors import PREDICTORS
from moecache.registry import Registry
from moecache.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROUTING = ROOT.parent / "shared" / "data" / "routing"

# -- the traces: read with moecache.trace.importers (the format is detected from the files) -----------

@dataclass(frozen=True)
class Source:
    """A published trace folder: which of its files to read, how to split, and what to say about it."""

    label: str
    files: tuple[str, ...]
    mode: str
    note: str


#: Published trace folders under ``--routing``.
SOURCES: Registry[Source] = Registry("routing source")
SOURCES.register("mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")(Source(
    "mixtral-8x7b (decode)", ("gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl"), "alternate",
    "4 decode sequences (GSM8K 0-1, HumanEval 0-1); fit on problem 0 of each, score problem 1; routing_raw.jsonl "
    "left out (its decode part repeats HumanEval 0)"))
SOURCES.register("deepseek-v2-lite-chat__moe-beyond")(Source(
    "deepseek-v2-lite (prefill)", ("training_data_eamc",), "alternate", "600 prompts, prefill replayed token by token; every other prompt fits"))
SOURCES.register("llama-4-maverick-17b-128e-instruct__patterns-behind-chaos-subset")(Source(
    "llama-4-maverick (MMLU)", ("llama4-mmlu-abstract_algebra", "llama4-mmlu-anatomy"), "alternate",
    "235 requests (prefill chunk + decode steps); every other request fits"))
SOURCES.register("qwen1.5-moe-a2.7b-chat__vllm-moe-logger")(Source(
    "qwen1.5-moe layer {layer}", ("moe_layer0.jsonl", "moe_layer8.jsonl", "moe_layer12.jsonl", "moe_layer18.jsonl", "moe_layer23.jsonl"), "stream",
    "one layer only ({n} real records, warm-up dummies dropped by the importer, in vLLM's batched order: requests "
    "are not separated): cross-layer predictors do not apply (depth d = the d-th next record at the same layer); "
    "first half fits, second half scored"))


def load(routing: Path, name: str) -> list[tuple[str, Trace, str, str]]:
    """``[(label, trace, split mode, note)]`` for one folder (the Qwen logs give one trace per layer)."""
    from moecache.trace.importers import read_sources

    src = SOURCES.get(name)
    _, traces, _ = read_sources([str(routing / name / f) for f in src.files])
    out = []
    for it in traces:
        tr = it.trace()
        out.append((src.label.format(layer=tr.meta.moe_layers[0]), tr, src.mode, src.note.format(n=len(tr))))
    return out


#: Predictors that read hidden states are measured in eval/gate_lookahead.py; the oracle needs the simulator.
TRACE_ONLY = [n for n in PREDICTORS.names() if not PREDICTORS.get(n).needs_model and n != "oracle"]
#: Non-default configurations worth a row of their own: (name, params).
VARIANTS = [("transition", {"combine": "mean"}), ("learned", {"model": "logistic", "max_samples": 8000})]


def run(routing: Path, only: list[str] | None, sources: list[str] | None, quiet: bool) -> list[dict[str, Any]]:
    results = []
    for src in sources or SOURCES.names():
        for label, trace, mode, note in load(routing, src):
            L = trace.num_layers
            configs = [(n, {}) for n in (only or TRACE_ONLY)] + [v for v in VARIANTS if not only or v[0] in only]
            # one MoE layer: "cross-layer" would only mean the same layer a record later
            configs = [c for c in configs if not (L == 1 and c[0] == "transition")]
            for name, params in configs:
                pred = PREDICTORS.get(name)(L, trace.meta.num_experts, trace.meta.top_k, **params)
                t0 = time.perf_counter()
                rows = evaluate([pred], trace, (1, 2), mode=mode, label=label, progress=not quiet)
                wall = time.perf_counter() - t0
                for r in rows:
                    results.append({**r.to_json(), "source": src, "note": note, "wall_s": round(wall, 1),
                                    "experts": trace.meta.num_experts})
                if not quiet:
                    print(f"{label:32s} {name:18s} {params} " + "  ".join(f"d{r.depth} recall@k {r.recall():.3f}" for r in rows)
                          + f"  ({wall:.0f}s)", file=sys.stderr)
    return results


def _order(r: dict[str, Any]) -> tuple:
    # defaults first in a fixed order (simplest to richest), then the variants
    names = ["prior", "temporal", "transition", "activation_matrix", "learned"]
    is_variant = any(r["predictor"] == n and all(r["params"].get(k) == v for k, v in p.items()) for n, p in VARIANTS)
    rank = names.index(r["predictor"]) if r["predictor"] in names else len(names)
    return (is_variant, rank, r["predictor"], json.dumps(r["params"], sort_keys=True), r["depth"])


def _offset_recall(r: dict[str, Any], offset: int) -> float | None:
    """recall@top_k over the targets in the same token (``offset`` 0) or in a later one (``offset`` 1: every
    target past the last layer; on a one-layer trace depth d reaches d tokens ahead), or None."""
    rows = [v for o, v in r.get("by_offset", {}).items() if (int(o) == 0) == (offset == 0)]
    selected = sum(v["selected"] for v in rows)
    return sum(v[f"hits@{r['top_k']}"] for v in rows) / selected if selected else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _label(r: dict[str, Any]) -> str:
    for n, p in VARIANTS:
        if r["predictor"] == n and all(r["params"].get(k) == v for k, v in p.items()):
            return n + " (" + ", ".join(f"{k}={v}" for k, v in p.items()) + ")"
    return r["predictor"]


def write_markdown(results: list[dict[str, Any]], out: Path, command: str, elapsed: float) -> None:
    from moecache.atomic import write_text_atomic

    results = sorted(results, key=lambda r: (list(dict.fromkeys(x["trace"] for x in results)).index(r["trace"]),) + _order(r))
    traces = list(dict.fromkeys(r["trace"] for r in results))
    lines = ["# Predictor recall on the real routing traces", "",
             f"- date: {date.today().isoformat()}; machine: {platform.node()} ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, shared with other jobs), Python {platform.python_version()}, numpy {np.__version__}",
             f"- command: `{command}` ({elapsed:.0f} s)",
             "- recall@m = share of the truly selected experts found among the predictor's m most likely experts "
             "(m = top_k and 2*top_k; ties to the lowest id); precision@2k = share of a 2*top_k prefetch set used. "
             "Depth d = the MoE layer d ahead (wrapping into the next token).",
             "- each trace is split into a fitting part and a scored part that share no sequence (see each section); "
             "every predictor, including those that only learn a fallback prior, is fitted on the first and scored on "
             "the second. `gate_lookahead` and `hidden_state` need hidden states, which no published trace has: see "
             "gate_lookahead.md and hidden_predictor.md (same-token and next-token recall on the trained model).",
             "- params: defaults unless the row names a variant; the sections list every parameter.",
             "", "## Summary: recall@top_k at depth 1 (depth 2 in brackets)", ""]
    labels = list(dict.fromkeys(_label(r) for r in results))
    lines.append("| trace | top-k / experts | chance | " + " | ".join(labels) + " |")
    lines.append("|" + " --- |" * (3 + len(labels)))
    for trace in traces:
        rows = [r for r in results if r["trace"] == trace]
        cells = []
        for lab in labels:
            got = {r["depth"]: r[f"recall@{r['top_k']}"] for r in rows if _label(r) == lab}
            cells.append(f"{got[1]:.3f} ({got[2]:.3f})" if got else "n/a")
        k, E = rows[0]["top_k"], rows[0]["experts"]
        lines.append(f"| {trace} | {k} / {E} | {k / E:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Summary: recall@top_k on next-token targets (depth d from layer l with l + d >= layers), "
              "depth 1 (depth 2 in brackets)", "",
              "The prediction crosses into the next token: the target is a layer of a token not yet decoded. "
              "One-layer traces (Qwen logs) have only such targets.", ""]
    lines.append("| trace | " + " | ".join(labels) + " |")
    lines.append("|" + " --- |" * (1 + len(labels)))
    for trace in traces:
        rows = [r for r in results if r["trace"] == trace]
        cells = []
        for lab in labels:
            got = {r["depth"]: _offset_recall(r, 1) for r in rows if _label(r) == lab}
            cells.append(f"{_fmt(got[1])} ({_fmt(got[2])})" if got else "n/a")
        lines.append(f"| {trace} | " + " | ".join(cells) + " |")
    lines.append("")
    for trace in traces:
        rows = [r for r in results if r["trace"] == trace]
        k = rows[0]["top_k"]
        sizes = sorted(int(m) for m in rows[0]["hits"])
        lines += [f"## {trace}", "", rows[0]["note"] + f"; top-{k}, {rows[0]['targets']:,} targets scored at depth 1.", ""]
        head = ("| predictor | params | depth | " + " | ".join(f"recall@{m}" for m in sizes)
                + f" | precision@{sizes[-1]} | recall@{k} same token | recall@{k} next token | fit s | us / layer-step |")
        lines += [head, "|" + " --- |" * (8 + len(sizes))]
        for r in rows:
            us = 1e6 * r["seconds"] / max(r["layer_steps"], 1)
            params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
            lines.append(f"| {r['predictor']} | {params} | {r['depth']} | " + " | ".join(f"{r[f'recall@{m}']:.3f}" for m in sizes)
                         + f" | {r[f'precision@{sizes[-1]}']:.3f} | {_fmt(_offset_recall(r, 0))} | "
                         f"{_fmt(_offset_recall(r, 1))} | {r['fit_seconds']:.1f} | {us:.1f} |")
        lines.append("")
    lines += ["`fit s`: seconds to fit on the fitting part. `us / layer-step`: time inside the predictor (observe, "
              "split evenly among the depths, plus predict) per request row and MoE layer, with up to 64 requests "
              "replayed side by side as batch rows (the Qwen logs are one stream: one row). activation_matrix finds "
              "its matches on the first predict after an observation, so that cost shows under depth 1.", ""]
    write_text_atomic(str(out), "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routing", type=Path, default=DEFAULT_ROUTING)
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "predictor_recall.md")
    ap.add_argument("--only", nargs="*", help="predictor names (default: every trace-only predictor)")
    ap.add_argument("--sources", nargs="*", help=f"trace folders (default: all of {SOURCES.names()})")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = run(args.routing, args.only, args.sources, args.quiet)
    elapsed = time.perf_counter() - t0
    command = "python eval/predictor_recall.py " + " ".join(sys.argv[1:])
    write_markdown(results, args.out, command.strip(), elapsed)
    from moecache.atomic import write_json_atomic

    write_json_atomic(str(args.out.with_suffix(".json")), results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
