"""The modules that replace each MoE block's ``experts``, and the kernels that run them on the slot pool.

How a family's experts run is its *kernel* (``EXPERT_KERNELS``, named by the family table's
``ExpertLayout.kernel``).

``transformers``: the experts classes built with transformers' ``use_experts_implementation``.
Their backends (``integrations/moe.py``: ``grouped_mm``, ``batched_mm``, and the class's own eager
loop) are functions of ``self`` that read ``self.gate_up_proj``, ``self.down_proj``,
``self.num_experts``, the layout flags, ``self.act_fn`` and ``self._apply_gate``. A *shell* is a
fresh instance of the original experts class that shares every attribute of the original except
the expert weights, which are replaced:

* ``remap`` shell (``grouped_mm``, ``batched_mm`` and other tensor backends): the weights are the
  pool's strided views ``(num_slots, ...)`` and ``num_experts = num_slots``; the runtime passes slot
  ids instead of expert ids. Each (token, k) pair meets the same weights and the backend sums the
  top-k in (token, k) order as before, so outputs are bit-identical.
* ``indexer`` shell (the eager loop): eager accumulates experts in the order of their ids, so the
  ids are left alone and each weight is a ``SlotIndexer`` that maps ``weight[e]`` to the view of the
  slot holding expert ``e``. Same order, same sums.

Which shell a call uses follows ``config._experts_implementation`` at call time (``EXPERT_CALLS``).

Family kernels (``llama4``, ``dbrx``, ``switch``): experts modules with their own call contract and
storage. The replacement (``OffloadedFamilyExperts``) takes the original's arguments, reads the
routing through the family's capture (``moecache.families.CAPTURES``: the experts' own arguments,
or a hook on the router for Llama 4, whose experts never see ids), and hands the runtime a
``LayerCall`` that computes the layer *expert by expert, in the module's own order* (expert ids
ascending), each expert with the original module's math on the pool views of its slot:

* ``llama4`` (``Llama4TextExperts``): the experts receive every expert's copy of the tokens already
  scaled by the router score, ``(E * T, H)``, and return ``(E * T, H)`` that the block sums over
  experts. Each needed expert runs ``Llama4TextExperts.forward`` itself (a shell holding that one
  expert: the same ``bmm``, ``chunk``, activation, ``bmm`` on the same ``(T, H)`` rows); the rows of
  experts no token chose stay zero, as the original computes them from zero inputs.
* ``dbrx`` (``DbrxExperts``): its loop, expert by expert: ``DbrxExpertGLU.forward`` on the tokens
  that chose the expert (in ``torch.where`` order: top-k position, then token), times their
  weights, ``index_add_`` into one accumulator.
* ``switch`` (``SwitchTransformersExperts``): its loop: the expert module (a shell of
  ``SwitchTransformersDenseActDense``) on the expert's tokens, times the router probability after,
  ``index_add_`` into zeros. Tokens dropped over capacity (id -2) take no expert and stay zero.

Because each expert's contribution is added in the same order whether the layer's experts are all
resident or stream through the pool in chunks of that order (the runtime's rounds), the family
kernels give the unpatched module's output bit for bit at every budget. They add no host
synchronisation to the runtime's one per layer: the tokens of each expert are found on the host
from the ids the runtime already copied there, and reach the device in one non-blocking copy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..families import CAPTURES, Capture
from ..registry import Registry
from ..trace.schema import ID_DROPPED


class SlotIndexer:
    """Stands in for one stacked weight ``(num_experts, ...)`` in the eager experts loop.

    ``indexer[e]`` returns the pool view of the slot that holds expert ``e`` of this layer (a view,
    no copy); ``lut`` is the layer's live expert -> slot table (-1 = not resident). A tensor index
    with more than one element is looked up on the host (one sync; only the eager path does it).
    """

    def __init__(self, view: torch.Tensor, lut: np.ndarray, num_experts: int):
        self.view = view
        self.lut = lut
        self.num_experts = num_experts

    def _slot(self, e: int) -> int:
        s = int(self.lut[e])
        if s < 0:
            raise RuntimeError(f"moecache internal error: expert {e} is not resident when the kernel reads it")
        return s

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, torch.Tensor) and idx.numel() != 1:
            # eager's per-expert loop never does this; kept so that other readers stay correct
            slots = self.lut[idx.detach().cpu().numpy()]
            if (slots < 0).any():
                raise RuntimeError("moecache internal error: a non-resident expert was indexed")
            return self.view[torch.from_numpy(slots).to(self.view.device)]
        # A 0-d or 1-element index: the eager loop's expert id (it already synced to iterate).
        return self.view[self._slot(int(idx))]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, *self.view.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.view.dtype

    @property
    def device(self) -> torch.device:
        return self.view.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]


def _clone(module: nn.Module, drop: Sequence[str] = ()) -> nn.Module:
    """A new instance of ``type(module)`` sharing its attributes, children, buffers and parameters
    (except ``drop``), with hooks of its own (none)."""
    cls = type(module)
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    for key, value in module.__dict__.items():
        if key not in shell.__dict__:
            shell.__dict__[key] = value
    shell._modules = dict(module._modules)
    shell._buffers = dict(module._buffers)
    shell._parameters = {k: v for k, v in module._parameters.items() if k not in drop}
    shell.training = module.training  # Module.__init__ set its own
    return shell


def make_shell(original: nn.Module, weights: dict[str, Any], num_experts: int) -> nn.Module:
    """A new instance of ``type(original)`` sharing its attributes and children, with ``weights``
    (name -> tensor or ``SlotIndexer``) in place of the expert parameters and ``num_experts`` set.

    The shell owns no parameters: ``state_dict()`` and ``model.to()`` never see the pool through it.
    """
    shell = _clone(original, drop=tuple(original._parameters))  # shared children (act_fn, norms)
    for name, w in weights.items():
        shell.__dict__[name] = w
    shell.__dict__["num_experts"] = num_experts
    return shell


#: How a call with a given ``_experts_implementation`` runs: "remap" (slot ids + pool views) or
#: "indexer" (expert ids + ``SlotIndexer`` weights). Names not listed use "remap".
EXPERT_CALLS: Registry[str] = Registry("experts call mode")
EXPERT_CALLS.register("eager", "the class's own loop sums experts in id order: keep ids, index slots")("indexer")
EXPERT_CALLS.register("grouped_mm", "sorted grouped GEMM over the pool's slots")("remap")
EXPERT_CALLS.register("batched_mm", "per-pair batched GEMM gathering slot weights")("remap")


def call_mode(implementation: str | None) -> str:
    impl = implementation or "eager"
    return EXPERT_CALLS.get(impl) if impl in EXPERT_CALLS else "remap"


def _experts_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0], values[1], values[2]


class OffloadedExperts(nn.Module):
    """Replaces a MoE block's ``experts``: hands each call to the runtime for its layer.

    Same call contract as transformers' experts modules: ``(hidden_states, top_k_index,
    top_k_weights) -> (tokens, hidden)``. Owns no parameters and no buffers.
    """

    def __init__(self, run: Callable[..., torch.Tensor], layer: int, original_class: str, num_experts: int):
        super().__init__()
        object.__setattr__(self, "_run", run)  # not a submodule: the runtime is not part of the model tree
        self.layer = layer
        self.original_class = original_class
        self.num_experts = num_experts
        #: Set by ``moecache.runtime.compiled.register_experts`` under ``offload(..., compile=True)``.
        self.compiled_key: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Inside a torch.compile trace the call is one opaque op (``moecache::offloaded_experts``): the graph
        # is split there, and at run time the op makes this very module call eagerly (hooks included).
        if self.compiled_key is not None and torch.compiler.is_compiling():
            hidden, idx, weights = _experts_args(args, kwargs)
            return torch.ops.moecache.offloaded_experts(hidden, idx, weights, self.compiled_key, self.layer)
        return super().__call__(*args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._run(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"moe_layer={self.layer}, replaces={self.original_class}, experts={self.num_experts}"


# -- kernels: how one family's experts run on the pool ------------------------------------------------

@dataclass
class Attached:
    """What a kernel puts in place of one MoE block's experts: the replacement module, the shells the
    runtime's transformers path calls (None for a family kernel) and the hooks it registered."""

    module: nn.Module
    remap_shell: nn.Module | None = None
    indexer_shell: nn.Module | None = None
    hooks: list[Any] = field(default_factory=list)


