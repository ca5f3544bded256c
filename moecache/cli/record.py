"""``moecache record``: generate from a file of prompts and write the routing trace, with a progress bar.

Prompts: a text file with one prompt per line (blank lines skipped), or a JSONL file (``.jsonl``, or
a first line that is a JSON object) whose lines carry a ``prompt`` string. Each batch of --batch
prompts is left-padded and generated greedily for --max-new-tokens tokens; every forward pass is
recorded (``moecache.record``: prompt rows as prefill, generated ones as decode). With --offload
the model runs offloaded (the same routing; for a model that does not fit on the device).

A killed run (even ``kill -9``) leaves OUT.partial with every flushed chunk readable; ``moecache
trace finalise OUT`` completes it. Chunks are flushed every --flush-rows rows or --flush-seconds
seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..errors import ConfigError
from .model_options import add_model_options, check_model_path, dtype_of, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="generate from a prompts file and record the routing trace",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line, or JSONL with 'prompt'")
    p.add_argument("-o", "--out", required=True, metavar="OUT.trace", help="the trace folder to write")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="prompts generated together (left-padded)")
    p.add_argument("--offload", action="store_true",
                   help="run the model offloaded (the budget, policy and engine options apply): for a model that "
                        "does not fit on the device; the routing is the same")
    add_model_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing trace (or OUT.partial) at OUT")
    p.add_argument("--flush-rows", type=int, default=16384, help="rows per chunk written to disk")
    p.add_argument("--flush-seconds", type=float, default=10.0, help="also flush buffered rows this often")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path``; one-line errors name the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    first = next((ln for ln in lines if ln.strip()), "")
    jsonl = path.endswith(".jsonl") or first.lstrip().startswith("{")
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not a JSON object ({e.msg}); write one {{\"prompt\": ...}} per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{i}: needs a \"prompt\" string field")
        if row["prompt"]:
            prompts.append(row["prompt"])
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts (one per line, or JSONL with a \"prompt\" field)")
    return prompts


def check_args(args: argparse.Namespace) -> list[str]:
    """Everything checked before the model is loaded; returns the prompts."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.flush_rows < 1 or args.flush_seconds <= 0:
        raise ConfigError("--flush-rows must be >= 1 and --flush-seconds > 0")
    for p in (args.out, args.out + ".partial"):
        if os.path.exists(p) and not args.force:
            raise ConfigError(f"{p} already exists; pass --force to replace it or choose another -o")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise ConfigError(f"-o {args.out}: the folder {parent} does not exist")
    if not args.offload:
        given = [flag for flag, value in (("--gpu-memory", args.gpu_memory), ("--cache-slots", args.cache_slots),
                                          ("--experts-fraction", args.experts_fraction),
                                          ("--predictor", args.predictor), ("--hybrid", args.hybrid))
                 if value is not None]
        if given:
            raise ConfigError(f"{given[0]} applies to an offloaded model; add --offload (or leave {given[0]} out)")
    check_model_path(args)
    dtype_of(args.dtype)
    return read_prompts(args.prompts)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import moecache

    prompts = check_args(args)
    loaded = load_model(args, "record", offloaded=args.offload)
    model, encode = loaded.model, loaded.encode
    encoded = [encode(p) for p in prompts]  # bad characters fail here, before the trace is opened
    if any(not ids for ids in encoded):
        raise ConfigError("a prompt encodes to no tokens; remove empty prompts")
    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    device = torch.device(loaded.device)
    bar = tqdm(total=len(prompts), unit="prompt", desc="record", disable=args.quiet or not sys.stderr.isatty(),
               file=sys.stderr)
    t0 = time.perf_counter()
    try:
        with moecache.record(model, args.out, overwrite=args.force, flush_rows=args.flush_rows,
                             flush_seconds=args.flush_seconds, model_name=loaded.name) as rec:
            for start in range(0, len(encoded), args.batch):
                batch = encoded[start:start + args.batch]
                width = max(len(ids) for ids in batch)
                x = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
                mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
                with torch.no_grad():
                    model.generate(x, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   pad_token_id=pad)
                bar.update(len(batch))
    except KeyboardInterrupt:
        bar.close()
        print(f"moecache record: interrupted; {args.out}.partial keeps the flushed rows: "
              f"`moecache trace finalise {args.out}` completes it", file=sys.stderr)
        return 130
    bar.close()
    if loaded.handle is not None:
        loaded.handle.remove()
    wall = time.perf_counter() - t0
    print(f"recorded {rec.rows:,} tokens of {len(prompts)} prompts in {wall:.1f} s -> {rec.path}", file=sys.stderr)
    return 0
