"""``python -m moecache.demo`` (what ``make demo`` runs): the embedded model, offloaded, end to end.

1. ``moecache generate --check``: the embedded model (trained on the Python standard library) writes
   code with its experts offloaded (a quarter of them in the device pool, LRU), sampling at
   ``SAMPLING`` with a fixed seed; the tokens are compared with the unpatched model's, sampled alike.
2. Records the model's routing while it writes from a few code prompts (``moecache.record``).
3. Prints a short analysis of that trace: ``moecache trace info`` and ``moecache bench`` (hit rates of
   LRU and Belady's optimum at two pool sizes).

Runs on CUDA where present, else the CPU; the trace goes to ``--out`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

#: Code the recorded run continues (the start of functions, as a user might type them).
RECORD_PROMPTS = (
    "def read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "def parse_args(args):\n    \"\"\"Parse the command line.\"\"\"\n",
)


#: The sampling of the generate step: greedy decoding of a model this small tends to repeat one line.
SAMPLING = ("--temperature", "0.8", "--top-p", "0.95", "--sample-seed", "0")


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def record_trace(path: str, device: str, new_tokens: int) -> str:
    """Record the embedded model's routing while it continues ``RECORD_PROMPTS``; returns the trace path."""
    import torch

    from . import record
    from .default_model import default_model, embedded_available, embedded_model, encode

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = (embedded_model(dtype=dtype) if embedded_available() else default_model(dtype=dtype)).to(device)
    with record(model, path, model_name="moecache-embedded"):
        for prompt in RECORD_PROMPTS:
            x = torch.tensor([encode(prompt)], device=device)
            with torch.no_grad():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moecache.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for the trace (default: a temporary folder)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens the generate step writes")
    ap.add_argument("--record-tokens", type=int, default=48, help="tokens per recorded prompt")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    args = ap.parse_args(argv)
    import torch

    from .cli import main as cli

    if args.out is not None and os.path.exists(os.path.join(args.out, "embedded.trace")):
        print(f"moecache demo: error: {os.path.join(args.out, 'embedded.trace')} exists; pass another --out or "
              f"remove it", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _banner("moecache generate --check: the embedded model writes code with its experts offloaded")
    rc = cli(["generate", "--check", "--max-new-tokens", str(args.max_new_tokens), *SAMPLING, "--device", device])
    if rc != 0:
        return rc
    out = args.out or tempfile.mkdtemp(prefix="moecache-demo-")
    os.makedirs(out, exist_ok=True)
    trace = os.path.join(out, "embedded.trace")
    _banner(f"moecache.record: routing of {len(RECORD_PROMPTS)} code prompts x {args.record_tokens} tokens "
            f"-> {trace}")
    record_trace(trace, device, args.record_tokens)
    _banner("moecache trace info")
    rc = cli(["trace", "info", trace])
    if rc != 0:
        return rc
    _banner("moecache bench: expert-cache hit rates of that routing (LRU vs Belady's optimum)")
    rc = cli(["bench", trace, "--policies", "lru,belady", "--capacity", "25%,50%", "--quiet"])
    print(f"\nFull HTML report of the routing: moecache analyze {trace} -o {os.path.join(out, 'report')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