def _check_floating(experts: nn.Module, family: str) -> None:
    dtypes = sorted({str(p.dtype) for p in experts.parameters()})
    if any(not p.dtype.is_floating_point for p in experts.parameters()):
        raise UnsupportedModelError(
            f"{family} experts class {type(experts).__name__} is not supported by the offloading runtime: its "
            f"expert weights are quantised ({', '.join(dtypes)}); load the model dequantised, e.g. in bf16")


class ExpertsKernel:
    """How the runtime runs one family's experts module on the slot pool (an entry of ``EXPERT_KERNELS``)."""

    @classmethod
    def check(cls, experts: nn.Module, family: str) -> None:
        """Raise ``UnsupportedModelError`` (naming the problem and the fix) if this kernel cannot run ``experts``."""
        raise NotImplementedError

    @classmethod
    def attach(cls, runtime: Any, layer: int, block: Any, adapter: Any, lut: np.ndarray) -> Attached:
        """Build the replacement of ``block.experts`` (a ``moecache.families.MoeBlock``) for MoE layer ``layer``
        of ``runtime`` (a ``moecache.runtime.core.Runtime``); ``lut`` is the layer's live expert -> slot table."""
        raise NotImplementedError


EXPERT_KERNELS: Registry[type[ExpertsKernel]] = Registry("experts kernel")


