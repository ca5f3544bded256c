"""Compressed experts: the formats' arithmetic, the quantizer, and the runtime on compressed experts (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecache.errors import ConfigError
from moecache.quant import (FP4_VALUES, ExpertCodec, ExpertFormat, dequantize_matrix, pack_int4, quantize_dequantize_,
                            quantize_matrix, resolve_format, unpack_int4)
from moecache.runtime import offload

from .tiny_models import tiny_model

PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(family: str):
    """A tiny model whose expert matrices' input dimensions take group size 32."""
    kw = {"moe_intermediate_size": 32} if family == "qwen3_moe" else {}
    return tiny_model(family, **kw)


def _gen(m, n=8):
    return m.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      return_dict_in_generate=True, output_logits=True)


# -- formats ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_pack_roundtrip(g):
    q = torch.randint(0, 16, (3, 4 * g), generator=torch.Generator().manual_seed(g), dtype=torch.uint8)
    packed = pack_int4(q, g)
    assert packed.shape == (3, 2 * g)
    assert torch.equal(unpack_int4(packed, g), q)
    # byte j of a group: q[j] low nibble, q[j + g/2] high nibble
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, g // 2]) << 4)


def test_dequant_formula_is_one_fp32_product_then_one_rounding():
    fmt = ExpertFormat("int8", 32)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    p = quantize_matrix(w, fmt)
    ref = ((p["q"].view(4, 2, 32).float() - p["zero"].float()[..., None]) * p["scale"].float()[..., None]).view(4, 64)
    assert torch.equal(dequantize_matrix(p, fmt, torch.float32), ref)
    assert torch.equal(dequantize_matrix(p, fmt, torch.bfloat16), ref.to(torch.bfloat16))


@pytest.mark.parametrize("name,g", [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_search_never_worse_than_round_to_nearest(name, g):
    fmt = ExpertFormat(name, g)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=gen) * 0.02
    w[0, 3] = 0.3  # an outlier: clipping pays
    imp = torch.rand(256, generator=gen) * 3
    errs = {}
    for search in (False, True):
        d = dequantize_matrix(quantize_matrix(w, fmt, imp, search=search), fmt, torch.float32)
        # per group, weighted squared error
        errs[search] = (((w - d) ** 2) * imp).view(16, -1, g).sum(-1)
    assert (errs[True] <= errs[False] + 1e-12).all()
    assert errs[True].sum() < errs[False].sum()
    # round-to-nearest error bound: one step per element (half from rounding, half from the integer zero)
    d = dequantize_matrix(quantize_matrix(w, fmt, search=False), fmt, torch.float32)
    step = (w.view(16, -1, g).amax(-1) - w.view(16, -1, g).amin(-1)) / fmt.qmax
    assert ((w - d).abs().view(16, -1, g) <= step[..., None] * 1.01 + 1e-6).all()


@pytest.mark.parametrize("name,with_importance", [("int4", False), ("int8", True)])
def test_row_blocks_give_the_same_parts_as_the_whole_matrix(monkeypatch, name, with_importance):
    """Large matrices are quantized a block of rows at a time (bounded temporaries while loading): same bytes."""
    import moecache.quant as Q

    fmt = ExpertFormat(name, 32)
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(37, 128, generator=gen) * 0.02).to(torch.bfloat16)
    imp = torch.rand(128, generator=gen) if with_importance else None
    whole = quantize_matrix(w, fmt, imp)
    monkeypatch.setattr(Q, "ROW_CHUNK_ELEMENTS", 5 * 128)  # blocks of 5 rows, the last one short
    blocks = quantize_matrix(w, fmt, imp)
    assert whole.keys() == blocks.keys()
    for k in whole:
        assert torch.equal(whole[k], blocks[k]), k


