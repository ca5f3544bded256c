"""``moecache.from_pretrained(path, gpu_memory=...)``: load a local checkpoint straight into the offloaded layout.

The model is built with its parameters on the meta device (buffers such as rotary frequencies are
computed for real, as the model's ``__init__`` does), then materialised from the safetensors
files, one tensor at a time, read by offset (``moecache.tensorfile``; a memory map would keep every
page it read resident next to the host store):

* expert weights go from the files into the pinned ``HostStore``, one expert at a time, never to
  the GPU and never twice in host memory. Checkpoints in the Hub's per-expert layout
  (``model.layers.N.mlp.experts.E.gate_proj.weight`` ...) are converted by transformers' own
  per-family rules (``conversion_mapping.get_model_conversion_mapping``: ``MergeModulelist``,
  ``Concatenate`` ...), applied to each expert on its own; checkpoints that already store the
  stacked tensor (``...experts.gate_up_proj``) are read one expert slice at a time;
* every other tensor is renamed by the same rules and placed on the device directly.

Then tied weights are tied, and the model is offloaded with ``moecache.offload`` on the filled store.
This path reads experts stored as stacked tensors, per-expert Hub keys included (every family but
DBRX); DBRX keeps each expert as a block of rows of one flat tensor per layer, and is loaded with
transformers on the CPU, then offloaded layer by layer (below). Only decoder-only models
(``AutoModelForCausalLM``) are built; an encoder-decoder such as Switch Transformers is loaded with
transformers and passed to ``moecache.offload``.
The rule-reading helpers are transformers internals that change between releases; where they are
missing or have another signature, loading falls back to transformers' own ``from_pretrained`` on
the CPU followed by ``offload`` (which packs and releases one layer at a time, so host memory still
never holds two copies of the experts), and says so in a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError
from .families import detect_family, find_moe_blocks, get_family
from .runtime.hoststore import HostAllocator, HostStore
from .runtime.layout import SlotLayout
from .runtime.offload import OffloadHandle, check_offload_args, check_supported, offload
from .miss_precision import DEFAULT_BELOW, resolve_rule
from .predictors import PREDICTORS
from .quant import ExpertCodec, resolve_format
from .tensorfile import TensorFile


#: Expert storages (``moecache.runtime.layout.STORAGES``) that the meta-build path reads from the files.
_READ_STORAGES = ("stacked",)


class _ReadElsewhere(Exception):
    """The meta-build path cannot read this checkpoint's experts; transformers loads it instead."""


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device (no storage);
    buffers stay real, so values computed in ``__init__`` (rotary frequencies) survive."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint folder (sharded via the index, or one file)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ConfigError(f"{path}: no model.safetensors or model.safetensors.index.json; moecache loads local "
                      "safetensors checkpoints (save one with model.save_pretrained(path))")


def _expert_index(source_pattern: str, key: str) -> int | None:
    """The expert number a per-expert source pattern's ``*`` matched in ``key``."""
    plain = source_pattern.lstrip("^").replace("\\.", ".")
    parts = plain.split("*")
    if len(parts) != 2:
        return None
    m = re.search(re.escape(parts[0]) + r"(\d+)" + re.escape(parts[1]), key)
    return int(m.group(1)) if m else None


class _Rules:
    """transformers' renaming/conversion rules for one model, behind a small stable surface."""

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self._rename = rename_source_key
        transforms = get_model_conversion_mapping(model)
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.prefix = getattr(model, "base_model_prefix", None)
        self.meta_keys = dict.fromkeys(model.state_dict().keys(), True)

    def rename(self, key: str) -> tuple[str, str | None]:
        """``(target key, converter source pattern or None)``."""
        return self._rename(key, self.renamings, self.converters, self.prefix, self.meta_keys)

    def converter_for(self, pattern: str) -> Any:
        for conv in self.converters:
            if pattern in conv.source_patterns:
                return conv
        raise RuntimeError(f"no converter has source pattern {pattern!r}")

    @staticmethod
    def convert(conv: Any, target: str, tensors: dict[str, list[torch.Tensor]],
                model: nn.Module) -> dict[str, torch.Tensor]:
        """Run ``conv``'s operations on ``tensors`` (source pattern -> tensors) for ``target``."""
        for pattern, values in tensors.items():
            conv.collected_tensors[pattern] = list(values)
        out = conv.convert(target, model=model, config=model.config)
        if isinstance(out, tuple):  # older releases returned (tensors, errors)
            out = out[0]
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, device: torch.device) -> bool:
    """Put ``value`` at ``key`` (a parameter or buffer name) on ``device`` in the target's dtype."""
    path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return False
    current = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
    if current is None and name not in module._parameters and name not in module._buffers:
        return False
    dtype = current.dtype if current is not None and current.dtype.is_floating_point and value.dtype.is_floating_point \
        else value.dtype
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise ConfigError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model expects "
                          f"{tuple(current.shape)}: the config does not match the weights")
    value = value.to(device=device, dtype=dtype)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value
    return True


