"""The hardware profile of the timing model: copy, GPU and CPU costs of one expert.

Fields (all times in milliseconds):

* ``copy_bandwidth_gbps`` and ``copy_latency_ms``: one expert copy takes
  ``copy_latency_ms + bytes_per_expert / (copy_bandwidth_gbps * 1e6)`` (1 GB = 1e9 bytes);
* ``gpu_ms``, ``cpu_ms``: one expert's compute time by batch size (tokens routed to it), a table
  ``{tokens: ms}``; ``non_expert_ms``: the GPU time of everything else in one MoE layer (attention,
  norms, router, shared experts), by tokens in the step. A table is read piecewise-linearly between
  its points, flat below the first, and extended along its last segment above the last point
  (flat for a one-point table).

Defaults (``default_profile``) come from the measurements in ``shared/docs/hardware.md``
(H100 80GB, PCIe Gen5, pinned host memory, 16 CPU threads), copied here as data:

* copy: a line ``ms = latency + bytes / bandwidth`` fitted to the six measured expert copies (9 to
  336 MiB) by least squares on relative error (``_fit_copy_line``);
* GPU and CPU per expert: the measured row whose size matches ``bytes_per_expert`` within 2%, else
  linear interpolation in MiB between the two neighbouring rows (the nearest row outside the
  table). The CPU table has the measured 1- and 64-token points. The GPU was measured at 1 token
  only; small-batch expert compute is launch- and weight-read-bound, so we add a second point at
  4096 tokens with the FLOPs at 400 TFLOP/s (a bf16 SwiGLU expert does 2 FLOPs per weight per token,
  i.e. ``bytes_per_expert`` FLOPs per token);
* non-expert time: 27.5 ms per token for 27 layers measured for the DeepSeek-V2-Lite shape at batch
  1 with the routed experts zeroed, i.e. 1.0185 ms per layer, used for every batch size (one
  measured point).

Host and interference terms (all default 0, the uncalibrated model; see ``moecache.cost.timing``
for where each enters the timeline):

* ``layer_host_ms``: host time per MoE layer step between the router's result and the launch of the
  layer's expert work (the routing sync, the policy's decisions, queueing): the GPU idles meanwhile;
* ``copy_host_ms``: host time to issue one demand copy (an upload); the host issues copies one after
  another, and the expert kernels are launched after them;
* ``predictor_host_ms``: host time per step to feed the predictor and read its predictions (per
  predictor name in ``predictor_host_by_name`` where measured; ``predictor_host_ms`` for the others),
  and ``prefetch_host_ms`` per prefetch queued, both after the expert kernels were launched: they
  delay the next layer's launch, not this layer's experts;
* ``copy_slowdown``: GPU kernels run ``1 + copy_slowdown`` times longer while a copy is in flight
  (copies beside the decode's small kernels slow them);
* ``hybrid_layer_ms``: the fixed cost of a step that runs experts on the CPU (moving its activations
  there and back, waiting for the CPU pool), added once to the step's CPU path.

The expert kernel (``expert_kernel``): ``per_expert`` (the uncalibrated model) charges each expert's
kernel from ``gpu_ms``; ``grouped`` (the calibrated profile; the runtime runs a step's experts in one
kernel) charges ``expert_launch_ms`` once per step, with the non-expert work, and per distinct expert its
weight read at ``GPU_READ_GBPS`` plus its FLOPs at ``GPU_TFLOPS`` per token. Both constants come from
hardware.md: the read rate from its largest expert's 1-token GPU time (Mixtral, 336 MiB in 0.14 ms: a
weight-read-bound kernel), the fixed cost from its ``batched_mm`` all-resident decode less the experts-zeroed
one (DeepSeek-V2-Lite shape, batch 1: (38.7 - 27.5) / 27 ms per layer) less the six experts' reads.
``evict_host_by_name``: host time per insert of a policy whose eviction scans the pool (policy name: ms),
added to each demand copy's and prefetch's host cost.

``default_profile`` is the *calibrated* profile: these terms, and ``cpu_table_scale`` (the runtime's
CPU kernel against hardware.md's CPU table: the table above times this factor), come from the frozen fit in
``moecache/cost/profiles/h100_calibrated.json`` (values, the runs they were fitted on and the held-out
validation are stated in that file; ``eval/calibrate_timing.py`` regenerates it), on top of the
hardware.md tables above. ``uncalibrated_profile`` is the same without them (every term 0).

``load_profile(path)`` reads a JSON object with any of these fields (the runtime writes measured
profiles in this form); fields it leaves out keep the defaults for the given ``bytes_per_expert``
(the calibrated terms included), except that a file with its own ``gpu_ms`` table and no
``expert_kernel`` is read as ``per_expert`` (its table is what each expert costs).
"""

