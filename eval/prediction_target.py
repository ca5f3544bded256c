"""The prediction target of issue 17: does the best online configuration close half of the LRU-to-bound gap?

    python eval/prediction_target.py [--trace PATH] [--fit-seqs 200] [--choose-seqs 40] [--report-seqs 100]
                                     [--copy-queue worker|fifo] [--out eval/results/prediction_target]

Splits the shared DeepSeek-V2-Lite routing (../shared/data/routing/deepseek-v2-lite-chat__moe-beyond) three
ways by sequence, in recorded order: predictors (and LFU-style policies' counts) are fitted on the first
part, every candidate configuration is replayed on the second and the fastest is chosen there, and the
chosen one is reported on the third, against LRU and the lower bound. Every replay: 25% of expert memory
per layer (layer scope), token by token (decode stream, batch 1), miss rule ``copy``, prefetch rule
``topk`` with the admission rule (``moecache.admission``, its default ``gated``) and a budget of top_k or
2 x top_k experts per target layer (``BUDGETS``, each a candidate), the default hardware profile
(``moecache.cost.default_profile``: the calibrated one where it is) and the simulator's copy model
``--copy-queue`` (default ``worker``, the runtime's copy worker, as the simulator's default; ``fifo``: every
copy in issue order), stated in the report. Gap closed = (LRU - chosen) /
(LRU - bound) in estimated ms/token; the target is >= 50%.

``--trace PATH`` adds a blind check: the configuration chosen on DeepSeek, on routing the project does
not have (a trace directory or any file ``moecache trace import`` reads): fitted on the leading third
(at least two sequences) of its sequences (of its tokens, for one stream), reported on the rest. Also printed: the best
configuration without prefetch (if it is as fast as the best with prefetch, no prefetch pays at this
shape and batch: a finding), the chosen predictor's recall split into targets in the same token
and in the next token, and the recall at depths 1 and 2 of the trace-fitted predictors among the
candidates (``RECALL_OF``) on the report part. The fidelity summary (eval/results/sim_fidelity.md, where
present) is copied beside the result. Writes OUT.json and OUT.md with machine, date and command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from moecache.atomic import write_text_atomic  # noqa: E402
from moecache.cost.hardware import default_profile  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.policies import new_policy  # noqa: E402
from moecache.predict_eval import measure_recall  # noqa: E402
from moecache.predictors import PREDICTORS  # noqa: E402
from moecache.registry import split_spec_values  # noqa: E402
from moecache.sim import Schedule, simulate  # noqa: E402
from moecache.sim.copy_queue import COPY_QUEUES  # noqa: E402
from moecache.trace import count_ids, open_trace  # noqa: E402

DEEPSEEK = os.path.join(ROOT, "..", "shared", "data", "routing", "deepseek-v2-lite-chat__moe-beyond",
                        "training_data_eamc")
SUITE_DEEPSEEK = os.path.join(ROOT, "build", "suite_traces", "deepseek-v2-lite")
CAPACITY = 0.25
#: The simulator's copy model for every replay (``--copy-queue``): ``worker`` (the default, as in the runtime:
#: the runtime's copy worker, priorities, cancellation at the target layer; moecache/sim/copy_queue.py) or
#: ``fifo`` (every copy in issue order).
COPY_QUEUE = "worker"
TARGET = 0.5
#: ``learned``'s feature window in its wide variant: the routing of the last WIDE_WINDOW MoE layers (this token's
#: and, wrapping, the previous token's), where the default reads the last 2.
WIDE_WINDOW = 12
#: The wide variant with its scores mapped to selection frequencies (isotonic, per depth, fitted on held-out
#: sequences of the fit part): the admission rule reads a prediction as a need probability.
CALIBRATED = f"learned:window={WIDE_WINDOW}:calibrate=isotonic"
#: (policy, predictor or None, depth): the online candidates; a predictor is ``NAME`` or ``NAME:key=value:...``
#: (its constructor's options, ``predictor_spec``) (the oracle and offline policies are not online).
CANDIDATES = [(pol, None, 0) for pol in ("lru", "lfu", "lrfu", "activation")] + \
    [(pol, pred, d) for pol in ("lru", "lfu", "lrfu", "activation")
     for pred, d in (("temporal", 1), ("transition", 1), ("transition", 2), ("learned", 1), ("learned", 2),
                     ("prior", 1), (f"learned:window={WIDE_WINDOW}", 1), (f"learned:window={WIDE_WINDOW}", 2),
                     (CALIBRATED, 1), (CALIBRATED, 2))] + \
    [("predicted", pred, d) for pred in ("temporal", "prior") for d in (0, 1)]
#: The predictors whose recall the report lists (those among the candidates).
RECALL_OF = ("transition", "learned", f"learned:window={WIDE_WINDOW}", CALIBRATED)
#: Prefetch budgets tried with every prefetching candidate: experts wanted per target layer, as a multiple of
#: top_k (1: the simulator's default, top_k x rows; 2: twice that, the admission rule weighing each copy).
BUDGETS = (1, 2)


def load(path: str):
    """A trace directory, or any routing file/folder ``moecache trace import`` reads."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return open_trace(path)
    from moecache.trace.importers import read_sources

    _src, imported, _d = read_sources([path])
    if not imported:
        raise SystemExit(f"{path}: no routing found; give a trace directory or a file moecache trace import reads")
    t = imported[0]
    from moecache.trace import Trace

    return Trace(t.meta, t.block)


