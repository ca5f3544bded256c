"""The predictor interface shared by the simulator and the runtime.

A predictor watches routing as it happens and says, for the MoE layer ``depth`` layers ahead, how
likely each expert is to be selected. Depth counts MoE layers, not model layers, and wraps into the
next token: from trace layer ``l`` with ``L`` MoE layers, depth ``d`` targets layer ``(l + d) % L``
of the current token when ``l + d < L``, else of the next token.

Call protocol (one stream of tokens, batch rows side by side):

* ``reset()`` when a new request (sequence) starts;
* ``observe(layer, experts, hidden=None)`` after the router of MoE layer ``layer`` has chosen
  ``experts`` (int array ``(rows, top_k)``, negative ids = missing); ``hidden`` is that layer's
  input hidden state ``(rows, hidden_size)`` where the runtime has it, else None;
* ``predict(layer, depth)`` right after ``observe(layer, ...)``: float64 array ``(rows, experts)``,
  each row in [0, 1] summing to ``top_k`` (a probability per expert of being selected).

Learned predictors are fitted with ``fit(trace)`` on sequences that are never scored, and saved with
``save(path)`` / ``Predictor.load(path)`` as JSON + ``.npz`` (no pickle).
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np

from ..atomic import write_atomic, write_json_atomic
from ..errors import ConfigError
from ..registry import Registry

PREDICTORS: Registry[type["Predictor"]] = Registry("predictor")


class Predictor:
    """Base class. Subclasses set ``name`` and override ``observe`` / ``predict`` (and ``fit``)."""

    name: ClassVar[str] = "base"
    #: True when ``fit`` must be called before use (learned from a trace).
    needs_fit: ClassVar[bool] = False
    #: True when the predictor reads hidden states and router weights (needs the model).
    needs_model: ClassVar[bool] = False
    #: How to get a fitted instance (said where one is built by name but must be fitted first).
    fit_hint: ClassVar[str] = "pass an instance after .fit(trace) (or Predictor.load(path))"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, **params: Any):
        if num_layers < 1 or not 1 <= top_k <= num_experts:
            raise ConfigError(f"a predictor needs num_layers >= 1 and top_k in 1..num_experts; got "
                              f"{num_layers} layers, {num_experts} experts, top_k {top_k}")
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.params = dict(params)
        self.fitted = not self.needs_fit

    # -- protocol ------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new request starts: forget per-request state (fitted state stays)."""

    def fit(self, trace: Any) -> "Predictor":
        """Learn from a trace (``moecache.trace.Trace``). The default predictor needs no fitting."""
        self.fitted = True
        return self

    def observe(self, layer: int, experts: np.ndarray, hidden: Any = None) -> None:
        raise NotImplementedError

    def predict(self, layer: int, depth: int) -> np.ndarray:
        raise NotImplementedError

    def check_fitted_depth(self, depth: int) -> None:
        """A one-line error where ``depth`` lies past the ``max_depth`` this (fitted) predictor answers."""
        if depth > self.max_depth:
            raise ConfigError(f"{self.name} was fitted up to depth {self.max_depth}, asked for {depth}: build it "
                              f"with max_depth={depth} and fit again")

    # -- helpers -------------------------------------------------------------------------------
    def target(self, layer: int, depth: int) -> tuple[int, int]:
        """``(target_layer, token_offset)`` of the MoE layer ``depth`` ahead of ``layer``."""
        if depth < 1:
            raise ConfigError(f"depth must be >= 1 (MoE layers ahead), got {depth}")
        t = layer + depth
        return t % self.num_layers, t // self.num_layers

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Turn non-negative scores ``(rows, experts)`` into probabilities summing to ``top_k`` per row,
        each in [0, 1] (mass above 1 is capped and handed to the others in proportion).

        Per row: ``p = s * top_k / sum(s)``; while some ``p > 1``, every expert with ``p >= 1`` is fixed
        at 1 and the remaining mass ``top_k - #fixed`` is shared among the others in proportion to
        their scores (evenly where they all score 0). A row of zeros gives ``top_k / experts`` each.
        Negative scores count as 0. All rows are processed at once (each round caps at least one
        expert in every row that still overflows, so there are at most ``top_k`` rounds).
        """
        # row-contiguous: numpy sums a contiguous row pairwise, a strided one in order (other bits)
        s = np.ascontiguousarray(np.maximum(np.asarray(scores, dtype=np.float64), 0.0))
        if s.ndim == 1:
            s = s[None, :]
        if s.shape[0] == 1:
            return self._normalise_row(s[0])[None, :]
        rows, n = s.shape
        k = float(self.top_k)
        total = s.sum(axis=1, keepdims=True)
        empty = total[:, 0] <= 0
        p = s * (k / np.where(empty[:, None], 1.0, total))
        p[empty] = k / n
        capped = np.zeros(s.shape, bool)
        over = (p > 1.0 + 1e-12).any(axis=1)
        while over.any():
            capped[over] |= p[over] >= 1.0
            free = ~capped[over]
            rest = k - capped[over].sum(axis=1, keepdims=True)
            base = np.where(free, s[over], 0.0).sum(axis=1, keepdims=True)
            nfree = np.maximum(free.sum(axis=1, keepdims=True), 1)
            share = np.where(base > 0, s[over] * (rest / np.where(base > 0, base, 1.0)),
                             np.broadcast_to(rest / nfree, free.shape))
            p[over] = np.where(free, np.where(rest > 0, share, 0.0), 1.0)
            over = (p > 1.0 + 1e-12).any(axis=1)
        return p

    def _normalise_row(self, s: np.ndarray) -> np.ndarray:
        """``normalise`` of one row (batch-1 decode, the runtime's hot path): the same operations in the same
        order on a 1-D array, without the row masks (faster at batch 1: eval/predictor_speed.py; a test
        checks equal bits)."""
        n = s.shape[0]
        k = float(self.top_k)
        total = s.sum()
        p = np.full(n, k / n) if total <= 0 else s * (k / total)
        if not (p > 1.0 + 1e-12).any():
            return p
        capped = np.zeros(n, bool)
        while (p > 1.0 + 1e-12).any():
            capped |= p >= 1.0
            free = ~capped
            rest = k - capped.sum()
            if rest > 0:
                base = np.where(free, s, 0.0).sum()
                share = s * (rest / base) if base > 0 else np.full(n, rest / max(int(free.sum()), 1))
                p = np.where(free, share, 1.0)
            else:
                p = np.where(free, 0.0, 1.0)
        return p

    def cpp_port(self, depths: list[int]) -> dict[str, Any] | None:
        """``sim_replay`` options that run this predictor inside the simulator's C++ core
        (``"predictor"``: a PredictorCode of csrc/sim/codes.h, with its fitted arrays) for the
        prediction ``depths`` the replay asks, or None: the C++ engine then calls the Python object
        itself and streams its predictions. A port must give the very same predictions (the
        differential tests of tests/test_sim_cpp.py cover every port)."""
        return None

    # -- persistence ---------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Fitted arrays to save. Override in learned predictors."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of ``state``."""

    def save(self, path: str | os.PathLike) -> None:
        """Save as ``path`` (a folder): ``predictor.json`` + ``state.npz``. Written atomically."""

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        arrays = self.state()
        write_atomic(os.path.join(path, "state.npz"), lambda f: np.savez(f, **arrays))
        write_json_atomic(os.path.join(path, "predictor.json"), {
            "name": self.name, "num_layers": self.num_layers, "num_experts": self.num_experts,
            "top_k": self.top_k, "params": self.params, "fitted": self.fitted,
        })

    @staticmethod
    def load(path: str | os.PathLike) -> "Predictor":
        path = os.fspath(path)
        with open(os.path.join(path, "predictor.json")) as f:
            head = json.load(f)
        cls = PREDICTORS.get(head["name"])
        pred = cls(head["num_layers"], head["num_experts"], head["top_k"], **head["params"])
        with np.load(os.path.join(path, "state.npz"), allow_pickle=False) as z:
            pred.load_state({k: z[k] for k in z.files})
        pred.fitted = bool(head["fitted"])
        return pred
