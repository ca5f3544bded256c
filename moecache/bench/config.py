"""The policy suite's config: reading and validating ``moecache bench --suite CONFIG``.

A config is TOML, or JSON with the same structure::

    name = "my suite"                   # optional title
    miss_rule = "copy"                  # default copy; see `moecache bench --list`
    prefetch_rule = "topk"              # default topk
    prefetch_budget = 8                 # optional; default top_k x tokens of the step
    copy_queue = "worker"               # the simulator's copy model: worker (default, the runtime's) or fifo
    hardware = "default"                # or a hardware profile JSON (path)
    plots = true                        # PNG plots (needs matplotlib)
    decode_stream = true                # default for every trace (default false: batched steps as recorded)
    fit_share = 0.5                     # default for every trace (default 0.2)
    fit_by = "sequences"                # or "tokens" (a trace that is one stream)
    policies = ["lru", "lfu:half_life=64", {name = "lrfu", params = {lam = 0.01}}, "belady"]
    predictors = ["none", "temporal", "transition"]
    depths = [0, 1, 2]                  # MoE layers ahead that prefetch reaches
    capacities = ["10%", "25%", 12]     # share of the experts, or slots per pool
    scopes = ["layer", "global"]
    formats = ["bf16", "int8", "int4", "int4:group_size=128", "int4:pool_mode=expanded"]   # default ["bf16"]

    [[traces]]
    name = "deepseek"
    path = "../build/suite_traces/deepseek-v2-lite"
    scored_sequences = 10               # optional: score only the first 10 sequences after the fit part
    # also per trace: decode_stream, fit_share, fit_by, scored_tokens (with fit_by = "tokens")

``formats``: the experts' format as a grid dimension (``moecache bench --expert-dtype``): ``bf16``, ``int8`` or
``int4`` with ``group_size`` (32, 64 default, 128) and ``pool_mode`` (``compressed`` default, ``expanded``). A
capacity is a share of the bf16 expert memory, which holds more compressed experts; copies move the compressed
bytes and every expert keeps the bf16 compute time plus the expansion (``moecache.cost.hardware.with_format``).
The per-miss precision rule is not a suite format (it needs gate weights and the Python engine: run it with
``moecache bench --low-precision-misses``).

Relative paths (traces, hardware) are resolved against **the config file's folder**, never the
current directory, so a config runs the same from anywhere. Every name is checked against the
registries (policies, predictors, miss and prefetch rules, scopes) and every trace is opened before
any work starts; an error names the problem and the valid choices.

The grid it spans, the fitting split, the bound and the outputs: ``moecache.bench.suite``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..cost.timing import MISS_RULES
from ..errors import ConfigError
from ..policies import POLICIES, SCOPES, new_policy
from ..predictors import PREDICTORS
from ..registry import split_spec
from ..sim.copy_queue import COPY_QUEUES, DEFAULT_COPY_QUEUE
from ..sim.prefetch import PREFETCH_RULES
from ..trace.store import MANIFEST

#: The predictor name that means "no predictor".
NONE = "none"

_TOP_KEYS = ("name", "miss_rule", "prefetch_rule", "prefetch_budget", "copy_queue", "hardware", "plots", "decode_stream",
             "fit_share", "fit_by", "policies", "predictors", "depths", "capacities", "scopes", "formats", "traces")
_TRACE_KEYS = ("name", "path", "decode_stream", "fit_share", "fit_by", "scored_sequences", "scored_tokens")
FIT_BY = ("sequences", "tokens")


@dataclass(frozen=True)
class Spec:
    """A policy or predictor with its parameters, as the config names it."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.name + "".join(f":{k}={v}" for k, v in self.params)

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


#: The dense format every suite runs unless ``formats`` says otherwise.
BF16 = Spec("bf16")
_FORMAT_PARAMS = ("group_size", "pool_mode")


