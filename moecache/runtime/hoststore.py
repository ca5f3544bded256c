"""Host memory for every expert of every MoE layer, and the one allocator that decides pinning.

``HostAllocator`` is the only place that knows whether host memory can be pinned: where CUDA
exists it allocates ordinary memory and page-locks it in place with ``cudaHostRegister`` (no
second copy, and none of the power-of-two rounding of torch's pinned caching allocator, which
would waste up to half of a multi-GB store); on the CPU-only torch build, which cannot pin, it
hands out plain memory. Pinned memory matters: pageable host-to-GPU copies run at a third of the
speed (``shared/docs/hardware.md``).

``HostStore`` keeps one ``(num_experts, slot_numel)`` block per MoE layer in the ``SlotLayout``, so
row ``(layer, expert)`` is exactly what one copy moves into one slot. It is allocated layer by
layer, so filling it from a model loaded in host memory never holds two full copies of the
experts: each layer's original weights are released right after that layer is packed.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import ConfigError
from .layout import SlotLayout


class HostAllocator:
    """Allocates host tensors, page-locked where CUDA exists (``pin=None`` decides by itself)."""

    def __init__(self, pin: bool | None = None):
        cuda = torch.cuda.is_available()
        if pin and not cuda:
            raise ConfigError("pinned host memory needs CUDA; this torch build has no CUDA device")
        self.pin = cuda if pin is None else bool(pin)
        self._registered: dict[int, int] = {}  # data_ptr -> bytes, for the tensors we page-locked

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if self.pin and t.numel():
            nbytes = t.numel() * t.element_size()
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                # Registration can fail (e.g. locked-memory limits); a pinned copy still works.
                t = t.pin_memory()
            else:
                self._registered[t.data_ptr()] = nbytes
                # Unregister before the memory goes back to the allocator, whoever drops it last.
                weakref.finalize(t, _unregister, self._registered, t.data_ptr())
        return t

    def release(self, t: torch.Tensor) -> None:
        """Unpin ``t`` now (the memory itself is freed when the last reference goes)."""
        _unregister(self._registered, t.data_ptr())


def _unregister(registered: dict[int, int], ptr: int) -> None:
    if registered.pop(ptr, None) is not None:
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostStore:
    """Every expert's weights in host memory, one ``(experts, slot_numel)`` block per MoE layer.

    Rows are numbered ``key = layer * num_experts + expert`` (``key_of``), the same numbering the
    residency table and the copy engines use.
    """

    def __init__(self, layout: SlotLayout, num_layers: int, num_experts: int,
                 allocator: HostAllocator | None = None):
        self.layout = layout
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.allocator = allocator or HostAllocator()
        self.blocks: list[torch.Tensor | None] = [None] * self.num_layers

    # -- allocation ------------------------------------------------------------------------------
    def allocate_layer(self, layer: int) -> torch.Tensor:
        if self.blocks[layer] is None:
            self.blocks[layer] = self.allocator.empty((self.num_experts, self.layout.slot_numel), self.layout.dtype)
            # Padding between kinds is never read, but zero it so that saved stores are deterministic.
            self.blocks[layer].zero_()
        return self.blocks[layer]

    @property
    def pinned(self) -> bool:
        return self.allocator.pin

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks if b is not None)

    # -- access ----------------------------------------------------------------------------------
    def key_of(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def row(self, key: int) -> torch.Tensor:
        """The ``(slot_numel,)`` host row of expert ``key`` (a view)."""
        block = self.blocks[key // self.num_experts]
        if block is None:
            raise RuntimeError(f"host store layer {key // self.num_experts} was never filled")
        return block[key % self.num_experts]

    def layer_views(self, layer: int) -> dict[str, torch.Tensor]:
        """Per-kind ``(experts, *shape)`` views of one layer's block (allocating it if needed)."""
        return self.layout.views(self.allocate_layer(layer))

    def row_pointers(self) -> torch.Tensor:
        """int64 host address of every row, in key order: what the C++ copy worker reads from."""
        stride = self.layout.slot_bytes
        ptrs = []
        for layer, block in enumerate(self.blocks):
            if block is None:
                raise RuntimeError(f"host store layer {layer} was never filled")
            base = block.data_ptr()
            ptrs.extend(base + e * stride for e in range(self.num_experts))
        return torch.tensor(ptrs, dtype=torch.int64)

    # -- filling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_layer(self, layer: int, experts: torch.nn.Module) -> None:
        """Copy the expert weights of ``experts`` (on any device, in the layout's storage) into this layer's rows."""
        self.layout.pack(experts, self.num_experts, self.layer_views(layer))

    @torch.no_grad()
    def fill_expert(self, layer: int, expert: int, name: str, value: torch.Tensor) -> None:
        """Copy one expert's weight of kind ``name`` (shape = the kind's per-expert shape); a compressed
        layout (``moecache.quant.ExpertCodec``) encodes it into the expert's row."""
        if hasattr(self.layout, "encode_kind"):
            shape = next(k.shape for k in self.layout.kinds if k.name == name)
            if tuple(value.shape) != tuple(shape):
                raise ConfigError(f"expert weight {name} of layer {layer} expert {expert} has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(shape)}")
            views = self.layer_views(layer)
            self.layout.encode_kind({k: v[expert] for k, v in views.items()}, name, value)
            return
        view = self.layer_views(layer)[name][expert]
        if tuple(value.shape) != tuple(view.shape):
            raise ConfigError(f"expert weight {name} of layer {layer} expert {expert} has shape "
                              f"{tuple(value.shape)}, the model expects {tuple(view.shape)}")
        view.copy_(value)

    @torch.no_grad()
    def fill_random(self, seed: int = 0, std: float = 0.02, device: str | torch.device | None = None) -> None:
        """Random normal weights (mean 0, ``std``), generated per layer on ``device`` (the GPU where
        there is one: much faster than the CPU for multi-GB stores) and copied into the rows."""
        dev = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gen = torch.Generator(device=dev).manual_seed(seed)
        for layer in range(self.num_layers):
            block = self.allocate_layer(layer)
            tmp = torch.empty(block.shape, dtype=block.dtype, device=dev)
            tmp.normal_(0.0, std, generator=gen)
            block.copy_(tmp)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def close(self) -> None:
        for i, block in enumerate(self.blocks):
            if block is not None:
                self.allocator.release(block)
            self.blocks[i] = None
