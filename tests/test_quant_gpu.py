"""Compressed experts on CUDA: both pool modes and both copy engines give the tokens of the model whose
experts were quantized and dequantized in place (the CPU tests in test_quant.py check the same on the CPU)."""

from __future__ import annotations

import pytest
import torch

from moecache import offload
from moecache.quant import ExpertFormat, quantize_dequantize_

from .tiny_models import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(family: str) -> torch.nn.Module:
    """A tiny bf16 model whose expert matrices' input dimensions take group size 32."""
    kw = {"moe_intermediate_size": 32} if family == "qwen3_moe" else {}
    return tiny_model(family, **kw).to(torch.bfloat16)


def _tokens(m: torch.nn.Module, n: int = 8) -> torch.Tensor:
    x = torch.tensor([[5, 6, 7, 8, 9]], device="cuda")
    with torch.no_grad():
        return m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False).cpu()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 32)])
@pytest.mark.parametrize("pool_mode", ["compressed", "expanded"])
@pytest.mark.parametrize("engine", ["sync", "stream"])
def test_compressed_offload_on_cuda_equals_quantized_reference(family, fmt, group, pool_mode, engine):
    ref = quantize_dequantize_(_model(family), ExpertFormat(fmt, group)).cuda().eval()
    expect = _tokens(ref)
    del ref
    m = _model(family).cuda().eval()
    h = offload(m, cache_slots=4, device="cuda", engine=engine, expert_dtype=fmt, group_size=group,
                pool_mode=pool_mode)
    try:
        assert torch.equal(_tokens(m), expect)
        cfg = h.stats()["config"]
        assert cfg["pool_mode"] == pool_mode and cfg["expert_format"] == f"{fmt} g{group}"
        assert h.stats()["misses"] > 0  # the pool is smaller than the experts: copies really ran
    finally:
        h.remove()
