"""Real-size MoE shapes with random weights, and their real routing traces, for the eval scripts.

A model is built on the meta device (``params_on_meta``: no storage for any parameter), its
non-expert weights are then materialised on the target device (norms 1, everything else normal
with std 0.02) and every expert is generated straight into a ``HostStore`` (pinned where CUDA
exists), layer by layer on the device and copied down: tens of GB of experts never exist twice and
never go through a full ``from_config`` initialisation. The experts modules keep meta parameters;
``materialise_experts`` / ``release_experts`` put the store's weights on the device and take them
off again (the all-resident baseline), and ``moecache.offload(..., host_store=store)`` runs on the
store directly.

Shapes (``SHAPES``; ``quick`` gives a tiny version of the same architecture for CPU smoke runs):

* ``deepseek``: DeepSeek-V2-Lite (27 layers, the first dense, 64 routed experts top-6, 2 shared,
  hidden 2048, expert intermediate 1408; 16.5 MiB per expert in bf16, 26 x 64 experts = 28.8 GB);
  trace ``deepseek-v2-lite-chat__moe-beyond`` (prefill logs, replayed as decode streams);
* ``mixtral``: Mixtral-8x7B (32 layers, 8 experts top-2, hidden 4096, intermediate 14336; 336 MiB
  per expert, all 32 layers = 86 GB); trace ``mixtral-8x7b-instruct-v0.1-fp8__speculative-moe``.

``--layers N`` (``make_config(quick, layers)``) keeps the first N MoE layers of a shape, and
``prepare_trace`` the same first N MoE layers of its trace (``ModelShape.default_layers``: Mixtral
uses 16 of its 32 layers unless told otherwise).
"""

from __future__ import annotations

import ast
import csv
import datetime
import glob
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from moecache.errors import ConfigError  # noqa: E402
from moecache.loading import params_on_meta  # noqa: E402
from moecache.runtime.hoststore import HostAllocator, HostStore  # noqa: E402
from moecache.runtime.layout import SlotLayout  # noqa: E402

ROUTING = os.path.join(os.path.dirname(ROOT), "shared", "data", "routing")
TRACE_DIR = os.path.join(ROUTING, "deepseek-v2-lite-chat__moe-beyond")
MIXTRAL_TRACE_DIR = os.path.join(ROUTING, "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")


# -- bench helpers ----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Date, versions, CPU and GPU of this run (what every result file records)."""
    import transformers

    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    from moecache._ext import extension_status

    info["extension"] = extension_status()
    return info


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None


# -- configs ----------------------------------------------------------------------------------------

def deepseek_config(quick: bool, layers: int | None = None) -> Any:
    """DeepSeek-V2-Lite; ``layers`` MoE layers (default all 26) after the one dense layer."""
    from transformers import DeepseekV2Config

    common = dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                  num_hidden_layers=1 + (layers or 26), topk_method="greedy", n_group=1, topk_group=1,
                  routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=4096,
                  tie_word_embeddings=False, q_lora_rank=None)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2) if quick else \
        dict(bos_token_id=100000, eos_token_id=100001, pad_token_id=100001)
    common.update(ids)
    if quick:
        return DeepseekV2Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                                num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                v_head_dim=8, vocab_size=1024, **common)
    return DeepseekV2Config(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                            num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, **common)


def mixtral_config(quick: bool, layers: int | None = None) -> Any:
    """Mixtral-8x7B; ``layers`` decoder layers, every one MoE (default all 32)."""
    from transformers import MixtralConfig

    common = dict(num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=layers or 32, router_jitter_noise=0.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, max_position_embeddings=32768,
                  rope_theta=1e6, sliding_window=None)
    if quick:
        return MixtralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=1024, **common)
    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, **common)


# -- traces -----------------------------------------------------------------------------------------

def open_routing(path: str, files: int | None = None) -> Any:
    """A moecache trace folder (``manifest.json``, e.g. from ``moecache trace import``) as is, or a
    folder of a published format read through ``moecache.trace.importers`` (``files``: the first
    ``files`` log files of it, in natural order, to keep a large folder's import short)."""
    from moecache.trace import open_trace

    if os.path.isfile(os.path.join(path, "manifest.json")):
        return open_trace(path)
    if not os.path.exists(path):
        raise SystemExit(f"no routing trace at {path}: pass --trace with a trace folder (moecache trace import "
                         "SRC -o build/NAME makes one) or the raw source folder")
    from moecache.trace.importers import collect_sources, read_sources

    src = collect_sources([path])
    paths = src.files[:files] if files else src.files
    _src, traces, _defects = read_sources(paths)
    return traces[0].trace()


