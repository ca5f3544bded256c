"""The expert-access stream of a trace: the one record type every analysis reads.

A trace's ``ids`` ``(tokens, layers, top_k)`` become a flat stream of accesses in the order a
runtime fetches experts: token by token in recorded order, MoE layer by layer inside a token, and
inside one (token, layer) *row* by ascending expert id (the order in which the simulator touches a
step's experts; a row's experts are needed together, so their order inside the row carries no
information). One access is one ``(token, layer, expert)``. Slots that are missing (-1) or dropped
(-2) are no accesses; an expert listed twice in one row is one access (the second listing is
counted in ``duplicate_slots`` so that nothing disappears unseen).

Token order is the simulator's replay order (``moecache.sim.schedule.replay_order``): sequences one
after another in order of first appearance, each sequence's rows in recorded order. For a trace
whose sequences are contiguous this is the recorded order; an interleaved (batched) log is
replayed request by request. ``trace_row`` maps each token back to its row in the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TraceFormatError


@dataclass
class Accesses:
    """The flat access stream of one trace plus the per-token facts the metrics need.

    Per access (length ``n_access``): ``token`` (index in replay order), ``layer``, ``expert``.
    Per token (length ``n_tokens``): ``seq_index`` (0-based index of its sequence in order of first
    appearance), ``pos_in_seq`` (0-based position among its sequence's rows), ``phase``.
    ``rows`` is the de-duplicated id array ``(tokens, layers, top_k)`` with -1 wherever a slot is no
    access, the form the vectorised metrics use.
    """

    num_layers: int
    num_experts: int
    top_k: int
    trace_row: np.ndarray
    token: np.ndarray
    layer: np.ndarray
    expert: np.ndarray
    rows: np.ndarray
    seq_index: np.ndarray
    pos_in_seq: np.ndarray
    seq_len: np.ndarray
    phase: np.ndarray
    duplicate_slots: int
    dropped_slots: int
    missing_slots: int

    @property
    def n_access(self) -> int:
        return int(self.token.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def n_sequences(self) -> int:
        return int(self.seq_len.shape[0])

    @property
    def item(self) -> np.ndarray:
        """Global item id of each access, ``layer * num_experts + expert`` (one shared cache)."""
        return self.layer.astype(np.int64) * self.num_experts + self.expert

    def seq_end(self) -> np.ndarray:
        """Per token: how many later tokens its own sequence still has (0 for a sequence's last row)."""
        return self.seq_len[self.seq_index] - 1 - self.pos_in_seq


def canonical_rows(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Sort every (token, layer) row ascending with its accesses first, drop repeats; return rows, repeats.

    Valid ids (>= 0) come first in ascending order, then -1 for every slot that is no access
    (missing, dropped, or a repeat of an id already in the row). The count of repeats is returned.
    """
    big = np.int32(np.iinfo(np.int32).max)  # a numpy scalar: a bare int would be cast to ids' dtype
    ids32 = np.asarray(ids).astype(np.int32)
    out = np.sort(np.where(ids32 >= 0, ids32, big), axis=-1)
    rep = np.zeros(out.shape, bool)
    rep[..., 1:] = (out[..., 1:] == out[..., :-1]) & (out[..., 1:] != big)
    dup = int(rep.sum())
    out[rep] = big
    out = np.sort(out, axis=-1)  # repeats move behind the row's accesses
    out[out == big] = -1
    return out, dup


def accesses(trace) -> Accesses:
    """Build the access stream of a ``moecache.trace.Trace``."""
    meta = trace.meta
    raw = np.asarray(trace.ids)
    if raw.ndim != 3 or raw.shape[1:] != (meta.num_layers, meta.top_k):
        raise TraceFormatError(f"ids shape {raw.shape} does not match (tokens, {meta.num_layers}, {meta.top_k})",
                               trace.path)
    dropped = int((raw == -2).sum())
    missing = int((raw == -1).sum())
    seq = np.asarray(trace.seq)
    n = raw.shape[0]
    if n:
        _, first, inv = np.unique(seq, return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        seq_rank = rank[inv.ravel()]
        order = np.argsort(seq_rank, kind="stable")  # replay order: sequence by sequence
        seq_index = seq_rank[order]
        seq_len = np.bincount(seq_index, minlength=len(first)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(seq_len)[:-1]])
        pos_in_seq = np.arange(n) - np.repeat(starts, seq_len)
    else:
        order = np.zeros(0, np.int64)
        seq_index = np.zeros(0, np.int64)
        seq_len = np.zeros(0, np.int64)
        pos_in_seq = np.zeros(0, np.int64)
    rows, dup = canonical_rows(raw[order])
    t, l, _ = np.nonzero(rows >= 0)  # C order: token-major, then layer, then ascending id
    expert = rows[rows >= 0]
    return Accesses(
        num_layers=meta.num_layers, num_experts=meta.num_experts, top_k=meta.top_k, trace_row=order,
        token=t.astype(np.int64), layer=l.astype(np.int32), expert=expert.astype(np.int32), rows=rows,
        seq_index=seq_index, pos_in_seq=pos_in_seq, seq_len=seq_len, phase=np.asarray(trace.phase)[order],
        duplicate_slots=dup, dropped_slots=dropped, missing_slots=missing,
    )
