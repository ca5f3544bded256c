"""The machinery of ``eval/e2e_compare.py``, the end-to-end decode comparison: configuration specs
(``Candidate``), the prefetch-ceiling oracle, the run's shared state, sequence plans, the per-step
lower bound, measuring, one runner per configuration (a)-(e), pooling, bounds per batch and the
Markdown report. What is compared and how it is measured: ``eval/e2e_compare.py``'s docstring; the
targets: ``eval/e2e_targets.py``.
"""
from __future__ import annotations

import copy
import inspect
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _shapes import (ModelShape, experts_module_names, experts_modules, host_expert_views, materialise_experts, peak,  # noqa: E402
                     peak_reset, release_experts)

from moecache.atomic import write_text_atomic  # noqa: E402
from moecache.errors import ConfigError  # noqa: E402
from moecache.forced_routing import ForcedRunResult, run_forced  # noqa: E402
from moecache.predictors.oracle import OraclePredictor  # noqa: E402
from moecache.runtime import offload  # noqa: E402

#: Whether this build of moecache.offload takes ``hybrid=`` (CPU execution of misses).
HYBRID_BUILT = "hybrid" in inspect.signature(offload).parameters
HYBRID_MODES = ("auto", "cpu", "copy", "true")

#: (e)'s default candidates: plain LRU, selective prefetch with the learned predictor (the best real
#: predictor at batch 1, eval/results/prefetch_ceiling), hybrid execution with a global and a per-layer
#: pool, and prefetch with hybrid execution. The recorded runs name theirs (eval/results/e2e_*.md).
DEFAULT_CANDIDATES = ("lru", "lru+learned:depth=1:min_prob=0.5", "lru+hybrid:rule=auto",
                      "lru:scope=layer+hybrid:rule=auto", "lru+learned:depth=1:min_prob=0.5+hybrid:rule=auto")
CONFIG_KEYS = ("a", "b", "c", "d", "e", "n")
#: Run order: (a) first (it picks the experts implementation of the others), accelerate's (b) last;
#: (n), a measurement of the model around its experts rather than a scheme, before them all.
RUN_ORDER = ("n", "a", "c", "d", "e", "b")
#: Share of the time budget per configuration (per candidate for e); a: two implementations.
WEIGHTS = {"a": 2.0, "b": 1.0, "c": 1.5, "d": 1.5, "e": 1.0, "n": 0.5}


# -- configuration specs ----------------------------------------------------------------------------

#: A part of the old candidate spelling (``policy@layer+predictor-dN+pP+wW+hybrid-MODE``), kept for a
#: release: a scope after ``@``, ``hybrid-MODE``, ``pP``/``wW`` or ``PREDICTOR-dN``.
_OLD_PART = re.compile(r"hybrid-.*|[pw][0-9][0-9.]*|.+-d[0-9]*")
#: Keys of each part of the registry spelling, and an example of each part.
_POLICY_KEYS = ("scope",)
_PREDICTOR_KEYS = ("depth", "min_prob", "width", "admission")
_HYBRID_KEYS = ("rule",)
SPEC_SYNTAX = ("POLICY[:scope=layer][+PREDICTOR:depth=N[:min_prob=P][:width=W][:admission=A][:OPTION=V]]"
               "[+hybrid[:rule=RULE]], e.g. lru:scope=layer+learned:depth=1:min_prob=0.5+hybrid:rule=auto")


def predictor_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"learned:calibrate=isotonic:window=12"`` -> ``("learned", {"calibrate": "isotonic", "window": 12})``."""
    from moecache.registry import split_spec_values

    return split_spec_values(spec, "predictor option")


def constructor_options(cls: type) -> tuple[str, ...]:
    """The keyword options of a predictor class's constructor (past the layers, experts and top-k)."""
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    return tuple(n for n in names if n not in ("num_layers", "num_experts", "top_k", "self"))


