"""``gate_lookahead``: run layer ``l + d``'s router on the hidden state seen at layer ``l``.

The residual stream changes little from one layer to the next, so the input of MoE block ``l``
(``hidden``, passed to ``observe``) fed to the router (gate) of a later layer ``t`` of the same
token guesses that layer's choice before its attention has even run::

    logits = W_t @ h_l (+ b_t)    (W_t, b_t: the router of MoE layer t, experts x hidden)
    p      = softmax(logits)
    pred   = normalise(top_k * p)

With ``rescale="norm"`` the hidden state is first moved from layer ``l``'s normalisation to layer
``t``'s: MoE inputs are ``RMSNorm`` outputs ``g_l * r / rms(r)``, so ``h * g_t / g_l`` is what layer
``t``'s norm would make of the same residual ``r`` (the default ``"none"`` applies the router as
is, which is what "call the next layer's router on this hidden state" means).

Next-token targets (``l + d >= L``) cannot be reached this way (the next token's hidden state does
not exist yet), nor can rows observed without a hidden state: both fall back to the ``temporal``
estimate (decayed recent use at the target layer, blended with the layer prior learned by
``fit(trace)``, uniform before it). Only routers that pick the top-k of linear logits are supported
(``SUPPORTED_FAMILIES``; the MoE blocks are found through ``moecache.families``); ``from_model``
raises ``UnsupportedModelError`` for others. The softmax ranks experts as the logits do, so the
predicted top-k is the router's own choice for that hidden state whatever its score function.

Tie-break: equal logits give equal probabilities; consumers take the lowest expert id first.
Cost: ``O(rows * hidden * experts)`` per prediction (one small matrix product).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, UnsupportedModelError
from ..families import CAPTURES, detect_family, find_moe_blocks, get_family
from ..registry import Registry
from ._common import StreamPredictor, check_trace, layer_prior
from .base import PREDICTORS
from .temporal import TemporalState, check_temporal_params

#: Families whose router picks the top-k of ``logits = W h (+ b)``: the lookahead applies exactly
#: that. (DeepSeek-V2/V3 limit the choice to expert groups, V3 adds a correction bias, Phi-MoE's
#: sparsemixer and Switch's capacity drops also depend on more than the logits: not supported.)
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "llama4")
#: The norm a decoder layer applies right before its MoE block (for ``rescale="norm"``).
NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm")


def moe_routers(model: Any, family: str | None = None) -> list[tuple[int, Any, Any, Any]]:
    """``(model_layer_index, moe_block, router, norm)`` for every MoE layer, in model order.

    The blocks come from the family table (``moecache.families``); ``norm`` is the decoder layer's
    pre-MoE norm module, or None where it has none of ``NORM_NAMES``.
    """

    adapter = get_family(family) if family else detect_family(model)
    if adapter.name not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({adapter.name}): its router does not pick the plain top-k of linear logits, "
            f"so gate_lookahead cannot replay it; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    out = []
    for b in find_moe_blocks(model, adapter):
        w = getattr(b.router, "weight", None)
        if w is None or getattr(w, "ndim", 0) != 2:
            raise UnsupportedModelError(f"{b.name}: the router has no 2-D weight (experts x hidden)")
        parent = model.get_submodule(b.name.rsplit(".", 1)[0]) if "." in b.name else model
        norm = None
        for n in NORM_NAMES:
            norm = getattr(parent, n, None)
            if norm is not None:
                break
        out.append((b.layer, b.block, b.router, norm))
    return out


def capture(model: Any, input_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over ``input_ids`` (batch 1); returns ``(ids, hidden)`` per token and MoE layer.

    ``ids`` ``(tokens, layers, top_k)`` are the experts chosen, read with the family's own capture
    (``moecache.families.CAPTURES``, as the recorder does); ``hidden`` ``(tokens, layers,
    hidden_size)`` float32 is each MoE block's input. Both come from forward hooks.
    """
    import torch


    adapter = detect_family(model)
    cap = CAPTURES.get(adapter.capture)
    blocks = find_moe_blocks(model, adapter)
    hid: dict[int, Any] = {}
    ids: dict[int, Any] = {}
    handles = []
    for j, b in enumerate(blocks):
        def pre(mod, args, kwargs, j=j):
            x = args[0] if args else kwargs["hidden_states"]
            hid[j] = x.detach().reshape(-1, x.shape[-1]).float().cpu()

        def read(mod, args, kwargs, output=None, j=j):
            ids[j] = cap.fn(mod, args, kwargs, output)[0].detach().cpu()

        handles.append(b.block.register_forward_pre_hook(pre, with_kwargs=True))
        if cap.when == "pre":
            handles.append(b.hook.register_forward_pre_hook(read, with_kwargs=True))
        else:
            handles.append(b.hook.register_forward_hook(read, with_kwargs=True))
    try:
        x = torch.as_tensor(np.asarray(input_ids)).reshape(1, -1)
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = len(blocks)
    return (np.stack([ids[j].numpy() for j in range(n)], axis=1).astype(np.int64),
            np.stack([hid[j].numpy() for j in range(n)], axis=1))


