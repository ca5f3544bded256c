"""The CPU kernel on compressed experts (csrc/cpu_expert_quant.cpp): every format x every instruction set
this machine has x small random expert shapes (SiLU experts and GPT-OSS's biased, clamped ones) against
the torch reference (``cpu_kernel.reference_ffn``: moecache.quant's dequantization, float64 sums); bad
input; and hybrid execution of compressed experts against the model quantized and dequantized in place."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moecache._ext import extension
from moecache.errors import ConfigError
from moecache.quant import ExpertCodec, ExpertFormat, quantize_dequantize_
from moecache.runtime import cpu_kernel as ck
from moecache.runtime import offload
from moecache.runtime.hybrid import HybridConfig
from moecache.runtime.layout import SlotLayout

from .test_hybrid import _assert_close_run
from .tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_ext = pytest.mark.skipif(extension() is None, reason="moecache._C not built")
FORMATS = [("int8", 32), ("int8", 64), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("mxfp4", 32)]
#: GPT-OSS's clamp, small enough that the random test experts cross it.
ALPHA, LIMIT = 1.702, 0.6


def _isas() -> list[str]:
    """The kernels this machine runs (the portable one always)."""
    if extension() is None:
        return []
    f = extension().cpu_features()
    out = ["portable"]
    if f["avx2"] and f["fma"]:
        out.append("avx2")
    if f["avx512f"]:
        out.append("avx512")
    return out


class _Experts(nn.Module):
    """Stacked random experts: concatenated (E, 2I, H) / (E, H, I), or GPT-OSS's transposed ones with biases."""

    def __init__(self, E: int, H: int, I: int, dtype: torch.dtype, gpt_oss: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, std=0.05):
            return nn.Parameter((torch.randn(*shape, generator=g) * std).to(dtype))
        if gpt_oss:
            self.gate_up_proj, self.gate_up_proj_bias = rnd(E, H, 2 * I), rnd(E, 2 * I, std=0.3)
            self.down_proj, self.down_proj_bias = rnd(E, I, H), rnd(E, H, std=0.3)
        else:
            self.gate_up_proj, self.down_proj = rnd(E, 2 * I, H), rnd(E, H, I)


