"""The embedded default model, and a builder of Qwen3-MoE models with random weights.

``embedded_model()`` loads the model shipped in the package (``moecache/assets/qwen3moe-stdlib``): a
small Qwen3-MoE (6 layers, 16 experts of intermediate 48 per layer, top-4, hidden 192, 3.3M parameters,
bfloat16 safetensors) trained on the Python 3.11 standard library's sources by
``eval/train_embedded_model.py``; it writes Python-like code. ``moecache generate`` runs it when no
``--model`` is given, so the runtime can be tried on a fresh machine without downloads. Its recipe, data
and held-out bits per byte are in ``moecache/assets/README.md``.

``default_model()`` builds a model of the same family with seeded random weights (default size: 8
layers, hidden 512, 32 experts of intermediate 384 per layer, top-4: about 157M parameters, 151M of
them in experts); tests use it at any size through config overrides. Its text is noise.

Tokens are bytes for both: ``encode(text)`` is the UTF-8 bytes, ``decode(ids)`` their UTF-8 decoding
with undecodable bytes replaced (random weights emit arbitrary bytes). Id 2 ends a file (eos).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

#: The config of the default model (transformers ``Qwen3MoeConfig`` fields).
DEFAULT_CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, intermediate_size=1024, moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
    norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6, initializer_range=0.02,
)
DEFAULT_SEED = 0
#: What the CLI prints next to the default model's output.
RANDOM_WEIGHTS_LABEL = "embedded default model (Qwen3-MoE architecture, RANDOM weights: the text is noise)"


#: Where the embedded model lives inside the package.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "qwen3moe-stdlib"
#: sha256 of the committed ``model.safetensors`` (tests check the file against it;
#: ``eval/train_embedded_model.py package`` prints the value to put here after a retraining).
EMBEDDED_SHA256: str | None = "4fef815a29ec1f8af9c121b5c6ee4ce8adca148e7cbb417c976c22a28bd014b0"
#: What the CLI prints next to the embedded model's output.
EMBEDDED_LABEL = ("embedded default model (Qwen3-MoE layout, 3.3M parameters, trained on the Python 3.11 "
                  "standard library: it writes Python-like code)")
#: A prompt the embedded model continues well: the start of a module's first function.
EMBEDDED_PROMPT = "import os\n\n\ndef "


def embedded_model(dtype: torch.dtype = torch.float32, experts_implementation: str | None = None) -> torch.nn.Module:
    """Load the embedded trained model on the CPU, in eval mode (``dtype``: the compute dtype)."""
    from transformers import Qwen3MoeForCausalLM

    weights = EMBEDDED_MODEL_DIR / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"the embedded model is missing ({weights}); reinstall moecache-offload or pass --model")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return Qwen3MoeForCausalLM.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True, **kwargs).eval()


def embedded_available() -> bool:
    """Whether the trained weights are in this install (a checkout where they were never trained lacks them)."""
    return (EMBEDDED_MODEL_DIR / "model.safetensors").is_file()


def embedded_model_sha256() -> str:
    """sha256 of the embedded model's safetensors file as installed."""
    return hashlib.sha256((EMBEDDED_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()


def default_config(**overrides: Any) -> Any:
    from transformers import Qwen3MoeConfig

    cfg = dict(DEFAULT_CONFIG)
    cfg.update(overrides)
    return Qwen3MoeConfig(**cfg)


def default_model(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32,
                  experts_implementation: str | None = None, **overrides: Any) -> torch.nn.Module:
    """Build the default model on the CPU with seeded random weights, in eval mode.

    Routers are re-drawn with standard deviation ``1 / sqrt(hidden)`` so that routing is spread
    over the experts (the default initialiser's 0.02 makes every token pick nearly the same ones).
    """
    from transformers import Qwen3MoeForCausalLM

    config = default_config(**overrides)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    model = Qwen3MoeForCausalLM._from_config(config, **kwargs) if kwargs else Qwen3MoeForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.copy_(torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5)
    return model.to(dtype).eval()


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DEFAULT_CONFIG", "DEFAULT_SEED", "RANDOM_WEIGHTS_LABEL", "EMBEDDED_MODEL_DIR", "EMBEDDED_SHA256",
           "EMBEDDED_LABEL", "EMBEDDED_PROMPT", "embedded_available", "embedded_model", "embedded_model_sha256", "default_config",
           "default_model", "encode", "decode", "parameter_count"]
