"""``moecache generate``: stream text from an offloaded MoE model, then print tokens/s and the cache summary.

Without ``--model`` it runs the embedded default model (``moecache.default_model``: a small
Qwen3-MoE trained on the Python standard library, shipped in the package; it writes Python-like code);
``--random-weights`` builds a model of that family with seeded random weights instead. With ``--check`` it also generates with the unpatched model (the same weights) and exits with status 1
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
from .model_options import (add_model_options, budget_of, check_model_path, dtype_of, offload_options,
                            slots_for, tokenizer_for)

DEFAULT_PROMPT = "The mixture of experts"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with an offloaded MoE model (default: the embedded one)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, seed_help="seed of the --random-weights model")
    p.add_argument("--prompt", default=None, help=f"text to continue (default: {DEFAULT_PROMPT!r}; for the "
                                                   "embedded model, the start of a Python function)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                             "whose probability reaches this (with --temperature)")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the sampler (with --temperature; --check samples the reference with it too)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compiled decode around the experts call (CUDA graphs on CUDA) with a static KV cache; "
                        "BACKEND of the compiled pieces: inductor (default), aot_eager or eager")
    p.add_argument("--stream-prefill", action="store_true",
                   help="a long prompt copies each next layer's experts while the current one computes")
    p.add_argument("--random-weights", action="store_true",
                   help="instead of the embedded trained model, build one of its family with random weights")
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


_dtype = dtype_of
_budget = budget_of
_slots_for = slots_for


def _tokenizer(path: str | None, vocab: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    encode, decode, _tok = tokenizer_for(path, vocab)
    return encode, decode


#: Marker in the ``--json`` file: an existing file is replaced only if it carries it.
JSON_MARKER = ("written_by", "moecache generate")


def check_json_output(path: str) -> None:
    """``--json PATH`` may be written: a new file in an existing folder, or a stats file of an earlier run."""
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise FileExistsError(f"--json {path} exists and is not a regular file; choose another path")
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError):
            old = None
        if not (isinstance(old, dict) and old.get(JSON_MARKER[0]) == JSON_MARKER[1]):
            raise FileExistsError(f"--json {path} exists and is not a stats file of moecache generate; refusing to "
                                  "replace it: choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--json {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: cannot write in {parent} (permission denied); choose a writable folder")


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before a model is built or loaded (``moecache.validate``)."""
    from .. import validate as V

    check_model_path(args)  # --model, the size options (shared with the other model commands)

    V.count("--max-new-tokens", args.max_new_tokens, minimum=1)
    V.count("--prefetch-depth", args.prefetch_depth, minimum=0)
    V.count("--seed", args.seed, minimum=0)
    V.real("--temperature", args.temperature, minimum=0.0)
    V.real("--top-p", args.top_p, minimum=0.0, maximum=1.0, above=True)
    V.count("--sample-seed", args.sample_seed, minimum=0)
    if args.cache_slots is not None:
        V.count("--cache-slots", args.cache_slots, minimum=1)
    if args.experts_fraction is not None:
        V.real("--experts-fraction", args.experts_fraction, minimum=0.0, maximum=1.0, above=True)
    V.device("--device", args.device)
    dtype_of(args.dtype)
    if args.model is not None:
        V.folder("--model", args.model)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ConfigError(f"--model {args.model} has no config.json; pass a checkpoint folder "
                              "(model.save_pretrained(path))")
    if args.json_out:
        check_json_output(args.json_out)
    from ..policies import POLICIES
    from ..predictors import PREDICTORS
    from ..runtime.engine import COPY_ENGINES
    from ..runtime.hybrid import HybridConfig

    POLICIES.get(args.policy)
    if args.predictor not in (None, "none"):
        cls = PREDICTORS.get(args.predictor)
        if cls.needs_fit:  # a name builds an unfitted predictor: say so before the model loads
            raise ConfigError(f"--predictor {args.predictor}: a fitted predictor is needed and generate has no way to "
                              f"pass one; use the Python API (moecache.offload(model, predictor=...)): {cls.fit_hint}")
    V.choice("--copy-engine", args.copy_engine, ["auto", *COPY_ENGINES.names()])
    HybridConfig.resolve(args.hybrid or False)


