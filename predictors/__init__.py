"""Expert predictors: each module registers one predictor in ``PREDICTORS`` when imported.

Every module of this folder whose name does not start with ``_`` (and is not ``base``) is imported
here, so a new predictor is one new module (and its test): it registers itself with
``@PREDICTORS.register(name, help)`` and may define ``cpp_port`` for the simulator's C++ core.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import PREDICTORS, Predictor

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PREDICTORS", "Predictor"]
