"""Record the routing of a transformers MoE model as it runs: ``moecache.record(model, path)``.

One generic recorder for every family in ``moecache.families.FAMILIES``. It hooks

* each *stack* (the module that owns the decoder layers and receives ``input_ids``,
  ``attention_mask`` and the KV cache; the encoder and the decoder of an encoder-decoder model
  are two stacks): a pre-hook opens a *call*, a forward hook closes it;
* each MoE block's experts module (or router, per the family's ``capture``): the hook keeps a
  reference to the ids and weights the experts receive, on the device. No copy, no sync.

When a call closes, its token ids and attention-mask tail are copied on the device (one small
kernel: a caller may reuse its input buffers), while the routing tensors stay referenced (the
router makes new ones every call). Every 32 calls (or 8192 rows) the waiting calls are *packed*:
one ``cat`` kernel per column (ids, weights, inputs) and one ``non_blocking`` copy each into pooled
pinned host buffers, behind one CUDA event. A packed batch is *materialised* into trace rows
(vectorised numpy) once its event has completed, which is checked without blocking at the end of
every call; ``close()`` waits for the rest. The host thus never waits for the GPU inside a forward
pass, except when more than ``max_pending`` packed batches are in flight (then it waits for the
oldest, to bound pinned memory). On the CPU the same path runs without copies, pinning or events.

Rows. Each row of each batch fed to a stack is a *sequence*. A call *continues* the sequences of
an earlier call when it passes the same KV cache object that call used or returned and its
attention mask is longer than its input (``mask.shape[1] - input.shape[1]`` past tokens; without
a mask, ``cache.get_seq_length()``); any other call starts new sequences, with ids unique across
the recording (numbered in call order, batch rows in order). Only tokens the attention mask marks
real are recorded (left and right padding are skipped). Per token:

* ``seq``: the sequence id; ``pos``: index among the sequence's real tokens (0-based);
* ``token``: the input id (-1 when the call passed ``inputs_embeds``);
* ``step``: the global index of the stack call the token was fed in (0, 1, ...);
* ``phase``: **prefill** for the call that starts a sequence and for later multi-token calls before
  its first single-token call (a prompt fed in chunks); **decode** for single-token continuation
  calls and everything after the first of them. A call that continues a cache the recorder has not
  seen (recording began mid-generation) starts new sequence ids whose positions count the real
  tokens already cached; it is decode when it feeds one token per row, else prefill.

With ``generate(max_new_tokens=n)`` a sequence therefore has ``prompt + n - 1`` rows: the prompt in
one prefill call, then one decode call per generated token except the last, which is never fed
back. In a batch, rows that finished early keep being fed (pad tokens with mask 1) until the whole
batch stops; they are recorded, since the model did route them.

Per token and MoE layer: the top-k ids in the router's order (``id_order="router"``) and the gate
weights exactly as the experts receive them (``weights`` in the metadata says what they mean per
family: ``moecache.families``); ``-2`` marks a token dropped over an expert's capacity; ``-1`` a
layer the token never went through (the decoder layers of an encoder token, and vice versa).

Crash safety: rows go through ``TraceWriter``: a chunk is flushed every ``flush_rows`` rows or
``flush_seconds`` seconds, whichever comes first, so a killed process leaves ``PATH.partial`` with
every flushed chunk readable (``open_trace``; ``finalise_partial`` completes it). ``close()`` (the
end of the ``with`` block) finalises atomically; an exception in the block keeps ``PATH.partial``.
Block calls made outside a stack's forward, and calls of a forward that raised, are counted in the
trace's ``drops``, never silently lost.

Limits: beam search records one sequence per beam row (rows follow the slot, not the beam's
history); padding-free packed batches (one row holding several documents) are one sequence;
``generate(use_cache=False)`` re-feeds the whole text every step, so every step is a new prefill;
``torch.compile``d or CUDA-graphed forwards bypass module hooks. Rows reach the writer in batches
(see above), so a kill can also lose the calls not yet materialised (at most 32 calls or
``min(flush_rows, 8192)`` rows, plus the batches in flight) besides the writer's unflushed buffer.
"""

from __future__ import annotations

import collections
import inspect
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import validate as V
from ..errors import ConfigError, UnsupportedModelError
from ..families import CAPTURES, FamilyAdapter, MoeBlock, bytes_per_expert, detect_family, find_moe_blocks, get_family
from .schema import PHASE_DECODE, PHASE_PREFILL, RoutingBlock, TraceMeta
from .store import Trace, TraceWriter, check_trace_output, open_trace

