"""Build the moecache traces that the policy suite (eval/suite.toml) replays, under build/suite_traces/.

    .venv/bin/python eval/suite_traces.py [--out build/suite_traces] [--force]

From ../shared/data/routing (each source's SOURCE.md says what it is), with moecache.trace.importers:

* ``mixtral``: Mixtral-8x7B decode routing, GSM8K and HumanEval logs as one trace (4 requests);
* ``llama4-mmlu``: Llama-4-Maverick, 235 MMLU requests (prefill chunk + decode steps);
* ``deepseek-v2-lite``: DeepSeek-V2-Lite-Chat prefill of 600 chat prompts;
* ``qwen1.5-moe/layer<L>``: Qwen1.5-MoE, one single-layer trace per logged layer (the vLLM logger's
  runs are separate and cannot be aligned into tokens, so the importer never merges them).

From ../shared/data/models/qwen3moe-tiny-code, the trained model, recorded with ``moecache.record``:

* ``qwen3moe-tiny-code``: its routing on ``heldout_sample.txt`` (NumPy/SciPy sources it never saw in
  training), ``--tiny-sequences`` consecutive windows of ``--tiny-length`` bytes, each one prefill
  forward pass (teacher forcing: a causal model routes a token in prefill as it would when decoding
  it after the same prefix), fp32 on the CPU.

A trace that already exists is kept (``--force`` rebuilds it). Where ../shared is absent, each
missing source is skipped with a message and the script still exits 0. ``build/`` is git-ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MOECACHE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
ROUTING = os.path.join(SHARED, "data", "routing")
TINY_MODEL = os.path.join(SHARED, "data", "models", "qwen3moe-tiny-code")

#: (trace name under OUT, sources relative to ROUTING). A source folder means every log in it.
IMPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mixtral", ("mixtral-8x7b-instruct-v0.1-fp8__speculative-moe/gsm8k_2_routing.jsonl",
                 "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe/humaneval_2_routing.jsonl")),
    ("llama4-mmlu", ("llama-4-maverick-17b-128e-instruct__patterns-behind-chaos-subset",)),
    ("deepseek-v2-lite", ("deepseek-v2-lite-chat__moe-beyond/training_data_eamc",)),
    ("qwen1.5-moe", ("qwen1.5-moe-a2.7b-chat__vllm-moe-logger",)),
)


def _exists(path: str) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json")) or (
        os.path.isdir(path) and any(os.path.exists(os.path.join(path, d, "manifest.json")) for d in os.listdir(path)))


def import_all(out: str, force: bool) -> list[str]:
    from moecache.trace.importers import import_traces

    done = []
    for name, rel in IMPORTS:
        sources = [os.path.join(ROUTING, r) for r in rel]
        missing = [s for s in sources if not os.path.exists(s)]
        target = os.path.join(out, name)
        if missing:
            print(f"skip {name}: source not found ({missing[0]}); ../shared is absent or incomplete")
            continue
        if _exists(target) and not force:
            print(f"keep {target} (exists; --force rebuilds it)")
            done.append(target)
            continue
        t0 = time.time()
        report = import_traces(sources, target, overwrite=force)
        for w in report.written:
            print(f"wrote {w.path}: {w.rows:,} tokens, {w.sequences} sequence(s), drops {w.drops or 'none'} "
                  f"({time.time() - t0:.1f} s)")
        done.append(target)
    return done


def record_tiny(out: str, force: bool, sequences: int, length: int, batch: int) -> str | None:
    """Record the trained model's routing on held-out text (see the module docstring)."""
    target = os.path.join(out, "qwen3moe-tiny-code")
    if not os.path.isfile(os.path.join(TINY_MODEL, "config.json")):
        print(f"skip qwen3moe-tiny-code: trained model not found at {TINY_MODEL}")
        return None
    if _exists(target) and not force:
        print(f"keep {target} (exists; --force rebuilds it)")
        return target
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    import moecache

    with open(os.path.join(TINY_MODEL, "heldout_sample.txt"), "rb") as f:
        data = f.read(sequences * length)
    if len(data) < sequences * length:
        raise SystemExit(f"heldout_sample.txt has {len(data)} bytes, fewer than {sequences} x {length}")
    windows = [list(data[i * length:(i + 1) * length]) for i in range(sequences)]
    if any(b > 127 for w in windows for b in w):
        raise SystemExit("heldout_sample.txt is not ASCII; the model's tokens are ASCII bytes (SOURCE.md)")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    if force and os.path.exists(target):
        shutil.rmtree(target)
    with torch.no_grad(), moecache.record(model, target, model_name="qwen3moe-tiny-code") as rec:
        for i in range(0, sequences, batch):
            ids = torch.tensor(windows[i:i + batch], dtype=torch.long)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    t = rec.trace()
    print(f"wrote {target}: {len(t):,} tokens, {sequences} sequences of {length} held-out bytes "
          f"({time.time() - t0:.1f} s)")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "suite_traces"))
    ap.add_argument("--force", action="store_true", help="rebuild traces that exist")
    ap.add_argument("--tiny-sequences", type=int, default=64, help="held-out windows recorded (default 64)")
    ap.add_argument("--tiny-length", type=int, default=256, help="bytes per window (default 256)")
    ap.add_argument("--tiny-batch", type=int, default=16, help="windows per forward pass (default 16)")
    args = ap.parse_args(argv)
    if not os.path.isdir(SHARED):
        print(f"../shared not found at {SHARED}: nothing to build (set MOECACHE_SHARED to its location)")
        return 0
    os.makedirs(args.out, exist_ok=True)
    import_all(args.out, args.force)
    record_tiny(args.out, args.force, args.tiny_sequences, args.tiny_length, args.tiny_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
