"""Local routing consistency, after "Not All Models Suit Expert Offloading" (arXiv 2505.16056).

Each sequence is cut into consecutive segments of ``s`` tokens, starting at its first token; a
tail shorter than ``s`` is left out (and counted in ``tail_tokens``). For one layer and one
segment, the best fixed set of ``m`` experts is the ``m`` experts the segment uses most (no other
set of ``m`` covers more of its accesses), and its coverage is::

    coverage_l(s, m) = sum over segments of (accesses of the segment's m most used experts)
                       / sum over segments of (accesses of the segment)

i.e. the share of the layer's accesses (in full segments) that a per-segment oracle cache of
``m`` experts, reloaded between segments, would serve. The figure for all layers pools every
layer's segments the same way. ``s = inf`` (one segment per whole trace) is the baseline: the
best *static* set of ``m`` experts; the gap between the two is what locality adds. Ties between
equally used experts do not change the coverage.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .access import Accesses

DEFAULT_SEGMENTS = (4, 8, 16, 32, 64, 128)


def default_sizes(top_k: int, num_experts: int) -> list[int]:
    """``m`` values to report: 1, 2, 3 and 4 times top_k, capped at the expert count (deduplicated)."""
    return sorted({min(num_experts, f * top_k) for f in (1, 2, 3, 4)})


def coverage(acc: Accesses, segments: Sequence[int] = DEFAULT_SEGMENTS,
             sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """``cov[s_index, m_index, layer]`` and pooled ``mean[s_index, m_index]``; last s row is the static baseline."""
    L, E = acc.num_layers, acc.num_experts
    ms = [int(m) for m in (sizes or default_sizes(acc.top_k, E))]
    ss = [int(s) for s in segments]
    pos = acc.pos_in_seq[acc.token]
    seq = acc.seq_index[acc.token]
    slen = acc.seq_len[seq]
    cov = np.full((len(ss) + 1, len(ms), L), np.nan)
    mean = np.full((len(ss) + 1, len(ms)), np.nan)
    n_segments = []
    tail = []
    order = np.argsort(acc.layer, kind="stable")
    cuts = np.searchsorted(acc.layer[order], np.arange(L + 1))
    by_layer = [order[cuts[l]:cuts[l + 1]] for l in range(L)]
    for i, s in enumerate(ss + [None]):
        if s is None:  # the static baseline: one segment for the whole trace
            seg = np.zeros(acc.n_access, np.int64)
            keep = np.ones(acc.n_access, bool)
            nseg = 1
            tail.append(0)
        else:
            full = (slen // s) * s  # tokens of each sequence inside full segments
            keep = pos < full
            seg_in_seq = pos // s
            offset = np.concatenate([[0], np.cumsum(acc.seq_len // s)])  # segment ids per sequence
            seg = offset[seq] + seg_in_seq
            nseg = int(offset[-1])
            tail.append(int((acc.seq_len - (acc.seq_len // s) * s).sum()))
        n_segments.append(nseg)
        if nseg == 0 or not keep.any():
            continue
        got = np.zeros((len(ms), L), np.int64)
        tot = np.zeros(L, np.int64)
        for l, sel in enumerate(by_layer):  # one layer at a time keeps the table (segments, experts) small
            k_ = keep[sel]
            c = np.bincount(seg[sel][k_] * E + acc.expert[sel][k_], minlength=nseg * E).reshape(nseg, E)
            cum = np.cumsum(-np.sort(-c, axis=1), axis=1)  # accesses of the best m experts, m = 1..E
            tot[l] = cum[:, -1].sum()
            for j, m in enumerate(ms):
                got[j, l] = cum[:, m - 1].sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            cov[i] = np.where(tot > 0, got / np.maximum(tot, 1), np.nan)
        if tot.sum():
            mean[i] = got.sum(axis=1) / tot.sum()
    return {"segments": ss, "sizes": ms, "cov": cov, "mean": mean, "n_segments": n_segments,
            "tail_tokens": tail}