_CACHE_ARGS = ("cache", "past_key_values")  # the KV cache's keyword: 5.24 says "cache", 5.17 "past_key_values"
_RECORDING_FLAG = "_moecache_recorder"
_BATCH_CALLS = 32       # materialise at least this many calls at a time (amortises the numpy work)
_BATCH_ROWS = 8192      # ... or as soon as this many rows wait
_POOL_MAX = 24          # pinned host buffers kept for reuse


@dataclass
class _Call:
    """One forward call of a stack, from its pre-hook until its rows are written."""

    stack: str
    step: int
    batch: int
    length: int
    seqs: np.ndarray                     # (batch,) sequence ids
    phase: np.ndarray                    # (batch,) PHASE_* per row
    past_real: Any = None                # None: positions continue the recorder's counts; else real
                                         # tokens already cached per row (int, or a (batch,) tensor)
    tokens: Any = None                   # (batch, length) input ids on the device, or None
    mask: Any = None                     # (batch, length) the mask over this call's tokens, or None
    cache: Any = None                    # the KV cache passed in, until the call closes
    ids: dict[int, Any] = field(default_factory=dict)      # trace layer -> (tokens, top_k), device
    weights: dict[int, Any] = field(default_factory=dict)
    hidden: dict[int, Any] = field(default_factory=dict)   # trace layer -> (tokens, hidden) float16, device
    layers: list[int] = field(default_factory=list)        # trace layers present (set at close)
    inputs: Any = None                   # (channels, tokens) device copy of token ids and/or mask
    has_tokens: bool = False
    has_mask: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.length


@dataclass
class _Batch:
    """Consecutive calls packed together and copied to the host behind one event."""

    calls: list[_Call]
    ids: Any                             # host (sum over calls and their layers of rows, top_k)
    weights: Any                         # host, same shape
    inputs: Any                          # host (channels, sum of rows), or None
    hidden: Any = None                   # host (sum over calls and their layers of rows, hidden), or None
    event: Any = None                    # CUDA event after the copies; None on the CPU


