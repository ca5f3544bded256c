"""speculative-moe JSONL (Mario928/speculative-moe, Mixtral-8x7B-Instruct FP8 in vLLM).

Two layouts, one JSON object per line, both with ``dataset``, ``problem_id``, ``layer``,
``experts`` (2 ids, highest weight first) and ``gating_probs`` (renormalised top-2 weights):

* ``*_routing.jsonl`` (processed): ``token_idx`` = index of the decode token; lines layer-major per
  problem. Decode only.
* ``routing_raw.jsonl`` (raw): ``token_pos``. A leading layer-major prefill part (``token_pos`` =
  prompt position), then a token-major decode part in which every record has ``token_pos`` 0.

Each (dataset, problem_id) is one sequence. Mapping and rules:

* ``step`` = forward pass: 0 = the prefill pass, decode token t = t + 1 (also in processed files,
  whose prefill pass was not logged). ``phase`` = prefill / decode.
* ``pos``: raw prefill = ``token_pos``; raw decode token t = prompt length + t; processed files do
  not log the prompt length in tokens, so their ``pos`` is unknown.
* Raw split: the prefill part is the leading run of records up to the first place where the layer
  number decreases; in the decode part a new token starts wherever the layer number does not increase
  (records are token-major, layers ascending, some missing).
* A token index must be below Mixtral's 32,768-token context; a larger one is a malformed record.
* Missing (token, layer) records, e.g. the last tokens of a processed problem, are KEPT as ids -1 /
  weights NaN and counted per sequence as ``missing_layer_records``.
* Duplicates: the raw decode part repeats a problem of a processed file. Two sequences with the same
  (dataset, problem_id) are the same request when every present decode record (layer, ids, weights)
  of the smaller one also occurs in the other; the copy with a prefill part (the raw log) is kept,
  the other dropped and its records counted as ``duplicate_request_records``. Same key, different
  routing is an error (two different runs of one problem).

Measured caveat, stated in the trace's notes: ``token_idx`` in the processed files is a per-layer
record counter. Compared with the raw log of HumanEval problem 0, where a layer lost a record
mid-sequence its later records sit one token early, and the "missing layers at the last tokens"
are where that counter ran out. The raw log's token-major order does not have this shift, which is
one more reason it is the copy kept.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, Iterator

import numpy as np

from ..schema import PHASE_DECODE, PHASE_PREFILL, RoutingBlock, TraceMeta
from .base import (FORMATS, Defects, ModelInfo, SourceFormat, SourceSequence, check_ids,
                   check_weights, first_json_line, id_order_from_weights, is_int, missing_records,
                   swiglu_bf16_bytes)

MODEL = ModelInfo(
    model="neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8", family="mixtral", num_experts=8, top_k=2,
    moe_layers=tuple(range(32)),
    # hidden 4096, intermediate 14336 (public Mixtral-8x7B config)
    bytes_per_expert=swiglu_bf16_bytes(4096, 14336),
    note="bytes_per_expert is the bf16 size of the public expert shape; the source ran the FP8 "
         "checkpoint (about half that)")
SOURCE = ("https://github.com/Mario928/speculative-moe@216e26e (routing_data_collected/*_routing.jsonl, "
          "analysis/deep_analysis/routing_raw.jsonl)")

#: Mixtral-8x7B's context (max_position_embeddings). A larger token index can only be corruption,
#: and rejecting it bounds the (tokens, 32, 2) arrays a record can make the importer allocate.
_CONTEXT = 32768
_L = len(MODEL.moe_layers)
_K = MODEL.top_k
_REQUIRED = ("dataset", "problem_id", "layer", "experts", "gating_probs")


def _check(r: Any) -> str | None:
    """Why a parsed line is not a record, or None."""
    if not isinstance(r, dict) or any(k not in r for k in _REQUIRED):
        return "fields"
    if type(r["dataset"]) is not str:
        return "dataset"
    if not is_int(r["problem_id"]) or r["problem_id"] < 0:
        return "problem_id"
    if not is_int(r["layer"]) or not 0 <= r["layer"] < _L:
        return "layer"
    if ("token_idx" in r) == ("token_pos" in r):
        return "token_field"
    t = r.get("token_idx", r.get("token_pos"))
    if not is_int(t) or not 0 <= t < _CONTEXT:
        return "token_index"
    return check_ids(r["experts"], _K, MODEL.num_experts) or check_weights(r["gating_probs"], _K)


class _Grid:
    """(token, layer) -> (ids, weights) for one part of a sequence; first record of a slot wins."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        self.tokens = 0

    def put(self, token: int, r: dict, path: str, line: int, defects: Defects) -> None:
        key = (token, r["layer"])
        if key in self.slots:
            defects.malformed("duplicate_record", f"second record for token {token}, layer {r['layer']}", path, line)
            return
        self.slots[key] = (r["experts"], r["gating_probs"])
        self.tokens = max(self.tokens, token + 1)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((self.tokens, _L, _K), -1, np.int16)
        w = np.full((self.tokens, _L, _K), np.nan, np.float32)
        for (t, layer), (e, p) in self.slots.items():
            ids[t, layer] = e
            w[t, layer] = p
        return ids, w