@EXPERT_KERNELS.register("transformers", "transformers' own experts kernels on the pool through shells")
class TransformersKernel(ExpertsKernel):
    @classmethod
    def check(cls, experts: nn.Module, family: str) -> None:
        _check_floating(experts, family)
        if not hasattr(experts, "has_gate"):  # set on classes built with use_experts_implementation
            raise UnsupportedModelError(
                f"{family} experts class {type(experts).__name__} is not supported by the offloading runtime: it "
                "is not built with transformers' use_experts_implementation, which the 'transformers' kernel runs "
                "on the pool; its family needs a kernel of its own in moecache.runtime.experts.EXPERT_KERNELS")

    @classmethod
    def attach(cls, runtime: Any, layer: int, block: Any, adapter: Any, lut: np.ndarray) -> Attached:
        if runtime.expander is not None:
            lut = runtime.expander.lut  # expert -> dense compute slot, filled before each kernel call
        remap, indexer = runtime.build_shells(block.experts, runtime.compute_pool, lut, runtime.E)
        return Attached(OffloadedExperts(runtime.run_layer, layer, type(block.experts).__name__, runtime.E),
                        remap, indexer)


# -- family kernels -----------------------------------------------------------------------------------

class BoundShell:
    """A shell of ``module`` whose parameters at dotted ``paths`` are rebound by ``bind`` before each call,
    so that the module's own ``forward`` runs on other tensors (one expert's pool views). The original
    module and its children are never modified."""

    def __init__(self, module: nn.Module, paths: Sequence[str]):
        self.module, self._targets = self._shell(module, [p.split(".") for p in paths])

    @classmethod
    def _shell(cls, module: nn.Module, paths: list[list[str]]) -> tuple[nn.Module, list[tuple[nn.Module, str]]]:
        leaves = [p[0] for p in paths if len(p) == 1]
        shell = _clone(module, leaves)
        where: dict[tuple[str, ...], tuple[nn.Module, str]] = {(p[0],): (shell, p[0]) for p in paths if len(p) == 1}
        for child in dict.fromkeys(p[0] for p in paths if len(p) > 1):
            sub = [p[1:] for p in paths if len(p) > 1 and p[0] == child]
            child_shell, targets = cls._shell(module._modules[child], sub)
            shell._modules[child] = child_shell
            for path, target in zip(sub, targets):
                where[(child, *path)] = target
        return shell, [where[tuple(p)] for p in paths]

    def bind(self, tensors: Sequence[torch.Tensor]) -> nn.Module:
        for (owner, attr), t in zip(self._targets, tensors):
            owner.__dict__[attr] = t
        return self.module


