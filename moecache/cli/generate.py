"""``moecache generate``: stream text from an offloaded MoE model, then print tokens/s and the cache summary.

Without ``--model`` it runs the embedded default model (``moecache.default_model``: Qwen3-MoE
architecture, random weights built on the fly, seeded) and labels its output as random. With
``--check`` it also generates with the unpatched model (the same weights) and exits with status 1
unless the tokens are identical.

Tokenisation: a checkpoint with tokenizer files uses ``AutoTokenizer``; a checkpoint without one
whose vocabulary fits in bytes (<= 256 ids, like ``qwen3moe-tiny-code``) and the default model use
bytes as tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from ..errors import ConfigError
from .options import DeprecatedFlag

DEFAULT_PROMPT = "The mixture of experts"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with an offloaded MoE model (default: the embedded one)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local checkpoint folder (safetensors); default: the embedded random model")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpu-memory", help="device budget for non-expert weights + expert pool, e.g. 8GiB")
    budget.add_argument("--cache-slots", type=int, help="experts in the device pool")
    budget.add_argument("--experts-fraction", type=float, default=None,
                        help="pool size as a share of all experts (default 0.25 when no budget is given)")
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
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: checkpoint's; default model: "
                                                    "bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the embedded model's random weights")
    p.add_argument("--check", action="store_true", help="compare the tokens with the unpatched model's")
    p.add_argument("--json", dest="json_out", help="also write the stats as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not the streamed text")
    p.set_defaults(func=run)


class _Streamer:
    """The ``streamer`` protocol of ``generate``: prints new tokens as they come."""

    def __init__(self, decode: Callable[[list[int]], str], out: Any, enabled: bool):
        self.decode = decode
        self.out = out
        self.enabled = enabled
        self.prompt_seen = False
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.decode(self.ids)
        if self.enabled and len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; use e.g. float32, bfloat16, float16")
    return dt


def _tokenizer(path: str | None, vocab: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    from .. import default_model as dm

    if path is not None and any(os.path.isfile(os.path.join(path, f))
                                for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        return (lambda s: tok(s)["input_ids"]), (lambda ids: tok.decode(ids, skip_special_tokens=True))
    if vocab <= 256:
        def encode(text: str) -> list[int]:
            ids = dm.encode(text)
            if ids and max(ids) >= vocab:
                raise ConfigError(f"the prompt has byte values up to {max(ids)} but the model's byte vocabulary has "
                                  f"{vocab} ids; use characters below {chr(vocab) if vocab < 128 else vocab!r}")
            return ids

        return encode, dm.decode
    raise ConfigError(f"{path} has no tokenizer files and a vocabulary of {vocab} ids; add a tokenizer to the folder")


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    if args.gpu_memory is not None:
        return {"gpu_memory": args.gpu_memory}
    if args.cache_slots is not None:
        return {"cache_slots": args.cache_slots}
    return {"fraction": 0.25 if args.experts_fraction is None else args.experts_fraction}


def _slots_for(model: Any, fraction: float) -> int:
    from ..families import detect_family, find_moe_blocks

    adapter = detect_family(model)
    total = len(find_moe_blocks(model, adapter)) * adapter.num_experts(model.config)
    if not 0 < fraction <= 1:
        raise ConfigError(f"--experts-fraction must be in (0, 1], got {fraction}")
    return max(adapter.top_k(model.config), int(round(total * fraction)))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..default_model import RANDOM_WEIGHTS_LABEL, default_model
    from ..runtime import offload

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = _budget(args)
    opts = dict(policy=args.policy, predictor=args.predictor, prefetch_depth=args.prefetch_depth, engine=args.copy_engine,
                device=device, hybrid=args.hybrid or False)
    err = sys.stderr
    reference = None
    if args.model is None:
        dtype = _dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        print(f"moecache generate: {RANDOM_WEIGHTS_LABEL}, seed {args.seed}, {dtype}, on {device}", file=err)
        model = default_model(seed=args.seed, dtype=dtype).to(device)
        encode, decode = _tokenizer(None, model.config.vocab_size)
        x = torch.tensor([encode(args.prompt)], device=device)
        if args.check:
            reference = _generate(model, x, args.max_new_tokens, None)
        if "fraction" in budget:
            budget = {"cache_slots": _slots_for(model, budget.pop("fraction"))}
        handle = offload(model, **budget, **opts)
    else:
        from ..loading import from_pretrained

        path = args.model
        if "fraction" in budget:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                from transformers import AutoModelForCausalLM

                skeleton = AutoModelForCausalLM.from_config(cfg)
            budget = {"cache_slots": _slots_for(skeleton, budget.pop("fraction"))}
            del skeleton
        if args.check:
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(args.dtype) or "auto").to(device).eval()
            encode, decode = _tokenizer(path, plain.config.vocab_size)
            x = torch.tensor([encode(args.prompt)], device=device)
            reference = _generate(plain, x, args.max_new_tokens, None)
            del plain
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        model = from_pretrained(path, dtype=_dtype(args.dtype), **budget, **opts)
        handle = model.moecache
        encode, decode = _tokenizer(path, model.config.vocab_size)
        x = torch.tensor([encode(args.prompt)], device=device)
        print(f"moecache generate: {path} on {device}", file=err)
    if not args.quiet:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    streamer = _Streamer(decode, sys.stdout, not args.quiet)
    t0 = time.perf_counter()
    out = _generate(model, x, args.max_new_tokens, streamer)
    wall = time.perf_counter() - t0
    new = out.shape[1] - x.shape[1]
    stats = handle.stats()
    print(f"{new} tokens in {wall:.2f} s ({new / wall:.1f} tokens/s end to end)", file=err)
    print(handle.summary(), file=err)
    status = 0
    if reference is not None:
        if torch.equal(out.cpu(), reference.cpu()):
            print(f"check: the {new} generated tokens are identical to the unpatched model's", file=err)
        else:
            a, b = out[0].tolist(), reference[0].tolist()
            first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
            print(f"check FAILED: tokens differ from the unpatched model's at position {first}", file=err)
            status = 1
        stats["check"] = status == 0
    if args.json_out:
        from ..atomic import write_json_atomic

        write_json_atomic(args.json_out, json.loads(json.dumps(stats, default=str)))
    handle.remove()
    return status


def _generate(model: Any, x: Any, n: int, streamer: Any) -> Any:
    import torch

    with torch.no_grad():
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                              attention_mask=torch.ones_like(x))
