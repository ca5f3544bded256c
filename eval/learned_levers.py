"""Accuracy levers for ``learned`` on the prediction target's split, offline: richer routing features, a blend
with ``transition``, and how well the ridge scores serve as probabilities.

    python eval/learned_levers.py [--fit-seqs 200] [--choose-seqs 25] [--out eval/results/learned_levers]

The DeepSeek-V2-Lite suite trace is split as ``eval/prediction_target.py`` splits it (fit / choose / report by
sequence); everything here is fitted on the fit part and scored on the choose part (never the report part).
For each feature set, one ridge model per (depth, layer) as ``learned`` fits it (alpha 1, at most 20,000
samples), scored in bulk on every choose-part token whose target exists: recall@top_k and @2 x top_k at depths
1 and 2, split into same-token and next-token targets. Feature sets: ``learned``'s own (the window's layers and
the target layer as last observed) plus, optionally, the target layer's neighbours ``t - m .. t + m`` as last
observed and the target layer of the token before. The blend mixes the normalised ridge probabilities with
``transition``'s (weight on transition). The reliability table bins the normalised ridge probabilities of the
base set against how often the expert was selected. Writes OUT.json and OUT.md with machine, date, command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import prediction_target as pt  # noqa: E402
from moecache.atomic import write_text_atomic  # noqa: E402
from moecache.predictors import PREDICTORS  # noqa: E402
from moecache.predictors._common import ahead_in_sequence, multi_hot, token_order  # noqa: E402
from moecache.predictors.base import Predictor  # noqa: E402
from moecache.predictors.transition import _product  # noqa: E402

#: (name, window, target neighbours m, tokens back at the target layer)
FEATURE_SETS = [("window 2 (learned's default)", 2, 0, 0), ("window 12", 12, 0, 0),
                ("window 12 + target neighbours t-1, t+1", 12, 1, 0),
                ("window 12 + the token before at the target", 12, 0, 1),
                ("window 12 + both", 12, 1, 1)]
BLEND = (0.1, 0.2, 0.3)


def prepare(part, E: int) -> dict:
    order, next_same = token_order(part)
    ids = np.asarray(part.ids)[order]
    hot = multi_hot(ids, E).astype(np.float32)
    n = len(order)
    back = [hot]
    for b in (1, 2):
        ok = np.zeros(n, bool)
        ok[b:] = ahead_in_sequence(next_same, b)[:n - b]
        h = np.zeros_like(hot)
        h[b:] = hot[:-b]
        h[~ok] = 0
        back.append(h)
    return {"hot": hot, "back": back, "next_same": next_same, "present": (ids >= 0).any(axis=2)}


def blocks(l: int, t: int, L: int, window: int, around: int, before: int) -> list[tuple[int, int]]:
    """(layer, tokens back) of each feature block for a prediction after layer ``l`` targeting ``t``."""
    out = [((l - j) % L, 1 if l - j < 0 else 0) for j in range(min(window, L))]
    out += [(tl, 0 if tl <= l else 1) for tl in range(t - around, t + around + 1) if 0 <= tl < L]
    out += [(t, (0 if t <= l else 1) + b) for b in range(1, before + 1)]
    return out


def samples(D: dict, d: int, l: int, L: int, cap: int | None):
    t, o = (l + d) % L, (l + d) // L
    idx = np.nonzero(ahead_in_sequence(D["next_same"], o))[0]
    idx = idx[D["present"][idx + o, t]]
    if cap and len(idx) > cap:
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, cap).astype(np.int64))]
    return idx, t, o


def features(D: dict, idx, l, t, L, spec) -> np.ndarray:
    return np.concatenate([D["back"][b][idx, fl] for fl, b in blocks(l, t, L, *spec)], axis=1).astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    from sklearn.linear_model import Ridge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-seqs", type=int, default=200)
    ap.add_argument("--choose-seqs", type=int, default=25)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "learned_levers"))
    args = ap.parse_args(argv)
    if not os.path.isdir(pt.SUITE_DEEPSEEK):
        raise SystemExit(f"{pt.SUITE_DEEPSEEK} not found: build the suite traces (eval/suite_traces.py) first")
    t0 = time.time()
    trace = pt.load(pt.SUITE_DEEPSEEK)
    fit, choose, _ = pt.three_way(trace, args.fit_seqs, args.choose_seqs, None)
    L, E, K = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    F, C = prepare(fit, E), prepare(choose, E)
    norm = Predictor(L, E, K)
    trans = PREDICTORS.get("transition")(L, E, K, max_depth=2).fit(fit)
    rows, blend, reliability = [], [], {}
    for name, *spec in FEATURE_SETS:
        base = spec == [12, 0, 0]
        for d in (1, 2):
            hit = {"all": [0, 0, 0], 0: [0, 0], 1: [0, 0]}
            mix = {w: 0 for w in BLEND}
            probs, picked = [], []
            for l in range(L):
                idx, t, o = samples(F, d, l, L, 20000)
                r = Ridge(alpha=1.0).fit(features(F, idx, l, t, L, spec), F["hot"][idx + o, t].astype(np.float64))
                cidx, _, _ = samples(C, d, l, L, None)
                Y = C["hot"][cidx + o, t]
                P = norm.normalise(np.maximum(features(C, cidx, l, t, L, spec) @ r.coef_.T + r.intercept_, 0.0))
                top = np.argsort(-P, axis=1, kind="stable")
                h6 = float(np.take_along_axis(Y, top[:, :K], 1).sum())
                hit["all"][0] += float(Y.sum())
                hit["all"][1] += h6
                hit["all"][2] += float(np.take_along_axis(Y, top[:, :2 * K], 1).sum())
                hit[o][0] += float(Y.sum())
                hit[o][1] += h6
                if base:
                    Q = norm.normalise(_product(C["hot"][cidx, l].astype(np.float64), trans.cond[d - 1, l],
                                                trans.prior[t]))
                    for w in BLEND:
                        tb = np.argsort(-((1 - w) * P + w * Q), axis=1, kind="stable")[:, :K]
                        mix[w] += float(np.take_along_axis(Y, tb, 1).sum())
                    probs.append(P.ravel())
                    picked.append(Y.ravel())
            tot = hit["all"][0]
            rows.append({"features": name, "depth": d, "recall@top_k": hit["all"][1] / tot,
                         "recall@2top_k": hit["all"][2] / tot,
                         "same_token": hit[0][1] / max(hit[0][0], 1), "next_token": hit[1][1] / max(hit[1][0], 1)})
            if base:
                blend += [{"depth": d, "weight": w, "recall@top_k": mix[w] / tot} for w in BLEND]
                p, y = np.concatenate(probs), np.concatenate(picked)
                edges = [0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0 + 1e-9]
                reliability[d] = [{"bin": [a, b], "n": int(m.sum()), "mean_p": float(p[m].mean()),
                                   "selected": float(y[m].mean())}
                                  for a, b in zip(edges[:-1], edges[1:]) for m in [(p >= a) & (p < b)] if m.any()]
            print(f"{name} d{d}: {rows[-1]['recall@top_k']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.platform()}, Python {platform.python_version()}, "
                       f"{os.cpu_count()} CPUs",
            "command": " ".join(["python eval/learned_levers.py"] + (argv if argv is not None else sys.argv[1:])),
            "seconds": round(time.time() - t0, 1),
            "split": {"fit": len(fit.sequences()), "choose": len(choose.sequences()), "choose_tokens": len(choose)}}
    write_text_atomic(args.out + ".json", json.dumps({"meta": meta, "recall": rows, "blend": blend,
                                                      "reliability": reliability}, indent=1) + "\n")
    lines = ["# learned: accuracy levers on the choose part (offline ridge replay)", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{meta['command']}` "
             f"({meta['seconds']:.0f} s)", f"- DeepSeek-V2-Lite suite trace; fitted on {meta['split']['fit']} "
             f"sequences, scored on the next {meta['split']['choose']} ({len(choose):,} tokens)", "",
             "| features | depth | recall@top_k | recall@2top_k | same token | next token |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['features']} | {r['depth']} | {r['recall@top_k']:.4f} | {r['recall@2top_k']:.4f} | "
              f"{r['same_token']:.4f} | {r['next_token']:.4f} |" for r in rows]
    lines += ["", "Blend with `transition` (window 12; weight on transition's probabilities):", "",
              "| depth | weight | recall@top_k |", "| ---: | ---: | ---: |"]
    lines += [f"| {b['depth']} | {b['weight']} | {b['recall@top_k']:.4f} |" for b in blend]
    for d, table in reliability.items():
        lines += ["", f"Reliability of the window-12 ridge probabilities (normalised), depth {d}:", "",
                  "| probability bin | samples | mean probability | selected |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['bin'][0]:.2f}-{min(r['bin'][1], 1.0):.2f} | {r['n']:,} | {r['mean_p']:.3f} | "
                  f"{r['selected']:.3f} |" for r in table]
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