from __future__ import annotations

import bisect
import math
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

MIB = 1 << 20

#: hardware.md, "One expert's SwiGLU FFN": (MiB, copy ms, GPU ms at 1 token, CPU ms at 1, CPU ms at 64).
MEASURED_EXPERTS: tuple[tuple[float, float, float, float, float], ...] = (
    (9.0, 0.19, 0.11, 0.40, 0.50),     # Qwen3-30B-A3B 2048 x 768
    (12.0, 0.25, 0.11, 0.34, 0.56),    # OLMoE-1B-7B 2048 x 1024
    (16.5, 0.33, 0.12, 0.43, 0.81),    # Qwen1.5-MoE-A2.7B 2048 x 1408
    (47.0, 1.04, 0.11, 0.77, 1.4),     # GPT-OSS-20B as bf16 2880 x 2880
    (84.0, 1.65, 0.08, 1.8, 2.6),      # DeepSeek-V3 7168 x 2048
    (336.0, 6.4, 0.14, 5.8, 7.8),      # Mixtral-8x7B 4096 x 14336
)
#: hardware.md, decode at batch 1, DeepSeek-V2-Lite shape: 27.5 ms/token over 27 layers, experts zeroed.
NON_EXPERT_MS_PER_LAYER = 27.5 / 27
#: Assumed dense bf16 throughput for the GPU's large-batch point (see the module docstring).
GPU_TFLOPS = 400.0
#: hardware.md, decode at batch 1, DeepSeek-V2-Lite shape, all experts resident with ``batched_mm`` (one
#: kernel for a layer's experts) against the experts zeroed: the grouped expert kernel per layer for top-6
#: experts of 16.5 MiB at one token each.
GROUPED_KERNEL_MS_PER_LAYER = (38.7 - 27.5) / 27
GROUPED_KERNEL_EXPERTS, GROUPED_KERNEL_MIB = 6, 16.5
#: The GPU's weight-read rate (GB/s) in the expert kernel: hardware.md's largest expert (Mixtral's 336 MiB)
#: computes one token in its measured GPU time, so reading its weights bounds that time.
GPU_READ_GBPS = 336.0 * MIB / (0.14 * 1e6)
GPU_BIG_BATCH = 4096
DEFAULT_SOURCE = "shared/docs/hardware.md (H100 80GB, PCIe Gen5, pinned)"


def _fit_copy_line() -> tuple[float, float]:
    """``ms = a + b * bytes`` through the measured copies, least squares on relative error (weights
    ``1 / ms^2``, so the small copies count as much as the large ones): ``(latency_ms, bandwidth_gbps)``."""
    xs = [m * MIB for m, *_ in MEASURED_EXPERTS]
    ys = [c for _, c, *_ in MEASURED_EXPERTS]
    ws = [1.0 / (y * y) for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    b = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    a = my - b * mx
    return a, 1.0 / (b * 1e6)


def _interp_rows(mib: float) -> tuple[float, float, float, float]:
    """(copy, gpu1, cpu1, cpu64) at ``mib``: a matching row, else linear between neighbours, else nearest."""
    rows = MEASURED_EXPERTS
    for r in rows:
        if abs(r[0] - mib) <= 0.02 * r[0]:
            return r[1:]
    if mib <= rows[0][0]:
        return rows[0][1:]
    if mib >= rows[-1][0]:
        return rows[-1][1:]
    i = bisect.bisect_left([r[0] for r in rows], mib)
    lo, hi = rows[i - 1], rows[i]
    w = (mib - lo[0]) / (hi[0] - lo[0])
    return tuple(lo[j] + w * (hi[j] - lo[j]) for j in range(1, 5))  # type: ignore[return-value]


def _table(obj: Any, name: str) -> dict[int, float]:
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"hardware profile: {name} must be a non-empty object {{tokens: ms}}, got {obj!r}")
    out: dict[int, float] = {}
    for k, v in obj.items():
        try:
            t, ms = int(k), float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"hardware profile: {name} has a bad entry {k!r}: {v!r} (want tokens: ms)") from None
        if t < 1 or ms < 0:
            raise ConfigError(f"hardware profile: {name} entry {k!r}: {v!r} needs tokens >= 1 and ms >= 0")
        out[t] = ms
    return dict(sorted(out.items()))


