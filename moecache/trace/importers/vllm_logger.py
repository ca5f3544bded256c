"""vLLM MoE-logger JSONL (weiran0129/vLLM-MoE-Logger): one MoE layer per file, batched order.

Format: line 1 is ``{"type": "meta", "model_id", "layers_logged": [L], "top_k", ...}``; every
further line is ``{"type": "route", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}``.

What the importer does, and why:

* **One trace per layer file.** Each file is a separate run that logged one layer; the runs are not
  aligned token by token, so they are never merged. Several files give several traces (the driver
  writes ``OUT/layer<L>``); two files of the same layer are an error.
* **One sequence, phase unknown.** ``req_id`` is constant and records follow vLLM's batched
  execution order (prefills and decode steps of many requests interleaved), so requests cannot be
  separated: the stream is sequence 0, ``phase`` and ``pos`` unknown.
* **step = forward pass.** ``token_idx`` restarts at every forward pass (measured on the published
  files), so a record whose ``token_idx`` does not exceed the previous record's starts a new pass;
  passes are numbered from 0 at the first record after the warm-up.
* **Warm-up dummies.** vLLM's profiling / warm-up batch logs one expert set over and over. Rule: the
  leading run of records whose *sorted* ``topk_ids`` tuple equals the first record's (sorted, because
  one warm-up batch permutes the ids) is dropped and counted as ``warmup_dummy`` when it is at least
  ``WARMUP_MIN_RUN`` records long; a shorter run is real text and kept.
* Weights are raw softmax probabilities over all experts (``weights="softmax"``); ``id_order`` is
  ``"score"`` if every record's weights are non-increasing, else ``"router"``.
* Blank lines carry no record and are skipped; a malformed record raises (or, lenient, is counted
  as ``malformed:<what>``). The meta line is required: without it the layer is unknown.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from ...errors import TraceFormatError, UnsupportedModelError
from ..schema import PHASE_UNKNOWN, RoutingBlock, TraceMeta
from .base import (FORMATS, Defects, ModelInfo, SourceFormat, SourceSequence, check_ids,
                   check_weights, first_json_line, id_order_from_weights, is_int, swiglu_bf16_bytes)

#: A leading run of identical expert sets shorter than this is taken to be real text.
WARMUP_MIN_RUN = 16
#: token_idx counts tokens within one forward pass; no real batch comes near this many.
MAX_TOKEN_INDEX = 1 << 20

MODELS = {
    "Qwen/Qwen1.5-MoE-A2.7B-Chat": ModelInfo(
        model="Qwen/Qwen1.5-MoE-A2.7B-Chat", family="qwen2_moe", num_experts=60, top_k=4,
        moe_layers=tuple(range(24)),
        # hidden 2048, moe_intermediate_size 1408 (public config); the shared expert is not logged
        bytes_per_expert=swiglu_bf16_bytes(2048, 1408)),
}
SOURCE = "https://github.com/weiran0129/vLLM-MoE-Logger (Logs/moe_layer<L>.jsonl)"


def _header(line: bytes, path: str) -> dict[str, Any]:
    """Parse and check the meta line; raise ``TraceFormatError`` / ``UnsupportedModelError``."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TraceFormatError(f"line 1 must be the logger's meta object, cannot parse it ({e})", path, 1) from None
    if not isinstance(obj, dict) or obj.get("type") != "meta":
        raise TraceFormatError('line 1 must be the logger\'s meta object {"type": "meta", ...}; '
                               "the file is truncated at the start or not a vLLM MoE-logger log", path, 1)
    model = obj.get("model_id")
    if model not in MODELS:
        raise UnsupportedModelError(f"{path}: model_id {model!r} is not one this importer knows the shape of "
                                    f"(known: {', '.join(sorted(MODELS))})")
    layers = obj.get("layers_logged")
    info = MODELS[model]
    if type(layers) is not list or len(layers) != 1 or not is_int(layers[0]) or layers[0] not in info.moe_layers:
        raise TraceFormatError(f"layers_logged must list one MoE layer of {model} (0..{max(info.moe_layers)}), got "
                               f"{layers!r}; multi-layer logs are not supported", path, 1)
    top_k = obj.get("top_k", info.top_k)
    if top_k != info.top_k or not is_int(top_k):
        raise TraceFormatError(f"top_k {top_k!r} does not match {model} (top-{info.top_k})", path, 1)
    return obj


def warmup_run_length(sorted_ids: list[tuple[int, ...]]) -> int:
    """Length of the leading warm-up run (0 if it is shorter than ``WARMUP_MIN_RUN``)."""
    if not sorted_ids:
        return 0
    first, n = sorted_ids[0], 0
    while n < len(sorted_ids) and sorted_ids[n] == first:
        n += 1
    return n if n >= WARMUP_MIN_RUN else 0


