"""The slot pool: one device buffer of expert slots shared by every MoE layer.

``data`` is ``(num_slots, slot_numel)`` in the model's expert dtype; ``views`` are the per-kind
strided views ``(num_slots, *shape)`` that replace an experts module's ``gate_up_proj``,
``down_proj``, ... so that transformers' own experts kernels run on the pool unchanged. The pool is
allocated once and never grows: the runtime's own device memory is constant during generation.
"""

from __future__ import annotations

import torch

from .layout import SlotLayout


class SlotPool:
    def __init__(self, layout: SlotLayout, num_slots: int, device: torch.device | str):
        if num_slots < 1:
            raise ValueError(f"a slot pool needs at least one slot, got {num_slots}")
        self.layout = layout
        self.num_slots = int(num_slots)
        self.device = torch.device(device)
        self.data = torch.zeros((self.num_slots, layout.slot_numel), dtype=layout.dtype, device=self.device)
        self.views = layout.views(self.data)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.layout.slot_bytes

    def slot(self, s: int) -> torch.Tensor:
        return self.data[s]

    def close(self) -> None:
        self.views = {}
        self.data = None  # type: ignore[assignment]
