"""``moecache.offload(model, ...)``: patch a loaded transformers MoE model in place; ``handle.remove()``.

What changes: each MoE block's ``experts`` child is replaced by an ``OffloadedExperts`` (routers,
shared experts, attention stay as they are); every expert's weights move into a ``HostStore``
(pinned where CUDA exists) and the original expert parameters are released; the rest of the model
moves to ``device``; a ``SlotPool`` of ``slots`` experts is allocated there once.

Budget. ``gpu_memory`` covers what the runtime keeps on the device: the non-expert weights, the
slot pool and the runtime's workspace (``WORKSPACE_BYTES``, persistent device tensors other than
the pool; none today: per-call temporaries are activations) and, under ``compile=True``, the static
KV cache (``kv_cache_bytes``: ``max_batch_size`` rows of ``max_cache_len`` positions). Otherwise the
KV cache and activations are not in it; ``stats()`` reports them separately (``gpu_other_peak_bytes``). ::

    slots = min(total_experts, (gpu_memory - non_expert_bytes - WORKSPACE_BYTES - kv_cache_bytes) // slot_bytes)

and it must be at least ``top_k`` (one token's experts of one layer), else ``ConfigError``.
``cache_slots=N`` sets the pool directly instead. ``gpu_memory="auto"`` plans the budget from the
free device memory, the KV cache for ``max_context`` tokens x ``batch`` and a safety margin, and
prints the plan (``moecache.runtime.memplan``; ``handle.memory_plan``). ``host_memory`` (bytes or
"auto") refuses a host store that would not fit, before any expert is copied.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import validate as V
from ..admission import ADMISSIONS, DEFAULT_ADMISSION, check_admission
from ..errors import ConfigError
from ..families import FamilyAdapter, MoeBlock, detect_family, find_moe_blocks, get_family
from ..policies import POLICIES, Policy
from ..predictors import PREDICTORS, Predictor
from .compiled import (DEFAULT_MAX_CACHE_LEN, CompiledStack, allocated_kv_bytes, kv_cache_bytes, register_experts,
                       resolve_compile, unregister_experts)
from ..quant import FLOAT_FORMATS, QUANT_FORMATS, ExpertCodec, resolve_format
from ..miss_precision import DEFAULT_BELOW, resolve_rule
from .compressed import POOL_MODES, Expander, LowPrecisionCopies, choose_pool_mode
from .core import DEFAULT_MIN_PROB, LayerInfo, Runtime
from .engine import COPY_ENGINES, make_engine
from .experts import EXPERT_KERNELS
from .hoststore import HostAllocator, HostStore
from .hybrid import HybridConfig, make_hybrid
from . import memplan
from .memplan import parse_bytes
from .layout import SlotLayout
from .pool import SlotPool
from .stats import format_summary, summarise

#: Persistent device bytes the runtime owns besides the pool (see the module docstring).
WORKSPACE_BYTES = 0
#: ``stream_prefill=True``: calls of at least this many tokens stream each next layer's experts.
DEFAULT_STREAM_PREFILL_TOKENS = 64
#: Attribute under which the handle is attached to the patched model.
HANDLE_ATTR = "moecache"

def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_supported(adapter: FamilyAdapter, blocks: list[MoeBlock]) -> None:
    """The family's experts kernel (``ExpertLayout.kernel``) must be able to run its experts; it says why not."""
    EXPERT_KERNELS.get(adapter.layout.kernel).check(blocks[0].experts, adapter.name)


def _expert_params(blocks: list[MoeBlock], layout: SlotLayout, num_experts: int) -> set[int]:
    return {id(r.param) for b in blocks for r in layout.param_refs(b.experts, num_experts, b.name)}


