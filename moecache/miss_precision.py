"""Precision chosen per miss (after HOBBIT): a miss whose expert matters little to its tokens is copied as a
lower-precision copy; a resident low copy is upgraded to the full one when the expert is used again.

One rule, called by the runtime (``moecache.runtime.core``) and the simulator (``moecache.sim.engine_python``)
alike, so that both serve the same misses low.

*Gate share.* For one MoE layer call, an expert's share for one token is its gate weight divided by the sum of
that token's top-k weights, times ``top_k`` (1.0 = an even split; the definition does not depend on whether a
family renormalises its top-k weights). The expert's share for the call is the largest over the tokens that
picked it: a batch serves the expert low only if every one of its tokens gives it little weight.

*The rule* (``copy_precision``): a miss is copied low when its share is below ``below``, else in full; a hit on
a low copy is an upgrade (the full copy is fetched before the kernel reads it); a hit on a full copy needs no
copy. Prefetches and streamed copies are always full (no gate weight is known when they are issued).

*Cost.* The low copies live in a second host store beside the full one: every expert once more, in the low
format (``host_bytes``), for example about 27% more host memory for int4 g64 beside bf16 experts. On the device,
one *landing* of ``top_k`` low-format rows (one token's misses at a layer): a low copy arrives there and is
expanded into its pool slot at once, before the layer's kernel, so the landing is free again for the next
copies (a batch's misses go through it ``top_k`` at a time). Its bytes come out of the pool's budget
(``slots_with_landing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import validate as V
from .errors import ConfigError
from .quant import ExpertFormat, resolve_format

#: The formats a low copy may take.
LOW_FORMATS = ("int8", "int4")
#: Default threshold: a miss whose gate share is below half an even split is copied low.
DEFAULT_BELOW = 0.5

#: ``copy_precision`` verdicts.
LOW, FULL, UPGRADE = "low", "full", "upgrade"


@dataclass(frozen=True)
class MissPrecisionRule:
    """Serve a miss with a ``fmt`` copy when its gate share is below ``below`` (module docstring)."""

    fmt: ExpertFormat
    below: float

    def describe(self) -> str:
        return f"{self.fmt.describe()} below share {self.below:g}"

    def host_bytes(self, total_experts: int, dense_expert_bytes: int) -> int:
        """Approximate host bytes of the second (low) copy of ``total_experts`` experts of ``dense_expert_bytes``
        bf16 bytes each (the runtime states its exact store size)."""
        weights = dense_expert_bytes / 2
        return int(total_experts * np.ceil(weights * self.fmt.bits_per_weight() / 8))


def slots_with_landing(slots: int, pools: int, landing_rows: int, dense_bytes: int, low_bytes: int) -> int:
    """Slots per pool that the memory of ``slots`` dense slots in each of ``pools`` pools holds once the landing
    (``landing_rows`` = top_k rows of ``low_bytes``, shared by every pool) is taken out of it."""
    return max(0, (slots * pools * dense_bytes - landing_rows * low_bytes) // (pools * dense_bytes))


def resolve_rule(low_precision_misses: Any, below: Any = DEFAULT_BELOW, group_size: Any = None
                 ) -> MissPrecisionRule | None:
    """The rule asked for (None: off). Raises a one-line ``ConfigError`` for an unknown format, a bad group size
    or a threshold outside (0, top_k]."""
    if low_precision_misses is None or low_precision_misses is False:
        return None
    name = V.choice("low_precision_misses", str(low_precision_misses).lower()
                    if isinstance(low_precision_misses, str) else low_precision_misses, LOW_FORMATS)
    below = V.real("low_precision_below", below, minimum=0.0)
    if not below > 0.0:
        raise ConfigError(f"low_precision_below={below!r} must be > 0 (a gate share; 1.0 = an even split of the "
                          f"top-k weights, default {DEFAULT_BELOW})")
    fmt = resolve_format(name, group_size)
    assert fmt is not None
    return MissPrecisionRule(fmt, float(below))


def gate_shares(ids: np.ndarray, weights: np.ndarray) -> dict[int, float]:
    """``ids``, ``weights``: ``(tokens, top_k)`` of one MoE layer call -> each picked expert's share (module
    docstring). Ids < 0 (missing, dropped) are skipped; a token whose weights sum to 0 or are not finite gives
    each of its experts an even share (1.0)."""
    ids = np.asarray(ids).reshape(-1, np.shape(ids)[-1])
    w = np.asarray(weights, dtype=np.float64).reshape(ids.shape)
    k = ids.shape[1]
    total = w.sum(axis=1, keepdims=True)
    ok = np.isfinite(total) & (total > 0)
    share = np.where(ok, w * k / np.where(ok, total, 1.0), 1.0)
    out: dict[int, float] = {}
    for e, s in zip(ids.ravel().tolist(), share.ravel().tolist()):
        if e >= 0 and s > out.get(e, -1.0):
            out[e] = s
    return out


def copy_precision(resident_low: bool | None, share: float, below: float) -> str | None:
    """The copy one need takes: ``resident_low`` is None for a miss, True for a hit on a low copy, False for a
    hit on a full copy. Returns ``LOW``, ``FULL``, ``UPGRADE`` or None (no copy)."""
    if resident_low is None:
        return LOW if share < below else FULL
    return UPGRADE if resident_low else None


__all__ = ["MissPrecisionRule", "resolve_rule", "slots_with_landing", "gate_shares", "copy_precision", "LOW_FORMATS", "DEFAULT_BELOW",
           "LOW", "FULL", "UPGRADE"]
