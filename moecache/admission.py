"""The prefetch admission rule: is one prefetch copy worth issuing now? Shared by the runtime
(``moecache.runtime.core``) and the simulator (``moecache.sim.engine_python``; csrc/sim/driver.cpp
implements the same arithmetic in the same order, and the differential tests compare the two with ==).

A prefetch rule (``moecache.prefetch_rules``) ranks the experts wanted for a target layer; each candidate
that is not resident then passes this rule or is not issued. The rule weighs, in milliseconds:

* ``prob``: how likely the target layer needs the candidate: the predictor's expected number of the
  step's tokens that pick it, capped at 1 (``candidate_probability``);
* ``backlog_ms``: how long until the copy engine is free (copies already queued, demand and prefetch);
* ``first_ms``: how long until the next MoE layer's demand copies can start (its non-expert work, then
  its routing sync and policy: the profile's ``layer_host_ms``);
* ``lead``: how long until the target layer's experts are needed (``lead_ms``: in the simulator the
  current step's end, known once its demand copies are issued, plus the next layer's non-expert work,
  then one layer per further depth; in the runtime ``depth`` times the layer interval, modelled from
  the profile on its default ``model`` clock, measured on its ``measured`` clock: ``moecache.runtime.core``);
* ``copy_ms``: one expert copy;
* ``victim_prob``: the worth of the resident the copy would evict, as the same kind of probability:
  the larger of the predictor's score for it (for the victim's layer when it is one of the layers
  predicted; 0 otherwise) and the cache's *re-demand rate* (``VictimReuse``: of the residents evicted
  so far, the share that a demand access wanted back before any other eviction from their pool and
  before anything copied them in again); 0 when the pool has a free slot. The predictor speaks only of
  the victim's layer, and only where it predicts that layer; the re-demand rate is the policy's own
  record of what giving up its victim costs, counted against what refusing the copy would have
  changed: the victim is the policy's next to go, so keeping it pays only if it is wanted before the
  pool's next eviction would have taken it anyway.

A copy that could not even start before the target layer (``backlog_ms >= lead``) is *late* and
never issued: it would only queue in front of the target's own demand copies. Otherwise

    value = prob * saved  -  w * block  -  victim_prob * copy_ms  -  host_ms

where ``saved = min(copy_ms, lead - backlog_ms)`` is the stall the copy saves when the candidate is
needed (a demand copy would start at the target and stall the GPU ``copy_ms``; the prefetch has
``lead - backlog_ms`` of head start); ``block = max(0, backlog_ms + copy_ms - first_ms)`` is how far the
copy runs into the next MoE layer (``first_ms`` from now), delaying that layer's demand copies, with
``w = 1 - prob`` when the next layer is the target (a right prefetch is the copy that layer would have
made) and ``w = 1`` when the target is further ahead (the next layer's demand copies wait either way);
the third term is the copy that evicting a victim needed again costs (at its ``victim_prob``), and
``host_ms`` the host time issuing it adds to the step (the calibrated profile's ``prefetch_host_ms`` where the host, not the GPU,
is what the next layer waits for; in the runtime the profile's ``prefetch_host_ms`` on its ``model``
clock, 0 on its ``measured`` clock, whose measured layer interval holds its host work). The prefetch is
issued when ``value > 0``.

The predictor gate (``PredictorGate``): the rule above weighs each copy, but the predictor's call
is paid before any copy is weighed (the calibrated profile's ``predictor_host_ms`` per call per layer,
whether or not anything is then issued). The gate decides, per source layer (the MoE layer whose
routing the predictor has just read), whether to call the predictor at all. It keeps a ledger of
what that layer's predictions have been worth, in the rule's own milliseconds and with the rule's own
terms, realised: a prefetch issued from layer ``l`` enters ``l``'s ledger at its value *if unused*
(``-block - victim_prob * copy_ms - host``: the rule's value at ``prob = 0``, with the victim worth the
predictor's score for it alone: the re-demand rate is the same for every source layer and says nothing
of this layer's predictions, and booking it as a certain cost of every prefetch would turn layers off
whose prefetches the rule, with it, still finds worth issuing), and when a demand access
later hits it before it is evicted, the ledger gains the difference to its value *if used*
(``saved``, plus ``block`` where the target is the next layer, whose demand copy it replaces: the rule's
value at ``prob = 1``); each call of the predictor at ``l`` enters at ``-predictor_ms``. At each visit
of layer ``l`` the ledger accrued since the previous call is folded into ``l``'s estimate of the net
worth of one call (the plain mean over the first ``span`` calls, then an exponential average with weight
``1 / span``). While the estimate is below zero (after at least ``min_calls`` calls) the layer is *off*:
the predictor still observes the routing (its state stays current) but is not asked, and nothing is
prefetched from it; every ``probe_every``-th visit of an off layer calls it anyway (a probe: the
prediction and its prefetches as usual), and the layer is on again once the estimate is back to zero
or above. Everything the gate reads is a modelled time (the cost model's copy and host times, the
rule's terms) and counts, never a clock: given the trace and the profile it decides the same way in
the simulator's two engines and in the runtime (with the runtime's ``model`` clock), so prefetch
counts are reproducible. The probe rate bounds what an off layer costs (one call in ``probe_every``);
the estimate's span bounds how long a layer stays on after its predictions stopped paying.

Where the policy itself reads the predictor's scores (``predicted``) the predictor is called at every
layer anyway: its host time is paid regardless, and no gate is used.

``ADMISSIONS``: ``gated`` (the default: this rule and the predictor gate), ``cost`` (this rule, the
predictor called at every layer) and ``none`` (every candidate the prefetch rule picks is issued, where a
victim exists: the behaviour before the rule, kept for comparison).
"""