def lookup(table: dict[int, float], tokens: int) -> float:
    """Piecewise-linear read of ``{tokens: ms}`` (flat below, last segment extended above)."""
    xs = list(table)
    ys = list(table.values())
    if tokens <= xs[0] or len(xs) == 1:
        return ys[0]
    i = bisect.bisect_left(xs, tokens)
    if i < len(xs) and xs[i] == tokens:
        return ys[i]
    if i == len(xs):
        i -= 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (tokens - x0) * (y1 - y0) / (x1 - x0)


@dataclass
class HardwareProfile:
    """Costs of the timing model. See the module docstring for units and defaults."""

    bytes_per_expert: int
    copy_bandwidth_gbps: float
    copy_latency_ms: float
    gpu_ms: dict[int, float]
    cpu_ms: dict[int, float]
    non_expert_ms: dict[int, float]
    source: str = DEFAULT_SOURCE
    #: Bytes one copy moves where experts are compressed (None: ``bytes_per_expert``, the dense size, which
    #: the compute tables are read at); ``expand_ms``: added to every expert's GPU time (the compressed
    #: pool expands each expert a kernel reads); ``expert_format``: a label ("bf16", "int4 g64" ...).
    copy_bytes_per_expert: int | None = None
    expand_ms: float = 0.0
    expert_format: str = "bf16"
    #: Host and interference terms of the calibrated model (module docstring); 0: the term is off.
    layer_host_ms: float = 0.0
    copy_host_ms: float = 0.0
    predictor_host_ms: float = 0.0
    prefetch_host_ms: float = 0.0
    copy_slowdown: float = 0.0
    hybrid_layer_ms: float = 0.0
    #: How a step's experts run on the GPU (module docstring): ``per_expert`` (one kernel each, ``gpu_ms``) or
    #: ``grouped`` (one kernel per step: ``expert_launch_ms`` once, then each distinct expert's weight read
    #: and FLOPs).
    expert_kernel: str = "per_expert"
    expert_launch_ms: float = 0.0
    #: Measured host time per step of particular predictors (name: ms); others take ``predictor_host_ms``.
    predictor_host_by_name: dict | None = None
    #: Host time per cache insert (the eviction it makes) of policies whose eviction scans the pool (policy
    #: name: ms), added to each demand copy's ``copy_host_ms`` and each prefetch's ``prefetch_host_ms``.
    evict_host_by_name: dict | None = None
    #: Where the host and interference terms come from (the fit's provenance), or None.
    calibration: dict | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.bytes_per_expert < 1:
            raise ConfigError(f"hardware profile: bytes_per_expert must be >= 1, got {self.bytes_per_expert}")
        if not self.copy_bandwidth_gbps > 0 or self.copy_latency_ms < 0:
            raise ConfigError("hardware profile: copy_bandwidth_gbps must be > 0 and copy_latency_ms >= 0, got "
                              f"{self.copy_bandwidth_gbps} and {self.copy_latency_ms}")
        for name in HOST_TERMS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"hardware profile: {name} must be a number >= 0 (ms, or a fraction for "
                                  f"copy_slowdown), got {v!r}")
            setattr(self, name, float(v))
        by_name = self.predictor_host_by_name
        if by_name is not None:
            if not isinstance(by_name, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and
                    math.isfinite(v) and v >= 0 for k, v in by_name.items()):
                raise ConfigError("hardware profile: predictor_host_by_name must be an object {predictor name: ms >= 0}, "
                                  f"got {by_name!r}")
            self.predictor_host_by_name = {k: float(v) for k, v in by_name.items()}
        ev = self.evict_host_by_name
        if ev is not None:
            if not isinstance(ev, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and
                    math.isfinite(v) and v >= 0 for k, v in ev.items()):
                raise ConfigError("hardware profile: evict_host_by_name must be an object {policy name: ms >= 0}, "
                                  f"got {ev!r}")
            self.evict_host_by_name = {k: float(v) for k, v in ev.items()}
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ConfigError(f"hardware profile: calibration must be an object (the fit's provenance), got "
                              f"{type(self.calibration).__name__}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ConfigError(f"hardware profile: expert_kernel must be one of {', '.join(EXPERT_KERNELS)}, got "
                              f"{self.expert_kernel!r}")
        v = self.expert_launch_ms
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"hardware profile: expert_launch_ms must be a number >= 0 (ms), got {v!r}")
        self.expert_launch_ms = float(v)
        self.gpu_ms = _table(self.gpu_ms, "gpu_ms")
        self.cpu_ms = _table(self.cpu_ms, "cpu_ms")
        self.non_expert_ms = _table(self.non_expert_ms, "non_expert_ms")

    @property
    def calibrated(self) -> bool:
        """Whether any host or interference term is on."""
        return any(getattr(self, n) for n in HOST_TERMS) or any((self.predictor_host_by_name or {}).values())

    @property
    def slowdown(self) -> float:
        """The factor on GPU kernel time while a copy is in flight (1.0: no interference)."""
        return 1.0 + self.copy_slowdown

    def host_terms(self) -> dict[str, Any]:
        """The host and interference terms by name (with the per-predictor host times)."""
        return {**{n: getattr(self, n) for n in HOST_TERMS}, "predictor_host_by_name": self.predictor_host_by_name,
                "evict_host_by_name": self.evict_host_by_name}

    def predictor_host(self, name: str | None) -> float:
        """Host time per step of the predictor called ``name``."""
        by = self.predictor_host_by_name
        if by and name in by:
            return by[name]
        return self.predictor_host_ms

    def evict_host(self, policy_name: str | None) -> float:
        """Host time per insert of the policy called ``policy_name`` beyond the copy's (0 where not measured)."""
        ev = self.evict_host_by_name
        if ev and policy_name in ev:
            return ev[policy_name]
        return 0.0

    @property
    def copy_bytes(self) -> int:
        return self.bytes_per_expert if self.copy_bytes_per_expert is None else self.copy_bytes_per_expert

    @property
    def copy_ms(self) -> float:
        """Time of one expert copy."""
        return self.copy_latency_ms + self.copy_bytes / (self.copy_bandwidth_gbps * 1e6)

    def gpu(self, tokens: int) -> float:
        """GPU time of one expert for ``tokens`` tokens (memoised: the replay asks the same few sizes): its
        kernel (``per_expert``), or what it adds to the step's grouped kernel (``grouped``: reading its
        weights once, and its FLOPs)."""
        key = ("g", tokens)
        v = self._cache.get(key)
        if v is None:
            if self.expert_kernel == "grouped":
                b = self.bytes_per_expert
                base = b / (GPU_READ_GBPS * 1e6) + tokens * b / (GPU_TFLOPS * 1e12) * 1e3
            else:
                base = lookup(self.gpu_ms, tokens)
            v = self._cache[key] = base + self.expand_ms
        return v

    def cpu(self, tokens: int) -> float:
        key = ("c", tokens)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = lookup(self.cpu_ms, tokens)
        return v

    def non_expert(self, tokens: int) -> float:
        """GPU time of one MoE layer step besides its experts; with the ``grouped`` expert kernel, its fixed
        cost (``expert_launch_ms``) too: the same stream runs it once every step, after the router."""
        key = ("n", tokens)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = lookup(self.non_expert_ms, tokens) + self.expert_launch_ms
        return v

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_cache", None)
        for k in ("gpu_ms", "cpu_ms", "non_expert_ms"):
            d[k] = {str(t): ms for t, ms in d[k].items()}
        return d

    def describe(self) -> str:
        host = ""
        if self.calibrated:
            host = (f", host {self.layer_host_ms:.3f} ms/layer + {self.copy_host_ms:.3f}/copy, "
                    f"predictor {self.predictor_host_ms:.3f} + {self.prefetch_host_ms:.3f}/prefetch, "
                    f"copy slowdown {self.copy_slowdown:.3f}, hybrid {self.hybrid_layer_ms:.3f} ms/layer")
        if self.expert_kernel == "grouped":
            host += f", grouped expert kernel {self.expert_launch_ms:.3f} ms/step + {self.gpu(1):.4f}/expert"
        return (f"{self.bytes_per_expert / MIB:.1f} MiB/expert, copy {self.copy_ms:.3f} ms, "
                f"GPU {self.gpu(1):.3f} ms, CPU {self.cpu(1):.3f} ms at 1 token{host}; {self.source}")


