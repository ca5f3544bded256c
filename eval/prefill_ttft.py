"""Time to first token of long prompts with offloaded experts (issue 20, item 4), against its two floors.

DeepSeek-V2-Lite shape by default (``eval/_shapes.py``: real sizes, random weights, experts in a pinned host
store). One prompt of ``--prompt-tokens`` tokens (1024 and 4096 by default; random token ids, the model's own
routing: at these lengths every expert of every layer is needed whatever the router, so no trace is replayed),
batch 1, one forward call: the prefill, timed from the call to the logits with the GPU synchronised.

Rows per prompt length:

* ``resident``: every expert on the GPU, unpatched (``grouped_mm`` experts: the prefill kernel of choice);
* ``copy floor``: every expert crossing the link once, ``layers x experts x`` the copy time of one expert
  measured in this run (one copy per expert from the pinned store, as the runtime copies them);
* ``offload``: ``moecache.offload`` at ``--fraction`` (25%), LRU, each layer's experts copied when the layer
  needs them (demand);
* ``offload+stream``: the same with ``stream_prefill``: each next layer's experts are queued before the current
  layer's kernel, so the copies run while it computes (``moecache.runtime.core``).

The target (issue 20): TTFT within 1.3x of ``max(resident, copy floor)``. ``--repeats R`` runs the rows R
times interleaved; medians with their range are reported. Results: JSON and Markdown next to it, with the card,
date and command.

    PYTHONUNBUFFERED=1 python eval/prefill_ttft.py --out eval/results/prefill_ttft.json
    python eval/prefill_ttft.py --quick --out /tmp/ttft.json        # CPU smoke run, tiny shape
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _shapes import build_model, get_shape, machine, materialise_experts, release_experts, sync  # noqa: E402
from e2e_harness import measure_copy  # noqa: E402

from moecache.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.runtime import offload  # noqa: E402

ROWS = ("resident", "offload", "offload+stream")
TARGET_FACTOR = 1.3


def _prefill(model: torch.nn.Module, ids: torch.Tensor, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
    sync(dev)
    return time.perf_counter() - t0


def run_row(name: str, model: torch.nn.Module, store: Any, family: str, ids: torch.Tensor, dev: torch.device,
            slots: int) -> dict[str, Any]:
    row: dict[str, Any] = {"row": name, "tokens": int(ids.shape[1])}
    try:
        if name == "resident":
            materialise_experts(model, store, dev, family)
            try:
                model.set_experts_implementation("grouped_mm")
                _prefill(model, ids[:, :16], dev)  # warm-up: kernels, allocator
                row["ttft_s"] = _prefill(model, ids, dev)
            finally:
                release_experts(model, family)
        else:
            model.set_experts_implementation("grouped_mm")
            handle = offload(model, cache_slots=slots, device=str(dev), host_store=store, own_store=False,
                             stream_prefill=name == "offload+stream")
            try:
                _prefill(model, ids[:, :16], dev)  # warm-up on a short prompt (no streaming below 64 tokens)
                handle.reset_stats()
                row["ttft_s"] = _prefill(model, ids, dev)
                s = handle.stats()
                row.update({k: s.get(k) for k in ("copies", "bytes_copied", "stall_s", "prefill_streamed",
                                                  "prefill_stream_useful", "prefetch_cancelled", "round_calls",
                                                  "hit_rate")})
            finally:
                handle.remove(restore=False)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  (e.g. out of memory at 4K tokens: reported, the run goes on)
        row["status"] = f"error: {type(exc).__name__}: {exc}"
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def summarise(rows: list[dict[str, Any]], floor_s: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ROWS:
        ok = [r["ttft_s"] for r in rows if r["row"] == name and r["status"] == "ok"]
        if ok:
            out[name] = {"ttft_s": statistics.median(ok), "min_s": min(ok), "max_s": max(ok), "runs": len(ok)}
    ref = max(floor_s, out.get("resident", {}).get("ttft_s", 0.0))
    for name in ("offload", "offload+stream"):
        if name in out and ref > 0:
            out[name]["over_reference"] = out[name]["ttft_s"] / ref
            out[name]["target_met"] = out[name]["ttft_s"] <= TARGET_FACTOR * ref
    out["copy floor"] = {"ttft_s": floor_s, "runs": 0}
    return out


def write_markdown(path: str, out: dict[str, Any]) -> None:
    m, st = out["machine"], out["setup"]
    lines = [f"# Prefill time to first token: {st['title']}, {st['moe_layers']} MoE layers, {st['fraction']:.0%} "
             "of expert memory on the GPU", "",
             f"- card: {m.get('gpu', 'no GPU')} (CUDA {m.get('cuda')}), torch {m['torch']}, transformers "
             f"{m['transformers']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads",
             f"- date: {m['date']}", f"- command: `{out['command']}`",
             f"- copy of one expert {out['copy']['ms_per_expert']:.3f} ms ({out['copy']['gb_per_s']:.1f} GB/s); "
             f"target: TTFT <= {TARGET_FACTOR}x max(resident, copy floor)", ""]
    for n, entry in out["prompts"].items():
        lines += [f"## {n} tokens", "", "| row | TTFT ms (median) | range | runs | / max(resident, floor) | met |",
                  "|---|---|---|---|---|---|"]
        for name, s in entry["summary"].items():
            rng = f"{1e3 * s['min_s']:.0f}-{1e3 * s['max_s']:.0f}" if s.get("runs") else "-"
            ratio = f"{s['over_reference']:.2f}" if "over_reference" in s else "-"
            met = "-" if "target_met" not in s else ("yes" if s["target_met"] else "no")
            lines.append(f"| {name} | {1e3 * s['ttft_s']:.0f} | {rng} | {s.get('runs', 0)} | {ratio} | {met} |")
        lines.append("")
    write_text_atomic(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek", choices=("deepseek", "mixtral"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-tokens", default="1024,4096")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows):
        raise ConfigError(f"--rows: valid are {', '.join(ROWS)}")
    lengths = [int(t) for t in args.prompt_tokens.split(",")]
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = get_shape(args.model)
    L = args.layers or shape.default_layers or shape.full_moe_layers
    cfg = shape.make_config(args.quick, L)
    if max(lengths) > cfg.max_position_embeddings:
        raise ConfigError(f"--prompt-tokens up to {max(lengths)} exceed the shape's {cfg.max_position_embeddings} "
                          "positions")
    t0 = time.perf_counter()
    model, store = build_model(cfg, shape.family, dev, dtype, args.seed)
    E = store.num_experts
    slots = int(L * E * args.fraction)
    copy = measure_copy(store, dev)
    floor_s = L * E * copy["ms_per_expert"] / 1e3
    command = "python " + " ".join(shlex.quote(a) for a in ["eval/prefill_ttft.py"] + list(
        sys.argv[1:] if argv is None else argv))
    out: dict[str, Any] = {"machine": machine(), "command": command, "args": vars(args), "copy": copy,
                           "setup": {"title": shape.title, "moe_layers": L, "experts": E, "slots": slots,
                                     "fraction": args.fraction, "dtype": str(dtype), "copy_floor_s": floor_s,
                                     "build_s": time.perf_counter() - t0},
                           "prompts": {}}
    md = os.path.splitext(args.out)[0] + ".md"
    print(f"{shape.title}: {L} x {E} experts, {slots} slots; copy floor {1e3 * floor_s:.0f} ms", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    for n in lengths:
        ids = torch.randint(3, cfg.vocab_size, (1, n), generator=gen).to(dev)
        entry: dict[str, Any] = {"rows": []}
        out["prompts"][str(n)] = entry
        for rep in range(args.repeats):
            for name in rows:
                row = run_row(name, model, store, shape.family, ids, dev, slots)
                row["run"] = rep + 1
                entry["rows"].append(row)
                ms = "-" if "ttft_s" not in row else f"{1e3 * row['ttft_s']:.0f}"
                print(f"  {n} tokens run {rep + 1}: {name:16s} {ms} ms  {row['status'][:100]}", flush=True)
                entry["summary"] = summarise(entry["rows"], floor_s)
                write_json_atomic(args.out, out)
                write_markdown(md, out)
    store.close()
    print(f"wrote {args.out} and {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