from __future__ import annotations

from .errors import ConfigError

#: Admission rules: ``gated`` = ``cost`` + the predictor gate; ``cost`` weighs each prefetch as above;
#: ``none`` issues every candidate.
ADMISSIONS = ("gated", "cost", "none")
#: The default admission rule (simulator, runtime, ``moecache bench``).
DEFAULT_ADMISSION = "gated"
#: Their codes in the C++ simulator core (csrc/sim/codes.h).
ADMISSION_CODES = {"none": 0, "cost": 1, "gated": 2}
#: The gate's defaults: the estimate's span (calls), an off layer's probe period (visits) and the calls
#: seen before a layer may be turned off.
GATE_SPAN = 16
GATE_PROBE_EVERY = 32
GATE_MIN_CALLS = 8


def check_admission(name: str) -> str:
    """``name`` if it is a known admission rule, else a one-line ``ConfigError``."""
    if name not in ADMISSIONS:
        raise ConfigError(f"unknown prefetch admission {name!r}; choose one of: {', '.join(ADMISSIONS)}")
    return name


class VictimReuse:
    """The cache's re-demand rate: of the residents evicted so far (by demand copies and prefetches
    alike), the share a demand access wanted back while it was still out (no copy had put it back) and
    before any other eviction from its pool: the evictions whose victim would have been kept had that
    one eviction not been made (the next eviction from the pool would have taken it otherwise).
    ``rate() = wanted_back / (evicted + 1)`` (0 before any eviction).

    Use: ``evicted(key, pool)`` for every eviction, ``inserted(key)`` for every key made resident (demand
    copy or prefetch), ``demanded(key, pool)`` for every demand access to a key that is not resident
    (before it is copied in or run elsewhere). The simulator's two engines and the runtime call it at the
    same points, so the rate, counts over integers, is the same in all three."""

    __slots__ = ("out", "pool_evictions", "evicted_n", "wanted_back")

    def __init__(self, num_pools: int) -> None:
        #: evicted keys no copy has put back and no demand has wanted yet -> their pool's eviction count then
        self.out: dict[int, int] = {}
        self.pool_evictions = [0] * num_pools
        self.evicted_n = 0
        self.wanted_back = 0

    def evicted(self, key: int, pool: int) -> None:
        self.pool_evictions[pool] += 1
        self.out[key] = self.pool_evictions[pool]
        self.evicted_n += 1

    def inserted(self, key: int) -> None:
        self.out.pop(key, None)

    def demanded(self, key: int, pool: int) -> None:
        at = self.out.pop(key, None)
        if at is not None and at == self.pool_evictions[pool]:
            self.wanted_back += 1

    def rate(self) -> float:
        """The share of evictions wanted back first (a probability in [0, 1))."""
        return self.wanted_back / (self.evicted_n + 1)