def three_way(trace, fit_n: int | None, choose_n: int | None, report_n: int | None):
    """(fit, choose, report) parts by sequence, in order; thirds where a count is not given."""
    seqs = trace.sequences()
    third = len(seqs) // 3
    if third < 1:
        raise SystemExit(f"the trace has {len(seqs)} sequence(s): a three-way split needs at least 3")
    a = seqs[:min(third, fit_n or third)]
    b = seqs[third:third + min(third, choose_n or third)]
    c = seqs[2 * third:2 * third + min(len(seqs) - 2 * third, report_n or len(seqs))]
    return trace.select_sequences(a), trace.select_sequences(b), trace.select_sequences(c)


def predictor_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"learned:window=12"`` -> ``("learned", {"window": 12})``: a predictor name and its constructor options
    (``moecache.registry.split_spec_values``); a one-line ``ConfigError`` for a malformed part."""
    return split_spec_values(spec, "predictor option")


class Fitted:
    """Predictors fitted once on the fit part, handed out as fresh copies."""

    def __init__(self, fit, meta):
        self.fit, self.meta, self.cache = fit, meta, {}
        self.counts = count_ids(fit)

    def get(self, name: str | None, policy: str):
        if name is None:
            return None
        m = self.meta
        base, kw = predictor_spec(name)
        if policy == "predicted" and base in ("learned", "transition"):
            kw["max_depth"] = m.num_layers
        key = (base, tuple(sorted(kw.items())))
        if key not in self.cache:
            p = PREDICTORS.get(base)(m.num_layers, m.num_experts, m.top_k, **kw)
            if p.needs_fit or base == "temporal":
                p.fit(self.fit)
            self.cache[key] = p
        return copy.deepcopy(self.cache[key])


def replay(part, fitted: Fitted, policy: str, pred: str | None, depth: int, hw, schedule=None,
           budget: int = 1) -> dict:
    m = part.meta
    s = schedule or Schedule(part, decode_stream=True, name="part")
    slots = max(m.top_k, int(round(CAPACITY * m.num_experts)))
    pol = new_policy(policy, slots, m.num_layers, m.num_experts, top_k=m.top_k, scope="layer")
    if pol.needs_fit:
        pol.fit(fitted.counts)
    predictor = fitted.get(pred, policy)
    r = simulate(s, pol, predictor, depth=depth, hardware=hw, bound=True, copy_queue=COPY_QUEUE,
                 budget=budget * m.top_k if depth and budget != 1 else None)
    row = r.row()
    return {"policy": policy, "predictor": pred or "none", "depth": depth, "budget": budget,
            "ms_per_token": row["est_ms_per_token"],
            "bound_ms_per_token": row["bound_ms_per_token"], "demand_hit_rate": row["demand_hit_rate"],
            "prefetches": row["prefetches"], "prefetch_refused": row.get("prefetch_refused", 0),
            "breakdown": breakdown(row, hw, m.num_layers, pred)}


def breakdown(row: dict, hw, num_layers: int, pred: str | None) -> dict:
    """Where a replay's time goes, per token (ms), by the profile's terms: the fixed host time per layer, the
    predictor's calls, the prefetches' and demand copies' host time, the stall on copies; and the prefetches
    used, wasted (evicted unused) and late (used before their copy ended)."""
    tok = row["tokens"]
    calls = row.get("predictor_calls", tok * num_layers if pred else 0)
    return {"layer_host": num_layers * hw.layer_host_ms, "predictor_host": calls * hw.predictor_host(predictor_spec(pred)[0] if pred else None) / tok,
            "predictor_calls_per_token": calls / tok,
            "prefetch_host": row["prefetches"] * hw.prefetch_host_ms / tok,
            "copy_host": row["loads"] * hw.copy_host_ms / tok, "stall": row["stall_ms_per_token"],
            "loads_per_token": row["loads"] / tok, "prefetches_per_token": row["prefetches"] / tok,
            "prefetch_used": row["prefetch_used"], "prefetch_wasted": row["prefetch_wasted"],
            "late_hits": row["hits"] - row["ready"]}


def label(c: dict) -> str:
    return c["policy"] + ("" if c["predictor"] == "none" else f" + {c['predictor']} D={c['depth']}") + \
        (f" B={c['budget']}k" if c.get("budget", 1) != 1 else "")


def report(part, fitted: Fitted, chosen: dict, hw) -> dict:
    """The chosen configuration, its partner without prefetch, LRU and the bound on ``part``."""
    s = Schedule(part, decode_stream=True, name="report")
    got = replay(part, fitted, chosen["policy"], None if chosen["predictor"] == "none" else chosen["predictor"],
                 chosen["depth"], hw, s, chosen.get("budget", 1))
    lru = replay(part, fitted, "lru", None, 0, hw, s)
    bound = lru["bound_ms_per_token"]
    gap = lru["ms_per_token"] - bound
    closed = (lru["ms_per_token"] - got["ms_per_token"]) / gap if gap > 0 else math.nan
    out = {"tokens": len(part), "sequences": len(part.sequences()), "chosen": got, "lru": lru,
           "bound_ms_per_token": bound, "gap_closed": closed}
    if chosen["depth"] and chosen["policy"] != "predicted":
        # what a perfect predictor would give the same policy, depth and admission (not an online configuration)
        ora = replay(part, fitted, chosen["policy"], "oracle", chosen["depth"], hw, s, chosen.get("budget", 1))
        out["oracle"] = ora
        out["oracle_gap_closed"] = (lru["ms_per_token"] - ora["ms_per_token"]) / gap if gap > 0 else math.nan
    if chosen["depth"] and chosen["policy"] != "predicted":
        out["chosen_without_prefetch"] = replay(part, fitted, chosen["policy"], None, 0, hw, s)
    return out


def predictor_recalls(part, fitted: Fitted, specs: list[str], depths=(1, 2)) -> list[dict]:
    """recall@top_k of each predictor spec (fitted on the fit part) on ``part`` at each depth, all targets and split
    into targets in the same token and in the next token."""
    out = []
    for spec in specs:
        for row in measure_recall(fitted.get(spec, "lru"), part, depths=list(depths)):
            out.append({"predictor": spec, "depth": row.depth, "recall@top_k": row.recall(),
                        "recall@2top_k": row.recall(min(2 * row.top_k, part.meta.num_experts)),
                        "same_token": row.recall_at_offset(0), "next_token": row.recall_at_offset(1)})
    return out


def fidelity_summary() -> list[str]:
    path = os.path.join(HERE, "results", "sim_fidelity.md")
    if not os.path.isfile(path):
        return ["eval/results/sim_fidelity.md is not there yet: the timing model is not calibrated in this tree, "
                "so these figures are the uncalibrated model's."]
    with open(path) as f:
        text = f.read().splitlines()
    keep = [ln for ln in text if ln.startswith(("- ", "**", "#"))][:14]
    return [f"From eval/results/sim_fidelity.md ({len(text)} lines):", ""] + keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deepseek", default=None, help="the DeepSeek-V2-Lite trace (default: the suite's build, "
                    "else the shared routing)")
    ap.add_argument("--trace", help="blind check: routing the project does not have")
    ap.add_argument("--fit-seqs", type=int, default=200)
    ap.add_argument("--choose-seqs", type=int, default=40)
    ap.add_argument("--report-seqs", type=int, default=100)
    ap.add_argument("--policies", nargs="*", help="candidate policies (default: every one in CANDIDATES)")
    ap.add_argument("--copy-queue", choices=COPY_QUEUES, default="worker",
                    help="the simulator's copy model: worker (default: the runtime's copy worker, prefetches "
                    "queued by priority and cancelled at their target layer) or fifo (every copy in issue order)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prediction_target"))
    args = ap.parse_args(argv)
    global COPY_QUEUE
    COPY_QUEUE = args.copy_queue
    src = args.deepseek or (SUITE_DEEPSEEK if os.path.isdir(SUITE_DEEPSEEK) else DEEPSEEK)
    if not os.path.exists(src):
        raise SystemExit(f"{src} not found: the shared DeepSeek-V2-Lite routing is needed (or pass --deepseek PATH)")
    t0 = time.time()
    trace = load(src)
    fit, choose, rep = three_way(trace, args.fit_seqs, args.choose_seqs, args.report_seqs)
    hw = default_profile(trace.meta.bytes_per_expert)
    fitted = Fitted(fit, trace.meta)
    s = Schedule(choose, decode_stream=True, name="choose")
    tried = []
    for pol, pred, d in CANDIDATES:
        if args.policies and pol not in args.policies:
            continue
        for b in (BUDGETS if d and pol != "predicted" else (1,)):
            try:
                tried.append(replay(choose, fitted, pol, pred, d, hw, s, b))
            except ConfigError as e:
                print(f"  skipped {pol} + {pred} D={d}: {e}", file=sys.stderr)
                break
            print(f"  choose: {label(tried[-1]):40s} {tried[-1]['ms_per_token']:.2f} ms/token", file=sys.stderr,
                  flush=True)
    chosen = min(tried, key=lambda c: c["ms_per_token"])
    best_plain = min((c for c in tried if c["depth"] == 0 and c["predictor"] == "none"),
                     key=lambda c: c["ms_per_token"])
    res = {"deepseek": report(rep, fitted, chosen, hw)}
    recall = None
    if chosen["predictor"] != "none" and chosen["depth"]:
        p = fitted.get(chosen["predictor"], chosen["policy"])
        rows = measure_recall(p, rep, depths=[chosen["depth"]])
        recall = {"depth": chosen["depth"], "recall@top_k": rows[0].recall(),
                  "same_token": rows[0].recall_at_offset(0), "next_token": rows[0].recall_at_offset(1)}
    specs = list(dict.fromkeys(pred for pol, pred, d in CANDIDATES if pred in RECALL_OF and
                                (not args.policies or pol in args.policies)))
    recalls = predictor_recalls(rep, fitted, specs)
    if args.trace:
        blind = load(args.trace)
        seqs = blind.sequences()
        if len(seqs) >= 3:
            # a third to fit, but at least two sequences (a calibrated predictor holds one out for its map)
            cut = max(len(seqs) // 3, 2)
            bfit, brep = blind.select_sequences(seqs[:cut]), blind.select_sequences(seqs[cut:])
        else:
            import numpy as np

            idx = np.arange(len(blind))
            bfit, brep = blind.select(idx < len(blind) // 3), blind.select(idx >= len(blind) // 3)
        res["blind"] = report(brep, Fitted(bfit, blind.meta), chosen, default_profile(blind.meta.bytes_per_expert))
        res["blind"]["path"] = args.trace
    seconds = time.time() - t0

    d = res["deepseek"]
    prefetch_pays = chosen["depth"] > 0 and chosen["ms_per_token"] < best_plain["ms_per_token"]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
                       f"{os.cpu_count()} CPUs",
            "command": "python eval/prediction_target.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(seconds, 1), "hardware": hw.describe(), "source": src,
            "split": {"fit": len(fit.sequences()), "choose": len(choose.sequences()), "report": len(rep.sequences())}}
    out = {"meta": meta, "candidates": tried, "chosen": chosen, "best_without_prefetch": best_plain,
           "prefetch_pays": prefetch_pays, "recall": recall, "predictor_recall": recalls, **res}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    write_text_atomic(args.out + ".json", json.dumps(out, indent=1) + "\n")
    ok = d["gap_closed"] >= TARGET
    lines = ["# Prediction target: DeepSeek-V2-Lite, 25% of expert memory, layer scope, token by token", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}` ({seconds:.0f} s)", f"- hardware profile: {hw.describe()}",
             f"- split by sequence: fit {meta['split']['fit']}, choose {meta['split']['choose']}, report "
             f"{meta['split']['report']} ({d['tokens']:,} tokens); {len(tried)} online candidates",
             f"- estimated ms/token from the simulator's timing model (not a GPU run), copy model {COPY_QUEUE}", "",
             f"**Chosen (on the choose part): {label(chosen)}. On the report part: {d['chosen']['ms_per_token']:.2f} "
             f"ms/token; LRU {d['lru']['ms_per_token']:.2f}; bound {d['bound_ms_per_token']:.2f}; gap closed "
             f"{d['gap_closed']:.1%} (target >= {TARGET:.0%}: {'met' if ok else 'NOT met'}).**", ""]
    if "chosen_without_prefetch" in d:
        lines.append(f"- the same policy without prefetch: {d['chosen_without_prefetch']['ms_per_token']:.2f} ms/token")
    lines.append(f"- best configuration without prefetch on the choose part: {label(best_plain)} "
                 f"({best_plain['ms_per_token']:.2f} ms/token against the chosen {chosen['ms_per_token']:.2f})" +
                 ("" if prefetch_pays else ": no prefetch pays at this shape and batch (batch 1) under this profile"))
    if recall:
        lines.append(f"- recall@top_k of {chosen['predictor']} at depth {recall['depth']} on the report part: "
                     f"{recall['recall@top_k']:.3f} (targets in the same token {recall['same_token']:.3f}, in the "
                     f"next token {recall['next_token']:.3f})")
    if "oracle" in d:
        lines.append(f"- the same policy, depth and budget with the oracle predictor (the future routing, not online): "
                     f"{d['oracle']['ms_per_token']:.2f} ms/token, gap closed {d['oracle_gap_closed']:.1%}")
    if "blind" in res:
        b = res["blind"]
        lines += ["", f"## Blind check: {b['path']}", "",
                  f"{label(chosen)} (chosen on DeepSeek), fitted on the leading third (at least two sequences), "
                  f"reported on the rest "
                  f"({b['tokens']:,} tokens): {b['chosen']['ms_per_token']:.2f} ms/token; LRU "
                  f"{b['lru']['ms_per_token']:.2f}; bound {b['bound_ms_per_token']:.2f}; gap closed "
                  f"{b['gap_closed']:.1%}."]
    rows_bd = [("LRU", d["lru"]), (label(d["chosen"]), d["chosen"])] + \
        ([("same policy, no prefetch", d["chosen_without_prefetch"])] if "chosen_without_prefetch" in d else []) + \
        ([(f"{d['oracle']['policy']} + oracle D={d['oracle']['depth']}", d["oracle"])] if "oracle" in d else [])
    lines += ["", "## Where the time goes (report part, ms per token)", "",
              f"Bound {d['bound_ms_per_token']:.2f} = max(GPU work + fixed host time per layer, Belady's copies); "
              "the rest of each row's time is host time and copy stall the bound leaves out.", "",
              "| configuration | ms/token | layer host | predictor host (calls/token) | prefetch host | copy host | "
              "stall | loads/token | prefetches/token | used / wasted | late hits |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows_bd:
        b = r["breakdown"]
        lines.append(f"| {name} | {r['ms_per_token']:.2f} | {b['layer_host']:.2f} | {b['predictor_host']:.2f} "
                     f"({b['predictor_calls_per_token']:.1f}) | {b['prefetch_host']:.2f} | {b['copy_host']:.2f} | "
                     f"{b['stall']:.2f} | {b['loads_per_token']:.2f} | {b['prefetches_per_token']:.2f} | "
                     f"{b['prefetch_used']:,} / {b['prefetch_wasted']:,} | {b['late_hits']:,} |")
    lines += ["", "## Predictors' recall on the report part", "",
              "Fitted on the fit part; recall@top_k (and @2 x top_k) of the target layer's experts, all targets and "
              "split into targets in the same token and in the next token (depth wrapping past the last layer).", "",
              "| predictor | depth | recall@top_k | recall@2top_k | same token | next token |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['predictor']} | {r['depth']} | {r['recall@top_k']:.3f} | {r['recall@2top_k']:.3f} | "
              f"{r['same_token']:.3f} | {r['next_token']:.3f} |" for r in recalls]
    lines += ["", "## Candidates on the choose part", "", "| configuration | ms/token | demand hit | prefetches / refused |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {label(c)} | {c['ms_per_token']:.2f} | {c['demand_hit_rate']:.3f} | "
              f"{c['prefetches']:,} / {c['prefetch_refused']:,} |" for c in sorted(tried, key=lambda c: c["ms_per_token"])]
    lines += ["", "## Fidelity of the timing model", ""] + fidelity_summary()
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines[:16]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