def non_expert_bytes(model: nn.Module, expert_param_ids: set[int]) -> int:
    """Bytes of every parameter and buffer that is not a stacked expert weight (tied ones once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in expert_param_ids:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def choose_slots(*, gpu_memory: Any, cache_slots: int | None, non_expert: int, slot_bytes: int,
                 top_k: int, total: int, kv_bytes: int = 0, extra: int = 0, extra_what: str = "",
                 extra_fix: str = "") -> tuple[int, int | None]:
    """``(slots, budget_bytes)`` per the module docstring's formula; ``kv_bytes`` (a compiled offload's static
    KV cache) is taken from the budget like the non-expert weights, and so is ``extra`` (fixed device buffers
    such as the compressed pool's dense scratch, named ``extra_what`` in the error; ``extra_fix``: how to
    shrink them)."""
    if (gpu_memory is None) == (cache_slots is None):
        raise ConfigError("pass exactly one of gpu_memory= (e.g. '6GiB') or cache_slots= (a number of experts)")
    if cache_slots is not None:
        n = int(cache_slots)
        if n < top_k:
            raise ConfigError(f"cache_slots={n} cannot hold one layer's top-{top_k} experts; use at least {top_k}")
        return min(n, total), None
    budget = parse_bytes(gpu_memory)
    fixed = non_expert + WORKSPACE_BYTES + kv_bytes + extra
    need = fixed + top_k * slot_bytes
    if budget < need:
        kv = f", the static KV cache ({_fmt(kv_bytes)})" if kv_bytes else ""
        kv += f", {extra_what} ({_fmt(extra)})" if extra else ""
        raise ConfigError(
            f"gpu_memory {_fmt(budget)} cannot hold the non-expert weights ({_fmt(non_expert)}){kv} plus one layer's "
            f"top-{top_k} experts ({_fmt(top_k * slot_bytes)}); use at least {_fmt(need)} "
            f"(all {total} experts resident need {_fmt(fixed + total * slot_bytes)}){extra_fix}")
    return min(total, (budget - fixed) // slot_bytes), budget


def _make_policy(policy: Any, slots: int, L: int, E: int, k: int, params: dict[str, Any]) -> Any:
    if isinstance(policy, Policy):
        pol = policy
        if (pol.num_layers, pol.num_experts) != (L, E):
            raise ConfigError(f"policy instance was built for {pol.num_layers} layers x {pol.num_experts} experts; "
                              f"this model has {L} x {E}")
        if pol.num_pools * pol.capacity != slots:
            raise ConfigError(f"policy instance holds {pol.num_pools * pol.capacity} slots but the budget gives "
                              f"{slots}; build it with capacity={slots}, scope='global' or pass the name")
    else:
        if not isinstance(policy, str):
            raise ConfigError(f"policy={policy!r} is neither a policy name nor a Policy instance; pass e.g. 'lru'")
        cls = POLICIES.get(policy)
        try:
            pol = cls(slots, L, E, top_k=k, scope="global", **params)
        except TypeError as e:
            raise ConfigError(f"policy_params {sorted(params)} do not fit policy {policy!r} ({e}); see its "
                              "docstring for the parameters it takes") from None
    if pol.offline or pol.may_bypass:
        raise ConfigError(f"policy {pol.name!r} reads the future or bypasses the cache: simulator only; "
                          "pick an online policy such as 'lru' or 'lfu'")
    if not pol.fitted:
        raise ConfigError(f"policy {pol.name!r} must be fitted first: pass a Policy instance after .fit(counts)")
    return pol


def _make_predictor(predictor: Any, model: nn.Module, L: int, E: int, k: int, params: dict[str, Any]) -> Any:
    if predictor is None or predictor == "none":
        return None

    if isinstance(predictor, Predictor):
        pred = predictor
    else:
        if not isinstance(predictor, str):
            raise ConfigError(f"predictor={predictor!r} is neither a predictor name nor a Predictor instance; "
                              "pass e.g. 'transition' or None")
        cls = PREDICTORS.get(predictor)
        if cls.needs_fit:  # by name it would be built unfitted: say how to get a fitted one, before anything changes
            raise ConfigError(f"predictor {predictor!r} must be fitted before offload: {cls.fit_hint}")
        try:
            if getattr(cls, "needs_model", False) and hasattr(cls, "from_model"):
                pred = cls.from_model(model, **params)
            else:
                pred = cls(L, E, k, **params)
        except TypeError as e:
            raise ConfigError(f"predictor_params {sorted(params)} do not fit predictor {predictor!r} ({e}); see "
                              "its docstring for the parameters it takes") from None
    if (pred.num_layers, pred.num_experts, pred.top_k) != (L, E, k):
        raise ConfigError(f"predictor {pred.name!r} was built for {pred.num_layers} layers x {pred.num_experts} "
                          f"experts, top-{pred.top_k}; this model has {L} x {E}, top-{k}")
    if not pred.fitted:
        raise ConfigError(f"predictor {pred.name!r} must be fitted first: {pred.fit_hint}")
    want = getattr(pred, "hidden_size", None)  # a predictor reading hidden states was fitted for one width
    have = getattr(getattr(model, "config", None), "hidden_size", None)
    if want is not None and have is not None and int(want) != int(have):
        raise ConfigError(f"predictor {pred.name!r} was fitted on hidden states of size {want}, this model's are "
                          f"{have}: fit it on a trace recorded from this model")
    return pred


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _codec_for(expert_dtype: Any, group_size: Any, layout: SlotLayout, adapter: FamilyAdapter,
               blocks: list[MoeBlock], hybrid_cfg: Any, host_store: HostStore | None,
               scratch_experts: Any) -> ExpertCodec | None:
    """The compressed row layout ``expert_dtype`` asks for (None: dense), every check made before the model
    is touched: the name, the group size against each matrix's input dimension, the family, hybrid."""
    stored = host_store.layout if host_store is not None and isinstance(host_store.layout, ExpertCodec) else None
    if stored is not None:
        # A store filled compressed (from_pretrained): its format is the one asked for, or the checkpoint's own.
        fmt = resolve_format(expert_dtype, group_size, checkpoint_format=stored.fmt.name)
        if fmt is not None and str(expert_dtype).lower() == "auto" and group_size is None:
            fmt = stored.fmt
    else:
        fmt = resolve_format(expert_dtype, group_size)
    if fmt is None:
        name = "auto" if expert_dtype is None else str(expert_dtype).lower()
        if name != "auto" and FLOAT_FORMATS[name] != layout.dtype:
            raise ConfigError(f"expert_dtype={expert_dtype!r} but this model's experts are {_dtype_name(layout.dtype)}; "
                              "use expert_dtype='auto' (or cast the model first)")
        return None
    if adapter.layout.kernel != "transformers":
        raise ConfigError(f"expert_dtype={fmt.name!r}: {adapter.name} experts run through the {adapter.layout.kernel!r} "
                          "kernel, whose layout compressed experts cannot hold yet; use expert_dtype='auto'")
    if hybrid_cfg is not None and not cpu_kernel_supports(fmt):
        raise ConfigError(f"hybrid execution has no CPU kernel for {fmt.describe()} experts in this build; "
                          "offload with hybrid=False")
    if scratch_experts is not None and (isinstance(scratch_experts, bool) or int(scratch_experts) < 1):
        raise ConfigError(f"scratch_experts must be a positive number of experts, got {scratch_experts!r}")
    transposed = bool(getattr(adapter.layout, "transposed", False))
    return ExpertCodec(layout, fmt, transposed, blocks[0].name + "." + adapter.experts_attr)


def _low_codec_for(rule: Any, codec: ExpertCodec | None, layout: SlotLayout, adapter: FamilyAdapter,
                   blocks: list[MoeBlock], hybrid_cfg: Any, host_store: HostStore | None, backend: Any,
                   low_host_store: HostStore | None = None, store_filled_later: bool = False,
                   num_experts: int = 0) -> ExpertCodec:
    """The low copy's row layout for ``low_precision_misses`` (``moecache.miss_precision``), after the checks of
    what the rule cannot run with. ``low_host_store``: the low copy already filled (``from_pretrained`` encodes it
    while it reads the checkpoint), which a filled ``host_store`` needs."""
    if codec is not None and codec.fmt.name == "mxfp4":
        raise ConfigError("low_precision_misses copies a lower-precision version of full-precision experts; this "
                          "checkpoint's experts are MXFP4 already: leave low_precision_misses out")
    if codec is not None:
        raise ConfigError(f"low_precision_misses copies a lower-precision version of full-precision experts; the "
                          f"experts are already {codec.fmt.describe()}: use expert_dtype='auto' with it")
    if host_store is not None and low_host_store is None:
        raise ConfigError("low_precision_misses builds its low copy from the model's expert weights, which a filled "
                          "host_store replaces: pass the low copy as low_host_store= too (moecache.from_pretrained "
                          "fills both), or offload a loaded model without host_store")
    if hybrid_cfg is not None:
        raise ConfigError("low_precision_misses chooses how a miss is copied; hybrid execution runs misses on the "
                          "CPU: use one or the other")
    if backend is not None:
        raise ConfigError("low_precision_misses is not supported with compile=True yet; offload with compile=False")
    if adapter.layout.kernel != "transformers":
        raise ConfigError(f"low_precision_misses: {adapter.name} experts run through the {adapter.layout.kernel!r} "
                          "kernel, whose layout the low copy cannot hold yet")
    transposed = bool(getattr(adapter.layout, "transposed", False))
    low = ExpertCodec(layout, rule.fmt, transposed, blocks[0].name + "." + adapter.experts_attr)
    if low_host_store is not None:
        if not isinstance(low_host_store, HostStore) or low_host_store.layout != low or \
                (low_host_store.num_layers, low_host_store.num_experts) != (len(blocks), num_experts):
            raise ConfigError(f"low_host_store was built for another layout, format or model size than "
                              f"low_precision_misses={rule.fmt.describe()!r} on this model")
        if not store_filled_later and any(b is None for b in low_host_store.blocks):
            raise ConfigError("low_host_store is not filled (or was closed); fill every layer before offloading")
    return low