def resolve_expert_format(spec: Spec) -> tuple[Any, str]:
    """``(moecache.quant.ExpertFormat or None for bf16, pool mode)`` of a ``formats`` entry."""
    from ..quant import resolve_format

    kw = spec.kwargs()
    if spec.name not in ("bf16", "int8", "int4"):
        raise ConfigError(f"format {spec.label!r}: use bf16, int8 or int4 (the timing model's experts are bf16)")
    unknown = sorted(set(kw) - set(_FORMAT_PARAMS))
    if unknown:
        raise ConfigError(f"format {spec.label!r}: unknown parameter(s) {unknown}; valid: {', '.join(_FORMAT_PARAMS)}")
    pool_mode = kw.get("pool_mode", "compressed")
    if pool_mode not in ("compressed", "expanded"):
        raise ConfigError(f"format {spec.label!r}: pool_mode must be compressed or expanded, got {pool_mode!r}")
    if spec.name == "bf16" and kw:
        raise ConfigError(f"format {spec.label!r}: bf16 takes no parameters")
    return resolve_format(spec.name, kw.get("group_size")), pool_mode


def format_label(spec: Spec) -> str:
    """``bf16``, ``int4 g64``, ``int4 g64 expanded`` ..."""
    fmt, mode = resolve_expert_format(spec)
    return "bf16" if fmt is None else fmt.describe() + (" expanded" if mode == "expanded" else "")


@dataclass(frozen=True)
class TraceSpec:
    name: str
    path: str           # resolved, absolute
    decode_stream: bool
    fit_share: float
    fit_by: str
    scored_sequences: int | None = None
    scored_tokens: int | None = None


@dataclass(frozen=True)
class Settings:
    miss_rule: str = "copy"
    prefetch_rule: str = "topk"
    prefetch_budget: int | None = None
    hardware: str | None = None     # a profile JSON (absolute path), or None for the default profile
    copy_queue: str = DEFAULT_COPY_QUEUE  # the simulator's copy model (moecache.sim.copy_queue)


@dataclass
class Suite:
    """A validated config."""

    source: str
    digest: str
    name: str
    settings: Settings
    plots: bool
    traces: list[TraceSpec]
    policies: list[Spec]
    predictors: list[Spec | None]
    depths: list[int]
    capacities: list[str]
    scopes: list[str]
    bound: Spec
    bound_added: bool
    formats: list[Spec] = None  # type: ignore[assignment]  # [BF16] unless the config lists formats

    def __post_init__(self) -> None:
        if self.formats is None:
            self.formats = [BF16]

    @property
    def multi_format(self) -> bool:
        """Whether the grid has a format other than bf16 (then the outputs name each row's format)."""
        return self.formats != [BF16]


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _scalar(v: Any, where: str) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    raise ConfigError(f"{where}: parameter value {v!r} must be a number, string or boolean")


def _parse_spec(item: Any, where: str) -> Spec:
    """``"name"``, ``"name:key=value:..."`` or ``{name = ..., params = {...}}``."""
    if isinstance(item, str):
        name, raw = split_spec(item, f"{where}: parameter")
        params: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                params[k] = json.loads(v)
            except json.JSONDecodeError:
                params[k] = v
    elif isinstance(item, dict):
        unknown = sorted(set(item) - {"name", "params"})
        if unknown or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: a table entry needs a string 'name' and optional 'params' table; "
                              f"got keys {sorted(item)}")
        name, params = item["name"], item.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: 'params' of {name!r} must be a table of key = value")
    else:
        raise ConfigError(f"{where}: {item!r} is neither \"name[:key=value]\" nor a table {{name, params}}")
    return Spec(name.strip(), tuple(sorted((str(k), _scalar(v, where)) for k, v in params.items())))


def _policy(spec: Spec, where: str) -> Spec:
    try:
        POLICIES.get(spec.name)
        new_policy(spec.name, 2, 2, 8, top_k=2, scope="layer", **spec.kwargs())  # checks the parameters
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


def _predictor(spec: Spec, where: str) -> Spec | None:
    if spec.name == NONE:
        if spec.params:
            raise ConfigError(f"{where}: predictor 'none' takes no parameters")
        return None
    try:
        cls = PREDICTORS.get(spec.name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e} (or 'none': no predictor)") from None
    if getattr(cls, "needs_model", False):
        raise ConfigError(f"{where}: predictor {spec.name!r} reads hidden states, which a routing trace does not "
                          "have; it runs only in the runtime")
    try:
        cls(2, 8, 2, **spec.kwargs())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: predictor {spec.label!r}: {e}") from None
    return spec


def _list(obj: dict, key: str, source: str, default: list | None = None) -> list:
    v = obj.get(key, default)
    if v is None:
        raise ConfigError(f"{_where(source, key)} is missing: give a non-empty list")
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{_where(source, key)} must be a non-empty list, got {v!r}")
    return v


