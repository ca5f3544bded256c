"""GPU tests of the family kernels (Llama 4, DBRX, Switch): ``pytest -m gpu``; skipped where CUDA is absent.

The CPU tests (tests/test_runtime.py) show them exact on the CPU; here the same on CUDA, with both
CUDA copy engines: the same tokens in fp32 at every budget, and bit-identical bf16 logits at every
budget (the kernels add expert by expert in the module's own order, also in rounds). DBRX and Switch
issue the very GEMMs of their original loops (one expert's tokens, same shapes and strides); Llama 4
issues one ``bmm`` per needed expert where the original issues one over all experts, so its bf16
identity also depends on cuBLAS choosing the same algorithm for a batch of one.
"""

from __future__ import annotations

import pytest
import torch

from moecache._ext import extension
from moecache.families import detect_family, find_moe_blocks
from moecache.runtime import offload

from .tiny_models import tiny_model

pytestmark = pytest.mark.gpu

KERNEL_FAMILIES = ["llama4", "dbrx", "switch_transformers"]
PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


def _engines() -> list[str]:
    C = extension()
    has_worker = C is not None and bool(C.with_cuda())
    return ["worker", "stream"] if has_worker else ["stream"]


def _generate(m: torch.nn.Module, n: int = 12):
    x = torch.tensor(PROMPT, device="cuda")
    return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                      output_logits=True)


def _budgets(family: str) -> tuple[int, int, int]:
    m = tiny_model(family)
    a = detect_family(m)
    L, E, k = len(find_moe_blocks(m, a)), a.num_experts(m.config), a.top_k(m.config)
    return k, (L * E) // 2, L * E


@pytest.mark.parametrize("engine", ["worker", "stream"])
@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_cuda_family_kernels_exact_tokens_fp32(family, engine):
    if engine not in _engines():
        pytest.skip("moecache._C was built without CUDA")
    ref = _generate(tiny_model(family).to("cuda")).sequences
    for slots in _budgets(family):
        m = tiny_model(family)
        h = offload(m, cache_slots=slots, device="cuda", engine=engine, predictor="temporal", prefetch_depth=2)
        out = _generate(m).sequences
        s = h.stats()
        h.remove()
        assert torch.equal(out, ref), (family, engine, slots)
        if slots == _budgets(family)[0]:
            assert s["misses"] > 0 and s["evictions"] > 0


@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_cuda_family_kernels_bf16_logits_bit_identical(family):
    ref = _generate(tiny_model(family).to(torch.bfloat16).to("cuda"))
    for slots in _budgets(family):
        m = tiny_model(family).to(torch.bfloat16)
        h = offload(m, cache_slots=slots, device="cuda", engine=_engines()[0])
        out = _generate(m)
        h.remove()
        assert torch.equal(out.sequences, ref.sequences), (family, slots)
        for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
            assert torch.equal(a, b), (family, slots, step)
