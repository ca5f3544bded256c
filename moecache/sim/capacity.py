"""Cache capacity from what the user asks: a share of the experts (``25%``) or a slot count (``12``).

A percentage is a share of all experts of the pool: in ``layer`` scope ``round(p * experts)`` slots
per layer, in ``global`` scope ``round(p * layers * experts)`` slots in all, where ``round(x)`` is
``floor(x + 0.5)`` (halves round up), and never fewer than ``top_k`` slots (one token's experts must
fit at once). A plain integer is a slot count per pool (per layer in ``layer`` scope, in all in
``global`` scope) and must be at least ``top_k``.
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def parse_capacities(text: str) -> list[str]:
    """``"25%,50%"`` -> ``["25%", "50%"]`` (checked by ``resolve_capacity`` later)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError("no capacity given; use e.g. --capacity 25%,50% (share of the experts) or 12 (slots)")
    return items


def resolve_capacity(spec: str, num_layers: int, num_experts: int, top_k: int, scope: str) -> int:
    """Slots per pool for ``spec`` (see the module docstring)."""
    s = str(spec).strip()
    if s.endswith("%"):
        try:
            p = float(s[:-1]) / 100.0
        except ValueError:
            raise ConfigError(f"capacity {spec!r} is not a percentage like 25%") from None
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"capacity {spec!r} must be a share in (0%, 100%]")
        total = num_experts if scope == "layer" else num_layers * num_experts
        return max(top_k, int(math.floor(p * total + 0.5)))
    try:
        slots = int(s)
    except ValueError:
        raise ConfigError(f"capacity {spec!r} is neither a percentage (25%) nor a slot count (12)") from None
    if slots < top_k:
        raise ConfigError(f"capacity {slots} slots is below top_k={top_k}; one token's experts must fit at once")
    return slots