def cpu_kernel_supports(fmt: Any) -> bool:
    """Whether the hybrid CPU path runs ``fmt`` experts from the compressed host rows: every compressed
    format does (the C++ kernel where the family's layout fits it, else torch on the expanded rows)."""
    return getattr(fmt, "name", None) in QUANT_FORMATS


@dataclass
class _Saved:
    """What remove() needs to put an experts module back."""

    params: list[tuple[torch.Size, torch.dtype, torch.device, bool]]  # per SlotLayout.param_refs


class OffloadHandle:
    """Returned by ``moecache.offload``: ``stats()``, ``summary()`` and ``remove()``."""

    def __init__(self, model: nn.Module, runtime: Runtime, adapter: FamilyAdapter, saved: list[_Saved],
                 config: dict[str, Any], hooks: list[Any]):
        self.model = model
        self.runtime = runtime
        self.adapter = adapter
        self._saved = saved
        self.config = config
        self._hooks = hooks
        self._timing: list[tuple[str, int, Any, Any]] = []
        self._pending_call: tuple[Any, int, int] | None = None
        self.own_store = True
        self._stall_base = 0.0
        self.removed = False
        self.memory_plan: Any = None  # the MemoryPlan of gpu_memory="auto", else None
        #: ``moecache.runtime.compiled.CompiledStack`` under ``compile=True``, else None.
        self.compiled: CompiledStack | None = None
        self._compiled_key: int | None = None
        self._disable_compile: Any = None

    # -- timing of model calls -------------------------------------------------------------------
    def _on_call_start(self, rows: int, tokens: int, new_request: bool) -> Any:
        self.runtime.begin_call(rows, tokens, new_request)
        self._resolve_timing(block=False)
        if self.runtime.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _on_call_end(self, start: Any, rows: int, tokens: int) -> None:
        phase = "prefill" if tokens > 1 else "decode"
        if self.runtime.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self._timing.append((phase, rows * tokens, start, end))

    def _resolve_timing(self, block: bool) -> None:
        c = self.runtime.counters
        while self._timing:
            phase, n, a, b = self._timing[0]
            if isinstance(b, float):
                secs = b - a
            else:
                if not block and not b.query():
                    return
                b.synchronize()
                secs = a.elapsed_time(b) / 1e3
            self._timing.pop(0)
            if phase == "prefill":
                c.prefill_calls += 1
                c.prefill_tokens += n
                c.prefill_s += secs
                c.ttft_s = secs
            else:
                c.decode_calls += 1
                c.decode_tokens += n
                c.decode_s += secs

    # -- public ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts, rates, timings and memory (see ``moecache.runtime.stats``), with the configuration."""
        if self.removed:
            raise ConfigError("this offload handle was removed; its stats are gone with it")
        self._resolve_timing(block=True)
        rt = self.runtime
        out = summarise(rt.counters, rt.engine.stall_seconds() - self._stall_base, self.config)
        out["engine_counters"] = rt.engine.counters()
        out["resident"] = int((rt.slot_of >= 0).sum())
        if rt.hybrid is not None:
            out.update(rt.hybrid.stats())
        if self.compiled is not None:
            out["compile"] = self.compiled.stats.as_dict()
            out["kv_cache_allocated_bytes"] = sum(allocated_kv_bytes(c) for c in self.compiled.caches.values())
        if rt.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(rt.device)
            out["gpu_peak_allocated_bytes"] = int(peak)
            out["gpu_other_peak_bytes"] = int(max(0, peak - self.config["gpu_nonexpert_bytes"]
                                                  - self.config["pool_bytes"] - WORKSPACE_BYTES
                                                  - self.config["kv_cache_bytes"]))
        return out

    def preload(self, experts: Iterable[tuple[int, int]] | None = None) -> int:
        """Copy ``experts`` (``(layer, expert)`` pairs; MoE layers counted from 0) into the GPU pool now,
        before the run, and wait for the copies. Without ``experts``: the policy's own placement (``static``:
        its pinned experts, fitted on a trace). Each enters through the policy as a miss would; ones already
        resident are skipped. Returns how many were copied."""
        if self.removed:
            raise ConfigError("this offload handle was removed; offload the model again to preload")
        rt = self.runtime
        if experts is None:
            pinned = getattr(rt.policy, "pinned", None)
            if not pinned:
                raise ConfigError(f"policy {rt.policy.name!r} has no placement of its own to preload: pass "
                                  "experts=[(layer, expert), ...], or use a fitted 'static' policy")
            keys = [int(k) for k in pinned]
        else:
            keys = []
            for pair in experts:
                layer, expert = (int(v) for v in pair)
                if not (0 <= layer < rt.L and 0 <= expert < rt.E):
                    raise ConfigError(f"cannot preload expert {(layer, expert)}: this model has {rt.L} MoE layers "
                                      f"of {rt.E} experts")
                keys.append(layer * rt.E + expert)
        return len(rt.preload(keys))

    def summary(self) -> str:
        return format_summary(self.stats())

    def reset_stats(self) -> None:
        """Zero every count and timing (the engine's stall clock included); the cache keeps its contents."""
        self._resolve_timing(block=True)
        self.runtime.counters.reset()
        self._stall_base = self.runtime.engine.stall_seconds()
        if self.runtime.hybrid is not None:
            self.runtime.hybrid.reset()

    @torch.no_grad()
    def remove(self, restore: bool = True) -> None:
        """Put the original experts modules back and free the pool, the copy engine and (when the
        handle owns it) the host store. With ``restore`` the expert weights are copied back from the
        host store onto the device they came from (the CPU for a model loaded straight into the
        offloaded layout); without, they stay released (meta), e.g. to offload again from a kept store."""
        if self.removed:
            return
        rt = self.runtime
        for h in self._hooks:
            h.remove()
        if self.compiled is not None:
            self.compiled.remove()
            unregister_experts(self._compiled_key)
            gen = getattr(self.model, "generation_config", None)
            if gen is not None:
                gen.disable_compile = self._disable_compile
            self.compiled = None
        rt.close()
        for layer, saved in zip(rt.layers, self._saved):
            if restore:
                rt.store.layout.restore(layer.original, rt.store.num_experts, rt.store.layer_views(layer.index),
                                        saved.params)
            setattr(layer.block, self.adapter.experts_attr, layer.original)
        rt.pool.close()
        if rt.expander is not None:
            rt.expander.close()
        if rt.low is not None:
            rt.low.close()
            rt.low.store.close()
        if self.own_store:
            rt.store.close()
        rt.layers = []
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        self.removed = True


