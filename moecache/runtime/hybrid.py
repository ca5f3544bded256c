"""Hybrid CPU-GPU expert execution: a missed expert is either copied to the GPU or computed on the host.

At batch 1 a missed expert costs about as much to copy as to compute on the host's cores from its
host weights, and both can run at once (``shared/docs/hardware.md``). ``offload(..., hybrid=...)``
decides per missed expert which of the two serves it:

* ``HYBRID_RULES``: ``auto`` (the cost model below), ``cpu`` (every miss on the CPU, nothing copied
  on a miss: only prefetches fill the pool, Fiddler's scheme), ``copy`` (never the CPU) and ``half``
  (every second miss on the CPU, for tests). ``hybrid=True`` means ``auto``.
* The ``auto`` rule is ``moecache.cost.timing.choose_copy``, the very function behind the
  simulator's ``auto`` (and, without the credit, ``min``) miss rule: per missed expert, in ascending
  key order, copy unless the CPU would finish first, given the queues: the copy engine's modelled
  backlog (every copy issued adds ``copy_ms``) and the CPU runs already decided in this layer. The
  copy path is credited for what caching the expert saves later (``timing.reuse_credit``: hits per
  copy so far, at most ``timing.REUSE_CREDIT_MAX``, times the CPU run), so that a layer's misses
  split between the two queues instead of all going to a CPU that is slightly faster than a copy
  and leaving the pool empty (Mixtral at batch 1: two misses, one each). Its costs (copy ms per
  expert, CPU ms and marginal GPU ms per expert by tokens routed to it) are *measured* at start-up
  on this machine (``calibrate``, a short measurement) and cached as a hardware
  profile JSON per machine and expert shape under ``$MOECACHE_CACHE_DIR`` or ``~/.cache/moecache``
  (``hybrid/<hash>.json``); ``moecache bench --hardware FILE --miss-rule auto`` replays traces with
  the same profile and the same rule. While the model runs, the CPU cost follows what its CPU jobs
  measure (``OnlineCosts``: an EWMA of measured / modelled, the measurement being the host's launch,
  the kernel and the merge, so it absorbs the slowdown of copies running at the same time and the
  hybrid path's fixed cost per layer). Many tokens per expert (batches, prefill) raise the CPU time
  and favour the copy.

The CPU side (``CpuKernel``): the C++ pool ``moecache._C.CpuExpertPool`` (``csrc/cpu_expert.cpp``:
AVX-512 / AVX2+FMA / portable, fp32 accumulation, blocked over weight rows x tokens so that a batch
or a prefill reads each weight once, with the same bits for a token alone or among many; ``cores -
2`` threads by default (``$MOECACHE_CPU_THREADS``) so cores stay free for the thread that launches GPU
work and for the copy worker, GIL released) for the
concatenated SwiGLU layout with SiLU; the
torch path (the model's own experts class on host views of the store, run on the calling thread)
for anything else, or where the extension is missing or disabled. ``MOECACHE_CPU_KERNEL`` picks
``auto`` (default), ``portable``, ``avx2``, ``avx512`` or ``torch``; a CPU without the requested
instructions gets the best kernel it has. ``MOECACHE_CPU_PREWAKE=0`` stops the launch from waking the
pool's workers before the task is ready (a diagnostic switch; see eval/results/hybrid_diag).

Where results differ from the unpatched model: an expert run on the CPU accumulates in fp32 in a
different order than the GPU's GEMMs, and rounds to the model dtype once at the end, so its output
differs in the low bits (bf16: within a few bf16 ulps of the GPU's). Layers where every expert is on
the GPU are untouched (bit-identical as without ``hybrid``). In a layer with CPU experts, every
(token, k) contribution is weighted as transformers does (``output.to(dtype) * weight``) and the
contributions are summed over k in (token, k) order, as the ``batched_mm``/``grouped_mm`` backends
sum them (the eager backend sums in expert order instead). Tokens are equal wherever the top-2 logit
gap exceeds those differences; the tests check that and logits within a stated tolerance.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .._ext import extension
from ..atomic import write_json_atomic
from ..errors import ConfigError
from ..registry import Registry
from ..cost.hardware import HardwareProfile, default_profile, load_profile
from ..cost.timing import Timeline, choose_copy, reuse_credit, reuse_rate
from .experts import make_shell
from .stats import RuntimeCounters

ENV_KERNEL = "MOECACHE_CPU_KERNEL"
ENV_CACHE = "MOECACHE_CACHE_DIR"
ENV_PREWAKE = "MOECACHE_CPU_PREWAKE"
#: Bump when what calibrate() measures changes: older cache files are then measured again.
#: 2: marginal GPU time (back-to-back calls), CPU time on experts rotated out of the caches.
CALIBRATION_VERSION = 2
#: Tokens per expert at which the CPU and GPU times are measured (read piecewise-linearly between).
CPU_TOKENS = (1, 4, 16, 64)
GPU_TOKENS = (1, 64)
CPU_KERNELS = ("auto", "portable", "avx2", "avx512", "torch")
#: Weight of the newest measured/modelled CPU time ratio in the online CPU cost (EWMA) ...
CPU_EWMA = 0.2
#: ... and the range one measurement may move it by (a preempted worker is not the machine's speed).
CPU_RATIO_CLAMP = (0.25, 4.0)
#: Up to this many token rows in a layer, CPU experts' rows are gathered on the host from one copy of
#: the whole hidden state (decode: a few KiB) rather than on the device (saves two launches).
HOST_GATHER_ROWS = 16


# -- decision rules ---------------------------------------------------------------------------------

class OnlineCosts:
    """The costs a rule reads while the model runs: the calibrated profile, with the CPU time scaled by
    what this run's own CPU jobs cost (EWMA of measured / modelled ms). Measured is what a layer's CPU
    experts put on its critical path: the host's launch (gathering and copying their rows, starting
    the kernel), the kernel's own time (slowed by copies running at the same time, which a calibration
    on an idle machine misses) and the merge after the wait; so the scale also spreads the hybrid
    path's fixed cost per layer over its CPU experts (it matters for small experts, whose CPU run is
    short next to that fixed cost). Copy and GPU times stay as calibrated: the copy engine's copies are not timed one by one."""

    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        self.copy_ms = profile.copy_ms
        self.cpu_scale = 1.0
        self.samples = 0

    def gpu(self, tokens: int) -> float:
        return self.profile.gpu(tokens)

    def cpu(self, tokens: int) -> float:
        return self.profile.cpu(tokens) * self.cpu_scale

    def observe_cpu(self, sizes: Sequence[int], measured_ms: float) -> None:
        """One CPU job of experts with ``sizes`` tokens each took ``measured_ms``."""
        modelled = sum(self.profile.cpu(n) for n in sizes)
        if modelled <= 0.0 or measured_ms <= 0.0:
            return
        lo, hi = CPU_RATIO_CLAMP
        ratio = min(hi, max(lo, measured_ms / modelled))
        self.cpu_scale += CPU_EWMA * (ratio - self.cpu_scale)
        self.samples += 1


