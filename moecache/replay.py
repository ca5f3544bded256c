"""``moecache.replay(model, trace)``: run a model with its routing forced to a recorded trace.

Teacher forcing, to benchmark real routing on random-weight models of real sizes: every MoE
block's experts receive the trace's expert ids (and gate weights) instead of the router's, through
a forward pre-hook on the block's experts module (the runtime's ``OffloadedExperts`` when the model
is offloaded, the original experts otherwise, so the all-resident baseline replays the same way).
The router still runs, so its cost stays in the timing.

* Gate weights: the trace's where it has them (cast to the model's dtype); where it has none
  (``meta.weights == "absent"``) or a row's weights are missing (NaN), the selected experts are
  weighted equally, ``1 / top_k`` each.
* Rows with a missing (-1) or dropped (-2) id at a layer keep the model's own routing for that
  (token, layer): the trace does not say what to use.
* Tokens: the trace's token ids (modulo the model's vocabulary) where known, else 0.
* Each sequence runs as one prefill call of its first ``prefill`` rows (default: its leading rows
  marked prefill, at least one), then one decode call per remaining row, with a KV cache. A
  prefill-only trace therefore replays as a token-by-token decode stream (in a causal model a
  token's routing in a prefill pass equals its routing when decoded after the same prefix).

A trace whose expert count, top-k or MoE layer count differs from the model's is a ``ConfigError``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .families import detect_family, find_moe_blocks, get_family
from .trace.schema import PHASE_PREFILL


@dataclass
class ReplayResult:
    """Tokens and wall time of a replay (the GPU is synchronised at each sequence's phase ends)."""

    sequences: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    per_sequence: list[dict[str, Any]] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s else None

    def as_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "ms_per_decode_token": 1e3 * self.decode_s / self.decode_tokens if self.decode_tokens else None}


class RoutingForcer:
    """Forward pre-hooks that swap each MoE block's routing for the rows set by ``set_rows``."""

    def __init__(self, model: nn.Module, num_layers: int, family: str | None = None):
        adapter = get_family(family) if family else detect_family(model)
        self.blocks = find_moe_blocks(model, adapter)
        if len(self.blocks) != num_layers:
            raise ConfigError(f"the trace has {num_layers} MoE layers but the model has {len(self.blocks)}; "
                              "replay a trace recorded from a model of the same architecture")
        self.adapter = adapter
        self._ids: torch.Tensor | None = None      # (tokens, layers, k) on the device
        self._w: torch.Tensor | None = None        # (tokens, layers, k), model dtype
        self._keep: torch.Tensor | None = None     # (tokens, layers) bool: keep the router's own choice
        self._hooks = [getattr(b.block, adapter.experts_attr).register_forward_pre_hook(self._hook(i), with_kwargs=True)
                       for i, b in enumerate(self.blocks)]

    def _hook(self, layer: int) -> Callable:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict):
            if self._ids is None:
                return None
            hidden, idx, w = args[0], args[1], args[2]
            ids = self._ids[:, layer].to(idx.dtype)
            weights = self._w[:, layer].to(w.dtype)
            if self._keep is not None:
                keep = self._keep[:, layer, None]
                ids = torch.where(keep, idx, ids)
                weights = torch.where(keep, w, weights)
            return (hidden, ids, weights) + tuple(args[3:]), kwargs
        return hook

    def set_rows(self, ids: np.ndarray, weights: np.ndarray, keep: np.ndarray | None, device: torch.device,
                 dtype: torch.dtype) -> None:
        self._ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device)
        self._w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device=device, dtype=dtype)
        self._keep = None if keep is None else torch.from_numpy(keep).to(device)

    def clear(self) -> None:
        self._ids = self._w = self._keep = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def check_trace_matches(trace: Any, model: nn.Module, family: str | None = None) -> tuple[int, int, int]:
    """``(layers, experts, top_k)`` of the model, after checking the trace has the same."""
    adapter = get_family(family) if family else detect_family(model)
    blocks = find_moe_blocks(model, adapter)
    E, k, L = adapter.num_experts(model.config), adapter.top_k(model.config), len(blocks)
    meta = trace.meta
    wrong = [f"{what} {a} vs {b}" for what, a, b in (("experts", meta.num_experts, E), ("top-k", meta.top_k, k),
                                                      ("MoE layers", meta.num_layers, L)) if a != b]
    if wrong:
        raise ConfigError(f"the trace ({meta.model}) does not match the model: " + ", ".join(f"trace {w} model"
                          for w in wrong) + "; replay it on a model of the recorded architecture (random weights "
                          "of the same shape are fine)")
    return L, E, k


