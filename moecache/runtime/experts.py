"""The module that replaces each MoE block's ``experts``, and the "shells" that run transformers'
own experts kernels on the slot pool.

transformers' experts backends (``integrations/moe.py``: ``grouped_mm``, ``batched_mm``, and the
class's own eager loop) are functions of ``self`` that read ``self.gate_up_proj``,
``self.down_proj``, ``self.num_experts``, the layout flags, ``self.act_fn`` and ``self._apply_gate``.
A *shell* is a fresh instance of the original experts class that shares every attribute of the
original except the expert weights, which are replaced:

* ``remap`` shell (``grouped_mm``, ``batched_mm`` and other tensor backends): the weights are the
  pool's strided views ``(num_slots, ...)`` and ``num_experts = num_slots``; the runtime passes slot
  ids instead of expert ids. Each (token, k) pair meets the same weights and the backend sums the
  top-k in (token, k) order as before, so outputs are bit-identical.
* ``indexer`` shell (the eager loop): eager accumulates experts in the order of their ids, so the
  ids are left alone and each weight is a ``SlotIndexer`` that maps ``weight[e]`` to the view of the
  slot holding expert ``e``. Same order, same sums.

Which shell a call uses follows ``config._experts_implementation`` at call time (``EXPERT_CALLS``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..registry import Registry


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


def make_shell(original: nn.Module, weights: dict[str, Any], num_experts: int) -> nn.Module:
    """A new instance of ``type(original)`` sharing its attributes and children, with ``weights``
    (name -> tensor or ``SlotIndexer``) in place of the expert parameters and ``num_experts`` set.

    The shell owns no parameters: ``state_dict()`` and ``model.to()`` never see the pool through it.
    """
    cls = type(original)
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    for key, value in original.__dict__.items():
        if key not in shell.__dict__:
            shell.__dict__[key] = value
    shell._modules = dict(original._modules)  # shared children (act_fn, norms)
    shell._buffers = dict(original._buffers)
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

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._run(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"moe_layer={self.layer}, replaces={self.original_class}, experts={self.num_experts}"