def _call_shape(args: tuple, kwargs: dict) -> tuple[int, int, bool]:
    """``(rows, tokens per row, starts a request)`` of a model call. A call starts a request when it
    has no KV cache or an empty one (generate's first call; a forward without cache)."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    # transformers <= 5.1x names the KV cache past_key_values, later releases cache
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    new = cache is None
    if not new and hasattr(cache, "get_seq_length"):
        try:
            new = int(cache.get_seq_length()) == 0
        except Exception:  # an unusual cache type: fall back on the token count
            new = False
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        return int(x.shape[0]), int(x.shape[1]), new
    return 1, 1, new


def _plan(model: nn.Module, config: Any, dev: torch.device, non_expert: int, slot_bytes: int, top_k: int, total: int,
          max_context: int | None, batch: int, expert_ids: set[int]) -> memplan.MemoryPlan:
    """``gpu_memory="auto"``: the plan for the device's free memory (``moecache.runtime.memplan``)."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    dtype_bytes = floats[0].element_size() if floats else 2
    # The model's own tensors on the device count as free: they are what the plan places (non-expert
    # weights), or experts about to move to the host store. On the CPU the store stays in that memory.
    seen: set[int] = set(expert_ids) if dev.type == "cpu" else set()
    already = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.device == dev:
            seen.add(id(t))
            already += t.numel() * t.element_size()
    return memplan.plan_gpu_memory(
        free=memplan.device_free_bytes(dev) + already, non_expert=non_expert, slot_bytes=slot_bytes, top_k=top_k,
        total_experts=total, kv_per_token=memplan.kv_bytes_per_token(config, dtype_bytes),
        max_context=max_context or memplan.default_max_context(config), batch=batch, workspace=WORKSPACE_BYTES,
        device=str(dev))


@dataclass
class OffloadPlan:
    """Every argument of ``offload`` checked and resolved, before anything is changed (``check_offload_args``)."""

    adapter: FamilyAdapter
    blocks: list[MoeBlock]
    layout: SlotLayout
    num_layers: int
    num_experts: int
    top_k: int
    device: torch.device
    slots: int
    budget: int | None
    non_expert: int
    policy: Any
    predictor: Any
    prefetch_depth: int
    prefetch_width: int | None
    min_prob: float
    engine: str
    allocator: HostAllocator
    host_store: HostStore | None
    own_store: bool
    hybrid: HybridConfig | None
    memory_plan: Any = None  # gpu_memory="auto": the memplan.MemoryPlan
    backend: str | None = None  # compile=...: the piece backend, else None
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN  # the static KV cache (compile only)
    max_batch_size: int = 1
    kv_bytes: int = 0  # the static KV cache's bytes taken from gpu_memory
    stream_tokens: int = 0  # stream_prefill: calls of at least this many tokens stream (0: off)
    codec: ExpertCodec | None = None  # compressed experts (moecache.quant), else None
    pool_mode: str | None = None
    scratch_experts: int | None = None
    slot_bytes: int = 0  # device bytes per pool slot (compressed row, or dense + landing)
    importance: Any = None
    low_rule: Any = None  # moecache.miss_precision.MissPrecisionRule, else None
    low_codec: ExpertCodec | None = None  # the low copy's row layout
    low_host_store: HostStore | None = None  # the low copy, filled by the caller (from_pretrained), else None
    admission: str = DEFAULT_ADMISSION  # the prefetch admission rule (moecache.admission)


