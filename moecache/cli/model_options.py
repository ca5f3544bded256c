"""The model and offload options that ``generate``, ``serve`` and ``record`` share, and the loader they use.

Without ``--model`` the embedded default model (``moecache.default_model``) is built; with it, a
local checkpoint folder is loaded straight into the offloaded layout (``moecache.from_pretrained``).
Tokenisation: a checkpoint with tokenizer files uses ``AutoTokenizer``; one without whose vocabulary
fits in bytes (<= 256 ids) and the default model use bytes as tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from .options import DeprecatedFlag


def add_model_options(p: argparse.ArgumentParser, *, seed_help: str | None = None) -> None:
    """``--model``, the budget, policy, predictor, copy engine, hybrid, device and dtype options."""
    p.add_argument("--model", help="local checkpoint folder (safetensors); default: the embedded model")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", help="device budget for non-expert weights + expert pool, e.g. 8GiB; 'auto': "
                                             "the free device memory less the KV cache (--max-context) and a margin; "
                                             "prints the plan")
    budget.add_argument("--cache-slots", type=int, help="experts in the device pool")
    budget.add_argument("--experts-fraction", type=float, default=None,
                        help="pool size as a share of all experts (default 0.25 when no budget is given)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of context the KV cache must hold, planned by --gpu-memory auto (default: the model's "
                        "limit, at most 4096)")
    p.add_argument("--host-memory", default=None,
                   help="host budget, e.g. 64GiB, or 'auto' (the memory available now; the default for --model): a "
                        "model whose experts do not fit is refused before loading")
    p.add_argument("--policy", default="lru")
    p.add_argument("--predictor", default=None, help="prefetch predictor name (default: none)")
    p.add_argument("--prefetch-depth", type=int, default=1)
    p.add_argument("--copy-engine", default="auto",
                   help="how experts are copied to the GPU: auto (default), worker (the C++ copy thread), stream "
                        "(a CUDA side stream) or sync")
    p.add_argument("--engine", dest="copy_engine", action=DeprecatedFlag, new_flag="--copy-engine")
    p.add_argument("--hybrid", nargs="?", const="auto", default=None, metavar="RULE",
                   help="run missed experts on the CPU too: auto (a cost model measured at start-up picks copy or "
                        "CPU per miss; the default when the flag has no value), cpu (every miss on the CPU), copy "
                        "(never); the kernel follows $MOECACHE_CPU_KERNEL")
    p.add_argument("--expert-dtype", default="auto",
                   help="routed experts' format: auto (the checkpoint's own: MXFP4 for GPT-OSS, else the model dtype), "
                        "int8 or int4 (group-wise, stored, copied and cached compressed)")
    p.add_argument("--group-size", type=int, default=None, help="int8/int4 group size along each matrix's input "
                                                                "dimension: 32, 64 (default) or 128")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: checkpoint's; default model: "
                                                    "bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help=seed_help or "seed of the embedded model's random weights")


def dtype_of(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(f"--dtype {name!r} is not a floating-point dtype; use e.g. float32, bfloat16, float16")
    return dt


def tokenizer_for(path: str | None, vocab: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], Any]:
    """``(encode, decode, tokenizer)``; ``tokenizer`` is the transformers tokenizer, or None for bytes."""
    from .. import default_model as dm

    if path is not None and any(os.path.isfile(os.path.join(path, f))
                                for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return (lambda s: tok(s)["input_ids"]), (lambda ids: tok.decode(ids, skip_special_tokens=True)), tok
    if vocab <= 256:
        def encode(text: str) -> list[int]:
            ids = dm.encode(text)
            if ids and max(ids) >= vocab:
                raise ConfigError(f"the prompt has byte values up to {max(ids)} but the model's byte vocabulary has "
                                  f"{vocab} ids; use characters below {chr(vocab) if vocab < 128 else vocab!r}")
            return ids

        return encode, dm.decode, None
    raise ConfigError(f"{path} has no tokenizer files and a vocabulary of {vocab} ids; add a tokenizer to the folder")


def budget_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.gpu_memory is not None:
        return {"gpu_memory": args.gpu_memory}
    if args.cache_slots is not None:
        return {"cache_slots": args.cache_slots}
    return {"fraction": 0.25 if args.experts_fraction is None else args.experts_fraction}


def slots_for(model: Any, fraction: float) -> int:
    from ..families import detect_family, find_moe_blocks

    adapter = detect_family(model)
    total = len(find_moe_blocks(model, adapter)) * adapter.num_experts(model.config)
    if not 0 < fraction <= 1:
        raise ConfigError(f"--experts-fraction must be in (0, 1], got {fraction}")
    return max(adapter.top_k(model.config), int(round(total * fraction)))


def offload_options(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The keyword arguments of ``moecache.offload`` the options give (besides the budget)."""
    opts: dict[str, Any] = dict(policy=args.policy, predictor=args.predictor, prefetch_depth=args.prefetch_depth,
                                engine=args.copy_engine, device=device, hybrid=args.hybrid or False,
                                expert_dtype=getattr(args, "expert_dtype", "auto"),
                                group_size=getattr(args, "group_size", None))
    if getattr(args, "max_context", None) is not None:
        opts["max_context"] = args.max_context
    if getattr(args, "host_memory", None) is not None:
        opts["host_memory"] = args.host_memory
    if getattr(args, "batch", None) is not None and getattr(args, "gpu_memory", None) is not None \
            and str(args.gpu_memory).strip().lower() == "auto":
        opts["batch"] = args.batch  # record --batch: the KV cache the plan leaves room for
    return opts


