"""A lower bound on the replay's time, for a given schedule, capacity, scope and hardware profile.

Whatever the policy, predictor or prefetch, the replay takes at least:

* without CPU execution (miss rule "copy"): every non-expert and expert computation on the GPU,
  ``gpu = sum over steps of non_expert(tokens) + sum over needs of gpu(tokens of the need)``, and
  every load on the copy engine. No schedule of loads, prefetched or not, makes fewer loads than
  Belady's MIN on demand (a load made early can be delayed to its use, an unused one dropped), so
  ``copy = loads of belady * copy_ms`` and ``bound = max(gpu, copy)``;
* with CPU execution (rules "cpu", "policy", "min"): a miss may run on the CPU instead, so the GPU
  term keeps only the non-expert work, ``gpu = sum over steps of non_expert(tokens)``, and the
  misses are those of Belady with bypass (the fewest possible when a miss need not be cached),
  split optimally between the copy engine (``copy_ms`` each) and the CPU (``cpu(tokens)`` each):
  the fractional split giving the copy engine the misses that are dearest on the CPU, i.e. the
  smallest ``T`` with ``copy_ms * x <= T`` and the CPU time of the rest ``<= T``, where ``x`` (the
  number of copied misses) may be fractional. ``bound = max(gpu, T)``. With every miss of the same
  token count (decode) this is a true lower bound; for batched steps it is the bound for
  Belady-with-bypass's own misses (fewest misses need not mean least CPU time).

With the calibrated profile's host terms (``moecache.cost.timing``), every step also pays its
``layer_host_ms`` with the GPU idle, whatever the policy: it joins the GPU term, ``gpu += steps *
layer_host_ms``. The other terms (host per copy or prefetch, the slowdown beside copies, the hybrid
layer's cost) depend on the schedule of copies and CPU runs, so the bound leaves them out (a copy
slowdown of 0 for the Belady replay): it stays a lower bound.

Bounds are cached on the schedule, keyed by (capacity, scope, CPU allowed, profile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..cost.hardware import HOST_TERMS, HardwareProfile
from ..cost.timing import MISS_RULES
from ..policies import new_policy
from .engines import run_engine
from .schedule import Schedule


@dataclass(frozen=True)
class Bound:
    total_ms: float
    gpu_ms: float
    miss_ms: float
    misses: int
    policy: str
    uses_cpu: bool


def split_time(copy_ms: float, cpu_costs: list[float]) -> float:
    """Smallest makespan of the misses split (fractionally) between the copy engine and the CPU."""
    costs = sorted(cpu_costs, reverse=True)
    rem = 0.0
    for c in costs:  # summed in sorted order: a fixed order for exact reproduction
        rem += c
    x = 0
    for c in costs:
        if (x + 1) * copy_ms <= rem - c:
            x += 1
            rem -= c
            continue
        f = (rem - x * copy_ms) / (copy_ms + c)  # the share of this miss the copy engine takes
        return (x + f) * copy_ms
    return x * copy_ms if x * copy_ms > rem else rem


def lower_bound(schedule: Schedule, capacity: int, scope: str, hardware: HardwareProfile, uses_cpu: bool) -> Bound:
    """The bound described in the module docstring (cached on ``schedule``)."""
    key = (capacity, scope, uses_cpu, json.dumps(hardware.to_json(), sort_keys=True))
    cached = schedule._bounds.get(key)
    if cached is not None:
        return cached
    L, E, K = schedule.num_layers, schedule.num_experts, schedule.top_k
    host = schedule.num_steps * hardware.layer_host_ms
    if hardware.calibrated:  # the replay's busy times without the schedule-dependent terms
        hardware = replace(hardware, **{n: 0.0 for n in HOST_TERMS})
    name = "belady_bypass" if uses_cpu else "belady"
    policy = new_policy(name, capacity, L, E, top_k=K, scope=scope)
    if not uses_cpu:
        r = run_engine(schedule, policy, hardware, MISS_RULES.get("copy"))
        miss_ms = r.loads * hardware.copy_ms
        gpu = r.gpu_busy_ms + host
        b = Bound(max(gpu, miss_ms), gpu, miss_ms, r.loads, name, False)
    else:
        log: list[tuple[int, int, int, str]] = []
        run_engine(schedule, policy, hardware, MISS_RULES.get("policy"), record=log)
        misses = [c for _g, _k, c, outcome in log if outcome != "hit"]
        gpu = 0.0
        for u in range(schedule.num_units):
            ne = hardware.non_expert(schedule.rows(u))
            for _l in range(L):
                gpu += ne
        gpu += host
        t = split_time(hardware.copy_ms, [hardware.cpu(c) for c in misses])
        b = Bound(max(gpu, t), gpu, t, len(misses), name, True)
    schedule._bounds[key] = b
    return b