def _unique(items: Sequence[Any], label: Callable[[Any], str], where: str) -> None:
    seen = Counter(label(x) for x in items)
    dup = sorted(k for k, n in seen.items() if n > 1)
    if dup:
        raise ConfigError(f"{where}: listed more than once: {', '.join(dup)}")


def _capacity(v: Any, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ConfigError(f"{where}: capacity {v!r} must be a share like \"25%\" or a slot count like 12")
    s = str(v).strip()
    if s.endswith("%"):
        try:
            p = float(s[:-1])
        except ValueError:
            raise ConfigError(f"{where}: capacity {v!r} is not a percentage like \"25%\"") from None
        if not 0.0 < p <= 100.0:
            raise ConfigError(f"{where}: capacity {v!r} must be a share in (0%, 100%]")
        return s
    try:
        n = int(s)
    except ValueError:
        raise ConfigError(f"{where}: capacity {v!r} is neither a percentage (\"25%\") nor a slot count (12)") from None
    if n < 1:
        raise ConfigError(f"{where}: capacity {v!r} must be at least 1 slot")
    return str(n)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, got {v!r}")
    return v


def _share(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
        raise ConfigError(f"{where} must be a number in (0, 1), got {v!r}")
    return float(v)


def _positive(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{where} must be a positive integer, got {v!r}")
    return v


def _trace(item: Any, i: int, base: str, source: str, defaults: dict[str, Any]) -> TraceSpec:
    where = f"{source}: traces[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table with name and path, got {item!r}")
    unknown = sorted(set(item) - set(_TRACE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(_TRACE_KEYS)}")
    name, path = item.get("name"), item.get("path")
    if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path:
        raise ConfigError(f"{where} needs a non-empty string name and path")
    where = f"{source}: trace {name!r}"
    full = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if not os.path.isfile(os.path.join(full, MANIFEST)):
        raise ConfigError(f"{where}: no moecache trace at {full} (path {path!r}, relative to the config's folder "
                          f"{base}); build the suite's traces with `python eval/suite_traces.py`, or convert "
                          "published logs with `moecache trace import`")
    fit_by = item.get("fit_by", defaults["fit_by"])
    if fit_by not in FIT_BY:
        raise ConfigError(f"{where}: fit_by {fit_by!r} is not one of {', '.join(FIT_BY)}")
    seqs = _positive(item.get("scored_sequences"), f"{where}: scored_sequences")
    toks = _positive(item.get("scored_tokens"), f"{where}: scored_tokens")
    if seqs is not None and fit_by != "sequences":
        raise ConfigError(f"{where}: scored_sequences needs fit_by = \"sequences\"; use scored_tokens")
    if toks is not None and fit_by != "tokens":
        raise ConfigError(f"{where}: scored_tokens needs fit_by = \"tokens\"; use scored_sequences")
    decode = _bool(item.get("decode_stream", defaults["decode_stream"]), f"{where}: decode_stream")
    return TraceSpec(name=name.strip(), path=full, decode_stream=decode,
                     fit_share=_share(item.get("fit_share", defaults["fit_share"]), f"{where}: fit_share"),
                     fit_by=fit_by, scored_sequences=seqs, scored_tokens=toks)


def parse_config(obj: Any, base: str, source: str = "config", digest: str = "") -> Suite:
    """Validate a config object (see the module docstring); ``base`` resolves relative paths."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{source}: the config must be a table (TOML) or object (JSON)")
    unknown = sorted(set(obj) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid: {', '.join(_TOP_KEYS)}")
    try:
        miss_rule = MISS_RULES.get(obj.get("miss_rule", "copy"))
        PREFETCH_RULES.get(obj.get("prefetch_rule", "topk"))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    copy_queue = obj.get("copy_queue", DEFAULT_COPY_QUEUE)
    if copy_queue not in COPY_QUEUES:
        raise ConfigError(f"{source}: copy_queue {copy_queue!r} is not one of {', '.join(COPY_QUEUES)} (worker: the "
                          "runtime's copy worker, the default; fifo: every copy in issue order)")
    hardware = obj.get("hardware", "default")
    if not isinstance(hardware, str):
        raise ConfigError(f"{source}: hardware must be \"default\" or the path of a profile JSON")
    hw_path = None
    if hardware != "default":
        hw_path = hardware if os.path.isabs(hardware) else os.path.normpath(os.path.join(base, hardware))
        if not os.path.isfile(hw_path):
            raise ConfigError(f"{source}: hardware profile {hw_path} not found (relative paths start at the "
                              f"config's folder {base})")
    settings = Settings(miss_rule=miss_rule.name, prefetch_rule=obj.get("prefetch_rule", "topk"),
                        prefetch_budget=_positive(obj.get("prefetch_budget"), f"{source}: prefetch_budget"),
                        hardware=hw_path, copy_queue=copy_queue)

    policies = [_policy(_parse_spec(p, f"{source}: policies"), f"{source}: policies")
                for p in _list(obj, "policies", source)]
    _unique(policies, lambda s: s.label, f"{source}: policies")
    predictors = [_predictor(_parse_spec(p, f"{source}: predictors"), f"{source}: predictors")
                  for p in _list(obj, "predictors", source, [NONE])]
    _unique(predictors, lambda s: NONE if s is None else s.label, f"{source}: predictors")
    depths = _list(obj, "depths", source, [0])
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"{source}: depths: {d!r} is not a whole number of MoE layers >= 0")
    _unique(depths, str, f"{source}: depths")
    if None not in predictors or 0 not in depths:
        raise ConfigError(f"{source}: predictors must include \"none\" and depths must include 0: the bound rows "
                          "(the offline optimum without predictor or prefetch) are the reference of every ratio")
    capacities = [_capacity(c, f"{source}: capacities") for c in _list(obj, "capacities", source)]
    _unique(capacities, str, f"{source}: capacities")
    scopes = _list(obj, "scopes", source, ["layer"])
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ConfigError(f"{source}: unknown scope(s) {bad}; valid: {', '.join(SCOPES)}")
    _unique(scopes, str, f"{source}: scopes")

    formats = [_parse_spec(f, f"{source}: formats") for f in _list(obj, "formats", source, ["bf16"])]
    for f in formats:
        try:
            resolve_expert_format(f)
        except ConfigError as e:
            raise ConfigError(f"{source}: formats: {e}") from None
    _unique(formats, format_label, f"{source}: formats")

    bound = Spec("belady_bypass" if miss_rule.uses_cpu else "belady")
    added = bound not in policies
    if added:
        policies.append(bound)
    for p in policies:  # offline policies other than the bound are allowed, but must exist as such
        POLICIES.get(p.name)

    defaults = {"decode_stream": _bool(obj.get("decode_stream", False), f"{source}: decode_stream"),
                "fit_share": _share(obj.get("fit_share", 0.2), f"{source}: fit_share"),
                "fit_by": obj.get("fit_by", "sequences")}
    if defaults["fit_by"] not in FIT_BY:
        raise ConfigError(f"{source}: fit_by {defaults['fit_by']!r} is not one of {', '.join(FIT_BY)}")
    traces = [_trace(t, i, base, source, defaults) for i, t in enumerate(_list(obj, "traces", source))]
    _unique(traces, lambda t: t.name, f"{source}: traces (names)")
    name = obj.get("name", os.path.splitext(os.path.basename(source))[0])
    if not isinstance(name, str):
        raise ConfigError(f"{source}: name must be a string")
    plots = _bool(obj.get("plots", True), f"{source}: plots")
    return Suite(source=source, digest=digest, name=name, settings=settings, plots=plots, traces=traces,
                 policies=policies, predictors=predictors, depths=depths, capacities=capacities, scopes=scopes,
                 bound=bound, bound_added=added, formats=formats)


def load_config(path: str | os.PathLike) -> Suite:
    """Read and validate a TOML (``.toml``) or JSON (``.json``) suite config."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no suite config at {path}")
    with open(path, "rb") as f:
        data = f.read()
    ext = os.path.splitext(path)[1].lower()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError(f"{path}: TOML configs need Python 3.11+ (tomllib); write the config as JSON") from None
        try:
            obj = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    elif ext == ".json":
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    else:
        raise ConfigError(f"{path}: a suite config is a .toml or .json file")
    base = os.path.dirname(os.path.abspath(path))
    return parse_config(obj, base, source=path, digest=hashlib.sha256(data).hexdigest()[:16])
