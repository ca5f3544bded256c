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
for anything else, or where the extension is missing or disabled. Compressed experts (int8, int4,
MXFP4) run from their compressed host rows on the same pool (``CppQuantKernel``, dequantized in
registers; SiLU SwiGLU and GPT-OSS's clamped SwiGLU with biases), or expanded for the torch path
(``docs/compressed_experts.md``). ``MOECACHE_CPU_KERNEL`` picks
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

Modules: ``hybrid_rules`` (the decision rules and the online costs), ``cpu_kernel`` (the CPU
kernels), ``calibration`` (measuring the costs, and their cache); this one holds the configuration,
the executor the runtime calls and ``make_hybrid``.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..cost.hardware import HardwareProfile, load_profile
from ..cost.timing import reuse_rate
from ..errors import ConfigError
from .calibration import (cached_calibration, calibrate, calibration_key, calibration_path, hidden_size,
                          save_calibration)
from .cpu_kernel import CPU_KERNELS, ENV_KERNEL, ENV_QUANT_MODE, QUANT_MODES, CpuKernel, make_kernel
from .hybrid_rules import HYBRID_RULES, LayerQueues, OnlineCosts
from .stats import RuntimeCounters

ENV_PREWAKE = "MOECACHE_CPU_PREWAKE"
#: Up to this many token rows in a layer, CPU experts' rows are gathered on the host from one copy of
#: the whole hidden state (decode: a few KiB) rather than on the device (saves two launches).
HOST_GATHER_ROWS = 16


@dataclass
class HybridConfig:
    """``offload(..., hybrid=HybridConfig(...))``; ``hybrid="auto"`` etc. fill in the defaults.

    * ``rule``: a ``HYBRID_RULES`` name;
    * ``threads``: CPU kernel threads (default: usable cores - 1);
    * ``kernel``: a ``CPU_KERNELS`` name (default ``$MOECACHE_CPU_KERNEL`` or ``auto``);
    * ``profile``: costs for ``auto`` instead of calibrating (a ``HardwareProfile`` or a JSON path);
    * ``cache_dir``: where calibrations are cached (default ``$MOECACHE_CACHE_DIR`` or
      ``~/.cache/moecache``); ``recalibrate``: measure even when a cached calibration exists;
    * ``quant_mode``: how the C++ kernel runs compressed experts, a ``QUANT_MODES`` name: ``fast``
      (int16 activations, integer dot products, within ``quant_fast_rtol``) or ``exact`` (every weight
      dequantized and rounded as ``moecache.quant`` states it, within ``QUANT_RTOL``); default
      ``$MOECACHE_CPU_QUANT_MODE`` or ``fast``. Dense experts always run exact.
    """

    rule: str = "auto"
    threads: int | None = None
    kernel: str | None = None
    profile: HardwareProfile | str | None = None
    cache_dir: str | None = None
    recalibrate: bool = False
    quant_mode: str | None = None

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
        mode = spec.quant_mode or os.environ.get(ENV_QUANT_MODE, "").strip().lower() or QUANT_MODES[0]
        if mode not in QUANT_MODES:
            raise ConfigError(f"hybrid quant_mode={mode!r} (from {'HybridConfig' if spec.quant_mode else ENV_QUANT_MODE}) "
                              f"is unknown; valid: {', '.join(QUANT_MODES)}")
        return cls(spec.rule, spec.threads, kernel, spec.profile, spec.cache_dir, spec.recalibrate, mode)


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
    kernel, why = make_kernel(cfg.kernel, cfg.threads, originals, store, runtime.E, pin=pool.device.type == "cuda",
                              quant_mode=cfg.quant_mode or QUANT_MODES[0])
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


__all__ = ["HybridConfig", "HybridExecutor", "CpuWork", "make_hybrid"]