def check_model_path(args: argparse.Namespace) -> None:
    """Fail before any loading when ``--model`` is not a folder or a size option cannot be read."""
    if args.model is not None and not os.path.isdir(args.model):
        raise ConfigError(f"--model {args.model}: no such folder; pass a local checkpoint folder (safetensors)")
    from ..runtime.offload import parse_bytes

    for flag, value in (("--gpu-memory", getattr(args, "gpu_memory", None)),
                        ("--host-memory", getattr(args, "host_memory", None))):
        if value is not None and value.strip().lower() != "auto":
            try:
                parse_bytes(value)
            except ConfigError:
                raise ConfigError(f"{flag} {value!r}: write e.g. 8GiB, 512MiB, 16GB or auto") from None
    if getattr(args, "max_context", None) is not None and args.max_context < 1:
        raise ConfigError(f"--max-context must be >= 1, got {args.max_context}")


@dataclass
class LoadedModel:
    """An offloaded model with its tokenisation, as the commands use it."""

    model: Any
    handle: Any
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    tokenizer: Any          # transformers tokenizer, or None (bytes as tokens)
    name: str               # the folder's name, or "moecache-default"
    device: str


def load_model(args: argparse.Namespace, command: str, *, offloaded: bool = True, **default_overrides: Any) -> LoadedModel:
    """Build or load the model the options name, offloaded per the budget options (``offloaded=False``:
    as transformers loads it, for recording the unpatched model). Says what it loads on stderr.
    ``default_overrides`` change the embedded model's config (tests use a smaller one)."""
    import torch

    from ..default_model import EMBEDDED_LABEL, RANDOM_WEIGHTS_LABEL, default_model, embedded_available, embedded_model

    check_model_path(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    if offloaded:
        budget = budget_of(args)
        opts = offload_options(args, device)
    if args.model is None:
        dtype = dtype_of(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if not default_overrides and embedded_available():
            # The trained embedded model; overrides (tests) ask for the random-weights builder.
            print(f"moecache {command}: {EMBEDDED_LABEL}, {dtype}, on {device}", file=sys.stderr)
            model = embedded_model(dtype=dtype).to(device)
        else:
            print(f"moecache {command}: {RANDOM_WEIGHTS_LABEL}, seed {args.seed}, {dtype}, on {device}",
                  file=sys.stderr)
            model = default_model(seed=args.seed, dtype=dtype, **default_overrides).to(device)
        encode, decode, tok = tokenizer_for(None, model.config.vocab_size)
        handle = None
        if offloaded:
            from ..runtime import offload

            if "fraction" in budget:
                budget = {"cache_slots": slots_for(model, budget.pop("fraction"))}
            handle = offload(model, **budget, **opts)
        return LoadedModel(model, handle, encode, decode, tok, "moecache-default", device)
    path = args.model
    if not offloaded:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_of(args.dtype) or "auto").to(device).eval()
        encode, decode, tok = tokenizer_for(path, model.config.vocab_size)
        print(f"moecache {command}: {path} on {device} (not offloaded)", file=sys.stderr)
        return LoadedModel(model, None, encode, decode, tok, os.path.basename(os.path.normpath(path)), device)
    from ..loading import from_pretrained

    if "fraction" in budget:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        budget = {"cache_slots": slots_for(skeleton, budget.pop("fraction"))}
        del skeleton
    model = from_pretrained(path, dtype=dtype_of(args.dtype), **budget, **opts)
    encode, decode, tok = tokenizer_for(path, model.config.vocab_size)
    print(f"moecache {command}: {path} on {device}", file=sys.stderr)
    return LoadedModel(model, model.moecache, encode, decode, tok, os.path.basename(os.path.normpath(path)), device)
