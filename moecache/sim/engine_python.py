"""The Python replay engine, the readable reference: one policy (and optionally a predictor) over a
schedule, with timing. ``simulate`` (``moecache.sim.simulator``) checks the configuration and picks this
engine or the C++ one (``engine_cpp``), which follows this loop step by step.

Per replay step ``g`` (unit ``u``, MoE layer ``l``; see ``schedule``), in this order:

1. the future (if anything reads it) is positioned at ``g``; ``policy.begin_layer(l)``; the GPU runs
   the layer's non-expert work (``moecache.cost.timing``), which ends at ``t_route``;
2. with a predictor: ``observe(l, ids of the unit at l)``; a policy that reads scores gets the row
   mean of ``predict(l, score_depth)`` (``on_scores``);
3. demand: for each needed expert in ascending key order, ``policy.access(key, tokens)``; an
   expert resident now is a hit (all its tokens count as hit accesses; ready if its copy ended by
   ``t_route``). Misses are then served, in ascending key order, by a copy that ``insert``s them
   (the policy evicts, never a key of the current wave) or by a CPU run, as the miss rule decides;
4. prefetch (depth ``D`` > 0): under the ``gated`` admission (and a policy that reads no scores) the
   predictor gate (``moecache.admission.PredictorGate``) is asked first, ``open(l)``; where it says no,
   the step skips the predictor's ``predict`` calls and their host time (``predictor_host``) and prefetches
   nothing. Otherwise ``predict(l, d)`` for every depth ``d`` in ``1..D``, then for ``d = 1..D`` the
   prefetch rule picks the experts it wants for step ``g + d`` from the summed prediction rows; each
   non-resident one is inserted (protected: the current step's experts and those wanted for step
   ``g + d`` that are resident or already fetched), if the admission rule (``moecache.admission``, default
   ``gated``) takes it, with ``now`` = the host clock plus ``prefetch_host_ms`` (when the copy would be
   issued): probability = the candidate's summed score capped at 1; backlog = the copy engine's free time
   minus ``now`` (at least 0); first = ``max(gpu free - now, 0) + ne + layer_host`` (the next layer's
   demand copies are issued once its routing is on the host and its policy has run); lead = ``first +
   (d - 1) * (ne + layer_host + the sum of gpu(c) over the step's needs in key order)``,
   ``ne = non_expert(rows)``; host = ``now - gpu free`` clipped to ``[0, prefetch_host_ms]``; victim =
   ``policy.victim`` of the key's pool when it
   is full, worth ``victim_worth`` of its own capped score at the first depth ``1..D`` whose layer is the
   victim's (else 0) and the re-demand rate (``VictimReuse``: every eviction, demand or prefetch, is
   booked with its pool, every insert, and every demand access to a non-resident key, at that access, in
   step 3's order); the gate books the victim at its score alone;
   under ``gated`` each issued prefetch is booked to the gate's layer ``l`` (``outcome_values``), and a
   demand hit on a prefetched, not yet used expert books its use;
5. the GPU computes the step's experts; the step ends when they and its CPU runs are done.

Under ``copy_queue="worker"`` (``moecache.sim.copy_queue``: the runtime's copy worker) the copy engine is not
a FIFO: at each step, once the host's clock ``h`` is known, the queued prefetches the worker has taken by ``h``
are committed (``advance``), then the step's prefetches (those aimed at ``g``) that are still queued and not
needed are cancelled (the policy evicts them; no copy); a needed expert still queued is issued at ``h`` as a
demand copy; the queue is advanced again at each wave's start; demand copies start behind the copies taken
only; a victim's queued copy is cancelled; a scan policy's host time is charged per eviction, not per insert;
a step's prefetches are queued together at the host's clock after the last of them, priority ``d + 1 - p``;
and the miss rule and the admission rule read the runtime's own backlog estimate (every copy issued, in a
FIFO: ``WorkerQueue.issued_free``).

Sequences are requests: ``policy.begin_request()`` and ``predictor.reset()`` at each new sequence
(the predictor is also reset when a request's row count changes, e.g. from a batched prefill step
to decode steps, as the predictor protocol requires). The cache carries over between requests.
Float arithmetic is done in the order written here and in ``moecache.cost.timing``, so a reimplementation that
follows the same order reproduces every figure exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..admission import (DEFAULT_ADMISSION, PredictorGate, VictimReuse, admit_prefetch, candidate_probability,
                         check_admission, lead_ms, outcome_values, victim_worth)
from ..cost.hardware import HardwareProfile
from ..cost.timing import MissRule, Timeline
from .. import miss_precision
from ..errors import ConfigError
from ..miss_precision import LOW, UPGRADE, gate_shares
from ..policies.base import Policy
from .copy_queue import DEFAULT_COPY_QUEUE, RuleView, WorkerQueue
from .prefetch import PREFETCH_RULES

#: ``ready_at`` of a copy still in the worker queue (its end is not known until the worker takes it).
_QUEUED = float("inf")
from .results import SimResult, describe_predictor
from .schedule import Schedule


def check_config(schedule: Schedule, policy: Policy, predictor: Any, depth: int) -> None:
    dims = (schedule.num_layers, schedule.num_experts, schedule.top_k)
    if (policy.num_layers, policy.num_experts, policy.top_k) != dims:
        raise ConfigError(f"policy built for {policy.num_layers} layers x {policy.num_experts} experts, top-{policy.top_k}, "
                          f"but the trace has {dims[0]} x {dims[1]}, top-{dims[2]}; build it from the trace's metadata")
    if not policy.fitted:
        raise ConfigError(f"policy {policy.name!r} must be fitted first: call fit(counts) with per-(layer, expert) "
                          "counts from sequences you will not score (CLI: --fit TRACE or the leading share)")
    if policy.uses_scores and predictor is None:
        raise ConfigError(f"policy {policy.name!r} evicts by predicted scores: give it a predictor (--predictor NAME)")
    if depth < 0:
        raise ConfigError(f"prefetch depth must be >= 0 MoE layers, got {depth}")
    if depth and predictor is None:
        raise ConfigError(f"prefetch depth {depth} needs a predictor (--predictor NAME)")
    if predictor is not None:
        if (predictor.num_layers, predictor.num_experts, predictor.top_k) != dims:
            raise ConfigError(f"predictor {predictor.name!r} built for {predictor.num_layers} x {predictor.num_experts}, "
                              f"top-{predictor.top_k}, but the trace has {dims[0]} x {dims[1]}, top-{dims[2]}")
        if getattr(predictor, "needs_model", False):
            raise ConfigError(f"predictor {predictor.name!r} reads hidden states, which a routing trace does not have; "
                              "it runs only in the runtime")
        if not getattr(predictor, "fitted", True):
            raise ConfigError(f"predictor {predictor.name!r} must be fitted first (CLI: --fit TRACE or the leading share)")


def replay_python(schedule: Schedule, policy: Policy, hw: HardwareProfile, rule: MissRule, *,
                  predictor: Any = None, depth: int = 0, prefetch: str = "topk", budget: int | None = None,
                  admission: str = DEFAULT_ADMISSION, capacity_label: str | None = None,
                  record: list[tuple[int, int, int, str]] | None = None, precision: Any = None,
                  copy_queue: str = DEFAULT_COPY_QUEUE) -> SimResult:
    """One replay in this loop (configuration already checked by ``check_config``); no bound. Arguments
    as ``moecache.sim.simulate`` takes them, with the hardware profile and miss rule resolved.
    ``precision``: ``(MissPrecisionRule, low_copy_ms, low_copy_bytes)`` where misses may be copied low
    (``moecache.miss_precision``), else None. ``copy_queue``: ``worker`` (the default: the runtime's copy
    worker, ``moecache.sim.copy_queue``) or ``fifo`` (every copy in issue order)."""
    choose = PREFETCH_RULES.get(prefetch) if depth else None
    gated = check_admission(admission) != "none"
    decide, asks_policy = rule.decide, rule.asks_policy
    L, E, K = schedule.num_layers, schedule.num_experts, schedule.top_k

    future = None
    if policy.offline:
        future = schedule.future
        policy.set_future(future)
    if predictor is not None and hasattr(predictor, "set_future"):
        future = schedule.future
        predictor.set_future(future)

    score_depth = policy.score_depth() if policy.uses_scores else None
    depths = sorted(set(range(1, depth + 1)) | ({score_depth} if score_depth else set()))

    tl = Timeline()
    # the runtime's copy worker (copy_queue "worker"): queued prefetches, cancelled or promoted at their target
    wq = WorkerQueue(tl, hw.copy_ms) if copy_queue == "worker" else None
    rule_tl = RuleView(tl, wq) if wq is not None else tl  # what the miss rule reads
    pf_target: dict[int, int] = {}  # under the worker queue: a queued-or-copied prefetch's target step
    pf_batch: list[tuple[int, float]] = []  # under the worker queue: this step's prefetches (key, priority)
    resident = policy._slot  # live view of the resident set (the base class never rebinds it)
    access, insert, admit, can_insert = policy.access, policy.insert, policy.admit, policy.can_insert
    copy_ms = hw.copy_ms
    gpu_of, cpu_of = hw.gpu, hw.cpu
    # the calibrated host and interference terms (moecache.cost.timing; all 0: the uncalibrated model)
    # (a scan policy's host time per insert rides on each copy's and prefetch's host cost)
    evict = hw.evict_host(policy.name)
    layer_host, copy_host, hybrid_ms = hw.layer_host_ms, hw.copy_host_ms + evict, hw.hybrid_layer_ms
    pred_host = hw.predictor_host(getattr(predictor, "name", None)) if predictor is not None else 0.0
    pf_host, slow = hw.prefetch_host_ms + evict, hw.slowdown
    cap = policy.capacity
    # the predictor gate (admission ``gated``; not where the policy reads the scores every layer anyway)
    gate = PredictorGate(L, pred_host) if admission == "gated" and depth and not score_depth else None
    pf_src: dict[int, tuple[int, float]] = {}  # under the gate: prefetched key -> (source layer, use bonus)
    # the re-demand rate the rule prices victims at (moecache.admission.VictimReuse)
    reuse = VictimReuse(policy.num_pools) if gated and depth else None
    ready_at: dict[int, float] = {}
    pf_unused: set[int] = set()
    pf_for: dict[int, set[int]] = {}
    accesses = hits = ready = needs = loads = cpu_runs = 0
    prefetches = pf_used = pf_wasted = pf_skipped = pf_refused = 0
    rows_seen = -1
    # Per-miss precision: keys resident as a low copy, the rule's threshold and the low copy's time.
    low_res: set[int] = set()
    below = precision[0].below if precision is not None else 0.0
    low_copy_ms = precision[1] if precision is not None else 0.0
    low_loads = upgrades = 0

    def insert_booked(key: int, prot: set[int]) -> int:
        """Insert ``key``; book each victim (re-demand rate, low copy, wasted prefetch, the worker's queue);
        the number evicted (under the worker queue, a scan policy's host time is paid per victim)."""
        nonlocal pf_wasted
        n = 0
        for v in insert(key, prot):
            if reuse is not None:
                reuse.evicted(v, policy.pool(v))
            low_res.discard(v)
            if v in pf_unused:
                pf_unused.discard(v)
                pf_wasted += 1
                pf_src.pop(v, None)
            if wq is not None:
                pf_target.pop(v, None)
                wq.cancel(v)
            n += 1
        if reuse is not None:
            reuse.inserted(key)
        return n

    for u in range(schedule.num_units):
        rows = schedule.rows(u)
        if schedule.new_request[u]:
            policy.begin_request()
            if predictor is not None:
                predictor.reset()
            rows_seen = rows
        elif predictor is not None and rows != rows_seen:
            predictor.reset()
            rows_seen = rows
        groups = schedule.groups(u)
        uids = schedule.unit_ids(u) if predictor is not None else None
        ne_ms = hw.non_expert(rows)
        pf_budget = budget or min(E, K * rows)
        for l in range(L):
            g = u * L + l
            if future is not None:
                future.seek(g)
            if pf_for:
                pf_for.pop(g, None)
            policy.begin_layer(l)
            keys, counts = groups[l]
            t_route = tl.non_expert(ne_ms, slow)
            h = t_route + layer_host  # the host's clock: routing sync and policy done
            hx = layer_host  # host time of this step so far, beyond t_route (waves' waits left out)
            if wq is not None:
                wq.advance(h, ready_at)
                if pf_target:  # settle this step's prefetches: the queued ones its routing did not pick are dropped
                    needed = set(keys)
                    for key in [k for k, tg in pf_target.items() if tg == g]:
                        del pf_target[key]
                        if key not in needed and wq.cancel(key):
                            policy.evict(key)
                            pf_unused.discard(key)
                            if pf_src:
                                pf_src.pop(key, None)

            preds: dict[int, np.ndarray] = {}
            if predictor is not None:
                predictor.observe(l, uids[:, l, :])
                if score_depth:
                    preds[score_depth] = predictor.predict(l, score_depth)
                    policy.on_scores((l + score_depth) % L, preds[score_depth].mean(axis=0))

            # -- demand ------------------------------------------------------------------------
            if keys:
                needs += len(keys)
                shares = gate_shares(schedule.unit_ids(u)[:, l, :], schedule.unit_weights(u)[:, l, :]) if precision is not None \
                    else None
                hit_list: list[tuple[int, int]] = []
                miss_list: list[tuple[int, int]] = []
                for key, c in zip(keys, counts):
                    access(key, c)
                    accesses += c
                    if key in resident:
                        hits += c
                        tl.hits += 1
                        if wq is not None and key in wq.live:  # its prefetch still queued: issued now
                            # (not a new copy in the runtime's estimate: it was counted when it was queued)
                            ready_at[key] = wq.promote(key, h)
                        if ready_at[key] <= t_route:
                            ready += c
                        if key in pf_unused:
                            pf_unused.discard(key)
                            pf_used += 1
                            if gate is not None:
                                src, bonus = pf_src.pop(key)
                                gate.used(src, bonus)
                        hit_list.append((key, c))
                        upgrade = shares is not None and miss_precision.copy_precision(
                            key in low_res, shares[key - l * E], below) == UPGRADE
                        if upgrade:  # the full copy replaces the low one before the kernel reads it
                            low_res.discard(key)
                            ready_at[key] = tl.issue_copy(h, copy_ms)
                            if wq is not None:  # a full copy: the runtime's estimate counts it
                                wq.note_issued(h)
                            upgrades += 1
                        if record is not None:
                            record.append((g, key, c, "upgrade" if upgrade else "hit"))
                    else:
                        miss_list.append((key, c))
                        if reuse is not None:
                            reuse.demanded(key, policy.pool(key))
                if not miss_list:
                    tl.join(h)
                    tl.compute([(ready_at[k], k, gpu_of(c)) for k, c in hit_list], slow)
                else:
                    wave_all = hit_list + miss_list
                    waves = [wave_all] if len(wave_all) <= cap else \
                        [wave_all[i:i + cap] for i in range(0, len(wave_all), cap)]
                    for wi, wave in enumerate(waves):
                        if wi and tl.gpu > h:
                            h = tl.gpu  # the previous wave's compute has ended: its slots are free
                        if wq is not None:
                            wq.advance(h, ready_at)
                        protected = frozenset(k for k, _c in wave)
                        jobs: list[tuple[float, int, float]] = []
                        cpu_end = -1.0
                        for key, c in wave:
                            g_ms = gpu_of(c)
                            if key in resident:
                                jobs.append((ready_at[key], key, g_ms))
                                continue
                            admitted = admit(key, protected) if asks_policy else True
                            copied = decide(rule_tl, h, copy_ms, g_ms, cpu_of(c), admitted)
                            low = copied and shares is not None and miss_precision.copy_precision(
                                None, shares[key - l * E], below) == LOW
                            if record is not None:
                                record.append((g, key, c, ("copy_low" if low else "copy") if copied else "cpu"))
                            if copied:
                                evicted = insert_booked(key, protected)
                                if wq is not None:  # the pool scan only where the insert evicted
                                    h = h + (copy_host - evict) + evict * evicted
                                    hx = hx + (copy_host - evict) + evict * evicted
                                else:
                                    h = h + copy_host
                                    hx = hx + copy_host
                                if low:
                                    low_res.add(key)
                                    low_loads += 1
                                end = tl.issue_copy(h, low_copy_ms if low else copy_ms)
                                if wq is not None and not low:  # the runtime's estimate counts full copies only
                                    wq.note_issued(h)
                                ready_at[key] = end
                                loads += 1
                                jobs.append((end, key, g_ms))
                            else:
                                end = tl.issue_cpu(h, cpu_of(c))
                                cpu_runs += 1
                                if end > cpu_end:
                                    cpu_end = end
                        tl.join(h)
                        tl.compute(jobs, slow)
                        if cpu_end >= 0.0:
                            tl.join(cpu_end + hybrid_ms)

            # -- prefetch ----------------------------------------------------------------------
            asked = predictor is not None and (gate is None or gate.open(l))
            if asked:
                for d in depths:
                    if d not in preds:
                        preds[d] = predictor.predict(l, d)
            # the host after launching the experts (and the predictor, where it was asked)
            hp = t_route + (hx + pred_host) if asked or score_depth else t_route + hx
            if choose is not None and asked:
                now_keys = frozenset(keys)
                scores_at = {d: preds[d].sum(axis=0) for d in range(1, depth + 1)}
                step_ms = 0.0
                for c in counts:
                    step_ms += gpu_of(c)
                for d in range(1, depth + 1):
                    tg = g + d
                    base = ((l + d) % L) * E
                    scores = scores_at[d]
                    chosen = choose(scores, pf_budget, lambda e: base + e in resident)
                    if not chosen:
                        continue
                    pset = pf_for.setdefault(tg, set())
                    pset.update(base + e for e in chosen if base + e in resident)
                    layer_ms = ne_ms + layer_host + step_ms
                    for e in chosen:
                        key = base + e
                        if key in resident:
                            continue
                        prot = now_keys | pset
                        if not can_insert(key, prot):
                            pf_skipped += 1
                            continue
                        if gated:
                            victim_pred = victim_prob = 0.0
                            pool = policy.pool(key)
                            if policy.occupancy(pool) >= cap:
                                v = policy.victim(pool, prot)
                                vl = v // E
                                for dd in range(1, depth + 1):
                                    if (l + dd) % L == vl:
                                        victim_pred = candidate_probability(float(scores_at[dd][v - vl * E]))
                                        break
                                victim_prob = victim_worth(victim_pred, reuse.rate())
                            now = hp + pf_host  # when this copy would be issued
                            first = (tl.gpu - now if tl.gpu > now else 0.0) + ne_ms + layer_host
                            lead = lead_ms(d, first, layer_ms)
                            # (the worker queue: the runtime's own estimate, every copy issued, plus this
                            # layer's prefetches already admitted, which are submitted together after the loop)
                            backlog = (tl.copy if wq is None else wq.issued_free) - now
                            if backlog < 0.0:
                                backlog = 0.0
                            if wq is not None:
                                backlog += len(pf_batch) * copy_ms
                            host = now - tl.gpu  # the host time it adds to the step, where the host is behind
                            if host < 0.0:
                                host = 0.0
                            if host > pf_host:
                                host = pf_host
                            if not admit_prefetch(candidate_probability(float(scores[e])), victim_prob, backlog,
                                                  first, lead, copy_ms, host):
                                pf_refused += 1
                                continue
                            if gate is not None:
                                if_unused, bonus = outcome_values(victim_pred, backlog, first, lead, copy_ms, host)
                                gate.issued(l, if_unused)
                                pf_src[key] = (l, bonus)
                        evicted = insert_booked(key, prot)
                        if wq is None:
                            hp = hp + pf_host
                            ready_at[key] = tl.issue_copy(hp, copy_ms)
                        else:  # queued with the step's others; priority = layers ahead + 1 - probability
                            hp = hp + (pf_host - evict) + evict * evicted
                            pf_batch.append((key, d + (1.0 - candidate_probability(float(scores[e])))))
                            ready_at[key] = _QUEUED
                            pf_target[key] = tg
                        pf_unused.add(key)
                        pset.add(key)
                        prefetches += 1
            if pf_batch:  # the runtime submits a step's prefetches in one call, once it has placed them all
                for key, prio in pf_batch:
                    wq.submit(hp, key, prio)
                    wq.note_issued(hp)
                pf_batch.clear()
            tl.join(hp)  # the next layer is launched once the host is done

    res = SimResult(
        trace=schedule.name, policy=policy.describe(), scope=policy.scope, capacity=policy.capacity,
        capacity_label=capacity_label or str(policy.capacity), predictor=describe_predictor(predictor),
        prefetch=prefetch if depth else None, depth=depth, budget=budget, miss_rule=rule.name, mode=schedule.mode,
        bytes_per_expert=hw.copy_bytes, hardware=hw.source, tokens=schedule.tokens, accesses=accesses,
        hits=hits, ready=ready, needs=needs, loads=loads, cpu_runs=cpu_runs, prefetches=prefetches,
        prefetch_used=pf_used, prefetch_wasted=pf_wasted, time_ms=tl.gpu, gpu_busy_ms=tl.gpu_busy,
        copy_busy_ms=tl.copy_busy, cpu_busy_ms=tl.cpu_busy,
        extra=({"prefetch_skipped": pf_skipped, "prefetch_refused": pf_refused, "admission": admission}
               if depth else {})
        | {"copy_queue": copy_queue} | ({"copies_cancelled": wq.cancelled} if wq is not None else {})
        | (gate.stats() if gate is not None else {}) | (
            {"low_precision_misses": precision[0].describe(), "low_copies": low_loads, "upgrades": upgrades,
             "low_copy_bytes": precision[2]}
            if precision is not None else {}),
    )
    return res
