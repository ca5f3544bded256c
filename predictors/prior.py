"""``prior``: each layer's expert popularity, learned from a fitting trace.

Formula: with ``count[l, e]`` the accesses of expert ``e`` at layer ``l`` in the fitting trace,
``prior[l, e] = (count[l, e] + alpha) / (sum_e' count[l, e'] + alpha * experts)`` (Laplace
smoothing, ``alpha`` = 1 by default), and the prediction for target layer ``t`` is
``normalise(prior[t])``: ``top_k * prior[t, e]``, capped at 1 with the excess handed to the others in
proportion. It ignores what the request does: every row gets the same answer.

Tie-break: experts with equal counts get equal probabilities; consumers that need a set take the
lowest expert id first. Cost: ``O(experts)`` per prediction, nothing per observation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS
from ._common import StreamPredictor, check_trace, layer_prior


@PREDICTORS.register("prior", "per-layer expert popularity from a fitting trace (Laplace-smoothed)")
class PriorPredictor(StreamPredictor):
    """Per-layer popularity prior; params: ``alpha`` (Laplace pseudo-count, default 1)."""

    name = "prior"
    needs_fit = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, alpha: float = 1.0):
        super().__init__(num_layers, num_experts, top_k, alpha=float(alpha))
        if alpha < 0:
            raise ConfigError(f"prior: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.prior = np.full((num_layers, num_experts), 1.0 / num_experts)

    def fit(self, trace: Any) -> "PriorPredictor":
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "prior.fit")
        self.prior = layer_prior(trace, self.alpha)
        self.fitted = True
        return self

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        return np.broadcast_to(self.prior[target], (self._rows, self.num_experts))

    def state(self) -> dict[str, np.ndarray]:
        return {"prior": self.prior}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(arrays["prior"], np.float64)

    def cpp_port(self, depths: list[int]) -> dict[str, Any]:
        """The C++ core's prior (PredictorCode 1): the normalised per-layer prior."""
        return {"predictor": 1, "prior": np.ascontiguousarray(np.asarray(self.prior, np.float64).reshape(-1))}
