"""Where each weight of one expert sits inside a slot: the layout shared by the host store and the pool.

A slot holds *all* of one expert's weights, contiguously, so that one copy moves one expert. The
experts module of a transformers MoE block stores each weight kind as one stacked tensor
``(num_experts, *shape)`` (``gate_up_proj``, ``down_proj``, optional ``*_bias`` ...). The layout
puts kind ``i`` at element offset ``offset_i`` of the slot, each offset rounded up to
``ALIGN_BYTES`` so that every per-kind view starts 16-byte aligned (``grouped_mm`` needs it) and
the slot stride itself is a multiple of ``ALIGN_BYTES``::

    slot = [kind 0 | pad | kind 1 | pad | ...]          slot_numel = align(sum)

``views(flat)`` turns a ``(n, slot_numel)`` buffer into per-kind strided views ``(n, *shape)``
whose stride along the expert dimension is ``slot_numel``: exactly what the transformers experts
kernels index with ``weight[expert_ids]`` or hand to ``grouped_mm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

#: Alignment of every kind's offset and of the slot stride, in bytes.
ALIGN_BYTES = 256


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class WeightKind:
    """One stacked weight of an experts module: ``name`` on the module, per-expert ``shape``."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, from the start of the slot
    numel: int


@dataclass(frozen=True)
class SlotLayout:
    """The per-expert byte layout used by every slot of the pool and every row of the host store."""

    kinds: tuple[WeightKind, ...]
    dtype: torch.dtype
    slot_numel: int

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
    def from_module(cls, experts: torch.nn.Module, num_experts: int, where: str = "experts") -> "SlotLayout":
        """The layout of ``experts``: every parameter whose first dimension is ``num_experts``.

        Raises ``UnsupportedModelError`` when the module has no such parameters, when they differ in
        dtype, or when a dtype is not floating point (e.g. quantised MXFP4 blocks).
        """
        stacked = [(n, p) for n, p in experts.named_parameters(recurse=False)
                   if p.dim() >= 1 and p.shape[0] == num_experts]
        if not stacked:
            raise UnsupportedModelError(
                f"{where} ({type(experts).__name__}) has no stacked expert weights of shape "
                f"({num_experts}, ...); moecache only offloads transformers experts modules that store "
                "each weight as one (num_experts, ...) tensor")
        dtypes = {p.dtype for _, p in stacked}
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
        for name, p in stacked:
            shape = tuple(int(x) for x in p.shape[1:])
            numel = 1
            for x in shape:
                numel *= x
            kinds.append(WeightKind(name, shape, offset, numel))
            offset = _align(offset + numel, step)
        return cls(tuple(kinds), dtype, max(offset, step))

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

    def describe(self) -> dict[str, object]:
        return {"dtype": str(self.dtype).replace("torch.", ""), "slot_bytes": self.slot_bytes,
                "kinds": {k.name: list(k.shape) for k in self.kinds}}