def _reference(model: Any, fmt: Any, x: Any, n: int, sampling: dict[str, Any]) -> Any:
    """The unpatched model's tokens; with a compressed format, those of a copy whose experts are quantized and
    dequantized in place (what the offloaded model computes)."""
    if fmt is None:
        return _generate(model, x, n, None, sampling)
    import copy

    from ..quant import quantize_dequantize_

    return _generate(quantize_dequantize_(copy.deepcopy(model), fmt), x, n, None, sampling)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.model is not None and args.random_weights:
        raise ConfigError("--random-weights builds the embedded model's family; drop it or drop --model")
    check_args(args)

    from ..default_model import (EMBEDDED_LABEL, EMBEDDED_PROMPT, RANDOM_WEIGHTS_LABEL, default_model,
                                 embedded_available, embedded_model)
    from ..runtime import offload

    check_model_path(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    err = sys.stderr
    if args.model is None and not args.random_weights and not embedded_available():
        print("moecache generate: the embedded trained model is not in this install (moecache/assets/README.md "
              "says how to train it); using random weights", file=err)
        args.random_weights = True
    if args.prompt is None:
        args.prompt = EMBEDDED_PROMPT if args.model is None and not args.random_weights else DEFAULT_PROMPT
    budget = _budget(args)
    sampling = _sampling(args)
    opts = offload_options(args, device)
    opts["stream_prefill"] = args.stream_prefill
    if args.compile:
        opts.update(compile=args.compile, max_cache_len=len(args.prompt) + args.max_new_tokens + 8)
    from ..quant import resolve_format

    # --check's reference: the model with its experts quantized and dequantized in place (auto/bf16: none)
    fmt = resolve_format(args.expert_dtype, args.group_size) if args.expert_dtype != "mxfp4" else None
    reference = None
    if args.model is None:
        dtype = _dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        if args.random_weights:
            print(f"moecache generate: {RANDOM_WEIGHTS_LABEL}, seed {args.seed}, {dtype}, on {device}", file=err)
            model = default_model(seed=args.seed, dtype=dtype).to(device)
        else:
            print(f"moecache generate: {EMBEDDED_LABEL}, {dtype}, on {device}", file=err)
            model = embedded_model(dtype=dtype).to(device)
        encode, decode = _tokenizer(None, model.config.vocab_size)
        x = torch.tensor([encode(args.prompt)], device=device)
        if args.check:
            reference = _reference(model, fmt, x, args.max_new_tokens, sampling)
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

            from ..loading import checkpoint_format

            resolve_format(args.expert_dtype, args.group_size, checkpoint_format=checkpoint_format(path))
            plain = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(args.dtype) or "auto").to(device).eval()
            encode, decode = _tokenizer(path, plain.config.vocab_size)
            x = torch.tensor([encode(args.prompt)], device=device)
            reference = _reference(plain, fmt, x, args.max_new_tokens, sampling)
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
    out = _generate(model, x, args.max_new_tokens, streamer, sampling)
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

        write_json_atomic(args.json_out, {JSON_MARKER[0]: JSON_MARKER[1], **json.loads(json.dumps(stats, default=str))})
    handle.remove()
    return status


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s sampling arguments and the sampler's seed (greedy when the temperature is 0)."""
    if args.temperature == 0:
        return {"do_sample": False, "seed": None}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0,
            "seed": args.sample_seed}


def _generate(model: Any, x: Any, n: int, streamer: Any, sampling: dict[str, Any]) -> Any:
    """``n`` new tokens; a sampled run reseeds first, so the patched and the reference model draw alike."""
    import torch

    options = dict(sampling)
    seed = options.pop("seed")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(x, max_new_tokens=n, min_new_tokens=n, streamer=streamer,
                              attention_mask=torch.ones_like(x), **options)