def load_trace(trace_dir: str, files: int) -> Any:
    """The first ``files`` prompts of the DeepSeek trace, via the project's importer."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "training_data_eamc", "prompt_*_data.csv")),
                   key=lambda p: int(os.path.basename(p).split("_")[1]))[:files]
    if not paths:
        raise SystemExit(f"no DeepSeek trace files under {trace_dir}")
    try:
        from moecache.trace.importers import read_sources

        _src, traces, _defects = read_sources(paths)
        return traces[0].trace()
    except ImportError:
        return _read_csv_fallback(paths)


def _read_csv_fallback(paths: list[str]) -> Any:
    """Only where moecache.trace.importers is absent: the documented CSV layout, read directly."""
    from moecache.trace import RoutingBlock, Trace, TraceMeta

    ids_all, seq_all = [], []
    for s, path in enumerate(paths):
        by_layer: dict[int, list[list[int]]] = {}
        with open(path, newline="") as f:
            for rec in csv.DictReader(f):
                by_layer.setdefault(int(rec["Layer ID"]), []).append(ast.literal_eval(rec["Activated Expert IDs"]))
        layers = sorted(by_layer)
        ids = np.stack([np.asarray(by_layer[l]) for l in layers], axis=1)
        ids_all.append(ids)
        seq_all.append(np.full(len(ids), s))
    meta = TraceMeta(num_experts=64, top_k=6, moe_layers=list(range(1, 27)), model="DeepSeek-V2-Lite-Chat")
    ids = np.concatenate(ids_all).astype(np.int16)
    return Trace(meta, RoutingBlock.build(ids, seq=np.concatenate(seq_all), phase=0))


def _load_deepseek(path: str, files: int | None) -> Any:
    if not os.path.isfile(os.path.join(path, "manifest.json")) and \
            os.path.isdir(os.path.join(path, "training_data_eamc")):
        return load_trace(path, files or 10**6)
    return open_routing(path, files)


def prepare_trace(trace: Any, layers: int | None) -> Any:
    """The trace's first ``layers`` MoE layers (all if None), without the rows that miss a record at
    any of them: a missing (-1) id would leave that (token, layer) to the random router, whose
    choice no bound or predictor could know. The other rows keep their order; the sequences stay."""
    from moecache.trace import RoutingBlock, Trace, TraceMeta

    n = trace.meta.num_layers if layers is None else int(layers)
    if not 1 <= n <= trace.meta.num_layers:
        raise ConfigError(f"--layers {n}: the trace has {trace.meta.num_layers} MoE layers; "
                          f"use 1..{trace.meta.num_layers}")
    ids = np.asarray(trace.ids)[:, :n]
    keep = (ids >= 0).all(axis=(1, 2))
    w = trace.weights
    meta = TraceMeta(**{**trace.meta.to_json(), "moe_layers": list(trace.meta.moe_layers[:n])})
    block = RoutingBlock(trace.seq[keep], trace.pos[keep], trace.token[keep], trace.step[keep], trace.phase[keep],
                         ids[keep], None if w is None else np.asarray(w)[keep][:, :n])
    out = Trace(meta, block, drops=dict(trace.drops))
    out.drops["e2e_rows_missing_a_layer"] = int((~keep).sum())
    return out


# -- shapes -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """One model shape: how to configure it, its family adapter and its real routing trace."""

    key: str
    title: str
    family: str
    make_config: Callable[[bool, int | None], Any]
    trace_dir: str
    load_trace: Callable[[str, int | None], Any]
    full_moe_layers: int
    default_layers: int | None = None  # MoE layers used when none are asked for (None: all)

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, "n_routed_experts", None) or config.num_local_experts)


SHAPES: dict[str, ModelShape] = {
    "deepseek": ModelShape("deepseek", "DeepSeek-V2-Lite shape", "deepseek_v2", deepseek_config, TRACE_DIR,
                           _load_deepseek, 26),
    # 16 of 32 layers: 43 GB of experts in pinned host memory (all 32 would need 86 GB of the
    # GPU machine's 128 GB) and 43 GB on the GPU for the all-resident baseline.
    "mixtral": ModelShape("mixtral", "Mixtral-8x7B shape", "mixtral", mixtral_config, MIXTRAL_TRACE_DIR,
                          open_routing, 32, default_layers=16),
}


def get_shape(key: str) -> ModelShape:
    if key not in SHAPES:
        raise ConfigError(f"unknown model shape {key!r}; valid: {', '.join(SHAPES)}")
    return SHAPES[key]


# -- building ---------------------------------------------------------------------------------------

@torch.no_grad()
def build_model(config: Any, family: str, dev: torch.device, dtype: torch.dtype,
                seed: int = 0) -> tuple[nn.Module, HostStore]:
    """Meta build; non-experts random on ``dev``; experts random straight into a (pinned) host store."""
    from transformers import AutoModelForCausalLM

    from moecache.families import find_moe_blocks, get_family

    with params_on_meta():  # parameters on meta, buffers (rotary frequencies) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    adapter = get_family(family)
    blocks = find_moe_blocks(model, adapter)
    E = adapter.num_experts(config)
    expert_ids = {id(p) for b in blocks for p in b.experts.parameters()}
    gen = torch.Generator(device=dev).manual_seed(seed)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) in expert_ids or p.device.type != "meta":
                continue
            value = torch.empty(p.shape, dtype=dtype, device=dev)
            if "norm" in name or name.endswith("layernorm.weight") or "norm" in type(mod).__name__.lower():
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=gen)
            mod._parameters[name] = nn.Parameter(value, requires_grad=False)
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                mod._buffers[name] = buf.to(dev)
    layout = SlotLayout.from_module(blocks[0].experts, E)
    store = HostStore(layout, len(blocks), E, HostAllocator())
    store.fill_random(seed=seed + 1, std=0.02, device=dev)
    return model, store


def build_deepseek(quick: bool, dev: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, HostStore]:
    return build_model(deepseek_config(quick), "deepseek_v2", dev, dtype, seed)


def _blocks(model: nn.Module, family: str) -> list[Any]:
    from moecache.families import find_moe_blocks, get_family

    return find_moe_blocks(model, get_family(family))


def experts_modules(model: nn.Module, family: str) -> list[nn.Module]:
    """The routed-experts modules, one per MoE layer in order."""
    return [b.experts for b in _blocks(model, family)]


def experts_module_names(model: nn.Module, family: str) -> list[str]:
    """Qualified names of the experts modules, one per MoE layer in order."""
    from moecache.families import get_family

    attr = get_family(family).experts_attr
    return [f"{b.name}.{attr}" if b.name else attr for b in _blocks(model, family)]


@torch.no_grad()
def materialise_experts(model: nn.Module, store: HostStore, dev: torch.device, family: str = "deepseek_v2") -> None:
    """Every expert on ``dev`` as the experts modules' own parameters (the all-resident model)."""
    for i, b in enumerate(_blocks(model, family)):
        for name, view in store.layer_views(i).items():
            b.experts._parameters[name] = nn.Parameter(view.to(dev, copy=True), requires_grad=False)


@torch.no_grad()
def host_expert_views(model: nn.Module, store: HostStore, family: str) -> dict[str, torch.Tensor]:
    """The experts modules' parameters set to views of the host store (no copy); returns them by
    qualified parameter name (what accelerate's ``dispatch_model`` takes as the offloaded state dict)."""
    out: dict[str, torch.Tensor] = {}
    for i, (b, qual) in enumerate(zip(_blocks(model, family), experts_module_names(model, family))):
        for name, view in store.layer_views(i).items():
            b.experts._parameters[name] = nn.Parameter(view, requires_grad=False)
            out[f"{qual}.{name}"] = view
    return out


@torch.no_grad()
def release_experts(model: nn.Module, family: str = "deepseek_v2") -> None:
    """Back to shape-only meta parameters (frees the device copies)."""
    for b in _blocks(model, family):
        for name, p in list(b.experts._parameters.items()):
            b.experts._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False)