class LayerQueues:
    """What a rule reads when it decides one MoE layer's misses: the costs, the copy engine's and the
    CPU's queues as a ``Timeline`` in ms from now (the simulator's own type), and the runtime's reuse
    counts (needs served from the pool and copies issued, as the simulator counts them)."""

    def __init__(self, costs: OnlineCosts | None, copy_backlog_ms: float, seen: int, hits: int = 0, copies: int = 0):
        self.costs = costs
        self.tl = Timeline()
        self.tl.copy = copy_backlog_ms
        self.tl.hits, self.tl.copies = hits, copies
        self.seen = seen  # misses decided before this layer (by this runtime)


@dataclass(frozen=True)
class DecisionRule:
    """How a missed expert is served: ``decide(queues, key, tokens)`` is True to copy it."""

    name: str
    needs_costs: bool
    decide: Callable[[LayerQueues, int, int], bool]


HYBRID_RULES: Registry[DecisionRule] = Registry("hybrid rule")


def _auto(q: LayerQueues, key: int, tokens: int) -> bool:
    c, tl = q.costs, q.tl
    cpu = c.cpu(tokens)
    return choose_copy(0.0, tl.copy, tl.cpu, c.copy_ms, c.gpu(tokens), cpu, reuse_credit(tl.hits, tl.copies, cpu))


for _rule, _help in ((DecisionRule("auto", True, _auto),
                      "copy unless the CPU finishes first, the copy credited for the hits caching earns "
                      "(measured costs; the simulator's 'auto' miss rule)"),
                     (DecisionRule("cpu", False, lambda q, key, n: False),
                      "every miss on the CPU; nothing copied on a miss (only prefetches fill the pool)"),
                     (DecisionRule("copy", False, lambda q, key, n: True), "every miss copied (hybrid off)"),
                     (DecisionRule("half", False, lambda q, key, n: q.seen % 2 == 1),
                      "every second miss on the CPU, starting with the CPU (for tests)")):
    HYBRID_RULES.register(_rule.name, _help)(_rule)


