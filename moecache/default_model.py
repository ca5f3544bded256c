"""The embedded default model: a Qwen3-MoE-architecture model with random weights, built on the fly.

``moecache generate`` runs it when no ``--model`` is given, so the runtime can be tried on a
fresh machine without downloads. Its weights are random (seeded): its text is noise, and the CLI
says so. Size: 8 layers, hidden 512, 32 experts of intermediate 384 per layer, top-4, byte-level
vocabulary (token id = byte value): about 157M parameters, 151M of them in experts.

Tokens are bytes: ``encode(text)`` is the UTF-8 bytes, ``decode(ids)`` their UTF-8 decoding with
undecodable bytes replaced (random weights emit arbitrary bytes).
"""

from __future__ import annotations

from typing import Any

import torch

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


__all__ = ["DEFAULT_CONFIG", "DEFAULT_SEED", "RANDOM_WEIGHTS_LABEL", "default_config", "default_model", "encode",
           "decode", "parameter_count"]