@dataclass(frozen=True)
class Candidate:
    """One moecache offload configuration, written as registry specs (``moecache.registry.split_spec``,
    ``name:key=value``) joined by ``+``: the policy first, then optionally a predictor and ``hybrid``::

        POLICY[:scope=layer|global][+PREDICTOR:depth=N[:min_prob=P][:width=W][:admission=A][:OPTION=V]][+hybrid[:rule=RULE]]

    e.g. ``lru``, ``lru:scope=layer``, ``lrfu+transition:depth=2``,
    ``lru+transition:depth=1+hybrid:rule=auto``, ``static+hybrid:rule=cpu``. ``depth`` is the prefetch
    depth (>= 1); ``min_prob`` prefetches only experts whose predicted probability is at least P
    (default 0.05), ``width`` at most W per target layer (``prefetch_width``, default top-k times the
    batch rows), ``admission`` the prefetch admission rule (``offload(admission=...)``: gated, the default,
    cost or none); any other ``OPTION=V`` of the predictor part is its constructor's option
    (``learned:depth=2:window=12:calibrate=isotonic``: the predictor ``learned(window=12,
    calibrate="isotonic")``); ``hybrid`` alone is ``offload(hybrid=True)``, ``hybrid:rule=R`` a
    ``HYBRID_RULES`` name.

    The old spelling ``policy[@layer]+predictor-dN+pP+wW+hybrid-MODE`` (``lru@layer+hybrid-auto``)
    still parses to the same configuration for a release, with a ``FutureWarning`` that shows the new
    one; ``label`` keeps it, because recorded result tables name their rows by it (a candidate with
    predictor options, which the old spelling cannot write, is labelled by its registry spelling)."""

    policy: str = "lru"
    scope: str = "global"
    predictor: str | None = None
    depth: int = 0
    hybrid: str | None = None
    min_prob: float | None = None
    width: int | None = None
    admission: str | None = None
    predictor_options: tuple[tuple[str, str], ...] = ()  # (key, raw value), sorted by key

    @property
    def predictor_spec(self) -> str | None:
        """The predictor with its constructor options, ``learned:calibrate=isotonic:window=12``."""
        if self.predictor is None:
            return None
        return self.predictor + "".join(f":{k}={v}" for k, v in self.predictor_options)

    @property
    def label(self) -> str:
        """The row label of result tables (the old spelling, unchanged so recorded tables still match)."""
        if self.predictor_options:
            return self.spec
        out = self.policy + ("@layer" if self.scope == "layer" else "")
        if self.predictor:
            out += f"+{self.predictor}-d{self.depth}"
        if self.min_prob is not None:
            out += f"+p{self.min_prob:g}"
        if self.width is not None:
            out += f"+w{self.width}"
        if self.admission is not None:
            out += f"+a-{self.admission}"
        if self.hybrid:
            out += f"+hybrid-{self.hybrid}"
        return out

    @property
    def spec(self) -> str:
        """This configuration in the registry spelling; ``Candidate.parse(c.spec) == c``."""
        out = self.policy + (":scope=layer" if self.scope == "layer" else "")
        if self.predictor:
            out += f"+{self.predictor}:depth={self.depth}"
            if self.min_prob is not None:
                out += f":min_prob={self.min_prob:g}"
            if self.width is not None:
                out += f":width={self.width}"
            if self.admission is not None:
                out += f":admission={self.admission}"
            out += "".join(f":{k}={v}" for k, v in self.predictor_options)
        if self.hybrid:
            out += "+hybrid" + ("" if self.hybrid == "true" else f":rule={self.hybrid}")
        return out

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        """``text`` in the registry spelling (or, with a ``FutureWarning``, the old one) -> a Candidate;
        a bad spec raises a one-line ``ConfigError`` naming the part and the valid choices."""
        parts = [p.strip() for p in text.strip().split("+")]
        if not all(parts):
            raise ConfigError(f"candidate {text!r}: empty part; write {SPEC_SYNTAX}")
        old = "@" in parts[0] or any(":" not in p and _OLD_PART.fullmatch(p) for p in parts[1:])
        if old and any(":" in p for p in parts):
            raise ConfigError(f"candidate {text!r} mixes the old spelling (@layer, PREDICTOR-dN, pP, wW, "
                              f"hybrid-MODE) with the new; write {SPEC_SYNTAX}")
        if not old:
            return cls._parse_registry(text, parts)
        cand = cls._parse_old(text, parts)
        warnings.warn(f"candidate {text!r} uses the old spelling, which goes in the next release; "
                      f"write {cand.spec!r}", FutureWarning, stacklevel=2)
        return cand

    @classmethod
    def _check(cls, text: str, cand: "Candidate") -> "Candidate":
        from moecache.policies import POLICIES

        if POLICIES.get(cand.policy).uses_scores and cand.predictor is None:
            raise ConfigError(f"candidate {text!r}: policy {cand.policy!r} evicts by predicted scores; add "
                              "+PREDICTOR:depth=N")
        return cand

    @staticmethod
    def _online_policy(text: str, head: str) -> str:
        from moecache.policies import POLICIES

        online = [n for n in POLICIES.names() if not (POLICIES.get(n).offline or POLICIES.get(n).may_bypass)]
        if head not in online:
            why = f"policy {head!r} is for the simulator only" if head in POLICIES.names() else \
                f"unknown policy {head!r}"
            raise ConfigError(f"candidate {text!r}: {why}; valid: {', '.join(online)}")
        return head

    @classmethod
    def _parse_registry(cls, text: str, parts: list[str]) -> "Candidate":
        from moecache.predictors import PREDICTORS
        from moecache.registry import split_spec
        from moecache.runtime.hybrid_rules import HYBRID_RULES

        what = f"candidate {text!r}: parameter"

        def params(part: str, keys: tuple[str, ...]) -> tuple[str, dict[str, str]]:
            name, kv = split_spec(part, what)
            unknown = sorted(set(kv) - set(keys))
            if unknown:
                raise ConfigError(f"candidate {text!r}: {name!r} takes no {unknown[0]!r}; valid keys: "
                                  f"{', '.join(keys)}")
            return name, kv

        def number(name: str, key: str, raw: str, kind: type) -> Any:
            try:
                value = kind(raw)
            except ValueError:
                noun = "an integer" if kind is int else "a number"
                raise ConfigError(f"candidate {text!r}: {name}:{key}={raw!r} is not {noun}") from None
            if not (value >= 1 if kind is int else 0.0 <= value <= 1.0):
                raise ConfigError(f"candidate {text!r}: {name}:{key}={raw} is out of range "
                                  f"({'>= 1' if kind is int else 'between 0 and 1'})")
            return value

        head, kv = params(parts[0], _POLICY_KEYS)
        scope = kv.get("scope", "global")
        if scope not in ("layer", "global"):
            raise ConfigError(f"candidate {text!r}: scope {scope!r} is not 'layer' or 'global' "
                              f"(write {head}:scope=layer)")
        kw: dict[str, Any] = {"policy": cls._online_policy(text, head), "scope": scope}
        for part in parts[1:]:
            name = split_spec(part, what)[0]
            if name == "hybrid":
                _, kv = params(part, _HYBRID_KEYS)
                if "hybrid" in kw:
                    raise ConfigError(f"candidate {text!r}: hybrid given twice")
                rule = kv.get("rule", "true")
                if rule != "true" and rule not in HYBRID_RULES:
                    raise ConfigError(f"candidate {text!r}: hybrid rule {rule!r}; valid: "
                                      f"{', '.join(HYBRID_RULES.names())}")
                kw["hybrid"] = rule
                continue
            if name not in PREDICTORS.names():
                raise ConfigError(f"candidate {text!r}: {name!r} is neither a predictor nor hybrid; valid "
                                  f"predictors: {', '.join(PREDICTORS.names())}")
            if "predictor" in kw:
                raise ConfigError(f"candidate {text!r}: two predictors ({kw['predictor']!r}, {name!r}); give one")
            cls_options = constructor_options(PREDICTORS.get(name))
            _, kv = params(part, _PREDICTOR_KEYS + tuple(k for k in cls_options if k != "max_depth"))
            if "depth" not in kv:
                raise ConfigError(f"candidate {text!r}: predictor {name!r} needs a prefetch depth; write "
                                  f"{name}:depth=1")
            kw.update(predictor=name, depth=number(name, "depth", kv["depth"], int))
            if "min_prob" in kv:
                kw["min_prob"] = number(name, "min_prob", kv["min_prob"], float)
            if "width" in kv:
                kw["width"] = number(name, "width", kv["width"], int)
            if "admission" in kv:
                from moecache.admission import check_admission

                kw["admission"] = check_admission(kv["admission"])
            options = tuple(sorted((k, v) for k, v in kv.items() if k not in _PREDICTOR_KEYS))
            if options and getattr(PREDICTORS.get(name), "needs_model", False):
                raise ConfigError(f"candidate {text!r}: predictor {name!r} reads the model and takes no options here; "
                                  f"write {name}:depth=N")
            kw["predictor_options"] = options
        return cls._check(text, cls(**kw))

    @classmethod
    def _parse_old(cls, text: str, parts: list[str]) -> "Candidate":
        """The old spelling, parsed exactly as before the registry spelling existed."""
        from moecache.predictors import PREDICTORS

        head, _, scope = parts[0].partition("@")
        cls._online_policy(text, head)
        if scope not in ("", "layer", "global"):
            raise ConfigError(f"candidate {text!r}: scope {scope!r} is not 'layer' or 'global' (write "
                              f"{head}:scope=layer)")
        kw: dict[str, Any] = {"policy": head, "scope": scope or "global"}
        for part in parts[1:]:
            if part.startswith("hybrid-"):
                mode = part[len("hybrid-"):]
                if mode not in HYBRID_MODES:
                    raise ConfigError(f"candidate {text!r}: hybrid mode {mode!r}; valid: {', '.join(HYBRID_MODES)}")
                kw["hybrid"] = mode
                continue
            if part[:1] in ("p", "w") and part[1:].replace(".", "", 1).isdigit():
                if part[0] == "p":
                    kw["min_prob"] = float(part[1:])
                else:
                    kw["width"] = int(float(part[1:]))
                continue
            name, _, depth = part.rpartition("-d")
            if not name or not depth.isdigit() or int(depth) < 1:
                raise ConfigError(f"candidate {text!r}: {part!r} is not PREDICTOR-dN (e.g. transition-d1) "
                                  "or hybrid-MODE")
            if name not in PREDICTORS.names():
                raise ConfigError(f"candidate {text!r}: unknown predictor {name!r}; valid: "
                                  f"{', '.join(PREDICTORS.names())}")
            kw.update(predictor=name, depth=int(depth))
        return cls._check(text, cls(**kw))


