"""The on-disk trace store: a folder of chunk folders plus a manifest, readable with numpy alone.

Layout of a finalised trace ``PATH/``::

    manifest.json            format name and version, metadata, chunk list, drop counts
    chunk-000000/            one folder per flushed chunk, each renamed into place when complete
        seq.npy pos.npy token.npy step.npy phase.npy ids.npy [weights.npy] [hidden.npy]
        drops.json           {reason: count} observed while this chunk was written
    chunk-000001/ ...

While it is being written the folder is ``PATH.partial/`` and holds ``meta.json`` instead of the
manifest. A process killed midway leaves ``PATH.partial/`` with every flushed chunk readable:
``open_trace`` reads it (``Trace.finalised`` is False) and ``finalise_partial`` turns it into a
normal trace. ``close()`` writes the manifest and renames the folder to ``PATH`` in one step.
No pickle is used anywhere: ``.npy`` files are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .._ext import extension
from .. import validate as V
from ..atomic import FolderLock, fsync_dir, write_json_atomic
from ..errors import ConfigError, TraceFormatError
from .schema import (FORMAT_NAME, FORMAT_VERSION, HIDDEN_DTYPE, ID_DROPPED, ID_MISSING, PHASE_NAMES, TOKEN_COLUMNS,
                     RoutingBlock, TraceMeta, format_version_of)

MANIFEST = "manifest.json"
PARTIAL_META = "meta.json"
PARTIAL_SUFFIX = ".partial"
_CHUNK_RE = re.compile(r"^chunk-([0-9]{6,})\Z")
_COLUMNS = tuple(TOKEN_COLUMNS) + ("ids", "weights", "hidden")
_OPTIONAL = ("weights", "hidden")


def _chunk_name(i: int) -> str:
    return f"chunk-{i:06d}"


def _holds_our_header(path: str, header_file: str) -> bool:
    """Whether folder ``path`` (not a link) has ``header_file`` naming moecache's trace format."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, header_file)) as f:
            header = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT_NAME


def is_finished_trace(path: str) -> bool:
    """Whether ``path`` is a folder holding a finished moecache trace (its manifest names our format)."""
    return _holds_our_header(path, MANIFEST)


def _is_partial_trace(path: str) -> bool:
    return _holds_our_header(path, PARTIAL_META)


