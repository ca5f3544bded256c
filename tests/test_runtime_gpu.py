"""GPU tests of the offloading runtime (``pytest -m gpu``; skipped where CUDA is absent).

Exactness on CUDA for both CUDA copy engines (the C++ worker and the Python stream engine), the
runtime's own device allocations staying constant over 1,000 decode steps, an error inside the
copy worker surfacing as a Python exception (never a hang), and the event-based figures.
"""

from __future__ import annotations

import threading

import pytest
import torch

from moecache._ext import extension
from moecache.runtime import CopyError, offload

from .tiny_models import tiny_model

pytestmark = pytest.mark.gpu

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v2", "gpt_oss"]
PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


def _engines() -> list[str]:
    C = extension()
    has_worker = C is not None and bool(C.with_cuda())
    return ["worker", "stream"] if has_worker else ["stream"]


def _model(family: str, dtype: torch.dtype, impl: str = "batched_mm") -> torch.nn.Module:
    m = tiny_model(family).to(dtype)
    m.set_experts_implementation(impl)
    return m.to("cuda").eval()


def _generate(m: torch.nn.Module, n: int = 12, prompt: list[list[int]] = PROMPT):
    x = torch.tensor(prompt, device="cuda")
    return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                      output_logits=True)


@pytest.mark.parametrize("engine", ["worker", "stream"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_exact_tokens_fp32(family, engine):
    if engine not in _engines():
        pytest.skip("moecache._C was built without CUDA")
    ref = _generate(_model(family, torch.float32)).sequences
    for slots in (2, 8, 10**6):
        m = _model(family, torch.float32)
        h = offload(m, cache_slots=slots, device="cuda", engine=engine, predictor="temporal", prefetch_depth=2)
        out = _generate(m).sequences
        s = h.stats()
        h.remove()
        assert torch.equal(out, ref), (family, engine, slots)
        if slots == 2:
            assert s["misses"] > 0 and s["evictions"] > 0


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_logits_bit_identical(family, impl):
    engine = _engines()[0]
    # Budgets where every layer's needed experts fit: top-k only with a 1-token prompt (each call
    # needs 2 experts per layer), 4 slots with a 2-token prompt, and all experts with the full prompt.
    for slots, prompt in ((2, [[5]]), (4, [[5, 6]]), (10**6, PROMPT)):
        ref = _generate(_model(family, torch.bfloat16, impl), prompt=prompt)
        m = _model(family, torch.bfloat16, impl)
        h = offload(m, cache_slots=slots, device="cuda", engine=engine)
        out = _generate(m, prompt=prompt)
        s = h.stats()
        h.remove()
        assert s["round_calls"] == 0
        assert torch.equal(out.sequences, ref.sequences)
        for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
            assert torch.equal(a, b), (family, impl, slots, step)


def test_runtime_allocations_constant_over_1000_decode_steps():
    m = _model("qwen3_moe", torch.bfloat16)
    h = offload(m, cache_slots=3, device="cuda", engine=_engines()[0], predictor="temporal", prefetch_depth=1)
    x = torch.tensor([[7]], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step() -> None:
        with torch.no_grad():
            tok = torch.randint(3, 90, (1, 1), device="cuda", generator=gen)
            m(input_ids=tok, use_cache=False)

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(1000):
        step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    s = h.stats()
    h.remove()
    assert after == before
    assert peak - before < 4 * 2**20  # one step's activations, nothing that grows
    assert s["copies"] > 500 and s["evictions"] > 500
    del x


def test_error_in_copy_worker_raises_not_hangs():
    if "worker" not in _engines():
        pytest.skip("moecache._C was built without CUDA")
    m = _model("qwen3_moe", torch.bfloat16)
    h = offload(m, cache_slots=4, device="cuda", engine="worker", predictor="temporal", prefetch_depth=3)
    _generate(m, 4)
    h.runtime.engine.inject_fault(1)
    outcome: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            for _ in range(50):  # the worker thread executes prefetches: one of them hits the fault
                _generate(m, 4)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the runtime hung after a copy-worker error"
    assert isinstance(outcome["error"], CopyError), outcome["error"]
    assert "injected fault" in str(outcome["error"])
    h.remove()


def test_event_figures_and_pool_size():
    m = _model("mixtral", torch.bfloat16)
    h = offload(m, cache_slots=5, device="cuda", engine=_engines()[0], predictor="temporal", prefetch_depth=1)
    _generate(m, 24)
    s = h.stats()
    h.remove()
    assert s["config"]["pool_bytes"] == 5 * s["config"]["slot_bytes"]
    assert 0.0 <= s["ready_rate"] <= s["hit_rate"] <= 1.0
    assert s["stall_s"] >= 0.0 and s["decode_tokens_per_s"] > 0
    assert s["gpu_other_peak_bytes"] >= 0


def test_from_pretrained_on_gpu_same_text(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from moecache.loading import from_pretrained

    text = (tiny_model_dir / "heldout_sample.txt").read_text()[:256]
    x = torch.tensor([list(text.encode("ascii"))], device="cuda")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to("cuda").eval()
    ref = plain.generate(x, max_new_tokens=48, do_sample=False)
    m = from_pretrained(tiny_model_dir, cache_slots=48, device="cuda")  # 25% of 6 x 32 experts
    out = m.generate(x, max_new_tokens=48, do_sample=False)
    assert m.moecache.stats()["config"]["host_pinned"]
    m.moecache.remove()
    assert torch.equal(out, ref)