#: (c) and (d) as candidates of the same runner.
LRU_LAYER = Candidate("lru", "layer")
FIDDLER = Candidate("static", "global", hybrid="cpu")
#: Fiddler keeps one slot free of the placement (static's scratch): nothing is ever copied on a miss.
FIDDLER_POLICY_PARAMS = {"scratch": 1}


# -- the prefetch ceiling: an oracle that reads the replay's routing ahead ---------------------------

class ReplayLookahead:
    """The replay's forced routing ahead of the layer being run: ``run_forced(lookahead=...)`` seeks it to each
    call's last row; ``ReplayOracle.observe`` tells it the layer. ``target(depth)`` gives the ids ``(b, k)``
    of the MoE layer ``depth`` ahead (wrapping into the next step), or None past the replayed rows."""

    def __init__(self, num_layers: int):
        self.L = int(num_layers)
        self.ids: np.ndarray | None = None  # (b, n, L, k)
        self.pos = 0
        self.layer = 0

    def seek(self, ids: np.ndarray, pos: int) -> None:
        self.ids, self.pos = ids, int(pos)

    def target(self, depth: int) -> np.ndarray | None:
        t = self.layer + depth
        step = self.pos + t // self.L
        if self.ids is None or step >= self.ids.shape[1]:
            return None
        return self.ids[:, step, t % self.L]


class ReplayOracle(OraclePredictor):
    """``oracle`` in the end-to-end replay: the predictor that knows the forced routing, so that a
    candidate ``lru+oracle:depth=1`` measures what prefetch could give with perfect predictions (the experts
    each next layer really uses, nothing else) on this machine: the ceiling of any real predictor."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(num_layers, num_experts, top_k)
        self.lookahead = ReplayLookahead(num_layers)
        self.set_future(self.lookahead)

    def observe(self, layer: int, experts: np.ndarray, hidden: Any = None) -> None:
        super().observe(layer, experts, hidden)
        self.lookahead.layer = int(layer)


# -- the run's shared state -------------------------------------------------------------------------

@dataclass
class BatchPlan:
    """The sequences one batch size replays: timed groups (b sequences each) and a warm-up group."""

    batch: int
    groups: list[list[int]]
    warm: list[int]
    warm_is_timed: bool

    @property
    def sequences(self) -> list[int]:
        return [s for g in self.groups for s in g]


@dataclass
class Budget:
    """The run's time guard: shares of what is left, by weight."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)
    reserve_s: float = 30.0  # bounds, writing, teardown, the last configuration's set-up and warm-up
    weights_left: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.total_s - self.reserve_s - self.elapsed()

    def share(self, weight: float) -> float:
        """Seconds for a configuration of ``weight``; the weight is then spent."""
        s = self.left() * weight / max(weight, self.weights_left)
        self.weights_left = max(0.0, self.weights_left - weight)
        return s


@dataclass
class Bench:
    shape: ModelShape
    model: nn.Module
    store: Any
    trace: Any
    fit_trace: Any
    dev: torch.device
    dtype: torch.dtype
    L: int
    E: int
    k: int
    slots: int
    fraction: float
    tokens: int
    warm_steps: int
    accelerate_steps: int
    budget: Budget
    copy: dict[str, Any]
    impl: dict[int, str] = field(default_factory=dict)  # batch -> experts implementation for offload runs
    min_share_s: float = 2.0
    fitted: dict[str, Any] = field(default_factory=dict)  # predictor name -> fitted once, copied per run

    def predictor(self, spec: str) -> Any:
        """A fresh copy of predictor ``spec`` (a name with its options, ``Candidate.predictor_spec``) fitted
        on the fitting sequences (fitted once per run: fitting can take tens of seconds on a large trace)."""
        from moecache.predictors import PREDICTORS

        name, options = predictor_options(spec)
        if name == "oracle":
            return ReplayOracle(self.L, self.E, self.k)
        if spec not in self.fitted:
            self.fitted[spec] = PREDICTORS.get(name)(self.L, self.E, self.k, **options).fit(self.fit_trace)
        return copy.deepcopy(self.fitted[spec])

    @property
    def total(self) -> int:
        return self.L * self.E


