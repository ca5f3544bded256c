"""How much of the next token's routing the token itself decides (qwen3moe-tiny-code): the ceiling of
predicting the next token's first layers from its id, or from the model's own next-token distribution.

    python eval/next_token_routing.py [--model DIR] [--work build/hidden_traces] [--out-dir eval/results]

Reads the two traces ``eval/hidden_predictor.py`` records (run it first): the fit trace gives, per
token id and layer, the experts that token is routed to (counts, normalised to ``top_k``); on the
held-out trace (chunks 48-95 of ``heldout_sample.txt``), the next token's experts at layers 0 and 1
are predicted as

* ``true token``: the table's row of the token that actually comes next (known in decode once it is
  sampled, before the next forward pass starts);
* ``model distribution``: the table's rows weighted by the model's softmax over the next token at
  this position (known once this token's forward pass ends, before sampling);

scored as recall@top_k (the predicted set's share of the truly selected experts), against the
``hidden_state`` predictor's depth-1 next-token recall in ``hidden_predictor.json`` (layer 0 of the
next token, predicted from the last MoE layer's input, earlier still). Writes ``next_token_routing.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "data" / "models" / "qwen3moe-tiny-code"


def recall_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of ``truth``'s 1s inside each row's ``k`` highest ``scores`` (ties to the lowest id)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(truth, top, 1).sum() / truth.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "hidden_traces")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "eval" / "results")
    args = ap.parse_args(argv)
    fit_path, score_path = args.work / "fit-768x512", args.work / "heldout-48-95x512"
    if not args.model.exists() or not fit_path.exists() or not score_path.exists():
        print(f"skip: needs the model at {args.model} and the traces eval/hidden_predictor.py records under {args.work}")
        return 0

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moecache.atomic import write_json_atomic, write_text_atomic
    from moecache.predictors._common import multi_hot, token_order
    from moecache.trace import open_trace

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    started = time.time()
    fit, score = open_trace(fit_path), open_trace(score_path)
    E, k = score.meta.num_experts, score.meta.top_k
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    V = model.config.vocab_size
    order, next_same = token_order(score)
    tok, ids = np.asarray(score.token)[order], np.asarray(score.ids)[order]
    starts = np.flatnonzero(np.r_[True, ~next_same[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(order)]))
    with torch.no_grad():  # the model's next-token distribution at every position of every held-out sequence
        probs = np.concatenate([torch.softmax(model(input_ids=torch.tensor(tok[a:b][None], dtype=torch.long)).logits[0],
                                              -1).numpy() for a, b in bounds])
    rows = np.flatnonzero(next_same)  # positions whose next token is in the same sequence
    accuracy = float((probs[rows].argmax(1) == tok[rows + 1]).mean())
    ftok, fids = np.asarray(fit.token), np.asarray(fit.ids)
    hs = {}
    hp = args.out_dir / "hidden_predictor.json"
    if hp.exists():
        for r in json.loads(hp.read_text())["rows"]:
            if r["predictor"] == "hidden_state":
                hs[r["depth"]] = r["recall_next_token"]
    out_rows = []
    for layer in (0, 1):
        table = np.zeros((V, E))
        np.add.at(table, ftok, multi_hot(fids[:, layer], E))
        table *= k / np.maximum(table.sum(1, keepdims=True), 1.0)
        truth = multi_hot(ids[rows + 1, layer], E)
        out_rows.append({"layer": layer, "true_token": recall_at_k(table[tok[rows + 1]], truth, k),
                         "model_distribution": recall_at_k(probs[rows] @ table, truth, k),
                         # hidden_state's only next-token target at depth 1 is layer 0 (from layer 5); its depth-2
                         # next-token figure mixes layers 0 and 1, so it is not set against layer 1
                         "hidden_state_next_token": hs.get(1) if layer == 0 else None})
        print(out_rows[-1], file=sys.stderr)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores), torch {torch.__version__}",
           "command": "python eval/next_token_routing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "fit_tokens": len(fit), "score_targets": int(len(rows)), "model_top1_next_token_accuracy": accuracy,
           "rows": out_rows, "seconds": round(time.time() - started, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(args.out_dir / "next_token_routing.json"), out)
    md = ["# The next token's routing from its id (qwen3moe-tiny-code, held-out text)", "",
          f"- date: {out['date']}; machine: {out['machine']}",
          f"- command: `{out['command']}` ({out['seconds']:.0f} s)",
          f"- table: experts per (token id, layer) counted on the fit trace of `eval/hidden_predictor.py` "
          f"({len(fit):,} tokens); scored on heldout_sample.txt chunks 48-95 ({len(rows):,} next-token targets)",
          f"- the model's top-1 next-token accuracy there: {accuracy:.3f}",
          f"- recall@{k}: the predicted set's share of the next token's truly selected experts", "",
          "| next token's layer | from the true token's id | from the model's next-token distribution | "
          "hidden_state at depth 1 (from layer 5's input, hidden_predictor.json) |", "| --- | --- | --- | --- |"]
    for r in out_rows:
        h = "-" if r["hidden_state_next_token"] is None else f"{r['hidden_state_next_token']:.3f}"
        md.append(f"| {r['layer']} | {r['true_token']:.3f} | {r['model_distribution']:.3f} | {h} |")
    write_text_atomic(str(args.out_dir / "next_token_routing.md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