def check_offload_args(model: nn.Module, gpu_memory: Any = None, *, cache_slots: Any = None, policy: Any = "lru",
                       predictor: Any = None, prefetch_depth: Any = 1, device: Any = None, engine: Any = "auto",
                       family: Any = None, policy_params: Any = None, predictor_params: Any = None,
                       prefetch_width: Any = None, min_prob: Any = DEFAULT_MIN_PROB, pin: Any = None,
                       host_store: Any = None, own_store: Any = True, hybrid: Any = False,
                       max_context: Any = None, batch: Any = 1, host_memory: Any = None, compile: Any = False,
                       max_cache_len: Any = None, max_batch_size: Any = None,
                       stream_prefill: Any = False, expert_dtype: Any = "auto",
                       group_size: Any = None, pool_mode: Any = "auto", scratch_experts: Any = None,
                       importance: Any = None, low_precision_misses: Any = None,
                       low_precision_below: Any = DEFAULT_BELOW, low_host_store: Any = None,
                       store_filled_later: bool = False, admission: Any = DEFAULT_ADMISSION) -> OffloadPlan:
    """Check every argument of ``offload`` (see ``moecache.validate`` for the pattern) without changing the
    model; returns the resolved plan. A bad argument raises ``ConfigError``/``UnsupportedModelError``.
    ``store_filled_later``: ``host_store`` is still empty (``from_pretrained`` checks the arguments on the
    meta-device model before it reads the checkpoint).

    To add an argument to ``offload``: check it here (one ``moecache.validate`` call), carry the cleaned
    value in ``OffloadPlan``, and in ``offload`` push an undo for whatever applying it changes."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}, not a torch module; pass a loaded transformers model")
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ConfigError("this model is offloaded already; call model.moecache.remove() first")
    hybrid_cfg = HybridConfig.resolve(hybrid)
    backend = resolve_compile(compile)
    if backend is None and (max_cache_len is not None or max_batch_size is not None):
        raise ConfigError("max_cache_len and max_batch_size size the static KV cache of a compiled offload; "
                          "pass compile=True with them, or leave them out")
    max_cache_len = V.count("max_cache_len", max_cache_len, minimum=1, none=True, fix="positions")
    max_batch_size = V.count("max_batch_size", max_batch_size, minimum=1, none=True, fix="sequences")
    if stream_prefill is True:
        stream_tokens = DEFAULT_STREAM_PREFILL_TOKENS
    elif stream_prefill is False or stream_prefill is None:
        stream_tokens = 0
    elif isinstance(stream_prefill, int) and stream_prefill >= 2:
        stream_tokens = int(stream_prefill)
    else:
        raise ConfigError(f"stream_prefill={stream_prefill!r} is not understood: pass True (calls of at least "
                          f"{DEFAULT_STREAM_PREFILL_TOKENS} tokens), a token count >= 2, or False")
    family = V.text("family", family, none=True)
    adapter = get_family(family) if family else detect_family(model)
    blocks = find_moe_blocks(model, adapter)
    check_supported(adapter, blocks)
    if hybrid_cfg is not None and adapter.layout.kernel != "transformers":
        raise ConfigError(f"hybrid execution runs transformers' experts layout on the CPU; {adapter.name} experts run "
                          f"through the {adapter.layout.kernel!r} kernel: offload it with hybrid=False")
    if backend is not None:
        if adapter.layout.kernel != "transformers":
            raise ConfigError(f"compile=True runs transformers' experts calls as one op; {adapter.name} experts run "
                              f"through the {adapter.layout.kernel!r} kernel: offload it with compile=False")
        if len({b.stack for b in blocks}) != 1:
            raise ConfigError("compile=True compiles one decoder stack; this model's MoE blocks sit in several "
                              "(encoder-decoder): offload it with compile=False")
    config = model.config
    E, k, L = adapter.num_experts(config), adapter.top_k(config), len(blocks)
    layout = SlotLayout.from_module(blocks[0].experts, E, blocks[0].name + "." + adapter.experts_attr, adapter.layout)
    for b in blocks[1:]:
        layout.check_same(SlotLayout.from_module(b.experts, E, b.name, adapter.layout), b.name)
    pool_mode = V.choice("pool_mode", pool_mode, ["auto", *POOL_MODES])
    if host_store is not None and not isinstance(host_store, HostStore):
        raise ConfigError(f"host_store is a {type(host_store).__name__}; pass a moecache HostStore or None")
    low_rule = resolve_rule(low_precision_misses, low_precision_below, group_size)
    if low_rule is not None and isinstance(expert_dtype, str) and expert_dtype.lower() in QUANT_FORMATS:
        raise ConfigError(f"low_precision_misses copies a lower-precision version of full-precision experts; the "
                          f"experts would already be {expert_dtype}: use expert_dtype='auto' with it")
    codec = _codec_for(expert_dtype, None if low_rule is not None else group_size, layout, adapter, blocks,
                       hybrid_cfg, host_store, scratch_experts)
    store_layout = layout if codec is None else codec
    low_codec = None
    if low_rule is not None:
        low_codec = _low_codec_for(low_rule, codec, layout, adapter, blocks, hybrid_cfg, host_store, backend,
                                   low_host_store, store_filled_later, E)
    elif low_host_store is not None:
        raise ConfigError("low_host_store is the low copy of low_precision_misses; pass low_precision_misses= with it, "
                          "or leave low_host_store out")
    dev = V.device("device", device)
    engine = V.choice("engine", engine, ["auto", *COPY_ENGINES.names()])
    if (gpu_memory is None) == (cache_slots is None):
        raise ConfigError("pass exactly one of gpu_memory= (e.g. '6GiB') or cache_slots= (a number of experts)")
    auto = isinstance(gpu_memory, str) and gpu_memory.strip().lower() == "auto"
    if cache_slots is not None:
        cache_slots = V.count("cache_slots", cache_slots, minimum=1, fix="a number of experts")
    elif not auto:
        gpu_memory = V.memory_size("gpu_memory", gpu_memory)
    max_context = V.count("max_context", max_context, minimum=1, none=True, fix="tokens")
    batch = V.count("batch", batch, minimum=1, fix="sequences side by side")
    if host_memory is not None and not (isinstance(host_memory, str) and host_memory.strip().lower() == "auto"):
        host_memory = V.memory_size("host_memory", host_memory)
    prefetch_depth = V.count("prefetch_depth", prefetch_depth, minimum=0, maximum=L,
                             fix=f"MoE layers ahead; this model has {L}")
    prefetch_width = V.count("prefetch_width", prefetch_width, minimum=1, maximum=E, none=True,
                             fix=f"experts per target layer; this model has {E}")
    min_prob = V.real("min_prob", min_prob, minimum=0.0, maximum=1.0)
    if not isinstance(admission, str):
        raise ConfigError(f"admission must be a name ({', '.join(ADMISSIONS)}), got {type(admission).__name__}")
    check_admission(admission)
    pin = V.flag("pin", pin, none=True)
    own_store = V.flag("own_store", own_store)
    policy_params = V.mapping("policy_params", policy_params)
    predictor_params = V.mapping("predictor_params", predictor_params)
    if host_store is not None:
        if host_store.layout != store_layout or (host_store.num_layers, host_store.num_experts) != (L, E):
            raise ConfigError("host_store was built for another layout, format or model size")
        if not store_filled_later and any(b is None for b in host_store.blocks):
            raise ConfigError("host_store is not filled (or was closed); fill every layer before offloading")
    allocator = HostAllocator(pin)
    expert_ids = _expert_params(blocks, layout, E)
    non_expert = non_expert_bytes(model, expert_ids)
    # The static cache's size follows the memory plan's max_context and batch where only those are given.
    max_cache_len = int(max_cache_len or max_context or DEFAULT_MAX_CACHE_LEN)
    max_batch_size = int(max_batch_size or batch or 1)
    kv_bytes = 0
    if backend is not None:
        dtype = next((p.dtype for p in model.parameters() if id(p) not in expert_ids and p.is_floating_point()),
                     torch.float32)
        attention = next((m for name, m in model.named_modules() if name.endswith("self_attn")), None)
        kv_bytes = kv_cache_bytes(config, max_batch_size, max_cache_len, dtype, attention)
    mplan = None
    if auto:
        mplan = _plan(model, config, dev, non_expert, layout.slot_bytes, k, L * E,
                      max_cache_len if backend is not None else max_context,
                      max_batch_size if backend is not None else batch, expert_ids)
        gpu_memory = mplan.budget
        kv_bytes = max(0, kv_bytes - mplan.kv_cache)  # the plan reserved its own estimate of the same cache
    mode = scratch_n = None
    if low_codec is not None:
        slot_bytes, fixed = layout.slot_bytes, k * low_codec.slot_bytes  # dense slots + the low copies' landing
    elif codec is None:
        slot_bytes, fixed = layout.slot_bytes, 0
    else:
        scratch_n = min(E, int(scratch_experts) if scratch_experts is not None else 4 * k)
        mode = choose_pool_mode(pool_mode, total=L * E, cache_slots=cache_slots, codec=codec, top_k=k,
                                scratch_experts=scratch_n,
                                budget_bytes=None if gpu_memory is None else
                                max(0, int(gpu_memory) - non_expert - WORKSPACE_BYTES - kv_bytes))
        if mode == "compressed":
            slot_bytes, fixed = codec.slot_bytes, scratch_n * layout.slot_bytes  # the dense scratch
        else:
            slot_bytes, fixed = codec.slot_bytes + layout.slot_bytes, 0  # dense slot + compressed landing
    if low_codec is not None:
        fixed_what, fixed_fix = f"the low copies' landing of {k} rows", ""
    elif mode == "compressed":
        fixed_what = f"the compressed pool's dense scratch of {scratch_n} experts"
        fixed_fix = f", or pass a smaller scratch_experts= (at least top_k={k})" if scratch_n > k else ""
    else:
        fixed_what, fixed_fix = "", ""
    slots, budget = choose_slots(gpu_memory=gpu_memory, cache_slots=cache_slots, non_expert=non_expert,
                                 slot_bytes=slot_bytes, top_k=k, total=L * E, kv_bytes=kv_bytes, extra=fixed,
                                 extra_what=fixed_what, extra_fix=fixed_fix)
    pol = _make_policy(policy, slots, L, E, k, policy_params)
    if host_memory is not None and host_store is None:
        on_host = non_expert + fixed + slots * slot_bytes if dev.type == "cpu" else 0
        low_host = 0 if low_codec is None else L * E * low_codec.slot_bytes  # the second (low) copy
        memplan.check_host_memory(experts=L * E * store_layout.slot_bytes + low_host, other=on_host,
                                  host_memory=host_memory)
    on_meta = any(r.param.device.type == "meta" for b in blocks for r in layout.param_refs(b.experts, E))
    if on_meta and host_store is None:
        raise ConfigError("the model's expert weights are on the meta device (not loaded); load the checkpoint "
                          "with moecache.from_pretrained(path, ...) instead")
    pred = _make_predictor(predictor, model, L, E, k, predictor_params)
    return OffloadPlan(adapter, blocks, layout, L, E, k, dev, slots, budget, non_expert, pol, pred, prefetch_depth,
                       prefetch_width, min_prob, engine, allocator, host_store, own_store, hybrid_cfg, mplan,
                       backend=backend, max_cache_len=max_cache_len, max_batch_size=max_batch_size,
                       kv_bytes=kv_bytes, stream_tokens=stream_tokens, codec=codec, pool_mode=mode,
                       scratch_experts=scratch_n, slot_bytes=slot_bytes, importance=importance,
                       low_rule=low_rule, low_codec=low_codec, low_host_store=low_host_store, admission=admission)


def _tensor_devices(model: nn.Module) -> list[tuple[nn.Module, str, bool, torch.device]]:
    """Where every parameter and buffer of ``model`` is now: what the undo of ``model.to`` restores."""
    out = []
    for m in model.modules():
        out.extend((m, n, True, p.device) for n, p in m._parameters.items() if p is not None)
        out.extend((m, n, False, b.device) for n, b in m._buffers.items() if b is not None)
    return out


@torch.no_grad()
def _move_back(where: list[tuple[nn.Module, str, bool, torch.device]]) -> None:
    for m, n, is_param, dev in where:
        t = (m._parameters if is_param else m._buffers).get(n)
        if t is None or t.device == dev or t.device.type == "meta" or dev.type == "meta":
            continue
        if is_param:
            t.data = t.data.to(dev)
        else:
            m._buffers[n] = t.to(dev)


def _restore_layer(layout: SlotLayout, store: HostStore, layer: int, experts: nn.Module, saved: _Saved) -> None:
    """Undo of one layer's ``release``: its expert weights back from the host store (meta ones stay meta)."""
    if all(dev.type == "meta" for _shape, _dtype, dev, _grad in saved.params):
        return
    layout.restore(experts, store.num_experts, store.layer_views(layer), saved.params)