def test_mxfp4_dequant_matches_the_e2m1_table():
    fmt = ExpertFormat("mxfp4", 32)
    blocks = torch.randint(0, 256, (2, 3, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    scales = torch.tensor([[120, 127, 130], [127, 125, 128]], dtype=torch.uint8)
    w = dequantize_matrix({"blocks": blocks, "scales": scales}, fmt, torch.float32)
    assert w.shape == (2, 96)
    b, s = int(blocks[1, 2, 5]), int(scales[1, 2])
    assert float(w[1, 64 + 10]) == FP4_VALUES[b & 0xF] * 2.0 ** (s - 127)
    assert float(w[1, 64 + 11]) == FP4_VALUES[b >> 4] * 2.0 ** (s - 127)


def test_resolve_format_refuses_bad_input():
    assert resolve_format("auto", None) is None
    assert resolve_format("int4", None) == ExpertFormat("int4", 64)
    assert resolve_format("auto", None, checkpoint_format="mxfp4") == ExpertFormat("mxfp4", 32)
    for args, kw, words in [(("int3", None), {}, "unknown expert_dtype"), (("int4", 48), {}, "group_size must be"),
                            (("int8", None), {"checkpoint_format": "mxfp4"}, "stored in MXFP4"),
                            (("mxfp4", None), {}, "not MXFP4"), (("bf16", 64), {}, "applies to int8/int4")]:
        with pytest.raises(ConfigError, match=words) as e:
            resolve_format(*args, **kw)
        assert "\n" not in str(e.value)


def test_codec_row_is_one_contiguous_block_and_roundtrips():
    from moecache.runtime.layout import SlotLayout

    m = _model("qwen3_moe")
    experts = m.model.layers[0].mlp.experts
    layout = SlotLayout.from_module(experts, 8)
    codec = ExpertCodec(layout, ExpertFormat("int4", 32))
    assert codec.slot_bytes % 256 == 0 and codec.slot_bytes < layout.slot_bytes
    parts = sorted(codec.parts, key=lambda p: p.offset)
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(parts, parts[1:]))
    buf = torch.zeros((8, codec.slot_numel), dtype=torch.uint8)
    codec.pack(experts, 8, codec.views(buf))
    dense = torch.zeros((8, layout.slot_numel), dtype=layout.dtype)
    codec.expand_rows(buf, dense)
    got = layout.views(dense)["gate_up_proj"]
    w = experts.gate_up_proj.detach()
    assert (got - w).abs().max() <= 2 * w.abs().max() / 15  # within one int4 step of the full range


def test_group_size_that_does_not_divide_is_refused_before_the_model_is_touched():
    m = tiny_model("qwen3_moe")  # hidden 32, expert intermediate 16
    before = m.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with pytest.raises(ConfigError, match="not a multiple of group_size=64"):
        offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype="int4", group_size=64)
    assert torch.equal(m.model.layers[0].mlp.experts.gate_up_proj, before)
    assert getattr(m, "moecache", None) is None
    with pytest.raises(ConfigError, match="unknown expert_dtype"):
        offload(m, cache_slots=4, device="cpu", expert_dtype="q4_k")
    with pytest.raises(ConfigError, match="model's experts are fp32"):
        offload(m, cache_slots=4, device="cpu", expert_dtype="bf16")
    m = _model("qwen3_moe")
    before = m.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with pytest.raises(ConfigError, match="pool_mode"):
        offload(m, cache_slots=4, device="cpu", expert_dtype="int8", group_size=32, pool_mode="both")
    with pytest.raises(ConfigError, match="not a multiple of group_size=128"):  # hybrid: checked the same
        offload(m, cache_slots=4, device="cpu", expert_dtype="int8", group_size=128, hybrid="cpu")
    with pytest.raises(ConfigError, match="kernel"):
        offload(tiny_model("dbrx"), cache_slots=4, device="cpu", expert_dtype="int8", group_size=32)
    assert torch.equal(m.model.layers[0].mlp.experts.gate_up_proj, before)