@dataclass
class HybridConfig:
    """``offload(..., hybrid=HybridConfig(...))``; ``hybrid="auto"`` etc. fill in the defaults.

    * ``rule``: a ``HYBRID_RULES`` name;
    * ``threads``: CPU kernel threads (default: usable cores - 1);
    * ``kernel``: a ``CPU_KERNELS`` name (default ``$MOECACHE_CPU_KERNEL`` or ``auto``);
    * ``profile``: costs for ``auto`` instead of calibrating (a ``HardwareProfile`` or a JSON path);
    * ``cache_dir``: where calibrations are cached (default ``$MOECACHE_CACHE_DIR`` or
      ``~/.cache/moecache``); ``recalibrate``: measure even when a cached calibration exists.
    """

    rule: str = "auto"
    threads: int | None = None
    kernel: str | None = None
    profile: HardwareProfile | str | None = None
    cache_dir: str | None = None
    recalibrate: bool = False

    @classmethod
    def resolve(cls, spec: Any) -> "HybridConfig | None":
        """``False``/``None``/``"off"`` -> None; ``True`` -> auto; a rule name; or a ``HybridConfig``."""
        if spec is None or spec is False or spec == "off":
            return None
        if spec is True:
            spec = "auto"
        if isinstance(spec, str):
            spec = cls(rule=spec)
        if not isinstance(spec, cls):
            raise ConfigError(f"hybrid={spec!r}: pass True/False, a rule name ({', '.join(HYBRID_RULES.names())}) "
                              "or a HybridConfig")
        HYBRID_RULES.get(spec.rule)
        kernel = spec.kernel or os.environ.get(ENV_KERNEL, "").strip().lower() or "auto"
        if kernel not in CPU_KERNELS:
            raise ConfigError(f"CPU kernel {kernel!r} (from {'hybrid kernel=' if spec.kernel else ENV_KERNEL}) is "
                              f"unknown; valid: {', '.join(CPU_KERNELS)}")
        if spec.threads is not None and int(spec.threads) < 1:
            raise ConfigError(f"hybrid threads must be >= 1, got {spec.threads}")
        return cls(spec.rule, spec.threads, kernel, spec.profile, spec.cache_dir, spec.recalibrate)


#: Environment variable that sets the CPU kernel's thread count (default: ``default_threads()``).
ENV_THREADS = "MOECACHE_CPU_THREADS"


def default_threads() -> int:
    """Usable cores minus two, or ``$MOECACHE_CPU_THREADS``. One core runs the thread that launches GPU
    work, one the copy worker: both spin while they wait on CUDA (the driver's default for a single
    context), and a pool thread descheduled for a time slice holds up the whole expert it is part of."""
    env = os.environ.get(ENV_THREADS)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"{ENV_THREADS}={env!r} is not a thread count; set a positive integer or unset it")
        if n < 1:
            raise ConfigError(f"{ENV_THREADS}={env!r}: the CPU kernel needs at least one thread")
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, cores - 2)


# -- CPU kernels ------------------------------------------------------------------------------------

def swiglu_mismatch(original: nn.Module, kinds: dict[str, tuple[int, ...]], dtype: torch.dtype) -> str | None:
    """None when ``original`` computes ``down(silu(gate x) * up x)`` from concatenated, non-transposed
    ``gate_up_proj (2I, H)`` and ``down_proj (H, I)`` without biases (what the C++ kernel does), else why not."""
    if set(kinds) != {"gate_up_proj", "down_proj"}:
        return f"its expert weights are {sorted(kinds)}, not gate_up_proj and down_proj"
    (two_i, h), (h2, i) = kinds["gate_up_proj"], kinds["down_proj"]
    if two_i != 2 * i or h2 != h:
        return f"gate_up_proj {kinds['gate_up_proj']} and down_proj {kinds['down_proj']} are not (2I, H) and (H, I)"
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    for flag, want in flags.items():
        if bool(getattr(original, flag, want)) != want:
            return f"its experts class sets {flag}={not want}"
    gate = getattr(type(original), "_apply_gate", None)
    if gate is None or getattr(gate, "__name__", "") != "_default_apply_gate":
        return "its experts class has its own gating function"
    from transformers.activations import SiLUActivation

    if not isinstance(getattr(original, "act_fn", None), (nn.SiLU, SiLUActivation)):
        return f"its activation is {type(getattr(original, 'act_fn', None)).__name__}, not SiLU"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"its weights are {dtype}; the C++ kernel reads bf16 or fp32"
    return None


