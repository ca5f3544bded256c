"""Helpers shared by the predictors: multi-hot encoding, the Laplace layer prior, token order, and
``StreamPredictor``, the base class that does the protocol's argument checks once.

Not a predictor (registers nothing). The functions are pure, so a predictor's ``fit`` and its
online ``observe`` build exactly the same numbers from the same ids.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import Predictor


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """``(..., k)`` expert ids -> ``(..., num_experts)`` float64 indicator (1 where an expert was chosen).

    Negative ids (missing -1, dropped -2) are ignored; an id listed twice still counts once.
    """
    e = np.asarray(experts)
    if e.size and int(e.max()) >= num_experts:
        raise ConfigError(f"expert id {int(e.max())} out of range for {num_experts} experts "
                          "(the predictor was built for a different model or trace)")
    flat = e.reshape(-1, e.shape[-1])
    out = np.zeros((flat.shape[0], num_experts), np.float64)
    r, c = np.nonzero(flat >= 0)
    out[r, flat[r, c]] = 1.0
    return out.reshape(e.shape[:-1] + (num_experts,))


def check_experts(experts: Any, top_k: int, rows: int | None = None) -> np.ndarray:
    """Validate the ``experts`` argument of ``observe``: an int array ``(rows, top_k)``.

    A 1-D array of length ``top_k`` is taken as one row. ``rows`` (when given) is the row count the
    predictor already tracks for this request; a different one means a missing ``reset()``.
    """
    if hasattr(experts, "detach"):  # a torch tensor from the runtime: these predictors work on host ids
        experts = experts.detach().cpu().numpy()
    e = np.asarray(experts)
    if e.ndim == 1:
        e = e[None, :]
    if e.ndim != 2 or e.shape[1] != top_k:
        raise ConfigError(f"observe() wants expert ids of shape (rows, top_k={top_k}), got {e.shape}")
    if e.size and not np.issubdtype(e.dtype, np.integer):
        raise ConfigError(f"expert ids must be integers, got dtype {e.dtype}")
    if e.size and int(e.min()) < -2:
        raise ConfigError(f"expert id {int(e.min())} is invalid: ids are >= 0, or -1 (missing) / -2 (dropped)")
    if rows is not None and e.shape[0] != rows:
        raise ConfigError(f"observe() got {e.shape[0]} rows but this request has {rows}; call reset() "
                          "before a request with a different batch size")
    return e


def check_layer(layer: int, num_layers: int) -> int:
    if not 0 <= layer < num_layers:
        raise ConfigError(f"layer {layer} out of range: the predictor has {num_layers} MoE layers (0..{num_layers - 1})")
    return int(layer)


def layer_prior(trace: Any, alpha: float = 1.0) -> np.ndarray:
    """Laplace-smoothed per-layer expert frequency, ``(layers, experts)``, each row summing to 1.

    ``prior[l, e] = (count[l, e] + alpha) / (sum_e' count[l, e'] + alpha * experts)`` where ``count``
    counts the accesses in ``trace`` (missing and dropped slots excluded).
    """
    if alpha < 0:
        raise ConfigError(f"prior smoothing alpha must be >= 0, got {alpha}")
    ids = np.asarray(trace.ids)
    L, E = trace.meta.num_layers, trace.meta.num_experts
    counts = np.zeros((L, E), np.float64)
    for l in range(L):
        x = ids[:, l, :].ravel()
        counts[l] = np.bincount(x[x >= 0], minlength=E)
    denom = counts.sum(axis=1, keepdims=True) + alpha * E
    if (denom <= 0).any():
        empty = [int(l) for l in np.nonzero(denom[:, 0] <= 0)[0]]
        raise ConfigError(f"the fitting trace has no routing at layers {empty} and alpha=0; use alpha > 0 "
                          "or a trace that covers every layer")
    return (counts + alpha) / denom


def token_order(trace: Any) -> tuple[np.ndarray, np.ndarray]:
    """Tokens grouped by sequence in recorded order: ``(order, next_same)``.

    ``order`` lists row indices sequence by sequence (sequences in order of first appearance,
    tokens in recorded order within each); ``next_same[i]`` is True when ``order[i + 1]`` is the
    next token of the same sequence (the pair a next-token target is learned from).
    """
    seq = np.asarray(trace.seq)
    n = len(seq)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    _, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
    # rank each sequence by its first appearance, so sequences keep their recorded order
    seq_rank = np.empty(len(first), np.int64)
    seq_rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    rank = seq_rank[inverse.ravel()]
    order = np.argsort(rank, kind="stable")
    next_same = np.zeros(n, bool)
    next_same[:-1] = seq[order[1:]] == seq[order[:-1]]
    return order, next_same


def ahead_in_sequence(next_same: np.ndarray, offset: int) -> np.ndarray:
    """Rows ``i`` (in ``token_order``) whose token ``i + offset`` is in the same sequence, from its
    ``next_same`` (row ``i``'s next token is in the same sequence)."""
    n = len(next_same)
    ok = np.ones(n, bool)
    for j in range(offset):
        step = np.zeros(n, bool)
        step[: n - j] = next_same[j:]
        ok &= step
    return ok


def check_trace(trace: Any, num_layers: int, num_experts: int, top_k: int, who: str) -> None:
    """A fitting trace must describe the model the predictor was built for."""
    m = trace.meta
    if (m.num_layers, m.num_experts, m.top_k) != (num_layers, num_experts, top_k):
        raise ConfigError(
            f"{who}: the trace has {m.num_layers} layers x {m.num_experts} experts, top-{m.top_k}, but the "
            f"predictor was built for {num_layers} x {num_experts}, top-{top_k}; build it from the trace's "
            "metadata")
    if len(trace) == 0:
        raise ConfigError(f"{who}: the fitting trace is empty")


class StreamPredictor(Predictor):
    """A predictor with the protocol's checks done once: subclasses fill ``_observe`` / ``_scores``.

    ``observe`` validates the layer and ids and fixes the request's row count (until ``reset``);
    ``predict`` validates the layer, depth and fitted state, asks ``_scores(layer, target, offset)``
    for non-negative scores ``(rows, experts)`` and turns them into probabilities with
    ``normalise`` (sum ``top_k`` per row, each in [0, 1]).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, **params: Any):
        super().__init__(num_layers, num_experts, top_k, **params)
        self._rows: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Parameters come from users (CLI --predictor-param, saved JSON): an unknown or misspelt
        # one must fail with the valid names, not as a bare TypeError or by being ignored.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        valid = [n for n in list(inspect.signature(init).parameters)[4:]]

        @functools.wraps(init)
        def checked(self: Any, num_layers: int, num_experts: int, top_k: int, **params: Any) -> None:
            unknown = sorted(set(params) - set(valid))
            if unknown:
                raise ConfigError(f"predictor {cls.name!r} has no parameter(s) {unknown}; valid: {valid}")
            init(self, num_layers, num_experts, top_k, **params)

        cls.__init__ = checked  # type: ignore[method-assign]

    def reset(self) -> None:
        self._rows = None
        self._reset_request()

    def observe(self, layer: int, experts: np.ndarray, hidden: Any = None) -> None:
        layer = check_layer(layer, self.num_layers)
        e = check_experts(experts, self.top_k, self._rows)
        if self._rows is None:
            self._rows = e.shape[0]
            self._start_request(self._rows)
        self._observe(layer, e, hidden)

    def predict(self, layer: int, depth: int) -> np.ndarray:
        layer = check_layer(layer, self.num_layers)
        if not self.fitted:
            raise ConfigError(f"predictor {self.name!r} must be fitted first: call fit(trace) on sequences "
                              "you will not score, or Predictor.load() a saved one")
        if self._rows is None:
            raise ConfigError(f"predict({layer}, {depth}) before any observe(): the predictor does not know the "
                              "batch size yet; call observe() for the layer the router just ran")
        target, offset = self.target(layer, depth)
        return self.normalise(self._scores(layer, target, offset, depth))

    # -- hooks ---------------------------------------------------------------------------------
    def _reset_request(self) -> None:
        """Forget per-request state."""

    def _start_request(self, rows: int) -> None:
        """First ``observe`` of a request: allocate per-row state for ``rows`` rows."""

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        """Record the ids (validated, ``(rows, top_k)``, negatives = missing)."""

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        raise NotImplementedError
