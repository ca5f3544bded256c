"""Per-layer expert popularity and its skew.

With ``n[l, e]`` the accesses of expert ``e`` at MoE layer ``l`` and ``p = n / sum_e n`` its share:

* entropy ``H_l = -sum_e p log2 p`` bits (0 log 0 = 0), and ``H_l / log2(E)`` (1 = uniform use);
* Gini coefficient over the ``E`` counts sorted ascending, ``x_1 <= ... <= x_E``:
  ``G = 2 sum_i i x_i / (E sum_i x_i) - (E + 1) / E`` (0 = uniform, ``1 - 1/E`` = one expert);
* top-10% share: the share of accesses that go to the ``ceil(E / 10)`` most used experts;
* unused experts: ``n[l, e] == 0``, listed by id.

A layer without any access has NaN entropy, Gini and share (nothing to measure).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .access import Accesses


def counts(acc: Accesses) -> np.ndarray:
    """Accesses per (layer, expert), int64 ``(layers, experts)``."""
    L, E = acc.num_layers, acc.num_experts
    return np.bincount(acc.layer.astype(np.int64) * E + acc.expert, minlength=L * E).reshape(L, E)


def shares(c: np.ndarray) -> np.ndarray:
    """Row-normalised counts; a row without accesses is NaN."""
    tot = c.sum(axis=-1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, c / np.where(tot > 0, tot, 1), np.nan)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """``-sum p log2 p`` along the last axis (0 log 0 = 0); NaN rows stay NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0)
    h = -t.sum(axis=-1)
    return np.where(np.isnan(p).any(axis=-1), np.nan, h)


def gini(c: np.ndarray) -> np.ndarray:
    """Gini coefficient of each row of non-negative counts (formula in the module docstring)."""
    x = np.sort(np.asarray(c, np.float64), axis=-1)
    n = x.shape[-1]
    tot = x.sum(axis=-1)
    i = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 2.0 * (x * i).sum(axis=-1) / (n * tot) - (n + 1.0) / n
    return np.where(tot > 0, g, np.nan)


def top_share(c: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Share of each row's accesses taken by its ``ceil(fraction * E)`` most used experts."""
    n = c.shape[-1]
    m = max(1, math.ceil(fraction * n))
    top = -np.sort(-np.asarray(c, np.float64), axis=-1)[..., :m].sum(axis=-1)
    tot = c.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, top / tot, np.nan)


def popularity(acc: Accesses) -> dict[str, Any]:
    """Counts, shares and the skew figures of every layer (arrays; the report rounds them)."""
    c = counts(acc)
    p = shares(c)
    E = acc.num_experts
    h = entropy_bits(p)
    return {
        "counts": c,
        "share": p,
        "entropy_bits": h,
        "entropy_norm": h / math.log2(E) if E > 1 else np.zeros_like(h),
        "gini": gini(c),
        "top10_share": top_share(c, 0.1),
        "top10_experts": max(1, math.ceil(0.1 * E)),
        "unused": [np.flatnonzero(row == 0).tolist() for row in c],
    }
