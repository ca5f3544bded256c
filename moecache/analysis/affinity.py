"""Cross-layer affinity: how much a token's experts at MoE layer ``l`` say about its experts at ``l + d``.

For a pair of layers ``(l, l + d)`` and the tokens that have a record at both, with ``S_l`` the set
of experts a token chose at ``l``:

* joint counts ``C[a, b] = #{tokens: a in S_l and b in S_{l+d}}``;
* conditional probability ``P(b at l+d | a at l) = C[a, b] / n_a`` with ``n_a = #{tokens: a in S_l}``
  (in [0, 1]; a row sums to the mean number of experts chosen at ``l + d``, i.e. ``top_k``);
* mutual information of the pair distribution ``P(a, b) = C[a, b] / sum C`` (a token's ``k x k``
  expert pairs, each weighted equally): ``I = sum P(a, b) log2(P(a, b) / (P(a) P(b)))`` bits, with
  ``P(a)``, ``P(b)`` its marginals; normalised by ``min(H(A), H(B))`` (0 = independent, 1 = one
  layer's expert determines the other's);
* ``I_shuffled``: the same after pairing each token's ``l`` experts with the ``l + d`` experts of
  another token of the same trace (a fixed random permutation, seed 0). Finite samples bias MI
  upward; ``I - I_shuffled`` is the part no independent routing with the same marginals gives;
* predictability: ``top1_cond = sum_a n_a max_b P(b | a) / sum_a n_a`` against ``top1_prior =
  max_b P(b at l+d)``, the chance that the single most likely expert (given one observed expert,
  or given nothing) is chosen.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .access import Accesses

DEFAULT_DEPTHS = (1, 2, 3)
#: Entropies (bits) below this are rounding noise of a distribution with a single value.
_ENTROPY_EPS = 1e-12


def pair_stats(C: np.ndarray) -> dict[str, float]:
    """MI (bits), normalised MI and the marginal entropies of the pair distribution ``C / sum C``."""
    tot = float(C.sum())
    if tot <= 0:
        return {"mi": float("nan"), "nmi": float("nan"), "h_a": float("nan"), "h_b": float("nan")}
    P = C / tot
    pa, pb = P.sum(axis=1), P.sum(axis=0)
    nz = P > 0
    denom = np.outer(pa, pb)
    mi = float((P[nz] * np.log2(P[nz] / denom[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log2(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log2(pb[pb > 0])).sum())
    h = min(ha, hb)
    # A side with one value has zero entropy; rounding can leave ~1e-16 bits (and MI of the same
    # size), whose ratio is noise: NMI is undefined there. Elsewhere MI <= min(H_a, H_b) up to rounding.
    nmi = min(max(mi, 0.0) / h, 1.0) if h > _ENTROPY_EPS else float("nan")
    return {"mi": max(mi, 0.0), "nmi": nmi, "h_a": ha, "h_b": hb}


def conditional(C: np.ndarray, n_a: np.ndarray) -> np.ndarray:
    """``P(b | a) = C[a, b] / n_a`` (rows with ``n_a = 0`` are NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_a[:, None] > 0, C / np.maximum(n_a, 1)[:, None], np.nan)


def affinity(acc: Accesses, depths: Sequence[int] = DEFAULT_DEPTHS, keep_matrices: Sequence[tuple[int, int]] = (),
             seed: int = 0) -> dict[str, Any]:
    """Figures for every layer pair ``(l, l + d)``; ``cond`` matrices for the pairs in ``keep_matrices``.

    Returns arrays indexed ``[depth_index, l]`` (NaN where ``l + d`` is past the last layer).
    """
    rows = acc.rows
    T, L, _ = rows.shape
    E = acc.num_experts
    ds = [int(d) for d in depths if 1 <= int(d) < L]
    shape = (len(ds), L)
    out = {k: np.full(shape, np.nan) for k in ("mi", "nmi", "mi_shuffled", "top1_cond", "top1_prior")}
    pairs = np.zeros(shape, np.int64)
    perm = np.random.default_rng(seed).permutation(T)
    keep = {(int(l), int(d)) for l, d in keep_matrices}
    mats: dict[str, np.ndarray] = {}
    for l in range(L):
        for i, d in enumerate(ds):
            m = l + d
            if m >= L:
                continue
            C, n_a = _joint(rows[:, l, :], rows[:, m, :], E)
            Cs, _ = _joint(rows[:, l, :], rows[perm, m, :], E)
            st = pair_stats(C)
            present = (rows[:, m, :] >= 0).any(axis=1) & (rows[:, l, :] >= 0).any(axis=1)
            ntok = int(present.sum())
            tgt = rows[present, m, :]
            pb = np.bincount(tgt[tgt >= 0], minlength=E)
            out["mi"][i, l] = st["mi"]
            out["nmi"][i, l] = st["nmi"]
            out["mi_shuffled"][i, l] = pair_stats(Cs)["mi"]
            cond = conditional(C, n_a)
            ok = n_a > 0
            if ok.any():
                out["top1_cond"][i, l] = float((n_a[ok] * np.nanmax(cond[ok], axis=1)).sum() / n_a[ok].sum())
            if ntok > 0:
                out["top1_prior"][i, l] = float(pb.max() / ntok)
            pairs[i, l] = int(C.sum())
            if (l, d) in keep:
                mats[f"{l}:{d}"] = cond
    out.update({"depths": ds, "pairs": pairs, "cond": mats})
    return out


def _joint(src: np.ndarray, dst: np.ndarray, E: int) -> tuple[np.ndarray, np.ndarray]:
    """``(C, n_a)`` from two ``(tokens, k)`` id arrays (-1 = none): joint counts over tokens whose
    rows are both present, and per source expert the number of such tokens (float64)."""
    both = (src >= 0).any(axis=1) & (dst >= 0).any(axis=1)
    a, b = src[both].astype(np.int64), dst[both].astype(np.int64)
    pa = a[:, :, None]
    pb = b[:, None, :]
    ok = (pa >= 0) & (pb >= 0)
    idx = (pa * E + pb)[ok]  # every (a, b) pair of a token, k x k of them
    C = np.bincount(idx, minlength=E * E).reshape(E, E).astype(np.float64)
    n_a = np.bincount(a[a >= 0], minlength=E).astype(np.float64)
    return C, n_a


def affinity_matrix(acc: Accesses, layer: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(C, n_a)`` for one layer pair: joint counts and source-expert token counts (float64)."""
    return _joint(acc.rows[:, layer, :], acc.rows[:, layer + depth, :], acc.num_experts)
