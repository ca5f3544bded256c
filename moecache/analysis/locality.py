"""Temporal locality: how soon an expert is used again by the same request.

For an access of expert ``e`` at layer ``l`` by token ``t`` of sequence ``s``, its *reuse gap* is
``g = t' - t`` where ``t'`` is the next token of ``s`` (positions inside the sequence) that uses ``e``
at ``l``; no such token gives ``g = inf``. For a window ``w``::

    P_l(reuse within w) = #{accesses at l with g <= w and at least w later tokens in s}
                          / #{accesses at l with at least w later tokens in s}

Accesses too close to their sequence's end to see ``w`` more tokens are left out of both counts
(otherwise short windows at sequence ends would read as "not reused"); the count of accesses
scored is reported with every figure. ``w = 1`` is the chance that the next token reuses the
expert. Reuse *distances* (distinct experts in between, the LRU stack distance) are in
``stackdist``; this module counts tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .access import Accesses

DEFAULT_WINDOWS = (1, 2, 4, 8, 16, 32, 64)


def reuse_gaps(acc: Accesses) -> np.ndarray:
    """Per access: tokens until the same sequence uses the same expert at the same layer (inf if never)."""
    pos = acc.pos_in_seq[acc.token]
    seq = acc.seq_index[acc.token]
    # one int64 sort key (sequence, layer, expert, position): a single argsort instead of a lexsort
    P = int(acc.seq_len.max()) + 1 if acc.n_sequences else 1
    key = ((seq * acc.num_layers + acc.layer) * acc.num_experts + acc.expert) * P + pos
    order = np.argsort(key, kind="stable")
    gap = np.full(acc.n_access, np.inf)
    if acc.n_access > 1:
        ks = key[order] // P  # (sequence, layer, expert) of each sorted access
        a, b = order[:-1], order[1:]
        same = ks[1:] == ks[:-1]
        gap[a[same]] = (pos[b] - pos[a])[same]
    return gap


def temporal_locality(acc: Accesses, windows: Sequence[int] = DEFAULT_WINDOWS,
                      gaps: np.ndarray | None = None) -> dict[str, Any]:
    """``prob[w_index, layer]``, ``scored[w_index, layer]`` and the access-weighted mean per window."""
    g = reuse_gaps(acc) if gaps is None else gaps
    remaining = acc.seq_end()[acc.token]
    L = acc.num_layers
    ws = [int(w) for w in windows]
    prob = np.full((len(ws), L), np.nan)
    scored = np.zeros((len(ws), L), np.int64)
    mean = np.full(len(ws), np.nan)
    for i, w in enumerate(ws):
        ok = remaining >= w
        n = np.bincount(acc.layer[ok], minlength=L)
        hit = np.bincount(acc.layer[ok & (g <= w)], minlength=L)
        scored[i] = n
        with np.errstate(invalid="ignore", divide="ignore"):
            prob[i] = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
        if n.sum():
            mean[i] = hit.sum() / n.sum()
    return {"windows": ws, "prob": prob, "scored": scored, "mean": mean}
