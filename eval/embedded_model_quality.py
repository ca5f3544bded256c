"""Quality of the embedded model: held-out bits per byte, and how much of its generated code tokenizes.

1. Bits per byte on the held-out part of the training recipe (the standard library files that
   ``eval/train_embedded_model.py data`` holds out; rebuilt here from this machine's Python 3.11 and
   checked against the sha256 recorded with the model), cut into non-overlapping windows of
   ``--context`` bytes, fp32 on the CPU. ``--heldout-bytes N`` scores the first N bytes only.
2. Generated lines that tokenize as Python: prompts are the first lines of held-out files, from their
   first ``def``/``class`` line (code the model never saw). For each prompt the model writes up to
   ``--new-tokens`` bytes (greedy, and sampled at temperature 0.8 / top-p 0.95 with a fixed seed; all
   prompts in one left-padded batch). The
   prompt plus its continuation goes through ``tokenize`` as one stream; a generated line fails when a
   token error (``ERRORTOKEN``, e.g. an unterminated one-line string or a stray ``$``) starts on it or the
   tokenizer raises on it (an inconsistent dedent); the tokenizer then restarts on the next line. A
   construct left open at the end (a bracket or a triple-quoted string cut by the length limit) is not an
   error, and the last line is not counted when it was cut mid-line.

Scoring needs Python 3.11's ``tokenize`` (3.12 rewrote it), which the recipe pins anyway. Generation can
run elsewhere (``--device cuda`` on a GPU machine with another Python, ``--data`` for the packed held-out
bytes); there the samples are saved unscored, and ``--samples-in`` scores them here.

    python eval/embedded_model_quality.py --json eval/results/embedded_model_quality.json
    # on a GPU machine, then here:
    python eval/embedded_model_quality.py --model M --data DATA --device cuda --json gpu.json
    python eval/embedded_model_quality.py --samples-in gpu.json --json eval/results/embedded_model_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import tokenize
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_embedded_model import END_ID, HELDOUT_FIRST_BYTE_BELOW, heldout_bits_per_byte  # noqa: E402


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


def code_prompts(heldout: list[tuple[str, bytes]], n: int, lines: int) -> list[tuple[str, str]]:
    """The first ``lines`` lines from the first ``def``/``class`` line of each held-out file, ASCII only."""
    prompts = []
    for rel, raw in heldout:
        src = raw.decode("utf-8").splitlines(keepends=True)
        at = next((i for i, ln in enumerate(src) if ln.startswith(("def ", "class "))), None)
        if at is None or at + lines > len(src):
            continue
        text = "".join(src[at:at + lines])
        if text.isascii():
            prompts.append((rel, text))
        if len(prompts) == n:
            break
    return prompts


def heldout_files(args: argparse.Namespace, recipe: dict) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The held-out bytes and (path, bytes) per file, from --data (a `data` folder) or --stdlib, checked
    against the sha256 the model's recipe recorded."""
    import hashlib

    names = recipe["data"]["heldout"]["files"]
    if args.data:
        blob = (Path(args.data) / "heldout.bin").read_bytes()
    else:
        stdlib = Path(args.stdlib)
        blob = b"".join((stdlib / rel).read_bytes() + bytes([END_ID]) for rel in names)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != recipe["data"]["heldout"]["sha256"]:
        raise SystemExit(f"error: the held-out data read has sha256 {digest}, the model's recipe "
                         f"{recipe['data']['heldout']['sha256']}; pass --stdlib of Python {recipe['data']['python']}")
    parts = blob.split(bytes([END_ID]))[:-1]
    return blob, list(zip(names, parts))


