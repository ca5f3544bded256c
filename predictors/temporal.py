"""``temporal``: the experts a layer used for the request's recent tokens, decayed, blended with the prior.

Per row and layer it keeps decayed counts over the tokens of the current request seen so far::

    c[l, e] <- decay * c[l, e] + [e chosen at l by this token]      (on observe(l, ...))
    h[l]    <- decay * h[l] + 1                                      (tokens seen at l, decayed)

and predicts target layer ``t`` (of this token or the next, whichever ``depth`` reaches) as
``normalise((c[t] + m * top_k * prior[t]) / (h[t] + m))``: the recent selection rate shrunk toward
the layer prior with ``m`` pseudo-tokens (``strength``), so a request with no history at ``t``
gets exactly ``normalise(top_k * prior[t])`` and a long one mostly its own recent use. The prior is
uniform until ``fit(trace)`` learns the per-layer popularity (see ``prior``). A token with no valid
id at a layer (missing record) leaves that layer's state unchanged.

Tie-break: equal scores give equal probabilities; consumers take the lowest expert id first.
Cost: ``O(rows * top_k)`` per observation, ``O(rows * experts)`` per prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS
from ._common import StreamPredictor, check_trace, layer_prior, multi_hot


class TemporalState:
    """Decayed per-(row, layer) expert counts of one request; shared with predictors that fall back to it."""

    def __init__(self, rows: int, num_layers: int, num_experts: int, decay: float):
        self.decay = decay
        self.counts = np.zeros((rows, num_layers, num_experts))
        self.seen = np.zeros((rows, num_layers))

    def update(self, layer: int, experts: np.ndarray) -> None:
        hot = multi_hot(experts, self.counts.shape[2])
        present = hot.any(axis=1)  # rows with a record at this layer; the others keep their state
        c, h = self.counts[:, layer], self.seen[:, layer]
        c[present] = self.decay * c[present] + hot[present]
        h[present] = self.decay * h[present] + 1.0

    def scores(self, target: int, prior_row: np.ndarray, top_k: int, strength: float) -> np.ndarray:
        """``(c[t] + m * top_k * prior[t]) / (h[t] + m)`` per row."""
        c, h = self.counts[:, target], self.seen[:, target]
        num = c + strength * top_k * prior_row[None, :]
        den = h + strength
        # den is 0 only with strength 0 and no history: the prior alone then
        return np.where(den[:, None] > 0, num / np.where(den > 0, den, 1.0)[:, None], top_k * prior_row[None, :])


def check_temporal_params(decay: float, strength: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"temporal: decay must be in [0, 1], got {decay}")
    if strength < 0:
        raise ConfigError(f"temporal: strength (prior pseudo-tokens) must be >= 0, got {strength}")


@PREDICTORS.register("temporal", "same layer, the request's recent tokens (decayed counts blended with the prior)")
class TemporalPredictor(StreamPredictor):
    """Recent use at the target layer; params: ``decay`` (0.6), ``strength`` (1.0), ``alpha`` (1.0)."""

    name = "temporal"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, decay: float = 0.6,
                 strength: float = 1.0, alpha: float = 1.0):
        super().__init__(num_layers, num_experts, top_k, decay=float(decay), strength=float(strength),
                         alpha=float(alpha))
        check_temporal_params(decay, strength)
        self.decay, self.strength, self.alpha = float(decay), float(strength), float(alpha)
        self.prior = np.full((num_layers, num_experts), 1.0 / num_experts)
        self._state: TemporalState | None = None

    def fit(self, trace: Any) -> "TemporalPredictor":
        """Learn the layer prior used for short histories (optional: uniform without it)."""
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "temporal.fit")
        self.prior = layer_prior(trace, self.alpha)
        self.fitted = True
        return self

    def _reset_request(self) -> None:
        self._state = None

    def _start_request(self, rows: int) -> None:
        self._state = TemporalState(rows, self.num_layers, self.num_experts, self.decay)

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        self._state.update(layer, experts)

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        return self._state.scores(target, self.prior[target], self.top_k, self.strength)

    def state(self) -> dict[str, np.ndarray]:
        return {"prior": self.prior}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(arrays["prior"], np.float64)

    def cpp_port(self, depths: list[int]) -> dict[str, Any]:
        """The C++ core's temporal (PredictorCode 2): the prior, decay and strength."""
        return {"predictor": 2, "prior": np.ascontiguousarray(np.asarray(self.prior, np.float64).reshape(-1)),
                "decay": float(self.decay), "strength": float(self.strength)}
