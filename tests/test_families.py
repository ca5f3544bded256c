"""The family-adapter table: every entry against the modules transformers actually builds."""

from __future__ import annotations

import pytest
import torch

from moecache import ConfigError, UnsupportedModelError
from moecache.families import (CAPTURES, FAMILIES, bytes_per_expert, detect_family, find_moe_blocks,
                               get_family)
from moecache.trace import WEIGHT_KINDS

from moecache.runtime.experts import EXPERT_KERNELS
from moecache.runtime.layout import STORAGES, SlotLayout

from .tiny_models import EXPERTS, FAMILIES as TINY_FAMILIES, HIDDEN, INTERMEDIATE, tiny_model

MOE_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "llama4": [1, 3], "dbrx": [0, 1],
              "switch_transformers": [1, 3, 5, 7]}


def test_table_is_consistent():
    assert sorted(TINY_FAMILIES) == FAMILIES.names(), "every family in the table needs a tiny model (and vice versa)"
    types = [t for name in FAMILIES for t in get_family(name).model_types]
    assert len(types) == len(set(types)), "a model_type claimed by two adapters"
    for name in FAMILIES:
        a = get_family(name)
        assert a.name == name and a.capture in CAPTURES and a.weights_doc
        assert a.layout.storage in ("stacked", "flat", "modules")
        assert a.layout.gate_up in ("fused", "interleaved", "separate", "none")
        assert a.layout.weights_applied in ("output", "input")
        assert CAPTURES.get(a.capture).target in ("experts", "router")
        assert a.layout.kernel in EXPERT_KERNELS and a.layout.storage in STORAGES


def test_unknown_family_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown MoE family 'nope'; valid names: .*deepseek_v3.*mixtral"):
        get_family("nope")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_matches_the_built_model(family):
    model = tiny_model(family)
    adapter = detect_family(model)
    assert adapter.name == family
    blocks = find_moe_blocks(model, adapter)
    assert [b.layer for b in blocks] == MOE_LAYERS.get(family, [0, 1, 2])
    config = model.config
    e, k = adapter.num_experts(config), adapter.top_k(config)
    assert e == EXPERTS and k == (1 if family == "switch_transformers" else 2)
    assert adapter.weights_kind(config) in WEIGHT_KINDS
    layout = adapter.layout
    for b in blocks:
        assert b.block is model.get_submodule(b.name)
        assert b.hook is (b.experts if CAPTURES.get(adapter.capture).target == "experts" else b.router)
        for attr in adapter.shared_attrs:
            assert hasattr(b.block, attr), f"{b.name} has no shared part {attr}"
        params = dict(b.experts.named_parameters())
        if layout.storage == "stacked":
            for p in layout.params:
                assert params[p].shape[0] == e, (p, params[p].shape)
            up = params["gate_up_proj"]
            hidden_dim = 1 if layout.transposed else 2
            assert up.shape[hidden_dim] == HIDDEN  # (E, 2I, H), or (E, H, 2I) when transposed
            assert up.shape[3 - hidden_dim] % 2 == 0
        elif layout.storage == "flat":
            for p in layout.params:
                assert params[p].shape == (e * INTERMEDIATE, HIDDEN)
        else:
            for ex in range(e):
                for p in layout.params:
                    assert p.format(e=ex) in params
            assert f"expert_{e}.wi.weight" not in params
        # transformers' own layout flags, where the experts class carries them, agree with the table
        if hasattr(b.experts, "is_transposed"):
            assert b.experts.is_transposed == layout.transposed
            assert b.experts.has_bias == layout.bias
            assert b.experts.is_concatenated == (layout.gate_up == "fused")


def _expert_weight(experts: torch.nn.Module, layout, name: str, e: int) -> torch.Tensor:
    """Expert ``e``'s weight ``name`` read straight from the module, per the family table's storage."""
    if layout.storage == "modules":
        return experts.get_parameter(name.format(e=e))
    p = experts.get_parameter(name)
    return p[e] if layout.storage == "stacked" else p.view(EXPERTS, -1, p.shape[1])[e]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_slot_layout_packs_releases_and_restores_every_storage(family):
    model = tiny_model(family)
    adapter = detect_family(model)
    spec = adapter.layout
    experts = find_moe_blocks(model, adapter)[0].experts
    layout = SlotLayout.from_module(experts, EXPERTS, "experts", spec)
    assert layout.storage == spec.storage
    if spec.storage != "stacked":  # the table names every kind; stacked ones are found by shape
        assert layout.names == spec.params
    original = {(k.name, e): _expert_weight(experts, spec, k.name, e).detach().clone()
                for k in layout.kinds for e in range(EXPERTS)}
    assert all(tuple(original[(k.name, 0)].shape) == k.shape for k in layout.kinds)
    buf = torch.full((EXPERTS, layout.slot_numel), float("nan"))
    views = layout.views(buf)
    layout.pack(experts, EXPERTS, views)
    for (name, e), want in original.items():
        assert torch.equal(views[name][e], want), (name, e)
    refs = layout.param_refs(experts, EXPERTS)
    assert len(refs) == len(layout.kinds) * (EXPERTS if spec.storage == "modules" else 1)
    assert sum(r.param.numel() for r in refs) == sum(p.numel() for p in experts.parameters())
    saved = layout.release(experts, EXPERTS)
    assert all(p.device.type == "meta" for p in experts.parameters())
    layout.restore(experts, EXPERTS, views, saved)
    for (name, e), want in original.items():
        assert torch.equal(_expert_weight(experts, spec, name, e), want), (name, e)


def test_bytes_per_expert():
    model = tiny_model("gpt_oss")
    adapter = detect_family(model)
    # gate_up (H x 2I) + its bias (2I) + down (I x H) + its bias (H), fp32
    want = (HIDDEN * 2 * INTERMEDIATE + 2 * INTERMEDIATE + INTERMEDIATE * HIDDEN + HIDDEN) * 4
    assert bytes_per_expert(find_moe_blocks(model, adapter), EXPERTS) == want
    model = tiny_model("mixtral").to(torch.bfloat16)
    assert bytes_per_expert(find_moe_blocks(model, detect_family(model)), EXPERTS) == 3 * HIDDEN * INTERMEDIATE * 2


def test_detect_family_refuses_dense_and_unknown_models():
    import transformers as tr

    dense = tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type 'llama'\).*LlamaMLP.*qwen3_moe"):
        detect_family(dense)
    # an MoE family the table does not know: named, with its MoE module types
    glm = tr.Glm4MoeForCausalLM(tr.Glm4MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=0, n_group=1, topk_group=1))
    with pytest.raises(UnsupportedModelError, match=r"glm4_moe.*Glm4MoeMoE.*pass family=NAME"):
        detect_family(glm)
    with pytest.raises(UnsupportedModelError, match="has no MoE layers"):
        find_moe_blocks(dense, get_family("mixtral"))
