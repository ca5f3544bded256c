"""Prefetch rules: which experts to fetch for an upcoming MoE layer, given the predictor's scores.

Shared by the runtime and the simulator (neither imports the other; ``moecache.sim.prefetch`` re-exports
this module for the simulator's API).

At every MoE layer ``l``, after the router, for each depth ``d = 1..D`` the simulator asks the
predictor for layer ``l + d`` (wrapping into the next token), sums the rows of its answer (the
expected number of the unit's tokens that pick each expert) and hands the scores to the rule with
the per-layer budget ``B`` (default: ``top_k`` times the unit's tokens, at most the expert count).
The rule returns the experts it wants resident for that step, best first; the simulator fetches
those not resident, issuing copies in that order, and the policy picks the victims, never an expert
the current step needs nor one wanted for the same upcoming step (resident or fetched; a fetch that
finds no other victim is skipped).

Rules (``PREFETCH_RULES``), each ``rule(scores, budget, resident) -> experts``:

* ``topk`` (default): the ``B`` experts with the highest score (score > 0; ties to the lowest id);
  those already resident cost nothing, so at most ``B`` copies and often fewer.
* ``fill``: the highest-scoring experts (score > 0; ties to the lowest id) down to the ``B``-th one
  that is *not* resident: spends the whole budget on copies whenever the predictor has candidates.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .registry import Registry

PrefetchRule = Callable[[np.ndarray, int, Callable[[int], bool]], list[int]]

PREFETCH_RULES: Registry[PrefetchRule] = Registry("prefetch rule")


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Experts with score > 0, by score descending, ties to the lowest id."""
    idx = np.nonzero(scores > 0)[0]
    return idx[np.lexsort((idx, -scores[idx]))]


@PREFETCH_RULES.register("topk", "want the budget's most likely experts of the target layer; fetch those not resident")
def topk(scores: np.ndarray, budget: int, resident: Callable[[int], bool]) -> list[int]:
    return [int(e) for e in _ranked(scores)[:budget]]


@PREFETCH_RULES.register("fill", "spend the whole budget: the most likely experts down to the budget-th non-resident one")
def fill(scores: np.ndarray, budget: int, resident: Callable[[int], bool]) -> list[int]:
    out: list[int] = []
    fetches = 0
    for e in _ranked(scores):
        if fetches >= budget:
            break
        out.append(int(e))
        if not resident(int(e)):
            fetches += 1
    return out
