"""Expert cache policies: each module registers one policy in ``POLICIES`` when imported.

Every module of this folder whose name does not start with ``_`` (and is not ``base``) is imported
here, so a new policy is one new module (and its test): it registers itself with
``@POLICIES.register(name, help)`` and may define ``cpp_port`` for the simulator's C++ core.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import POLICIES, SCOPES, CppPort, Policy, new_policy

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["POLICIES", "SCOPES", "CppPort", "Policy", "new_policy"]
