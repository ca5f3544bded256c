"""The simulator's name for the prefetch rules (``moecache.prefetch_rules``, shared with the runtime)."""

from __future__ import annotations

from ..prefetch_rules import PREFETCH_RULES, PrefetchRule, fill, topk

__all__ = ["PREFETCH_RULES", "PrefetchRule", "fill", "topk"]
