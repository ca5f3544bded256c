"""Build the data for, and train, the embedded default model (``moecache/assets/qwen3moe-stdlib``).

Two steps:

``data``  packs the Python standard library's own sources of a pinned Python version into two byte files,
          ``train.bin`` and ``heldout.bin``, and writes ``data.json`` (the selection rule, the file lists,
          the sha256 of each byte file). Standard library only: runs anywhere.

``train`` trains a Qwen3-MoE-layout model (transformers ``Qwen3MoeForCausalLM``, byte-level tokens) on
          ``train.bin``, measures bits per byte on ``heldout.bin`` and saves the model with
          ``save_pretrained`` in bfloat16 (``config.json`` + ``model.safetensors``) plus ``train_log.json``.
          Needs torch and transformers only (no moecache), so it runs on a bare GPU machine.

Selection rule (``data``): every ``*.py`` file under ``<prefix>/lib/python3.11`` outside ``site-packages``,
sorted by its POSIX path relative to that folder, whose bytes decode as UTF-8, contain no byte below 3
(0, 1 and 2 are the pad, begin and end ids) and ``compile()`` as Python 3.11. A file is held out when the
first byte of the sha256 of its relative path is below 13 (about 5% of the files); the rest is training
data. Files are joined with the end id (2) after each file.

Usage (the committed model was made exactly so; see moecache/assets/README.md)::

    python eval/train_embedded_model.py data --stdlib /root/.pyenv/versions/3.11.7/lib/python3.11 --out DIR
    PYTHONUNBUFFERED=1 python eval/train_embedded_model.py train --data DIR --out OUT --steps auto \
        --time-budget 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

#: The layout of the embedded model: transformers ``Qwen3MoeConfig`` fields.
MODEL_CONFIG = dict(
    vocab_size=256, hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
    head_dim=32, intermediate_size=768, moe_intermediate_size=48, num_experts=16, num_experts_per_tok=4,
    norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6, initializer_range=0.02, router_aux_loss_coef=0.01,
)
PYTHON_VERSION = "3.11"
END_ID = 2
HELDOUT_FIRST_BYTE_BELOW = 13


# ---------------------------------------------------------------- data


def select_files(stdlib: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Apply the selection rule: (train paths, held-out paths, excluded path -> reason)."""
    train: list[str] = []
    heldout: list[str] = []
    excluded: dict[str, str] = {}
    paths = sorted(p.relative_to(stdlib).as_posix() for p in stdlib.rglob("*.py")
                   if "site-packages" not in p.relative_to(stdlib).parts and p.is_file())
    for rel in paths:
        raw = (stdlib / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            excluded[rel] = "not UTF-8"
            continue
        if any(b < 3 for b in raw):
            excluded[rel] = "has a byte below 3"
            continue
        try:
            compile(text, rel, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            excluded[rel] = f"does not compile: {type(e).__name__}"
            continue
        (heldout if hashlib.sha256(rel.encode()).digest()[0] < HELDOUT_FIRST_BYTE_BELOW else train).append(rel)
    return train, heldout, excluded


def pack(stdlib: Path, files: list[str]) -> bytes:
    return b"".join((stdlib / rel).read_bytes() + bytes([END_ID]) for rel in files)


def cmd_data(args: argparse.Namespace) -> int:
    import warnings

    stdlib = Path(args.stdlib)
    if not (stdlib / "os.py").is_file():
        print(f"error: {stdlib} is not a Python standard library folder (no os.py); pass --stdlib "
              f"PREFIX/lib/python{PYTHON_VERSION}", file=sys.stderr)
        return 2
    version = stdlib.name.removeprefix("python")
    if version != PYTHON_VERSION and not args.any_version:
        print(f"error: {stdlib} is Python {version}, the recipe pins {PYTHON_VERSION}; pass --any-version to "
              f"build from it anyway", file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # compile() warns about invalid escapes in some test files
        warnings.simplefilter("ignore")
        train, heldout, excluded = select_files(stdlib)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    same = stdlib.resolve() == Path(os.__file__).parent.resolve()
    info: dict = {"stdlib": str(stdlib), "python": sys.version.split()[0] if same else version,
                  "rule": __doc__.split("Selection rule (``data``): ")[1].split("\n\n")[0].replace("\n", " "),
                  "excluded": excluded}
    for name, files in (("train", train), ("heldout", heldout)):
        blob = pack(stdlib, files)
        tmp = out / f"{name}.bin.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, out / f"{name}.bin")
        info[name] = {"files": files, "n_files": len(files), "bytes": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()}
        print(f"{name}: {len(files)} files, {len(blob):,} bytes, sha256 {info[name]['sha256']}")
    print(f"excluded: {len(excluded)} files")
    tmp = out / "data.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / "data.json")
    return 0


# ---------------------------------------------------------------- training


def build_model(seed: int, experts_implementation: str | None = None):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**MODEL_CONFIG)
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return Qwen3MoeForCausalLM._from_config(config, **kwargs) if kwargs else Qwen3MoeForCausalLM(config)


def heldout_bits_per_byte(model, data, context: int, batch: int, device: str) -> tuple[float, int]:
    """Bits per byte over ``data`` (a 1-D uint8 tensor) cut into non-overlapping windows of ``context`` bytes.

    Each window predicts its bytes 2..context from the ones before (the first byte of a window has no
    context and is not scored); the tail shorter than a window is scored as one more window.
    """
    import torch
    import torch.nn.functional as F

    n = data.numel()
    starts = list(range(0, n - 1, context))
    total_nats, total_bytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            group = starts[i:i + batch]
            full = [s for s in group if s + context <= n]
            windows = [(full, context)] + [([s], n - s) for s in group if s + context > n]
            for ss, ln in windows:
                if not ss or ln < 2:
                    continue
                x = torch.stack([data[s:s + ln] for s in ss]).long().to(device)
                logits = model(input_ids=x).logits.float()
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                      reduction="sum")
                total_nats += float(nll)
                total_bytes += x[:, 1:].numel()
    return total_nats / total_bytes / math.log(2), total_bytes


def cmd_train(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    data_dir = Path(args.data)
    info = json.loads((data_dir / "data.json").read_text())
    train_np = np.fromfile(data_dir / "train.bin", dtype=np.uint8)
    held_np = np.fromfile(data_dir / "heldout.bin", dtype=np.uint8)
    for name, arr in (("train", train_np), ("heldout", held_np)):
        digest = hashlib.sha256(arr.tobytes()).hexdigest()
        if digest != info[name]["sha256"]:
            print(f"error: {name}.bin sha256 {digest} differs from data.json's; rebuild with `data`",
                  file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    impl = args.experts_implementation
    model = build_model(args.seed, impl).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, experts implementation {getattr(model.config, '_experts_implementation', 'default')}, "
          f"device {device}, train {train_np.size:,} bytes, held-out {held_np.size:,} bytes")
    train = torch.from_numpy(train_np).to(device)
    held = torch.from_numpy(held_np[:args.heldout_bytes] if args.heldout_bytes else held_np)
    gen = np.random.default_rng(args.seed)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.startswith("cuda") and args.bf16 \
        else __import__("contextlib").nullcontext()
    T, B = args.context, args.batch
    high = train.numel() - T - 1
    offsets = torch.arange(T, device=device)

    def batch_at() -> torch.Tensor:
        starts = torch.from_numpy(gen.integers(0, high, size=B)).to(device)
        return train[starts[:, None] + offsets].long()

    def loss_of(x: torch.Tensor):
        with amp:
            # transformers shifts the labels inside its loss and adds router_aux_loss_coef * aux_loss.
            return model(input_ids=x, labels=x, output_router_logits=True)

    # The grouped experts kernel may not take this dtype on this device: one probe step on a copy of the
    # model, falling back to transformers' eager dispatch (same maths, a loop over the experts).
    if impl is None and device.startswith("cuda"):
        try:
            loss_of(batch_at()[:2, :T]).loss.backward()
            model.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 - any kernel refusal means: use eager
            print(f"grouped experts kernel failed ({type(e).__name__}: {str(e)[:120]}); using eager")
            impl = "eager"
            model = build_model(args.seed, impl).to(device)
    gen = np.random.default_rng(args.seed)  # the probe drew from the stream: restart it
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.startswith("cuda"))

    total = args.steps if args.steps != "auto" else None
    probe_steps = args.probe_steps
    warmup = args.warmup
    log: list[dict] = []
    t_start = time.perf_counter()
    t_probe = None
    step = 0
    model.train()
    while True:
        if total is not None and step >= int(total):
            break
        if total is None and step == probe_steps:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t_probe) / (probe_steps - 5)
            total = max(probe_steps + 1, int((args.time_budget - (time.perf_counter() - t_start)) / per_step)
                        + probe_steps)
            print(f"probe: {per_step * 1e3:.1f} ms/step -> {total} steps in the {args.time_budget:.0f} s budget")
        if step == 5:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t_probe = time.perf_counter()
        # Linear warm-up, then cosine to 10% of the peak; before the step count is fixed (auto), the
        # probe steps are all inside the warm-up.
        horizon = int(total) if total is not None else 10 ** 9
        if step < warmup:
            lr = args.lr * (step + 1) / warmup
        else:
            frac = (step - warmup) / max(1, horizon - warmup)
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        out = loss_of(batch_at())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or (total is not None and step == int(total) - 1):
            ce = float(out.loss.detach()) - MODEL_CONFIG["router_aux_loss_coef"] * float(out.aux_loss.detach())
            row = {"step": step, "lr": lr, "loss_bits_per_byte": ce / math.log(2), "aux": float(out.aux_loss.detach()),
                   "seconds": round(time.perf_counter() - t_start, 1)}
            log.append(row)
            print(json.dumps(row))
        step += 1
        if time.perf_counter() - t_start > args.max_seconds:
            print(f"stopped by --max-seconds at step {step}")
            break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_start
    model.eval()
    bpb, scored = heldout_bits_per_byte(model.float(), held, T, args.eval_batch, device)
    print(f"held-out: {bpb:.4f} bits/byte over {scored:,} bytes (fp32, windows of {T})")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).to("cpu").save_pretrained(out_dir)
    meta = {"command": " ".join(sys.argv), "steps": step, "train_seconds": round(train_seconds, 1),
            "tokens_seen": step * B * T, "parameters": n_params, "heldout_bits_per_byte_fp32_trained_weights": bpb,
            "heldout_bytes_scored": scored, "device": torch.cuda.get_device_name() if device.startswith("cuda")
            else "cpu", "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "args": {k: v for k, v in vars(args).items() if k != "func"}, "data": {
                k: {kk: vv for kk, vv in info[k].items() if kk != "files"} for k in ("train", "heldout")},
            "log": log}
    (out_dir / "train_log.json").write_text(json.dumps(meta, indent=1))
    print(f"saved to {out_dir}")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    """Copy a trained model into the package folder with ``training.json`` (recipe, data, figures)."""
    import shutil

    trained, dest = Path(args.trained), Path(args.dest)
    log = json.loads((trained / "train_log.json").read_text())
    info = json.loads((Path(args.data) / "data.json").read_text())
    for name in ("train", "heldout"):
        if info[name]["sha256"] != log["data"][name]["sha256"]:
            print(f"error: {args.data} is not the data {trained} was trained on ({name} sha256 differs)",
                  file=sys.stderr)
            return 2
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copyfile(trained / f, dest / f"{f}.tmp")
        os.replace(dest / f"{f}.tmp", dest / f)
    record = {k: v for k, v in log.items() if k not in ("data", "log")}
    record["data"] = {"python": info["python"], "rule": info["rule"],
                      "train": {k: v for k, v in info["train"].items() if k != "files"},
                      "heldout": info["heldout"], "excluded": info["excluded"]}
    record["model_sha256"] = hashlib.sha256((dest / "model.safetensors").read_bytes()).hexdigest()
    record["loss_curve"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                            for row in log["log"]]
    (dest / "training.json.tmp").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(dest / "training.json.tmp", dest / "training.json")
    print(f"packaged into {dest}: model sha256 {record['model_sha256']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    d = sub.add_parser("data", help="pack the standard library sources into train.bin and heldout.bin")
    d.add_argument("--stdlib", default=str(Path(os.__file__).parent), help="lib/python3.11 folder (default: "
                   "this Python's)")
    d.add_argument("--out", required=True)
    d.add_argument("--any-version", action="store_true", help="allow a Python other than the pinned one")
    d.set_defaults(func=cmd_data)
    t = sub.add_parser("train", help="train the model on a folder made by `data`")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", default="auto", help="optimizer steps, or auto: as many as fit --time-budget")
    t.add_argument("--time-budget", type=float, default=200.0, help="seconds of training for --steps auto")
    t.add_argument("--max-seconds", type=float, default=1e9, help="hard stop (safety), seconds")
    t.add_argument("--probe-steps", type=int, default=30)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--context", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None)
    t.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    t.add_argument("--experts-implementation", default=None, help="transformers experts dispatch (default: its own)")
    t.add_argument("--eval-batch", type=int, default=64)
    t.add_argument("--heldout-bytes", type=int, default=0, help="score only the first N held-out bytes (0: all)")
    t.add_argument("--log-every", type=int, default=50)
    t.set_defaults(func=cmd_train)
    k = sub.add_parser("package", help="copy a trained model into the package with its recipe (training.json)")
    k.add_argument("--trained", required=True, help="the --out folder of `train`")
    k.add_argument("--data", required=True, help="the folder of `data` it was trained on")
    k.add_argument("--dest", default=str(Path(__file__).resolve().parent.parent / "moecache" / "assets"
                                          / "qwen3moe-stdlib"))
    k.set_defaults(func=cmd_package)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