def make_store(H: int, I: int, fmt: str, group: int, dtype: torch.dtype, gpt_oss: bool, E: int = 2, seed: int = 0
               ) -> tuple[ExpertCodec, torch.Tensor]:
    """A codec and ``E`` compressed expert rows: int8/int4 quantized (round to nearest) from random weights;
    MXFP4 random codes and exponents, as a checkpoint would hold them."""
    m = _Experts(E, H, I, dtype, gpt_oss, seed)
    codec = ExpertCodec(SlotLayout.from_module(m, E), ExpertFormat(fmt, group), transposed=gpt_oss)
    rows = torch.zeros((E, codec.slot_numel), dtype=torch.uint8)
    views = codec.views(rows)
    gen = torch.Generator().manual_seed(seed + 1)
    for e in range(E):
        one = {k: v[e] for k, v in views.items()}
        for ki in codec.kinds:
            if fmt == "mxfp4" and ki.matrix:
                out, inp = (ki.shape[1], ki.shape[0]) if ki.transposed else ki.shape
                codec.set_native(one, ki.name,
                                 blocks=torch.randint(0, 256, (out, inp // 32, 16), generator=gen, dtype=torch.uint8),
                                 scales=torch.randint(119, 124, (out, inp // 32), generator=gen, dtype=torch.uint8))
            else:
                codec.encode_kind(one, ki.name, getattr(m, ki.name)[e], search=False)
    return codec, rows


def _offsets_of(codec: ExpertCodec) -> dict:
    """What CppQuantKernel passes the pool for ``codec``: (H, I) and the 8 part offsets of an expert's row."""
    kinds = {ki.name: ki for ki in codec.kinds}
    H, I = ck._matrix_shape(kinds["down_proj"])
    return {"H": H, "I": I, "offsets": ck.quant_offsets(codec)}


def run_pool(kernel: str, codec: ExpertCodec, rows: torch.Tensor, xs: list[torch.Tensor], experts: list[int],
             act: int, threads: int = 1, fast: bool = False) -> tuple[list[torch.Tensor], str]:
    """One task of ``len(xs)`` expert jobs through ``CpuExpertPool.submit_quant``; outputs and the kernel name."""
    pool = extension().CpuExpertPool(threads, kernel)
    k = _offsets_of(codec)
    outs = [torch.full((x.shape[0], k["H"]), float("nan")) for x in xs]
    try:
        t = pool.submit_quant(k["H"], k["I"], ck.QUANT_FORMAT_CODES[codec.fmt.name], codec.fmt.group_size,
                              codec.dense.dtype == torch.bfloat16, act, ALPHA, LIMIT, k["offsets"],
                              [x.data_ptr() for x in xs], [x.shape[0] for x in xs],
                              [rows[e].data_ptr() for e in experts], [o.data_ptr() for o in outs], fast)
        pool.wait(t)
        return outs, pool.quant_kernel(fast)
    finally:
        pool.close()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _reference_cases(fmt: str, group: int):
    """The stores and inputs both reference tests run: fp32 and bf16 compute dtypes, SiLU and GPT-OSS experts,
    1 and 5 tokens on experts 1 and 0: (dtype, gpt_oss, codec, rows, act, xs)."""
    H, I = 3 * group, 2 * group
    for dtype in (torch.float32, torch.bfloat16):
        for gpt_oss in (False, True):
            codec, rows = make_store(H, I, fmt, group, dtype, gpt_oss, seed=group + (7 if gpt_oss else 0))
            act = ck.ACT_GPT_OSS if gpt_oss else ck.ACT_SILU
            gen = torch.Generator().manual_seed(1)
            yield dtype, gpt_oss, codec, rows, act, [torch.randn(1, H, generator=gen), torch.randn(5, H, generator=gen)]


# -- the kernels against the reference ----------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("kernel", _isas())
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_kernel_matches_reference(kernel, fmt, group):
    """fp32 and bf16 compute dtypes, SiLU and GPT-OSS experts, 1 and 5 tokens, two experts in one task:
    within QUANT_RTOL of the reference (a wrong rounding of the weights to bf16 would show as ~1e-3)."""
    for dtype, gpt_oss, codec, rows, act, xs in _reference_cases(fmt, group):
        outs, name = run_pool(kernel, codec, rows, xs, [1, 0], act)
        assert name.split("+")[0] == kernel
        for x, e, out in zip(xs, [1, 0], outs):
            ref = ck.reference_ffn(codec, rows[e], x, act, ALPHA, LIMIT)
            assert _rel_err(out, ref) <= ck.QUANT_RTOL, (dtype, gpt_oss)
        if gpt_oss:  # the clamp was exercised
            h = xs[1].double() @ codec.expand_kind(codec.views(rows[:1]), "gate_up_proj")[0].double()
            assert (h.abs() > LIMIT).any()


@needs_ext
@pytest.mark.parametrize("fmt,group", [("mxfp4", 32), ("int4", 64), ("int8", 32)])
def test_gpt_oss_hidden_2880(fmt, group):
    """GPT-OSS's hidden size 2880 (takes group 32 or 64), with its biases and clamp, bf16."""
    codec, rows = make_store(2880, 64, fmt, group, torch.bfloat16, True, E=1, seed=3)
    x = torch.randn(2, 2880, generator=torch.Generator().manual_seed(2))
    for kernel in _isas()[-1:] + ["portable"]:
        (out,), _ = run_pool(kernel, codec, rows, [x], [0], ck.ACT_GPT_OSS)
        assert _rel_err(out, ck.reference_ffn(codec, rows[0], x, ck.ACT_GPT_OSS, ALPHA, LIMIT)) <= ck.QUANT_RTOL


@needs_ext
@pytest.mark.parametrize("fmt,group", [("int8", 64), ("int4", 32), ("mxfp4", 32)])
def test_tokens_and_threads_do_not_change_the_bits(fmt, group):
    """A token's output is the same bits alone or among 9 (register blocks over tokens), and with 1 or 3
    threads (work items): the summation order depends on neither."""
    codec, rows = make_store(128, 64, fmt, group, torch.bfloat16, False, seed=5)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(4))
    kernel = _isas()[-1]
    (together,), _ = run_pool(kernel, codec, rows, [x], [1], ck.ACT_SILU, threads=3)
    alone, _ = run_pool(kernel, codec, rows, [x[i:i + 1] for i in range(9)], [1] * 9, ck.ACT_SILU, threads=1)
    assert torch.equal(together, torch.cat(alone))


# -- the fast mode (int16 activations, integer dot products) ----------------------------------------------

@needs_ext
@pytest.mark.parametrize("fmt,group", FORMATS)
def test_fast_mode_within_its_tolerance_on_every_isa(fmt, group):
    """The fast mode against the exact reference (weights rounded to the compute dtype) within
    its tolerance (``quant_fast_rtol``), fp32 and bf16, SiLU and GPT-OSS, 1 and 5 tokens, on every instruction set (an odd
    number of groups: the last of a pair of 32-groups runs alone); and the instruction sets agree with the
    portable one within 1e-4 (the same integer sums, scaled in another order: fp32 rounding, which can move
    an intermediate activation across an int16 rounding boundary)."""
    for dtype, gpt_oss, codec, rows, act, xs in _reference_cases(fmt, group):
        refs = [ck.reference_ffn(codec, rows[e], x, act, ALPHA, LIMIT) for x, e in zip(xs, [1, 0])]
        portable = None
        for kernel in _isas():
            outs, name = run_pool(kernel, codec, rows, xs, [1, 0], act, fast=True)
            assert name.startswith(kernel) and name.endswith("-int16"), name
            for out, ref in zip(outs, refs):
                assert 0 < _rel_err(out, ref) <= ck.quant_fast_rtol(fmt, dtype), (kernel, dtype, gpt_oss)
            if portable is None:
                portable = outs
            for out, p in zip(outs, portable):
                assert ((out - p).abs().max() / p.abs().max()).item() <= 1e-4, (kernel, dtype, gpt_oss)


#: Expert shapes (H, I, GPT-OSS math) of the three families: DeepSeek-V2-Lite's and GPT-OSS-20B's whole;
#: Mixtral's hidden size with its intermediate size cut to 1/14 (the float64 reference of a whole one is ~1 GB).
FAMILY_SHAPES = {"deepseek": (2048, 1408, False), "mixtral": (4096, 1024, False), "gptoss": (2880, 2880, True)}


@needs_ext
@settings(max_examples=6, deadline=None, derandomize=True)
@given(family=st.sampled_from(sorted(FAMILY_SHAPES)), fmt_group=st.sampled_from(FORMATS), tokens=st.integers(1, 3),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_fast_mode_tolerance_on_family_shapes(family, fmt_group, tokens, seed, scale):
    """On the families' expert shapes (bf16 compute, the best instruction set), with activations of any
    scale: the fast mode within its tolerance of the exact reference."""
    fmt, group = fmt_group
    H, I, gpt_oss = FAMILY_SHAPES[family]
    if H % group or I % group:  # GPT-OSS's 2880 takes groups of 32 or 64
        group = 32 if fmt != "int8" or H % 64 else 64
    codec, rows = make_store(H, I, fmt, group, torch.bfloat16, gpt_oss, E=1, seed=seed)
    act = ck.ACT_GPT_OSS if gpt_oss else ck.ACT_SILU
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)) * scale
    (out,), _ = run_pool(_isas()[-1], codec, rows, [x], [0], act, fast=True)
    ref = ck.reference_ffn(codec, rows[0], x, act, ALPHA, LIMIT)
    assert _rel_err(out, ref) <= ck.quant_fast_rtol(fmt, torch.bfloat16), (family, fmt, group)


@needs_ext
def test_fast_mode_tokens_and_threads_do_not_change_the_bits():
    """As the exact mode: one token alone or among 7, 1 or 3 threads: the same bits."""
    for fmt, group in [("int8", 64), ("int4", 32), ("int4", 128), ("mxfp4", 32)]:
        codec, rows = make_store(384, 128, fmt, group, torch.bfloat16, False, seed=5)
        x = torch.randn(7, 384, generator=torch.Generator().manual_seed(4))
        for kernel in _isas():
            (together,), _ = run_pool(kernel, codec, rows, [x], [1], ck.ACT_SILU, threads=3, fast=True)
            alone, _ = run_pool(kernel, codec, rows, [x[i:i + 1] for i in range(7)], [1] * 7, ck.ACT_SILU, fast=True)
            assert torch.equal(together, torch.cat(alone)), (fmt, group, kernel)


@needs_ext
def test_fast_mode_zero_and_extreme_activations():
    """An all-zero token gives exactly zero (no bias); a token with one huge input keeps the others'
    contribution within the tolerance of the reference only where the group holds them (per-group scales)."""
    codec, rows = make_store(128, 64, "int4", 32, torch.float32, False, seed=2)
    zero = torch.zeros(1, 128)
    (out,), _ = run_pool(_isas()[-1], codec, rows, [zero], [0], ck.ACT_SILU, fast=True)
    assert torch.equal(out, torch.zeros_like(out))
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(3))
    x[0, 5] = 1e4  # an outlier in the first group only
    (out,), _ = run_pool(_isas()[-1], codec, rows, [x], [0], ck.ACT_SILU, fast=True)
    assert _rel_err(out, ck.reference_ffn(codec, rows[0], x, ck.ACT_SILU)) <= ck.QUANT_FAST_RTOL


@needs_ext
def test_bad_input_is_refused_with_a_clear_error():
    codec, rows = make_store(128, 64, "int4", 64, torch.float32, False)
    pool = extension().CpuExpertPool(1, "auto")
    k = _offsets_of(codec)
    x, out = torch.zeros(1, 128), torch.zeros(1, 128)

    def submit(**kw):
        a = dict(hidden=128, inter=64, fmt=1, group=64, compute_bf16=False, act=0, alpha=0.0, limit=0.0,
                 offsets=k["offsets"], x=[x.data_ptr()], tokens=[1], experts=[rows[0].data_ptr()], out=[out.data_ptr()])
        a.update(kw)
        return pool.submit_quant(**a)
    try:
        with pytest.raises(ValueError, match="unsupported group size 48"):
            submit(group=48)
        with pytest.raises(ValueError, match="mxfp4 takes 32"):
            submit(fmt=2, group=64)
        with pytest.raises(ValueError, match="multiples of the group size 128"):
            submit(group=128, inter=64)
        with pytest.raises(ValueError, match="fmt must be"):
            submit(fmt=3)
        with pytest.raises(ValueError, match="8 part offsets"):
            submit(offsets=k["offsets"][:4])
        with pytest.raises(ValueError, match="act must be"):
            submit(act=2)
        with pytest.raises(ValueError, match=">= 1 token"):
            submit(tokens=[0])
        pool.wait(submit())  # the pool still works
        assert torch.isfinite(out).all()
    finally:
        pool.close()


def test_layout_check_for_compressed_experts():
    from moecache.families import detect_family, find_moe_blocks

    def check(model, fmt="int4"):
        adapter = detect_family(model)
        b = find_moe_blocks(model, adapter)[0].experts
        layout = SlotLayout.from_module(b, 8, "experts", adapter.layout)
        codec = ExpertCodec(layout, ExpertFormat(fmt, 32), bool(getattr(adapter.layout, "transposed", False)))
        return ck.quant_mismatch(b, codec)

    assert check(tiny_model("mixtral"))[:2] == (None, ck.ACT_SILU)
    why, act, alpha, limit = check(tiny_model("gpt_oss"))
    assert (why, act) == (None, ck.ACT_GPT_OSS) and alpha == pytest.approx(1.702) and limit == pytest.approx(7.0)
    assert "bf16 or fp32" in check(tiny_model("mixtral").to(torch.float16))[0]
    m = tiny_model("mixtral")
    m.model.layers[0].mlp.experts.act_fn = nn.GELU()
    assert "GELU" in check(m)[0]


# -- hybrid execution of compressed experts -----------------------------------------------------------------

PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


def _gen(m, n=6):
    return m.generate(torch.tensor(PROMPT), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      return_dict_in_generate=True, output_logits=True)


def _model(family: str, dtype: torch.dtype):
    kw = {"moe_intermediate_size": 32} if family == "qwen3_moe" else {}
    return tiny_model(family, **kw).to(dtype)



@needs_ext
@pytest.mark.parametrize("family,dtype,fmt,rule", [
    ("mixtral", torch.float32, "int4", "cpu"), ("qwen3_moe", torch.float32, "int8", "half"),
    ("gpt_oss", torch.float32, "int4", "cpu"), ("mixtral", torch.bfloat16, "int8", "cpu"),
    ("gpt_oss", torch.bfloat16, "int4", "half")])
def test_hybrid_compressed_equals_quantize_dequantize_in_place(family, dtype, fmt, rule):
    """Missed compressed experts run on the CPU from their compressed host rows (the C++ kernel, no
    expansion); the model equals the same model with its experts quantized and dequantized in place: fp32
    logits within 1e-4 (fp32 sums in another order), bf16 within 0.05 (the reference's GEMMs round their
    intermediate results to bf16, the CPU kernel keeps them in fp32), tokens equal where the gap is clear."""
    ref = quantize_dequantize_(_model(family, dtype), ExpertFormat(fmt, 32))
    expect = _gen(ref)
    m = _model(family, dtype)
    h = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype=fmt, group_size=32,
                hybrid=HybridConfig(rule=rule, quant_mode="exact"))
    got = _gen(m)
    s = h.stats()
    h.remove()
    assert s["config"]["expert_format"] == f"{fmt} g32"
    assert s["cpu_experts"] > 0 and s["cpu_kernel_experts"] == s["cpu_experts"]
    assert s["config"]["hybrid"]["kernel_reason"] is None and s["cpu_kernel"] != "torch"
    if dtype == torch.float32:
        _assert_close_run(got, expect, logit_tol=1e-4, gap=1e-3)
    else:
        _assert_close_run(got, expect, logit_tol=0.05, gap=0.1)


@needs_ext
@pytest.mark.parametrize("family,dtype,fmt", [("mixtral", torch.float32, "int4"), ("gpt_oss", torch.bfloat16, "int8")])
def test_hybrid_compressed_fast_mode_is_the_default(family, dtype, fmt):
    """Without quant_mode, compressed experts run in the fast mode (the stats name its kernel); the model
    stays close to the one quantized and dequantized in place: fp32 logits within 1e-2 (int16 activations,
    weights not rounded), bf16 within 0.05, tokens equal where the gap is clear; a bad mode is refused."""
    ref = quantize_dequantize_(_model(family, dtype), ExpertFormat(fmt, 32))
    expect = _gen(ref)
    m = _model(family, dtype)
    h = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype=fmt, group_size=32, hybrid="cpu")
    got = _gen(m)
    s = h.stats()
    h.remove()
    assert s["cpu_experts"] > 0 and s["cpu_kernel"].endswith("-int16")
    _assert_close_run(got, expect, logit_tol=1e-2 if dtype == torch.float32 else 0.05, gap=0.1)
    with pytest.raises(ConfigError, match="quant_mode='fastest' .from HybridConfig. is unknown; valid: fast, exact"):
        offload(_model(family, dtype), cache_slots=4, device="cpu", engine="sync", expert_dtype=fmt, group_size=32,
                hybrid=HybridConfig(rule="cpu", quant_mode="fastest"))