def check_trace_output(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise (``FileExistsError``/``ConfigError``, one line) unless a trace may be written at ``path``.

    Allowed: nothing at ``path``, or with ``overwrite`` a finished moecache trace (never another folder
    or a file); its ``PATH.partial`` absent, or with ``overwrite`` one no live writer holds. The parent
    folder must exist and be writable: nothing outside the output path is created.
    """
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    partial = path + PARTIAL_SUFFIX
    parent = os.path.dirname(path) or "."
    if os.path.lexists(path):
        if not is_finished_trace(path):
            what = "a symlink" if os.path.islink(path) else "a folder" if os.path.isdir(path) else "a file"
            raise FileExistsError(f"{path} exists and is {what}, not a moecache trace; refusing to replace it: "
                                  "choose another output path")
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it, or choose "
                                  "another path")
    if os.path.lexists(partial):
        if _is_partial_trace(partial) and FolderLock.is_held(partial):
            raise FileExistsError(f"{partial} is being written by a running recording ({FolderLock(partial).holder()}); "
                                  "wait for it to finish or choose another path")
        if not _is_partial_trace(partial):
            raise FileExistsError(f"{partial} exists and is not an unfinished moecache trace; refusing to replace it: "
                                  "move it away or choose another path")
        if not overwrite:
            raise FileExistsError(
                f"{partial} holds an unfinished trace (a recording that did not close). Read it with "
                f"`moecache trace info {partial}`, finish it with `moecache trace finalise {partial}`, "
                "or pass overwrite=True (CLI: --force) to replace it")
    V.output_parent("output", path)


def _remove_stale_partial(partial: str) -> None:
    """Delete an unfinished trace no live writer holds (``overwrite``), under its own lock."""
    lock = FolderLock(partial)
    if os.path.isfile(lock.path) and not lock.acquire():
        raise FileExistsError(f"{partial} is being written by a running recording; wait for it to finish")
    try:
        shutil.rmtree(partial)
    finally:
        lock.release()


def _rename_into_place(src: str, dst: str, overwrite: bool) -> None:
    """Rename the finished folder ``src`` to ``dst``; with ``overwrite`` a finished trace at ``dst`` is
    moved to a unique hidden name beside it first, and deleted once ``src`` is in place."""
    if os.path.lexists(dst):
        if not (overwrite and is_finished_trace(dst)):
            raise FileExistsError(f"{dst} appeared while the trace was written and is not replaced; the trace is "
                                  f"complete in {src}: move {dst} away and rename {src} to it")
        old = tempfile.mkdtemp(prefix="." + os.path.basename(dst) + ".old-", dir=os.path.dirname(dst))
        os.rename(dst, old)  # onto the empty folder mkdtemp made: atomic, and never over anything else
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


class TraceWriter:
    """Writes a trace chunk by chunk; crash-safe, finalised atomically by ``close()``.

    ``append`` buffers blocks and flushes a chunk every ``chunk_rows`` tokens; ``flush`` forces one.
    Used as a context manager, an exception leaves the flushed chunks in ``PATH.partial`` (nothing
    already written is lost) and re-raises.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, *, chunk_rows: int = 65536,
                 overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
        self.meta = meta
        self.chunk_rows = int(chunk_rows)
        self.partial = self.path + PARTIAL_SUFFIX
        self.overwrite = bool(overwrite)
        check_trace_output(self.path, overwrite=self.overwrite)
        if os.path.lexists(self.partial):  # a stale, unlocked moecache partial (checked above): replace it
            _remove_stale_partial(self.partial)
        os.makedirs(os.path.dirname(self.partial), exist_ok=True)  # the folders named in the path
        os.mkdir(self.partial)  # fails if another writer made it meanwhile
        self._lock = FolderLock(self.partial)
        if not self._lock.acquire():
            raise FileExistsError(f"{self.partial} is being written by another recording; choose another path")
        write_json_atomic(os.path.join(self.partial, PARTIAL_META),
                          {"format": FORMAT_NAME, "version": format_version_of(meta), "meta": meta.to_json()})
        self._buffer: list[RoutingBlock] = []
        self._buffered = 0
        self._chunks: list[dict[str, Any]] = []
        self._drops: Counter[str] = Counter()
        self._pending_drops: Counter[str] = Counter()
        self.rows = 0
        self.closed = False

    # -- writing -------------------------------------------------------------------------------
    def append(self, block: RoutingBlock) -> None:
        if self.closed:
            raise ValueError("trace writer is closed")
        block = block.validate(self.meta)
        if len(block) == 0:
            return
        self._buffer.append(block)
        self._buffered += len(block)
        if self._buffered >= self.chunk_rows:
            self.flush()

    def add_drops(self, reason: str, count: int = 1) -> None:
        """Count ``count`` source records left out for ``reason`` (kept in the trace's metadata)."""
        if count:
            self._pending_drops[reason] += int(count)

    def flush(self) -> None:
        """Write buffered rows as one chunk folder, renamed into place only once complete."""
        if not self._buffer and not self._pending_drops:
            return
        block = RoutingBlock.concat(self._buffer) if self._buffer else None
        name = _chunk_name(len(self._chunks))
        tmp = os.path.join(self.partial, "." + name + ".tmp")
        os.makedirs(tmp, exist_ok=True)
        rows = 0
        if block is not None:
            rows = len(block)
            for col in _COLUMNS:
                arr = getattr(block, col)
                if arr is None:
                    continue
                with open(os.path.join(tmp, col + ".npy"), "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
        with open(os.path.join(tmp, "drops.json"), "w") as f:
            json.dump(dict(self._pending_drops), f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, os.path.join(self.partial, name))
        fsync_dir(self.partial)
        self._chunks.append({"name": name, "rows": rows})
        self._drops.update(self._pending_drops)
        self._pending_drops.clear()
        self.rows += rows
        self._buffer, self._buffered = [], 0

    def close(self) -> str:
        """Flush, write the manifest and rename ``PATH.partial`` to ``PATH``. Returns ``PATH``."""
        if self.closed:
            return self.path
        self.flush()
        manifest = {
            "format": FORMAT_NAME,
            "version": format_version_of(self.meta),
            "meta": self.meta.to_json(),
            "chunks": self._chunks,
            "rows": self.rows,
            "drops": dict(sorted(self._drops.items())),
        }
        try:
            write_json_atomic(os.path.join(self.partial, MANIFEST), manifest)
            _rename_into_place(self.partial, self.path, self.overwrite)
        except BaseException:  # PATH.partial keeps every chunk (and maybe the manifest): finalise completes it
            self.closed = True
            self._lock.release()
            raise
        self._lock.moved(self.path)
        self._lock.release(unlink=True)
        fsync_dir(os.path.dirname(self.path))
        self.closed = True
        return self.path

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was produced: flushed chunks stay readable in PATH.partial
            try:
                self.flush()
            finally:
                self.closed = True
                self._lock.release()

    def abandon(self) -> None:
        """Stop writing (without finalising); flushed chunks stay in ``PATH.partial``, now unlocked."""
        self.closed = True
        self._lock.release()


def write_trace(path: str | os.PathLike, meta: TraceMeta, blocks: Iterable[RoutingBlock], *,
                drops: dict[str, int] | None = None, overwrite: bool = False,
                chunk_rows: int = 1 << 20) -> str:
    """Write ``blocks`` as a finalised trace at ``path``."""
    with TraceWriter(path, meta, overwrite=overwrite, chunk_rows=chunk_rows) as w:
        for reason, n in (drops or {}).items():
            w.add_drops(reason, n)
        for b in blocks:
            w.append(b)
    return w.path


class Trace:
    """A routing trace in memory: metadata plus columns over all tokens, in recorded order.

    Columns are numpy arrays: ``seq``, ``pos``, ``token``, ``step``, ``phase`` of shape ``(n,)``,
    ``ids`` of shape ``(n, layers, top_k)`` and ``weights`` (same shape, or None).
    """

    def __init__(self, meta: TraceMeta, block: RoutingBlock, *, drops: dict[str, int] | None = None,
                 path: str | None = None, finalised: bool = True,
                 weights_loader: Callable[[], np.ndarray] | None = None,
                 hidden_loader: Callable[[], np.ndarray] | None = None):
        self.meta = meta
        # Hidden states (format version 2) are the largest column by far: read on first use only.
        self._hidden_loader = hidden_loader
        if hidden_loader is not None:
            if block.hidden is not None:
                raise ValueError("pass hidden states in the block or a hidden_loader, not both")
            meta = meta.without_hidden()
        # Gate weights are read on first use: most analyses need ids only, and weights are the
        # larger column (float32 against int16), so reading them lazily halves a cold open.
        self._weights_loader = weights_loader
        if weights_loader is not None:
            if block.weights is not None:
                raise ValueError("pass weights in the block or a weights_loader, not both")
            block = block.validate(TraceMeta(**{**meta.to_json(), "weights": "absent"}))
        else:
            block = block.validate(meta)
        self._block = block
        self.drops: dict[str, int] = dict(drops or {})
        self.path = path
        self.finalised = finalised

    # columns
    seq = property(lambda self: self._block.seq)
    pos = property(lambda self: self._block.pos)
    token = property(lambda self: self._block.token)
    step = property(lambda self: self._block.step)
    phase = property(lambda self: self._block.phase)
    ids = property(lambda self: self._block.ids)

    @property
    def weights(self) -> np.ndarray | None:
        if self._weights_loader is not None:
            w = self._weights_loader()
            if w.shape != self.ids.shape:
                raise TraceFormatError(f"weights shape {w.shape} does not match ids {self.ids.shape}", self.path)
            self._block = RoutingBlock(self.seq, self.pos, self.token, self.step, self.phase, self.ids,
                                       w.astype(np.float32, copy=False), self._block.hidden)
            self._weights_loader = None
        return self._block.weights

    @property
    def hidden(self) -> np.ndarray | None:
        """Per (token, layer) MoE-block inputs, float16 ``(tokens, layers, hidden_size)``; None when the
        trace was recorded without them (``meta.hidden_size`` is None)."""
        if self._hidden_loader is not None:
            h = self._hidden_loader()
            want = (len(self), self.meta.num_layers, self.meta.hidden_size)
            if h.shape != want:
                raise TraceFormatError(f"hidden shape {h.shape} does not match {want}", self.path)
            self._block = RoutingBlock(self.seq, self.pos, self.token, self.step, self.phase, self.ids,
                                       self._block.weights, h.astype(HIDDEN_DTYPE, copy=False))
            self._hidden_loader = None
        return self._block.hidden

    @property
    def block(self) -> RoutingBlock:
        self.weights  # materialise lazily loaded weights
        self.hidden  # ... and hidden states
        return self._block

    def __len__(self) -> int:
        return len(self._block)

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    def sequences(self) -> np.ndarray:
        """Sequence ids in order of first appearance."""
        _, first = np.unique(self.seq, return_index=True)
        return self.seq[np.sort(first)]

    def iter_sequences(self) -> Iterator[tuple[int, "Trace"]]:
        """Yield ``(seq_id, sub_trace)`` in order of first appearance."""
        for s in self.sequences():
            yield int(s), self.select(self.seq == s)

    def select(self, mask_or_index: np.ndarray | slice) -> "Trace":
        return Trace(self.meta, self.block.take(mask_or_index), drops=self.drops, path=self.path,
                     finalised=self.finalised)

    def with_hidden(self, hidden: np.ndarray) -> "Trace":
        """This trace with hidden states ``(tokens, layers, hidden_size)`` attached (e.g. captured
        apart from a recording), as a version-2 trace in memory."""
        h = np.asarray(hidden)
        if h.ndim != 3 or h.shape[:2] != (len(self), self.meta.num_layers):
            raise TraceFormatError(f"hidden has shape {h.shape}, expected ({len(self)}, {self.meta.num_layers}, "
                                   "hidden_size)", self.path)
        b = self.block
        meta = TraceMeta(**{**self.meta.to_json(), "hidden_size": int(h.shape[2])})
        return Trace(meta, RoutingBlock(b.seq, b.pos, b.token, b.step, b.phase, b.ids, b.weights, h),
                     drops=self.drops, path=self.path, finalised=self.finalised)

    def select_sequences(self, seq_ids: Iterable[int]) -> "Trace":
        return self.select(np.isin(self.seq, np.asarray(list(seq_ids))))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        return write_trace(path, self.meta, [self.block], drops=self.drops, overwrite=overwrite)

    def summary(self) -> dict[str, Any]:
        """The figures ``moecache trace info`` prints."""
        ids = self.ids
        present = ids >= 0
        row_present = present.any(axis=2)  # (n, layers)
        phases = {PHASE_NAMES[int(p)]: int(c) for p, c in zip(*np.unique(self.phase, return_counts=True))}
        n = len(self)
        return {
            "path": self.path,
            "finalised": self.finalised,
            "model": self.meta.model,
            "family": self.meta.family,
            "source": self.meta.source,
            "tokens": n,
            "sequences": int(len(np.unique(self.seq))) if n else 0,
            "layers": self.meta.num_layers,
            "moe_layers": list(self.meta.moe_layers),
            "experts": self.meta.num_experts,
            "top_k": self.meta.top_k,
            "bytes_per_expert": self.meta.bytes_per_expert,
            "id_order": self.meta.id_order,
            "weights": self.meta.weights,
            "phases": phases,
            "steps": int(len(np.unique(self.step[self.step >= 0]))),
            # an empty trace has no share to report (None), not 0/0
            "known": {c: float((getattr(self, c) >= 0).mean()) if n else None for c in ("pos", "token", "step")},
            "coverage": float(row_present.mean()) if n else None,
            "coverage_per_layer": [float(x) for x in row_present.mean(axis=0)] if n else [],
            "missing_records": int((~row_present).sum()),
            "dropped_slots": int((ids == ID_DROPPED).sum()),
            "accesses": int(present.sum()),
            "drops": dict(sorted(self.drops.items())),
            "files": list(self.meta.files),
        }


def _load_chunk(folder: str, meta: TraceMeta, with_weights: bool = True,
                with_hidden: bool = True) -> tuple[RoutingBlock, dict[str, int]]:
    cols: dict[str, Any] = {}
    for col in _COLUMNS:
        if (col == "weights" and not with_weights) or (col == "hidden" and not with_hidden):
            continue
        f = os.path.join(folder, col + ".npy")
        if os.path.lexists(f) and (os.path.islink(f) or not os.path.isfile(f)):
            raise TraceFormatError("is a symlink or not a regular file; a trace's chunk columns are plain files", f)
        if os.path.exists(f):
            try:
                cols[col] = np.load(f, allow_pickle=False)
            except Exception as e:  # a damaged file: say which one
                raise TraceFormatError(f"cannot read chunk column: {e}", f) from None
        elif col not in _OPTIONAL:
            raise TraceFormatError(f"chunk is missing {col}.npy", folder)
    drops: dict[str, int] = {}
    dfile = os.path.join(folder, "drops.json")
    if os.path.exists(dfile):
        try:
            with open(dfile, encoding="utf-8") as f:
                drops = json.load(f)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise TraceFormatError(f"not valid JSON ({e})", dfile) from None
        if not isinstance(drops, dict) or not all(isinstance(k, str) and type(v) is int for k, v in drops.items()):
            raise TraceFormatError("drop counts are not an object of whole numbers", dfile)
    if "ids" not in cols:
        return RoutingBlock.build(np.zeros((0, meta.num_layers, meta.top_k), np.int16)), drops
    return RoutingBlock(**cols), drops


def _empty_block(meta: TraceMeta) -> RoutingBlock:
    w = np.zeros((0, meta.num_layers, meta.top_k), np.float32) if meta.has_weights else None
    return RoutingBlock.build(np.zeros((0, meta.num_layers, meta.top_k), np.int16), weights=w)


def _resolve(path: str) -> tuple[str, bool]:
    """Find the trace folder for whatever the user gave: the folder, a file in it, or PATH.partial."""
    p = os.path.abspath(path).rstrip(os.sep)
    if os.path.isfile(p) and os.path.basename(p) in (MANIFEST, PARTIAL_META):
        p = os.path.dirname(p)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, MANIFEST)):
            return p, True
        if os.path.exists(os.path.join(p, PARTIAL_META)):
            return p, False
        raise TraceFormatError(
            "not a moecache trace folder (no manifest.json or meta.json). If it holds routing logs "
            "from another tool, convert them with `moecache trace import` first", p)
    if not os.path.exists(p) and os.path.isdir(p + PARTIAL_SUFFIX):
        return _resolve(p + PARTIAL_SUFFIX)
    if os.path.exists(p) and not os.path.isfile(p):
        raise TraceFormatError("is not a folder or a regular file (a pipe, socket or device); give a trace folder", p)
    if os.path.isfile(p):
        raise TraceFormatError(
            "is a file, not a moecache trace folder. Published routing logs (JSONL, CSV, JSON) are "
            "converted with `moecache trace import FILE -o OUT`", p)
    raise FileNotFoundError(f"no trace at {p} (nor an unfinished one at {p}{PARTIAL_SUFFIX})")


