"""``moecache.run_forced(model, trace)``: run a model with its routing forced to a recorded trace.

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
* ``batch=b``: the sequences run ``b`` at a time, side by side, one batch row each, step by step
  (teacher-forced): one prefill call of ``(b, p)`` tokens, then one decode call of ``(b, 1)`` per
  step; batch row ``r`` at step ``t`` routes as its sequence's row ``t`` says. Rows of unequal
  length are not padded: a group replays only its *common length*, the first ``min`` rows of its
  sequences (after ``max_tokens``); the rows past it are not run and are counted in
  ``ForcedRunResult.unreplayed_rows``. Without padding no attention mask is needed and every row of
  every call is a real token. The default prefill is the smallest leading-prefill count of the
  group's sequences (at least one). A last group with fewer than ``b`` sequences runs with as many
  rows as it has (its calls have fewer rows; ``per_sequence`` records the rows of each group).
  ``batch=1`` is the one-sequence-at-a-time replay above, unchanged.
* ``time_limit_s``: stop a replay's decode steps once this much wall time has passed since the
  replay began (checked on the host between decode calls, without a sync); the steps run so far
  are counted and ``ForcedRunResult.truncated`` is set. For benchmarks that must stay under a budget.
* ``lookahead``: an object whose ``seek(ids, pos)`` is called before each model call with the group's
  whole forced routing ``(b, n, L, k)`` and the index of the call's last row: what an oracle
  predictor reads to know the routing ahead (benchmarks of the prefetch ceiling; no real run has it).

A trace whose expert count, top-k or MoE layer count differs from the model's is a ``ConfigError``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import validate as V
from .errors import ConfigError
from .families import detect_family, find_moe_blocks, get_family
from .trace.schema import PHASE_PREFILL


@dataclass
class ForcedRunResult:
    """Tokens and wall time of a replay (the GPU is synchronised at each group's phase ends).

    Tokens count every batch row: a decode step of ``b`` rows is ``b`` decode tokens and one decode
    step. ``per_sequence`` has one entry per group of sequences run together (one sequence when
    ``batch=1``): its first sequence id ``seq``, all of them ``seqs``, and per-row counts.
    """

    sequences: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    per_sequence: list[dict[str, Any]] = field(default_factory=list)
    batch: int = 1
    decode_steps: int = 0
    unreplayed_rows: int = 0
    truncated: bool = False

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s else None

    def as_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "batch": self.batch, "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens, "decode_steps": self.decode_steps,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "ms_per_decode_token": 1e3 * self.decode_s / self.decode_tokens if self.decode_tokens else None,
                "ms_per_decode_step": 1e3 * self.decode_s / self.decode_steps if self.decode_steps else None,
                "unreplayed_rows": self.unreplayed_rows, "truncated": self.truncated}


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
        # Prepended: pre-hooks registered earlier (moecache.record's) then see the forced routing.
        self._hooks = [getattr(b.block, adapter.experts_attr).register_forward_pre_hook(
            self._hook(i), with_kwargs=True, prepend=True) for i, b in enumerate(self.blocks)]

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
    try:
        wanted = [V.count("sequence id", s, minimum=0) for s in sequences]
    except TypeError:
        raise ConfigError(f"sequences={sequences!r}: pass a count or a list of sequence ids") from None
    unknown = sorted(set(wanted) - set(seqs))
    if unknown:
        raise ConfigError(f"sequence ids {unknown[:5]} are not in the trace")
    return wanted


@dataclass
class _Rows:
    """One sequence's replayable rows: routing, weights, kept-routing mask, tokens, leading prefill count."""

    ids: np.ndarray          # (n, layers, k) int64, missing/dropped ids replaced by 0
    weights: np.ndarray      # (n, layers, k) float32
    keep: np.ndarray         # (n, layers) bool: the trace has no id here, keep the router's own
    tokens: np.ndarray       # (n,) int64 token ids within the vocabulary
    leading_prefill: int     # rows at the start marked prefill (>= 1)


def _sequence_rows(trace: Any, sid: int, max_tokens: int | None, k: int, vocab: int,
                   trace_weights: np.ndarray | None) -> _Rows:
    rows = np.nonzero(trace.seq == sid)[0]
    if max_tokens is not None:
        rows = rows[:max_tokens]
    n = len(rows)
    ids = trace.ids[rows].astype(np.int64)
    if trace_weights is not None:
        w = trace_weights[rows].astype(np.float32)
        bad = np.isnan(w).any(axis=2, keepdims=True)
        w = np.where(bad, 1.0 / k, w)
    else:
        w = np.full(ids.shape, 1.0 / k, np.float32)
    keep = (ids < 0).any(axis=2)
    ids = np.where(ids < 0, 0, ids)
    tokens = trace.token[rows].astype(np.int64)
    tokens = np.where(tokens < 0, 0, tokens % vocab)
    not_prefill = trace.phase[rows] != PHASE_PREFILL
    leading = int(np.argmax(not_prefill)) if not_prefill.any() else n
    return _Rows(ids, w.astype(np.float32, copy=False), keep, tokens, max(1, leading))


@torch.no_grad()
def run_forced(model: nn.Module, trace: Any, *, sequences: int | Iterable[int] | None = None,
           prefill: int | None = None, max_tokens: int | None = None, family: str | None = None,
           progress: bool = False, batch: int = 1, time_limit_s: float | None = None,
           lookahead: Any = None) -> ForcedRunResult:
    """Run ``model`` over ``trace``'s sequences with the trace's routing (module docstring).

    ``sequences``: how many (the first n) or which sequence ids; ``max_tokens``: rows per sequence
    at most; ``prefill``: rows fed in the first call (see above); ``batch``: sequences run side by
    side, one batch row each (common-length rule in the module docstring); ``time_limit_s``: stop
    decoding after this much wall time; ``lookahead``: told the routing ahead before each call.
    """
    # Every argument is checked before the model is hooked (moecache.validate).
    batch = V.count("batch", batch, minimum=1, fix="sequences side by side")
    time_limit_s = V.real("time_limit_s", time_limit_s, minimum=0.0, above=True, none=True, fix="seconds")
    prefill = V.count("prefill", prefill, minimum=1, none=True, fix="rows fed in the first call")
    max_tokens = V.count("max_tokens", max_tokens, minimum=1, none=True, fix="rows per sequence")
    progress = V.flag("progress", progress)
    family = V.text("family", family, none=True)
    if not hasattr(trace, "meta") or not hasattr(trace, "ids"):
        raise ConfigError(f"trace is a {type(trace).__name__}, not a moecache trace; pass "
                          "moecache.open_trace(path)")
    if isinstance(sequences, bool) or not (sequences is None or isinstance(sequences, (int, Iterable))):
        raise ConfigError(f"sequences={sequences!r}: pass a count, a list of sequence ids, or None")
    if isinstance(sequences, int):
        sequences = V.count("sequences", sequences, minimum=1, fix="how many sequences")
    if lookahead is not None and not callable(getattr(lookahead, "seek", None)):
        raise ConfigError(f"lookahead is a {type(lookahead).__name__} without a seek(ids, pos) method")
    L, E, k = check_trace_matches(trace, model, family)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    vocab = int(getattr(model.config, "vocab_size", 0) or getattr(model.config.get_text_config(), "vocab_size"))
    seq_ids = _sequences(trace, sequences)
    cache_arg = _cache_argument(model)
    result = ForcedRunResult(batch=batch)
    trace_weights = trace.weights if trace.meta.has_weights else None
    forcer = RoutingForcer(model, L, family)  # the first change: everything is checked by now
    groups = [seq_ids[i:i + batch] for i in range(0, len(seq_ids), batch)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seq_ids), desc="forced routing", unit="seq")
    started = time.perf_counter()
    try:
        for group in groups:
            if result.truncated:
                break
            parts = [_sequence_rows(trace, sid, max_tokens, k, vocab, trace_weights) for sid in group]
            n = min(len(r.tokens) for r in parts)
            result.unreplayed_rows += sum(len(r.tokens) - n for r in parts)
            if n == 0:
                continue
            b = len(parts)
            # (b, n, ...) stacked; a call over steps lo:hi feeds rows in (batch row, step) order,
            # the order in which the model flattens (b, hi - lo) tokens before its MoE blocks.
            ids = np.stack([r.ids[:n] for r in parts])
            w = np.stack([r.weights[:n] for r in parts])
            keep = np.stack([r.keep[:n] for r in parts])
            keep_mask = keep if keep.any() else None
            tok = torch.from_numpy(np.stack([r.tokens[:n] for r in parts])).to(device)
            p = min(r.leading_prefill for r in parts) if prefill is None else int(prefill)
            p = max(1, min(p, n))
            cache = _new_cache(model)

            def step(lo: int, hi: int) -> None:
                rows = b * (hi - lo)
                forcer.set_rows(ids[:, lo:hi].reshape(rows, L, k), w[:, lo:hi].reshape(rows, L, k),
                                None if keep_mask is None else keep_mask[:, lo:hi].reshape(rows, L),
                                device, dtype)
                if lookahead is not None:
                    lookahead.seek(ids, hi - 1)
                model(input_ids=tok[:, lo:hi], use_cache=True, **{cache_arg: cache})

            _sync(device)
            t0 = time.perf_counter()
            step(0, p)
            _sync(device)
            t1 = time.perf_counter()
            steps = 0
            for t in range(p, n):
                if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
                    result.truncated = True
                    break
                step(t, t + 1)
                steps += 1
            _sync(device)
            t2 = time.perf_counter()
            result.sequences += b
            result.prefill_tokens += b * p
            result.decode_tokens += b * steps
            result.decode_steps += steps
            result.prefill_s += t1 - t0
            result.decode_s += t2 - t1
            result.per_sequence.append({"seq": group[0], "seqs": list(group), "rows": b, "prefill": p,
                                        "decode": steps, "prefill_s": t1 - t0, "decode_s": t2 - t1})
            if bar is not None:
                bar.update(b)
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


__all__ = ["run_forced", "ForcedRunResult", "RoutingForcer", "check_trace_matches"]
