"""Compiled decode around an opaque experts call: ``offload(..., compile=True)``.

What runs how (one decode step of the model's decoder stack):

* every MoE layer's experts call is ONE custom op, ``moecache::offloaded_experts``. ``torch.compile``
  traces the whole stack's forward into one graph (no graph break) in which the op is opaque: at run
  time the op calls the ``OffloadedExperts`` module eagerly, hooks and all (so ``moecache.record``
  still sees the routing), and the runtime's per-layer path with its single routing sync runs as it
  does uncompiled (policy, prefetch, hybrid CPU experts);
* ``PiecewiseBackend`` splits that graph at the op: the segments between two experts calls (norms,
  attention, the KV-cache update, the router, shared experts, the residual adds) become *pieces*,
  each compiled on its own (inductor by default). On CUDA each piece is then captured as one CUDA
  graph on its second call and replayed from then on; the experts op between two pieces stays one
  eager step and is the boundary. On the CPU the same compiled pieces run without graphs.

Shapes ("buckets"). Decode calls (one token per row) go through the compiled path, one compile and
one set of graphs per batch size (``dynamic=False``: the shapes are constants, the KV cache is
static, positions are tensors, so later steps never recompile). Prefill calls (more than one token
per row, and a request's first call whatever its length) run the model eagerly: any prompt length,
no compile, and the prefill's time is kernels and expert copies, not launches. So the buckets are:
{prefill, any length: eager} and {decode, batch B: compiled} for each batch size B used (at most
``max_batch_size`` rows).

The static KV cache. The handle owns a transformers ``StaticCache`` per batch size, ``max_cache_len``
positions long; a call that brings no cache or an empty one (``generate``'s first call) is given
it, and its output returns it, so ``generate`` passes it back on every step; a caller that passes its
own empty cache again on later steps (a replay loop) continues the static one that stood in for it. Its bytes, estimated
from the config for ``max_batch_size`` rows before the pool is sized, count against ``gpu_memory``.

CUDA-graph inputs. A piece's inputs are either at a fixed address (parameters, the KV cache, tensors
marked static, the outputs of earlier pieces' graphs) or copied into the graph's own input buffer
before each replay (the experts op's outputs, the token ids). A fixed input found at another address
on a later step makes the piece capture again, into a private memory pool (counted in ``stats``).
The first capture of every piece shares one pool: pieces replay in the order they were captured and
each step's outputs are consumed within the step (the stack's final outputs are cloned).
"""

from __future__ import annotations

import inspect
import itertools
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError

#: Name of the custom op that stands for one MoE layer's experts call inside compiled graphs.
EXPERTS_OP = "moecache::offloaded_experts"
#: Backends a piece may be compiled with (``compile=`` of ``offload``; True means "inductor").
PIECE_BACKENDS = ("inductor", "aot_eager", "eager")
#: Dynamo's per-code-object recompile limit is raised to at least this (one entry per model and batch size).
RECOMPILE_LIMIT = 64
#: Default static KV cache length (positions) where ``max_cache_len`` is not given.
DEFAULT_MAX_CACHE_LEN = 4096

# (handle key, MoE layer) -> the OffloadedExperts module the op runs for it.
_EXPERTS: dict[tuple[int, int], nn.Module] = {}
_KEYS = itertools.count(1)
# decoder stack -> key of its experts in _EXPERTS (the same for every offload of that model: the key is a
# constant of the compiled graph), and its compiled function ((backend, graphs), function, PiecewiseBackend).
_STACK_KEYS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@torch.library.custom_op(EXPERTS_OP, mutates_args=())
def offloaded_experts(hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, key: int,
                      layer: int) -> torch.Tensor:
    """One MoE layer's experts, eagerly: the module call (its hooks, then the runtime's per-layer path)."""
    module = _EXPERTS.get((key, layer))
    if module is None:
        raise RuntimeError(f"moecache: the compiled model called MoE layer {layer} of an offload handle that "
                           "was removed; offload the model again")
    return nn.Module.__call__(module, hidden, idx, weights)


