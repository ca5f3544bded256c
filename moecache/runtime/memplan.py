"""Budgets that fit themselves: ``gpu_memory="auto"`` and the host-memory check before loading.

Device plan (``plan_gpu_memory``). With ``gpu_memory="auto"`` the budget is ::

    budget = free device memory - KV cache(max_context, batch) - safety margin

and ``offload``'s usual rule turns it into pool slots (non-expert weights first, then as many
experts as fit). The KV cache is counted for every layer at ``max_context`` tokens x ``batch`` rows
in the model's dtype (an upper bound: sliding windows and compressed caches are not assumed). The
margin, ``max(512 MiB, 5% of the free memory)``, covers activations, the allocator's slack and
library workspaces. "Free" is what the device reports now plus the bytes of the model's own tensors
already on it (they are the non-expert weights counted in the plan, or experts about to be
released). Where not even ``top_k`` experts fit next to the rest, the error says what would: the
longest context, the largest batch, or how much more free memory.

Host check (``check_host_memory``). The host store holds every expert (pinned where CUDA exists);
on a CPU device the non-expert weights and the pool live in host memory too. The need is compared,
before any weight is read, with ``host_memory`` (bytes, or "auto": the memory available now), so a
model too big for the machine is refused up front instead of being killed by the OOM killer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .. import validate as V
from ..errors import ConfigError

#: Context the KV cache is planned for when ``max_context`` is not given (capped at the model's own limit).
DEFAULT_MAX_CONTEXT = 4096
MIN_MARGIN = 512 * 2**20
MARGIN_SHARE = 0.05



def parse_bytes(value: int | float | str) -> int:
    """``"6GiB"``, ``"512MB"``, ``"1.5 GiB"``, ``10**9`` -> bytes (GiB = 2**30, GB = 10**9); NaN, infinities,
    negative and absurd sizes are refused (``moecache.validate.memory_size``)."""
    return V.memory_size("memory size", value)


def fmt_bytes(n: float) -> str:
    n = float(n)
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def safety_margin(free_bytes: int) -> int:
    return int(max(MIN_MARGIN, MARGIN_SHARE * free_bytes))


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of KV cache per token (one row): keys and values of every attention layer."""
    c = _text_config(config)
    layers = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "num_layers", 0))
    heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "num_heads", 0))
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = getattr(c, "head_dim", None) or (int(c.hidden_size) // heads if heads else 0)
    k_dim = v_dim = kv_heads * int(head_dim)
    if getattr(c, "qk_nope_head_dim", None) is not None and getattr(c, "v_head_dim", None) is not None:
        # multi-head latent attention (DeepSeek): transformers caches the per-head keys and values
        k_dim = heads * (int(c.qk_nope_head_dim) + int(getattr(c, "qk_rope_head_dim", 0) or 0))
        v_dim = heads * int(c.v_head_dim)
    return layers * (k_dim + v_dim) * int(dtype_bytes)


def default_max_context(config: Any) -> int:
    limit = getattr(_text_config(config), "max_position_embeddings", None)
    return min(DEFAULT_MAX_CONTEXT, int(limit)) if limit else DEFAULT_MAX_CONTEXT


@dataclass
class MemoryPlan:
    """What ``gpu_memory="auto"`` decided, in bytes."""

    device: str
    free: int                 # free device memory (plus the model's tensors already there)
    non_expert: int
    workspace: int
    kv_cache: int
    max_context: int
    batch: int
    margin: int
    slot_bytes: int
    slots: int
    total_experts: int
    top_k: int

    @property
    def budget(self) -> int:
        """The ``gpu_memory`` the plan hands to the slot rule: free - KV cache - margin."""
        return self.free - self.kv_cache - self.margin

    def lines(self) -> list[str]:
        pool = self.slots * self.slot_bytes
        share = self.slots / self.total_experts if self.total_experts else 0.0
        return [
            f"memory plan (gpu_memory=auto) on {self.device}: {fmt_bytes(self.free)} free",
            f"  non-expert weights  {fmt_bytes(self.non_expert)}",
            f"  expert pool         {fmt_bytes(pool)}: {self.slots} slots of {fmt_bytes(self.slot_bytes)}, "
            f"{share:.1%} of the {self.total_experts} experts",
            f"  KV cache            {fmt_bytes(self.kv_cache)}: {self.max_context} tokens x batch {self.batch}",
            f"  safety margin       {fmt_bytes(self.margin)}",
            f"  left unused         {fmt_bytes(self.free - self.non_expert - self.workspace - pool - self.kv_cache - self.margin)}",
        ]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["budget"] = self.budget
        return out


def plan_gpu_memory(*, free: int, non_expert: int, slot_bytes: int, top_k: int, total_experts: int,
                    kv_per_token: int, max_context: int, batch: int = 1, workspace: int = 0,
                    margin: int | None = None, device: str = "cuda") -> MemoryPlan:
    """The plan for ``free`` bytes (module docstring), or a one-line ``ConfigError`` saying what would fit."""
    if max_context < 1 or batch < 1:
        raise ConfigError(f"max_context and batch must be >= 1, got {max_context} and {batch}")
    margin = safety_margin(free) if margin is None else int(margin)
    kv = kv_per_token * max_context * batch
    fixed = non_expert + workspace + top_k * slot_bytes
    room = free - kv - margin - non_expert - workspace
    if room < top_k * slot_bytes:
        short = fixed + kv + margin - free
        ways = []
        left_for_kv = free - margin - fixed
        if kv_per_token and left_for_kv >= kv_per_token * batch:
            ways.append(f"max_context {left_for_kv // (kv_per_token * batch)} at batch {batch}")
        if kv_per_token and batch > 1 and left_for_kv >= kv_per_token * max_context:
            ways.append(f"batch {left_for_kv // (kv_per_token * max_context)} at max_context {max_context}")
        ways.append(f"{fmt_bytes(short)} more free device memory")
        raise ConfigError(
            f"gpu_memory=auto: {fmt_bytes(free)} free on {device} cannot hold the non-expert weights "
            f"({fmt_bytes(non_expert)}) + one layer's top-{top_k} experts ({fmt_bytes(top_k * slot_bytes)}) + the KV "
            f"cache for {max_context} tokens x batch {batch} ({fmt_bytes(kv)}) + the safety margin "
            f"({fmt_bytes(margin)}); would fit: {', or '.join(ways)}")
    slots = int(min(total_experts, room // slot_bytes))
    return MemoryPlan(device=device, free=int(free), non_expert=int(non_expert), workspace=int(workspace),
                      kv_cache=int(kv), max_context=int(max_context), batch=int(batch), margin=int(margin),
                      slot_bytes=int(slot_bytes), slots=slots, total_experts=int(total_experts), top_k=int(top_k))


def device_free_bytes(device: Any) -> int:
    """Free memory of ``device`` now: CUDA's own count, or the host's available memory for the CPU."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return host_available_bytes()


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_host_budget(host_memory: Any) -> tuple[int, str]:
    """``(bytes, what it is)`` of a ``host_memory`` value: "auto"/None is the memory available now."""
    if host_memory is None or (isinstance(host_memory, str) and host_memory.strip().lower() == "auto"):
        return host_available_bytes(), "available host memory"
    return parse_bytes(host_memory), "host_memory"


def check_host_memory(*, experts: int, other: int, host_memory: Any = None, dtype_hint: str | None = None,
                      available: int | None = None) -> int:
    """Refuse (one-line ``ConfigError``) when ``experts`` (the host store) + ``other`` (non-expert weights and
    pool when they live in host memory) bytes exceed the host budget. Returns the budget in bytes."""
    if available is not None and host_memory in (None, "auto"):
        budget, what = int(available), "available host memory"
    else:
        budget, what = resolve_host_budget(host_memory)
    need = experts + other
    if need > budget:
        hint = f"; or {dtype_hint}" if dtype_hint else ""
        fix = (f"raise host_memory to at least {fmt_bytes(need)}" if what == "host_memory" else
               f"free {fmt_bytes(need - budget)} or use a machine with more memory")
        raise ConfigError(
            f"the model needs {fmt_bytes(need)} of host memory (experts {fmt_bytes(experts)} + other weights and "
            f"pool {fmt_bytes(other)}) but the {what} is {fmt_bytes(budget)}: {fix}{hint}")
    return budget


__all__ = ["parse_bytes", "MemoryPlan", "plan_gpu_memory", "kv_bytes_per_token", "default_max_context", "safety_margin",
           "device_free_bytes", "check_host_memory", "host_available_bytes", "DEFAULT_MAX_CONTEXT"]