def _build_meta_model(path: str, dtype: torch.dtype | None, experts_implementation: str | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{path}: {config.model_type} is an encoder-decoder model; moecache.from_pretrained builds decoder-only "
            "models (AutoModelForCausalLM). Load it with transformers (e.g. AutoModelForSeq2SeqLM.from_pretrained) "
            "and call moecache.offload(model, ...)")
    dt = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt)
    kwargs: dict[str, Any] = {"dtype": dt}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def _bar(total: int, enabled: bool | None, desc: str) -> Any:
    """A tqdm bar on stderr; ``enabled=None`` shows it only where stderr is a terminal."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=not show, file=sys.stderr)


def _check_host(model: nn.Module, blocks: list, layout: SlotLayout, E: int, device: torch.device, host_memory: Any,
                cache_slots: int | None, store_row_bytes: int | None = None, low_row_bytes: int = 0) -> None:
    """Before any weight is read: the host store (and, on a CPU device, the other weights and the pool) must fit
    the host budget (``moecache.runtime.memplan.check_host_memory``)."""
    if host_memory is None:
        return
    from .runtime.memplan import check_host_memory
    from .runtime.offload import _expert_params, non_expert_bytes

    other = 0
    if device.type == "cpu":
        other = non_expert_bytes(model, _expert_params(blocks, layout, E)) + (cache_slots or 0) * layout.slot_bytes
    floats = [p for p in model.parameters() if p.is_floating_point()]
    hint = ("load it in bfloat16 (dtype=torch.bfloat16, --dtype bfloat16) to halve it"
            if floats and floats[0].dtype == torch.float32 else None)
    row = layout.slot_bytes if store_row_bytes is None else store_row_bytes  # compressed rows where asked
    check_host_memory(experts=len(blocks) * E * (row + low_row_bytes), other=other, host_memory=host_memory,
                      dtype_hint=hint)


def checkpoint_format(path: str) -> str | None:
    """"mxfp4" where the checkpoint's config says its experts are MXFP4 (GPT-OSS), else None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method and method != "mxfp4":
        raise UnsupportedModelError(f"{path}: the checkpoint is quantized with {method!r}; moecache reads bf16/fp16/"
                                    "fp32 checkpoints and GPT-OSS's MXFP4 ones")
    return "mxfp4" if method == "mxfp4" else None