def forward_passes(token_idx: np.ndarray) -> np.ndarray:
    """Forward-pass number of each record: a pass starts where ``token_idx`` stops increasing."""
    if len(token_idx) == 0:
        return np.zeros(0, np.int64)
    new = np.ones(len(token_idx), bool)
    new[1:] = token_idx[1:] <= token_idx[:-1]
    return np.cumsum(new) - 1


class VllmMoeLogger(SourceFormat):
    """vLLM MoE-logger JSONL, one layer per file (Qwen1.5-MoE)."""

    name = "vllm-moe-logger"

    def sniff(self, head: bytes, path: str) -> bool:
        obj = first_json_line(head)
        return obj is not None and obj.get("type") == "meta" and "layers_logged" in obj

    def _layer(self, path: str) -> int:
        with open(path, "rb") as f:
            first = f.readline()
        return int(_header(first, path)["layers_logged"][0])

    def groups(self, files: list[str], defects: Defects) -> list[tuple[str | None, list[str]]]:
        by_layer: dict[int, str] = {}
        for path in files:
            try:
                layer = self._layer(path)
            except TraceFormatError as e:
                defects.skip_file("header", e)
                continue
            if layer in by_layer:
                raise TraceFormatError(
                    f"logs layer {layer} like {by_layer[layer]}: two runs of one layer cannot be merged "
                    "(their batches are not aligned); import them in separate calls", path)
            by_layer[layer] = path
        if len(by_layer) <= 1:
            return [(None, list(by_layer.values()))] if by_layer else []
        return [(f"layer{layer}", [by_layer[layer]]) for layer in sorted(by_layer)]

    def read(self, path: str, defects: Defects) -> Iterator[SourceSequence]:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        head = _header(lines[0], path)
        layer, info = int(head["layers_logged"][0]), MODELS[head["model_id"]]
        k, E = info.top_k, info.num_experts
        tok: list[int] = []
        ids: list[list[int]] = []
        wts: list[list[float]] = []
        for no, raw in enumerate(lines[1:], start=2):
            if not raw.strip():
                continue
            what = None
            try:
                r = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                what = "encoding"
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                what = "json"
            if what is None:
                if not isinstance(r, dict) or r.get("type") != "route":
                    what = "record_type"
                elif type(r.get("req_id")) is not str:
                    what = "req_id"
                elif r.get("layer") != layer or not is_int(r.get("layer")):
                    what = "layer"
                elif not is_int(r.get("token_idx")) or not 0 <= r["token_idx"] <= MAX_TOKEN_INDEX:
                    what = "token_idx"
                else:
                    what = check_ids(r.get("topk_ids"), k, E) or check_weights(r.get("topk_weights"), k)
            if what is not None:
                defects.malformed(what, f"bad route record ({what.replace('_', ' ')}): {_clip(raw)}", path, no)
                continue
            tok.append(r["token_idx"])
            ids.append(r["topk_ids"])
            wts.append(r["topk_weights"])
        warm = warmup_run_length([tuple(sorted(x)) for x in ids])
        ids_a = np.asarray(ids[warm:], np.int64).reshape(-1, 1, k)
        w_a = np.asarray(wts[warm:], np.float32).reshape(-1, 1, k)
        step = forward_passes(np.asarray(tok[warm:], np.int64))
        block = RoutingBlock.build(ids_a, seq=0, step=step, phase=PHASE_UNKNOWN, weights=w_a)
        seq = SourceSequence(block=block, file=path, label=f"layer {layer} stream", records=len(ids),
                             extra={"layer": layer, "model": info.model})
        seq.counts["warmup_dummy"] += warm
        yield seq

    def meta(self, group: str | None, sequences: list[SourceSequence], files: list[str]) -> TraceMeta:
        layer = sequences[0].extra["layer"]
        info = MODELS[sequences[0].extra["model"]]
        w = np.concatenate([s.block.weights for s in sequences if s.block.weights is not None])
        return info.trace_meta(
            source=SOURCE, files=files, weights="softmax", id_order=id_order_from_weights(w, "router"),
            moe_layers=[layer],
            extra={"notes": [
                "one run per file logged a single layer; runs of different layers are not aligned and "
                "are never merged",
                "requests are not separated (vLLM batched order, req_id constant): the stream is one "
                "sequence with phase and position unknown",
                "step = forward pass (token_idx restarts each pass), counted from the first record after "
                "the warm-up dummies",
            ]})


def _clip(raw: bytes, n: int = 80) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= n else text[:n] + "..."


FORMATS.register("vllm-moe-logger", "vLLM MoE-logger JSONL, one layer per file (Qwen1.5-MoE)")(VllmMoeLogger())