class CpuKernel:
    """Runs experts of one layer on the host: ``submit`` returns at once (where it can), ``wait``
    returns the outputs ``(rows, H)`` (fp32 or the model dtype) and the kernel's ms."""

    name = "base"

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def experts_run(self) -> int:
        raise NotImplementedError

    def prewake(self) -> None:
        """A ``submit`` is coming: get ready (the C++ pool wakes its workers meanwhile)."""

    def close(self) -> None:
        pass


class CppKernel(CpuKernel):
    """``moecache._C.CpuExpertPool`` over the host store's rows (read in place)."""

    def __init__(self, store: Any, threads: int, kernel: str, pin: bool):
        C = extension()
        assert C is not None
        self._pool = C.CpuExpertPool(int(threads), kernel)
        self.name = self._pool.kernel()
        self.threads = int(self._pool.threads())
        kinds = {k.name: k.shape for k in store.layout.kinds}
        self.H, self.I = kinds["down_proj"]
        self.wtype = 1 if store.layout.dtype == torch.bfloat16 else 0
        self.pin = pin
        self.store = store  # keeps the rows alive while the pool may read them
        # Address of every expert's gate_up and down rows, by layer: [layer][expert].
        self._gu: list[list[int]] = []
        self._down: list[list[int]] = []
        for layer in range(store.num_layers):
            views = store.layer_views(layer)
            self._gu.append([views["gate_up_proj"][e].data_ptr() for e in range(store.num_experts)])
            self._down.append([views["down_proj"][e].data_ptr() for e in range(store.num_experts)])

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        x32 = x.to(torch.float32).contiguous()  # the launch passes fp32 rows: no CPU op here
        out = torch.empty((x32.shape[0], self.H), dtype=torch.float32, pin_memory=self.pin)
        row = self.H * 4  # bytes of one fp32 row, in and out
        xs, outs, off = [], [], 0
        for n in sizes:
            xs.append(x32.data_ptr() + off * row)
            outs.append(out.data_ptr() + off * row)
            off += n
        ticket = self._pool.submit(self.H, self.I, self.wtype, xs, list(sizes),
                                   [self._gu[layer][e] for e in experts], [self._down[layer][e] for e in experts], outs)
        return ticket, x32, out  # the buffers live as long as the handle

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        ticket, _x, out = handle
        return out, float(self._pool.wait(ticket))

    def experts_run(self) -> int:
        return int(self._pool.counters()[1])

    def prewake(self) -> None:
        self._pool.prewake()

    def read_bandwidth(self, buf: torch.Tensor) -> float:
        """GB/s of a multi-threaded read of ``buf`` (contiguous host tensor) by this pool's threads."""
        ms, _ = self._pool.read(buf.data_ptr(), buf.numel() * buf.element_size())
        return buf.numel() * buf.element_size() / (ms * 1e6)

    def close(self) -> None:
        self._pool.close()


class TorchKernel(CpuKernel):
    """The model's own experts class on host views of the store (any layout; runs on the calling
    thread, so it does not overlap the GPU's work as the C++ pool does)."""

    name = "torch"

    def __init__(self, originals: Sequence[nn.Module], store: Any, num_experts: int):
        self.originals = list(originals)
        self.store = store
        self.E = int(num_experts)
        self._shells: dict[int, nn.Module] = {}
        self._run = 0

    def _shell(self, layer: int) -> nn.Module:
        if layer not in self._shells:
            self._shells[layer] = make_shell(self.originals[layer], self.store.layer_views(layer), self.E)
        return self._shells[layer]

    @torch.no_grad()
    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, sizes: Sequence[int]) -> Any:
        t0 = time.perf_counter()
        x = x.to(self.store.layout.dtype)
        ids = torch.repeat_interleave(torch.tensor(list(experts), dtype=torch.long), torch.tensor(list(sizes)))
        # Each row as its own one-expert token with weight 1: the unweighted expert output.
        out = self._shell(layer)(x, ids.view(-1, 1), torch.ones((x.shape[0], 1), dtype=x.dtype))
        self._run += len(experts)
        return out, 1e3 * (time.perf_counter() - t0)

    def wait(self, handle: Any) -> tuple[torch.Tensor, float]:
        return handle

    def experts_run(self) -> int:
        return self._run


