"""Expert predictors: each module registers one predictor in ``PREDICTORS`` when imported."""

from __future__ import annotations

import importlib

from .base import PREDICTORS, Predictor

#: Modules that register a predictor, in listing order.
_MODULES = ("oracle", "prior", "temporal", "transition", "activation_matrix", "learned", "gate_lookahead")

for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["PREDICTORS", "Predictor"]