def load_offloaded(path: str, *, device: torch.device, dtype: torch.dtype | None, family: str | None,
                   experts_implementation: str | None, pin: bool | None,
                   progress: bool | None = None, host_memory: Any = "auto",
                   cache_slots: int | None = None, expert_dtype: Any = "auto",
                   group_size: int | None = None,
                   precheck: Callable[[nn.Module, HostStore, HostStore | None], None] | None = None,
                   low_format: Any = None) -> tuple[nn.Module, HostStore, HostStore | None]:
    """The meta-build path: the model with non-expert weights on ``device``, plus the filled host store
    (compressed when ``expert_dtype`` asks, or when the checkpoint's experts are MXFP4: then kept as stored).
    ``progress``: a bar over the tensors read (None: where stderr is a terminal). ``precheck(model, store,
    low_store)`` runs on the meta-device model and the still empty stores before any weight is read
    (``from_pretrained`` checks ``offload``'s arguments there, so a budget that cannot work fails before minutes
    of reading). ``low_format`` (an ``ExpertFormat``): also encode every expert, as it is read, into a second
    store in that format (the low copy of ``low_precision_misses``), returned third (else None)."""
    stored = checkpoint_format(path)
    fmt = resolve_format(expert_dtype, group_size, checkpoint_format=stored)  # refused before anything is read
    model = _build_meta_model(path, dtype, experts_implementation)
    adapter = get_family(family) if family else detect_family(model)
    blocks = find_moe_blocks(model, adapter)
    check_supported(adapter, blocks)
    E = adapter.num_experts(model.config)
    layout = SlotLayout.from_module(blocks[0].experts, E, blocks[0].name, adapter.layout)
    if layout.storage not in _READ_STORAGES:
        raise _ReadElsewhere(f"{adapter.name} stores its experts {layout.storage!r} (not read one expert at a time "
                             "from the files here)")
    codec = None
    if fmt is not None:
        if adapter.layout.kernel != "transformers":
            raise ConfigError(f"expert_dtype={fmt.name!r}: {adapter.name} experts run through the "
                              f"{adapter.layout.kernel!r} kernel, whose layout compressed experts cannot hold yet")
        codec = ExpertCodec(layout, fmt, bool(getattr(adapter.layout, "transposed", False)),
                            blocks[0].name + "." + adapter.experts_attr)
    low_codec = None
    if low_format is not None:
        low_codec = ExpertCodec(layout, low_format, bool(getattr(adapter.layout, "transposed", False)),
                                blocks[0].name + "." + adapter.experts_attr)
    _check_host(model, blocks, layout, E, device, host_memory, cache_slots,
                None if codec is None else codec.slot_bytes,
                0 if low_codec is None else low_codec.slot_bytes)
    store = HostStore(codec or layout, len(blocks), E, HostAllocator(pin))
    low_store = None if low_codec is None else HostStore(low_codec, len(blocks), E, HostAllocator(pin))
    if precheck is not None:
        precheck(model, store, low_store)
    # The whole store first, before any reading: its long-lived blocks are then not interleaved with the reading's
    # short-lived buffers in the allocator's heap, whose freed gaps would stay resident (fragmentation).
    for layer in range(len(blocks)):
        store.allocate_layer(layer)
        if low_store is not None:
            low_store.allocate_layer(layer)
    experts_at = {f"{b.name}.{adapter.experts_attr}": i for i, b in enumerate(blocks)}
    kinds = set(layout.names)
    rules = _Rules(model)

    # Pass 1: where every checkpoint tensor goes.
    files = checkpoint_files(path)
    # Read by offset, not memory-mapped: mapped pages would stay resident next to the host store.
    handles = {f: TensorFile(f) for f in files}
    per_expert: dict[tuple[str, int], dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    stacked: list[tuple[str, str, str]] = []        # (file, key, target) of stacked expert tensors
    native: dict[tuple[int, str], dict[str, tuple[str, str]]] = defaultdict(dict)  # (layer, kind) -> MXFP4 parts
    plain: list[tuple[str, str, str]] = []          # (file, key, target) of other tensors
    grouped: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    unexpected: list[str] = []
    for f, h in handles.items():
        for key in h.keys():
            target, pattern = rules.rename(key)
            module_path, _, name = target.rpartition(".")
            is_expert = module_path in experts_at and name in kinds
            base, _, part = name.rpartition("_")
            if stored == "mxfp4" and module_path in experts_at and base in kinds and part in ("blocks", "scales"):
                native[(experts_at[module_path], base)][part] = (f, key)
                continue
            if pattern is not None and is_expert:
                e = _expert_index(pattern, key)
                if e is None:
                    raise UnsupportedModelError(f"{key}: cannot tell which expert this tensor belongs to "
                                                f"(conversion pattern {pattern!r})")
                per_expert[(target, e)][pattern].append((f, key))
            elif pattern is not None:
                grouped[target][pattern].append((f, key))
            elif is_expert:
                stacked.append((f, key, target))
            else:
                plain.append((f, key, target))

    filled = {(layer, k): 0 for layer in range(len(blocks)) for k in kinds}
    bar = _bar(len(per_expert) + len(stacked) * E + len(plain) + len(grouped), progress, f"load {os.path.basename(path)}")
    # Pass 2a: per-expert tensors, converted one expert at a time by transformers' rules.
    for (target, e), sources in sorted(per_expert.items()):
        module_path, _, name = target.rpartition(".")
        layer = experts_at[module_path]
        conv = rules.converter_for(next(iter(sources)))
        tensors = {p: [handles[f].get_tensor(k) for f, k in sorted(v)] for p, v in sources.items()}
        out = rules.convert(conv, target, tensors, model)
        value = out.get(target)
        if value is None or value.shape[0] != 1:
            raise UnsupportedModelError(f"{target}: transformers' conversion for this family does not act on one "
                                        f"expert at a time (got {None if value is None else tuple(value.shape)})")
        store.fill_expert(layer, e, name, value[0])
        if low_store is not None:  # the low copy from the same weights, while they are in memory
            low_store.fill_expert(layer, e, name, value[0])
        filled[(layer, name)] += 1
        bar.update(1)
    # Pass 2b: stacked expert tensors, one expert slice at a time.
    for f, key, target in stacked:
        module_path, _, name = target.rpartition(".")
        layer = experts_at[module_path]
        for e in range(E):
            row = handles[f].get_row(key, e)
            store.fill_expert(layer, e, name, row)
            if low_store is not None:
                low_store.fill_expert(layer, e, name, row)
            bar.update(1)
        filled[(layer, name)] += E
    # Pass 2b': MXFP4 blocks and scales, kept as stored, one expert at a time.
    for (layer, name), parts in sorted(native.items()):
        if set(parts) != {"blocks", "scales"}:
            continue  # counted as missing below
        assert codec is not None
        views = store.layer_views(layer)
        for e in range(E):
            codec.set_native({k: v[e] for k, v in views.items()}, name,
                             **{sub: handles[f].get_row(k, e) for sub, (f, k) in parts.items()})
        filled[(layer, name)] += E
    missing = [f"{blocks[layer].name}.{adapter.experts_attr}.{name} ({n}/{E} experts)"
               for (layer, name), n in sorted(filled.items()) if n != E]
    if missing:
        raise ConfigError(f"{path}: the checkpoint lacks expert weights: {', '.join(missing[:6])}"
                          f"{' ...' if len(missing) > 6 else ''}")
    # Pass 2c: everything else, straight to the device.
    for f, key, target in plain:
        if not _set_tensor(model, target, handles[f].get_tensor(key), device):
            unexpected.append(key)
        bar.update(1)
    for target, sources in grouped.items():
        bar.update(1)
        conv = rules.converter_for(next(iter(sources)))
        tensors = {p: [handles[f].get_tensor(k) for f, k in sorted(v)] for p, v in sources.items()}
        for k2, v2 in rules.convert(conv, target, tensors, model).items():
            if not _set_tensor(model, k2, v2, device):
                unexpected.append(k2)
    bar.close()
    for h in handles.values():
        h.close()
    handles.clear()
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} checkpoint tensors match nothing in the model and were skipped: "
                      f"{unexpected[:5]}")
    model.tie_weights()
    expert_param_ids = {id(getattr(b.experts, k)) for b in blocks for k in kinds}
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in expert_param_ids]
    if left:
        raise ConfigError(f"{path}: the checkpoint lacks {len(left)} weights the model needs: {left[:6]}")
    for module in model.modules():  # buffers computed in __init__ (on the CPU) join the device
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model, store, low_store


