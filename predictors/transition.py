"""``transition``: the experts a token chose at layer ``l`` predict its choice ``d`` layers ahead.

Fitting counts, for every source layer ``l`` and depth ``d <= max_depth`` with target
``(t, o) = ((l + d) % L, (l + d) // L)``, how often expert ``e`` at layer ``l`` of a token went
with expert ``e'`` at layer ``t`` of the token ``o`` positions later in the same sequence::

    C[d, l, e, e'] = #{tokens: e chosen at l, e' chosen at t of the token o later}
    P(e' | e) = (C[d, l, e, e'] + alpha * prior[t, e']) / (sum_e'' C[d, l, e, e''] + alpha)

(each conditional is smoothed toward the target layer's prior with ``alpha`` pseudo-counts, so an
expert never seen at ``l`` predicts the prior). Online, with ``S`` the valid experts the current
token just chose at ``l``, the scores combine the conditionals of the observed experts:

* ``combine="product"`` (default): ``prior[t, e'] * prod_{e in S} P(e' | e) / prior[t, e']``
  renormalised (naive Bayes: each observed expert is independent evidence; sharper);
* ``combine="mean"``: ``mean_{e in S} P(e' | e)`` (a mixture; smoother).

(``product`` had the higher recall on DeepSeek-V2-Lite and Mixtral in eval/predictor_recall.py;
with top-1 routing the two are the same.)

and ``normalise`` turns ``top_k *`` scores into selection probabilities. A token whose record at
``l`` is missing gets the target prior. Depths beyond ``max_depth`` raise ``ConfigError``.

Tie-break: equal scores give equal probabilities; consumers take the lowest expert id first.
Cost: ``O(top_k * experts)`` per row and prediction; ``max_depth * L * experts^2`` floats stored.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from ..registry import Registry
from .base import PREDICTORS
from ._common import StreamPredictor, check_trace, layer_prior, multi_hot, token_order


def _observed(hot: np.ndarray) -> np.ndarray:
    """Experts observed in any row, ascending: the fixed order the combine rules fold them in."""
    return np.nonzero(hot.any(axis=0))[0]


# Both rules fold the observed experts' rows in ascending expert order with elementwise IEEE
# operations only (no BLAS product, whose summation order depends on the machine's kernel, and no
# exp/log, whose vectorised versions differ from libm), so the C++ simulator core
# (csrc/sim/predict.h) reproduces every probability exactly.
def _mean(hot: np.ndarray, cond: np.ndarray, prior_t: np.ndarray) -> np.ndarray:
    n = hot.sum(axis=1, keepdims=True)
    total = np.zeros((hot.shape[0], cond.shape[1]))
    for e in _observed(hot):
        total += np.where(hot[:, e:e + 1] > 0, cond[e][None, :], 0.0)
    return total / np.maximum(n, 1.0)


def _product(hot: np.ndarray, cond: np.ndarray, prior_t: np.ndarray) -> np.ndarray:
    # prior times each observed expert's likelihood ratio P(e'|e) / prior, then renormalised. The
    # ratios lie in [alpha / (row count + alpha), 1 / prior], so the product stays in range for any
    # realistic top_k; a row that still over- or underflows falls back to the prior.
    if hot.shape[0] == 1:  # one row (batch-1 decode, the runtime's hot path): the same folds, no row masks
        w1 = np.array(prior_t, dtype=np.float64)
        for e in np.flatnonzero(hot[0]):
            w1 *= cond[e] / prior_t
        total1 = w1.sum()
        if total1 > 0 and np.isfinite(total1):
            return (w1 / total1)[None, :]
        return np.array(prior_t, dtype=np.float64)[None, :]
    # C order, as the one-row path: a copy of a broadcast view keeps its stride order (the row axis
    # innermost), and numpy sums a row pairwise only where the row is contiguous, so an F-ordered ``w``
    # would total (and normalise would sum) a batched row sequentially: other bits than the same row
    # alone, and than the C++ core's pairwise row sums
    w = np.tile(np.asarray(prior_t, dtype=np.float64), (hot.shape[0], 1))
    for e in _observed(hot):
        w *= np.where(hot[:, e:e + 1] > 0, (cond[e] / prior_t)[None, :], 1.0)
    total = w.sum(axis=1, keepdims=True)
    ok = (total > 0) & np.isfinite(total)
    return np.where(ok, w / np.where(ok, total, 1.0), prior_t[None, :])


#: How the conditionals of a token's several observed experts are combined into one distribution.
COMBINE: Registry[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = Registry("transition combine rule")
COMBINE.register("mean", "mixture: the mean of the observed experts' conditionals")(_mean)
COMBINE.register("product", "naive Bayes: prior times each observed expert's likelihood ratio")(_product)


def transition_counts(trace: Any, max_depth: int) -> np.ndarray:
    """``C[d-1, l, e, e']`` as defined in the module docstring, float64 ``(max_depth, L, E, E)``."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    order, next_same = token_order(trace)
    hot = multi_hot(np.asarray(trace.ids)[order], E).astype(np.float32)  # (n, L, E)
    n = hot.shape[0]
    counts = np.zeros((max_depth, L, E, E), np.float64)
    for d in range(1, max_depth + 1):
        for l in range(L):
            t, o = (l + d) % L, (l + d) // L
            if o == 0:
                x, y = hot[:, l], hot[:, t]
            else:
                # token i pairs with token i + o only when all o steps stay in one sequence
                ok = np.ones(max(n - o, 0), bool)
                for j in range(o):
                    ok &= next_same[j:n - o + j]
                x, y = hot[:n - o, l][ok], hot[o:, t][ok]
            counts[d - 1, l] = x.T.astype(np.float64) @ y.astype(np.float64)
    return counts


@PREDICTORS.register("transition", "cross-layer transitions P(e' at l+d | e at l) learned from a trace")
class TransitionPredictor(StreamPredictor):
    """Cross-layer co-occurrence; params: ``alpha`` (1.0), ``max_depth`` (4), ``combine`` ("product")."""

    name = "transition"
    needs_fit = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, alpha: float = 1.0, max_depth: int = 4,
                 combine: str = "product"):
        super().__init__(num_layers, num_experts, top_k, alpha=float(alpha), max_depth=int(max_depth),
                         combine=str(combine))
        if alpha <= 0:
            raise ConfigError(f"transition: alpha must be > 0 (smoothing keeps every conditional defined), got {alpha}")
        if max_depth < 1:
            raise ConfigError(f"transition: max_depth must be >= 1, got {max_depth}")
        self._combine = COMBINE.get(combine)
        self.alpha, self.max_depth = float(alpha), int(max_depth)
        self.prior = np.full((num_layers, num_experts), 1.0 / num_experts)
        self.cond = np.zeros((self.max_depth, num_layers, num_experts, num_experts))
        self._last: dict[int, np.ndarray] = {}

    def fit(self, trace: Any) -> "TransitionPredictor":
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "transition.fit")
        self.prior = layer_prior(trace, 1.0)
        counts = transition_counts(trace, self.max_depth)
        L = self.num_layers
        targets = [(l + d) % L for d in range(1, self.max_depth + 1) for l in range(L)]
        prior_t = self.prior[targets].reshape(self.max_depth, L, 1, self.num_experts)
        self.cond = (counts + self.alpha * prior_t) / (counts.sum(axis=3, keepdims=True) + self.alpha)
        self.fitted = True
        return self

    def _reset_request(self) -> None:
        self._last = {}

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        self._last[layer] = multi_hot(experts, self.num_experts)

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        self.check_fitted_depth(depth)
        prior_t = self.prior[target]
        hot = self._last.get(layer)
        if hot is None:
            return np.broadcast_to(prior_t, (self._rows, self.num_experts))
        p = self._combine(hot, self.cond[depth - 1, layer], prior_t)
        empty = ~hot.any(axis=1)  # missing record at this layer: nothing to condition on
        p[empty] = prior_t
        return p

    def state(self) -> dict[str, np.ndarray]:
        return {"prior": self.prior, "cond": self.cond}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(arrays["prior"], np.float64)
        self.cond = np.asarray(arrays["cond"], np.float64)

    def cpp_port(self, depths: list[int]) -> dict[str, Any] | None:
        """The C++ core's transition (PredictorCode 3) with the product or mean combine; None for
        another combine rule. A depth beyond ``max_depth`` raises here what ``predict`` would raise at
        the first prediction, before any expert is served."""
        if self._combine not in (_product, _mean):
            return None
        for d in depths:
            self.check_fitted_depth(d)
        return {"predictor": 3, "prior": np.ascontiguousarray(np.asarray(self.prior, np.float64).reshape(-1)),
                "max_depth": int(self.max_depth),
                "cond": np.ascontiguousarray(np.asarray(self.cond, np.float64).reshape(-1)),
                "product": int(self._combine is _product)}
