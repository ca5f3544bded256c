"""Per-step JSON of the "Orders in Chaos" traces (Llama-4-Maverick, SGLang): one request per file.

Format: a JSON list of steps; step 0 is the prefill chunk, every later step one decode step. A
step is an object with keys ``"0"`` ... ``"47"`` (layer index as a string): dense (even) layers are
``null``; MoE (odd) layers list one ``[expert_id]`` per token of the step (1 in a decode step).

Mapping: each file is one sequence (files in numeric order, ``2.json`` before ``10.json``);
``step`` = index in the list, ``phase`` = prefill for step 0 and decode after it.
``pos`` is the index among the *logged* tokens of the request: step 0's tokens are 0..n0-1 and decode
step s is n0 + s - 1. The dataset's step 0 can be only the part of the prompt that was computed
(e.g. after a prefix-cache hit), so pos is relative to the first logged token, not the absolute
position in the prompt; the trace's ``extra.notes`` say so. If step 0 itself is skipped (lenient),
pos is unknown (-1) for the whole request.

A step is the unit of a record: a malformed step raises (lenient: is skipped and counted as
``malformed:<what>``). Broken JSON ends the file: lenient keeps the steps before the break and
counts one ``malformed:json_syntax`` (the unreadable rest, whose step count cannot be known).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from ...errors import TraceFormatError
from ..schema import PHASE_DECODE, PHASE_PREFILL, RoutingBlock, TraceMeta
from .base import FORMATS, Defects, ModelInfo, SourceFormat, SourceSequence, line_of_offset, swiglu_bf16_bytes

_NUM_LAYERS = 48
MODEL = ModelInfo(
    model="meta-llama/Llama-4-Maverick-17B-128E-Instruct", family="llama4", num_experts=128, top_k=1,
    moe_layers=tuple(range(1, _NUM_LAYERS, 2)),
    # hidden 5120, intermediate_size 8192 (public config): the bf16 size of the public shape
    bytes_per_expert=swiglu_bf16_bytes(5120, 8192),
    note="bytes_per_expert is the bf16 size of the public expert shape (hidden 5120 x 8192)")
SOURCE = ("Hugging Face core12345/MoE_expert_selection_trace (Yu et al., arXiv:2510.05497) via "
          "https://github.com/andronius-yang/cse223b-proj (traffic-gen/llama4-mmlu-<subject>/<n>.json)")

_KEYS = [str(i) for i in range(_NUM_LAYERS)]
_DENSE = [str(i) for i in range(_NUM_LAYERS) if i not in MODEL.moe_layers]
_MOE = [str(i) for i in MODEL.moe_layers]
_WS = " \t\r\n"


def _check_step(obj: Any, index: int) -> tuple[list[list[int]] | None, str]:
    """A step's expert ids as ``[token][moe_layer]``, or (None, what is wrong)."""
    if type(obj) is not dict:
        return None, "step_type"
    if len(obj) != _NUM_LAYERS or any(k not in obj for k in _KEYS):
        return None, "layer_keys"
    if any(obj[k] is not None for k in _DENSE):
        return None, "dense_layer"
    cols = [obj[k] for k in _MOE]
    if any(type(c) is not list for c in cols):
        return None, "layer_type"
    n = len(cols[0])
    if any(len(c) != n for c in cols):
        return None, "layer_token_count"
    if n == 0:
        return None, "no_tokens"
    if index > 0 and n != 1:
        return None, "decode_tokens"
    vals: list[list[int]] = []
    for c in cols:
        v = [e[0] for e in c if type(e) is list and len(e) == 1]
        if len(v) != n:
            bad = next(e for e in c if not (type(e) is list and len(e) == 1))
            return None, "top_k" if type(bad) is list else "ids_type"
        if any(type(x) is not int for x in v):
            return None, "ids_type"
        if min(v) < 0 or max(v) >= MODEL.num_experts:
            return None, "expert_id"
        vals.append(v)
    return [list(t) for t in zip(*vals)], ""