def _sequences(trace: Any, sequences: int | Iterable[int] | None) -> list[int]:
    seqs = [int(s) for s in trace.sequences()]
    if sequences is None:
        return seqs
    if isinstance(sequences, int):
        return seqs[:sequences]
    wanted = [int(s) for s in sequences]
    unknown = sorted(set(wanted) - set(seqs))
    if unknown:
        raise ConfigError(f"sequence ids {unknown[:5]} are not in the trace")
    return wanted


@torch.no_grad()
def replay(model: nn.Module, trace: Any, *, sequences: int | Iterable[int] | None = None,
           prefill: int | None = None, max_tokens: int | None = None, family: str | None = None,
           progress: bool = False) -> ReplayResult:
    """Run ``model`` over ``trace``'s sequences with the trace's routing (module docstring).

    ``sequences``: how many (the first n) or which sequence ids; ``max_tokens``: rows per sequence
    at most; ``prefill``: rows fed in the first call (see above).
    """
    L, E, k = check_trace_matches(trace, model, family)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    vocab = int(getattr(model.config, "vocab_size", 0) or getattr(model.config.get_text_config(), "vocab_size"))
    forcer = RoutingForcer(model, L, family)
    cache_arg = _cache_argument(model)
    result = ReplayResult()
    trace_weights = trace.weights if trace.meta.has_weights else None
    seq_ids = _sequences(trace, sequences)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seq_ids), desc="replay", unit="seq")
    try:
        for sid in seq_ids:
            rows = np.nonzero(trace.seq == sid)[0]
            if max_tokens is not None:
                rows = rows[:max_tokens]
            n = len(rows)
            if n == 0:
                continue
            ids = trace.ids[rows].astype(np.int64)
            if trace_weights is not None:
                w = trace_weights[rows].astype(np.float32)
                bad = np.isnan(w).any(axis=2, keepdims=True)
                w = np.where(bad, 1.0 / k, w)
            else:
                w = np.full(ids.shape, 1.0 / k, np.float32)
            keep = (ids < 0).any(axis=2)
            ids = np.where(ids < 0, 0, ids)
            keep_mask = keep if keep.any() else None
            tokens = trace.token[rows].astype(np.int64)
            tokens = np.where(tokens < 0, 0, tokens % vocab)
            if prefill is None:
                leading = np.argmax(trace.phase[rows] != PHASE_PREFILL) if (trace.phase[rows] != PHASE_PREFILL).any() \
                    else n
                p = max(1, int(leading))
            else:
                p = max(1, min(int(prefill), n))
            cache = _new_cache(model)
            tok = torch.from_numpy(tokens).to(device)

            def step(lo: int, hi: int) -> None:
                forcer.set_rows(ids[lo:hi], w[lo:hi], None if keep_mask is None else keep_mask[lo:hi], device, dtype)
                model(input_ids=tok[lo:hi][None], use_cache=True, **{cache_arg: cache})

            _sync(device)
            t0 = time.perf_counter()
            step(0, p)
            _sync(device)
            t1 = time.perf_counter()
            for t in range(p, n):
                step(t, t + 1)
            _sync(device)
            t2 = time.perf_counter()
            result.sequences += 1
            result.prefill_tokens += p
            result.decode_tokens += n - p
            result.prefill_s += t1 - t0
            result.decode_s += t2 - t1
            result.per_sequence.append({"seq": sid, "prefill": p, "decode": n - p, "prefill_s": t1 - t0,
                                        "decode_s": t2 - t1})
            if bar is not None:
                bar.update(1)
    finally:
        forcer.clear()
        forcer.remove()
        if bar is not None:
            bar.close()
    return result


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument: ``past_key_values`` (transformers <= 5.1x) or ``cache``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["replay", "ReplayResult", "RoutingForcer", "check_trace_matches"]