# -- sequences --------------------------------------------------------------------------------------

def plan_batches(trace: Any, batches: list[int], tokens: int, warm_steps: int, sequences: dict[int, int]
                 ) -> tuple[dict[int, BatchPlan], list[int], list[str], dict[int, str]]:
    """Timed groups per batch size, the sequences left for fitting, notes, and the batch sizes the
    trace cannot serve (with why).

    Timed: the first ``sequences[b]`` sequences (default 2 at batch 1, else ``b``; rounded up to a
    multiple of ``b``) with at least ``tokens`` rows, else the longest ones (their groups then replay
    their common length). Fitting (predictors, static placement): every sequence no batch size
    times. Warm-up: the first ``b`` fitting sequences with ``warm_steps + 1`` rows, else the first
    timed group.
    """
    seq_ids = [int(s) for s in trace.sequences()]
    lengths = {s: int((trace.seq == s).sum()) for s in seq_ids}
    notes: list[str] = []
    errors: dict[int, str] = {}
    chosen: dict[int, list[int]] = {}
    for b in batches:
        n = max(b, sequences.get(b) or (2 if b == 1 else b))
        n = int(math.ceil(n / b) * b)
        if n > len(seq_ids):
            errors[b] = (f"batch {b} needs {n} sequences side by side but the trace has {len(seq_ids)}; "
                         "use a smaller --batch or another trace")
            continue
        long_enough = [s for s in seq_ids if lengths[s] >= tokens]
        if len(long_enough) >= n:
            chosen[b] = long_enough[:n]
        else:
            chosen[b] = sorted(seq_ids, key=lambda s: (-lengths[s], seq_ids.index(s)))[:n]
            notes.append(f"batch {b}: only {len(long_enough)} sequences have {tokens} rows; took the {n} longest "
                         f"({min(lengths[s] for s in chosen[b])} rows or more)")
    timed = {s for v in chosen.values() for s in v}
    fit = [s for s in seq_ids if s not in timed]
    plans = {}
    for b, seqs in chosen.items():
        groups = [seqs[i:i + b] for i in range(0, len(seqs), b)]
        warm_pool = [s for s in fit if lengths[s] >= warm_steps + 1]
        if len(warm_pool) >= b:
            plans[b] = BatchPlan(b, groups, warm_pool[:b], False)
        else:
            plans[b] = BatchPlan(b, groups, groups[0], True)
            notes.append(f"batch {b}: warm-up on the first timed group (too few other sequences)")
    return plans, fit, notes, errors


# -- the lower bound --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One model call of a replay: ids ``(rows, layers, k)``, its request, whether it is a timed decode step."""

    ids: np.ndarray
    request: int
    timed_decode: bool


def replayed_units(trace: Any, result: ForcedRunResult, request0: int, timed: bool) -> list[Unit]:
    """The model calls a replay made, rebuilt from its per-group record: per group one prefill call
    (its ``prefill`` rows of each sequence, in (row, step) order) and one call per decode step."""
    units: list[Unit] = []
    for g, rec in enumerate(result.per_sequence):
        rows = [np.nonzero(trace.seq == s)[0] for s in rec["seqs"]]
        p, steps = rec["prefill"], rec["decode"]
        ids = np.asarray(trace.ids)
        units.append(Unit(np.concatenate([ids[r[:p]] for r in rows]), request0 + g, False))
        for t in range(p, p + steps):
            units.append(Unit(np.stack([ids[r[t]] for r in rows]), request0 + g, timed))
    return units