def test_quant_mode_from_the_environment(monkeypatch):
    """``$MOECACHE_CPU_QUANT_MODE`` sets the mode where HybridConfig does not (CLI runs); a bad value is
    refused naming the variable; HybridConfig's own value wins."""
    assert HybridConfig.resolve("cpu").quant_mode == "fast"
    monkeypatch.setenv(ck.ENV_QUANT_MODE, "exact")
    assert HybridConfig.resolve("cpu").quant_mode == "exact"
    assert HybridConfig.resolve(HybridConfig(rule="cpu", quant_mode="fast")).quant_mode == "fast"
    monkeypatch.setenv(ck.ENV_QUANT_MODE, "quick")
    with pytest.raises(ConfigError, match="quant_mode='quick' .from MOECACHE_CPU_QUANT_MODE. is unknown"):
        HybridConfig.resolve("cpu")


@needs_ext
def test_hybrid_compressed_torch_kernel_expands_the_rows(monkeypatch):
    """``MOECACHE_CPU_KERNEL=torch``: the experts asked for are expanded from their compressed rows and run by
    the model's own class (the fallback for layouts the C++ kernel does not compute)."""
    monkeypatch.setenv(ck.ENV_KERNEL, "torch")
    ref = quantize_dequantize_(_model("qwen3_moe", torch.float32), ExpertFormat("int4", 32))
    expect = _gen(ref)
    m = _model("qwen3_moe", torch.float32)
    h = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype="int4", group_size=32, hybrid="cpu")
    got = _gen(m)
    s = h.stats()
    h.remove()
    assert s["cpu_kernel"] == "torch" and s["cpu_experts"] > 0
    _assert_close_run(got, expect, logit_tol=1e-4, gap=1e-3)