def _rescale_none(h: np.ndarray, src: int, dst: int, norms: np.ndarray) -> np.ndarray:
    return h


def _rescale_norm(h: np.ndarray, src: int, dst: int, norms: np.ndarray) -> np.ndarray:
    g_src = norms[src]
    # a zero norm weight erases that coordinate at the source: nothing to move, keep 0
    ratio = np.where(g_src != 0, norms[dst] / np.where(g_src != 0, g_src, 1.0), 0.0)
    return h * ratio[None, :]


#: How the hidden state seen at layer l is adapted before layer t's router reads it.
RESCALE: Registry[Any] = Registry("gate_lookahead rescale rule")
RESCALE.register("none", "apply the later router to the hidden state as is")(_rescale_none)
RESCALE.register("norm", "swap layer l's RMSNorm weight for layer t's before the router")(_rescale_norm)


@PREDICTORS.register("gate_lookahead", "later layers' routers applied to the current hidden state (needs the model)")
class GateLookaheadPredictor(StreamPredictor):
    """Params: ``rescale`` ("none"), and the fallback's ``decay`` (0.6), ``strength`` (1.0), ``alpha`` (1.0)."""

    name = "gate_lookahead"
    needs_model = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, rescale: str = "none", decay: float = 0.6,
                 strength: float = 1.0, alpha: float = 1.0):
        super().__init__(num_layers, num_experts, top_k, rescale=str(rescale), decay=float(decay),
                         strength=float(strength), alpha=float(alpha))
        check_temporal_params(decay, strength)
        self._rescale = RESCALE.get(rescale)
        self.decay, self.strength, self.alpha = float(decay), float(strength), float(alpha)
        self.prior = np.full((num_layers, num_experts), 1.0 / num_experts)
        self.routers: np.ndarray | None = None  # (L, E, H)
        self.norms: np.ndarray | None = None  # (L, H), ones where the model has no pre-MoE norm
        self.bias: np.ndarray | None = None  # (L, E), zeros where the router has no bias
        self._hidden: dict[int, np.ndarray | None] = {}
        self._temporal: TemporalState | None = None

    @classmethod
    def from_model(cls, model: Any, family: str | None = None, **params: Any) -> "GateLookaheadPredictor":
        """Build from a Hugging Face MoE model: copies every MoE layer's router weight and bias (and
        pre-MoE norm weight). ``family`` overrides the detected ``moecache.families`` entry."""
        found = moe_routers(model, family)
        W = np.stack([r.weight.detach().float().cpu().numpy() for _, _, r, _ in found])
        B = np.stack([np.zeros(W.shape[1], np.float32) if getattr(r, "bias", None) is None
                      else r.bias.detach().float().cpu().numpy() for _, _, r, _ in found])
        H = W.shape[2]
        norms = np.stack([np.ones(H, np.float32) if nm is None or getattr(nm, "weight", None) is None
                          else nm.weight.detach().float().cpu().numpy() for _, _, _, nm in found])
        top_k = int(getattr(model.config, "num_experts_per_tok"))
        pred = cls(len(found), W.shape[1], top_k, **params)
        pred.set_routers(W, norms, B)
        return pred

    def set_routers(self, routers: np.ndarray, norms: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        """Router weights ``(layers, experts, hidden)``, pre-MoE norm weights ``(layers, hidden)`` (ones
        when None) and router biases ``(layers, experts)`` (zeros when None)."""
        W = np.asarray(routers, np.float32)
        if W.ndim != 3 or W.shape[:2] != (self.num_layers, self.num_experts):
            raise ConfigError(f"router weights must have shape ({self.num_layers}, {self.num_experts}, hidden), "
                              f"got {W.shape}")
        N = np.ones((self.num_layers, W.shape[2]), np.float32) if norms is None else np.asarray(norms, np.float32)
        if N.shape != (self.num_layers, W.shape[2]):
            raise ConfigError(f"norm weights must have shape ({self.num_layers}, {W.shape[2]}), got {N.shape}")
        Bs = np.zeros(W.shape[:2], np.float32) if bias is None else np.asarray(bias, np.float32)
        if Bs.shape != W.shape[:2]:
            raise ConfigError(f"router biases must have shape {W.shape[:2]}, got {Bs.shape}")
        self.routers, self.norms, self.bias = W, N, Bs
        self._w64 = W.astype(np.float64)

    def fit(self, trace: Any) -> "GateLookaheadPredictor":
        """Learn the layer prior of the next-token fallback (the routers come from the model)."""
        check_trace(trace, self.num_layers, self.num_experts, self.top_k, "gate_lookahead.fit")
        self.prior = layer_prior(trace, self.alpha)
        self.fitted = True
        return self

    def _reset_request(self) -> None:
        self._hidden = {}
        self._temporal = None

    def _start_request(self, rows: int) -> None:
        self._temporal = TemporalState(rows, self.num_layers, self.num_experts, self.decay)

    def _observe(self, layer: int, experts: np.ndarray, hidden: Any) -> None:
        self._temporal.update(layer, experts)
        if hidden is None:
            self._hidden[layer] = None
            return
        if hasattr(hidden, "detach"):
            # the protocol returns host probabilities, so the hidden state is copied to the host here
            # (the one device sync this predictor makes per layer)
            hidden = hidden.detach().float().cpu().numpy()
        h = np.asarray(hidden, np.float32)
        if h.ndim == 1:
            h = h[None, :]
        if self.routers is not None and h.shape != (self._rows, self.routers.shape[2]):
            raise ConfigError(f"gate_lookahead: hidden has shape {h.shape}, expected ({self._rows}, "
                              f"{self.routers.shape[2]}) (rows, hidden_size)")
        self._hidden[layer] = h

    def _scores(self, layer: int, target: int, offset: int, depth: int) -> np.ndarray:
        h = self._hidden.get(layer)
        if offset > 0 or h is None:
            return self._temporal.scores(target, self.prior[target], self.top_k, self.strength)
        if self.routers is None:
            raise ConfigError("gate_lookahead has no router weights: build it with "
                              "GateLookaheadPredictor.from_model(model) or Predictor.load() a saved one")
        x = self._rescale(h, layer, target, self.norms)
        # float64 so a row's answer does not depend on how many rows share the product
        logits = x.astype(np.float64) @ self._w64[target].T + self.bias[target].astype(np.float64)[None, :]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def state(self) -> dict[str, np.ndarray]:
        out = {"prior": self.prior}
        if self.routers is not None:
            out["routers"], out["norms"], out["bias"] = self.routers, self.norms, self.bias
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.prior = np.asarray(arrays["prior"], np.float64)
        if "routers" in arrays:
            self.set_routers(arrays["routers"], arrays["norms"], arrays["bias"])
