"""``activation``: activation-aware priority in the style of MoE-Infinity.

MoE-Infinity (Xue et al., 2024) traces, per request, how often each (layer, expert) has been
activated (its "expert activation matrix") and keeps the experts the running request keeps using,
with a layer-position term for how soon a layer runs again. This policy turns the same two signals
into one number, the expected wait until the expert is needed (see ``_expected``). With ``s`` the
steps served at layer ``l`` so far and ``g = 2^(-1 / half_life)`` (``g = 1`` when half_life = 0):

    a[l, e]  the current request's tokens that used (l, e), each weighted g^(steps since)
             (stored with the step of its last update; reset by begin_request)
    N[l]     the request's tokens seen at layer l, weighted alike: each step N = N * g, then every
             access of c tokens adds c / top_k                         (reset by begin_request)
    h[l, e]  tokens of all requests so far that used (l, e);  H[l] = sum_e h[l, e]  (never reset)
    q[l, e]  = top_k * (h[l, e] + 1) / (H[l] + E)          long-run per-token probability
    p[l, e]  = (a[l, e] + alpha * q[l, e]) / (N[l] + alpha)   the request's recent activation
                                                            ratio, pulled towards the long-run one
    T        = d(l) + L * (1 - p) / p,   d(l) = ((l - current - 1) mod L) + 1   (p1 = p in _expected)

Victim: the unprotected resident with the largest ``T`` (expected to be needed last); ties to the
least recently used, then the lowest ``(layer, expert)``. In layer scope ``d`` is the same for all
keys of a pool, so the rank is ``p``; in global scope layers that run soon keep their experts.
``alpha`` (default 32 tokens) weighs the long-run ratio against the request's; ``half_life``
(default 16 steps of the layer, about 16 decode tokens; 0 = no decay) lets the request's ratio
follow its recent tokens. The defaults were chosen on the Llama-4 and Mixtral traces (see
``eval/results/policy_table.md``). Floating point: ``a * g ** (s - s_key)`` with ``pow``, then the
formulas left to right as written. Order structure: ``_wait_order.WaitOrder`` keeps each layer's
residents sorted by their layer-local part of ``T`` and re-sorts a layer only after its state changed,
so a victim compares one candidate per layer of the pool instead of scanning it (same answer as
the scan, ``victim_scan``, kept as the reference). Cost: ``O(1)`` per access, ``O(log m)`` per
insertion, per eviction ``O(layers of the pool)`` plus a re-sort of the layers that changed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ConfigError
from ._expected import expected_wait, layer_distance, pick_largest, wait_beyond
from ._wait_order import WaitOrder
from .base import POLICIES, CppPort, Policy


@POLICIES.register("activation", "MoE-Infinity-style: the request's (decayed) activation ratio and layer distance")
class Activation(Policy):
    name = "activation"
    defaults = {"alpha": 32.0, "half_life": 16.0}

    def __init__(self, capacity: int, num_layers: int, num_experts: int, **kw: Any):
        super().__init__(capacity, num_layers, num_experts, **kw)
        alpha, hl = self.params["alpha"], self.params["half_life"]
        if not alpha > 0 or hl < 0:
            raise ConfigError(f"activation: alpha must be > 0 and half_life >= 0 (0 = no decay); got {alpha}, {hl}")
        self.g = 2.0 ** (-1.0 / hl) if hl > 0 else 1.0
        n = self.num_layers * self.num_experts
        self._a = np.zeros(n, np.float64)
        self._a_step = np.zeros(n, np.int64)
        self._N = np.zeros(self.num_layers, np.float64)
        self._step = np.zeros(self.num_layers, np.int64)
        self._h = np.zeros(n, np.int64)
        self._H = np.zeros(self.num_layers, np.int64)
        self._last = np.zeros(n, np.int64)
        self._order = WaitOrder(self.num_layers, self.num_experts)
        self._dist_layer = -1
        self._dist = layer_distance(0, self.num_layers)

    def on_request(self) -> None:
        self._a[:] = 0.0
        self._N[:] = 0.0
        self._order.invalidate_all()

    def begin_layer(self, layer: int) -> None:
        super().begin_layer(layer)
        self._step[layer] += 1
        self._N[layer] = self._N[layer] * self.g
        self._order.invalidate(layer)

    def on_access(self, key: int, count: int) -> None:
        layer = key // self.num_experts
        s = self._step[layer]
        self._a[key] = self._a[key] * self.g ** int(s - self._a_step[key]) + count
        self._a_step[key] = s
        self._N[layer] = self._N[layer] + count / self.top_k
        self._h[key] += count
        self._H[layer] += count
        self._last[key] = self.clock
        self._order.invalidate(layer)

    def on_insert(self, key: int) -> None:
        if self._last[key] < self.clock:  # arrival counts as recency (for ties), not as use
            self._last[key] = self.clock
        self._order.add(key, int(self._last[key]), self.beyond)

    def on_evict(self, key: int) -> None:
        self._order.remove(key)

    def probability(self, keys: np.ndarray) -> np.ndarray:
        """``p`` of the formula above for each key, now."""
        E, k = self.num_experts, float(self.top_k)
        layer = keys // E
        a = self._a[keys] * self.g ** (self._step[layer] - self._a_step[keys]).astype(np.float64)
        q = k * (self._h[keys] + 1.0) / (self._H[layer] + E)
        alpha = self.params["alpha"]
        return (a + alpha * q) / (self._N[layer] + alpha)

    def beyond(self, keys: np.ndarray) -> np.ndarray:
        """``X`` of ``T = d + X`` for each key: the part of the expected wait set by its layer's state."""
        p = self.probability(keys)
        return wait_beyond(p, p, self.num_layers)

    def victim(self, pool: int, protected: Iterable[int]) -> int | None:
        if self._dist_layer != self.layer:
            self._dist, self._dist_layer = layer_distance(self.layer, self.num_layers), self.layer
        layers = (pool,) if self.num_pools > 1 else range(self.num_layers)
        return self._order.victim(layers, protected, self._dist, self.beyond, self._last)

    def victim_scan(self, pool: int, protected: Iterable[int]) -> int | None:
        """The reference: score every unprotected resident of the pool (what ``victim`` must equal)."""
        keys = np.fromiter((k for k in self._members[pool] if k not in protected), np.int64)
        if keys.size == 0:
            return None
        p = self.probability(keys)
        wait = expected_wait(keys, p, p, self.layer, self.num_layers, self.num_experts)
        return pick_largest(keys, wait, self._last[keys])

    #: The C++ core's PolicyCode of this class (predicted: 8).
    _CPP_CODE = 7

    def cpp_port(self) -> CppPort:
        """The C++ core's activation (PolicyCode 7): alpha and g, and the powers of g as tables
        (``powers_of``)."""
        g = float(self.g)
        return CppPort(self._CPP_CODE, options={"alpha": float(self.params["alpha"]), "g": g}, tables=powers_of(g))


def powers_of(g: float) -> Callable[[Any], dict[str, Any]]:
    """The powers ``g ** n`` for n = 0..units of a schedule (a layer's step count never exceeds the
    units), made by the calls this policy makes: Python's ``float ** int`` in ``on_access`` (libm
    pow) and numpy's ``power`` in ``probability`` (vectorised; it may differ from libm in the last
    bit, but it is elementwise, so the value of each n does not depend on the array around it). The
    C++ core reads them instead of computing its own, so both use the very same doubles."""

    def tables(schedule: Any) -> dict[str, Any]:
        n = schedule.num_units + 1
        acc = np.array([g ** i for i in range(n)], np.float64)
        rank = np.ascontiguousarray(g ** np.arange(n).astype(np.float64), np.float64)
        return {"pow_acc": acc, "pow_rank": rank}

    return tables
