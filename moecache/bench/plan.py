"""Planning a suite: each trace's identity, fitting split and preparation, and the grid of
configurations, each run (with its journal key) or skipped with a stated reason. The rules are those
of ``moecache.bench.suite``'s docstring (fitting, grid, bound)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..cost.hardware import HardwareProfile, default_profile, load_profile, slots_for_format, with_format
from ..errors import ConfigError
from ..policies import POLICIES, new_policy
from ..predictors import PREDICTORS
from ..sim.capacity import resolve_capacity
from ..sim.schedule import Schedule
from ..sim.simulator import simulate
from ..trace import PHASE_DECODE, RoutingBlock, Trace, TraceMeta, count_ids, open_trace
from ..trace.store import MANIFEST
from .config import BF16, Settings, Spec, Suite, TraceSpec, format_label, resolve_expert_format

#: Bumped when a row's content changes meaning: old journals then recompute instead of mixing.
SCHEMA = 1


# -- traces: identity, split, preparation -----------------------------------------------------------------

def trace_identity(path: str) -> str:
    """A hash of the trace's manifest and its ids: a rebuilt trace with other routing gets a new key."""
    h = hashlib.sha256()
    with open(os.path.join(path, MANIFEST), "rb") as f:
        manifest = f.read()
    h.update(manifest)
    for chunk in json.loads(manifest).get("chunks", []):
        with open(os.path.join(path, chunk["name"], "ids.npy"), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:24]


def split_trace(trace: Any, spec: TraceSpec) -> tuple[Any, Any, str]:
    """``(fit part, scored part, statement)`` as ``moecache.bench.suite``'s docstring describes."""
    if spec.fit_by == "sequences":
        seqs = trace.sequences()
        n_fit = int(math.floor(len(seqs) * spec.fit_share))
        if n_fit < 1 or n_fit >= len(seqs):
            raise ConfigError(f"trace {spec.name!r}: cannot fit on the leading {spec.fit_share:.0%} of its "
                              f"{len(seqs)} sequence(s) and score the rest; change fit_share, or set "
                              "fit_by = \"tokens\" for a trace that is one stream")
        rest = seqs[n_fit:]
        if spec.scored_sequences is not None:
            rest = rest[:spec.scored_sequences]
        score = trace.select_sequences(rest)
        note = (f"fitted on the leading {n_fit} of {len(seqs)} sequences ({spec.fit_share:.0%}); scored on the "
                f"next {len(rest)} sequences ({len(score):,} tokens)")
        return trace.select_sequences(seqs[:n_fit]), score, note
    n = len(trace)
    cut = int(math.floor(n * spec.fit_share))
    if cut < 1 or cut >= n:
        raise ConfigError(f"trace {spec.name!r}: cannot fit on the leading {spec.fit_share:.0%} of its {n} tokens "
                          "and score the rest; change fit_share")
    end = n if spec.scored_tokens is None else min(n, cut + spec.scored_tokens)
    idx = np.arange(n)
    note = (f"fitted on the leading {cut:,} of {n:,} tokens in recorded order ({spec.fit_share:.0%}); scored on "
            f"the next {end - cut:,} tokens")
    return trace.select(idx < cut), trace.select((idx >= cut) & (idx < end)), note


def hardware_for(settings: Settings, bytes_per_expert: int | None) -> HardwareProfile:
    if settings.hardware:
        return load_profile(settings.hardware, bytes_per_expert)
    return default_profile(bytes_per_expert)


@dataclass
class TraceInfo:
    """What the planner knows about a trace (read in the main process)."""

    spec: TraceSpec
    dims: tuple[int, int, int]
    identity: str
    fit_note: str
    tokens: int
    mode: str
    hardware: dict[str, Any]
    hardware_text: str