def offload(model: nn.Module, gpu_memory: int | str | None = None, *, cache_slots: int | None = None,
            policy: Any = "lru", predictor: Any = None, prefetch_depth: int = 1, device: str | None = None,
            engine: str = "auto", family: str | None = None, policy_params: dict | None = None,
            predictor_params: dict | None = None, prefetch_width: int | None = None,
            min_prob: float = DEFAULT_MIN_PROB, pin: bool | None = None,
            host_store: HostStore | None = None, own_store: bool = True, hybrid: Any = False,
            max_context: int | None = None, batch: int = 1, host_memory: int | str | None = None,
            compile: bool | str = False, max_cache_len: int | None = None, max_batch_size: int | None = None,
            stream_prefill: bool | int = False, expert_dtype: str | None = "auto",
            group_size: int | None = None, pool_mode: str = "auto", scratch_experts: int | None = None,
            importance: dict | None = None, low_precision_misses: str | None = None,
            low_precision_below: float = DEFAULT_BELOW, low_host_store: HostStore | None = None,
            admission: str = DEFAULT_ADMISSION) -> OffloadHandle:
    """Patch ``model`` (a loaded transformers MoE model) in place; returns an ``OffloadHandle``.

    * ``gpu_memory`` ("6GiB", bytes, "auto") or ``cache_slots``: the budget (module docstring). With
      "auto", ``max_context`` (default: the model's limit, at most 4096) and ``batch`` size the KV cache
      the plan leaves room for.
    * ``host_memory``: bytes or "auto" (the memory available now): refuse up front when the host store
      (plus the non-expert weights and pool on a CPU device) would not fit in it. None: no check.
    * ``policy``: a ``moecache.policies`` name or a fitted ``Policy`` instance (global scope); it
      picks every victim. ``policy_params`` go to its constructor.
    * ``predictor``: None, a ``moecache.predictors`` name or a fitted ``Predictor`` instance; it
      decides prefetches ``prefetch_depth`` MoE layers ahead (the ``prefetch_width`` most likely
      experts per target layer, default ``top_k x rows``, those above ``min_prob``), each weighed by the
      ``admission`` rule (``moecache.admission``: "gated", the default: the cost rule and the predictor gate,
      which stops asking the predictor at layers whose prefetches do not pay for its host time; "cost": the
      rule alone; "none": every candidate issued).
    * ``device``: "cuda" where available, else "cpu" (the CPU mode runs the same path without streams).
    * ``engine``: "auto", "worker" (C++), "stream" or "sync" (``moecache.runtime.engine``).
    * ``host_store``: a ``HostStore`` already holding every expert (``from_pretrained`` and the
      benchmarks fill one straight from files or a generator); the experts modules' own weights are
      then not read (they may be on the meta device). ``own_store``: whether ``remove()`` frees it.
    * ``hybrid``: False (every miss copied), True or "auto" (each miss copied or run on the CPU,
      whichever a cost model measured at start-up says finishes first), "cpu" (every miss on the
      CPU), "copy", or a ``HybridConfig`` (``moecache.runtime.hybrid``).
    * ``compile``: True (or a piece backend: "inductor", "aot_eager", "eager") runs decode steps compiled around
      the experts call, as CUDA graphs on CUDA, with a static KV cache of ``max_cache_len`` positions (default
      4096, or ``max_context``) for up to ``max_batch_size`` rows (default ``batch``), whose bytes count against
      ``gpu_memory`` (with "auto", the plan reserves that cache)
      (``moecache.runtime.compiled``).
    * ``stream_prefill``: True (calls of at least 64 tokens) or a token count: a long prompt copies each next
      MoE layer's experts while the current layer computes (``moecache.runtime.core``); False: off.
    * ``expert_dtype``: "auto" (the experts' own dtype), "bf16"/"fp16"/"fp32" (must be that dtype), or a
      compressed format, "int8" or "int4" (``moecache.quant``: asymmetric, ``group_size`` 32, 64 or 128
      along each matrix's input dimension, default 64). Compressed experts are stored, copied and (with
      ``pool_mode="compressed"``) cached compressed; ``pool_mode`` "auto" lets the cost model choose
      (``moecache.runtime.compressed``); ``scratch_experts``: the dense scratch of the compressed pool
      (default ``min(num_experts, 4 * top_k)``); ``importance``: calibration weights for the quantizer
      (``moecache.quant.collect_importance``).
    * ``low_precision_misses``: None, "int4" or "int8" (HOBBIT-style, ``moecache.miss_precision``): a demand
      miss whose gate share is below ``low_precision_below`` (the expert's weight over its token's top-k sum,
      times top_k; 1.0 = an even split; default 0.5) is copied as that lower-precision copy (``group_size``
      applies to it) and expanded into its slot; reused, it is upgraded to the full copy. Lossy. Costs a second
      host copy of every expert in that format (``stats()["config"]["low_copy_host_bytes"]``) and, on the device,
      a landing of ``top_k`` rows in that format (out of the budget); needs full-precision experts (``expert_dtype`` "auto"), no hybrid, no compile.
      ``low_host_store``: that second copy already filled, with ``host_store`` (``from_pretrained`` encodes both
      while reading the checkpoint); ``remove()`` frees it.

    Every argument is checked first (``check_offload_args``); if anything fails after that, the model is
    put back as it was (expert weights restored from the host store) before the error propagates.
    """
    plan = check_offload_args(model, gpu_memory, cache_slots=cache_slots, policy=policy, predictor=predictor,
                              prefetch_depth=prefetch_depth, device=device, engine=engine, family=family,
                              policy_params=policy_params, predictor_params=predictor_params,
                              prefetch_width=prefetch_width, min_prob=min_prob, pin=pin, host_store=host_store,
                              own_store=own_store, hybrid=hybrid, max_context=max_context, batch=batch,
                              host_memory=host_memory, compile=compile, max_cache_len=max_cache_len,
                              max_batch_size=max_batch_size, stream_prefill=stream_prefill,
                              expert_dtype=expert_dtype, group_size=group_size, pool_mode=pool_mode,
                              scratch_experts=scratch_experts, importance=importance,
                              low_precision_misses=low_precision_misses, low_precision_below=low_precision_below,
                              low_host_store=low_host_store, admission=admission)
    with V.Undo() as undo:
        handle = _apply(model, plan, undo)
    return handle