@offloaded_experts.register_fake
def _offloaded_experts_fake(hidden, idx, weights, key, layer):
    # transformers' experts return (tokens, hidden) like their input
    return hidden.new_empty(hidden.shape)


def register_experts(modules: list[nn.Module], stack: nn.Module) -> int:
    """Make ``modules`` (one ``OffloadedExperts`` per MoE layer of ``stack``, in order) callable through the op;
    returns their key."""
    key = _STACK_KEYS.get(stack)
    if key is None:
        key = _STACK_KEYS[stack] = next(_KEYS)
    for m in modules:
        _EXPERTS[(key, int(m.layer))] = m
        m.compiled_key = key
    return key


def unregister_experts(key: int) -> None:
    for k in [k for k in _EXPERTS if k[0] == key]:
        _EXPERTS.pop(k).compiled_key = None


def resolve_compile(value: Any) -> str | None:
    """``compile=`` of ``offload``: False/None -> None, True -> "inductor", or a name of ``PIECE_BACKENDS``."""
    if value is None or value is False:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in PIECE_BACKENDS:
        return value
    raise ConfigError(f"compile={value!r} is not understood: pass True (inductor) or one of "
                      f"{', '.join(PIECE_BACKENDS)}, or False")


# -- the static KV cache's size -------------------------------------------------------------------

def caches_latent(attention: nn.Module | None) -> bool:
    """Whether an MLA attention module caches its compressed latent and rotary key (``k_nope, k_pe =
    cache.update(...)``, recent transformers) rather than full per-head keys and values."""
    if attention is None:
        return False
    try:
        source = inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False
    return re.search(r"k_pe\s*=\s*\w+\.update\(", source) is not None


def kv_cache_bytes(config: Any, max_batch_size: int, max_cache_len: int, dtype: torch.dtype,
                   attention: nn.Module | None = None) -> int:
    """Bytes of a ``StaticCache`` of ``max_batch_size`` rows and ``max_cache_len`` positions, from the config:
    per attention layer keys ``(rows, kv_heads, positions, k_dim)`` and values ``(..., v_dim)``; sliding-window
    layers hold ``min(window, positions)``. MLA models (``kv_lora_rank``; ``attention``: one of its attention
    modules) cache either the latent (one head of ``kv_lora_rank`` and ``qk_rope_head_dim``) or full per-head
    keys (nope + rope dims) and values (``v_head_dim``), per the installed transformers (``caches_latent``)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    if getattr(cfg, "kv_lora_rank", None) and caches_latent(attention):
        kv_heads, k_dim, v_dim = 1, int(cfg.kv_lora_rank), int(cfg.qk_rope_head_dim)
    elif getattr(cfg, "qk_nope_head_dim", None):
        kv_heads = heads
        k_dim = int(cfg.qk_nope_head_dim) + int(cfg.qk_rope_head_dim)
        v_dim = int(cfg.v_head_dim)
    else:
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        k_dim = v_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * layers
    window = getattr(cfg, "sliding_window", None)
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for t in types[:layers]:
        n = min(int(window), max_cache_len) if (t == "sliding_attention" and window) else max_cache_len
        total += max_batch_size * kv_heads * n * (k_dim + v_dim) * elem
    return total


def allocated_kv_bytes(cache: Any) -> int:
    """Bytes the layers of a transformers cache hold now (0 before its lazy allocation)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# -- the piecewise backend ------------------------------------------------------------------------

@dataclass
class CompileStats:
    """What the compiled path did: dynamo graphs received, pieces compiled, CUDA graphs captured."""

    graphs: int = 0              # graphs dynamo handed to the backend (one per compile: batch size)
    pieces: int = 0              # pieces compiled
    experts_ops: int = 0         # experts-op boundaries in those graphs
    captures: int = 0            # CUDA graphs captured (first captures)
    recaptures: int = 0          # captures again after a fixed input moved
    replays: int = 0             # CUDA graph replays
    ungraphed: int = 0           # piece calls run without a graph (CPU, or inputs not graphable)
    compiled_calls: int = 0      # decode calls through the compiled path
    eager_calls: int = 0         # calls run eagerly (prefill, no cache)
    static_ptrs: set[int] = field(default_factory=set, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "static_ptrs"}

    def reset(self) -> None:
        """Zero the per-handle counts (a new offload reusing the compiled function); graphs and pieces stay."""
        for k in ("captures", "recaptures", "replays", "ungraphed", "compiled_calls", "eager_calls"):
            setattr(self, k, 0)