def _processed(recs: list[tuple[int, dict]], path: str, defects: Defects) -> RoutingBlock:
    grid = _Grid()
    for line, r in recs:
        grid.put(r["token_idx"], r, path, line, defects)
    ids, w = grid.arrays()
    t = np.arange(len(ids))
    return RoutingBlock.build(ids, pos=None, step=t + 1, phase=PHASE_DECODE, weights=w)


def _raw(recs: list[tuple[int, dict]], path: str, defects: Defects) -> RoutingBlock:
    split = next((i for i in range(1, len(recs)) if recs[i][1]["layer"] < recs[i - 1][1]["layer"]), len(recs))
    pre, dec = _Grid(), _Grid()
    for line, r in recs[:split]:
        pre.put(r["token_pos"], r, path, line, defects)
    token, prev_layer = -1, _L
    for line, r in recs[split:]:
        if r["token_pos"] != 0:
            defects.malformed("token_pos", f"decode record with token_pos {r['token_pos']} (the raw decode part "
                                           "logs token_pos 0)", path, line)
            continue
        if r["layer"] <= prev_layer:  # layers ascend within a token: a repeat or a drop starts the next one
            token += 1
        prev_layer = r["layer"]
        dec.put(token, r, path, line, defects)
    pi, pw = pre.arrays()
    di, dw = dec.arrays()
    n_p, n_d = len(pi), len(di)
    return RoutingBlock.build(
        np.concatenate([pi, di]), weights=np.concatenate([pw, dw]),
        pos=np.concatenate([np.arange(n_p), n_p + np.arange(n_d)]),
        step=np.concatenate([np.zeros(n_p, np.int64), 1 + np.arange(n_d)]),
        phase=np.concatenate([np.full(n_p, PHASE_PREFILL), np.full(n_d, PHASE_DECODE)]))


def _decode_records(s: SourceSequence) -> Counter:
    """Multiset of present decode records (layer, ids, weights) of a sequence."""
    b = s.block
    dec = np.flatnonzero(b.phase == PHASE_DECODE)
    out: Counter = Counter()
    for t in dec.tolist():
        for layer in range(b.ids.shape[1]):
            if b.ids[t, layer, 0] >= 0:
                out[(layer, tuple(b.ids[t, layer].tolist()), tuple(b.weights[t, layer].tolist()))] += 1
    return out


class SpeculativeMoe(SourceFormat):
    """speculative-moe routing JSONL, processed and raw (Mixtral-8x7B)."""

    name = "speculative-moe"

    def sniff(self, head: bytes, path: str) -> bool:
        obj = first_json_line(head)
        return obj is not None and all(k in obj for k in ("experts", "gating_probs", "problem_id"))

    def read(self, path: str, defects: Defects) -> Iterator[SourceSequence]:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        groups: dict[tuple[str, int], list[tuple[int, dict]]] = defaultdict(list)
        layout: str | None = None
        records: Counter = Counter()
        for no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                r = json.loads(raw.decode("utf-8"))
                what = _check(r)
            except UnicodeDecodeError:
                what = "encoding"
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                what = "json"
            if what is None:
                kind = "processed" if "token_idx" in r else "raw"
                layout = layout or kind
                if kind != layout:
                    what = "mixed_layout"
            if what is not None:
                defects.malformed(what, f"bad routing record ({what.replace('_', ' ')}): "
                                        f"{raw[:80].decode('utf-8', 'replace')}", path, no)
                continue
            key = (r["dataset"], r["problem_id"])
            groups[key].append((no, r))
            records[key] += 1
        for key, recs in groups.items():
            block = (_processed if layout == "processed" else _raw)(recs, path, defects)
            seq = SourceSequence(block=block, file=path, label=f"{key[0]} problem {key[1]}", records=records[key],
                                 key=key, extra={"layout": layout})
            seq.counts["missing_layer_records"] += missing_records(block.ids)
            yield seq

    def same_request(self, a: SourceSequence, b: SourceSequence) -> bool:
        ra, rb = _decode_records(a), _decode_records(b)
        small, large = (ra, rb) if sum(ra.values()) <= sum(rb.values()) else (rb, ra)
        return bool(small) and not (small - large)

    def prefer(self, a: SourceSequence, b: SourceSequence) -> SourceSequence:
        # the raw log has the prefill and execution-order token alignment (see the module docstring)
        return b if b.has_prefill and not a.has_prefill else a

    def meta(self, group: str | None, sequences: list[SourceSequence], files: list[str]) -> TraceMeta:
        ws = [s.block.weights for s in sequences if s.block.weights is not None]
        w = np.concatenate(ws) if ws else None
        return MODEL.trace_meta(
            source=SOURCE, files=files, weights="renormalized", id_order=id_order_from_weights(w, "score"),
            extra={"notes": [
                "missing (token, layer) records are kept as ids -1 / weights NaN (missing_layer_records)",
                "step = forward pass: 0 = prefill (logged only in routing_raw.jsonl), decode token t -> t + 1; "
                "pos known only for routing_raw.jsonl (prefill token_pos, then prompt length + t)",
                "*_routing.jsonl token_idx is a per-layer record counter: where a layer lost a record "
                "mid-sequence its later records sit one token early (measured on HumanEval problem 0 against "
                "routing_raw.jsonl); the raw log's token-major order has no such shift",
            ]})


FORMATS.register("speculative-moe", "speculative-moe routing JSONL, processed and raw (Mixtral-8x7B)")(SpeculativeMoe())