def make_kernel(cfg: HybridConfig, originals: Sequence[nn.Module], store: Any, num_experts: int,
                pin: bool) -> tuple[CpuKernel, str | None]:
    """The CPU kernel for this model, and why it is the torch one (None when it is the C++ one)."""
    kinds = {k.name: k.shape for k in store.layout.kinds}
    if cfg.kernel == "torch":
        why = "asked for (kernel torch)"
    elif extension() is None:
        why = "the extension moecache._C is not built or is disabled (MOECACHE_DISABLE_EXT)"
    else:
        why = swiglu_mismatch(originals[0], kinds, store.layout.dtype)
    if why is None:
        return CppKernel(store, cfg.threads or default_threads(), cfg.kernel, pin), None
    return TorchKernel(originals, store, num_experts), why


# -- calibration ------------------------------------------------------------------------------------

def _median_ms(fn: Callable[[], float], reps: int) -> float:
    fn()  # warm-up (allocations, page faults, clocks)
    return statistics.median(fn() for _ in range(reps))


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """ms of one call: CUDA events on the current stream on the GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        def timed(fn: Callable[[], None]) -> float:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
    else:
        def timed(fn: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return timed


@torch.no_grad()
def calibrate(store: Any, pool: Any, shell: nn.Module, kernel: CpuKernel, hidden: int, reps: int = 7,
              back_to_back: int = 20) -> HardwareProfile:
    """Measure one expert's copy (host row -> pool slot 0), its GPU time on the pool (``shell``, the
    remap shell of MoE layer 0, slot 0) and its CPU time with ``kernel`` at ``GPU_TOKENS`` and
    ``CPU_TOKENS`` tokens of ``hidden`` values; medians of ``reps`` after a warm-up. Run before the
    pool is used (slot 0 is overwritten).

    * GPU: the *marginal* time of one more expert, ``back_to_back`` calls queued one after another
      and timed together (CUDA events) divided by their number: one isolated call timed alone also
      measures the host's launch latency on an idle GPU, which a layer pays once, not per expert.
    * CPU: each run on another expert (rotating over the store's rows), so that its weights come
      from memory as a miss's do, not from the caches the previous run filled; the warm-up runs once
      on every worker thread."""
    dev = pool.device
    timed = _timer(dev)
    layout = store.layout
    H = int(hidden)
    src, dst = store.row(0), pool.data[0]
    if dev.type == "cuda":
        side = torch.cuda.Stream(dev)

        def copy_ms() -> float:
            with torch.cuda.stream(side):
                return timed(lambda: dst.copy_(src, non_blocking=True))
    else:
        def copy_ms() -> float:
            return timed(lambda: dst.copy_(src))
    copy = max(_median_ms(copy_ms, reps), 1e-6)
    gen = torch.Generator(device="cpu").manual_seed(0)
    gpu: dict[int, float] = {}
    for n in GPU_TOKENS:
        x = torch.randn((n, H), generator=gen).to(device=dev, dtype=layout.dtype)
        idx = torch.zeros((n, 1), dtype=torch.long, device=dev)
        w = torch.ones((n, 1), dtype=layout.dtype, device=dev)

        def calls() -> None:
            for _ in range(back_to_back):
                shell(x, idx, w)
        gpu[n] = _median_ms(lambda: timed(calls), reps) / back_to_back
    rows = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    turn = iter(range(1 << 62))
    cpu: dict[int, float] = {}
    for n in CPU_TOKENS:
        x = torch.randn((n, H), generator=gen).to(layout.dtype)

        def run_cpu() -> float:
            layer, e = rows[next(turn) % len(rows)]
            t0 = time.perf_counter()
            kernel.wait(kernel.submit(layer, [e], x, [n]))
            return 1e3 * (time.perf_counter() - t0)
        cpu[n] = _median_ms(run_cpu, reps)
    return HardwareProfile(
        bytes_per_expert=layout.slot_bytes, copy_bandwidth_gbps=layout.slot_bytes / (copy * 1e6),
        copy_latency_ms=0.0, gpu_ms=gpu, cpu_ms=cpu,
        non_expert_ms=default_profile(layout.slot_bytes).non_expert_ms,  # not measured; the rule does not read it
        source=f"calibrated by moecache on {platform.node()} "
               f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} "
               f"({kernel.name} CPU kernel)")


def hidden_size(original: nn.Module, model_config: Any) -> int:
    """The width of the rows an experts module receives."""
    for h in (getattr(original, "hidden_dim", None), getattr(getattr(original, "config", None), "hidden_size", None),
              getattr(model_config, "hidden_size", None)):
        if h is not None:
            return int(h)
    raise ConfigError(f"cannot tell the hidden size of {type(original).__name__} for the hybrid calibration; "
                      "pass HybridConfig(profile=...) instead")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def calibration_key(store: Any, device: torch.device, kernel: CpuKernel) -> dict[str, Any]:
    """What a cached calibration must match: this machine, this expert shape, this kernel setup."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"version": CALIBRATION_VERSION, "host": platform.node(), "arch": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "device": device.type,
            "torch": torch.__version__, "layout": store.layout.describe(), "kernel": kernel.name,
            "threads": getattr(kernel, "threads", None), "cpu_tokens": list(CPU_TOKENS),
            "gpu_tokens": list(GPU_TOKENS)}


