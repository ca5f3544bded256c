"""Expert cache policies: each module registers one policy in ``POLICIES`` when imported.

``_MODULES`` lists them in listing order; add a module here to register a new policy.
"""

from __future__ import annotations

import importlib

from .base import POLICIES, SCOPES, Policy, new_policy

#: Modules that register a policy, in listing order.
_MODULES = ("lru", "fifo", "lfu", "lrfu", "static", "activation", "predicted", "belady", "belady_bypass")

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["POLICIES", "SCOPES", "Policy", "new_policy"]