def _read_header(header_file: str, finalised: bool) -> dict[str, Any]:
    """The manifest (or a partial's meta.json), type-checked: every field the reader uses, with its type;
    chunk names are plain ``chunk-NNNNNN`` names, so no chunk path leaves the trace folder."""
    if not os.path.isfile(header_file):
        raise TraceFormatError("is not a regular file", header_file)
    try:
        with open(header_file, encoding="utf-8") as f:
            header = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"not valid JSON ({e})", header_file) from None
    except RecursionError:
        raise TraceFormatError("not valid JSON (nested too deeply)", header_file) from None
    if not isinstance(header, dict):
        raise TraceFormatError(f"holds a JSON {type(header).__name__}, not an object", header_file)
    if header.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"format is {header.get('format')!r}, expected {FORMAT_NAME!r}", header_file)
    if "version" not in header:
        raise TraceFormatError("has no version; it was not written by moecache", header_file)
    version = header["version"]
    if type(version) is not int:
        raise TraceFormatError(f"version is {version!r}, not a whole number", header_file)
    if version < 1:
        raise TraceFormatError(f"version {version} is not a format version (they start at 1)", header_file)
    if version > FORMAT_VERSION:
        raise TraceFormatError(
            f"trace format version {version} is newer than this moecache reads ({FORMAT_VERSION}); upgrade moecache",
            header_file)
    if "meta" not in header:
        raise TraceFormatError("has no meta", header_file)
    if finalised:
        chunks = header.get("chunks")
        if not isinstance(chunks, list):
            raise TraceFormatError("has no chunk list (chunks)", header_file)
        seen = set()
        for i, c in enumerate(chunks):
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                raise TraceFormatError(f"chunk entry {i} is not an object with a name", header_file)
            if not _CHUNK_RE.match(c["name"]):
                raise TraceFormatError(f"chunk name {c['name'][:40]!r} is not chunk-NNNNNN (a chunk path never leaves "
                                       "the trace folder)", header_file)
            if c["name"] in seen:
                raise TraceFormatError(f"chunk {c['name']} is listed twice", header_file)
            seen.add(c["name"])
            if "rows" in c and (type(c["rows"]) is not int or c["rows"] < 0):
                raise TraceFormatError(f"chunk {c['name']} rows is {c['rows']!r}, not a count", header_file)
        rows = header.get("rows")
        if rows is not None and (type(rows) is not int or rows < 0):
            raise TraceFormatError(f"rows is {rows!r}, not a count", header_file)
        drops = header.get("drops", {})
        if not isinstance(drops, dict) or not all(type(v) is int for v in drops.values()):
            raise TraceFormatError("drops is not an object of counts", header_file)
    return header