#: How a step's experts run on the GPU (``HardwareProfile.expert_kernel``).
EXPERT_KERNELS = ("per_expert", "grouped")


def grouped_launch_ms() -> float:
    """The fixed cost of the grouped expert kernel per step: hardware.md's grouped kernel per layer (top-6
    experts of 16.5 MiB, one token each) less what its experts add (``HardwareProfile.gpu`` in
    ``grouped`` mode). One measured shape: used for every expert size."""
    b = GROUPED_KERNEL_MIB * MIB
    per = b / (GPU_READ_GBPS * 1e6) + b / (GPU_TFLOPS * 1e12) * 1e3
    return max(0.0, GROUPED_KERNEL_MS_PER_LAYER - GROUPED_KERNEL_EXPERTS * per)


#: The host and interference terms (``HardwareProfile`` fields, 0 in the uncalibrated model).
HOST_TERMS = ("layer_host_ms", "copy_host_ms", "predictor_host_ms", "prefetch_host_ms", "copy_slowdown",
              "hybrid_layer_ms")
#: The frozen calibrated terms (written by eval/calibrate_timing.py, with their provenance).
CALIBRATED_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles", "h100_calibrated.json")
_calibrated_cache: dict[str, Any] = {}


def calibrated_terms(path: str | None = None) -> dict[str, Any]:
    """The host and interference terms of the frozen calibrated profile (and its ``source`` and
    ``calibration``), read once; a missing or damaged file is an error naming the fix."""
    path = path or CALIBRATED_PROFILE
    got = _calibrated_cache.get(path)
    if got is not None:
        return got
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"the calibrated hardware profile {path} is missing; reinstall moecache or regenerate it "
                          "with `python eval/calibrate_timing.py --freeze`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"the calibrated hardware profile {path} is not valid JSON ({e}); regenerate it with "
                          "`python eval/calibrate_timing.py --freeze`") from None
    extra = {"source", "calibration", "predictor_host_by_name", "cpu_table_scale", "expert_kernel",
             "expert_launch_ms", "evict_host_by_name", "non_expert_ms"}
    bad = sorted(set(obj) - set(HOST_TERMS) - extra) if isinstance(obj, dict) else ["(not an object)"]
    if bad or any(n not in obj for n in HOST_TERMS):
        raise ConfigError(f"the calibrated hardware profile {path} must hold exactly {', '.join(HOST_TERMS)} (and "
                          f"source, calibration); found extra {bad}: regenerate it with "
                          "`python eval/calibrate_timing.py --freeze`")
    _calibrated_cache[path] = obj
    return obj