def describe_trace(spec: TraceSpec, settings: Settings) -> TraceInfo:
    trace = open_trace(spec.path)
    _fit, score, note = split_trace(trace, spec)
    m = trace.meta
    try:
        hw = hardware_for(settings, m.bytes_per_expert)
    except ConfigError as e:
        raise ConfigError(f"trace {spec.name!r}: {e}") from None
    return TraceInfo(spec=spec, dims=(m.num_layers, m.num_experts, m.top_k), identity=trace_identity(spec.path),
                     fit_note=note, tokens=len(score), mode="decode" if spec.decode_stream else "step",
                     hardware=hw.to_json(), hardware_text=hw.describe())


@dataclass
class Prepared:
    """A trace ready to replay (in the process that runs its rows): schedule, fitting data, predictors."""

    schedule: Any
    fit: Any
    counts: np.ndarray
    hardware: Any
    fit_note: str
    predictors: dict[Spec, Any] = field(default_factory=dict)

    def predictor(self, spec: Spec | None) -> Any:
        """A fresh copy of the predictor, fitted once per trace on the fit part."""
        if spec is None:
            return None
        fitted = self.predictors.get(spec)
        if fitted is None:
            s = self.schedule
            fitted = PREDICTORS.get(spec.name)(s.num_layers, s.num_experts, s.top_k, **spec.kwargs())
            if fitted.needs_fit:
                fitted.fit(self.fit)
            self.predictors[spec] = fitted
        return copy.deepcopy(fitted)


_PREPARED: dict[tuple[TraceSpec, str, Settings], Prepared] = {}


def prepare(spec: TraceSpec, settings: Settings, identity: str = "") -> Prepared:
    """Prepared trace, cached per process (the latest two: tasks arrive trace by trace); ``identity``
    (``trace_identity``) keeps a rebuilt trace at the same path from reusing the old one."""
    key = (spec, identity, settings)
    got = _PREPARED.get(key)
    if got is not None:
        return got
    trace = open_trace(spec.path)
    fit, score, note = split_trace(trace, spec)
    prep = Prepared(schedule=Schedule(score, decode_stream=spec.decode_stream, name=spec.name), fit=fit,
                    counts=count_ids(fit), hardware=hardware_for(settings, trace.meta.bytes_per_expert),
                    fit_note=note)
    while len(_PREPARED) >= 2:
        _PREPARED.pop(next(iter(_PREPARED)))
    _PREPARED[key] = prep
    return prep


# -- the grid --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One grid point."""

    trace: str
    scope: str
    capacity: str
    policy: Spec
    predictor: Spec | None
    depth: int
    fmt: Spec = BF16  # the experts' format (``formats`` of the config)

    @property
    def label(self) -> str:
        """``policy`` alone, or ``policy + predictor D=d``; `` [format]`` after it where not bf16."""
        if self.predictor is None:
            text = self.policy.label + (f" D={self.depth}" if self.depth else "")
        else:
            text = f"{self.policy.label} + {self.predictor.label} D={self.depth}"
        return text if self.fmt == BF16 else f"{text} [{format_label(self.fmt)}]"


def format_hardware(hw: HardwareProfile, fmt: Spec) -> HardwareProfile:
    """``hw`` (bf16 experts) in the format ``fmt`` (``moecache.cost.hardware.with_format``)."""
    if fmt == BF16:
        return hw
    f, mode = resolve_expert_format(fmt)
    return with_format(hw, f, mode)


@dataclass(frozen=True)
class Run:
    config: Config
    key: str
    slots: int
    order: tuple[int, ...]


@dataclass(frozen=True)
class Skip:
    config: Config
    reason: str
    order: tuple[int, ...]


def policy_class(spec: Spec) -> Any:
    return POLICIES.get(spec.name)


def predictor_offline(spec: Spec | None) -> bool:
    """A predictor that reads the future (the oracle) is a ceiling, not an online scheme."""
    if spec is None:
        return False
    return hasattr(PREDICTORS.get(spec.name), "set_future")


#: Combinations that make no sense, in the order they are tested: (reason, test(policy, predictor, depth)).
SKIP_RULES: tuple[tuple[str, Callable[[Spec, Spec | None, int], bool]], ...] = (
    ("prefetch depth > 0 needs a predictor",
     lambda pol, pred, d: d > 0 and pred is None),
    ("the policy evicts by predictions: it needs a predictor",
     lambda pol, pred, d: pred is None and policy_class(pol).uses_scores),
    ("offline policies run demand-only: no predictor, no prefetch",
     lambda pol, pred, d: pred is not None and policy_class(pol).offline),
    ("without prefetch this policy does not read the predictor: the same as predictor none",
     lambda pol, pred, d: pred is not None and d == 0 and not policy_class(pol).uses_scores),
)