def _is_op(node: torch.fx.Node) -> bool:
    packet = torch.ops.moecache.offloaded_experts
    return node.op == "call_function" and (node.target is packet or node.target is packet.default)


_VIEWS = {"view", "reshape", "__getitem__", "select", "narrow", "transpose", "permute", "unsqueeze", "squeeze",
          "expand", "as_strided", "flatten", "unflatten", "split", "chunk"}


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _mutated_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Indices of the placeholders an in-place op (``x.op_(...)``, ``x[i] = y``) writes, directly or through a
    view."""
    import operator

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    base: dict[torch.fx.Node, int] = dict(index)
    out: set[int] = set()
    for n in gm.graph.nodes:
        if n.op not in ("call_method", "call_function") or not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        src = base.get(n.args[0])
        if src is None:
            continue
        name = _name(n.target)
        if name in _VIEWS:
            base[n] = src
        elif n.target is operator.setitem or (name.endswith("_") and not name.startswith("_")):
            out.add(src)
    return out


def _is_fixed(t: torch.Tensor, stats: CompileStats) -> bool:
    return (isinstance(t, nn.Parameter) or hasattr(t, "_dynamo_static_input_type")
            or t.data_ptr() in stats.static_ptrs)


class Piece(nn.Module):
    """One segment between experts calls: compiled on its first call, captured as a CUDA graph on its second
    (CUDA, ``graphs``), replayed after."""

    def __init__(self, gm: torch.fx.GraphModule, backend: str, graphs: bool, pool: Any, stats: CompileStats):
        super().__init__()
        # Compilers want a tuple of outputs: a piece with one output returns (x,) and is unwrapped on return.
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        self.single = not isinstance(out.args[0], (tuple, list))
        if self.single:
            out.args = ((out.args[0],),)
            gm.recompile()
        self.gm = gm
        #: Positions of inputs the piece writes in place (the KV cache): they must keep their address under a
        #: graph (a copy into a graph buffer would lose the write), whatever marks they carry.
        self.mutated = _mutated_inputs(gm)
        self.backend = backend
        self.graphs = graphs
        self.pool = pool
        self.stats = stats
        self.fn: Callable[..., Any] | None = None
        self.graph: Any = None
        self.calls = 0

    def _compile(self, args: list[Any]) -> Callable[..., Any]:
        self.stats.pieces += 1
        if self.backend == "eager":
            return self.gm
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(self.gm, args)

    def forward(self, *args: Any) -> Any:
        out = self._call(args)
        return out[0] if self.single else out

    def _call(self, args: tuple) -> Any:
        if self.fn is None:
            self.fn = self._compile(list(args))
        self.calls += 1
        if not self.graphs or self.calls == 1:  # the first call also warms the compiled code up
            self.stats.ungraphed += 1
            return self.fn(*args)
        if self.graph is None or not self._still_fixed(args):
            if not self._capture(args):
                self.stats.ungraphed += 1
                return self.fn(*args)
        for j, i in enumerate(self.copied):
            self.buffers_in[j].copy_(args[i])
        self.graph.replay()
        self.stats.replays += 1
        return self.out

    def _still_fixed(self, args: tuple) -> bool:
        return all(args[i].data_ptr() == p for i, p in self.fixed)

    def _capture(self, args: tuple) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.device.type != "cuda" for t in tensors) or len(tensors) != len(args):
            self.graphs = False  # a host tensor or a non-tensor input: this piece runs ungraphed
            return False
        again = self.graph is not None
        self.fixed = [(i, a.data_ptr()) for i, a in enumerate(args)
                      if i in self.mutated or _is_fixed(a, self.stats)]
        fixed = {i for i, _ in self.fixed}
        self.copied = [i for i in range(len(args)) if i not in fixed]
        self.buffers_in = [args[i].clone() for i in self.copied]
        inputs = list(args)
        for j, i in enumerate(self.copied):
            inputs[i] = self.buffers_in[j]
        graph = torch.cuda.CUDAGraph()
        # A capture again goes to a private pool: the shared one is only safe in first-capture order.
        pool = torch.cuda.graph_pool_handle() if again else self.pool
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=pool):
            out = self.fn(*inputs)
        self.graph, self.out = graph, out
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.stats.static_ptrs.add(t.data_ptr())
        if again:
            self.stats.recaptures += 1
        else:
            self.stats.captures += 1
        return True


class PiecewiseBackend:
    """A ``torch.compile`` backend: the graph split at every experts op, each piece a ``Piece``."""

    def __init__(self, backend: str, graphs: bool, stats: CompileStats):
        self.backend = backend
        self.graphs = graphs
        self.stats = stats
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.pieces: list[Piece] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch.fx.passes.split_module import split_module

        self.stats.graphs += 1
        part = {}
        n = 0
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if _is_op(node):
                self.stats.experts_ops += 1
                part[node] = n + 1
                n += 2
            else:
                part[node] = n
        split = split_module(gm, gm, lambda node: part[node], keep_original_order=True)
        op_parts = {v for k, v in part.items() if _is_op(k)}
        for name, sub in list(split.named_children()):
            index = int(name.rsplit("_", 1)[1])
            if index in op_parts:
                continue  # the experts op: runs eagerly between two pieces
            delattr(split, name)
            piece = Piece(sub, self.backend, self.graphs, self.pool, self.stats)
            self.pieces.append(piece)
            setattr(split, name, piece)
        if not self.graphs:
            return split

        def run(*args: Any) -> Any:
            out = split(*args)
            # The last piece's outputs live in its graph: hand the caller copies.
            return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
        return run


# -- the decoder stack's forward ----------------------------------------------------------------------

#: Tensor arguments of a decode call given dense strides before the compiled call.
_STRIDED = ("input_ids", "inputs_embeds", "position_ids", "cache_position", "attention_mask")


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    out, n = [], 1
    for d in reversed(shape):
        out.append(n)
        n *= max(1, int(d))
    return tuple(reversed(out))


def _cache_arg(forward: Callable[..., Any]) -> str:
    names = inspect.signature(forward).parameters
    return "cache" if "cache" in names else "past_key_values"  # transformers >= 5.2x says "cache"


class CompiledStack:
    """Replaces the decoder stack's ``forward``: eager prefill, compiled decode, the handle's static KV cache."""

    def __init__(self, model: nn.Module, stack: nn.Module, backend: str, device: torch.device, max_cache_len: int,
                 max_batch_size: int):
        self.model = model
        self.stack = stack
        self.device = device
        self.max_cache_len = int(max_cache_len)
        self.max_batch_size = int(max_batch_size)
        self.graphs = device.type == "cuda"
        self.original = stack.forward
        self.cache_arg = _cache_arg(self.original)
        self.takes_position = "cache_position" in inspect.signature(self.original).parameters
        # One compiled function per stack and backend, kept across offloads of the same model (a benchmark
        # offloads it again per configuration): dynamo's guards then find the graphs it already has.
        # Dynamo's entries are per code object: every model of one class (and batch size) compiled in a process
        # counts against one limit (8 by default), which a benchmark or a test session reaches.
        dcfg = torch._dynamo.config
        dcfg.recompile_limit = max(dcfg.recompile_limit, RECOMPILE_LIMIT)
        reuse = _COMPILED.get(stack)
        if reuse is not None and reuse[0] == (backend, self.graphs):
            self.compiled, self.backend = reuse[1], reuse[2]
            self.stats = self.backend.stats
            self.stats.reset()
        else:
            self.stats = CompileStats()
            self.backend = PiecewiseBackend(backend, self.graphs, self.stats)
            self.compiled = torch.compile(self.original, backend=self.backend, dynamic=False, fullgraph=True)
            _COMPILED[stack] = ((backend, self.graphs), self.compiled, self.backend)
        self.caches: dict[int, Any] = {}
        self.lengths: dict[int, int] = {}  # id(cache) -> positions filled
        # The caller's cache of the current request and the static cache standing in for it: generate passes
        # back the cache the output returned (ours), a replay loop may pass its own on every step.
        self._adopted: tuple[Any, Any] | None = None
        stack.forward = self.forward  # an instance attribute: Module.__call__ (and its hooks) stay eager

    def continues(self, cache: Any) -> bool:
        """Whether a call with ``cache`` continues the current request (our cache, or the caller's one we adopted)."""
        if cache is None:
            return False
        if self._adopted is not None and cache is self._adopted[0]():
            return True
        return any(cache is c for c in self.caches.values())

    def remove(self) -> None:
        if self.stack.__dict__.get("forward") == self.forward:
            del self.stack.forward
        self.caches.clear()

    def cache_for(self, batch: int) -> Any:
        """The static KV cache of ``batch`` rows (made on first use; emptied for a new request by the caller)."""
        cache = self.caches.get(batch)
        if cache is None:
            if batch > self.max_batch_size:
                raise ConfigError(f"a batch of {batch} rows exceeds max_batch_size={self.max_batch_size} of this "
                                  "compiled offload; offload with compile=True, max_batch_size>=" f"{batch}")
            held = sum(self.caches)
            if held + batch > self.max_batch_size:  # the budget holds max_batch_size rows: drop older caches
                self.caches.clear()
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self.caches[batch] = cache
        return cache

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        if not use_cache or x is None:
            self.stats.eager_calls += 1
            return self.original(*args, **kwargs)
        rows, tokens = int(x.shape[0]), int(x.shape[1])
        cache = kwargs.get(self.cache_arg)
        first = False
        if cache is not None and self._adopted is not None and cache is self._adopted[0]():
            cache = self._adopted[1]  # the caller passes its own (empty) cache on every step: continue ours
            kwargs[self.cache_arg] = cache
        if cache is not None and any(cache is c for c in self.caches.values()):
            # Positions counted on the host: asking the cache its length would sync with the device.
            length = self.lengths.get(id(cache), 0) + tokens
            if length > self.max_cache_len:
                raise ConfigError(f"the sequence outgrew the static KV cache of {self.max_cache_len} positions; "
                                  f"offload with compile=True, max_cache_len>={length}")
            self.lengths[id(cache)] = length
        else:
            if cache is not None and int(cache.get_seq_length()) > 0:
                raise ConfigError("a compiled offload keeps its own static KV cache: start each request with no "
                                  "cache or an empty one (as generate does), not a filled one")
            if tokens > self.max_cache_len:
                raise ConfigError(f"a prompt of {tokens} tokens does not fit the static KV cache of "
                                  f"{self.max_cache_len} positions; offload with compile=True, max_cache_len>={tokens}")
            foreign = cache
            cache = self.cache_for(rows)
            cache.reset()
            self.lengths[id(cache)] = tokens
            kwargs[self.cache_arg] = cache
            self._adopted = None if foreign is None else (weakref.ref(foreign), cache)
            first = True
        if tokens > 1 or first:  # a request's first call is its prefill, even of one token: eager (it also
            # allocates the cache's tensors on first use, which must not happen inside a graph)
            self.stats.eager_calls += 1
            return self.original(*args, **kwargs)
        for name in _STRIDED:  # dynamo guards strides: a slice of a longer tensor would recompile
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.stride() != _dense_strides(t.shape):
                kwargs[name] = t.new_empty(t.shape).copy_(t)
        if self.takes_position and kwargs.get("cache_position") is None:
            # transformers <= 5.1x would derive it from the cache's length, a data-dependent value in a graph
            n = self.lengths[id(cache)]
            kwargs["cache_position"] = torch.arange(n - 1, n, device=x.device)
        self.stats.compiled_calls += 1
        return self.compiled(*args, **kwargs)


__all__ = ["CompiledStack", "PiecewiseBackend", "Piece", "CompileStats", "EXPERTS_OP", "PIECE_BACKENDS",
           "DEFAULT_MAX_CACHE_LEN", "kv_cache_bytes", "allocated_kv_bytes", "register_experts",
           "unregister_experts", "resolve_compile"]