def open_trace(path: str | os.PathLike) -> Trace:
    """Read a trace: a finalised folder, or the ``.partial`` folder a killed recording left."""
    folder, finalised = _resolve(os.fspath(path))
    header_file = os.path.join(folder, MANIFEST if finalised else PARTIAL_META)
    header = _read_header(header_file, finalised)
    meta = TraceMeta.from_json(header["meta"], header_file)
    if finalised:
        names = [c["name"] for c in header["chunks"]]
        for n in names:
            if not os.path.isdir(os.path.join(folder, n)) or os.path.islink(os.path.join(folder, n)):
                raise TraceFormatError(f"manifest lists chunk {n} but it is missing (or not a folder)", folder)
    else:  # every complete chunk folder, in order; temporary ones (".chunk-*.tmp") are ignored
        names = sorted(n for n in os.listdir(folder) if _CHUNK_RE.match(n))
    blocks, drops, kept = [], Counter(), []
    for n in names:
        b, d = _load_chunk(os.path.join(folder, n), meta, with_weights=False, with_hidden=False)
        drops.update(d)
        if len(b):
            blocks.append(b)
            kept.append(n)
    block = RoutingBlock.concat(blocks or [_empty_block(TraceMeta(**{**meta.without_hidden().to_json(),
                                                                        "weights": "absent"}))])
    if finalised and header.get("rows") is not None and len(block) != header["rows"]:
        raise TraceFormatError(f"manifest says {header['rows']} rows, chunks hold {len(block)}", folder)

    def load_column(name: str, declared: str, empty: np.ndarray) -> np.ndarray:
        """One optional per-chunk column (``weights.npy``, ``hidden.npy``) of every kept chunk, concatenated."""
        parts = []
        for n in kept:
            f = os.path.join(folder, n, name)
            if not os.path.exists(f):
                raise TraceFormatError(f"trace declares {declared} but {name} is missing", f)
            if os.path.islink(f) or not os.path.isfile(f):
                raise TraceFormatError("is a symlink or not a regular file; a trace's chunk columns are plain files", f)
            try:
                parts.append(np.load(f, allow_pickle=False))
            except Exception as e:  # a damaged file: say which one
                raise TraceFormatError(f"cannot read chunk column: {e}", f) from None
        if not parts:
            return empty
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def load_weights() -> np.ndarray:
        return load_column("weights.npy", f"weights={meta.weights!r}",
                           np.zeros((0, meta.num_layers, meta.top_k), np.float32))

    def load_hidden() -> np.ndarray:
        return load_column("hidden.npy", f"hidden_size={meta.hidden_size}",
                           np.zeros((0, meta.num_layers, meta.hidden_size), HIDDEN_DTYPE))

    return Trace(meta, block, drops=dict(drops), path=folder, finalised=finalised,
                 weights_loader=load_weights if meta.has_weights else None,
                 hidden_loader=load_hidden if meta.hidden_size else None)