def belady_misses(units: list[Unit], num_experts: int, capacity: int, bypass: bool = False
                  ) -> tuple[list[int], int]:
    """Belady's MIN (``belady_bypass`` with ``bypass``: a miss need not be cached) over ``units``
    with ``capacity`` slots in one pool: the token count of every miss in a timed decode unit, and
    the number of timed decode units."""
    from moecache.policies import new_policy
    from moecache.sim import Schedule, simulate
    from moecache.trace import RoutingBlock, Trace, TraceMeta

    if not units:
        return [], 0
    L, k = units[0].ids.shape[1:]
    ids = np.concatenate([u.ids for u in units])
    seq = np.concatenate([np.full(len(u.ids), u.request) for u in units])
    step = np.concatenate([np.full(len(u.ids), i) for i, u in enumerate(units)])
    meta = TraceMeta(num_experts=num_experts, top_k=k, moe_layers=list(range(L)), model="e2e replay",
                     bytes_per_expert=1)
    sched = Schedule(Trace(meta, RoutingBlock.build(ids.astype(np.int64), seq=seq, step=step)))
    if sched.num_units != len(units):
        raise RuntimeError(f"bound schedule has {sched.num_units} units for {len(units)} model calls")
    pol = new_policy("belady_bypass" if bypass else "belady", capacity, L, num_experts, top_k=k, scope="global")
    log: list[tuple[int, int, int, str]] = []
    rule = "policy" if bypass else "copy"
    try:
        simulate(sched, pol, miss_rule=rule, bound=False, record=log)  # the C++ engine where built
    except Exception as exc:  # noqa: BLE001  (an extension out of step with its Python side)
        print(f"  bound: C++ simulator failed ({exc}); the Python reference (identical results) instead", flush=True)
        log.clear()
        pol = new_policy("belady_bypass" if bypass else "belady", capacity, L, num_experts, top_k=k, scope="global")
        simulate(sched, pol, miss_rule=rule, bound=False, record=log, engine="python")
    timed = np.array([u.timed_decode for u in units])
    misses = [c for g, _key, c, outcome in log if outcome != "hit" and timed[g // L]]
    return misses, int(timed.sum())


def step_bound(misses: int, steps: int, copy_ms: float, compute_ms: float | None,
                cpu_service_ms: float | None = None) -> dict[str, Any]:
    """Per timed decode step: Belady's copies (``belady_misses``, counted in the timed decode steps only)
    at the measured copy time against the measured all-resident compute (``eval/e2e_compare.py``'s
    docstring). Not ``moecache.sim.bound.lower_bound``, which bounds a whole simulated schedule with
    the hardware profile's modelled times; this one is per measured step, with measured costs."""
    if steps < 1:
        return {"steps": 0}
    copy = misses / steps * copy_ms
    out: dict[str, Any] = {"steps": steps, "belady_misses": misses, "belady_misses_per_step": misses / steps,
                           "copy_ms_per_step": copy, "compute_ms_per_step": compute_ms,
                           "bound_ms_per_step": copy if compute_ms is None else max(copy, compute_ms),
                           "serial_ms_per_step": None if compute_ms is None else copy + compute_ms}
    if cpu_service_ms is not None:
        out["miss_service_with_cpu_ms_per_step"] = cpu_service_ms / steps
    return out


# -- measuring --------------------------------------------------------------------------------------

def measure_copy(store: Any, dev: torch.device, copies: int = 24, repeats: int = 3) -> dict[str, Any]:
    """Host store -> device copy time of one expert (one copy per expert, as the runtime makes them)."""
    keys = np.linspace(0, store.num_layers * store.num_experts - 1, copies).astype(int).tolist()
    dst = torch.empty((4, store.layout.slot_numel), dtype=store.layout.dtype, device=dev)
    times = []
    for _ in range(repeats + 1):  # the first round warms up
        if dev.type == "cuda":
            stream = torch.cuda.Stream(dev)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                a.record()
                for i, key in enumerate(keys):
                    dst[i % 4].copy_(store.row(key), non_blocking=True)
                b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / len(keys))
        else:
            t = time.perf_counter()
            for i, key in enumerate(keys):
                dst[i % 4].copy_(store.row(key))
            times.append(1e3 * (time.perf_counter() - t) / len(keys))
    ms = float(np.median(times[1:]))
    nbytes = store.layout.slot_bytes
    return {"ms_per_expert": ms, "gb_per_s": nbytes / ms / 1e6, "expert_bytes": nbytes, "copies": len(keys),
            "repeats": repeats, "pinned": bool(store.pinned),
            "method": "one copy_(non_blocking) per expert on a side stream, CUDA events" if dev.type == "cuda"
            else "torch copy on the CPU (no device: not a bus figure)"}


def _timed(bench: Bench, plan: BatchPlan, limit_s: float, max_steps: int, handle: Any = None,
           warm_steps: int | None = None, lookahead: ReplayLookahead | None = None) -> dict[str, Any]:
    """Warm-up, reset, timed replay; the row's speed, runtime counts and the replayed model calls.
    ``lookahead``: the oracle predictor's view of the routing ahead, kept at the replay's position."""
    m, tr, b = bench.model, bench.trace, plan.batch
    warm_steps = bench.warm_steps if warm_steps is None else warm_steps
    warm = run_forced(m, tr, sequences=plan.warm, max_tokens=1 + min(warm_steps, max_steps), prefill=1, batch=b,
                  lookahead=lookahead)
    if handle is not None:
        handle.reset_stats()
    peak_reset(bench.dev)
    res = run_forced(m, tr, sequences=plan.sequences, max_tokens=1 + max_steps, prefill=1, batch=b,
                 time_limit_s=max(limit_s, 1e-3), lookahead=lookahead)
    row: dict[str, Any] = {
        "status": "ok" if res.decode_steps else "skipped: time budget spent before the first timed decode step",
        "decode_steps": res.decode_steps, "decode_tokens": res.decode_tokens,
        "decode_s": res.decode_s, "prefill_s": res.prefill_s, "time_limit_s": limit_s, "truncated": res.truncated,
        "unreplayed_rows": res.unreplayed_rows,
        "tokens_per_s": res.decode_tokens / res.decode_s if res.decode_s else None,
        "ms_per_step": 1e3 * res.decode_s / res.decode_steps if res.decode_steps else None,
        "ms_per_token": 1e3 * res.decode_s / res.decode_tokens if res.decode_tokens else None,
        "peak_gpu_bytes": peak(bench.dev), "groups": [g["seqs"] for g in res.per_sequence]}
    row["_units"] = replayed_units(tr, warm, 0, False) + replayed_units(tr, res, len(warm.per_sequence), True)
    if handle is not None:
        s = handle.stats()
        keep = ("accesses", "hits", "misses", "hit_rate", "ready_rate", "evictions", "prefetch_issued",
                "prefetch_precision", "prefetch_cancelled", "bytes_copied", "copies", "stall_s", "host_ms_per_layer",
                "sync_ms_per_layer", "prefetch_host_ms_per_layer", "round_calls", "decisions", "cpu_experts",
                "cpu_tokens", "cpu_ms", "cpu_wait_ms",
                "cpu_kernel", "hybrid_rule", "resident", "cpu_layers", "cpu_layer_parts_ms", "cpu_cost_scale")
        row.update({key: s[key] for key in keep if key in s})
        if res.decode_steps:
            row["stall_ms_per_step"] = 1e3 * s["stall_s"] / res.decode_steps
            row["bytes_copied_per_step"] = s["bytes_copied"] / res.decode_steps
        row["runtime_config"] = s["config"]
    return row


def _error_row(exc: BaseException) -> dict[str, Any]:
    return {"status": f"error: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


# -- (a) all resident -------------------------------------------------------------------------------

def run_resident(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
    need = bench.total * bench.store.layout.slot_bytes
    if bench.dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(bench.dev)
        if need + (2 << 30) > free:
            bench.budget.weights_left -= WEIGHTS["a"]
            return [{"config": "a", "label": "resident", "status": f"skipped: the experts need {need / 2**30:.1f} GiB "
                     f"and {free / 2**30:.1f} GiB are free on the GPU (use fewer --layers)"}]
    share = bench.budget.share(WEIGHTS["a"])
    if share < bench.min_share_s:
        return [{"config": "a", "label": "resident",
                 "status": f"skipped: time budget spent ({share:.1f} s left for it)"}]
    rows = []
    try:
        materialise_experts(bench.model, bench.store, bench.dev, bench.shape.family)
        for impl in ("batched_mm", "grouped_mm"):
            bench.model.set_experts_implementation(impl)
            row = {"config": "a", "label": f"resident ({impl})", "experts_implementation": impl}
            try:
                row.update(_timed(bench, plan, share / 2, bench.tokens - 1))
            except Exception as exc:  # noqa: BLE001  (one failing implementation must not end the run)
                row.update(_error_row(exc))
            rows.append(row)
    except Exception as exc:  # noqa: BLE001  (e.g. out of memory while materialising)
        rows.append({"config": "a", "label": "resident", **_error_row(exc)})
    finally:
        release_experts(bench.model, bench.shape.family)
        if bench.dev.type == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in rows if r["status"] == "ok" and r["tokens_per_s"]]
    if ok:
        best = max(ok, key=lambda r: r["tokens_per_s"])
        best["best_of_a"] = True
        bench.impl[plan.batch] = best["experts_implementation"]
    return rows


# -- (n) the model without its experts ------------------------------------------------------------

def run_null_experts(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
    """The decode step with every routed-experts module answering zeros at once: the same replay
    (forced routing, router, attention, shared experts, norms, lm_head, the harness's own per-step
    work) without any expert kernel. Its ms/step is the measured non-expert time of this shape at
    this batch size, the input the timing model needs (``eval/calibrate_timing.py``); it is not a
    scheme anyone would run, so it never enters the bound or the comparison."""
    share = bench.budget.share(WEIGHTS["n"])
    row: dict[str, Any] = {"config": "n", "label": "null experts"}
    if share < bench.min_share_s:
        return [{**row, "status": f"skipped: time budget spent ({share:.1f} s left for it)"}]
    mods = experts_modules(bench.model, bench.shape.family)

    def zeros(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)

    try:
        for m in mods:
            m.forward = zeros  # an instance attribute: nn.Module.__call__ finds it before the class's
        row.update(_timed(bench, plan, share, bench.tokens - 1))
    except Exception as exc:  # noqa: BLE001  (a failing measurement must not end the run)
        row.update(_error_row(exc))
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)
    row["non_expert_ms_per_layer"] = (row["ms_per_step"] / bench.L) if row.get("ms_per_step") else None
    return [row]


# -- (b) accelerate ---------------------------------------------------------------------------------

def device_map_for(model: nn.Module, targets: dict[str, Any], default: Any) -> dict[str, Any]:
    """A partition of ``model`` into modules for ``dispatch_model``: every module named in
    ``targets`` mapped to its device, every other subtree to ``default`` (as one entry where it
    contains no target). A module that holds tensors itself and contains a target cannot be split."""
    out: dict[str, Any] = {}

    def walk(mod: nn.Module, name: str) -> None:
        if name in targets:
            out[name] = targets[name]
            return
        prefix = name + "." if name else ""
        if not any(t.startswith(prefix) for t in targets):
            out[name] = default
            return
        own = [n for n, t in list(mod._parameters.items()) + list(mod._buffers.items()) if t is not None]
        if own:
            raise ConfigError(f"module {name or '<model>'} holds {own} itself and contains experts to map apart; "
                              "its device map cannot split it")
        for child_name, child in mod.named_children():
            walk(child, prefix + child_name)

    walk(model, "")
    return out


def run_accelerate(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
    row: dict[str, Any] = {"config": "b", "label": "accelerate dispatch_model"}
    try:
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError:
        bench.budget.weights_left -= WEIGHTS["b"]
        row["status"] = "unavailable: accelerate is not installed (pip install accelerate)"
        return [row]
    share = bench.budget.share(WEIGHTS["b"])
    if share < bench.min_share_s:
        row["status"] = f"skipped: time budget spent ({share:.1f} s left for it)"
        return [row]
    model, family = bench.model, bench.shape.family
    names = experts_module_names(model, family)
    on_gpu = int(math.floor(bench.fraction * len(names)))
    gpu = bench.dev.index if bench.dev.type == "cuda" and bench.dev.index is not None else \
        (0 if bench.dev.type == "cuda" else "cpu")
    away = "cpu" if bench.dev.type == "cuda" else "disk"
    targets = {n: (gpu if i < on_gpu else away) for i, n in enumerate(names)}
    layer_bytes = bench.E * bench.store.layout.slot_bytes
    row.update({"experts_layers_on_gpu": on_gpu, "experts_layers_offloaded": len(names) - on_gpu,
                "expert_share_on_gpu": on_gpu / len(names), "offloaded_to": away,
                "bytes_copied_per_step": (len(names) - on_gpu) * layer_bytes})
    offload_dir = tempfile.mkdtemp(prefix="e2e_accelerate_") if away == "disk" else None
    views = host_expert_views(model, bench.store, family)
    offloaded = {n for n, d in targets.items() if d == away}
    state = {k: v for k, v in views.items() if k.rsplit(".", 1)[0] in offloaded}
    dmap = device_map_for(model, targets, gpu)
    model.set_experts_implementation(bench.impl.get(plan.batch, "batched_mm"))
    own_forward = {id(m) for m in model.modules() if "forward" in m.__dict__}
    try:
        dispatch_model(model, dmap, main_device=gpu if gpu != "cpu" else "cpu",
                       state_dict=state if away == "cpu" else None, offload_dir=offload_dir)
        row.update(_timed(bench, plan, share, bench.accelerate_steps, warm_steps=1))  # seconds per step
    except Exception as exc:  # noqa: BLE001
        row.update(_error_row(exc))
    finally:
        remove_hook_from_submodules(model)
        for mod in model.modules():
            # Removing a hook leaves the old forward as an instance attribute bound to that module;
            # the runtime's shells copy the experts modules and would call the original's forward.
            if "forward" in mod.__dict__ and id(mod) not in own_forward:
                del mod.__dict__["forward"]
        for attr in ("to", "cuda", "npu", "xpu", "mlu", "sdaa", "musa"):
            model.__dict__.pop(attr, None)  # dispatch_model's warning wrappers
        model.__dict__.pop("hf_device_map", None)
        release_experts(model, family)
        if offload_dir:
            import shutil

            shutil.rmtree(offload_dir, ignore_errors=True)
        if bench.dev.type == "cuda":
            torch.cuda.empty_cache()
    return [row]


# -- (c), (d), (e): moecache.offload ----------------------------------------------------------------

def offload_kwargs(bench: Bench, cand: Candidate, policy_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``moecache.offload`` arguments of ``cand`` on this bench: a policy instance (its scope, fitted
    where it needs it, ``policy_params``), a fitted predictor, the budget in slots (``slots // layers``
    per layer in layer scope)."""
    from moecache.policies import new_policy
    from moecache.predictors import PREDICTORS
    from moecache.trace.store import count_ids

    L, E, k = bench.L, bench.E, bench.k
    cap = bench.slots // L if cand.scope == "layer" else bench.slots
    if cap < k:
        raise ConfigError(f"{cand.label}: {cap} slots per pool cannot hold one layer's top-{k}; raise --fraction")
    pol = new_policy(cand.policy, cap, L, E, top_k=k, scope=cand.scope, **(policy_params or {}))
    if pol.needs_fit:
        pol.fit(count_ids(bench.fit_trace))
    kw: dict[str, Any] = {"cache_slots": cap * pol.num_pools, "policy": pol, "prefetch_depth": cand.depth,
                          "device": str(bench.dev), "host_store": bench.store, "own_store": False}
    if cand.predictor:
        cls = PREDICTORS.get(cand.predictor)
        kw["predictor"] = cand.predictor if getattr(cls, "needs_model", False) else bench.predictor(cand.predictor_spec)
        if cand.min_prob is not None:
            kw["min_prob"] = cand.min_prob
        if cand.width is not None:
            kw["prefetch_width"] = cand.width
        if cand.admission is not None:
            kw["admission"] = cand.admission
    if cand.hybrid:
        kw["hybrid"] = True if cand.hybrid == "true" else cand.hybrid
    return kw


def run_offload(bench: Bench, plan: BatchPlan, key: str, cand: Candidate, weight: float,
                policy_params: dict[str, Any] | None = None, preload_pinned: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"config": key, "label": cand.label}
    if cand.hybrid and not HYBRID_BUILT:
        bench.budget.weights_left -= weight
        row["status"] = "unavailable: hybrid not built (this moecache.offload has no hybrid= argument)"
        return row
    share = bench.budget.share(weight)
    if share < bench.min_share_s:
        row["status"] = f"skipped: time budget spent ({share:.1f} s left for it)"
        return row
    impl = bench.impl.get(plan.batch, "batched_mm")
    bench.model.set_experts_implementation(impl)
    row["experts_implementation"] = impl
    handle = None
    try:
        kw = offload_kwargs(bench, cand, policy_params)
        handle = offload(bench.model, **kw)
        if preload_pinned:  # Fiddler's load-time placement (hybrid="cpu" never copies a miss)
            row["preloaded_experts"] = handle.preload()
        row.update(_timed(bench, plan, share, bench.tokens - 1, handle,
                          lookahead=getattr(kw.get("predictor"), "lookahead", None)))
    except Exception as exc:  # noqa: BLE001
        row.update(_error_row(exc))
    finally:
        if handle is not None:
            handle.remove(restore=False)
        if bench.dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_lru_layer(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
    return [run_offload(bench, plan, "c", LRU_LAYER, WEIGHTS["c"])]


def run_fiddler(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
    return [run_offload(bench, plan, "d", FIDDLER, WEIGHTS["d"], FIDDLER_POLICY_PARAMS, preload_pinned=True)]


def make_best(candidates: list[Candidate]) -> Callable[[Bench, BatchPlan], list[dict[str, Any]]]:
    def run_best(bench: Bench, plan: BatchPlan) -> list[dict[str, Any]]:
        rows = [run_offload(bench, plan, "e", c, WEIGHTS["e"]) for c in candidates]
        for r, c in zip(rows, candidates):
            if c.predictor == "oracle":
                r["config"] = "e*"  # the prefetch ceiling: reported, never (e)
        ok = [r for r in rows if r["config"] == "e" and r["status"] == "ok" and r.get("tokens_per_s")]
        if ok:
            max(ok, key=lambda r: r["tokens_per_s"])["best_of_e"] = True
        return rows
    return run_best


def pooled_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, label), in first-seen order. A configuration run several times (``--repeats``)
    gets its speed pooled over its ok runs (decode tokens / decode seconds, seconds / steps), each run's
    tokens/s in ``runs_tokens_per_s``, its counts from its first ok run; a single run is itself."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["label"]), []).append(r)
    out = []
    for rs in groups.values():
        ok = [r for r in rs if r.get("status") == "ok" and r.get("tokens_per_s")]
        if len(rs) == 1 or not ok:
            out.append(rs[0])
            continue
        m = dict(ok[0])
        seconds = sum(r["decode_s"] for r in ok)
        m.update(tokens_per_s=sum(r["decode_tokens"] for r in ok) / seconds,
                 ms_per_step=1e3 * seconds / sum(r["decode_steps"] for r in ok),
                 ms_per_token=1e3 * seconds / sum(r["decode_tokens"] for r in ok),
                 decode_steps=sum(r["decode_steps"] for r in ok), runs_tokens_per_s=[r["tokens_per_s"] for r in ok])
        if (m.get("bound") or {}).get("bound_ms_per_step"):
            m["ms_per_step_over_bound"] = m["ms_per_step"] / m["bound"]["bound_ms_per_step"]
        out.append(m)
    return out


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The reported row per config key (runs of one configuration pooled): the faster implementation for
    (a), the best candidate for (e)."""
    out: dict[str, dict[str, Any]] = {}
    for r in pooled_rows(rows):
        if r.get("status") != "ok" or not r.get("tokens_per_s"):
            continue
        cur = out.get(r["config"])
        if cur is None or r["tokens_per_s"] > cur["tokens_per_s"]:
            out[r["config"]] = r
    return out


# -- bounds per batch -------------------------------------------------------------------------------

def attach_bounds(bench: Bench, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The lower bound of each row's replayed steps (cached per distinct step set); the batch's summary."""
    best = best_rows(rows)
    compute = best["a"]["ms_per_step"] if "a" in best else None
    cpu_ms = None
    d = best.get("d")
    if d and d.get("cpu_experts") and d.get("cpu_ms") is not None:
        cpu_ms = d["cpu_ms"] / d["cpu_experts"]
    cache: dict[Any, dict[str, Any]] = {}
    copy_ms = bench.copy["ms_per_expert"]
    for r in rows:
        units = r.pop("_units", None)
        if not units or r.get("status") != "ok" or r["config"] == "n":  # (n) is a measurement, not a scheme
            continue
        sig = tuple((u.request, u.ids.shape[0], u.timed_decode) for u in units) + \
            (hash(np.concatenate([u.ids for u in units]).tobytes()),)
        if sig not in cache:
            misses, steps = belady_misses(units, bench.E, bench.slots)
            service = None
            if cpu_ms is not None:
                from moecache.sim.bound import split_time

                bypass, _ = belady_misses(units, bench.E, bench.slots, bypass=True)
                service = split_time(copy_ms, [cpu_ms] * len(bypass))
            cache[sig] = step_bound(len(misses), steps, copy_ms, compute, service)
        r["bound"] = cache[sig]
        b = r["bound"].get("bound_ms_per_step")
        if b and r.get("ms_per_step"):
            r["ms_per_step_over_bound"] = r["ms_per_step"] / b
    summary = {"copy_ms_per_expert": copy_ms, "compute_ms_per_step": compute, "cpu_ms_per_expert": cpu_ms,
               "slots": bench.slots}
    e = best_rows(rows).get("e")  # again: the pooled rows are copies made before the bounds were attached
    if e is not None and "bound" in e:
        summary["for_e"] = e["bound"]
    return summary


# -- report -----------------------------------------------------------------------------------------

def fmt(x: Any, spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``, a dash for None."""
    return "—" if x is None else format(x, spec)


def write_markdown(path: str, out: dict[str, Any]) -> None:
    m, info = out["machine"], out["setup"]
    lines = [f"# End-to-end decode: {info['title']}, {info['moe_layers']} of its {info['full_moe_layers']} MoE "
             f"layers, {info['dtype']}, random weights, routing replayed",
             "",
             f"- card: {m.get('gpu', 'CPU only')} ({m.get('cpu_count')} CPU cores); date {m['date']}; "
             f"torch {m['torch']}, transformers {m['transformers']}; extension {m['extension'].get('status')}",
             f"- command: `{out['command']}`",
             f"- trace: {info['trace']} ({info['trace_rows']} rows, {info['trace_sequences']} sequences; "
             f"{info['fit_sequences']} sequences not replayed fit the predictors and static placement)",
             f"- experts: {info['total_experts']} x {info['expert_bytes'] / 2**20:.1f} MiB = "
             f"{info['host_store_bytes'] / 2**30:.1f} GiB in host memory (pinned: {info['host_pinned']}); "
             f"non-expert weights {info['nonexpert_bytes'] / 2**30:.2f} GiB on the GPU",
             f"- budget: {out['args']['fraction']:.0%} of expert memory = {info['slots']} slots "
             f"({info['slots'] // info['moe_layers']} per layer for (c))",
             f"- copy measured in this run: {out['copy']['ms_per_expert']:.3f} ms per expert, "
             f"{out['copy']['gb_per_s']:.1f} GB/s ({out['copy']['method']})",
             f"- wall time {out.get('wall_s', 0):.0f} s of a {out['args']['time_budget']:.0f} s budget; "
             "(e) is the fastest candidate by tokens/s measured in this same run",
             ""]
    for note in info.get("notes", []):
        lines.append(f"- note: {note}")
    for b, res in out["batches"].items():
        lines += ["", f"## Batch {b}", ""]
        if "error" in res:
            lines += [f"not run: {res['error']}", ""]
            continue
        lines += ["| config | configuration | tokens/s | ms/step | hit rate | ready rate | stall ms/step | "
                  "MB copied/step | host ms/layer (prefetch) | steps | x bound | status |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        best = {(r["config"], r["label"]) for r in best_rows(res["rows"]).values() if r["config"] in ("a", "e")}
        for r in pooled_rows(res["rows"]):
            mark = " **(best)**" if (r["config"], r["label"]) in best else ""
            if r.get("runs_tokens_per_s"):
                mark += " (runs: " + " / ".join(f"{v:.2f}" for v in r["runs_tokens_per_s"]) + " tokens/s)"
            bpp = r.get("bytes_copied_per_step")
            host = "—" if r.get("host_ms_per_layer") is None else (
                f"{r['host_ms_per_layer']:.2f} ({fmt(r.get('prefetch_host_ms_per_layer'))})")
            lines.append(
                f"| {r['config']} | {r['label']}{mark} | {fmt(r.get('tokens_per_s'))} | "
                f"{fmt(r.get('ms_per_step'), '.1f')} | "
                f"{fmt(r.get('hit_rate'), '.3f')} | {fmt(r.get('ready_rate'), '.3f')} | "
                f"{fmt(r.get('stall_ms_per_step'), '.1f')} | {fmt(None if bpp is None else bpp / 1e6, '.0f')} | {host} | "
                f"{r.get('decode_steps', '—')} | {fmt(r.get('ms_per_step_over_bound'))} | "
                f"{r['status'].splitlines()[0][:90]} |")
        if any(r["config"] == "e*" for r in res["rows"]):
            lines += ["", "e*: the prefetch ceiling, not a scheme anyone can run: its `oracle` predictor reads the "
                      "replay's routing ahead, so every prefetch is of an expert the next layer really uses; the "
                      "copies, the policy and the host work are the runtime's own. Never chosen as (e)."]
        s = res.get("bound_summary", {})
        fe = s.get("for_e")
        if fe:
            lines += ["", f"Lower bound on (e)'s steps: Belady {fe['belady_misses_per_step']:.2f} misses/step x "
                      f"{s['copy_ms_per_expert']:.3f} ms = {fe['copy_ms_per_step']:.1f} ms/step of copies; "
                      f"all-resident compute {fmt(fe['compute_ms_per_step'], '.1f')} ms/step; "
                      f"bound = max = {fe['bound_ms_per_step']:.1f} ms/step "
                      f"({1e3 * int(b) / fe['bound_ms_per_step']:.1f} tokens/s), serial sum "
                      f"{fmt(fe['serial_ms_per_step'], '.1f')} ms/step."]
            if fe.get("miss_service_with_cpu_ms_per_step") is not None:
                lines.append(f"With CPU execution of misses ({s['cpu_ms_per_expert']:.3f} ms per expert, measured by "
                             f"(d)): Belady-with-bypass miss service {fe['miss_service_with_cpu_ms_per_step']:.1f} "
                             "ms/step.")
        if res.get("targets"):
            lines += ["", "| target | value | met |", "| --- | ---: | --- |"]
            for t in res["targets"]:
                met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
                why = f" ({t['why']})" if t.get("why") else ""
                lines.append(f"| {t['target']} | {fmt(t.get('value'))} | {met}{why} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def public_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