class Probe:
    """A dry run of each combination on a tiny synthetic trace of the real trace's shape, before any work:
    a combination that the simulator refuses for that shape (e.g. ``predicted``, which asks for predictions
    one token ahead, with a ``transition`` predictor fitted to fewer layers) is skipped with the simulator's
    own message as its reason, instead of failing the sweep midway."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._traces: dict[tuple[int, int, int], Any] = {}
        self._seen: dict[tuple, str | None] = {}

    def _trace(self, dims: tuple[int, int, int]) -> Any:
        got = self._traces.get(dims)
        if got is None:
            L, E, K = dims
            n = 2  # one sequence of two tokens (every layer asks its predictions), ids distinct per token
            ids = np.array([[[(t + l + j) % E for j in range(K)] for l in range(L)] for t in range(n)], np.int64)
            meta = TraceMeta(num_experts=E, top_k=K, moe_layers=list(range(L)), model="probe",
                             bytes_per_expert=1_000_000)
            block = RoutingBlock.build(ids, seq=0, pos=np.arange(n),
                                       step=np.arange(n), phase=PHASE_DECODE)
            got = self._traces[dims] = Trace(meta, block)
        return got

    def __call__(self, dims: tuple[int, int, int], pol: Spec, pred: Spec | None, depth: int) -> str | None:
        """Why the simulator refuses the combination on a trace of shape ``dims``, or None. Probed once per
        shape and combination, in layer scope at the smallest capacity (top_k slots)."""
        key = (dims, pol, pred, depth)
        if key not in self._seen:
            self._seen[key] = self._run(*key)
        return self._seen[key]

    def _run(self, dims: tuple[int, int, int], pol: Spec, pred: Spec | None, depth: int) -> str | None:
        L, E, K = dims
        trace = self._trace(dims)
        try:  # building and fitting on a toy trace may fail for reasons of its own: then there is no verdict
            policy = new_policy(pol.name, K, L, E, top_k=K, scope="layer", **pol.kwargs())
            if policy.needs_fit:
                policy.fit(count_ids(trace))
            predictor = None
            if pred is not None:
                predictor = PREDICTORS.get(pred.name)(L, E, K, **pred.kwargs())
                if predictor.needs_fit:
                    predictor.fit(trace)
        except Exception:  # noqa: BLE001
            return None
        try:
            simulate(Schedule(trace, decode_stream=True), policy, predictor, depth=depth,
                     prefetch=self.settings.prefetch_rule, budget=self.settings.prefetch_budget,
                     miss_rule=self.settings.miss_rule, bound=False, engine="python",
                     copy_queue=self.settings.copy_queue)
        except ConfigError as e:
            return f"the simulator refuses it for this trace: {e}"
        return None


def row_key(cfg: Config, slots: int, info: TraceInfo, settings: Settings) -> str:
    """The journal key of a configuration: a hash of everything that determines its row."""
    s = info.spec
    doc = {
        "schema": SCHEMA,
        "trace": [s.name, info.identity, s.decode_stream, s.fit_share, s.fit_by, s.scored_sequences, s.scored_tokens],
        "hardware": info.hardware,
        "settings": [settings.miss_rule, settings.prefetch_rule, settings.prefetch_budget],
        "scope": cfg.scope, "capacity": cfg.capacity, "slots": slots,
        "policy": [cfg.policy.name, list(cfg.policy.params)],
        "predictor": None if cfg.predictor is None else [cfg.predictor.name, list(cfg.predictor.params)],
        "depth": cfg.depth,
    }
    if settings.copy_queue != "fifo":  # rows of the FIFO copy model keep the keys they had when it was the default
        doc["copy_queue"] = settings.copy_queue
    if cfg.fmt != BF16:  # bf16 rows keep the keys they had before formats were a grid dimension
        doc["format"] = [cfg.fmt.name, list(cfg.fmt.params)]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class Plan:
    suite: Suite
    infos: dict[str, TraceInfo]
    runs: list[Run]
    skipped: list[Skip]

    def bound_config(self, cfg: Config) -> Config:
        return Config(cfg.trace, cfg.scope, cfg.capacity, self.suite.bound, None, 0, cfg.fmt)


def _slots(cap: str, dims: tuple[int, int, int], scope: str) -> tuple[int | None, str | None]:
    L, E, K = dims
    if not cap.endswith("%") and int(cap) < K:
        return None, f"{cap} slots is below the trace's top_k={K}"
    return resolve_capacity(cap, L, E, K, scope), None


def _capacity_skips(caps: list[str], dims: tuple[int, int, int],
                    scope: str) -> dict[str, tuple[int | None, str | None]]:
    """Slots and skip reason per capacity. Capacities that resolve to the same slots would give identical
    rows: the one that asks for that many slots most exactly is run (e.g. 25% of 8 experts = 2 slots, not
    10%, which is raised to top_k = 2), ties to config order, and the others are skipped naming it."""
    L, E, _K = dims
    total = E if scope == "layer" else L * E
    out = {c: _slots(c, dims, scope) for c in caps}
    groups: dict[int, list[str]] = {}
    for c in caps:
        if out[c][1] is None:
            groups.setdefault(out[c][0], []).append(c)  # type: ignore[arg-type]
    for slots, same in groups.items():
        asked = {c: float(c[:-1]) / 100.0 * total if c.endswith("%") else float(c) for c in same}
        keep = min(same, key=lambda c: (abs(asked[c] - slots), same.index(c)))
        for c in same:
            if c != keep:
                out[c] = (slots, f"{c} resolves to {slots} slots, the same as {keep}")
    return out


def expand(suite: Suite, infos: dict[str, TraceInfo]) -> Plan:
    """Every grid point, run or skipped with its reason, in config order."""
    runs: list[Run] = []
    skipped: list[Skip] = []
    probe = Probe(suite.settings)
    for ti, tspec in enumerate(suite.traces):
        info = infos[tspec.name]
        for si, scope in enumerate(suite.scopes):
            scope_why = ("the trace has one MoE layer: global scope is the same as layer scope"
                         if scope == "global" and info.dims[0] == 1 and "layer" in suite.scopes else None)
            caps = _capacity_skips(suite.capacities, info.dims, scope)
            total = info.dims[1] if scope == "layer" else info.dims[0] * info.dims[1]
            for ci, cap in enumerate(suite.capacities):
                dense_slots, cap_why = caps[cap]
                for fi, fmt in enumerate(suite.formats):
                    slots = dense_slots
                    if slots is not None and fmt != BF16:  # the same memory holds more (or fewer) experts
                        _f, mode = resolve_expert_format(fmt)
                        hw = format_hardware(HardwareProfile(**info.hardware), fmt)
                        slots = max(info.dims[2], slots_for_format(slots, total, hw, mode))
                    for pi, pol in enumerate(suite.policies):
                        for qi, pred in enumerate(suite.predictors):
                            for di, depth in enumerate(suite.depths):
                                cfg = Config(tspec.name, scope, cap, pol, pred, depth, fmt)
                                order = (ti, si, ci, fi, pi, qi, di)
                                why = scope_why or cap_why or next(
                                    (r for r, test in SKIP_RULES if test(pol, pred, depth)), None) \
                                    or probe(info.dims, pol, pred, depth)
                                if why:
                                    skipped.append(Skip(cfg, why, order))
                                    continue
                                assert slots is not None  # no slots is a capacity skip above
                                runs.append(Run(cfg, row_key(cfg, slots, info, suite.settings), slots, order))
    return Plan(suite, infos, runs, skipped)


def plan_suite(suite: Suite) -> Plan:
    infos = {t.name: describe_trace(t, suite.settings) for t in suite.traces}
    return expand(suite, infos)