def _steps(text: str, path: str, defects: Defects) -> Iterator[tuple[Any, int]]:
    """Yield ``(step object, 1-based line where it starts)`` from the top-level JSON list."""
    dec = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    if i == n or text[i] != "[":
        defects.skip_file("json", TraceFormatError("expected a JSON list of steps ('[' ...)", path,
                                                   line_of_offset(text, i)))
        return
    i += 1
    line, seen = 1, 0

    def syntax(at: int, msg: str) -> None:
        defects.malformed("json_syntax", f"invalid JSON ({msg}); the rest of the file is unreadable",
                          path, line_of_offset(text, at))

    while True:
        while i < n and text[i] in _WS:
            i += 1
        if i < n and text[i] == "]" and seen == 0:
            i += 1
            break
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            syntax(e.pos, e.msg)
            return
        except RecursionError:  # absurdly nested JSON: unreadable like a syntax error
            syntax(i, "nested too deeply")
            return
        line += text.count("\n", seen, i)
        seen = i
        yield obj, line
        i = end
        while i < n and text[i] in _WS:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]":
            i += 1
            break
        syntax(i, "expected ',' or ']' after a step")
        return
    if text[i:].strip(_WS):
        syntax(i, "extra data after the list")


class OrdersInChaos(SourceFormat):
    """Orders-in-Chaos per-step JSON, one request per file (Llama-4-Maverick)."""

    name = "orders-in-chaos"

    def sniff(self, head: bytes, path: str) -> bool:
        s = head.lstrip()
        if not s.startswith(b"["):
            return False
        s = s[1:].lstrip()
        if not s.startswith(b"{"):
            return False
        return s[1:].lstrip().startswith(b'"0"')

    def read(self, path: str, defects: Defects) -> Iterator[SourceSequence]:
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            defects.skip_file("unreadable", TraceFormatError(
                f"not UTF-8 text (byte 0x{data[e.start]:02x})", path, line_of_offset(data, e.start)))
            return
        rows: list[list[int]] = []
        step: list[int] = []
        n0: int | None = None
        records = 0
        reported = (len(defects.skipped_files), defects.counts["malformed:json_syntax"])
        for index, (obj, line) in enumerate(_steps(text, path, defects)):
            records += 1
            ids, what = _check_step(obj, index)
            if ids is None:
                defects.malformed(what, f"bad step {index} ({what.replace('_', ' ')})", path, line)
                continue
            if index == 0:
                n0 = len(ids)
            rows.extend(ids)
            step.extend([index] * len(ids))
        if records == 0:  # nothing read: an empty list, unless a defect was already reported
            if (len(defects.skipped_files), defects.counts["malformed:json_syntax"]) == reported:
                defects.skip_file("empty", TraceFormatError("the list of steps is empty", path, 1))
            return
        st = np.asarray(step, np.int64)
        ids_a = np.asarray(rows, np.int64).reshape(len(rows), len(_MOE), 1)
        if n0 is None:
            pos = np.full(len(st), -1)
        else:  # prefill tokens 0..n0-1, then one position per decode step
            pos = np.where(st == 0, np.arange(len(st)), n0 + st - 1)
        block = RoutingBlock.build(ids_a, seq=0, pos=pos, step=st,
                                   phase=np.where(st == 0, PHASE_PREFILL, PHASE_DECODE))
        label = f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"
        yield SourceSequence(block=block, file=path, label=label, records=records)

    def meta(self, group: str | None, sequences: list[SourceSequence], files: list[str]) -> TraceMeta:
        return MODEL.trace_meta(
            # top-1 routing: the one id is the highest-scoring one, so its order is the score order
            source=SOURCE, files=files, weights="absent", id_order="score", extra={"notes": [
                "pos = index among the logged tokens of a request (step 0's tokens, then one per decode "
                "step); step 0 may be only the computed part of the prompt (prefix cache), so pos is "
                "relative to the first logged token, not the absolute prompt position",
                "step = index in the file's list of steps (0 = prefill chunk)",
            ]})


FORMATS.register("orders-in-chaos", "Orders-in-Chaos per-step JSON, one request per file (Llama-4-Maverick)")(OrdersInChaos())