# -- runtime --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype", [("qwen3_moe", torch.float32), ("mixtral", torch.float32),
                                          ("gpt_oss", torch.float32), ("qwen3_moe", torch.bfloat16)])
@pytest.mark.parametrize("fmt,mode,slots,impl", [
    ("int4", "compressed", 5, "grouped_mm"), ("int8", "expanded", 5, "grouped_mm"),
    ("int4", "compressed", 3, "eager"), ("int4", "expanded", 3, "batched_mm")])
def test_offloaded_equals_quantize_dequantize_in_place(family, dtype, fmt, mode, slots, impl):
    """The offloaded model with compressed experts computes exactly the in-place quantize-dequantize model
    (same weights in the compute dtype, same kernel), at budgets that force misses and rounds (a scratch of 3)."""
    ref = _model(family).to(dtype)
    ref.config._experts_implementation = impl
    quantize_dequantize_(ref, ExpertFormat(fmt, 32))
    expect = _gen(ref)
    m = _model(family).to(dtype)
    m.config._experts_implementation = impl
    h = offload(m, cache_slots=slots, device="cpu", engine="sync", expert_dtype=fmt, group_size=32,
                pool_mode=mode, scratch_experts=3)
    got = _gen(m)
    assert torch.equal(got.sequences, expect.sequences)
    for a, b in zip(got.logits, expect.logits):
        assert torch.equal(a, b)
    s = h.stats()
    assert s["config"]["expert_format"] == f"{fmt} g32" and s["config"]["pool_mode"] == mode
    assert s["misses"] > 0
    assert s["bytes_copied"] == s["copies"] * s["config"]["copy_bytes_per_expert"]
    assert s["config"]["copy_bytes_per_expert"] < s["config"]["dense_expert_bytes"]
    assert f"{fmt} g32" in h.summary()
    h.remove()


def test_bf16_unchanged_and_remove_restores_dequantized():
    base = _model("qwen3_moe").to(torch.bfloat16)
    expect = _gen(base)
    h = offload(base, cache_slots=4, device="cpu", engine="sync", expert_dtype="bf16")
    assert torch.equal(_gen(base).sequences, expect.sequences)
    assert h.stats()["config"]["expert_format"] == "bf16"
    h.remove()
    m = _model("qwen3_moe").to(torch.bfloat16)
    ref = quantize_dequantize_(_model("qwen3_moe").to(torch.bfloat16), ExpertFormat("int8", 32))
    h = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype="int8", group_size=32)
    h.remove()
    assert torch.equal(m.model.layers[1].mlp.experts.down_proj, ref.model.layers[1].mlp.experts.down_proj)


def test_pool_mode_auto_and_budget():
    from moecache.runtime.compressed import choose_pool_mode

    m = _model("qwen3_moe").to(torch.bfloat16)
    h = offload(m, gpu_memory=10**9, device="cpu", engine="sync", expert_dtype="int4", group_size=32)
    assert h.stats()["config"]["pool_mode"] == "expanded"  # everything fits dense: expand once
    h.remove()
    m = _model("qwen3_moe").to(torch.bfloat16)
    # A slot count: both pools hold the same experts, so expanding once per copy beats expanding once per use.
    h = offload(m, cache_slots=6, device="cpu", engine="sync", expert_dtype="int4", group_size=32)
    assert h.stats()["config"]["pool_mode"] == "expanded"
    h.remove()
    m = _model("qwen3_moe").to(torch.bfloat16)
    h = offload(m, cache_slots=6, device="cpu", engine="sync", expert_dtype="int4", group_size=32,
                pool_mode="compressed")
    cfg = h.stats()["config"]
    assert cfg["pool_mode"] == "compressed" and cfg["scratch_experts"] == 8
    h.remove()
    assert choose_pool_mode("compressed", total=10, budget_bytes=None, cache_slots=100, codec=None) == "compressed"


