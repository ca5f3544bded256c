"""``learned``: per-target linear models on recent routing (scikit-learn), saved without pickle.

Features for a prediction made right after layer ``l`` of a token, for depth ``d`` (target layer
``t = (l + d) % L``), with ``w = min(window, L)``:

* the multi-hot ids of the last ``w`` MoE layers observed: layers ``l, l-1, ..., l-w+1`` of this
  token (wrapping into the previous token's last layers when ``l - j < 0``);
* the multi-hot ids most recently observed at the target layer ``t`` (this token's if ``t <= l``,
  else the previous token's);

``F = (w + 1) * experts`` binary features, zero where a record is missing or the request has not
reached it. For every ``(d, l)`` one model maps ``x`` to a score per expert (``MODELS``):

* ``model="ridge"`` (default): one multi-output ``Ridge(alpha=1/C)`` on the 0/1 targets (a linear
  probability model); scores ``max(W x + b, 0)``;
* ``model="logistic"``: a ``LogisticRegression(C, solver="liblinear")`` per expert; scores
  ``sigmoid(W x + b)``. An expert always (never) selected in the fitting samples gets weights 0 and
  the intercept ``logit((positives + 1/2) / (samples + 1))``.

and the prediction is ``normalise(scores)``. Ridge is the default: on the DeepSeek-V2-Lite trace
(eval/results/predictor_recall.md) it reached the depth-1 recall of logistic regression (0.605 vs
0.606 with 8,000 samples) in a tenth of the fitting time (7 s vs 71 s on 2 cores).

Training samples are the fitting trace's tokens whose target exists (same sequence, record
present); at most ``max_samples`` per ``(d, l)``, taken evenly spaced so the fit is deterministic.
Only the coefficients are kept (``coef (D, L, E, F)``, ``intercept (D, L, E)``) and saved as .npz,
no pickled estimator. Depths beyond ``max_depth`` raise ``ConfigError``.

Online scoring gathers instead of multiplying: ``x`` is multi-hot with at most ``top_k`` ones per
block, so ``W x + b`` is the intercept plus the sum of the coefficient columns of the active ids.
``observe`` keeps each layer's ids (sorted, duplicates and missing ids replaced by a sentinel that
points at a zero column), and a prediction sums ``(w + 1) * top_k`` gathered columns per row: its
cost does not grow with the feature count ``F``, only with the window's active ids, and no
multi-hot vector is built. The sum runs in another order than the dense product's, so scores agree
with ``DenseLearnedPredictor`` (the dense product, kept as the reference) up to float rounding
(tests/test_predictors.py checks the difference).

Tie-break: equal scores give equal probabilities; consumers take the lowest expert id first.
Cost: ``O(rows * (w + 1) * top_k * experts)`` per prediction, ``O(rows * top_k)`` per observation;
``(w + 1) * (E + 1) * E`` floats per ``(d, l)`` for the gather tables (built on first use).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..registry import Registry
from .base import PREDICTORS
from ._common import StreamPredictor, ahead_in_sequence, check_trace, multi_hot, token_order


def _fit_logistic(X: Any, Y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """One ``LogisticRegression(C, liblinear)`` per expert; constant experts get a smoothed intercept."""
    from sklearn.linear_model import LogisticRegression

    E = Y.shape[1]
    coef, icpt = np.zeros((E, X.shape[1])), np.zeros(E)
    for e in range(E):
        y = Y[:, e]
        pos = int(y.sum())
        if pos == 0 or pos == len(y):
            rate = (pos + 0.5) / (len(y) + 1.0)
            icpt[e] = np.log(rate / (1.0 - rate))
            continue
        clf = LogisticRegression(C=C, solver="liblinear").fit(X, y)
        coef[e], icpt[e] = clf.coef_[0], clf.intercept_[0]
    return coef, icpt


def _fit_ridge(X: Any, Y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """One multi-output ``Ridge(alpha=1/C)`` for all experts at once (a linear probability model)."""
    from sklearn.linear_model import Ridge

    X = X.toarray() if hasattr(X, "toarray") else X  # few features: the dense Cholesky solve is fastest
    r = Ridge(alpha=1.0 / C).fit(X, Y.astype(np.float64))
    return np.asarray(r.coef_, np.float64).reshape(Y.shape[1], X.shape[1]), np.asarray(r.intercept_, np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _clip(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


#: Score calibrations: ``none`` (the linked score as it is) and ``isotonic`` (one monotone map per depth from the
#: linked score to the selection frequency, fitted on held-out sequences of the fitting trace).
CALIBRATIONS = ("none", "isotonic")

#: Model kinds: ``(fit(X, Y, C) -> (coef (E, F), intercept (E,)), link applied to X coef^T + b)``.
MODELS: Registry[tuple[Any, Any]] = Registry("learned model")
MODELS.register("logistic", "a logistic regression per expert (liblinear)")((_fit_logistic, _sigmoid))
MODELS.register("ridge", "one multi-output ridge regression, scores clipped at 0")((_fit_ridge, _clip))


def feature_layers(layer: int, target: int, num_layers: int, window: int) -> list[tuple[int, int]]:
    """``(layer, token_offset)`` of each feature block, offset 0 = this token, -1 = the previous one."""
    w = min(window, num_layers)
    out = [((layer - j) % num_layers, -1 if layer - j < 0 else 0) for j in range(w)]
    out.append((target, 0 if target <= layer else -1))
    return out


@PREDICTORS.register("learned", "linear model per target layer on the recent routing (scikit-learn ridge or logistic)")
class LearnedPredictor(StreamPredictor):
    """Params: ``window`` (2), ``max_depth`` (2), ``C`` (1.0), ``max_samples`` (20000), ``model`` ("ridge"),
    ``calibrate`` ("none" or "isotonic"), ``calibrate_share`` (0.2: the share of the fitting trace's sequences, the
    last ones, at least one, held out for the map)."""

    name = "learned"
    needs_fit = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window: int = 2, max_depth: int = 2,
                 C: float = 1.0, max_samples: int = 20000, model: str = "ridge", calibrate: str = "none",
                 calibrate_share: float = 0.2):
        if calibrate not in CALIBRATIONS:
            raise ConfigError(f"learned: calibrate must be one of {list(CALIBRATIONS)}, got {calibrate!r}")
        if not 0.0 < calibrate_share < 1.0:
            raise ConfigError(f"learned: calibrate_share must be strictly between 0 and 1, got {calibrate_share}")
        super().__init__(num_layers, num_experts, top_k, window=int(window), max_depth=int(max_depth), C=float(C),
                         max_samples=int(max_samples), model=str(model), calibrate=str(calibrate),
                         calibrate_share=float(calibrate_share))
        self.calibrate, self.calibrate_share = str(calibrate), float(calibrate_share)
        self.calib_x: np.ndarray | None = None
        self.calib_y: np.ndarray | None = None
        self.model = str(model)
        self._link = MODELS.get(self.model)[1]
        if window < 1 or max_depth < 1 or C <= 0 or max_samples < 2:
            raise ConfigError(f"learned: need window >= 1, max_depth >= 1, C > 0, max_samples >= 2; got "
                              f"{window}, {max_depth}, {C}, {max_samples}")
        self.window, self.max_depth, self.C, self.max_samples = int(window), int(max_depth), float(C), int(max_samples)
        nfeat = (min(self.window, num_layers) + 1) * num_experts
        self.coef = np.zeros((self.max_depth, num_layers, num_experts, nfeat))
        self.intercept = np.zeros((self.max_depth, num_layers, num_experts))
        self._ids: np.ndarray | None = None
        self._ids_row: np.ndarray | None = None
        self._tables: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    # -- fitting -------------------------------------------------------------------------------
    def _design(self, trace: Any):
        """``(depth, layer, X, Y)`` per model: the features (dense float64) and 0/1 targets of ``trace``'s samples."""
        L, E = self.num_layers, self.num_experts
        order, next_same = token_order(trace)
        ids = np.asarray(trace.ids)[order]
        hot = multi_hot(ids, E).astype(bool)  # (n, L, E)
        present = (ids >= 0).any(axis=2)  # (n, L): the record exists
        n = len(order)
        has_prev = np.zeros(n, bool)
        has_prev[1:] = next_same[:-1]
        prev_hot = np.zeros_like(hot)
        prev_hot[1:] = hot[:-1]
        prev_hot[~has_prev] = False
        for d in range(1, self.max_depth + 1):
            for l in range(L):
                t, o = (l + d) % L, (l + d) // L
                ok = ahead_in_sequence(next_same, o)
                idx = np.nonzero(ok)[0]
                idx = idx[present[idx + o, t]] if len(idx) else idx
                if len(idx) > self.max_samples:
                    idx = idx[np.unique(np.linspace(0, len(idx) - 1, self.max_samples).astype(np.int64))]
                blocks = [(hot if off == 0 else prev_hot)[idx, fl] for fl, off in feature_layers(l, t, L, self.window)]
                yield d, l, np.concatenate(blocks, axis=1).astype(np.float64), hot[idx + o, t]

    def _fit_models(self, trace: Any) -> None:
        from scipy import sparse

        fit_model = MODELS.get(self.model)[0]
        for d, l, X, Y in self._design(trace):
            self.coef[d - 1, l], self.intercept[d - 1, l] = fit_model(sparse.csr_matrix(X), Y, self.C)

    def _fit_calibration(self, held_out: Any) -> None:
        """Per depth, an isotonic map from the linked score to the frequency the expert was selected, over the
        ``(d, l)`` models' scores on ``held_out`` (routing the models were not fitted on); stored as its knots
        (``calib_x``, ``calib_y``: ``(max_depth, knots)``, padded by repeating the last knot)."""
        from sklearn.isotonic import IsotonicRegression

        zs: dict[int, list[np.ndarray]] = {d: [] for d in range(1, self.max_depth + 1)}
        ys: dict[int, list[np.ndarray]] = {d: [] for d in range(1, self.max_depth + 1)}
        for d, l, X, Y in self._design(held_out):
            zs[d].append(self._link(X @ self.coef[d - 1, l].T + self.intercept[d - 1, l][None, :]).ravel())
            ys[d].append(Y.ravel())
        knots = []
        for d in range(1, self.max_depth + 1):
            z, y = np.concatenate(zs[d]), np.concatenate(ys[d]).astype(np.float64)
            if len(z) == 0:
                raise ConfigError(f"learned: the held-out sequences have no sample at depth {d} to calibrate on; "
                                  "fit on a trace with more (or longer) sequences, or use calibrate='none'")
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(z, y)
            knots.append((np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64)))
        n = max(len(x) for x, _ in knots)
        self.calib_x = np.stack([np.concatenate([x, np.full(n - len(x), x[-1])]) for x, _ in knots])
        self.calib_y = np.stack([np.concatenate([y, np.full(n - len(y), y[-1])]) for _, y in knots])

    def fit(self, trace: Any) -> "LearnedPredictor":
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "learned.fit")
        if self.calibrate == "isotonic":
            seqs = trace.sequences()
            if len(seqs) < 2:
                raise ConfigError(f"learned: calibrate='isotonic' holds out sequences of the fitting trace for its "
                                  f"map, and the trace has {len(seqs)}; fit on a trace with 2 or more sequences, or "
                                  "use calibrate='none'")
            # calibrate_share of the sequences, at least one on each side
            held = min(max(int(round(len(seqs) * self.calibrate_share)), 1), len(seqs) - 1)
            # the map is fitted on scores of routing the models did not see, then the models on everything
            self._fit_models(trace.select_sequences(seqs[:len(seqs) - held]))
            self._fit_calibration(trace.select_sequences(seqs[len(seqs) - held:]))
        self._fit_models(trace)
        self._tables = {}
        self.fitted = True
        return self

    def _calibrated(self, z: np.ndarray, depth: int) -> np.ndarray:
        """The linked scores through the depth's isotonic map (as they are without calibration)."""
        if self.calib_x is None:
            return z
        return np.interp(z, self.calib_x[depth - 1], self.calib_y[depth - 1])

    # -- online --------------------------------------------------------------------------------
    def _reset_request(self) -> None:
        self._ids = self._ids_row = None

    def _start_request(self, rows: int) -> None:
        # per row: each layer's most recent ids (top_k slots per layer, layer-major), the sentinel E (no expert:
        # a zero row of the gather table) until the request reaches that layer; a last column 0 for the intercept
        L, E, k = self.num_layers, self.num_experts, self.top_k
        self._ids = np.full((rows, L * k + 1), E, np.int64)
        self._ids[:, -1] = 0
        self._ids_row = self._ids[0]

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        E, k = self.num_experts, self.top_k
        if experts.size and int(experts.max()) >= E:
            raise ConfigError(f"expert id {int(experts.max())} out of range for {E} experts "
                              "(the predictor was built for a different model or trace)")
        if experts.shape[0] == 1:  # batch-1 decode: most rows have k distinct valid ids, stored as they are
            ids = experts[0].tolist()
            if min(ids) >= 0 and len(set(ids)) == k:
                self._ids_row[layer * k:(layer + 1) * k] = experts[0]
                return
        ids = np.sort(experts, axis=1)
        rest = ids[:, 1:]
        rest[rest == ids[:, :-1]] = E  # an id listed twice counts once, as in the multi-hot features
        ids[ids < 0] = E  # missing (-1) and dropped (-2): no feature
        self._ids[:, layer * k:(layer + 1) * k] = ids

    def _gather(self, depth: int, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(table, pos, off, ones)`` of the model ``(depth, layer)``: the scores of a row with stored ids ``ids``
        are ``link(ones @ table[ids[pos] + off])`` (the gathered rows' sum). ``table``
        ``((w + 1) * (E + 1) + 1, E)``: row ``j * (E + 1) + e`` is feature block ``j``'s coefficient column for
        expert ``e``, row ``j * (E + 1) + E`` zero (the sentinel), the last row the intercept; ``pos`` the slots of
        the blocks' layers (``feature_layers`` order) and the intercept column, ``off`` each slot's block offset
        into ``table``."""
        key = (depth, layer)
        got = self._tables.get(key)
        if got is None:
            L, E, k = self.num_layers, self.num_experts, self.top_k
            target = (layer + depth) % L
            fls = [fl for fl, _ in feature_layers(layer, target, L, self.window)]
            nb = len(fls)
            table = np.zeros((nb * (E + 1) + 1, E))
            blocks = table[:-1].reshape(nb, E + 1, E)
            blocks[:, :E] = self.coef[depth - 1, layer].T.reshape(nb, E, E)
            table[-1] = self.intercept[depth - 1, layer]
            pos = np.array([fl * k + i for fl in fls for i in range(k)] + [L * k], np.int64)
            off = np.array([j * (E + 1) for j in range(nb) for _ in range(k)] + [nb * (E + 1)], np.int64)
            got = self._tables[key] = (table, pos, off, np.ones(len(pos)))
        return got

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        self.check_fitted_depth(depth)
        # online, the most recent observation of a layer is exactly the block feature_layers names
        table, pos, off, ones = self._gather(depth, layer)
        # the gathered rows summed by a product with ones (one BLAS call, cheaper than a numpy reduction here)
        if self._rows == 1:  # batch-1 decode, the runtime's hot path: one flat gather
            return self._calibrated(self._link((ones @ table[self._ids_row[pos] + off])[None, :]), depth)
        return self._calibrated(self._link(ones @ table[self._ids[:, pos] + off]), depth)

    def state(self) -> dict[str, np.ndarray]:
        out = {"coef": self.coef, "intercept": self.intercept}
        if self.calib_x is not None:
            out.update(calib_x=self.calib_x, calib_y=self.calib_y)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        coef = np.asarray(arrays["coef"], np.float64)
        if coef.shape != self.coef.shape:
            raise ConfigError(f"learned: saved coefficients have shape {coef.shape}, this predictor's parameters "
                              f"need {self.coef.shape}; load it with the parameters it was saved with")
        if self.calibrate != "none" and "calib_x" not in arrays:
            raise ConfigError(f"learned: calibrate={self.calibrate!r} but the saved state has no calibration map; "
                              "fit it again or load it with calibrate='none'")
        self.coef = coef
        self.intercept = np.asarray(arrays["intercept"], np.float64)
        if self.calibrate != "none":
            self.calib_x = np.asarray(arrays["calib_x"], np.float64)
            self.calib_y = np.asarray(arrays["calib_y"], np.float64)
        self._tables = {}


class DenseLearnedPredictor(LearnedPredictor):
    """The reference for ``learned``'s online scoring: the dense product ``x @ coef.T + b`` on the multi-hot
    features, as ``learned`` computed it before the gather (not registered; for the differential test and
    eval/predictor_speed.py). ``from_fitted`` shares a fitted predictor's coefficients."""

    @classmethod
    def from_fitted(cls, pred: LearnedPredictor) -> "DenseLearnedPredictor":
        out = cls(pred.num_layers, pred.num_experts, pred.top_k, **pred.params)
        out.coef, out.intercept, out.fitted = pred.coef, pred.intercept, pred.fitted
        out.calib_x, out.calib_y = pred.calib_x, pred.calib_y
        return out

    def _start_request(self, rows: int) -> None:
        self._last = np.zeros((self.num_layers, rows, self.num_experts))

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        self._last[layer] = multi_hot(experts, self.num_experts)

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        self.check_fitted_depth(depth)
        x = np.concatenate([self._last[fl] for fl, _ in feature_layers(layer, target, self.num_layers, self.window)],
                           axis=1)
        z = x @ self.coef[depth - 1, layer].T + self.intercept[depth - 1, layer][None, :]
        return self._calibrated(self._link(z), depth)