@needs_ext
def test_hybrid_gpt_oss_mxfp4_checkpoint(tmp_path):
    """A GPT-OSS checkpoint in its own MXFP4 layout, every miss on the CPU kernel from the stored bytes,
    against transformers' own dequantization of them in a plain bf16 model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moecache.loading import from_pretrained

    from .test_quant import _mxfp4_checkpoint

    src, state = _mxfp4_checkpoint(tmp_path)
    for name, block in [(n, b) for n, b in src.named_modules() if n.endswith("mlp.experts")]:
        for kind in ("gate_up_proj", "down_proj"):
            dense = convert_moe_packed_tensors(state[f"{name}.{kind}_blocks"], state[f"{name}.{kind}_scales"])
            getattr(block, kind).data.copy_(dense)
    m = from_pretrained(tmp_path, cache_slots=5, device="cpu", engine="sync", dtype=torch.bfloat16, hybrid="cpu")
    got, expect = _gen(m), _gen(src)
    s = m.moecache.stats()
    assert s["config"]["expert_format"] == "mxfp4" and s["cpu_experts"] > 0
    assert s["config"]["hybrid"]["kernel_reason"] is None
    _assert_close_run(got, expect, logit_tol=0.05, gap=0.1)


@needs_ext
def test_hybrid_auto_calibrates_on_compressed_rows(monkeypatch, tmp_path):
    """``hybrid=True`` measures its costs on the compressed store (copy of a compressed row, the compressed
    CPU kernel, inputs in the compute dtype) and runs; the profile's bytes per expert are the compressed row's."""
    monkeypatch.setenv("MOECACHE_CACHE_DIR", str(tmp_path))
    ref = quantize_dequantize_(_model("gpt_oss", torch.float32), ExpertFormat("int4", 32))
    expect = _gen(ref, 3)
    m = _model("gpt_oss", torch.float32)
    h = offload(m, cache_slots=4, device="cpu", engine="sync", expert_dtype="int4", group_size=32,
                hybrid=HybridConfig(quant_mode="exact"))
    got = _gen(m, 3)
    s = h.stats()
    h.remove()
    costs = s["config"]["hybrid"]["costs"]
    assert s["config"]["hybrid"]["kernel"] != "torch" and set(costs["cpu_ms"]) == {1, 4, 16, 64}
    assert h.runtime.hybrid.profile.bytes_per_expert == s["config"]["copy_bytes_per_expert"]
    _assert_close_run(got, expect, logit_tol=1e-4, gap=1e-3)
