"""The routing-trace data model: one metadata record and one columnar block type.

Every reader (our own store, each importer, the recorder) produces ``RoutingBlock`` objects;
nothing downstream knows where they came from. Unknown values are marked, never zero-filled:

* per token: ``pos``, ``token``, ``step`` use ``-1`` for unknown, ``phase`` uses ``PHASE_UNKNOWN``;
* per (token, layer, k): ``ids`` uses ``ID_MISSING`` (-1) where the source has no record for
  that layer, ``ID_DROPPED`` (-2) where the router dropped the token (capacity limits);
* ``weights`` is ``None`` when the source has no gate weights at all, and NaN where a record is
  missing;
* ``hidden`` (format version 2, optional) is ``None`` unless the trace was recorded with hidden
  states (``moecache.record(..., hidden_states=True)``): per (token, layer) the input of the MoE
  block (after the layer's pre-MoE norm: what the router reads), float16 ``(tokens, layers,
  hidden_size)``, NaN where a record is missing. ``TraceMeta.hidden_size`` declares it (None: absent).
  Traces without hidden states are written as version 1, byte for byte as before, so older readers
  keep reading them; a version-1 trace reads as one without hidden states.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import TraceFormatError

FORMAT_NAME = "moecache-trace"
FORMAT_VERSION = 2
#: The version a trace is written with: 1 unless it carries hidden states (the version-2 addition).
def format_version_of(meta: "TraceMeta") -> int:
    return 2 if meta.hidden_size else 1


HIDDEN_DTYPE = np.float16

PHASE_UNKNOWN = -1
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASE_NAMES = {PHASE_UNKNOWN: "unknown", PHASE_PREFILL: "prefill", PHASE_DECODE: "decode"}

ID_MISSING = -1
ID_DROPPED = -2
UNKNOWN = -1

#: What the order of the top-k ids in a row means.
ID_ORDERS = {
    "score": "by descending gate score",
    "router": "as the router returned them (not guaranteed sorted)",
    "unknown": "not known",
}
#: What the gate weights mean.
WEIGHT_KINDS = {
    "renormalized": "top-k probabilities renormalised to sum to 1",
    "softmax": "raw softmax probabilities over all experts (top-k do not sum to 1)",
    "scaled": "the weights the experts were multiplied by, after the model's own scaling",
    "sigmoid": "sigmoid router scores (not normalised)",
    "absent": "the source has no gate weights",
}

#: Largest expert count and MoE layer count a trace may declare (larger ones are damage, not models).
MAX_EXPERTS = 1 << 16
MAX_LAYERS = 4096
#: Per-token columns and their on-disk dtypes.
TOKEN_COLUMNS = {"seq": np.int64, "pos": np.int32, "token": np.int32, "step": np.int64, "phase": np.int8}


def ids_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.int16) if num_experts < 2**15 else np.dtype(np.int32)


@dataclass
class TraceMeta:
    """What a trace describes. ``moe_layers[i]`` is the model layer index of trace MoE layer ``i``."""

    num_experts: int
    top_k: int
    moe_layers: list[int]
    model: str = "unknown"
    family: str = "unknown"
    bytes_per_expert: int | None = None
    source: str = ""
    id_order: str = "unknown"
    weights: str = "absent"
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    hidden_size: int | None = None  # per-(token, layer) hidden states of this width are stored (version 2)

    def __post_init__(self) -> None:
        self.moe_layers = [int(x) for x in self.moe_layers]
        if self.num_experts < 1:
            raise TraceFormatError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TraceFormatError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if not self.moe_layers:
            raise TraceFormatError("a trace needs at least one MoE layer (moe_layers is empty)")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise TraceFormatError(f"moe_layers has duplicates: {self.moe_layers}")
        if self.id_order not in ID_ORDERS:
            raise TraceFormatError(f"id_order {self.id_order!r} is not one of {sorted(ID_ORDERS)}")
        if self.weights not in WEIGHT_KINDS:
            raise TraceFormatError(f"weights {self.weights!r} is not one of {sorted(WEIGHT_KINDS)}")
        if self.hidden_size is not None:
            self.hidden_size = int(self.hidden_size)
            if self.hidden_size < 1:
                raise TraceFormatError(f"hidden_size must be >= 1 (or null: no hidden states), got {self.hidden_size}")

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def has_weights(self) -> bool:
        return self.weights != "absent"

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["hidden_size"] is None:  # a version-1 trace's metadata, unchanged
            del out["hidden_size"]
        return out

    def without_hidden(self) -> "TraceMeta":
        return dataclasses.replace(self, hidden_size=None)

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str | None = None) -> "TraceMeta":
        if not isinstance(obj, dict):
            raise TraceFormatError(f"metadata is a {type(obj).__name__}, not an object", path)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise TraceFormatError(f"unknown metadata keys {unknown}", path)
        missing = [n for n in ("num_experts", "top_k", "moe_layers") if n not in obj]
        if missing:
            raise TraceFormatError(f"metadata lacks {', '.join(missing)}", path)

        def whole(x: Any) -> bool:
            return type(x) is int

        checks = {
            "num_experts": (lambda x: whole(x) and 1 <= x <= MAX_EXPERTS, f"a whole number in 1..{MAX_EXPERTS}"),
            "top_k": (whole, "a whole number"),
            "moe_layers": (lambda x: isinstance(x, list) and 0 < len(x) <= MAX_LAYERS and all(whole(v) and v >= 0
                                                                                            for v in x),
                           f"a list of 1..{MAX_LAYERS} layer numbers >= 0"),
            "model": (lambda x: isinstance(x, str), "a string"), "family": (lambda x: isinstance(x, str), "a string"),
            "source": (lambda x: isinstance(x, str), "a string"),
            "id_order": (lambda x: isinstance(x, str), "a string"), "weights": (lambda x: isinstance(x, str), "a string"),
            "bytes_per_expert": (lambda x: x is None or (whole(x) and x >= 0), "a whole number or null"),
            "hidden_size": (lambda x: x is None or (whole(x) and 1 <= x <= 1 << 20), "a whole number >= 1 or null"),
            "files": (lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x), "a list of strings"),
            "extra": (lambda x: isinstance(x, dict), "an object"),
        }
        for key, (ok, want) in checks.items():
            if key in obj and not ok(obj[key]):
                shown = repr(obj[key])
                raise TraceFormatError(f"metadata {key} is {shown[:40]}{'...' if len(shown) > 40 else ''}, not {want}",
                                       path)
        try:
            return cls(**obj)
        except TypeError as e:
            raise TraceFormatError(f"bad trace metadata: {e}", path) from None


@dataclass
class RoutingBlock:
    """Routing of ``n`` tokens at every MoE layer of a trace, columnar.

    ``ids`` has shape ``(n, layers, top_k)``; ``weights`` the same or ``None``.
    """

    seq: np.ndarray
    pos: np.ndarray
    token: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    ids: np.ndarray
    weights: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def build(
        cls,
        ids: np.ndarray | Sequence,
        *,
        seq: np.ndarray | Sequence | int = 0,
        pos: np.ndarray | Sequence | int | None = None,
        token: np.ndarray | Sequence | int | None = None,
        step: np.ndarray | Sequence | int | None = None,
        phase: np.ndarray | Sequence | int | None = None,
        weights: np.ndarray | Sequence | None = None,
        hidden: np.ndarray | None = None,
    ) -> "RoutingBlock":
        """Make a block, broadcasting scalars and marking columns left out as unknown."""
        ids = np.asarray(ids)
        if ids.ndim != 3:
            raise TraceFormatError(f"ids must have shape (tokens, layers, top_k), got {ids.shape}")
        n = ids.shape[0]

        def col(x, name):
            dtype = TOKEN_COLUMNS[name]
            if x is None:
                return np.full(n, UNKNOWN, dtype)
            a = np.asarray(x)
            if a.ndim == 0:
                return np.full(n, a, dtype)
            return a.astype(dtype, copy=False)

        w = None if weights is None else np.asarray(weights, dtype=np.float32)
        h = None if hidden is None else np.asarray(hidden, dtype=HIDDEN_DTYPE)
        return cls(col(seq, "seq"), col(pos, "pos"), col(token, "token"), col(step, "step"),
                   col(phase, "phase"), ids, w, h)

    def validate(self, meta: TraceMeta, where: str | None = None) -> "RoutingBlock":
        """Check shapes, dtypes and ranges against ``meta``; return the block with canonical dtypes."""
        n = len(self)
        want = (n, meta.num_layers, meta.top_k)
        if self.ids.shape != want:
            raise TraceFormatError(f"ids shape {self.ids.shape} does not match (tokens, layers, top_k) = {want}", where)
        if not np.issubdtype(self.ids.dtype, np.integer):
            raise TraceFormatError(f"ids must be integers, got {self.ids.dtype}", where)
        for name in TOKEN_COLUMNS:
            a = getattr(self, name)
            if a.shape != (n,):
                raise TraceFormatError(f"column {name!r} has shape {a.shape}, expected ({n},)", where)
        if n:
            lo, hi = int(self.ids.min()), int(self.ids.max())
            if lo < ID_DROPPED or hi >= meta.num_experts:
                bad = self.ids[(self.ids < ID_DROPPED) | (self.ids >= meta.num_experts)].ravel()[0]
                raise TraceFormatError(
                    f"expert id {int(bad)} out of range: the trace declares {meta.num_experts} experts "
                    f"(valid ids 0..{meta.num_experts - 1}, -1 missing, -2 dropped)", where)
            bad_phase = ~np.isin(self.phase, list(PHASE_NAMES))
            if bad_phase.any():
                raise TraceFormatError(f"phase value {int(self.phase[bad_phase][0])} is not one of {sorted(PHASE_NAMES)}", where)
        if meta.has_weights:
            if self.weights is None:
                raise TraceFormatError(f"the trace declares weights={meta.weights!r} but a block has none", where)
            if self.weights.shape != want:
                raise TraceFormatError(f"weights shape {self.weights.shape} does not match {want}", where)
        elif self.weights is not None:
            raise TraceFormatError("the trace declares weights='absent' but a block carries weights", where)
        if meta.hidden_size:
            hwant = (n, meta.num_layers, meta.hidden_size)
            if self.hidden is None:
                raise TraceFormatError(f"the trace declares hidden_size={meta.hidden_size} but a block has no hidden "
                                       "states", where)
            if self.hidden.shape != hwant:
                raise TraceFormatError(f"hidden shape {self.hidden.shape} does not match (tokens, layers, hidden_size) "
                                       f"= {hwant}", where)
        elif self.hidden is not None:
            raise TraceFormatError("a block carries hidden states but the trace declares none (hidden_size is null)",
                                   where)
        return RoutingBlock(
            *(getattr(self, c).astype(TOKEN_COLUMNS[c], copy=False) for c in TOKEN_COLUMNS),
            ids=self.ids.astype(ids_dtype(meta.num_experts), copy=False),
            weights=None if self.weights is None else self.weights.astype(np.float32, copy=False),
            hidden=None if self.hidden is None else self.hidden.astype(HIDDEN_DTYPE, copy=False),
        )

    @staticmethod
    def concat(blocks: Sequence["RoutingBlock"]) -> "RoutingBlock":
        if not blocks:
            raise ValueError("no blocks to concatenate")
        if len(blocks) == 1:
            return blocks[0]
        has_w = blocks[0].weights is not None
        has_h = blocks[0].hidden is not None
        return RoutingBlock(
            *(np.concatenate([getattr(b, c) for b in blocks]) for c in TOKEN_COLUMNS),
            ids=np.concatenate([b.ids for b in blocks]),
            weights=np.concatenate([b.weights for b in blocks]) if has_w else None,
            hidden=np.concatenate([b.hidden for b in blocks]) if has_h else None,
        )

    def take(self, index: np.ndarray | slice) -> "RoutingBlock":
        return RoutingBlock(
            *(getattr(self, c)[index] for c in TOKEN_COLUMNS),
            ids=self.ids[index],
            weights=None if self.weights is None else self.weights[index],
            hidden=None if self.hidden is None else self.hidden[index],
        )
