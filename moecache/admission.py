"""The prefetch admission rule: is one prefetch copy worth issuing now? Shared by the runtime
(``moecache.runtime.core``) and the simulator (``moecache.sim.engine_python``; csrc/sim/driver.cpp
implements the same arithmetic in the same order, and the differential tests compare the two with ==).

A prefetch rule (``moecache.prefetch_rules``) ranks the experts wanted for a target layer; each candidate
that is not resident then passes this rule or is not issued. The rule weighs, in milliseconds:

* ``prob``: how likely the target layer needs the candidate: the predictor's expected number of the
  step's tokens that pick it, capped at 1 (``candidate_probability``);
* ``backlog_ms``: how long until the copy engine is free (copies already queued, demand and prefetch);
* ``first_ms``: how long until the next MoE layer's experts are needed;
* ``lead``: how long until the target layer's experts are needed (``lead_ms``: in the simulator the
  current step's end, known once its demand copies are issued, plus the next layer's non-expert work,
  then one layer per further depth; in the runtime ``depth`` times the measured layer interval);
* ``copy_ms``: one expert copy;
* ``victim_prob``: the worth of the resident the copy would evict, as the same kind of probability
  (the predictor's, for the victim's layer when it is one of the layers predicted; 0 otherwise, and
  0 when the pool has a free slot).

A copy that could not even start before the target layer (``backlog_ms >= lead``) is *late* and
never issued: it would only queue in front of the target's own demand copies. Otherwise

    value = prob * saved  -  w * block  -  victim_prob * copy_ms  -  host_ms

where ``saved = min(copy_ms, lead - backlog_ms)`` is the stall the copy saves when the candidate is
needed (a demand copy would start at the target and stall the GPU ``copy_ms``; the prefetch has
``lead - backlog_ms`` of head start); ``block = max(0, backlog_ms + copy_ms - first_ms)`` is how far the
copy runs into the next MoE layer (``first_ms`` from now), delaying that layer's demand copies, with
``w = 1 - prob`` when the next layer is the target (a right prefetch is the copy that layer would have
made) and ``w = 1`` when the target is further ahead (the next layer's demand copies wait either way);
the third term is the copy that evicting a victim needed again costs, and ``host_ms`` the host time
issuing it adds to the step (the calibrated profile's ``prefetch_host_ms`` where the host, not the GPU,
is what the next layer waits for; 0 in the runtime, whose measured layer interval holds its host
work). The prefetch is issued when ``value > 0``.

``ADMISSIONS``: ``cost`` (this rule, the default) and ``none`` (every candidate the prefetch rule
picks is issued, where a victim exists: the behaviour before the rule, kept for comparison).
"""

from __future__ import annotations

from .errors import ConfigError

#: Admission rules: ``cost`` weighs each prefetch as above; ``none`` issues every candidate.
ADMISSIONS = ("cost", "none")
#: Their codes in the C++ simulator core (csrc/sim/codes.h).
ADMISSION_CODES = {"none": 0, "cost": 1}


def check_admission(name: str) -> str:
    """``name`` if it is a known admission rule, else a one-line ``ConfigError``."""
    if name not in ADMISSIONS:
        raise ConfigError(f"unknown prefetch admission {name!r}; choose one of: {', '.join(ADMISSIONS)}")
    return name


def candidate_probability(score: float) -> float:
    """A predictor score (expected tokens of the step that pick the expert) as a need probability."""
    return score if score < 1.0 else 1.0


def lead_ms(depth: int, first_ms: float, layer_ms: float) -> float:
    """Time until the layer ``depth`` MoE layers ahead needs its experts: ``first_ms`` until the next one
    does, then ``layer_ms`` per layer."""
    return first_ms + (depth - 1) * layer_ms


def prefetch_value(prob: float, victim_prob: float, backlog_ms: float, first_ms: float, lead: float,
                   copy_ms: float, host_ms: float = 0.0) -> float:
    """Expected milliseconds a prefetch saves (negative: it costs); ``-inf`` when it is late."""
    if backlog_ms >= lead:
        return float("-inf")
    early = lead - backlog_ms
    saved = copy_ms if copy_ms < early else early
    block = backlog_ms + copy_ms - first_ms
    if block < 0.0:
        block = 0.0
    weight = 1.0 - prob if lead <= first_ms else 1.0
    return prob * saved - weight * block - victim_prob * copy_ms - host_ms


def admit_prefetch(prob: float, victim_prob: float, backlog_ms: float, first_ms: float, lead: float,
                   copy_ms: float, host_ms: float = 0.0) -> bool:
    """Issue the prefetch? (``prefetch_value(...) > 0``; the module docstring gives the rule.)"""
    return prefetch_value(prob, victim_prob, backlog_ms, first_ms, lead, copy_ms, host_ms) > 0.0
