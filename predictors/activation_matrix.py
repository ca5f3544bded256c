"""``activation_matrix``: match the request's expert activation matrix against a library (MoE-Infinity style).

A request's activation matrix ``A`` (layers x experts) counts how often each expert ran at each
layer for the request's tokens so far. Fitting builds a library of ``N <= library_size`` matrices
from the fitting trace, one per sequence; when the trace has more sequences, they are clustered
with k-means (``random_state=0``) on their unit-normalised flattened matrices and the centroids
are kept (each centroid is non-negative, so it reads as a matrix too).

Online, per row: ``A[l] += multi_hot(experts)`` on ``observe(l)`` and, for target layer ``t``::

    sim_j  = cos(vec(A), vec(M_j))                     (0 while A is empty)
    J      = the `matches` library entries of highest sim (ties: lowest index)
    score  = sum_{j in J} sim_j * M_j[t] / sum_e M_j[t, e]  +  eps * prior[t]

and ``normalise(top_k * score / sum(score))``. ``prior`` is the library's mean per-layer
distribution; ``eps = 1e-3`` only orders experts the matches never used (and is the whole answer
before the first observation, when every ``sim_j`` is 0).

Tie-break: equal similarities pick the lowest library index; equal scores give equal
probabilities, and consumers take the lowest expert id first.
Cost: the dot products and ``|A|`` are updated incrementally, so an observation costs
``O(rows * experts * N)`` (not ``O(rows * layers * experts * N)``), a prediction
``O(rows * (N log N + matches * experts))``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS
from ._common import StreamPredictor, check_trace, multi_hot

_EPS = 1e-3


def request_matrices(trace: Any) -> np.ndarray:
    """``(sequences, layers, experts)`` access counts, sequences in order of first appearance."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    seqs = np.asarray(trace.sequences())
    where = {int(s): i for i, s in enumerate(seqs)}
    row_seq = np.fromiter((where[int(s)] for s in trace.seq), np.int64, len(trace))
    out = np.zeros((len(seqs), L, E), np.float64)
    ids = np.asarray(trace.ids)
    for l in range(L):
        for j in range(ids.shape[2]):
            x = ids[:, l, j]
            ok = x >= 0
            np.add.at(out[:, l], (row_seq[ok], x[ok]), 1.0)
    return out


@PREDICTORS.register("activation_matrix", "MoE-Infinity-style matching of the request's activation matrix")
class ActivationMatrixPredictor(StreamPredictor):
    """Request-level matching; params: ``library_size`` (128), ``matches`` (4)."""

    name = "activation_matrix"
    needs_fit = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, library_size: int = 128, matches: int = 4):
        super().__init__(num_layers, num_experts, top_k, library_size=int(library_size), matches=int(matches))
        if library_size < 1 or matches < 1:
            raise ConfigError(f"activation_matrix: library_size and matches must be >= 1, got {library_size}, {matches}")
        self.library_size, self.matches = int(library_size), int(matches)
        self.library = np.full((1, num_layers, num_experts), 1.0 / num_experts)
        self._prepare()

    def _prepare(self) -> None:
        lib = self.library
        flat = lib.reshape(len(lib), -1)
        self._norms = np.linalg.norm(flat, axis=1)
        tot = lib.sum(axis=2, keepdims=True)
        E = self.num_experts
        # per-layer distributions of each entry (uniform where an entry never saw the layer)
        self._dist = np.where(tot > 0, lib / np.where(tot > 0, tot, 1.0), 1.0 / E)
        self.prior = self._dist.mean(axis=0)

    def fit(self, trace: Any) -> "ActivationMatrixPredictor":
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "activation_matrix.fit")
        mats = request_matrices(trace)
        if len(mats) > self.library_size:
            from sklearn.cluster import KMeans

            flat = mats.reshape(len(mats), -1)
            unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
            km = KMeans(n_clusters=self.library_size, n_init=3, random_state=0).fit(unit)
            mats = np.maximum(km.cluster_centers_, 0.0).reshape(self.library_size, self.num_layers, self.num_experts)
        self.library = mats
        self._prepare()
        self.fitted = True
        return self

    def _reset_request(self) -> None:
        self._counts = self._dots = self._sq = self._match = None

    def _start_request(self, rows: int) -> None:
        self._counts = np.zeros((rows, self.num_layers, self.num_experts))
        self._dots = np.zeros((rows, len(self.library)))  # vec(A) . vec(M_j)
        self._sq = np.zeros(rows)  # |vec(A)|^2
        self._match = None

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        hot = multi_hot(experts, self.num_experts)
        a = self._counts[:, layer]
        self._sq += 2.0 * (a * hot).sum(axis=1) + (hot * hot).sum(axis=1)
        self._dots += hot @ self.library[:, layer, :].T
        a += hot
        self._match = None  # the best matches change with every observation; found lazily

    def _best(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, sims)`` of the best ``matches`` library entries per row, cached per observation."""
        if self._match is None:
            denom = np.sqrt(self._sq)[:, None] * self._norms[None, :]
            sims = np.where(denom > 0, self._dots / np.where(denom > 0, denom, 1.0), 0.0)
            m = min(self.matches, sims.shape[1])
            best = np.argsort(-sims, axis=1, kind="stable")[:, :m]  # ties: lowest library index
            self._match = (best, np.take_along_axis(sims, best, axis=1))
        return self._match

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        best, w = self._best()
        score = np.einsum("rm,rme->re", w, self._dist[best, target])
        return score + _EPS * self.prior[target][None, :]

    def state(self) -> dict[str, np.ndarray]:
        return {"library": self.library}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.library = np.asarray(arrays["library"], np.float64)
        self._prepare()