def _dense_codec(hidden=2048, inter=1408, fmt=ExpertFormat("int4", 64)):
    """The codec of a DeepSeek-V2-Lite-shaped expert (default), from its model's own layout."""
    from types import SimpleNamespace as NS

    from moecache.quant import ExpertCodec

    kinds = (NS(name="gate_up_proj", shape=(2 * inter, hidden), numel=2 * inter * hidden),
             NS(name="down_proj", shape=(hidden, inter), numel=hidden * inter))
    dense = NS(kinds=kinds, dtype=torch.bfloat16, storage="stacked", slot_bytes=3 * hidden * inter * 2,
               names=("gate_up_proj", "down_proj"))
    return ExpertCodec(dense, fmt)


def test_layer_step_estimate_is_the_timelines_arithmetic():
    """The auto rule's estimate of one decode step, against the timing model's rules written out by hand."""
    from moecache.cost.hardware import default_profile, with_format
    from moecache.runtime.compressed import layer_step_ms

    codec = _dense_codec()
    hw = with_format(default_profile(codec.dense.slot_bytes), codec.fmt, "compressed")
    ne, host, g = hw.non_expert(1), hw.layer_host_ms, hw.gpu(1)
    assert layer_step_ms(hw, 1.0, 6) == pytest.approx(ne + host + 6 * g)
    # one expert, always a miss: the copy is issued after the host's routing work and its own issue cost
    assert layer_step_ms(hw, 0.0, 1) == pytest.approx(ne + host + hw.copy_host_ms + hw.copy_ms + g)
    # in between, the expectation over the binomial number of misses
    p = 0.3
    assert layer_step_ms(hw, 1 - p, 1) == pytest.approx(p * layer_step_ms(hw, 0.0, 1) + (1 - p) * (ne + host + g))


def test_pool_mode_auto_weighs_copies_saved_against_expansion_per_use(monkeypatch):
    """auto takes the mode the cost model says is faster: fast copies (little saved by holding more experts)
    -> expanded; slow copies -> compressed. The offloaded model follows the same rule."""
    import moecache.cost.hardware as H
    from moecache.cost.hardware import default_profile, with_format
    from moecache.runtime.compressed import choose_pool_mode, layer_step_ms, pool_mode_costs

    codec = _dense_codec()
    total, k = 26 * 64, 6
    budget = total * codec.dense.slot_bytes // 4  # 25% of the bf16 experts

    def profile(gbps):
        hw = default_profile(codec.dense.slot_bytes)
        hw.copy_bandwidth_gbps, hw.copy_latency_ms, hw.copy_host_ms = gbps, 0.0, 0.0
        return hw

    # the calibrated H100 profile at 25%: copies cost more than expanding every use (as the replay finds)
    assert choose_pool_mode("auto", total=total, budget_bytes=budget, cache_slots=None, codec=codec, top_k=k,
                            scratch_experts=k) == "compressed"
    monkeypatch.setattr(H, "EXPAND_GBPS", 100.0)  # an expansion that costs something next to free copies
    picks = {}
    for gbps in (1.0, 10.0, 100.0, 1e4, 1e6):
        hw = profile(gbps)
        costs = pool_mode_costs(total=total, top_k=k, codec=codec, budget_bytes=budget, cache_slots=None,
                                scratch_experts=k, hw=hw)
        assert costs["compressed"]["slots"] > 3 * costs["expanded"]["slots"]
        for mode, c in costs.items():  # the estimate is the step time at that pool's hit rate
            assert c["layer_ms"] == layer_step_ms(with_format(hw, codec.fmt, mode), c["slots"] / total, k)
        pick = choose_pool_mode("auto", total=total, budget_bytes=budget, cache_slots=None, codec=codec, top_k=k,
                                scratch_experts=k, hw=hw)
        assert pick == min(costs, key=lambda m: costs[m]["layer_ms"])
        picks[gbps] = pick
    assert picks[1.0] == "compressed" and picks[1e6] == "expanded"

    # offload reads the same rule (the profile swapped for one with near-free copies, then very slow ones)
    m = _model("qwen3_moe").to(torch.bfloat16)
    E, L = m.config.num_experts, m.config.num_hidden_layers
    for gbps, want in [(1e6, "expanded"), (0.001, "compressed")]:
        monkeypatch.setattr(H, "default_profile", lambda b, gbps=gbps: (lambda hw: (
            setattr(hw, "copy_bandwidth_gbps", gbps), setattr(hw, "copy_latency_ms", 0.0),
            setattr(hw, "copy_host_ms", 0.0), hw)[-1])(default_profile(b)))
        m = _model("qwen3_moe").to(torch.bfloat16)
        probe = _model("qwen3_moe").to(torch.bfloat16)
        h = offload(probe, cache_slots=E * L, device="cpu", engine="sync", expert_dtype="int4", group_size=32,
                    pool_mode="compressed")
        cfg = h.stats()["config"]
        dense, packed = cfg["dense_expert_bytes"], cfg["copy_bytes_per_expert"]
        h.remove()
        # a budget holding about 40% of the experts dense + landing, and all of them compressed
        budget = cfg["gpu_nonexpert_bytes"] + int(0.4 * E * L) * (dense + packed)
        h = offload(m, gpu_memory=budget, device="cpu", engine="sync", expert_dtype="int4", group_size=32)
        assert h.stats()["config"]["pool_mode"] == want, gbps
        h.remove()


