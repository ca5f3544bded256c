"""What every importer shares: the format interface, the sequence record, and the defect counter.

An importer turns one source file into ``SourceSequence`` records (a ``RoutingBlock`` plus where
it came from); the driver in ``__init__`` numbers the sequences, drops duplicates and writes one
trace per group of files. Nothing is dropped silently: every record left out (or a slot left
missing) is counted per reason in a ``Defects`` object, which becomes the trace's drop counts.

Reasons are strings. ``malformed:<what>`` counts source records skipped because they could not be
read (only with ``lenient=True``; otherwise the first one raises ``TraceFormatError`` naming file
and 1-based line). A few file-level reasons count files rather than records; their names end in
``_files`` so the unit is visible in ``moecache trace info``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator

import numpy as np

from ...errors import TraceFormatError
from ...registry import Registry
from ..schema import PHASE_PREFILL, RoutingBlock, TraceMeta

#: Bytes read from the start of a file to detect its format.
SNIFF_BYTES = 4096


class Defects:
    """Counts defects per reason; raises on the first malformed record unless ``lenient``."""

    def __init__(self, lenient: bool = False):
        self.lenient = lenient
        self.counts: Counter[str] = Counter()
        self.skipped_files: list[tuple[str, str]] = []

    def malformed(self, what: str, message: str, path: str | None = None, line: int | None = None) -> None:
        """Report one unreadable record: raise, or (lenient) count it as ``malformed:<what>``."""
        if not self.lenient:
            raise TraceFormatError(message + " (--lenient skips such records and counts them)", path, line)
        self.counts["malformed:" + what] += 1

    def skip_file(self, what: str, error: TraceFormatError) -> None:
        """A whole file cannot be read: re-raise ``error``, or (lenient) count it as
        ``malformed:<what>_files`` and remember why."""
        if not self.lenient:
            raise error
        self.counts[f"malformed:{what}_files"] += 1
        self.skipped_files.append((error.path or "?", str(error)))

    def add(self, reason: str, count: int) -> None:
        if count:
            self.counts[reason] += int(count)

    def merge(self, other: "Defects") -> None:
        self.counts.update(other.counts)
        self.skipped_files.extend(other.skipped_files)


@dataclass(eq=False)  # compared by identity: blocks are arrays
class SourceSequence:
    """One request / prompt / problem read from a source file.

    ``block.seq`` is filled in by the driver. ``key`` identifies the request across files (for
    duplicate detection; ``None`` = no identity beyond the file). ``records`` is the number of source
    records (lines, rows, steps) the sequence was built from, used when a duplicate is dropped.
    """

    block: RoutingBlock
    file: str
    label: str
    records: int
    key: Hashable | None = None
    token_text: list[str | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: defects that belong to this sequence (e.g. ``missing_layer_records``): they go into the trace's
    #: drop counts only if the sequence is kept (a dropped duplicate takes its counts with it)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def has_prefill(self) -> bool:
        return bool((self.block.phase == PHASE_PREFILL).any())


class SourceFormat:
    """A published routing-log format. Subclasses fill in the hooks below; see ``__init__``.

    ``name`` is the registry key; ``has_token_text`` whether sequences carry token strings.
    Detection is by content (``sniff``), never by file name.
    """

    name: str = ""
    has_token_text: bool = False

    def sniff(self, head: bytes, path: str) -> bool:
        """True if a file that starts with ``head`` is in this format."""
        raise NotImplementedError

    def groups(self, files: list[str], defects: Defects) -> list[tuple[str | None, list[str]]]:
        """Split the files into output traces: ``[(name or None, files)]``. Default: one trace."""
        return [(None, list(files))]

    def read(self, path: str, defects: Defects) -> Iterator[SourceSequence]:
        """Yield the sequences of one file, in file order."""
        raise NotImplementedError

    def meta(self, group: str | None, sequences: list[SourceSequence], files: list[str]) -> TraceMeta:
        """The trace metadata for one group, after its sequences are read."""
        raise NotImplementedError

    def same_request(self, a: SourceSequence, b: SourceSequence) -> bool:
        """Whether two sequences with the same ``key`` are logs of the same run (duplicates).

        The default says no, so two sequences claiming the same identity are an error.
        """
        return False

    def prefer(self, a: SourceSequence, b: SourceSequence) -> SourceSequence:
        """Which of two duplicates to keep (``a`` came first). Default: the first."""
        return a


FORMATS: Registry[SourceFormat] = Registry("trace format")


@dataclass(frozen=True)
class ModelInfo:
    """The public shape of a model a source was recorded from: what its logs cannot tell us."""

    model: str
    family: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    #: 3 matrices (gate, up, down) of hidden x expert_intermediate in bf16, from the public config.
    bytes_per_expert: int | None
    note: str = ""

    def trace_meta(self, *, source: str, files: list[str], weights: str, id_order: str,
                   moe_layers: list[int] | None = None, extra: dict[str, Any] | None = None) -> TraceMeta:
        """The trace metadata: this model's shape plus what the importer measured."""
        ex = dict(extra or {})
        if self.note:
            ex.setdefault("notes", []).append(self.note)
        return TraceMeta(num_experts=self.num_experts, top_k=self.top_k,
                         moe_layers=list(moe_layers if moe_layers is not None else self.moe_layers),
                         model=self.model, family=self.family, bytes_per_expert=self.bytes_per_expert,
                         source=source, id_order=id_order, weights=weights, files=list(files), extra=ex)


