"""``predicted``: predictor-guided eviction: evict what the predictor says is needed last.

The simulator (or runtime) asks the predictor, at every MoE layer ``l``, for depth ``L`` (layer
``l`` of the next token: its next use) and hands the probabilities to ``on_scores(l, p1)``; with
several rows (a batched step) ``p1`` is their mean. Each layer keeps its latest ``p1[l, :]``; before
the first prediction for a layer, ``p1 = top_k / E``. A predictor speaks for the next token only, so
the tokens after it use the request's activation ratio ``p`` of ``activation`` (same parameters,
same counts). The rank is the expected wait of ``_expected``:

    T = d(l) + L * (1 - p1) / p,   d(l) = ((l - current - 1) mod L) + 1

so an expert the predictor expects at the next token is kept first, and among the others the one
the request uses least (and whose layer runs last, in global scope) goes first. Victim: largest
``T``; ties go to the least recently used, then the lowest ``(layer, expert)``. With an
uninformative predictor (``p1 = p``) this is ``activation``. Needs a predictor (``--predictor``).
Cost: ``O(1)`` per access, ``O(experts)`` per prediction; evictions as ``activation`` (its order structure).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..errors import ConfigError
from ._expected import expected_wait, pick_largest, wait_beyond
from .activation import Activation
from .base import POLICIES


@POLICIES.register("predicted", "evict the expert the predictor (next token) and the request's ratio expect last; needs --predictor")
class Predicted(Activation):
    name = "predicted"
    uses_scores = True
    #: The C++ core's predicted (activation's port with the predictor's scores, streamed or computed in C++).
    _CPP_CODE = 8

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        self._p1 = np.full(self.num_layers * self.num_experts, self.top_k / self.num_experts, np.float64)

    def score_depth(self) -> int:
        return self.num_layers

    def on_scores(self, layer: int, probs: np.ndarray) -> None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (self.num_experts,):
            raise ConfigError(f"predicted.on_scores wants ({self.num_experts},) probabilities, got {p.shape}")
        self._p1[layer * self.num_experts:(layer + 1) * self.num_experts] = p
        self._order.invalidate(layer)

    def beyond(self, keys: np.ndarray) -> np.ndarray:
        return wait_beyond(self._p1[keys], self.probability(keys), self.num_layers)

    def victim_scan(self, pool: int, protected: Iterable[int]) -> int | None:
        keys = np.fromiter((k for k in self._members[pool] if k not in protected), np.int64)
        if keys.size == 0:
            return None
        wait = expected_wait(keys, self._p1[keys], self.probability(keys), self.layer, self.num_layers,
                             self.num_experts)
        return pick_largest(keys, wait, self._last[keys])
