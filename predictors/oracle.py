"""``oracle``: reads the future routing from the replay, the upper bound of prediction (simulator only).

The simulator hands it the replay's ``Future`` through ``set_future`` and keeps it positioned at
the step being served; ``predict(layer, depth)`` then looks at the step ``depth`` MoE layers ahead
(wrapping into the next unit of the replay, which may be the next request) and returns:

* when that step has as many rows as the current one (the same tokens at a later layer, or the
  next decode token): per row, ``f[e] = 1`` for every expert the row really picks;
* otherwise (e.g. a batched prefill step followed by a decode step): every row gets
  ``f[e]`` = the share of the target step's tokens that pick ``e``;

then the mass missing to ``top_k`` (ids the trace lacks) is spread in proportion to ``1 - f``:
``p = f + (top_k - sum f) * (1 - f) / sum(1 - f)``, so each row sums to ``top_k`` and stays in
[0, 1]. Past the end of the replay every expert gets ``top_k / E``. It needs no fitting and keeps
no state beyond the current row count. Cost: ``O(rows * experts)`` per prediction.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import PREDICTORS, Predictor


@PREDICTORS.register("oracle", "reads the future routing of the replay (simulator only): the upper bound of prediction")
class OraclePredictor(Predictor):
    name = "oracle"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(num_layers, num_experts, top_k)
        self._future: Any = None
        self._rows = 1

    def set_future(self, future: Any) -> None:
        """The replay's ``Future`` (``moecache.sim.schedule``): ``target(depth)`` gives the ids ahead."""
        self._future = future

    def reset(self) -> None:
        self._rows = 1

    def observe(self, layer: int, experts: np.ndarray, hidden: Any = None) -> None:
        e = np.asarray(experts)
        self._rows = 1 if e.ndim == 1 else int(e.shape[0])

    def predict(self, layer: int, depth: int) -> np.ndarray:
        if self._future is None:
            raise ConfigError("the oracle predictor reads the future: it runs only inside the simulator, "
                              "which calls set_future()")
        if depth < 1:
            raise ConfigError(f"depth must be >= 1 (MoE layers ahead), got {depth}")
        E, k, rows = self.num_experts, float(self.top_k), self._rows
        ids = self._future.target(depth)
        if ids is None:
            return np.full((rows, E), k / E)
        f = np.zeros((ids.shape[0], E))
        r, c = np.nonzero(ids >= 0)
        f[r, ids[r, c]] = 1.0
        if ids.shape[0] != rows:
            f = np.broadcast_to(f.mean(axis=0), (rows, E)).copy()
        rest = k - f.sum(axis=1, keepdims=True)
        room = 1.0 - f
        total = room.sum(axis=1, keepdims=True)
        # a row with every expert picked (top_k == experts) has no room and no missing mass
        return f + rest * room / np.where(total > 0, total, 1.0)