def victim_worth(predicted: float, reuse_rate: float) -> float:
    """A victim's ``victim_prob``: the larger of the predictor's capped score for it and the cache's
    re-demand rate (``VictimReuse.rate``)."""
    return predicted if predicted > reuse_rate else reuse_rate


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


def outcome_values(victim_prob: float, backlog_ms: float, first_ms: float, lead: float, copy_ms: float,
                   host_ms: float = 0.0) -> tuple[float, float]:
    """A prefetch's realised value, as the predictor gate books it: ``(if_unused, used_bonus)``, its value
    when its expert is never used (``prefetch_value`` at ``prob = 0``) and what a use adds to that (the
    value at ``prob = 1`` minus the value at ``prob = 0``). Only for an issued (not late) prefetch."""
    early = lead - backlog_ms
    saved = copy_ms if copy_ms < early else early
    block = backlog_ms + copy_ms - first_ms
    if block < 0.0:
        block = 0.0
    if_unused = -block - victim_prob * copy_ms - host_ms
    bonus = saved + block if lead <= first_ms else saved
    return if_unused, bonus


class PredictorGate:
    """Per source layer: call the predictor, or not (the module docstring gives the rule).

    Use, for each visit of MoE layer ``layer`` (once per step, after its demand accesses): ``open(layer)``;
    when it says True, call the predictor and weigh its candidates; book each issued prefetch with
    ``issued(layer, if_unused)`` (``outcome_values``) and each later use of one with ``used(source, bonus)``.
    The C++ simulator core (csrc/sim/driver.cpp) does the same arithmetic in the same order."""

    def __init__(self, num_layers: int, predictor_ms: float, *, span: int = GATE_SPAN,
                 probe_every: int = GATE_PROBE_EVERY, min_calls: int = GATE_MIN_CALLS):
        if span < 1 or probe_every < 1 or min_calls < 0:
            raise ConfigError(f"predictor gate needs span >= 1, probe_every >= 1, min_calls >= 0; got "
                              f"{span}, {probe_every}, {min_calls}")
        self.predictor_ms = float(predictor_ms)
        self.span, self.probe_every, self.min_calls = int(span), int(probe_every), int(min_calls)
        self.on = [True] * num_layers
        self.est = [0.0] * num_layers      # estimated net worth of one call (ms)
        self.ledger = [0.0] * num_layers   # value booked since the last fold (ms)
        self.calls = [0] * num_layers      # calls made (each folded at the layer's next decision)
        self.idle = [0] * num_layers       # visits skipped since the last call, while off
        #: Totals: predictor calls made, of them probes, and visits skipped.
        self.made = self.probes = self.skipped = 0

    def _fold(self, layer: int) -> None:
        n = self.calls[layer]
        if not n:
            return
        w = 1.0 / n if n < self.span else 1.0 / self.span
        self.est[layer] += w * (self.ledger[layer] - self.est[layer])
        self.ledger[layer] = 0.0

    def open(self, layer: int) -> bool:
        """Call the predictor at this visit of ``layer``? (True books the call's cost.)"""
        if self.on[layer]:
            self._fold(layer)
            if self.est[layer] < 0.0 and self.calls[layer] >= self.min_calls:
                self.on[layer] = False
                self.idle[layer] = 0
                self.skipped += 1
                return False
        else:
            self.idle[layer] += 1
            if self.idle[layer] < self.probe_every:
                self.skipped += 1
                return False
            self.idle[layer] = 0
            self._fold(layer)
            if self.est[layer] >= 0.0:
                self.on[layer] = True
            else:
                self.probes += 1
        self.calls[layer] += 1
        self.made += 1
        self.ledger[layer] -= self.predictor_ms
        return True

    def issued(self, layer: int, if_unused: float) -> None:
        """A prefetch was issued from ``layer``'s prediction, worth ``if_unused`` unless used."""
        self.ledger[layer] += if_unused

    def used(self, layer: int, bonus: float) -> None:
        """A prefetch issued from ``layer``'s prediction was used before its eviction."""
        self.ledger[layer] += bonus

    def stats(self) -> dict[str, int]:
        """Calls made, probes among them, visits skipped, and layers off now."""
        return {"predictor_calls": self.made, "predictor_probes": self.probes, "predictor_skipped": self.skipped,
                "layers_off": sum(1 for x in self.on if not x)}
