"""Demand hit rate of every cache policy on every real routing trace, and the share of the
LRU-to-Belady gap each one closes.

For each trace in ``../shared/data/routing`` (imported with ``moecache.trace.importers``), each
scope (layer, global) and capacity (25%, 50% of the experts), every policy replays the scored
sequences from the same empty cache. Gap closed = ``(hit - hit_lru) / (hit_belady - hit_lru)``
(n/a when Belady and LRU tie, e.g. when the capacity equals top_k and every policy is forced).

Fitting (static placement, learned predictors): on the leading 20% of a trace's sequences, which
are then not scored by any policy; Mixtral's GSM8K and HumanEval logs have two requests each, so
each is fitted on the other; the Qwen logs hold one unsegmented stream, so they are fitted on its
leading 20% of tokens. Replay: as recorded (batched steps where the trace has them), DeepSeek's
prefill prompts also as a decode stream (the first ``--decode-prompts`` scored prompts).
Every policy runs under the miss rule "policy" (only belady_bypass ever declines a miss, and runs
it on the CPU). ``predicted`` rows use the predictor named in brackets, asked for each layer's next
use (depth = MoE layers); ``predicted[oracle]`` reads the future and is an upper bound, not online.

Usage: ``.venv/bin/python eval/policy_table.py [--out eval/results] [--decode-prompts 60]``.
Writes ``policy_table.md`` and ``policy_table.csv`` (machine, date and command in both).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from moecache.atomic import write_text_atomic
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.predictors import PREDICTORS
from moecache.sim import Schedule, resolve_capacity, simulate
from moecache.trace import count_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTING = os.path.join(os.path.dirname(ROOT), "shared", "data", "routing")

#: (column label, policy name, predictor name or None). Order = table column order.
POLICY_COLUMNS = (
    ("lru", "lru", None), ("fifo", "fifo", None), ("lfu", "lfu", None), ("lrfu", "lrfu", None),
    ("static", "static", None), ("activation", "activation", None),
    ("predicted[temporal]", "predicted", "temporal"), ("predicted[activation_matrix]", "predicted", "activation_matrix"),
    ("predicted[oracle]", "predicted", "oracle"), ("belady", "belady", None), ("belady_bypass", "belady_bypass", None),
)
OFFLINE = {"predicted[oracle]", "belady", "belady_bypass"}
CAPACITIES = ("25%", "50%")
SCOPES = ("layer", "global")


@dataclass
class Case:
    name: str
    schedule: Schedule
    fit: object          # a Trace to fit static placement and predictors on
    fit_note: str


def _import(path: str):
    try:
        from moecache.trace.importers import read_sources
    except ImportError as e:  # the importer is part of moecache; without it there is nothing to read
        raise ConfigError(f"moecache.trace.importers is needed to read {path}: {e}") from None
    _src, traces, _defects = read_sources([path])
    return [(t.name, t.trace()) for t in traces]


def _leading(trace, share: float = 0.2):
    seqs = trace.sequences()
    n = int(len(seqs) * share)
    return trace.select_sequences(seqs[:n]), trace.select_sequences(seqs[n:]), n, len(seqs)


def build_cases(decode_prompts: int) -> list[Case]:
    cases: list[Case] = []
    mix = os.path.join(ROUTING, "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")
    gsm = _import(os.path.join(mix, "gsm8k_2_routing.jsonl"))[0][1]
    he = _import(os.path.join(mix, "humaneval_2_routing.jsonl"))[0][1]
    cases.append(Case("mixtral-gsm8k", Schedule(gsm, name="mixtral-gsm8k"), he, "fitted on mixtral-humaneval"))
    cases.append(Case("mixtral-humaneval", Schedule(he, name="mixtral-humaneval"), gsm, "fitted on mixtral-gsm8k"))

    llama = _import(os.path.join(ROUTING, "llama-4-maverick-17b-128e-instruct__patterns-behind-chaos-subset"))[0][1]
    fit, score, n, total = _leading(llama)
    cases.append(Case("llama4-mmlu", Schedule(score, name="llama4-mmlu"), fit,
                      f"fitted on the leading {n} of {total} requests"))

    ds = _import(os.path.join(ROUTING, "deepseek-v2-lite-chat__moe-beyond", "training_data_eamc"))[0][1]
    fit, score, n, total = _leading(ds)
    note = f"fitted on the leading {n} of {total} prompts"
    cases.append(Case("deepseek-prefill", Schedule(score, name="deepseek-prefill"), fit, note))
    first = score.select_sequences(score.sequences()[:decode_prompts])
    cases.append(Case(f"deepseek-decode{decode_prompts}", Schedule(first, decode_stream=True,
                                                                   name=f"deepseek-decode{decode_prompts}"),
                      fit, note + f"; scored: the next {decode_prompts} prompts token by token"))

    for name, tr in _import(os.path.join(ROUTING, "qwen1.5-moe-a2.7b-chat__vllm-moe-logger")):
        cut = int(len(tr) * 0.2)
        idx = np.arange(len(tr))
        cases.append(Case(f"qwen-{name}", Schedule(tr.select(idx >= cut), name=f"qwen-{name}"), tr.select(idx < cut),
                          f"fitted on the leading {cut} of {len(tr)} tokens (one unsegmented stream)"))
    return cases


def run_case(case: Case, bar) -> list[dict]:
    s = case.schedule
    L, E, K = s.num_layers, s.num_experts, s.top_k
    counts = count_ids(case.fit)
    fitted = {}
    rows = []
    for scope in SCOPES:
        for cap_label in CAPACITIES:
            cap = resolve_capacity(cap_label, L, E, K, scope)
            row = {"trace": case.name, "mode": s.mode, "tokens": s.tokens, "accesses": s.accesses, "scope": scope,
                   "capacity": cap_label, "slots": cap, "fit": case.fit_note}
            for label, pname, predname in POLICY_COLUMNS:
                policy = new_policy(pname, cap, L, E, top_k=K, scope=scope)
                if policy.needs_fit:
                    policy.fit(counts)
                pred = None
                if predname is not None:
                    pred = PREDICTORS.get(predname)(L, E, K)
                    if pred.needs_fit:
                        if predname not in fitted:
                            fitted[predname] = pred.fit(case.fit)
                        pred = fitted[predname]
                t0 = time.perf_counter()
                r = simulate(s, policy, pred, miss_rule="policy", bound=False)
                row[label] = r.demand_hit_rate
                row["needs " + label] = 1.0 - (r.loads + r.cpu_runs) / r.needs
                row[label + " s"] = time.perf_counter() - t0
                bar.update(1)
            # Belady minimises loads, i.e. misses counted per need (one expert of one step); in a
            # decode replay that is the token-weighted rate, in a batched one it is not, so the gap
            # is measured on needs
            gap = row["needs belady"] - row["needs lru"]
            for label, _p, _q in POLICY_COLUMNS:
                row["gap " + label] = (row["needs " + label] - row["needs lru"]) / gap if gap > 1e-12 else None
            rows.append(row)
    return rows


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.4f}"


def render(rows: list[dict], header: list[str]) -> str:
    labels = [c[0] for c in POLICY_COLUMNS]
    online = [l for l in labels if l not in OFFLINE]
    out = io.StringIO()
    w = out.write
    w("# Expert-cache policies on real routing traces: demand hit rate\n\n")
    for h in header:
        w(h + "\n")
    w("\n## Demand hit rate\n\n")
    w("| trace | mode | tokens | scope | capacity (slots) | " + " | ".join(labels) + " |\n")
    w("|" + "---|" * (5 + len(labels)) + "\n")
    for r in rows:
        w(f"| {r['trace']} | {r['mode']} | {r['tokens']:,} | {r['scope']} | {r['capacity']} ({r['slots']}) | "
          + " | ".join(_fmt(r[l]) for l in labels) + " |\n")
    w("\n## Share of the LRU-to-Belady gap closed\n\n")
    w("Measured on need hit rates (one need = one expert of one replay step, whatever its token count), "
      "where Belady is the optimum of every demand-only policy; in decode replays they equal the rates "
      "above, in batched ones (deepseek-prefill, qwen) they differ. The Belady - LRU column is that "
      "difference.\n\n")
    w("| trace | scope | capacity | Belady - LRU | " + " | ".join(l for l in labels if l not in ("lru", "belady"))
      + " | best online |\n")
    w("|" + "---|" * (5 + len(labels) - 2) + "\n")
    for r in rows:
        cands = [(r["gap " + l], l) for l in online if r["gap " + l] is not None]
        best = max(cands) if cands else (None, "-")
        w(f"| {r['trace']} | {r['scope']} | {r['capacity']} | {r['needs belady'] - r['needs lru']:+.4f} | "
          + " | ".join(_fmt(r["gap " + l], pct=True) for l in labels if l not in ("lru", "belady"))
          + f" | {best[1]} {_fmt(best[0], pct=True)} |\n")
    w("\n## Mean share of the gap closed (rows where Belady beats LRU)\n\n")
    w("| policy | mean | median | rows >= 50% | rows |\n|---|---|---|---|---|\n")
    for l in labels:
        if l in ("lru", "belady"):
            continue
        g = [r["gap " + l] for r in rows if r["gap " + l] is not None]
        if g:
            w(f"| {l}{' (offline)' if l in OFFLINE else ''} | {np.mean(g):.1%} | {np.median(g):.1%} | "
              f"{sum(x >= 0.5 for x in g)} | {len(g)} |\n")
    w("\n## Fitting\n\n")
    for name, note in dict((r["trace"], r["fit"]) for r in rows).items():
        w(f"- {name}: {note}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results"))
    ap.add_argument("--decode-prompts", type=int, default=60)
    ap.add_argument("--only", help="comma-separated trace names to run (default: all)")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    t_start = time.time()
    cases = build_cases(args.decode_prompts)
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.name in keep]
    bar = tqdm(total=len(cases) * len(SCOPES) * len(CAPACITIES) * len(POLICY_COLUMNS), unit="run",
               disable=not sys.stderr.isatty())
    rows = []
    for c in cases:
        bar.set_description(c.name)
        rows.extend(run_case(c, bar))
    bar.close()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    header = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs",
        f"- command: `{' '.join(['.venv/bin/python', 'eval/policy_table.py'] + (argv if argv is not None else sys.argv[1:]))}`"
        f" (git {commit} + working tree), {time.time() - t_start:.0f} s",
        "- what: demand hit rate = hit accesses / accesses (one access = one selected expert of one token at "
        "one layer); every policy starts from an empty cache and replays the scored sequences in order, the "
        "cache carried across requests; miss rule 'policy'.",
    ]
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "policy_table.md"), render(rows, header))
    buf = io.StringIO()
    fields = [k for k in rows[0] if not k.endswith(" s")]
    wr = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    buf.write("".join(f"# {h[2:]}\n" for h in header))
    wr.writeheader()
    for r in rows:
        wr.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    write_text_atomic(os.path.join(args.out, "policy_table.csv"), buf.getvalue())
    slow = sorted(((r[l + " s"], r["trace"], r["scope"], r["capacity"], l) for r in rows
                   for l, _p, _q in POLICY_COLUMNS), reverse=True)[:3]
    print(f"wrote {args.out}/policy_table.md and .csv in {time.time() - t_start:.0f} s; slowest runs: "
          + "; ".join(f"{l} on {t} {s} {c}: {x:.1f} s" for x, t, s, c, l in slow))
    return 0


if __name__ == "__main__":
    sys.exit(main())
