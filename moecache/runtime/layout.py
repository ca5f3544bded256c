"""Where each weight of one expert sits inside a slot: the layout shared by the host store and the pool.

A slot holds *all* of one expert's weights, contiguously, so that one copy moves one expert. How an
experts module stores those weights is its *storage* (``STORAGES``, named by the family table's
``ExpertLayout.storage``):

* ``stacked``: each weight kind is one tensor ``(num_experts, *shape)`` (transformers' experts
  modules: ``gate_up_proj``, ``down_proj``, optional ``*_bias`` ...; Llama 4's experts);
* ``flat``: each kind is a 2-D parameter of ``num_experts * rows`` rows, expert ``e`` owning rows
  ``[e*rows, (e+1)*rows)`` (DBRX's ``mlp.w1``, ``mlp.v1``, ``mlp.w2``);
* ``modules``: one submodule per expert; each kind is a parameter path template with ``{e}``
  (Switch Transformers' ``expert_{e}.wi.weight``).

Whatever the storage, a kind has a per-expert ``shape``. The layout puts kind ``i`` at element
offset ``offset_i`` of the slot, each offset rounded up to ``ALIGN_BYTES`` so that every per-kind
view starts 16-byte aligned (``grouped_mm`` needs it) and the slot stride itself is a multiple of
``ALIGN_BYTES``::

    slot = [kind 0 | pad | kind 1 | pad | ...]          slot_numel = align(sum)

``views(flat)`` turns a ``(n, slot_numel)`` buffer into per-kind strided views ``(n, *shape)``
whose stride along the expert dimension is ``slot_numel``: exactly what the transformers experts
kernels index with ``weight[expert_ids]`` or hand to ``grouped_mm``. ``param_refs`` names the
module parameters that hold each kind, which is all that packing, releasing and restoring an
experts module needs to know about its storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import UnsupportedModelError
from ..registry import Registry

#: Alignment of every kind's offset and of the slot stride, in bytes.
ALIGN_BYTES = 256


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class WeightKind:
    """One weight of an expert: ``name`` (the storage's name for it), per-expert ``shape``."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, from the start of the slot
    numel: int


@dataclass(frozen=True)
class ParamRef:
    """One parameter of an experts module that holds expert weights.

    ``owner._parameters[attr]`` is the parameter. It holds kind ``kind`` of every expert
    (``expert`` None: stacked or flat storage, shape ``(E, *shape)`` or ``(E * rows, cols)``) or of
    expert ``expert`` only (modules storage).
    """

    owner: torch.nn.Module
    attr: str
    kind: str
    expert: int | None

    @property
    def param(self) -> torch.Tensor:
        return self.owner._parameters[self.attr]

    def target(self, views: dict[str, torch.Tensor]) -> torch.Tensor:
        """The part of per-kind ``(E, *shape)`` views (host store or pool) this parameter corresponds to."""
        view = views[self.kind]
        return view if self.expert is None else view[self.expert]


def _param_at(module: torch.nn.Module, path: str, where: str) -> tuple[torch.nn.Module, str, torch.Tensor]:
    """``(owner module, attribute, parameter)`` of the dotted parameter ``path`` under ``module``."""
    head, _, attr = path.rpartition(".")
    try:
        owner = module.get_submodule(head) if head else module
    except AttributeError:
        owner = None
    p = None if owner is None else owner._parameters.get(attr)
    if p is None:
        raise UnsupportedModelError(f"{where} ({type(module).__name__}) has no parameter {path!r}; the family "
                                    "table's ExpertLayout.params do not match this experts module")
    return owner, attr, p


#: One kind as a storage reports it: (name, per-expert shape, dtype).
KindSpec = tuple[str, tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class Storage:
    """How one storage finds an experts module's expert weights (see the module docstring).

    ``kinds(experts, params, num_experts, where)`` lists the kinds (``params``: the family table's
    ``ExpertLayout.params``); ``refs(experts, kind_names, num_experts, where)`` the parameters that
    hold them.
    """

    kinds: Callable[[torch.nn.Module, tuple[str, ...], int, str], list[KindSpec]]
    refs: Callable[[torch.nn.Module, tuple[str, ...], int, str], list[ParamRef]]


STORAGES: Registry[Storage] = Registry("expert storage")


def _stacked_kinds(experts: torch.nn.Module, params: tuple[str, ...], num_experts: int, where: str) -> list[KindSpec]:
    # Every direct parameter whose first dimension is the expert count (biases included), whatever
    # the family table lists: transformers' experts classes differ in which ones they carry.
    return [(n, tuple(int(x) for x in p.shape[1:]), p.dtype) for n, p in experts.named_parameters(recurse=False)
            if p.dim() >= 1 and p.shape[0] == num_experts]


def _whole_refs(experts: torch.nn.Module, names: tuple[str, ...], num_experts: int, where: str) -> list[ParamRef]:
    return [ParamRef(*_param_at(experts, n, where)[:2], n, None) for n in names]


def _flat_kinds(experts: torch.nn.Module, params: tuple[str, ...], num_experts: int, where: str) -> list[KindSpec]:
    out = []
    for name in params:
        p = _param_at(experts, name, where)[2]
        if p.dim() != 2 or p.shape[0] % num_experts:
            raise UnsupportedModelError(
                f"{where}: {name} has shape {tuple(p.shape)}, not ({num_experts} x rows, cols): the flat storage "
                "needs every expert to own an equal block of rows")
        out.append((name, (int(p.shape[0]) // num_experts, int(p.shape[1])), p.dtype))
    return out


def _module_kinds(experts: torch.nn.Module, params: tuple[str, ...], num_experts: int, where: str) -> list[KindSpec]:
    out = []
    for template in params:
        first = _param_at(experts, template.format(e=0), where)[2]
        for e in range(1, num_experts):
            p = _param_at(experts, template.format(e=e), where)[2]
            if p.shape != first.shape or p.dtype != first.dtype:
                raise UnsupportedModelError(f"{where}: {template.format(e=e)} differs from expert 0's in shape or "
                                            "dtype; moecache needs every expert to have the same weights")
        out.append((template, tuple(int(x) for x in first.shape), first.dtype))
    return out


def _module_refs(experts: torch.nn.Module, names: tuple[str, ...], num_experts: int, where: str) -> list[ParamRef]:
    return [ParamRef(*_param_at(experts, t.format(e=e), where)[:2], t, e) for t in names for e in range(num_experts)]


STORAGES.register("stacked", "one (num_experts, ...) tensor per weight kind")(Storage(_stacked_kinds, _whole_refs))
STORAGES.register("flat", "2-D parameters of num_experts x rows rows; expert e owns a block of rows")(
    Storage(_flat_kinds, _whole_refs))
STORAGES.register("modules", "one submodule per expert; kinds are parameter path templates with {e}")(
    Storage(_module_kinds, _module_refs))

#: What ``SlotLayout.release`` keeps of each parameter: (shape, dtype, device, requires_grad).
ParamInfo = tuple[torch.Size, torch.dtype, torch.device, bool]


@dataclass(frozen=True)
class SlotLayout:
    """The per-expert byte layout used by every slot of the pool and every row of the host store."""

    kinds: tuple[WeightKind, ...]
    dtype: torch.dtype
    slot_numel: int
    storage: str = "stacked"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def slot_bytes(self) -> int:
        return self.slot_numel * self.element_size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kinds)

    @classmethod
    def from_module(cls, experts: torch.nn.Module, num_experts: int, where: str = "experts",
                    spec: Any = None) -> "SlotLayout":
        """The layout of ``experts``, read as ``spec`` (the family's ``ExpertLayout``; None: stacked) says
        its weights are stored.

        Raises ``UnsupportedModelError`` when the module has no such parameters, when they differ in
        dtype, or when a dtype is not floating point (e.g. quantised MXFP4 blocks).
        """
        storage = getattr(spec, "storage", "stacked")
        found = STORAGES.get(storage).kinds(experts, tuple(getattr(spec, "params", ())), num_experts, where)
        if not found:
            raise UnsupportedModelError(
                f"{where} ({type(experts).__name__}) has no stacked expert weights of shape "
                f"({num_experts}, ...); moecache only offloads transformers experts modules that store "
                "each weight as one (num_experts, ...) tensor, and the layouts of moecache.families")
        dtypes = {d for _, _, d in found}
        if len(dtypes) != 1:
            raise UnsupportedModelError(
                f"{where}: expert weights mix dtypes {sorted(str(d) for d in dtypes)}; cast the model to one "
                "dtype (e.g. model.to(torch.bfloat16)) before offloading")
        dtype = dtypes.pop()
        if not dtype.is_floating_point:
            raise UnsupportedModelError(
                f"{where}: expert weights have dtype {dtype} (quantised?); moecache needs floating-point "
                "experts: load the model dequantised (e.g. bf16)")
        elem = torch.empty((), dtype=dtype).element_size()
        step = ALIGN_BYTES // elem
        kinds, offset = [], 0
        for name, shape, _ in found:
            numel = 1
            for x in shape:
                numel *= x
            kinds.append(WeightKind(name, shape, offset, numel))
            offset = _align(offset + numel, step)
        return cls(tuple(kinds), dtype, max(offset, step), storage)

    def check_same(self, other: "SlotLayout", where: str) -> None:
        """All MoE layers share one pool, so their experts must have one layout."""
        if other != self:
            raise UnsupportedModelError(
                f"{where}: expert weights differ from the first MoE layer's ({other.kinds} vs {self.kinds}); "
                "moecache needs every MoE layer's experts to have the same shapes and dtype")

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-kind views ``(n, *shape)`` over a ``(n, slot_numel)`` buffer (no copy)."""
        if flat.dim() != 2 or flat.shape[1] != self.slot_numel or flat.dtype != self.dtype:
            raise ValueError(f"expected a ({'n'}, {self.slot_numel}) {self.dtype} buffer, got "
                             f"{tuple(flat.shape)} {flat.dtype}")
        n = flat.shape[0]
        return {k.name: flat[:, k.offset:k.offset + k.numel].view(n, *k.shape) for k in self.kinds}

    # -- the experts module's own parameters ---------------------------------------------------------
    def param_refs(self, experts: torch.nn.Module, num_experts: int, where: str = "experts") -> list[ParamRef]:
        """Every parameter of ``experts`` that holds expert weights of this layout."""
        return STORAGES.get(self.storage).refs(experts, self.names, num_experts, where)

    @torch.no_grad()
    def pack(self, experts: torch.nn.Module, num_experts: int, views: dict[str, torch.Tensor]) -> None:
        """Copy the expert weights of ``experts`` (on any device) into per-kind ``(E, *shape)`` ``views``."""
        for ref in self.param_refs(experts, num_experts):
            dst = ref.target(views)
            dst.copy_(ref.param.detach().reshape(dst.shape))

    def release(self, experts: torch.nn.Module, num_experts: int) -> list[ParamInfo]:
        """Replace every expert parameter of ``experts`` by a shape-only stand-in on the meta device
        (the module stays printable; the storage is freed once nothing else holds it). Returns what
        ``restore`` needs, in ``param_refs`` order."""
        saved = []
        for ref in self.param_refs(experts, num_experts):
            p = ref.param
            saved.append((p.shape, p.dtype, p.device, p.requires_grad))
            ref.owner._parameters[ref.attr] = torch.nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        return saved

    @torch.no_grad()
    def restore(self, experts: torch.nn.Module, num_experts: int, views: dict[str, torch.Tensor],
                saved: list[ParamInfo]) -> None:
        """Put real parameters back into ``experts`` from ``views`` (the host store's), each on the device
        it came from (the CPU for one that was on the meta device, i.e. never loaded)."""
        for ref, (shape, dtype, device, requires_grad) in zip(self.param_refs(experts, num_experts), saved):
            dev = torch.device("cpu") if device.type == "meta" else device
            value = ref.target(views).to(device=dev, dtype=dtype, copy=True).reshape(shape)
            ref.owner._parameters[ref.attr] = torch.nn.Parameter(value, requires_grad=requires_grad)

    def describe(self) -> dict[str, object]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "slot_bytes": self.slot_bytes,
                "kinds": {k.name: list(k.shape) for k in self.kinds}}