def generate_samples(model, prompts: list[tuple[str, str]], args: argparse.Namespace, device: str) -> list[dict]:
    """Greedy and sampled continuations of every prompt, all prompts in one left-padded batch."""
    import torch

    samples = []
    enc = [list(p.encode("utf-8")) for _, p in prompts]
    width = max(len(e) for e in enc)
    x = torch.tensor([[0] * (width - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    for mode in ("greedy", "sampled"):
        torch.manual_seed(args.seed)
        kw = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if mode == "sampled" else \
            dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=END_ID,
                                 pad_token_id=0, **kw)
        for (rel, prompt), row in zip(prompts, out[:, width:].tolist()):
            completion = bytes(i for i in row if i != 0).decode("utf-8", errors="replace").split(chr(END_ID))[0]
            samples.append({"file": rel, "mode": mode, "prompt": prompt, "completion": completion})
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "moecache" / "assets" / "qwen3moe-stdlib"),
                    help="checkpoint folder with training.json (default: the embedded model)")
    ap.add_argument("--stdlib", default="/root/.pyenv/versions/3.11.7/lib/python3.11",
                    help="the Python 3.11 standard library the recipe read")
    ap.add_argument("--data", default=None, help="instead of --stdlib: a folder made by train_embedded_model.py data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--heldout-bytes", type=int, default=0, help="score only the first N held-out bytes (0: all)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--prompt-lines", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-bpb", action="store_true", help="do not measure bits per byte")
    ap.add_argument("--samples-in", default=None, help="score the samples of an earlier run (its --json) instead "
                                                        "of generating")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    recipe = json.loads((model_dir / "training.json").read_text())
    blob, files = heldout_files(args, recipe)
    command = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    result: dict = {"machine": platform.node(), "device": torch.cuda.get_device_name() if args.device == "cuda"
                    else f"cpu, {torch.get_num_threads()} threads",
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "model_sha256": recipe.get("model_sha256"), "heldout_sha256": recipe["data"]["heldout"]["sha256"],
                    "heldout_rule": f"sha256(relative path)[0] < {HELDOUT_FIRST_BYTE_BELOW}"}
    if args.samples_in:
        earlier = json.loads(Path(args.samples_in).read_text())
        samples = earlier["samples"]
        result["generated_by"] = {k: earlier[k] for k in ("machine", "device", "date", "command", "generation")}
        for k in ("heldout_bits_per_byte", "heldout_bytes_scored", "heldout_seconds"):
            if k in earlier:
                result[k] = earlier[k]
        result["generation"] = earlier["generation"]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device).eval()
        if not args.skip_bpb:
            data = torch.frombuffer(bytearray(blob[:args.heldout_bytes] if args.heldout_bytes else blob),
                                    dtype=torch.uint8)
            t0 = time.perf_counter()
            bpb, scored = heldout_bits_per_byte(model, data, args.context, 64, args.device)
            result["heldout_bits_per_byte"] = round(bpb, 4)
            result["heldout_bytes_scored"] = scored
            result["heldout_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"held-out: {bpb:.4f} bits/byte over {scored:,} bytes ({result['heldout_seconds']} s)", flush=True)
        prompts = code_prompts(files, args.prompts, args.prompt_lines)
        samples = generate_samples(model, prompts, args, args.device)
        result["generation"] = {"prompts": len(prompts), "prompt_lines": args.prompt_lines,
                                "new_tokens": args.new_tokens, "sampling": "temperature 0.8, top-p 0.95",
                                "seed": args.seed, "batch": "all prompts in one left-padded batch"}
    if sys.version_info[:2] == (3, 11):
        for mode in ("greedy", "sampled"):
            ok = n = 0
            for smp in samples:
                if smp["mode"] == mode:
                    flags = line_flags(smp["prompt"], smp["completion"])
                    smp["lines"], smp["lines_tokenizing"] = len(flags), sum(flags)
                    ok, n = ok + sum(flags), n + len(flags)
            result[f"lines_tokenizing_{mode}"] = {"ok": ok, "lines": n, "share": round(ok / n, 4) if n else None}
            print(f"{mode}: {ok}/{n} generated lines tokenize ({100 * ok / max(1, n):.1f}%)")
    else:
        result["tokenize"] = f"not scored: Python {platform.python_version()}; rescore with --samples-in on 3.11"
        print(result["tokenize"])
    result["samples"] = samples
    if args.json_out:
        tmp = Path(args.json_out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