def swiglu_bf16_bytes(hidden: int, intermediate: int) -> int:
    """Bytes of one SwiGLU expert (gate, up, down: 3 * hidden * intermediate) in bf16."""
    return 3 * hidden * intermediate * 2


# -- helpers shared by the readers -------------------------------------------------------------------

_NUM_RE = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key that orders digit runs numerically: ``prompt_2`` before ``prompt_10``."""
    parts = _NUM_RE.split(name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def line_of_offset(data: bytes | str, offset: int) -> int:
    """1-based line number of ``offset`` in ``data``."""
    nl = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(nl, 0, offset) + 1  # type: ignore[arg-type]


def is_int(x: Any) -> bool:
    """A JSON integer (``bool`` is an ``int`` subclass in Python but not an expert id)."""
    return type(x) is int


def is_prob(x: Any) -> bool:
    """A JSON number that is a probability: finite and in [0, 1]."""
    return (type(x) is float or type(x) is int) and math.isfinite(x) and 0.0 <= x <= 1.0


def check_ids(ids: Any, top_k: int, num_experts: int) -> str | None:
    """Why ``ids`` is not a list of ``top_k`` distinct expert ids, or None if it is.

    The answer is the ``<what>`` of a ``malformed:<what>`` reason.
    """
    if type(ids) is not list:
        return "ids_type"
    if len(ids) != top_k:
        return "top_k"
    for e in ids:
        if not is_int(e):
            return "ids_type"
        if not 0 <= e < num_experts:
            return "expert_id"
    if len(set(ids)) != top_k:
        return "duplicate_expert"
    return None


def check_weights(w: Any, top_k: int) -> str | None:
    """Why ``w`` is not a list of ``top_k`` probabilities, or None if it is."""
    if type(w) is not list or len(w) != top_k or not all(is_prob(x) for x in w):
        return "weights"
    return None


def id_order_from_weights(weights: np.ndarray | None, declared: str) -> str:
    """``"score"`` if every present row's weights are non-increasing, else ``"router"``.

    Measured rather than taken on trust: a source that claims highest-first but has one row out of
    order gets ``"router"``. Without weights the format's ``declared`` order stands.
    """
    if weights is None or weights.shape[-1] < 2:
        return declared
    w = weights.reshape(-1, weights.shape[-1])
    w = w[~np.isnan(w).any(axis=1)]
    if len(w) == 0:
        return declared
    return "score" if bool((np.diff(w, axis=1) <= 0).all()) else "router"


def read_head(path: str, n: int = SNIFF_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def first_json_line(head: bytes) -> dict | None:
    """The first line of ``head`` as a JSON object, or None if it is not one."""
    line = head.split(b"\n", 1)[0]
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def display_path(path: str) -> str:
    """How a source file is named in metadata: as given, normalised."""
    return os.path.normpath(path)


def missing_records(ids: np.ndarray) -> int:
    """Number of (token, layer) records absent from a block (all of their top-k slots are -1)."""
    return int((ids < 0).all(axis=2).sum())
