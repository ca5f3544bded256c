"""Hugging Face gate-hook CSV (ngavhane/moe-beyond, DeepSeek-V2-Lite-Chat): one prompt per file.

Format: header ``Layer ID,Batch Number,Token,Activated Expert IDs``; one row per (layer, token),
layer-major; ``Activated Expert IDs`` is a Python-list literal of 6 ids in router order, e.g.
``"[8, 26, 56, 57, 60, 43]"``. One prefill forward pass per prompt, no gate scores, no token ids.

Mapping: each file is one sequence (files in numeric order, ``prompt_2`` before ``prompt_10``);
``pos`` = row order within a layer, ``step`` = 0 (the one forward pass), ``phase`` = prefill,
``token`` = -1 (the file has token *strings*, kept as ``SourceSequence.token_text``, never turned
into invented ids). Every layer lists the same tokens; the importer checks that, which also checks
that rows line up across layers.

Two parsers give the same rows:

* ``_fast_rows``: numpy over the file's bytes. It accepts only the canonical layout the published
  files use (one row per line, ids written ``[a, b, c, d, e, f]``) and returns None on anything
  else, so it never has to explain an error.
* ``_slow_rows``: the ``csv`` module, row by row. The reference: it handles any valid CSV, names
  the line of a bad row and, lenient, keeps going.

Lenient rules: a bad row leaves its (token, layer) record missing (ids -1) and is counted as
``malformed:<what>``; a row whose ``Layer ID`` is unreadable is taken to belong to the layer of the
row before it (rows are layer-major). If the layers then have different row counts the file
cannot be aligned to tokens: it is skipped and all its rows are counted as
``malformed:unaligned_file_rows`` (replacing its per-row counts).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ...errors import TraceFormatError
from ..schema import PHASE_PREFILL, RoutingBlock, TraceMeta
from .base import FORMATS, Defects, ModelInfo, SourceFormat, SourceSequence, swiglu_bf16_bytes

HEADER = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
_HEADER_BYTES = ",".join(HEADER).encode()

MODEL = ModelInfo(
    model="deepseek-ai/DeepSeek-V2-Lite-Chat", family="deepseek_v2", num_experts=64, top_k=6,
    moe_layers=tuple(range(1, 27)),
    # hidden 2048, moe_intermediate_size 1408 (public config), bf16; the shared experts are not logged
    bytes_per_expert=swiglu_bf16_bytes(2048, 1408),
    note="bytes_per_expert is the bf16 size of the public expert shape; the source ran the model "
         "8-bit (bitsandbytes load_in_8bit)")
SOURCE = "https://github.com/ngavhane/moe-beyond (training_data_eamc/prompt_<N>_data.csv)"

_LAYERS = MODEL.moe_layers
_K = MODEL.top_k
_E = MODEL.num_experts
_DIGITS = re.compile(r"[0-9]{1,9}")


@dataclass
class _Rows:
    """Row-level columns of one file: the layer each row belongs to, its ids (-1 when unreadable),
    its token string (None when unreadable; None for the whole column when ``position_text`` is
    given instead) and its 1-based line (the last line of a row whose quoted token spans several)."""

    layer: np.ndarray
    ids: np.ndarray
    token: list[str | None] | None
    line: np.ndarray
    #: the token string of each position, when the parser already checked that all layers agree
    position_text: list[str | None] | None = None


# -- fast path ------------------------------------------------------------------------------------

def _gather(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte positions of the fields ``[starts[i], ends[i])`` concatenated, and each field's offset."""
    lens = ends - starts
    offsets = np.zeros(len(lens), np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    pos = np.repeat(starts - offsets, lens) + np.arange(int(lens.sum()))
    return pos, offsets


def _parse_uints(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """Decimal value of each field ``buf[starts[i]:ends[i]]``; None unless all are 1-6 digits."""
    lens = ends - starts
    if len(lens) == 0:
        return np.zeros(0, np.int64)
    if lens.min() < 1 or lens.max() > 6:
        return None
    pos, offsets = _gather(starts, ends)
    digits = buf[pos].astype(np.int64) - 48
    if digits.min() < 0 or digits.max() > 9:
        return None
    power = 10 ** (np.repeat(ends, lens) - 1 - pos)
    return np.add.reduceat(digits * power, offsets)


def _unquote(raw: str) -> str | None:
    """A CSV field's value if it is written canonically (no separators unquoted), else None."""
    if raw.startswith('"'):
        inner = raw[1:-1]
        if len(raw) < 2 or not raw.endswith('"') or '"' in inner.replace('""', ""):
            return None
        return inner.replace('""', '"')
    if '"' in raw or "," in raw or "\r" in raw:
        return None
    return raw


def _fast_rows(data: bytes) -> _Rows | None:
    """Parse a canonical file with numpy; None if anything is unusual (the slow path decides)."""
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)
    if len(nl) == 0 or data[: nl[0]].rstrip(b"\r") != _HEADER_BYTES:
        return None
    starts = nl + 1
    ends = np.append(nl[1:], len(buf))
    if ends[-1] == starts[-1]:  # the file ends with a newline: no last row after it
        starts, ends = starts[:-1], ends[:-1]
    if len(starts) == 0:
        return None
    ends = ends - (buf[ends - 1] == 13)  # CRLF: drop the CR
    if (ends - starts < 12).any():  # shorter than the shortest canonical row: blank lines and such
        return None
    commas = np.flatnonzero(buf == 44)
    ci = np.searchsorted(commas, starts)
    if ci[-1] + 1 >= len(commas):
        return None
    c1, c2 = commas[ci], commas[ci + 1]
    lbs = np.flatnonzero(buf == 91)
    li = np.searchsorted(lbs, ends) - 1
    if li.min() < 0:
        return None
    lb, rb = lbs[li], ends - 2
    if ((c2 >= ends) | (lb < c2 + 3) | (buf[lb - 1] != 34) | (buf[lb - 2] != 44)
            | (buf[rb] != 93) | (buf[ends - 1] != 34)).any():
        return None
    # the ids: exactly 5 commas between the brackets, each followed by one space
    first, last = np.searchsorted(commas, lb), np.searchsorted(commas, rb)
    if ((last - first) != _K - 1).any():
        return None
    inner = commas[first[:, None] + np.arange(_K - 1)]
    if (buf[inner + 1] != 32).any():
        return None
    id_starts = np.concatenate([(lb + 1)[:, None], inner + 2], axis=1).ravel()
    id_ends = np.concatenate([inner, rb[:, None]], axis=1).ravel()
    ids = _parse_uints(buf, id_starts, id_ends)
    layer = _parse_uints(buf, starts, c1)
    batch = _parse_uints(buf, c1 + 1, c2)
    if ids is None or layer is None or batch is None:
        return None
    ids = ids.reshape(-1, _K)
    srt = np.sort(ids, axis=1)
    if ((layer < _LAYERS[0]) | (layer > _LAYERS[-1]) | (batch != 0)).any() or ids.max() >= _E \
            or (np.diff(srt, axis=1) == 0).any():
        return None
    # every layer must list the same token fields, byte for byte; then only layer 1's are decoded
    counts = np.bincount(layer - _LAYERS[0], minlength=len(_LAYERS))
    n = int(counts[0])
    if (counts != n).any():
        return None
    order = np.argsort(layer, kind="stable")
    t_start, t_end = (c2 + 1)[order], (lb - 2)[order]
    lens = (t_end - t_start).reshape(len(_LAYERS), n)
    if (lens != lens[0]).any():
        return None
    pos, _ = _gather(t_start, t_end)
    tok_bytes = buf[pos].reshape(len(_LAYERS), -1)
    if (tok_bytes != tok_bytes[0]).any():
        return None
    text: list[str | None] = []
    for a, b in zip(t_start[:n].tolist(), t_end[:n].tolist()):
        t = _unquote(data[a:b].decode("utf-8"))
        if t is None:
            return None
        text.append(t)
    return _Rows(layer=layer, ids=ids.astype(np.int16), token=None, line=np.arange(2, len(starts) + 2, dtype=np.int64),
                 position_text=text)


# -- slow path (reference) ------------------------------------------------------------------------

def _parse_ids(field: str) -> tuple[list[int] | None, str]:
    """``"[a, b, ...]"`` -> (ids, "") or (None, why)."""
    s = field.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return None, "ids_format"
    parts = [p.strip() for p in s[1:-1].split(",")]
    if not all(_DIGITS.fullmatch(p) for p in parts):
        return None, "ids_format"
    ids = [int(p) for p in parts]
    if len(ids) != _K:
        return None, "top_k"
    if max(ids) >= _E:
        return None, "expert_id"
    if len(set(ids)) != _K:
        return None, "duplicate_expert"
    return ids, ""


def _slow_rows(text: str, path: str, defects: Defects, bad_lines: set[int]) -> _Rows | None:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        header = None
        defects.skip_file("header", TraceFormatError(f"cannot read the CSV header ({e})", path, 1))
        return None
    if header is None or tuple(h.strip() for h in header) != HEADER:
        defects.skip_file("header", TraceFormatError(
            f"expected the header {','.join(HEADER)!r}, got {','.join(header) if header else 'an empty file'!r}",
            path, 1))
        return None
    layers: list[int] = []
    ids: list[list[int]] = []
    tokens: list[str | None] = []
    lines: list[int] = []
    prev_layer = _LAYERS[0]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            row, err = None, str(e)
        line = reader.line_num
        if row == []:
            continue  # a blank line carries no record
        what = ""
        layer = None
        if row is None:
            what = "csv"
        elif line in bad_lines:
            what = "encoding"
        elif len(row) != 4:
            what = "fields"
        if row is not None and row and _DIGITS.fullmatch(row[0].strip()) and \
                _LAYERS[0] <= int(row[0]) <= _LAYERS[-1]:
            layer = int(row[0])
        elif not what:
            what = "layer"
        row_ids = None
        if not what:
            if not (_DIGITS.fullmatch(row[1].strip()) and int(row[1]) == 0):
                what = "batch"  # several prompts in one batch: rows could not be told apart
            else:
                row_ids, what = _parse_ids(row[3])
        if what:
            detail = (err if what == "csv" else "not UTF-8 text" if what == "encoding"
                      else f"{what.replace('_', ' ')} in {','.join(row or [])[:80]!r}")
            defects.malformed(what, f"bad row ({detail})", path, line)
        prev_layer = layer if layer is not None else prev_layer
        layers.append(prev_layer)
        ids.append(row_ids if row_ids is not None else [-1] * _K)
        tokens.append(row[2] if row is not None and len(row) == 4 and what not in ("encoding", "csv") else None)
        lines.append(line)
    return _Rows(layer=np.asarray(layers, np.int64), ids=np.asarray(ids, np.int16).reshape(-1, _K),
                 token=tokens, line=np.asarray(lines, np.int64))


# -- rows -> one sequence -------------------------------------------------------------------------

def _assemble(rows: _Rows, path: str, defects: Defects) -> tuple[np.ndarray, list[str | None]] | None:
    """Rows -> ``ids`` of shape (tokens, 26, 6) and the token strings; None if the file is skipped."""
    order = np.argsort(rows.layer, kind="stable")  # per layer, rows keep their file order
    counts = np.bincount(rows.layer - _LAYERS[0], minlength=len(_LAYERS))
    if counts.sum() == 0:
        defects.skip_file("empty", TraceFormatError("the file has a header but no data rows", path))
        return None
    n = int(counts.max())
    if (counts != n).any():
        bad = int(np.flatnonzero(counts != n)[0])
        defects.skip_file("unaligned", TraceFormatError(
            f"layer {_LAYERS[bad]} has {int(counts[bad])} rows but another layer has {n}: every layer must list "
            "every token once, so the rows cannot be aligned to tokens", path))
        return None
    ids = rows.ids[order].reshape(len(_LAYERS), n, _K).transpose(1, 0, 2).copy()
    if rows.position_text is not None:
        return ids, rows.position_text
    assert rows.token is not None
    line = rows.line[order].reshape(len(_LAYERS), n)
    tok = [rows.token[i] for i in order.tolist()]
    per_layer = [tok[j * n:(j + 1) * n] for j in range(len(_LAYERS))]
    text = list(per_layer[0])
    for i in [i for i, t in enumerate(text) if t is None]:  # unreadable in layer 1: take a later layer's
        text[i] = next((per_layer[j][i] for j in range(len(_LAYERS)) if per_layer[j][i] is not None), None)
    for j in range(len(_LAYERS)):
        if per_layer[j] == text:
            continue
        for i in range(n):
            t = per_layer[j][i]
            if t is not None and t != text[i]:
                defects.malformed("token_mismatch",
                                  f"layer {_LAYERS[j]} row {i} has token {t!r} but layer {_LAYERS[0]} row {i} has "
                                  f"{text[i]!r}: rows of the layers do not line up", path, int(line[j, i]))
                ids[i, j] = -1
    return ids, text


class HfGateCsv(SourceFormat):
    """HF gate-hook CSV, one prompt per file (DeepSeek-V2-Lite)."""

    name = "hf-gate-csv"
    has_token_text = True

    def sniff(self, head: bytes, path: str) -> bool:
        return head.removeprefix(b"\xef\xbb\xbf").startswith(_HEADER_BYTES)

    def read(self, path: str, defects: Defects) -> Iterator[SourceSequence]:
        with open(path, "rb") as f:
            data = f.read().removeprefix(b"\xef\xbb\xbf")
        local = Defects(defects.lenient)
        bad_lines: set[int] = set()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # the row parser reports each bad line in file order
            bad_lines = {no for no, raw in enumerate(data.split(b"\n"), start=1) if not _utf8(raw)}
            text = data.decode("utf-8", "replace")
        rows = _fast_rows(data) if not bad_lines else None
        if rows is None:
            rows = _slow_rows(text, path, local, bad_lines)
        done = _assemble(rows, path, local) if rows is not None else None
        if done is None:
            if rows is not None and len(rows.layer):  # skipped as unaligned: count its rows, not its row defects
                local.counts = type(local.counts)({k: v for k, v in local.counts.items() if k.endswith("_files")})
                local.add("malformed:unaligned_file_rows", len(rows.layer))
            defects.merge(local)
            return
        defects.merge(local)
        ids, text_tokens = done
        n = ids.shape[0]
        block = RoutingBlock.build(ids, seq=0, pos=np.arange(n), step=0, phase=PHASE_PREFILL)
        name = os.path.basename(path)
        yield SourceSequence(block=block, file=path, label=os.path.splitext(name)[0], records=len(rows.layer),
                             token_text=text_tokens)

    def meta(self, group: str | None, sequences: list[SourceSequence], files: list[str]) -> TraceMeta:
        return MODEL.trace_meta(source=SOURCE, files=files, weights="absent", id_order="router", extra={
            "notes": ["pos = row order within a layer (one prefill pass per prompt); step 0; token ids are "
                      "not in the source (token strings are, see `moecache trace import --token-text`)"]})


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


FORMATS.register("hf-gate-csv", "HF gate-hook CSV, one prompt per file (DeepSeek-V2-Lite)")(HfGateCsv())