def uncalibrated_profile(bytes_per_expert: int) -> HardwareProfile:
    """The H100 defaults for an expert of ``bytes_per_expert`` bytes without host or interference
    terms: the model before calibration (see the module docstring)."""
    if bytes_per_expert is None or int(bytes_per_expert) < 1:
        raise ConfigError("the timing model needs the size of one expert in bytes: the trace's metadata has no "
                          "bytes_per_expert; pass --bytes-per-expert N or --hardware FILE with bytes_per_expert")
    b = int(bytes_per_expert)
    latency, bandwidth = _fit_copy_line()
    _copy, gpu1, cpu1, cpu64 = _interp_rows(b / MIB)
    gpu_big = gpu1 + (GPU_BIG_BATCH - 1) * b / (GPU_TFLOPS * 1e12) * 1e3
    return HardwareProfile(
        bytes_per_expert=b, copy_bandwidth_gbps=bandwidth, copy_latency_ms=latency,
        gpu_ms={1: gpu1, GPU_BIG_BATCH: gpu_big}, cpu_ms={1: cpu1, 64: cpu64},
        non_expert_ms={1: NON_EXPERT_MS_PER_LAYER}, source=DEFAULT_SOURCE)


def default_profile(bytes_per_expert: int) -> HardwareProfile:
    """The calibrated H100 profile for an expert of ``bytes_per_expert`` bytes: the hardware.md tables
    (``uncalibrated_profile``) with the frozen host and interference terms (``calibrated_terms``)."""
    hw = uncalibrated_profile(bytes_per_expert)
    terms = calibrated_terms()
    for n in HOST_TERMS:
        setattr(hw, n, float(terms[n]))
    hw.predictor_host_by_name = terms.get("predictor_host_by_name")
    hw.evict_host_by_name = terms.get("evict_host_by_name")
    hw.expert_kernel = terms.get("expert_kernel", "per_expert")
    hw.expert_launch_ms = float(terms.get("expert_launch_ms", 0.0))
    if terms.get("non_expert_ms"):  # measured on the GPU (null experts), in place of hardware.md's one figure
        hw.non_expert_ms = {int(t): float(ms) for t, ms in terms["non_expert_ms"].items()}
    scale = float(terms.get("cpu_table_scale", 1.0))
    hw.cpu_ms = {t: ms * scale for t, ms in hw.cpu_ms.items()}
    hw.calibration = terms.get("calibration")
    hw.source = f"{DEFAULT_SOURCE}; {terms.get('source', 'calibrated')}"
    hw.__post_init__()
    return hw