def from_pretrained(path: str | os.PathLike, gpu_memory: int | str | None = None, *, cache_slots: int | None = None,
                    device: str | None = None, dtype: torch.dtype | str | None = None, family: str | None = None,
                    experts_implementation: str | None = None, pin: bool | None = None,
                    progress: bool | None = None, host_memory: int | str | None = "auto",
                    **offload_kwargs: Any) -> nn.Module:
    """Load the checkpoint folder ``path`` offloaded; returns the model (its handle is ``model.moecache``).

    ``gpu_memory``/``cache_slots`` and ``offload_kwargs`` (policy, predictor, prefetch_depth, engine,
    ...) are those of ``moecache.offload``. ``dtype`` defaults to the checkpoint's. ``progress``: a bar
    over the tensors read, on stderr (None: only where stderr is a terminal). ``host_memory`` (bytes, or
    "auto": the memory available now; None: no check): the host store must fit in it, checked before any
    weight is read. ``gpu_memory="auto"`` plans the device budget (``moecache.offload``).
    """
    path, dev, dtype = check_from_pretrained_args(path, gpu_memory, cache_slots=cache_slots, device=device, dtype=dtype,
                                                  family=family, experts_implementation=experts_implementation,
                                                  pin=pin, offload_kwargs=offload_kwargs, host_memory=host_memory,
                                                  progress=progress)
    expert_dtype = offload_kwargs.pop("expert_dtype", "auto")
    group_size = offload_kwargs.pop("group_size", None)
    stored = checkpoint_format(path)
    low_rule = resolve_rule(offload_kwargs.get("low_precision_misses"),
                            offload_kwargs.get("low_precision_below", DEFAULT_BELOW), group_size)
    # With the per-miss rule, group_size is the low copy's (as in offload); the experts keep their own format.
    resolve_format(expert_dtype, None if low_rule is not None else group_size,
                   checkpoint_format=stored)  # bad input refused before any reading

    def precheck(meta_model: nn.Module, store: HostStore, low_store: HostStore | None) -> None:
        # offload's own checks (budget, pool, policy ...) on the meta-device model, before anything is read.
        kwargs = dict(offload_kwargs)
        cls = PREDICTORS.get(kwargs["predictor"]) if isinstance(kwargs.get("predictor"), str) and \
            kwargs["predictor"] != "none" else None
        if cls is not None and getattr(cls, "needs_model", False) and not getattr(cls, "needs_fit", False):
            kwargs["predictor"] = None  # built from the router weights, which are not read yet: checked by offload
        check_offload_args(meta_model, gpu_memory, cache_slots=cache_slots, device=str(dev), family=family, pin=pin,
                           host_store=store, expert_dtype=expert_dtype, group_size=group_size,
                           low_host_store=low_store, store_filled_later=True, **kwargs)

    try:
        model, store, low_store = load_offloaded(
            path, device=dev, dtype=dtype, family=family, experts_implementation=experts_implementation, pin=pin,
            progress=progress, host_memory=host_memory, cache_slots=cache_slots, expert_dtype=expert_dtype,
            group_size=None if low_rule is not None else group_size, precheck=precheck,
            low_format=None if low_rule is None else low_rule.fmt)
    except _ReadElsewhere as e:
        if stored == "mxfp4":
            raise UnsupportedModelError(f"{path}: MXFP4 experts are read by moecache's own loader only ({e})") from None
        offload_kwargs.update(expert_dtype=expert_dtype, group_size=group_size)
        warnings.warn(f"moecache.from_pretrained: {e}; loading with transformers on the CPU and offloading layer "
                      "by layer instead")
        return _load_via_transformers(path, gpu_memory, cache_slots=cache_slots, device=dev, dtype=dtype,
                                      family=family, experts_implementation=experts_implementation, pin=pin,
                                      host_memory=host_memory, **offload_kwargs)
    except (ImportError, AttributeError, TypeError) as e:
        if stored == "mxfp4":
            raise
        offload_kwargs.update(expert_dtype=expert_dtype, group_size=group_size)
        warnings.warn(f"moecache.from_pretrained: this transformers release's conversion helpers differ ({e!r}); "
                      "loading with transformers on the CPU and offloading layer by layer instead")
        return _load_via_transformers(path, gpu_memory, cache_slots=cache_slots, device=dev, dtype=dtype,
                                      family=family, experts_implementation=experts_implementation, pin=pin,
                                      host_memory=host_memory, **offload_kwargs)
    try:
        offload(model, gpu_memory, cache_slots=cache_slots, device=str(dev), family=family, pin=pin, host_store=store,
                expert_dtype=expert_dtype, group_size=group_size, low_host_store=low_store, **offload_kwargs)
    except BaseException:
        store.close()  # the model is ours and dropped with it; its pinned host memory goes back now
        if low_store is not None:
            low_store.close()
        raise
    return model