class LayerCall:
    """One MoE layer call under a family kernel.

    The runtime reads ``hidden`` (the layer's ``(tokens, hidden)`` input, for predictors), ``idx`` and
    ``weights`` (``(tokens, k)`` routing), then calls ``run`` once per chunk of resident experts
    (expert ids ascending, with their slots) and ``finish`` for the output the block expects.
    """

    #: Whether the routing may hold ``ID_DROPPED`` (a token that takes no expert).
    drops = False

    def __init__(self, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        self.hidden = hidden
        self.idx = idx
        self.weights = weights

    def routed(self, experts: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
        """The distinct experts (sorted) and their counts without ids that mean "no expert"."""
        if self.drops and experts and experts[0] == ID_DROPPED:
            return experts[1:], counts[1:]
        return experts, counts

    def run(self, ids: np.ndarray, experts: list[int], slots: list[int]) -> None:
        raise NotImplementedError

    def finish(self) -> torch.Tensor:
        raise NotImplementedError


def _positions(ids: np.ndarray, experts: list[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each expert, ``(top-k positions, tokens)`` that chose it, in ``torch.where(mask[e])`` order over a
    ``(k, tokens)`` mask (position first, then token), as device index tensors; one host -> device copy."""
    kk, tt, bounds = [], [], [0]
    by_position = ids.T
    for e in experts:
        k_e, t_e = np.nonzero(by_position == e)
        kk.append(k_e)
        tt.append(t_e)
        bounds.append(bounds[-1] + len(t_e))
    both = torch.from_numpy(np.stack([np.concatenate(kk), np.concatenate(tt)]).astype(np.int64))
    # Pageable host -> device copy of a few ints: staged at once by the driver, no sync.
    both = both.to(device, non_blocking=True)
    return [(both[0, a:b], both[1, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class FamilyKernel(ExpertsKernel):
    """Base of the family kernels: one instance per MoE layer, holding the shells and pool views it needs."""

    #: The transformers experts class whose ``forward`` the kernel mirrors.
    experts_class = ""

    def __init__(self, original: nn.Module, pool: Any, num_experts: int):
        self.original = original
        self.num_experts = num_experts
        self.views = [pool.views[k.name] for k in pool.layout.kinds]

    @classmethod
    def check(cls, experts: nn.Module, family: str) -> None:
        _check_floating(experts, family)
        if type(experts).__name__ != cls.experts_class:
            raise UnsupportedModelError(
                f"{family} experts class {type(experts).__name__} is not supported by the offloading runtime: the "
                f"{family} kernel runs the math of {cls.experts_class}.forward and would not match this module's; "
                "offload the model with its transformers experts classes (no custom or hub kernels)")

    @classmethod
    def attach(cls, runtime: Any, layer: int, block: Any, adapter: Any, lut: np.ndarray) -> Attached:
        kernel = cls(block.experts, runtime.pool, runtime.E)
        module = OffloadedFamilyExperts(runtime.run_layer, layer, kernel, CAPTURES.get(adapter.capture), runtime.E)
        hooks = []
        if module.capture.target == "router":
            hooks.append(block.router.register_forward_hook(module.on_router, with_kwargs=True))
        return Attached(module, None, None, hooks)

    def begin(self, inputs: tuple, hidden: torch.Tensor | None, idx: torch.Tensor, weights: torch.Tensor) -> LayerCall:
        """A ``LayerCall`` for the experts' positional ``inputs`` and the captured routing (``hidden``: the
        router's input where the routing was read from the router)."""
        raise NotImplementedError


@EXPERT_KERNELS.register("llama4", "Llama4TextExperts: input-scaled tokens, one bmm per needed expert")
class Llama4Kernel(FamilyKernel):
    experts_class = "Llama4TextExperts"

    def __init__(self, original: nn.Module, pool: Any, num_experts: int):
        super().__init__(original, pool, num_experts)
        self.names = [k.name for k in pool.layout.kinds]  # gate_up_proj, down_proj
        self.shell = BoundShell(original, self.names)

    def begin(self, inputs, hidden, idx, weights):
        return _Llama4Call(self, inputs[0], hidden, idx, weights)


class _Llama4Call(LayerCall):
    def __init__(self, kernel: Llama4Kernel, routed_in: torch.Tensor, hidden: torch.Tensor, idx: torch.Tensor,
                 weights: torch.Tensor):
        super().__init__(hidden, idx, weights)
        self.kernel = kernel
        # (E, T, H): expert e's copy of the tokens, scaled by its score (zero where e was not chosen).
        self.x = routed_in.view(kernel.num_experts, -1, routed_in.shape[-1])
        self.out = torch.zeros_like(self.x)

    def run(self, ids, experts, slots):
        k = self.kernel
        for e, s in zip(experts, slots):
            # Llama4TextExperts.forward with one expert: (1, T, H) bmm (1, H, 2I), chunk, act, bmm (1, I, H).
            shell = k.shell.bind([v[s:s + 1] for v in k.views])
            self.out[e] = shell(self.x[e])

    def finish(self):
        return self.out.view(-1, self.out.shape[-1])


@EXPERT_KERNELS.register("dbrx", "DbrxExperts: its per-expert loop over flat w1/v1/w2, index_add_ in id order")
class DbrxKernel(FamilyKernel):
    experts_class = "DbrxExperts"

    def __init__(self, original: nn.Module, pool: Any, num_experts: int):
        super().__init__(original, pool, num_experts)
        # DbrxExpertGLU.forward(x, w1, v1, w2) reads only its activation: the original (weights released) runs.
        self.mlp = original.mlp
        order = {k.name: i for i, k in enumerate(pool.layout.kinds)}
        self.w1, self.v1, self.w2 = (self.views[order[n]] for n in ("mlp.w1", "mlp.v1", "mlp.w2"))

    def begin(self, inputs, hidden, idx, weights):
        return _DbrxCall(self, inputs[0], idx, weights)


class _DbrxCall(LayerCall):
    def __init__(self, kernel: DbrxKernel, hidden_states: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        self.batch = hidden_states.shape[0]
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        super().__init__(flat, idx, weights)
        self.kernel = kernel
        self.out = torch.zeros_like(flat)

    def run(self, ids, experts, slots):
        k = self.kernel
        h = self.hidden.shape[-1]
        for (pos, tok), s in zip(_positions(ids, experts, self.hidden.device), slots):
            states = k.mlp(self.hidden[tok], k.w1[s], k.v1[s], k.w2[s])
            states = states.view(-1, h) * self.weights[tok, pos, None]
            self.out.index_add_(0, tok, states)

    def finish(self):
        return self.out.view(self.batch, -1, self.out.shape[-1])


def _split_template(template: str) -> tuple[str, str]:
    """``"expert_{e}.wi.weight"`` -> ``("expert_{e}", "wi.weight")``: the expert module and the path in it."""
    parts = template.split(".")
    at = next(i for i, p in enumerate(parts) if "{e}" in p)
    return ".".join(parts[:at + 1]), ".".join(parts[at + 1:])


@EXPERT_KERNELS.register("switch", "SwitchTransformersExperts: expert modules on their tokens, probability after")
class SwitchKernel(FamilyKernel):
    experts_class = "SwitchTransformersExperts"

    def __init__(self, original: nn.Module, pool: Any, num_experts: int):
        super().__init__(original, pool, num_experts)
        split = [_split_template(k.name) for k in pool.layout.kinds]
        prefixes = {p for p, _ in split}
        if len(prefixes) != 1:
            raise UnsupportedModelError(f"expert weight templates {[k.name for k in pool.layout.kinds]} name more "
                                        "than one module per expert")
        template = original.get_submodule(prefixes.pop().format(e=0))  # every expert is the same module class
        self.shell = BoundShell(template, [rel for _, rel in split])

    def begin(self, inputs, hidden, idx, weights):
        return _SwitchCall(self, inputs[0], inputs[2], idx, weights)


class _SwitchCall(LayerCall):
    drops = True

    def __init__(self, kernel: SwitchKernel, hidden: torch.Tensor, routing_weights: torch.Tensor,
                 idx: torch.Tensor, weights: torch.Tensor):
        super().__init__(hidden, idx, weights)
        self.kernel = kernel
        self.routing_weights = routing_weights.reshape(idx.shape)  # (tokens, k) as the experts index it
        self.out = torch.zeros_like(hidden)

    def run(self, ids, experts, slots):
        k = self.kernel
        for (pos, tok), s in zip(_positions(ids, experts, self.hidden.device), slots):
            expert = k.shell.bind([v[s] for v in k.views])
            current = self.hidden[None, tok].reshape(-1, self.hidden.shape[-1])
            states = expert(current) * self.routing_weights[tok, pos, None]
            self.out.index_add_(0, tok, states.to(self.hidden.dtype))

    def finish(self):
        return self.out


class OffloadedFamilyExperts(nn.Module):
    """Replaces the experts of a family kernel's MoE block: same arguments as the original module, routing
    read through the family's capture, the layer handed to the runtime with a ``LayerCall``.

    Owns no parameters and no buffers; the original module and the kernel are not children.
    """

    def __init__(self, run: Callable[..., torch.Tensor], layer: int, kernel: FamilyKernel, capture: Capture,
                 num_experts: int):
        super().__init__()
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "capture", capture)
        self.layer = layer
        self.original_class = type(kernel.original).__name__
        self.num_experts = num_experts
        self._signature = inspect.signature(type(kernel.original).forward)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_router(self, router: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook on the block's router (captures that read the router): keep its input and routing."""
        ids, weights = self.capture.fn(router, args, kwargs, output)
        hidden = args[0] if args else next(iter(kwargs.values()))
        self._pending = (hidden, ids, weights)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        inputs = args if not kwargs else self._signature.bind(self.kernel.original, *args, **kwargs).args[1:]
        if self.capture.target == "router":
            if self._pending is None:
                raise RuntimeError(f"moecache: MoE layer {self.layer}'s experts ran without its router (the routing "
                                   "is read from the router's forward); call the MoE block, not its experts")
            hidden, idx, weights = self._pending
            self._pending = None
        else:
            hidden = None
            idx, weights = self.capture.fn(self.kernel.original, inputs, {}, None)
        call = self.kernel.begin(inputs, hidden, idx, weights)
        return self._run(self.layer, call.hidden, call.idx, call.weights, call)

    def extra_repr(self) -> str:
        return f"moe_layer={self.layer}, replaces={self.original_class}, experts={self.num_experts}"