def finalise_partial(path: str | os.PathLike) -> str:
    """Turn the ``PATH.partial`` folder a killed recording left into a finalised trace ``PATH``.

    Idempotent (a finished trace, or ``PATH`` of one already finalised, is returned as it is) and atomic
    (the manifest is written inside the partial folder, then one rename makes it ``PATH``; a crash between
    the two is completed by the next call). Refused while a recording still holds the folder's lock.
    """
    given = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    folder, finalised = _resolve(given)
    if finalised and not folder.endswith(PARTIAL_SUFFIX):
        return folder
    target = folder[: -len(PARTIAL_SUFFIX)] if folder.endswith(PARTIAL_SUFFIX) else folder + ".trace"
    if os.path.lexists(target):
        raise FileExistsError(f"{target} exists; move it away before finalising {folder}")
    lock = FolderLock(folder)
    if not lock.acquire():
        raise FileExistsError(f"{folder} is being written by a running recording ({lock.holder()}); finalise it "
                              "once that recording has stopped")
    try:
        if not finalised:  # else: a previous finalise wrote the manifest and stopped before the rename
            trace = open_trace(folder)
            names = sorted(n for n in os.listdir(folder) if _CHUNK_RE.match(n))
            chunks = [{"name": n, "rows": len(_load_chunk(os.path.join(folder, n), trace.meta)[0])} for n in names]
            manifest = {"format": FORMAT_NAME, "version": format_version_of(trace.meta), "meta": trace.meta.to_json(),
                        "chunks": chunks, "rows": len(trace), "drops": dict(sorted(trace.drops.items()))}
            write_json_atomic(os.path.join(folder, MANIFEST), manifest)
        os.rename(folder, target)
        lock.moved(target)
        fsync_dir(os.path.dirname(target))
    finally:
        lock.release(unlink=True)
    return target


def count_ids(trace: Trace) -> np.ndarray:
    """Accesses per (layer, expert): shape ``(layers, experts)``, missing and dropped slots excluded."""
    ids = trace.ids
    C = extension()
    if C is not None:  # C++ twin of the loop below (differential test: tests/test_trace_store.py)
        import torch
        return C.count_experts(torch.from_numpy(np.ascontiguousarray(ids)), trace.meta.num_experts).numpy()
    out = np.zeros((trace.num_layers, trace.meta.num_experts), np.int64)
    for l in range(trace.num_layers):
        x = ids[:, l, :].ravel()
        out[l] = np.bincount(x[x >= 0], minlength=trace.meta.num_experts)
    return out


__all__ = ["Trace", "TraceWriter", "open_trace", "write_trace", "finalise_partial", "count_ids",
           "ID_MISSING", "ID_DROPPED"]
