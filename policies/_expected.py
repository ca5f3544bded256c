"""Expected steps until an expert is needed again: the ranking that ``activation`` and
``predicted`` share (not a policy; registers nothing).

For a key of layer ``l`` while layer ``c`` is being served, layer ``l`` next runs in
``d = ((l - c - 1) mod L) + 1`` layer steps (1 = the next layer, ``L`` = this layer at the next
token). Say the next token picks the expert at that layer with probability ``p1`` and every later
token with probability ``p`` (independently); the number of tokens after the next one before it is
picked again is then geometric, and the expected wait in layer steps is

    T = d + L * (1 - p1) / p          (p1 clamped to [0, 1], p to [1e-9, 1])

(with ``p1 = p`` this is ``d + L (1 - p) / p``). Evicting the largest ``T`` is Belady's rule with the
future replaced by this estimate. Ties go to the least recently used key (``last``), then the
lowest ``(layer, expert)``. ``T`` is computed elementwise as written (no reductions), so it is
exactly reproducible.
"""

from __future__ import annotations

import numpy as np

P_MIN = 1e-9


def expected_wait(keys: np.ndarray, p_next: np.ndarray, p_later: np.ndarray, current_layer: int,
                  num_layers: int, num_experts: int) -> np.ndarray:
    """``T`` for each key (``keys`` int64; per-token probabilities for the next token and later ones)."""
    layer = keys // num_experts
    d = ((layer - current_layer - 1) % num_layers + 1).astype(np.float64)
    return d + wait_beyond(p_next, p_later, num_layers)


def wait_beyond(p_next: np.ndarray, p_later: np.ndarray, num_layers: int) -> np.ndarray:
    """``X = L * (1 - p1) / p`` of ``T = d + X`` (clamped as above): the part of the wait that depends
    on the key's own layer state only, not on which layer is being served."""
    p1 = np.clip(p_next, 0.0, 1.0)
    q = np.clip(p_later, P_MIN, 1.0)
    return num_layers * (1.0 - p1) / q


def layer_distance(current_layer: int, num_layers: int) -> np.ndarray:
    """``d`` of every layer (float64, indexed by layer) while ``current_layer`` is being served."""
    return ((np.arange(num_layers) - current_layer - 1) % num_layers + 1).astype(np.float64)


def pick_largest(keys: np.ndarray, wait: np.ndarray, last: np.ndarray) -> int:
    """The key with the largest ``wait``; ties: smallest ``last``, then smallest key."""
    order = np.lexsort((keys, last, -wait))
    return int(keys[order[0]])
