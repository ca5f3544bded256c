"""Faults injected in the C++ copy worker and the CPU expert pool surface as Python exceptions in the
calling thread, and the model is usable again after ``remove()``."""

from __future__ import annotations

import threading

import pytest
import torch

from moecache._ext import extension
from moecache.runtime import CopyError, offload

from .tiny_models import tiny_model

pytestmark = [pytest.mark.skipif(extension() is None, reason="needs the compiled extension moecache._C"),
              pytest.mark.usefixtures("one_torch_thread")]

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])


def _tokens(m):
    with torch.no_grad():
        return m.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _moecache_threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_copy_worker_fault_is_a_python_error_and_remove_recovers():
    m = tiny_model("qwen3_moe")
    ref = _tokens(m)
    h = offload(m, cache_slots=4, device="cpu", engine="worker")
    assert h.runtime.engine.name == "worker"
    h.runtime.engine.inject_fault(1)
    with pytest.raises(CopyError, match="injected fault"):
        _tokens(m)  # the worker thread failed; the decode loop's thread raises
    h.remove()
    assert torch.equal(_tokens(m), ref)
    h2 = offload(m, cache_slots=4, device="cpu", engine="worker")  # and can be offloaded again
    assert torch.equal(_tokens(m), ref)
    h2.remove()


@pytest.mark.parametrize("nth", [1, 3])
def test_cpu_pool_fault_is_a_python_error_and_remove_recovers(nth, monkeypatch):
    monkeypatch.setenv("MOECACHE_CPU_THREADS", "1")
    m = tiny_model("qwen3_moe")
    ref = _tokens(m)
    h = offload(m, cache_slots=4, device="cpu", hybrid="cpu")
    kernel = h.runtime.hybrid.kernel
    if not hasattr(kernel, "inject_fault"):
        pytest.skip(f"the CPU kernel is {kernel.name} (no C++ pool)")
    kernel.inject_fault(nth)
    with pytest.raises(RuntimeError, match="injected fault"):
        _tokens(m)
    h.remove()
    assert torch.equal(_tokens(m), ref)


def test_cpu_pool_runs_the_tasks_after_a_failed_one():
    import numpy as np

    C = extension()
    pool = C.CpuExpertPool(1, "portable")
    try:
        H, I = 8, 8
        x = torch.ones(1, H)
        gu = torch.ones(2 * I, H)
        down = torch.ones(H, I)
        outs = [torch.zeros(1, H) for _ in range(3)]
        pool.inject_fault(2)
        tickets = [pool.submit(H, I, 0, [x.data_ptr()], [1], [gu.data_ptr()], [down.data_ptr()], [o.data_ptr()])
                   for o in outs]
        pool.wait(tickets[0])
        with pytest.raises(RuntimeError, match="injected fault"):
            pool.wait(tickets[1])
        pool.wait(tickets[2])
        assert torch.equal(outs[0], outs[2]) and float(outs[0].abs().sum()) > 0 and not outs[1].any()
        assert np.isfinite(outs[2].numpy()).all()
    finally:
        pool.close()
