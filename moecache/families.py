"""The table of MoE family adapters: where each family keeps its MoE blocks, and how to read its routing.

One ``FamilyAdapter`` per family, registered in ``FAMILIES``; one generic recorder
(``moecache.trace.recorder``) and one generic offloading patcher (``moecache.runtime.offload``)
read it. Families differ only by the fields below, never by code paths of their own:

* where the MoE blocks are: ``<stack>.<layers_attr>.<N>.<block_path>``, a module that has an
  ``experts_attr`` child and a ``router_attr`` child (layers whose MLP lacks them are dense and
  skipped). ``<stack>`` is the module that owns the layer list: the base model of a decoder-only
  model, or each of the encoder and decoder of an encoder-decoder one. The *model layer index* of
  a block is ``N`` plus the number of layers of the stacks before it (encoder first);
* how many experts and how many per token: config keys (dotted keys read nested configs);
* how to read the routing of one block (``capture``, a name in ``CAPTURES``): a function that
  gets what a hook on the experts (or the router) received and returns ``(ids, weights)``, each
  of shape ``(tokens, top_k)``, on the device, with no host synchronisation;
* what the weights mean (``weights``: a function of the config returning a key of
  ``moecache.trace.WEIGHT_KINDS``);
* how the experts store their parameters and which kernel runs them on the slot pool
  (``ExpertLayout``), for the offloading runtime.

Router return orders differ between transformers versions (GraniteMoE's router returned
``(index, weights, logits)`` in 5.17 and ``(logits, weights, index)`` in 5.24), so no capture reads
a router's outputs by position: the experts module's inputs are a stable contract (transformers'
``use_experts_implementation`` calls every backend as ``experts(hidden, top_k_index,
top_k_weights)``), and the one family whose experts never see ids (Llama 4) is read from its
router's input and weight.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, UnsupportedModelError
from .registry import Registry

#: Where a ``capture`` function's hook goes and what it reads.
CAPTURE_TARGETS = ("experts", "router")


@dataclass(frozen=True)
class Capture:
    """How to read one MoE block's routing from a hook.

    ``target`` is the child of the block that is hooked; ``when`` is ``"pre"`` (a forward
    pre-hook: ``fn(module, args, kwargs, None)``) or ``"post"`` (a forward hook:
    ``fn(module, args, kwargs, output)``). ``fn`` returns ``(ids, weights)`` as tensors of shape
    ``(tokens, top_k)``; it launches device work only, never a host synchronisation.
    """

    target: str
    when: str
    fn: Callable[..., tuple[Any, Any]]
    doc: str = ""


CAPTURES: Registry[Capture] = Registry("routing capture")


def _positional(module: Any, args: tuple, kwargs: dict, index: int) -> Any:
    """Argument ``index`` of ``module.forward`` whether it came positionally or by name."""
    if len(args) > index:
        return args[index]
    names = _forward_params(type(module))
    if index < len(names) and names[index] in kwargs:
        return kwargs[names[index]]
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward was called without argument {index} "
        f"({names[index] if index < len(names) else '?'}); moecache expects experts(hidden, ids, weights)")


_PARAMS_CACHE: dict[type, list[str]] = {}


def _forward_params(cls: type) -> list[str]:
    names = _PARAMS_CACHE.get(cls)
    if names is None:
        sig = inspect.signature(cls.forward)  # follows functools.wraps to the original names
        names = [p for p in sig.parameters if p != "self"]
        _PARAMS_CACHE[cls] = names
    return names


def _capture_experts_args(module, args, kwargs, output):
    # transformers 5.x calls every experts backend as experts(hidden_states, top_k_index, top_k_weights),
    # after the router's normalisation and scaling: exactly what the experts multiply by.
    if len(args) > 2:  # the usual, positional call: the hot path stays two tuple reads
        return args[1], args[2]
    return _positional(module, args, kwargs, 1), _positional(module, args, kwargs, 2)


def _capture_onehot_dispatch(module, args, kwargs, output):
    # Switch Transformers hands its experts a one-hot dispatch mask (tokens, 1, experts) with the
    # rows of tokens over capacity all zero, and the top-1 probability (tokens, 1).
    import torch

    from .trace.schema import ID_DROPPED

    mask = _positional(module, args, kwargs, 1)
    weights = _positional(module, args, kwargs, 2)
    mask = mask.reshape(mask.shape[0], -1, mask.shape[-1])
    ids = mask.argmax(dim=-1)
    ids = torch.where(mask.amax(dim=-1) > 0, ids, torch.full_like(ids, ID_DROPPED))
    return ids, weights.reshape(ids.shape)


def _capture_router_topk_sigmoid(module, args, kwargs, output):
    # Llama 4's experts receive tokens already multiplied by their scores, never ids. Its router is
    # a Linear: logits = x W^T, the top-k logits pick the experts, sigmoid(top-k logit) is the
    # score. Recomputed from the router's own input and weight (one small GEMM per MoE layer), the
    # same ops in the same order as the router, so ids and weights equal the router's bit for bit.
    import torch
    import torch.nn.functional as F

    hidden = _positional(module, args, kwargs, 0)
    logits = F.linear(hidden, module.weight, getattr(module, "bias", None))
    top = torch.topk(logits, module.top_k, dim=1)
    weights = torch.sigmoid(top.values.float()).to(logits.dtype)
    return top.indices, weights


CAPTURES.register("experts_args", "ids and weights the experts module receives (positional args 1 and 2)")(
    Capture("experts", "pre", _capture_experts_args))
CAPTURES.register("onehot_dispatch", "one-hot dispatch mask to the experts; all-zero rows are dropped tokens")(
    Capture("experts", "pre", _capture_onehot_dispatch))
CAPTURES.register("router_topk_sigmoid", "top-k of a linear router's logits, sigmoid scores (Llama 4)")(
    Capture("router", "post", _capture_router_topk_sigmoid))


@dataclass(frozen=True)
class ExpertLayout:
    """How a block's experts store their weights.

    * ``storage``: ``"stacked"`` (each parameter has a leading expert dimension, ``p[e]`` is expert
      ``e``), ``"flat"`` (2-D parameters of ``experts * rows`` rows, expert ``e`` owns rows
      ``[e*rows, (e+1)*rows)``) or ``"modules"`` (one submodule per expert, ``params`` are
      templates with ``{e}``);
    * ``params``: the parameter names inside the experts module;
    * ``gate_up``: ``"fused"`` (one ``gate_up_proj``, gate half first then up half),
      ``"interleaved"`` (gate and up alternate along the output dimension), ``"separate"`` (two
      parameters) or ``"none"`` (no gate: a plain two-layer MLP);
    * ``transposed``: weights are stored ``(in, out)`` instead of ``nn.Linear``'s ``(out, in)``;
    * ``bias``: the experts carry biases;
    * ``weights_applied``: ``"output"`` (each expert's output is multiplied by its weight) or
      ``"input"`` (the token is multiplied by the weight before the expert, Llama 4);
    * ``kernel``: how the offloading runtime computes these experts on its slot pool, a name in
      ``moecache.runtime.experts.EXPERT_KERNELS``: ``"transformers"`` (transformers' own experts
      kernels, for classes built with ``use_experts_implementation``) or a family kernel that runs
      the module's own math, in its own order, on the pool's views (``"llama4"``, ``"dbrx"``,
      ``"switch"``).
    """

    storage: str
    params: tuple[str, ...]
    gate_up: str
    transposed: bool = False
    bias: bool = False
    weights_applied: str = "output"
    kernel: str = "transformers"
    notes: str = ""


@dataclass(frozen=True)
class FamilyAdapter:
    """Everything moecache needs to know about one MoE family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    layers_attr: str
    block_path: str
    num_experts_key: str | int
    top_k_key: str | int
    weights: Callable[[Any], str]
    layout: ExpertLayout
    experts_attr: str = "experts"
    router_attr: str = "gate"
    capture: str = "experts_args"
    shared_attrs: tuple[str, ...] = ()
    weights_doc: str = ""
    notes: str = ""
    _block_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        CAPTURES.get(self.capture)  # fail at import time on a typo
        pattern = rf"^(?:(?P<stack>.+)\.)?{re.escape(self.layers_attr)}\.(?P<index>\d+)\.{self.block_path}$"
        object.__setattr__(self, "_block_re", re.compile(pattern))

    def match_block(self, name: str) -> tuple[str, int] | None:
        """``(stack path, layer index within the stack)`` when ``name`` is where a block of this family sits."""
        m = self._block_re.match(name)
        if m is None:
            return None
        return m.group("stack") or "", int(m.group("index"))

    def num_experts(self, config: Any) -> int:
        return int(_config_value(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        return int(_config_value(config, self.top_k_key))

    def weights_kind(self, config: Any) -> str:
        return self.weights(_text_config(config))


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # older signature without the keyword
        return get()


def _config_value(config: Any, key: str | int) -> Any:
    """A config value by (dotted) key, looked up on the text config first; an int is a constant."""
    if isinstance(key, int):
        return key
    for cfg in (_text_config(config), config):
        obj = cfg
        try:
            for part in key.split("."):
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        except (AttributeError, KeyError):
            continue
        if obj is not None:
            return obj
    raise UnsupportedModelError(f"{type(config).__name__} has no {key!r}; cannot tell the MoE routing size")


FAMILIES: Registry[FamilyAdapter] = Registry("MoE family")


def register(adapter: FamilyAdapter, help: str) -> FamilyAdapter:
    FAMILIES.register(adapter.name, help)(adapter)
    return adapter


# -- weight kinds, as functions of the config ----------------------------------------------------

def _renormalized(config: Any) -> str:
    return "renormalized"


def _norm_topk_flag(config: Any) -> str:
    # softmax over all experts, then top-k; renormalised over the top-k only when norm_topk_prob.
    return "renormalized" if getattr(config, "norm_topk_prob", False) else "softmax"


def _deepseek_v2_kind(config: Any) -> str:
    # softmax over all experts, top-k (group-limited or greedy), times routed_scaling_factor.
    return "softmax" if float(config.routed_scaling_factor) == 1.0 else "scaled"


def _deepseek_v3_kind(config: Any) -> str:
    # sigmoid scores, top-k chosen on score + e_score_correction_bias within the top groups,
    # weights gathered from the bias-free scores, renormalised when norm_topk_prob, times
    # routed_scaling_factor.
    if float(config.routed_scaling_factor) != 1.0:
        return "scaled"
    return "renormalized" if config.norm_topk_prob else "sigmoid"


def _scaled(config: Any) -> str:
    return "scaled"


def _sigmoid(config: Any) -> str:
    return "sigmoid"


def _softmax(config: Any) -> str:
    return "softmax"


def _dbrx_kind(config: Any) -> str:
    # softmax, top-k, then divided by the p-norm of the top-k (p = moe_normalize_expert_weights).
    p = _config_value(config, "ffn_config.moe_normalize_expert_weights") if _has(config, "ffn_config") else None
    if p is None:
        return "softmax"
    return "renormalized" if float(p) == 1.0 else "scaled"


def _has(config: Any, key: str) -> bool:
    try:
        _config_value(config, key)
        return True
    except UnsupportedModelError:
        return False


# -- the table ------------------------------------------------------------------------------------

_STACKED_SWIGLU = ExpertLayout("stacked", ("gate_up_proj", "down_proj"), "fused")

register(FamilyAdapter(
    name="mixtral", model_types=("mixtral",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", weights=_renormalized,
    layout=_STACKED_SWIGLU, weights_doc="softmax over all experts, top-k, renormalised to sum to 1"),
    "Mixtral (MixtralSparseMoeBlock)")

register(FamilyAdapter(
    name="qwen2_moe", model_types=("qwen2_moe",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_experts", top_k_key="num_experts_per_tok", weights=_norm_topk_flag,
    layout=_STACKED_SWIGLU, shared_attrs=("shared_expert", "shared_expert_gate"),
    weights_doc="softmax over all experts, top-k; renormalised when norm_topk_prob"),
    "Qwen1.5/Qwen2-MoE (shared expert with a sigmoid gate; mlp_only_layers are dense)")

register(FamilyAdapter(
    name="qwen3_moe", model_types=("qwen3_moe",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_experts", top_k_key="num_experts_per_tok", weights=_norm_topk_flag,
    layout=_STACKED_SWIGLU, weights_doc="softmax over all experts, top-k; renormalised when norm_topk_prob"),
    "Qwen3-MoE")

register(FamilyAdapter(
    name="olmoe", model_types=("olmoe",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_experts", top_k_key="num_experts_per_tok", weights=_norm_topk_flag,
    layout=_STACKED_SWIGLU, weights_doc="softmax over all experts, top-k; renormalised when norm_topk_prob"),
    "OLMoE")

register(FamilyAdapter(
    name="deepseek_v2", model_types=("deepseek_v2",), layers_attr="layers", block_path="mlp",
    num_experts_key="n_routed_experts", top_k_key="num_experts_per_tok", weights=_deepseek_v2_kind,
    layout=_STACKED_SWIGLU, shared_attrs=("shared_experts",),
    weights_doc="softmax, greedy or group-limited top-k, times routed_scaling_factor",
    notes="the first first_k_dense_replace layers are dense"),
    "DeepSeek-V2 / V2-Lite (shared experts, group-limited greedy routing)")

register(FamilyAdapter(
    name="deepseek_v3", model_types=("deepseek_v3",), layers_attr="layers", block_path="mlp",
    num_experts_key="n_routed_experts", top_k_key="num_experts_per_tok", weights=_deepseek_v3_kind,
    layout=_STACKED_SWIGLU, shared_attrs=("shared_experts",),
    weights_doc="sigmoid; choice on score + e_score_correction_bias within topk_group of n_group groups; "
                "weights from the bias-free scores, renormalised when norm_topk_prob, times routed_scaling_factor",
    notes="the first first_k_dense_replace layers are dense"),
    "DeepSeek-V3 / R1 (sigmoid router with correction bias and group limit)")

register(FamilyAdapter(
    name="gpt_oss", model_types=("gpt_oss",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", weights=_renormalized,
    router_attr="router",
    layout=ExpertLayout("stacked", ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
                        "interleaved", transposed=True, bias=True,
                        notes="clamped SwiGLU (swiglu_limit, swiglu_alpha), (up + 1) * glu"),
    weights_doc="top-k of the router logits (with bias), softmax over the top-k"),
    "GPT-OSS (router with bias; transposed, interleaved gate/up experts with biases)")

register(FamilyAdapter(
    name="phimoe", model_types=("phimoe",), layers_attr="layers", block_path="mlp",
    num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", weights=_scaled,
    router_attr="router", layout=_STACKED_SWIGLU,
    weights_doc="sparsemixer: each of the two picks gets the softmax of the logits within its jitter "
                "threshold (weights do not sum to 1)",
    notes="sparsemixer routes exactly two experts"),
    "Phi-3.5-MoE (sparsemixer top-2 routing)")

register(FamilyAdapter(
    name="granitemoe", model_types=("granitemoe",), layers_attr="layers", block_path="block_sparse_moe",
    num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", weights=_renormalized,
    router_attr="router", layout=_STACKED_SWIGLU,
    weights_doc="top-k of the router logits, softmax over the top-k",
    notes="router return order changed between transformers 5.17 and 5.24; read from the experts' inputs"),
    "IBM Granite MoE")

register(FamilyAdapter(
    name="llama4", model_types=("llama4", "llama4_text"), layers_attr="layers", block_path="feed_forward",
    num_experts_key="num_local_experts", top_k_key="num_experts_per_tok", weights=_sigmoid,
    router_attr="router", capture="router_topk_sigmoid", shared_attrs=("shared_expert",),
    layout=ExpertLayout("stacked", ("gate_up_proj", "down_proj"), "fused", transposed=True,
                        weights_applied="input", kernel="llama4",
                        notes="experts run on every expert's copy of the tokens, pre-multiplied by the scores"),
    weights_doc="sigmoid of the top-k router logits (the token is scaled before the expert)",
    notes="interleave_moe_layer_step / moe_layers pick the MoE layers; the others are dense"),
    "Llama 4 text (Scout, Maverick; router hooked because the experts never see ids)")

register(FamilyAdapter(
    name="dbrx", model_types=("dbrx",), layers_attr="blocks", block_path="ffn",
    num_experts_key="ffn_config.moe_num_experts", top_k_key="ffn_config.moe_top_k", weights=_dbrx_kind,
    router_attr="router",
    layout=ExpertLayout("flat", ("mlp.w1", "mlp.v1", "mlp.w2"), "separate", kernel="dbrx",
                        notes="w1 (gate) and v1 (up) rows are (out, in); w2's rows are used as (in, out)"),
    weights_doc="softmax, top-k, divided by the p-norm of the top-k (p = moe_normalize_expert_weights)"),
    "DBRX")

register(FamilyAdapter(
    name="switch_transformers", model_types=("switch_transformers",), layers_attr="block",
    block_path=r"layer\.\d+\.mlp", num_experts_key="num_experts", top_k_key=1, weights=_softmax,
    router_attr="router", capture="onehot_dispatch",
    layout=ExpertLayout("modules", ("expert_{e}.wi.weight", "expert_{e}.wo.weight"), "none", kernel="switch"),
    weights_doc="top-1 softmax probability; tokens over an expert's capacity are dropped (id -2)",
    notes="encoder-decoder: encoder layers come first, decoder layer i is model layer num_layers + i"),
    "Switch Transformers (top-1 with expert capacity; encoder-decoder)")


# -- finding the blocks ---------------------------------------------------------------------------

@dataclass
class MoeBlock:
    """One MoE block found in a model. ``hook`` is the child the family's capture hooks."""

    name: str          # qualified module name, e.g. "model.layers.3.mlp"
    layer: int         # model layer index (the layers of earlier stacks counted in)
    stack: str         # qualified name of the module owning the layer list ("" = the model itself)
    block: Any
    experts: Any
    router: Any
    hook: Any


def _mlp_types(model: Any) -> list[str]:
    """Class names of the modules that look like a layer's MLP, for error messages."""
    seen: list[str] = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        cls = type(mod).__name__
        if leaf in ("mlp", "ffn", "feed_forward", "block_sparse_moe", "moe", "experts") or any(
                s in cls for s in ("Moe", "MoE", "Expert", "Sparse")):
            if cls not in seen:
                seen.append(cls)
    return seen


def find_moe_blocks(model: Any, adapter: FamilyAdapter) -> list[MoeBlock]:
    """Every MoE block of ``model`` per ``adapter``, in model layer order.

    Raises ``UnsupportedModelError`` when there is none, naming the model class and its MLP types.
    """
    found: list[tuple[str, str, int, Any]] = []
    stacks: list[str] = []
    for name, mod in model.named_modules():
        where = adapter.match_block(name)
        if where is None:
            continue
        stack, index = where
        if stack not in stacks:
            stacks.append(stack)
        if hasattr(mod, adapter.experts_attr) and hasattr(mod, adapter.router_attr):
            found.append((name, stack, index, mod))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layers in the {adapter.name!r} layout (looked for "
            f"<stack>.{adapter.layers_attr}.N.{adapter.block_path} with .{adapter.experts_attr} and "
            f".{adapter.router_attr}); its MLP modules are {_mlp_types(model) or 'none'}. Dense models "
            f"have nothing to record; for another MoE layout see moecache.families.FAMILIES")
    offsets, total = {}, 0
    for stack in stacks:  # named_modules order: encoder before decoder
        offsets[stack] = total
        total += len(getattr(model.get_submodule(stack) if stack else model, adapter.layers_attr))
    target = CAPTURES.get(adapter.capture).target
    blocks = []
    for name, stack, index, mod in found:
        experts, router = getattr(mod, adapter.experts_attr), getattr(mod, adapter.router_attr)
        blocks.append(MoeBlock(name, offsets[stack] + index, stack, mod, experts, router,
                               experts if target == "experts" else router))
    return sorted(blocks, key=lambda b: b.layer)


def detect_family(model: Any) -> FamilyAdapter:
    """The adapter for ``model``, chosen by ``config.model_type`` (or its text config's).

    Raises ``UnsupportedModelError`` naming the model class, its MLP module types and the
    supported model types when no adapter claims it.
    """
    config = getattr(model, "config", None)
    types = []
    for cfg in (config, _text_config(config) if config is not None else None):
        t = getattr(cfg, "model_type", None)
        if t and t not in types:
            types.append(t)
    for name in FAMILIES:
        adapter = FAMILIES.get(name)
        if any(t in adapter.model_types for t in types):
            return adapter
    supported = sorted(t for n in FAMILIES for t in FAMILIES.get(n).model_types)
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type {types[0] if types else 'unknown'!r}) is not a MoE family moecache "
        f"knows; its MLP modules are {_mlp_types(model) or 'none'}. Supported model types: {', '.join(supported)}. "
        "If its MoE layout is that of a known family, pass family=NAME")


def get_family(name: str) -> FamilyAdapter:
    """The adapter called ``name`` (``ConfigError`` listing the valid names otherwise)."""
    return FAMILIES.get(name)


def bytes_per_expert(blocks: list[MoeBlock], num_experts: int) -> int:
    """Bytes of one expert: the experts modules' parameter bytes divided by ``num_experts``.

    Every layer's experts are the same size in the families here; the first block is measured and
    the others must agree (a ``ConfigError`` otherwise, since a per-layer size would be needed).
    """
    sizes = set()
    for b in blocks:
        total = sum(p.numel() * p.element_size() for p in b.experts.parameters())
        sizes.add(total)
    if len(sizes) != 1:
        raise ConfigError(f"MoE layers have experts of different sizes ({sorted(sizes)} bytes per layer)")
    total = sizes.pop()
    if total % num_experts:
        raise ConfigError(f"experts parameters ({total} bytes) do not split evenly over {num_experts} experts")
    return total // num_experts


__all__ = ["FAMILIES", "CAPTURES", "Capture", "ExpertLayout", "FamilyAdapter", "MoeBlock", "bytes_per_expert",
           "detect_family", "find_moe_blocks", "get_family"]
