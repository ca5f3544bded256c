"""Tiny random models of every MoE family moecache knows, built from transformers' config classes.

``tiny_model(family, **overrides)`` returns a small fp32 model in eval mode: 2-3 layers, hidden
size 32, 8 experts, top-2 (top-1 where the family routes to one expert). Sizes are multiples of 8
because ``grouped_mm`` on the CPU needs 16-byte-aligned strides. Router weights are re-drawn with
a larger spread than the models' own initialiser so that routing is far from ties (the recorder
tests compare expert ids exactly). Reused by the recorder tests and by the runtime's tests.

``FAMILIES`` lists every family of ``moecache.families.FAMILIES`` (tests/test_families.py checks
that the two agree); ``CAUSAL_FAMILIES`` are the decoder-only ones.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

VOCAB = 96
HIDDEN = 32
INTERMEDIATE = 32
EXPERTS = 8
HEADS = 4
KV_HEADS = 2


def _common(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    return base


def _mixtral(t):
    return t.MixtralConfig(**_common(intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                                     num_experts_per_tok=2, router_jitter_noise=0.0)), t.MixtralForCausalLM


def _qwen2_moe(t):
    # mlp_only_layers=[1]: layer 1 is dense, so moe_layers must come out as [0, 2].
    return t.Qwen2MoeConfig(**_common(intermediate_size=INTERMEDIATE, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, num_experts=EXPERTS,
                                      num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])), \
        t.Qwen2MoeForCausalLM


def _qwen3_moe(t):
    return t.Qwen3MoeConfig(**_common(intermediate_size=INTERMEDIATE, moe_intermediate_size=16, num_experts=EXPERTS,
                                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)), t.Qwen3MoeForCausalLM


def _olmoe(t):
    return t.OlmoeConfig(**_common(intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=2)), \
        t.OlmoeForCausalLM


def _deepseek_v2(t):
    # group-limited greedy with scaling: the routing quirks the recorder must reproduce.
    return t.DeepseekV2Config(**_common(
        intermediate_size=INTERMEDIATE, moe_intermediate_size=16, n_routed_experts=EXPERTS, num_experts_per_tok=2,
        num_key_value_heads=HEADS, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1, topk_method="group_limited_greedy",
        routed_scaling_factor=1.5)), t.DeepseekV2ForCausalLM


def _deepseek_v3(t):
    return t.DeepseekV3Config(**_common(
        intermediate_size=INTERMEDIATE, moe_intermediate_size=16, n_routed_experts=EXPERTS, num_experts_per_tok=2,
        num_key_value_heads=HEADS, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5)), t.DeepseekV3ForCausalLM


def _gpt_oss(t):
    return t.GptOssConfig(**_common(
        intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS, num_experts_per_tok=2, head_dim=8,
        sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])), t.GptOssForCausalLM


def _phimoe(t):
    # sparsemixer routes exactly two experts.
    return t.PhimoeConfig(**_common(intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS, num_experts_per_tok=2,
                                    router_jitter_noise=0.01, input_jitter_noise=0.0)), t.PhimoeForCausalLM


def _granitemoe(t):
    return t.GraniteMoeConfig(**_common(intermediate_size=INTERMEDIATE, num_local_experts=EXPERTS,
                                        num_experts_per_tok=2)), t.GraniteMoeForCausalLM


def _llama4(t):
    # interleave step 2: layers 1 and 3 are MoE, 0 and 2 dense.
    return t.Llama4TextConfig(**_common(
        num_hidden_layers=4, intermediate_size=INTERMEDIATE, intermediate_size_mlp=48, num_local_experts=EXPERTS,
        num_experts_per_tok=2, head_dim=8, interleave_moe_layer_step=2, attention_chunk_size=64,
        no_rope_layers=None)), t.Llama4ForCausalLM


def _dbrx(t):
    cfg = t.DbrxConfig(
        d_model=HIDDEN, n_heads=HEADS, n_layers=2, max_seq_len=256, vocab_size=VOCAB, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attn_config={"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": INTERMEDIATE, "moe_num_experts": EXPERTS, "moe_top_k": 2})
    return cfg, t.DbrxForCausalLM


def _switch(t):
    # Encoder-decoder; every second block of each stack is sparse (blocks 1 and 3). The capacity of
    # 3 tokens per expert and sequence makes prompts of >= 8 tokens drop some (recorded as -2).
    cfg = t.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=INTERMEDIATE, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_heads=HEADS, num_experts=EXPERTS,
        expert_capacity=3, router_jitter_noise=0.0, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    return cfg, t.SwitchTransformersForConditionalGeneration


_BUILDERS: dict[str, Callable] = {
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss, "phimoe": _phimoe,
    "granitemoe": _granitemoe, "llama4": _llama4, "dbrx": _dbrx, "switch_transformers": _switch,
}

#: Every family ``tiny_model`` builds.
FAMILIES: list[str] = list(_BUILDERS)
#: The decoder-only ones (``generate`` feeds one token per step into the same model).
CAUSAL_FAMILIES: list[str] = [f for f in FAMILIES if f != "switch_transformers"]


def _spread_routers(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every router weight (found through the family table) with std 2/sqrt(fan-in), so
    top-k choices are far from ties."""
    from moecache.families import detect_family, find_moe_blocks

    adapter = detect_family(model)
    experts = adapter.num_experts(model.config)
    for block in find_moe_blocks(model, adapter):
        for p in block.router.parameters():
            if p.dim() == 2 and p.shape[0] == experts:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p.shape[1] ** 0.5))


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random fp32 model of ``family`` in eval mode.

    ``overrides`` are set on the config after the defaults above (e.g. ``num_hidden_layers=2``).
    The same ``seed`` gives the same weights.
    """
    import transformers as t

    if family not in _BUILDERS:
        raise KeyError(f"no tiny model for {family!r}; known: {', '.join(FAMILIES)}")
    config, cls = _BUILDERS[family](t)
    for key, value in overrides.items():
        if "." in key:  # nested config, e.g. "ffn_config.moe_top_k"
            head, tail = key.split(".", 1)
            setattr(getattr(config, head), tail, value)
        else:
            setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config)
    _spread_routers(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


__all__ = ["FAMILIES", "CAUSAL_FAMILIES", "tiny_model"]
