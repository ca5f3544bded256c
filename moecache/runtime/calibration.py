"""Calibration of the hybrid executor's costs on this machine: one expert's copy time, CPU time and
marginal GPU time by tokens routed to it, measured at start-up and cached as a hardware profile
JSON per machine and expert shape (``moecache bench --hardware FILE`` reads the same file)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from ..atomic import write_json_atomic
from ..cost.hardware import HardwareProfile, default_profile, load_profile
from ..errors import ConfigError
from .cpu_kernel import CpuKernel

ENV_CACHE = "MOECACHE_CACHE_DIR"
#: Bump when what calibrate() measures changes: older cache files are then measured again.
#: 2: marginal GPU time (back-to-back calls), CPU time on experts rotated out of the caches.
CALIBRATION_VERSION = 2
#: Tokens per expert at which the CPU and GPU times are measured (read piecewise-linearly between).
CPU_TOKENS = (1, 4, 16, 64)
GPU_TOKENS = (1, 64)


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
    dtype = getattr(layout, "dense", layout).dtype  # a compressed store's rows are bytes: the compute dtype
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
        x = torch.randn((n, H), generator=gen).to(device=dev, dtype=dtype)
        idx = torch.zeros((n, 1), dtype=torch.long, device=dev)
        w = torch.ones((n, 1), dtype=dtype, device=dev)

        def calls() -> None:
            for _ in range(back_to_back):
                shell(x, idx, w)
        gpu[n] = _median_ms(lambda: timed(calls), reps) / back_to_back
    rows = [(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    turn = iter(range(1 << 62))
    cpu: dict[int, float] = {}
    for n in CPU_TOKENS:
        x = torch.randn((n, H), generator=gen).to(dtype)

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