def cache_dir(cfg_dir: str | None = None) -> str:
    return cfg_dir or os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "moecache")


def calibration_path(key: dict[str, Any], directory: str | None = None) -> str:
    """``<cache>/hybrid/<hash>.json``: a hardware profile (``moecache bench --hardware`` reads it);
    the key it was measured for sits next to it in ``<hash>.key.json``."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(directory), "hybrid", f"{digest}.json")


def _key_path(path: str) -> str:
    return path[:-len(".json")] + ".key.json"


def cached_calibration(key: dict[str, Any], directory: str | None = None) -> HardwareProfile | None:
    """The cached profile for ``key``, or None (absent, unreadable or for another key: measured again)."""
    path = calibration_path(key, directory)
    try:
        with open(_key_path(path)) as f:
            if json.load(f) != key:
                return None
        return load_profile(path)
    except (OSError, ValueError, ConfigError):
        return None


def save_calibration(key: dict[str, Any], profile: HardwareProfile, directory: str | None = None) -> str:
    path = calibration_path(key, directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, profile.to_json())
    write_json_atomic(_key_path(path), key)  # last: a profile without its key is measured again
    return path


# -- the executor the runtime calls -----------------------------------------------------------------

@dataclass
class CpuWork:
    """CPU experts of one layer in flight: their (token, k) pair indices (grouped by expert; on the host,
    then on the device once ``bind`` gave them), the routing weights of those pairs (device, from
    ``bind``), the tokens per expert and the kernel's handle."""

    host_pairs: np.ndarray
    sizes: list[int]
    handle: Any
    launch_ms: float = 0.0  # host time from the launch's start to the kernel running
    pairs: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class HybridExecutor:
    """Decides each miss (``decide``), runs the CPU ones (``launch`` / ``finish``) and counts."""

    def __init__(self, cfg: HybridConfig, kernel: CpuKernel, costs: HardwareProfile | None,
                 counters: RuntimeCounters, kernel_reason: str | None = None, calibration: str | None = None):
        self.cfg = cfg
        self.rule = HYBRID_RULES.get(cfg.rule)
        if self.rule.needs_costs and costs is None:
            raise ConfigError(f"hybrid rule {cfg.rule!r} needs costs: calibrate or pass a profile")
        self.kernel = kernel
        self.profile = costs
        self.costs = OnlineCosts(costs) if costs is not None else None
        self.counters = counters
        self.kernel_reason = kernel_reason
        self.calibration = calibration
        self.copy_until = 0.0  # perf_counter time at which the modelled copy backlog ends
        self.seen = 0          # misses decided so far (the "half" rule alternates on it)
        # Reuse counts for the rule (the simulator's Timeline.hits / .copies): needs served from the
        # pool and copies issued, over the whole run (stats resets do not forget what was learnt).
        self.hits = 0
        self.copies = 0
        self._experts_base = 0
        self._launch_s = self._merge_s = 0.0
        self._launch_parts = [0.0, 0.0, 0.0]  # prewake, hidden rows to the host, submit
        self._gpu_s = self._scatter_s = 0.0  # the layer's GPU experts (host side); the final scatter and sum
        self.prewake = os.environ.get(ENV_PREWAKE, "1") != "0"
        self._layers = 0

    def describe(self) -> dict[str, Any]:
        p = self.profile
        return {"rule": self.rule.name, "kernel": self.kernel.name, "threads": getattr(self.kernel, "threads", None),
                "kernel_reason": self.kernel_reason, "calibration": self.calibration,
                "costs": None if p is None else {
                    "copy_ms": p.copy_ms, "gpu_ms": dict(p.gpu_ms), "cpu_ms": dict(p.cpu_ms), "source": p.source}}

    # -- deciding ---------------------------------------------------------------------------------
    def decide(self, misses: Sequence[tuple[int, int]], hits: int = 0) -> list[bool]:
        """One layer's misses ``(key, tokens)`` in ascending key order -> copy (True) or CPU (False);
        ``hits``: the layer's needs found in the pool (counted for the reuse estimate, as the simulator
        counts them before it decides the misses)."""
        self.hits += hits
        if not misses:
            return []
        backlog = max(0.0, 1e3 * (self.copy_until - time.perf_counter()))
        q = LayerQueues(self.costs, backlog, self.seen, self.hits, self.copies)
        out: list[bool] = []
        costs = self.costs
        for key, n in misses:
            copy = self.rule.decide(q, key, n)
            out.append(copy)
            q.seen += 1
            if costs is not None:  # the queues move as in the simulator's Timeline
                if copy:
                    q.tl.issue_copy(0.0, costs.copy_ms)
                else:
                    q.tl.issue_cpu(0.0, costs.cpu(n))
        self.seen = q.seen
        c = self.counters
        n_copy = sum(out)
        c.decide_copy += n_copy
        c.decide_cpu += len(out) - n_copy
        return out

    def copies_issued(self, n: int) -> None:
        """``n`` copies (demand or prefetch) were queued: the modelled copy backlog grows."""
        self.copies += n
        if self.costs is not None and n:
            now = time.perf_counter()
            self.copy_until = max(now, self.copy_until) + n * self.costs.copy_ms / 1e3

    # -- running ----------------------------------------------------------------------------------
    def launch(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: np.ndarray,
               experts: Sequence[int]) -> CpuWork:
        """Start the CPU experts ``experts`` (ascending) of MoE layer ``layer`` on the rows routed to them.
        Returns as soon as the kernel runs, with the pairs' indices on the host: the runtime uploads them
        with its own indices (one host-to-device copy per layer) and hands them back with ``bind``."""
        t0 = time.perf_counter()
        if self.prewake:
            self.kernel.prewake()  # the workers wake while the rows are gathered and copied
        ta = time.perf_counter()
        k = ids.shape[1]
        flat = ids.reshape(-1)
        groups = [np.flatnonzero(flat == e) for e in experts]  # by expert, each in (token, k) order
        pairs = groups[0] if len(groups) == 1 else np.concatenate(groups)
        sizes = [int(g.size) for g in groups]
        rows = pairs // k
        # Second host sync of the layer, and a cheap one: the routing sync just drained the stream, so
        # this waits for its own small transfer only. The rows reach the host as fp32 (converted on the
        # device: exact from bf16/fp16), the kernel's input as it is. Decode: the whole hidden state (a
        # few KiB), gathered by numpy; prefill: only the rows needed, gathered on the device.
        # No torch CPU op on this path: one wakes torch's intra-op (OpenMP) threads, which then spin on
        # the cores the pool computes on and slow both this launch and the experts
        # (eval/results/hybrid_diag/README.md).
        h = hidden.detach()
        if h.shape[0] <= HOST_GATHER_ROWS:
            x = torch.from_numpy(h.to(torch.float32).cpu().numpy()[rows])
        else:
            x = h[torch.from_numpy(rows).to(h.device, non_blocking=True)].to(torch.float32).cpu()
        tb = time.perf_counter()
        handle = self.kernel.submit(layer, experts, x, sizes)
        tc = time.perf_counter()
        launch_s = tc - t0
        parts = self._launch_parts
        parts[0] += ta - t0
        parts[1] += tb - ta
        parts[2] += tc - tb
        self._launch_s += launch_s
        c = self.counters
        c.cpu_experts += len(experts)
        c.cpu_tokens += int(pairs.size)
        self._layers += 1
        return CpuWork(pairs, sizes, handle, 1e3 * launch_s)

    @staticmethod
    def bind(work: CpuWork, pairs: torch.Tensor, weights: torch.Tensor) -> None:
        """``work``'s pair indices on the device (``work.host_pairs`` uploaded) and the routing weights they
        select, for the merge."""
        work.pairs = pairs
        work.weights = weights.reshape(-1)[pairs].unsqueeze(-1)

    def layer_done(self, gpu_s: float, scatter_s: float) -> None:
        """The runtime's share of a hybrid layer, host seconds: its GPU experts' path (the pool's
        acquire, the pair gathers, the experts call) and the final scatter of the CPU rows and sum."""
        self._gpu_s += gpu_s
        self._scatter_s += scatter_s

    def finish(self, work: CpuWork, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for ``work``; returns the pair indices and their weighted contributions on the device."""
        t0 = time.perf_counter()
        out, ms = self.kernel.wait(work.handle)
        t1 = time.perf_counter()
        c = self.counters
        c.cpu_wait_s += t1 - t0
        c.cpu_ms += ms
        if work.weights is None:  # the layer failed before binding: the pool is done with the buffers
            return work.pairs, out
        # As transformers weights each expert output: proj_out (model dtype) * routing weight. The
        # host buffer is pinned on CUDA: an async copy.
        rows = out.to(work.weights.device, non_blocking=True).to(dtype) * work.weights
        merge_s = time.perf_counter() - t1
        self._merge_s += merge_s
        if self.costs is not None:
            self.costs.observe_cpu(work.sizes, work.launch_ms + ms + 1e3 * merge_s)
        return work.pairs, rows

    # -- stats and teardown -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """``cpu_kernel``, ``cpu_kernel_experts`` (what the kernel reports having run), ``hybrid_rule``;
        ``cpu_layers`` (layer calls with CPU experts) and the host ms per such layer spent launching them
        (``cpu_launch_ms_per_layer``: from the decision to the kernel running, the hidden rows' sync
        included) and merging their results after the wait (``cpu_merge_ms_per_layer``); the rule's
        live inputs: ``cpu_cost_scale`` (measured / calibrated CPU time) and ``reuse_rate``."""
        n = self._layers
        return {"cpu_kernel": self.kernel.name, "cpu_kernel_experts": self.kernel.experts_run() - self._experts_base,
                "hybrid_rule": self.rule.name, "cpu_layers": n,
                "cpu_launch_ms_per_layer": 1e3 * self._launch_s / n if n else None,
                # where the launch time goes: waking the pool, the hidden rows to the host, the submit
                "cpu_launch_parts_ms_per_layer": [1e3 * v / n for v in self._launch_parts] if n else None,
                "cpu_merge_ms_per_layer": 1e3 * self._merge_s / n if n else None,
                # host ms of a layer with CPU experts, by part (the CPU wait is cpu_wait_ms over cpu_layers)
                "cpu_layer_parts_ms": {"launch": 1e3 * self._launch_s / n, "gpu_experts": 1e3 * self._gpu_s / n,
                                       "wait": 1e3 * self.counters.cpu_wait_s / n, "merge": 1e3 * self._merge_s / n,
                                       "scatter": 1e3 * self._scatter_s / n} if n else None,
                "cpu_cost_scale": self.costs.cpu_scale if self.costs is not None else None,
                "reuse_rate": reuse_rate(self.hits, self.copies)}

    def reset(self) -> None:
        self._experts_base = self.kernel.experts_run()
        self._launch_s = self._merge_s = 0.0
        self._launch_parts = [0.0, 0.0, 0.0]
        self._gpu_s = self._scatter_s = 0.0
        self._layers = 0

    def close(self) -> None:
        self.kernel.close()


def make_hybrid(spec: Any, runtime: Any) -> HybridExecutor | None:
    """Build the executor for ``offload(..., hybrid=spec)`` on a built ``Runtime`` (None when off)."""
    cfg = HybridConfig.resolve(spec)
    if cfg is None:
        return None
    store, pool = runtime.store, runtime.pool
    originals = [layer.original for layer in runtime.layers]
    kernel, why = make_kernel(cfg, originals, store, runtime.E, pin=pool.device.type == "cuda")
    costs: HardwareProfile | None = None
    source = None
    if HYBRID_RULES.get(cfg.rule).needs_costs:
        if isinstance(cfg.profile, HardwareProfile):
            costs, source = cfg.profile, "given"
        elif cfg.profile is not None:
            costs, source = load_profile(cfg.profile, bytes_per_expert=store.layout.slot_bytes), str(cfg.profile)
        else:
            key = calibration_key(store, pool.device, kernel)
            costs = None if cfg.recalibrate else cached_calibration(key, cfg.cache_dir)
            source = calibration_path(key, cfg.cache_dir)
            if costs is None:
                costs = calibrate(store, pool, runtime.layers[0].remap_shell, kernel,
                                  hidden_size(originals[0], runtime.config))
                try:
                    save_calibration(key, costs, cfg.cache_dir)
                except OSError as e:  # a read-only home must not stop the run
                    warnings.warn(f"moecache: could not cache the hybrid calibration at {source}: {e}")
    executor = HybridExecutor(cfg, kernel, costs, runtime.counters, why, source)
    executor.reset()  # the calibration's runs are not the model's
    return executor


__all__ = ["HYBRID_RULES", "HybridConfig", "HybridExecutor", "CpuKernel", "CppKernel", "TorchKernel", "calibrate",
           "calibration_key", "calibration_path", "cached_calibration", "save_calibration", "make_hybrid",
           "swiglu_mismatch", "default_threads", "LayerQueues", "OnlineCosts", "DecisionRule", "ENV_KERNEL",
           "ENV_CACHE"]