_FIELDS = ("bytes_per_expert", "copy_bandwidth_gbps", "copy_latency_ms", "gpu_ms", "cpu_ms", "non_expert_ms", "source",
           "copy_bytes_per_expert", "expand_ms", "expert_format") + HOST_TERMS + ("predictor_host_by_name",
                                                                                  "calibration", "expert_kernel",
                                                                                  "expert_launch_ms",
                                                                                  "evict_host_by_name")

#: Assumed device-memory throughput of the torch expansion (reads the compressed row, writes the dense
#: one) and its launch cost per expert; not measured here (the GPU issue measures the fused kernel).
EXPAND_GBPS = 1500.0
EXPAND_LAUNCH_MS = 0.01


def with_format(hw: HardwareProfile, fmt: Any, pool_mode: str = "compressed") -> HardwareProfile:
    """``hw`` (dense experts of ``hw.bytes_per_expert`` bf16 bytes) with experts in format ``fmt``
    (``moecache.quant.ExpertFormat``; None: unchanged). Copies move the compressed bytes; the compute
    tables stay those of the dense expert (the kernel reads dense weights). ``compressed`` pool: every
    expert a kernel reads is expanded first (``expand_ms`` on each GPU expert time); ``expanded`` pool:
    once per copy (added to the copy time, through ``copy_latency_ms``)."""
    if fmt is None:
        return hw
    weights = hw.bytes_per_expert / 2  # bf16
    packed = int(math.ceil(weights * fmt.bits_per_weight() / 8))
    expand = EXPAND_LAUNCH_MS + (packed + hw.bytes_per_expert) / (EXPAND_GBPS * 1e6)
    d = hw.to_json()
    label = fmt.describe() + f" ({pool_mode} pool)"
    d.update(copy_bytes_per_expert=packed, expert_format=label, source=f"{hw.source}; experts {label}")
    if pool_mode == "compressed":
        d["expand_ms"] = expand
    else:
        d["copy_latency_ms"] = hw.copy_latency_ms + expand
    return HardwareProfile(**d)


def slots_for_format(slots: int, total: int, hw: HardwareProfile, pool_mode: str) -> int:
    """Slots that the memory of ``slots`` dense experts holds in ``hw``'s format and pool mode (at most ``total``)."""
    if hw.copy_bytes_per_expert is None:
        return slots
    per_slot = hw.copy_bytes if pool_mode == "compressed" else hw.copy_bytes + hw.bytes_per_expert
    return min(total, slots * hw.bytes_per_expert // per_slot)


def load_profile(path: str | os.PathLike, bytes_per_expert: int | None = None) -> HardwareProfile:
    """A profile from a JSON file; fields it leaves out are the defaults for its (or the given) expert size."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"hardware profile {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"hardware profile {path} must be a JSON object with fields {', '.join(_FIELDS)}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"hardware profile {path}: unknown field(s) {unknown}; valid: {', '.join(_FIELDS)}")
    b = obj.get("bytes_per_expert", bytes_per_expert)
    base = default_profile(b).to_json()
    base["source"] = path
    if "gpu_ms" in obj and "expert_kernel" not in obj:
        # a file's own GPU table is per expert kernel: the grouped kernel would ignore it
        base.update(expert_kernel="per_expert", expert_launch_ms=0.0)
    base.update(obj)
    try:
        return HardwareProfile(**base)
    except TypeError as e:
        raise ConfigError(f"hardware profile {path}: {e}") from None