class RoutingRecorder:
    """Records every forward pass of ``model`` into a routing trace at ``path``. A context manager.

    Arguments:
        model: a transformers model of a family in ``moecache.families.FAMILIES``.
        path: the trace folder to write (``PATH.partial`` while recording).
        family: the adapter name; detected from ``config.model_type`` when None.
        flush_rows: rows per chunk flushed to disk.
        flush_seconds: also flush buffered rows when the last flush is older than this.
        overwrite: replace an existing trace (or unfinished ``PATH.partial``) at ``path``.
        model_name: the metadata's model name (``config._name_or_path`` or the class name by default).
        max_pending: packed batches (of up to 32 calls) whose host copies may be in flight before
            the recorder waits for the oldest.
        hidden_states: also record, per token and MoE layer, the input of the MoE block (what its
            router reads) as float16: the training data of the ``hidden_state`` predictor. Off by
            default: it costs a cast and a copy of ``hidden_size`` values per token and layer, and the
            trace grows by ``2 * hidden_size`` bytes per token and layer (format version 2).

    After ``close()``: ``rows`` (tokens recorded), ``path`` (the finalised trace), ``trace()``.
    ``calls`` counts the forward calls recorded and ``host_seconds`` the host time spent in the
    recorder's hooks (opening calls, storing each layer's references, packing, copying, writing;
    not torch's own dispatch of the hooks, nor ``close()``): its cost where the host, not the GPU,
    bounds decode.
    """

    def __init__(self, model: Any, path: str | os.PathLike, *, family: str | None = None,
                 flush_rows: int = 16384, flush_seconds: float = 30.0, overwrite: bool = False,
                 model_name: str | None = None, max_pending: int = 4, hidden_states: bool = False):
        # Every argument is checked before anything is hooked or written (moecache.validate).
        flush_rows = V.count("flush_rows", flush_rows, minimum=1)
        max_pending = V.count("max_pending", max_pending, minimum=1)
        flush_seconds = V.real("flush_seconds", flush_seconds, minimum=0.0, above=True)
        overwrite = V.flag("overwrite", overwrite)
        hidden_states = V.flag("hidden_states", hidden_states)
        model_name = V.text("model_name", model_name, none=True)
        family = V.text("family", family, none=True)
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"path={path!r} is not a path; pass the trace folder to write, e.g. 'runs/trace1'")
        check_trace_output(path, overwrite=overwrite)
        self.model = model
        self.path = os.fspath(path)
        self.adapter: FamilyAdapter = get_family(family) if family else detect_family(model)
        self.blocks: list[MoeBlock] = find_moe_blocks(model, self.adapter)
        self.flush_rows = int(flush_rows)
        self.flush_seconds = float(flush_seconds)
        self.overwrite = overwrite
        self.max_pending = int(max_pending)
        self.hidden_states = bool(hidden_states)
        self.meta = self._build_meta(model_name)
        self.stacks = list(dict.fromkeys(b.stack for b in self.blocks))
        self._capture = CAPTURES.get(self.adapter.capture)
        self.writer: TraceWriter | None = None
        self._handles: list[Any] = []
        self._open: dict[str, _Call] = {}
        self._pending: collections.deque[_Call] = collections.deque()   # closed, not yet packed
        self._pending_rows = 0
        self._inflight: collections.deque[_Batch] = collections.deque()  # packed, copies under way
        self._batch_rows = min(_BATCH_ROWS, self.flush_rows)
        self._pool: dict[tuple, list[Any]] = {}   # free pinned host buffers by (shape, dtype)
        self._pooled = 0
        self._events: list[Any] = []              # free CUDA events
        self._cache_rows: dict[int, tuple[Any, np.ndarray]] = {}  # id(cache) -> (weakref, sequence ids)
        self._next_pos: dict[int, int] = {}
        self._decoding: set[int] = set()
        self._next_seq = 0
        self._step = 0
        self._last_flush = time.monotonic()
        self._params: dict[type, list[str]] = {}
        self.rows = 0
        self.calls = 0
        self.host_seconds = 0.0
        self.closed = False

    # -- metadata ------------------------------------------------------------------------------
    def _build_meta(self, model_name: str | None) -> TraceMeta:
        import torch
        import transformers

        config = self.model.config
        num_experts = self.adapter.num_experts(config)
        top_k = self.adapter.top_k(config)
        for b in self.blocks:  # the table's config key must agree with the modules actually built
            n = getattr(b.experts, "num_experts", None)
            if n is not None and int(n) != num_experts:
                raise UnsupportedModelError(
                    f"{b.name}.{self.adapter.experts_attr} holds {n} experts but the config says {num_experts} "
                    f"({self.adapter.num_experts_key}); moecache cannot record this layout")
        name = model_name or getattr(config, "_name_or_path", "") or type(self.model).__name__
        param = next(iter(self.model.parameters()), None)
        hidden_size = None
        if self.hidden_states:
            hidden_size = getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None),
                                                                          "hidden_size", None)
            if not hidden_size:
                raise UnsupportedModelError(f"{type(self.model).__name__}: the config names no hidden_size, so hidden "
                                            "states cannot be recorded; record without hidden_states=True")
        return TraceMeta(hidden_size=hidden_size,
            num_experts=num_experts, top_k=top_k, moe_layers=[b.layer for b in self.blocks], model=str(name),
            family=self.adapter.name, bytes_per_expert=bytes_per_expert(self.blocks, num_experts),
            source="moecache.record", id_order="router", weights=self.adapter.weights_kind(config),
            extra={"model_class": type(self.model).__name__, "capture": self.adapter.capture,
                   "weights_doc": self.adapter.weights_doc, "stacks": sorted({b.stack for b in self.blocks}),
                   "dtype": str(param.dtype) if param is not None else None,
                   "device": str(param.device) if param is not None else None,
                   "torch": torch.__version__, "transformers": transformers.__version__})

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "RoutingRecorder":
        """Open the trace writer and install the hooks (``__enter__`` calls this)."""
        if self.writer is not None:
            raise ConfigError("this recorder was already started; make a new one per recording")
        if getattr(self.model, _RECORDING_FLAG, None) is not None:
            raise ConfigError("this model is already being recorded; close the other recorder first")
        self.writer = TraceWriter(self.path, self.meta, chunk_rows=self.flush_rows, overwrite=self.overwrite)
        setattr(self.model, _RECORDING_FLAG, self)
        for stack in self.stacks:
            module = self.model.get_submodule(stack) if stack else self.model
            self._handles.append(module.register_forward_pre_hook(self._stack_pre(stack), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._stack_post(stack), with_kwargs=True))
        for i, b in enumerate(self.blocks):
            if self.hidden_states:
                self._handles.append(b.block.register_forward_pre_hook(self._hidden_hook(i, b.stack),
                                                                       with_kwargs=True))
            if self._capture.when == "pre":
                self._handles.append(b.hook.register_forward_pre_hook(self._layer_hook(i, b.stack), with_kwargs=True))
            else:
                self._handles.append(b.hook.register_forward_hook(self._layer_hook(i, b.stack), with_kwargs=True))
        self._last_flush = time.monotonic()
        return self

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.model, _RECORDING_FLAG, None) is self:
            delattr(self.model, _RECORDING_FLAG)

    def close(self) -> str:
        """Remove the hooks, write every pending call and finalise the trace. Returns the trace path."""
        if self.closed:
            return self.path
        if self.writer is None:
            raise ConfigError("the recorder was never started (use it as a context manager, or call start())")
        self._remove_hooks()
        self._discard_open("forward call that did not finish")
        self._drain(block=True)
        self.path = self.writer.close()
        self.closed = True
        return self.path

    def __enter__(self) -> "RoutingRecorder":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Keep what was produced: everything that reached the host goes into PATH.partial.
        self._remove_hooks()
        try:
            self._discard_open("forward call that raised")
            self._drain(block=True)
        finally:
            if self.writer is not None:
                self.writer.__exit__(exc_type, exc, tb)
            self.closed = True

    def trace(self) -> Trace:
        """The recorded trace (after ``close``)."""
        if not self.closed:
            raise ConfigError("the recording is still open; read the trace after the with-block ends")
        return open_trace(self.path)

    # -- hooks -----------------------------------------------------------------------------------
    def _inputs(self, module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
        if not args:  # transformers passes everything by keyword
            return kwargs
        names = self._params.get(type(module))
        if names is None:
            names = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
            self._params[type(module)] = names
        out = dict(kwargs)
        out.update(zip(names, args))
        return out

    def _stack_pre(self, stack: str):
        def hook(module, args, kwargs):
            t0 = time.perf_counter()
            if stack in self._open:
                self._discard_open("forward call that raised", stack)
            call = self._begin(stack, self._inputs(module, args, kwargs))
            if call is not None:
                self._open[stack] = call
            self.host_seconds += time.perf_counter() - t0
        return hook

    def _stack_post(self, stack: str):
        def hook(module, args, kwargs, output):
            t0 = time.perf_counter()
            call = self._open.pop(stack, None)
            if call is None:
                return
            self._remember_cache(call.cache, call.seqs)
            self._remember_cache(_output_cache(output), call.seqs)
            call.cache = None
            self._finish(call)
            self._drain(block=False)
            self.host_seconds += time.perf_counter() - t0
        return hook

    def _layer_hook(self, layer: int, stack: str):
        fn = self._capture.fn

        def hook(module, args, kwargs, output=None):
            # The per-layer hot path: a dict lookup and two references; no copy, no host sync.
            t0 = time.perf_counter()
            call = self._open.get(stack)
            if call is None:  # a block run on its own (not inside a recorded forward): no token context
                self.writer.add_drops("MoE call outside a model forward")
                return
            ids, weights = fn(module, args, kwargs, output)
            if layer in call.ids:
                self.writer.add_drops("MoE layer called twice in one forward (later call kept)")
            # References only: the experts do not modify their routing inputs, so no copy is needed.
            call.ids[layer] = ids.detach() if ids.requires_grad else ids
            call.weights[layer] = weights.detach() if weights.requires_grad else weights
            self.host_seconds += time.perf_counter() - t0
        return hook

    def _hidden_hook(self, layer: int, stack: str):
        def hook(module, args, kwargs):
            call = self._open.get(stack)
            if call is None:
                return  # counted by the routing hook
            x = args[0] if args else kwargs["hidden_states"]
            # a float16 copy on the device (the block may reuse its input buffer); no host sync
            call.hidden[layer] = x.detach().reshape(-1, x.shape[-1]).to(torch_float16())
        return hook

    # -- one call --------------------------------------------------------------------------------
    def _remember_cache(self, cache: Any, seqs: np.ndarray) -> None:
        """Map ``cache`` to the sequences of its rows (by identity, without keeping the cache alive)."""
        if cache is None:
            return
        key = id(cache)
        entry = self._cache_rows.get(key)
        if entry is not None and entry[0]() is cache:  # the usual decode step: already known
            if entry[1] is not seqs:
                self._cache_rows[key] = (entry[0], seqs)
            return

        def forget(ref, key=key, rows=self._cache_rows):  # the cache died: its id may be reused
            if rows.get(key, (None,))[0] is ref:
                del rows[key]
        try:
            self._cache_rows[key] = (weakref.ref(cache, forget), seqs)
        except TypeError:  # a cache type without weak references: its calls count as unknown caches
            pass

    def _cache_seqs(self, cache: Any) -> np.ndarray | None:
        entry = self._cache_rows.get(id(cache))
        return entry[1] if entry is not None and entry[0]() is cache else None

    def _begin(self, stack: str, inputs: dict[str, Any]) -> _Call | None:
        """Open a call: decide which sequences its rows belong to (pure Python on shapes, no sync)."""
        ids = inputs.get("input_ids")
        if ids is not None:
            if ids.dim() == 1:  # an unbatched call
                ids = ids[None]
            batch, length = ids.shape[0], ids.shape[1]
        else:
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                return None
            batch, length = embeds.shape[0], embeds.shape[1]
        if batch == 0 or length == 0:
            return None
        mask = inputs.get("attention_mask")
        if mask is not None:
            shape = mask.shape
            if len(shape) != 2 or shape[0] != batch or shape[1] < length:
                mask = None  # a 4-D or otherwise custom mask: every token counts as real
        cache = inputs.get("cache")
        if cache is None:
            cache = inputs.get("past_key_values")
        if mask is not None:
            past = mask.shape[1] - length
        elif cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())  # shape- or counter-based in transformers 5.x caches: no sync
        else:
            past = 0
        rows = self._cache_seqs(cache) if past > 0 and cache is not None else None
        step = self._step
        self._step += 1
        self.calls = self._step
        if rows is not None and len(rows) == batch:  # continues known sequences
            seqs = rows
            if length == 1:
                phase = np.full(batch, PHASE_DECODE, np.int8)
                self._decoding.update(seqs.tolist())
            else:  # a chunk of a prompt, unless the sequence already decoded
                phase = np.array([PHASE_DECODE if s in self._decoding else PHASE_PREFILL for s in seqs.tolist()],
                                 np.int8)
            call = _Call(stack, step, batch, length, seqs, phase)
        else:
            seqs = np.arange(self._next_seq, self._next_seq + batch, dtype=np.int64)
            self._next_seq += batch
            decode = past > 0 and length == 1
            call = _Call(stack, step, batch, length, seqs,
                         np.full(batch, PHASE_DECODE if decode else PHASE_PREFILL, np.int8))
            if decode:
                self._decoding.update(seqs.tolist())
            if past > 0:  # recording began mid-sequence: positions count the real tokens already cached
                call.past_real = mask[:, :past].sum(dim=1) if mask is not None else past
        call.tokens = ids
        call.mask = mask.narrow(1, past, length) if mask is not None else None
        call.cache = cache
        return call

    def _host(self, t: Any, pinned: bool) -> Any:
        """Start the copy of ``t`` into a pooled pinned buffer (or return the CPU tensor itself)."""
        import torch

        if not pinned:
            return t
        key = (tuple(t.shape), t.dtype)
        free = self._pool.get(key)
        if free:
            host = free.pop()
            self._pooled -= 1
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)  # ordered on the current stream; its completion is the batch's event
        return host

    def _release(self, batch: _Batch) -> None:
        """Return a materialised batch's pinned buffers and event to the pools."""
        if batch.event is None:
            return
        self._events.append(batch.event)
        for t in (batch.ids, batch.weights, batch.inputs, batch.hidden):
            if t is not None and self._pooled < _POOL_MAX:  # bounded: prompts of many sizes
                self._pool.setdefault((tuple(t.shape), t.dtype), []).append(t)
                self._pooled += 1

    def _finish(self, call: _Call) -> None:
        """Close a call: copy its token ids and mask (one small kernel) and queue it for packing.

        The routing tensors stay referenced on the device until the batch is packed (the router
        makes new ones every call); the inputs are copied now because a caller may reuse its
        input buffers in place.
        """
        import torch

        if not call.ids:
            self.writer.add_drops("forward call without MoE routing", call.rows)
            return
        call.layers = sorted(call.ids)
        n = call.rows
        channels = [t.reshape(n) for t in (call.tokens, call.mask) if t is not None]
        call.has_tokens, call.has_mask = call.tokens is not None, call.mask is not None
        call.inputs = torch.stack(channels) if channels else None
        call.tokens = call.mask = None
        if isinstance(call.past_real, torch.Tensor):  # rare path (unknown cache): its own small copy
            call.past_real = call.past_real.to("cpu", non_blocking=True)
        self._pending.append(call)
        self._pending_rows += n

    def _pack(self, calls: list[_Call]) -> None:
        """Concatenate the pending calls' routing on the device (one kernel per column) and start
        the copies to the host behind one event. Calls are grouped where their input channels change."""
        import torch

        k = self.meta.top_k
        groups: list[list[_Call]] = []
        for c in calls:
            if groups and (groups[-1][0].has_tokens, groups[-1][0].has_mask) == (c.has_tokens, c.has_mask):
                groups[-1].append(c)
            else:
                groups.append([c])
        H = self.meta.hidden_size
        for group in groups:
            ids, weights, hidden = [], [], []
            for c in group:
                for l in c.layers:
                    t, w = c.ids[l], c.weights[l]
                    if t.shape != (c.rows, k) or w.shape != (c.rows, k):
                        raise UnsupportedModelError(
                            f"MoE layer {self.meta.moe_layers[l]} routed ids {tuple(t.shape)} / weights "
                            f"{tuple(w.shape)}, expected ({c.rows}, {k}) for {c.batch} x {c.length} tokens and "
                            f"top-{k}: the {self.adapter.name!r} adapter does not match this model")
                    ids.append(t)
                    weights.append(w)
                    if H:
                        h = c.hidden.get(l)
                        if h is None or h.shape != (c.rows, H):
                            raise UnsupportedModelError(
                                f"MoE layer {self.meta.moe_layers[l]}: its block input is "
                                f"{None if h is None else tuple(h.shape)}, expected ({c.rows}, {H}); record this "
                                "model without hidden_states=True")
                        hidden.append(h)
                c.ids = c.weights = None  # drop the device references
                c.hidden = {}
            ids_dev, w_dev = torch.cat(ids), torch.cat(weights)
            h_dev = torch.cat(hidden) if H else None
            in_dev = torch.cat([c.inputs for c in group], dim=1) if group[0].inputs is not None else None
            for c in group:
                c.inputs = None
            pinned = ids_dev.device.type == "cuda"
            batch = _Batch(group, self._host(ids_dev, pinned), self._host(w_dev, pinned),
                           self._host(in_dev, pinned) if in_dev is not None else None,
                           self._host(h_dev, pinned) if h_dev is not None else None)
            if pinned:
                batch.event = self._events.pop() if self._events else torch.cuda.Event()
                batch.event.record()
            self._inflight.append(batch)

    def _drain(self, block: bool) -> None:
        """Pack the pending calls once enough wait; write the packed batches whose copies are done
        (all of them, waiting if needed, when ``block``)."""
        due = time.monotonic() - self._last_flush > self.flush_seconds
        if self._pending and (block or due or len(self._pending) >= _BATCH_CALLS
                              or self._pending_rows >= self._batch_rows):
            calls = list(self._pending)
            self._pending.clear()
            self._pending_rows = 0
            self._pack(calls)
        while self._inflight:
            batch = self._inflight[0]
            if batch.event is not None and not batch.event.query():
                if not block and len(self._inflight) <= self.max_pending:
                    break
                # The one host wait: at close, or when max_pending batches are in flight.
                batch.event.synchronize()
            self._inflight.popleft()
            self._materialise(batch)
        if due or block:
            self.writer.flush()
            self._last_flush = time.monotonic()

    def _materialise(self, batch: _Batch) -> None:
        """Write the rows of a packed batch (in call order): real tokens only, positions per sequence.

        Vectorised over the batch: positions are each sequence's next position plus the running
        count of its real tokens, computed with one stable sort by sequence id.
        """
        num_layers, k = self.meta.num_layers, self.meta.top_k
        calls = batch.calls
        # Private copies, so the pinned buffers can go back to the pool at once.
        ids_all = batch.ids.numpy().copy()
        w_all = batch.weights.float().numpy().copy()
        inputs = batch.inputs.numpy().copy() if batch.inputs is not None else None
        H = self.meta.hidden_size
        h_all = batch.hidden.numpy().copy() if batch.hidden is not None else None
        self._release(batch)
        hid = None
        first = calls[0]
        total = sum(c.rows for c in calls)
        if all(c.rows == first.rows and c.layers == first.layers for c in calls):
            m, n, nl = len(calls), first.rows, len(first.layers)  # the usual case: decode steps alike
            ids = ids_all.reshape(m, nl, n, k).transpose(0, 2, 1, 3).reshape(m * n, nl, k)
            w = w_all.reshape(m, nl, n, k).transpose(0, 2, 1, 3).reshape(m * n, nl, k)
            if H:
                hid = h_all.reshape(m, nl, n, H).transpose(0, 2, 1, 3).reshape(m * n, nl, H)
            if nl != num_layers:
                ids_full = np.full((total, num_layers, k), -1, ids.dtype)
                w_full = np.full((total, num_layers, k), np.nan, np.float32)
                ids_full[:, first.layers], w_full[:, first.layers] = ids, w
                ids, w = ids_full, w_full
                if H:
                    h_full = np.full((total, num_layers, H), np.nan, np.float16)
                    h_full[:, first.layers] = hid
                    hid = h_full
        else:  # calls of different sizes or layers (prompts, the two stacks of an encoder-decoder)
            ids = np.full((total, num_layers, k), -1, ids_all.dtype)
            w = np.full((total, num_layers, k), np.nan, np.float32)
            if H:
                hid = np.full((total, num_layers, H), np.nan, np.float16)
            src = dst = 0
            for c in calls:
                n, nl = c.rows, len(c.layers)
                ids[dst:dst + n, c.layers] = ids_all[src:src + n * nl].reshape(nl, n, k).transpose(1, 0, 2)
                w[dst:dst + n, c.layers] = w_all[src:src + n * nl].reshape(nl, n, k).transpose(1, 0, 2)
                if H:
                    hid[dst:dst + n, c.layers] = h_all[src:src + n * nl].reshape(nl, n, H).transpose(1, 0, 2)
                src, dst = src + n * nl, dst + n
        tokens = inputs[0] if first.has_tokens else np.full(total, -1, np.int64)
        real = inputs[int(first.has_tokens)] != 0 if first.has_mask else np.ones(total, bool)
        for c in calls:
            if c.past_real is not None:  # fresh sequence ids that continue an unseen cache
                base = c.past_real if isinstance(c.past_real, int) else c.past_real.numpy()
                for s, p in zip(c.seqs.tolist(), np.broadcast_to(base, c.batch).tolist()):
                    self._next_pos[s] = int(p)
        lengths = np.concatenate([np.full(c.batch, c.length) for c in calls])
        seq = np.repeat(np.concatenate([c.seqs for c in calls]), lengths)
        phase = np.repeat(np.concatenate([c.phase for c in calls]), lengths)
        step = np.repeat(np.concatenate([np.full(c.batch, c.step) for c in calls]), lengths)
        if not real.all():
            sel = np.flatnonzero(real)
            seq, phase, step, tokens, ids, w = seq[sel], phase[sel], step[sel], tokens[sel], ids[sel], w[sel]
            if hid is not None:
                hid = hid[sel]
        if len(seq) == 0:
            return
        # Position = the sequence's next position + its running count of real tokens in this batch.
        order = np.argsort(seq, kind="stable")
        sorted_seq = seq[order]
        starts = np.flatnonzero(np.r_[True, sorted_seq[1:] != sorted_seq[:-1]])
        sizes = np.diff(np.r_[starts, len(seq)])
        uniq = sorted_seq[starts].tolist()
        base = np.array([self._next_pos.get(s, 0) for s in uniq], np.int64)
        pos = np.empty(len(seq), np.int64)
        pos[order] = np.repeat(base, sizes) + np.arange(len(seq)) - np.repeat(starts, sizes)
        for s, end in zip(uniq, (base + sizes).tolist()):
            self._next_pos[s] = end
        self.writer.append(RoutingBlock(seq, pos, tokens, step, phase, ids=ids, weights=w, hidden=hid))
        self.rows += len(seq)

    def _discard_open(self, reason: str, stack: str | None = None) -> None:
        for s in [stack] if stack is not None else list(self._open):
            call = self._open.pop(s, None)
            if call is not None and self.writer is not None:
                self.writer.add_drops(reason, call.rows)


def torch_float16() -> Any:
    import torch

    return torch.float16


def _output_cache(output: Any) -> Any:
    for name in _CACHE_ARGS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


__all__ = ["RoutingRecorder"]