def _apply(model: nn.Module, plan: OffloadPlan, undo: V.Undo) -> OffloadHandle:
    """The changes of ``offload``, each with its undo pushed on ``undo``."""
    adapter, blocks, layout = plan.adapter, plan.blocks, plan.layout
    L, E, k, dev = plan.num_layers, plan.num_experts, plan.top_k, plan.device
    config = model.config
    # Experts into host memory, layer by layer, releasing each layer's originals right away.
    codec = plan.codec
    store_layout = layout if codec is None else codec
    store = plan.host_store or HostStore(store_layout, L, E, plan.allocator)
    if plan.host_store is None:
        undo.push(store.close)
    saved: list[_Saved] = []
    low_store = plan.low_host_store  # filled by the caller with host_store (from_pretrained), else packed here
    pack_low = plan.low_codec is not None and low_store is None
    if pack_low:  # the second copy, packed from the weights before they are released
        low_store = HostStore(plan.low_codec, L, E, plan.allocator)
        undo.push(low_store.close)
    for i, b in enumerate(blocks):
        if pack_low:
            plan.low_codec.pack(b.experts, E, low_store.layer_views(i))
        if plan.host_store is None:
            if codec is None:
                store.fill_layer(i, b.experts)
            else:
                codec.pack(b.experts, E, store.layer_views(i),
                           None if plan.importance is None else plan.importance.get(i))
        saved.append(_Saved(layout.release(b.experts, E)))  # meta stand-ins: the storage is freed
        undo.push(lambda i=i, b=b, s=saved[-1]: _restore_layer(store_layout, store, i, b.experts, s))
    pool = SlotPool(store_layout, plan.slots, dev)
    undo.push(pool.close)
    copy_engine = make_engine(plan.engine, store, pool)
    undo.push(copy_engine.close)
    rt_layers: list[LayerInfo] = []
    runtime = Runtime(layers=rt_layers, num_layers=L, store=store, pool=pool, engine=copy_engine, policy=plan.policy,
                      predictor=plan.predictor, config=config, num_experts=E, top_k=k,
                      prefetch_depth=plan.prefetch_depth, prefetch_width=plan.prefetch_width, min_prob=plan.min_prob,
                      stream_prefill=plan.stream_tokens)
    runtime.admission = plan.admission
    if codec is not None:
        runtime.set_expander(Expander(codec, plan.pool_mode, pool, E, plan.scratch_experts))
        undo.push(runtime.expander.close)
    if low_store is not None:
        landing = SlotPool(plan.low_codec, k, dev)
        undo.push(landing.close)
        low_engine = make_engine(plan.engine, low_store, landing)
        undo.push(low_engine.close)
        runtime.low = LowPrecisionCopies(plan.low_rule, plan.low_codec, low_store, landing, low_engine)
    kernel = EXPERT_KERNELS.get(adapter.layout.kernel)
    kernel_hooks: list[Any] = []
    undo.push(lambda: [h.remove() for h in kernel_hooks])
    for i, b in enumerate(blocks):
        lut = runtime.slot_of[i * E:(i + 1) * E]  # a live view of this layer's rows
        att = kernel.attach(runtime, i, b, adapter, lut)
        kernel_hooks.extend(att.hooks)
        rt_layers.append(LayerInfo(i, b.layer, b.name, b.block, b.experts, att.remap_shell, att.indexer_shell))
        setattr(b.block, adapter.experts_attr, att.module)
        undo.push(lambda b=b: setattr(b.block, adapter.experts_attr, b.experts))
    undo.push(lambda where=_tensor_devices(model): _move_back(where))
    model.to(dev)  # the non-expert weights (the wrappers own no parameters)
    runtime.hybrid = make_hybrid(plan.hybrid, runtime)
    if runtime.hybrid is not None:
        undo.push(runtime.hybrid.close)

    pol, pred = plan.policy, plan.predictor
    cfg = {
        "family": adapter.name, "device": str(dev), "engine": copy_engine.name, "policy": pol.describe(),
        "predictor": None if pred is None else pred.name, "prefetch_depth": runtime.prefetch_depth,
        "slots": plan.slots, "total_experts": L * E, "moe_layers": L, "num_experts": E, "top_k": k,
        "slot_bytes": plan.slot_bytes, "pool_bytes": pool.nbytes + (0 if codec is None else runtime.expander.nbytes)
        + (0 if runtime.low is None else runtime.low.landing.nbytes),
        "gpu_budget_bytes": plan.budget,
        "expert_format": _dtype_name(layout.dtype) if codec is None else codec.fmt.describe(),
        "pool_mode": plan.pool_mode, "scratch_experts": plan.scratch_experts if plan.pool_mode == "compressed" else None,
        "copy_bytes_per_expert": store_layout.slot_bytes, "dense_expert_bytes": layout.slot_bytes,
        "gpu_nonexpert_bytes": plan.non_expert, "workspace_bytes": WORKSPACE_BYTES,
        "host_store_bytes": store.nbytes, "host_pinned": store.pinned,
        "experts_implementation": getattr(config, "_experts_implementation", None),
        "hybrid": None if runtime.hybrid is None else runtime.hybrid.describe(),
        "memory_plan": None if plan.memory_plan is None else plan.memory_plan.to_json(),
        "compile": plan.backend, "kv_cache_bytes": plan.kv_bytes, "stream_prefill": plan.stream_tokens,
        "max_cache_len": plan.max_cache_len if plan.backend else None,
        "max_batch_size": plan.max_batch_size if plan.backend else None,
        "low_precision_misses": None if plan.low_rule is None else plan.low_rule.describe(),
        "low_copy_bytes_per_expert": None if plan.low_codec is None else plan.low_codec.slot_bytes,
        "low_copy_host_bytes": 0 if low_store is None else low_store.nbytes,
        "admission": plan.admission, "admission_clock": runtime.admission_clock,
    }
    handle = OffloadHandle(model, runtime, adapter, saved, cfg, [])
    handle.own_store = plan.own_store or plan.host_store is None
    handle.memory_plan = plan.memory_plan

    def pre(_mod, args, kwargs):
        rows, tokens, new_request = _call_shape(args, kwargs)
        if new_request and handle.compiled is not None:  # its static cache stands in for the caller's
            new_request = not handle.compiled.continues(kwargs.get("cache", kwargs.get("past_key_values")))
        handle._pending_call = (handle._on_call_start(rows, tokens, new_request), rows, tokens)

    def post(_mod, _args, _kwargs, output):
        start = getattr(handle, "_pending_call", None)
        if start is not None:
            handle._on_call_end(*start)
            handle._pending_call = None
        return output

    call_hooks: list[Any] = []
    undo.push(lambda: [h.remove() for h in call_hooks])
    call_hooks.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    call_hooks.append(model.register_forward_hook(post, with_kwargs=True))
    handle._hooks = call_hooks + kernel_hooks
    if plan.backend is not None:
        stack = model.get_submodule(blocks[0].stack) if blocks[0].stack else model
        handle._compiled_key = register_experts([getattr(b.block, adapter.experts_attr) for b in blocks], stack)
        undo.push(lambda: unregister_experts(handle._compiled_key))
        handle.compiled = CompiledStack(model, stack, plan.backend, dev, plan.max_cache_len, plan.max_batch_size)
        undo.push(handle.compiled.remove)
        gen = getattr(model, "generation_config", None)
        if gen is not None:  # transformers' own compile of the whole call would wrap ours
            handle._disable_compile = getattr(gen, "disable_compile", False)
            gen.disable_compile = True
            undo.push(lambda gen=gen, was=handle._disable_compile: setattr(gen, "disable_compile", was))
    setattr(model, HANDLE_ATTR, handle)
    if plan.memory_plan is not None:
        print("\n".join(plan.memory_plan.lines()), file=sys.stderr)
    return handle


__all__ = ["offload", "OffloadHandle", "OffloadPlan", "check_offload_args", "parse_bytes", "WORKSPACE_BYTES", "choose_slots", "non_expert_bytes"]