# -- from_pretrained: synthetic checkpoints in each format ------------------------------------------------

def _tokens(m, n=6):
    return m.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("fmt,shard", [("int4", "30KB"), ("int8", None)])
def test_from_pretrained_quantizes_expert_by_expert(tmp_path, fmt, shard):
    from moecache.loading import from_pretrained

    src = _model("mixtral").to(torch.bfloat16)
    src.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    ref = quantize_dequantize_(_model("mixtral").to(torch.bfloat16), ExpertFormat(fmt, 32))
    m = from_pretrained(tmp_path, cache_slots=4, device="cpu", engine="sync", expert_dtype=fmt, group_size=32)
    cfg = m.moecache.stats()["config"]
    assert cfg["expert_format"] == f"{fmt} g32"
    assert torch.equal(_tokens(m), _tokens(ref))
    with pytest.raises(ConfigError, match="group_size must be"):
        from_pretrained(tmp_path, cache_slots=4, device="cpu", expert_dtype="int4", group_size=100)


def _mxfp4_checkpoint(path, seed=0):
    """A tiny GPT-OSS checkpoint in the layout GPT-OSS ships: experts as ``*_blocks`` (E, out, in/32, 16) and
    ``*_scales`` (E, out, in/32) uint8, ``quantization_config.quant_method = mxfp4``; the rest bf16."""
    from safetensors.torch import save_file

    src = tiny_model("gpt_oss", seed=seed).to(torch.bfloat16)
    src.config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    src.config.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed + 7)
    state = {}
    for k, v in src.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, inp, out = v.shape  # GPT-OSS stores (E, in, out)
            state[k + "_blocks"] = torch.randint(0, 256, (E, out, inp // 32, 16), generator=gen, dtype=torch.uint8)
            state[k + "_scales"] = torch.randint(119, 124, (E, out, inp // 32), generator=gen, dtype=torch.uint8)
        else:
            state[k] = v.contiguous()
    save_file(state, str(path / "model.safetensors"))
    return src, state


def test_gpt_oss_mxfp4_checkpoint_kept_as_stored(tmp_path):
    """auto keeps MXFP4: the host rows hold the checkpoint's bytes, and the model equals transformers' own
    dequantization of them (``integrations.mxfp4.convert_moe_packed_tensors``) in a plain bf16 model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moecache.loading import from_pretrained

    src, state = _mxfp4_checkpoint(tmp_path)
    for name, block in [(n, b) for n, b in src.named_modules() if n.endswith("mlp.experts")]:
        for kind in ("gate_up_proj", "down_proj"):
            dense = convert_moe_packed_tensors(state[f"{name}.{kind}_blocks"], state[f"{name}.{kind}_scales"])
            getattr(block, kind).data.copy_(dense)
    m = from_pretrained(tmp_path, cache_slots=5, device="cpu", engine="sync", dtype=torch.bfloat16)
    h = m.moecache
    assert h.stats()["config"]["expert_format"] == "mxfp4"
    row = h.runtime.store.layer_views(0)
    assert torch.equal(row["gate_up_proj/blocks"][3], state["model.layers.0.mlp.experts.gate_up_proj_blocks"][3])
    assert torch.equal(_tokens(m), _tokens(src))
    for bad, words in [("int4", "stored in MXFP4"), ("bf16", "stored in MXFP4")]:
        with pytest.raises(ConfigError, match=words):
            from_pretrained(tmp_path, cache_slots=5, device="cpu", expert_dtype=bad)


# -- timing model ----------------------------------------------------------------------------------------

def test_timing_model_format_shrinks_copies_not_compute():
    from moecache.cost.hardware import default_profile, slots_for_format, with_format

    dense = default_profile(3 * 2048 * 1408 * 2)  # a DeepSeek-V2-Lite expert in bf16
    for name, g, ratio in [("int8", 64, 0.55), ("int4", 64, 0.29), ("int4", 128, 0.28)]:
        hw = with_format(dense, ExpertFormat(name, g), "compressed")
        assert hw.copy_bytes < ratio * dense.bytes_per_expert
        assert hw.copy_ms < dense.copy_ms
        for tokens in (1, 8, 64):
            assert hw.gpu(tokens) > dense.gpu(tokens)  # the expansion adds, the compute stays
        assert hw.cpu(1) == dense.cpu(1)
        assert slots_for_format(100, 10_000, hw, "compressed") > 100 / ratio * 0.9
        assert slots_for_format(100, 150, hw, "compressed") == 150
        ex = with_format(dense, ExpertFormat(name, g), "expanded")
        assert ex.gpu(1) == dense.gpu(1) and ex.copy_ms > hw.copy_ms
        assert slots_for_format(100, 10_000, ex, "expanded") < 100
    assert with_format(dense, None) is dense


def test_gptq_lowers_output_error_and_offload_uses_the_same_codes():
    gen = torch.Generator().manual_seed(3)
    # correlated inputs with a few large channels: where GPTQ's error feedback pays
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(2000, 64, generator=gen) @ mix
    x[:, 5] *= 8
    h = x.T @ x / x.shape[0]
    w = torch.randn(32, 64, generator=gen) * 0.05
    fmt = ExpertFormat("int4", 32)
    out_err = {}
    for name, imp, search in [("rtn", None, False), ("gptq", h, True)]:
        d = dequantize_matrix(quantize_matrix(w, fmt, imp, search), fmt, torch.float32)
        out_err[name] = float(((x @ (w - d).T) ** 2).mean())
    assert out_err["gptq"] < 0.8 * out_err["rtn"]
    # calibration weights reach the runtime's store: offload equals the in-place model quantized with them
    from moecache.quant import collect_importance

    src = _model("qwen3_moe")
    imp = collect_importance(src, [[5, 6, 7, 8, 9, 10, 11, 12] * 4, [20, 21, 22, 23] * 6])
    assert imp[0]["gate_up_proj"] and next(iter(imp[0]["down_proj"].values())).shape == (32, 32)
    ref = quantize_dequantize_(_model("qwen3_moe"), fmt, importance=imp)
    m = _model("qwen3_moe")
    h2 = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype="int4", group_size=32, importance=imp)
    assert torch.equal(_gen(m).sequences, _gen(ref).sequences)
    assert torch.equal(m.model.layers[1].mlp(torch.ones(1, 3, 32)), ref.model.layers[1].mlp(torch.ones(1, 3, 32)))
    h2.remove()
