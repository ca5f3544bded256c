"""Quality of the embedded model: held-out bits per byte, and how much of its generated code tokenizes.

1. Bits per byte on the held-out part of the training recipe (the standard library files that
   ``eval/train_embedded_model.py data`` holds out; rebuilt here from this machine's Python 3.11 and
   checked against the sha256 recorded with the model), cut into non-overlapping windows of
   ``--context`` bytes, fp32 on the CPU. ``--heldout-bytes N`` scores the first N bytes only.
2. Generated lines that tokenize as Python: prompts are the first lines of held-out files, from their
   first ``def``/``class`` line (code the model never saw). For each prompt the model writes up to
   ``--new-tokens`` bytes (greedy, and sampled at temperature 0.8 / top-p 0.95 with a fixed seed). The
   prompt plus its continuation goes through ``tokenize`` as one stream; a generated line fails when a
   token error (``ERRORTOKEN``, e.g. an unterminated one-line string or a stray ``$``) starts on it or the
   tokenizer raises on it (an inconsistent dedent); the tokenizer then restarts on the next line. A
   construct left open at the end (a bracket or a triple-quoted string cut by the length limit) is not an
   error, and the last line is not counted when it was cut mid-line.

Needs Python 3.11's ``tokenize`` (3.12 rewrote it), which the recipe pins anyway.

    python eval/embedded_model_quality.py --json eval/results/embedded_model_quality.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
import tokenize
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval"))


def line_flags(prompt: str, completion: str) -> list[bool]:
    """One flag per counted generated line of ``completion``: True where it tokenizes (see the module doc)."""
    text = prompt + completion
    lines = text.splitlines(keepends=True)
    first_gen = len(prompt.splitlines(keepends=True))
    counted = list(range(first_gen, len(lines)))
    if counted and not lines[-1].endswith("\n"):
        counted.pop()  # cut mid-line by the length limit
    bad: set[int] = set()
    start = 0
    while start < len(lines):
        chunk = iter(lines[start:])
        try:
            for tok in tokenize.generate_tokens(lambda: next(chunk, "")):
                if tok.type == tokenize.ERRORTOKEN and not tok.string.isspace():
                    bad.add(start + tok.start[0] - 1)
            break
        except IndentationError as e:
            row = start + (e.lineno or 1) - 1
            bad.add(row)
            start = row + 1
        except tokenize.TokenError:
            break  # a construct left open at the end of the text
    return [i not in bad for i in counted if lines[i].strip()]


def code_prompts(heldout_files: list[str], stdlib: Path, n: int, lines: int) -> list[tuple[str, str]]:
    prompts = []
    for rel in heldout_files:
        src = (stdlib / rel).read_text("utf-8").splitlines(keepends=True)
        at = next((i for i, ln in enumerate(src) if ln.startswith(("def ", "class "))), None)
        if at is None or at + lines > len(src):
            continue
        text = "".join(src[at:at + lines])
        if text.isascii():
            prompts.append((rel, text))
        if len(prompts) == n:
            break
    return prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--stdlib", default="/root/.pyenv/versions/3.11.7/lib/python3.11",
                    help="the Python 3.11 standard library the recipe read")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--heldout-bytes", type=int, default=0, help="score only the first N held-out bytes (0: all)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-lines", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--samples", default=None, help="write the generated texts to this file")
    args = ap.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"error: this measure uses Python 3.11's tokenize; this is {platform.python_version()}",
              file=sys.stderr)
        return 2

    import hashlib
    import warnings

    import torch

    from moecache.default_model import EMBEDDED_MODEL_DIR, decode, embedded_model, encode
    from train_embedded_model import HELDOUT_FIRST_BYTE_BELOW, heldout_bits_per_byte, pack, select_files

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else EMBEDDED_MODEL_DIR
    recipe = json.loads((model_dir / "training.json").read_text())
    stdlib = Path(args.stdlib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, heldout_files, _ = select_files(stdlib)
    blob = pack(stdlib, heldout_files)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != recipe["data"]["heldout"]["sha256"]:
        print(f"error: the held-out data rebuilt from {stdlib} has sha256 {digest}, the model's recipe "
              f"{recipe['data']['heldout']['sha256']}; pass --stdlib of Python {recipe['data']['python']}",
              file=sys.stderr)
        return 2
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        model = embedded_model(torch.float32)
    result: dict = {"machine": platform.node(), "cpu_threads": torch.get_num_threads(),
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
                    "heldout_sha256": digest, "heldout_rule": f"sha256(relative path)[0] < {HELDOUT_FIRST_BYTE_BELOW}"}

    data = torch.frombuffer(bytearray(blob[:args.heldout_bytes] if args.heldout_bytes else blob), dtype=torch.uint8)
    t0 = time.perf_counter()
    bpb, scored = heldout_bits_per_byte(model, data, args.context, 16, "cpu")
    result["heldout_bits_per_byte"] = round(bpb, 4)
    result["heldout_bytes_scored"] = scored
    result["heldout_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"held-out: {bpb:.4f} bits/byte over {scored:,} bytes ({result['heldout_seconds']} s)")

    prompts = code_prompts(heldout_files, stdlib, args.prompts, args.prompt_lines)
    samples = []
    totals: dict[str, list[int]] = {"greedy": [0, 0], "sampled": [0, 0]}
    for k, (rel, prompt) in enumerate(prompts):
        x = torch.tensor([encode(prompt)])
        for mode in ("greedy", "sampled"):
            torch.manual_seed(args.seed + k)
            kw = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if mode == "sampled" else \
                dict(do_sample=False)
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                     eos_token_id=2, pad_token_id=0, **kw)
            completion = decode(out[0, x.shape[1]:].tolist()).split("\x02")[0]
            flags = line_flags(prompt, completion)
            totals[mode][0] += sum(flags)
            totals[mode][1] += len(flags)
            samples.append({"file": rel, "mode": mode, "prompt": prompt, "completion": completion,
                            "lines": len(flags), "lines_tokenizing": sum(flags)})
        print(f"  [{k + 1}/{len(prompts)}] {rel}: greedy {samples[-2]['lines_tokenizing']}/{samples[-2]['lines']}, "
              f"sampled {samples[-1]['lines_tokenizing']}/{samples[-1]['lines']} lines tokenize", flush=True)
    for mode, (ok, n) in totals.items():
        result[f"lines_tokenizing_{mode}"] = {"ok": ok, "lines": n, "share": round(ok / n, 4) if n else math.nan}
        print(f"{mode}: {ok}/{n} generated lines tokenize ({100 * ok / max(1, n):.1f}%)")
    result["generation"] = {"prompts": len(prompts), "prompt_lines": args.prompt_lines,
                            "new_tokens": args.new_tokens, "sampling": "temperature 0.8, top-p 0.95",
                            "seed": args.seed}
    if args.samples:
        Path(args.samples).write_text("".join(
            f"##### {s['file']} ({s['mode']}, {s['lines_tokenizing']}/{s['lines']} lines tokenize)\n"
            f"{s['prompt']}<<<GENERATED>>>\n{s['completion']}\n\n" for s in samples))
    if args.json_out:
        tmp = Path(args.json_out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