def check_from_pretrained_args(path: Any, gpu_memory: Any, *, cache_slots: Any, device: Any, dtype: Any, family: Any,
                               experts_implementation: Any, pin: Any, offload_kwargs: dict[str, Any],
                               host_memory: Any = None, progress: Any = None
                               ) -> tuple[str, torch.device, torch.dtype | None]:
    """The checks of ``from_pretrained`` that need no model (``moecache.validate``), run before anything is read:
    ``(path, device, dtype)``. ``offload`` checks the rest against the built model."""
    import inspect

    from . import validate as V
    from .runtime.hybrid import HybridConfig

    path = V.folder("path", path)
    checkpoint_files(path)  # a folder without safetensors fails here
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{path} has no config.json; save the checkpoint with model.save_pretrained(path)")
    dev = V.device("device", device)
    if isinstance(dtype, str):
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ConfigError(f"dtype={dtype!r} is not a floating-point torch dtype; use e.g. 'bfloat16' or 'float32'")
        dtype = dt
    elif dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype={dtype!r} is not a floating-point torch dtype; use e.g. torch.bfloat16")
    V.text("family", family, none=True)
    V.text("experts_implementation", experts_implementation, none=True)
    V.flag("pin", pin, none=True)
    known = set(inspect.signature(offload).parameters) - {"model", "gpu_memory", "cache_slots", "device", "family",
                                                             "pin", "host_store", "host_memory", "low_host_store"}
    unknown = sorted(set(offload_kwargs) - known)
    if unknown:
        raise ConfigError(f"from_pretrained got unknown argument(s) {unknown}; valid: {', '.join(sorted(known))}")
    if (gpu_memory is None) == (cache_slots is None):
        raise ConfigError("pass exactly one of gpu_memory= (e.g. '6GiB' or 'auto') or cache_slots= (a number of "
                          "experts)")
    if cache_slots is not None:
        V.count("cache_slots", cache_slots, minimum=1, fix="a number of experts")
    elif not (isinstance(gpu_memory, str) and gpu_memory.strip().lower() == "auto"):
        V.memory_size("gpu_memory", gpu_memory)
    if host_memory is not None and not (isinstance(host_memory, str) and host_memory.strip().lower() == "auto"):
        V.memory_size("host_memory", host_memory)
    V.flag("progress", progress, none=True)
    for name in ("max_context", "batch"):
        if offload_kwargs.get(name) is not None:
            V.count(name, offload_kwargs[name], minimum=1)
    HybridConfig.resolve(offload_kwargs.get("hybrid", False))
    for name in ("prefetch_depth", "prefetch_width"):
        if offload_kwargs.get(name) is not None:
            V.count(name, offload_kwargs[name], minimum=0 if name == "prefetch_depth" else 1)
    if "min_prob" in offload_kwargs:
        V.real("min_prob", offload_kwargs["min_prob"], minimum=0.0, maximum=1.0)
    if "engine" in offload_kwargs:
        from .runtime.engine import COPY_ENGINES

        V.choice("engine", offload_kwargs["engine"], ["auto", *COPY_ENGINES.names()])
    for name in ("policy_params", "predictor_params"):
        V.mapping(name, offload_kwargs.get(name))
    return path, dev, dtype


def _load_via_transformers(path: str, gpu_memory: Any, *, cache_slots: int | None, device: torch.device,
                           dtype: torch.dtype | None, family: str | None, experts_implementation: str | None,
                           pin: bool | None, host_memory: Any = None, **offload_kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if host_memory is not None:  # transformers loads the whole checkpoint into host memory first
        from .runtime.memplan import check_host_memory

        files = checkpoint_files(path)
        check_host_memory(experts=sum(os.path.getsize(f) for f in files), other=0, host_memory=host_memory)
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    offload(model, gpu_memory, cache_slots=cache_slots, device=str(device), family=family, pin=pin, **offload_kwargs)
    return model


def handle_of(model: nn.Module) -> OffloadHandle:
    """The ``OffloadHandle`` of a model loaded by ``from_pretrained`` (or patched by ``offload``)."""
    h = getattr(model, "moecache", None)
    if h is None:
        raise ConfigError("this model is not offloaded by moecache")
    return h


__all__ = ["from_pretrained", "load_offloaded", "params_on_meta", "checkpoint_files", "handle_of"]
