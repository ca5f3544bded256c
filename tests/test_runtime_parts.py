"""The runtime's parts on their own: slot layout, host store, pool views, copy engines (C++ worker and
Python twins), the slot indexer of the eager path."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from moecache._ext import extension
from moecache.errors import ConfigError, UnsupportedModelError
from moecache.runtime.engine import COPY_ENGINES, CopyError, make_engine
from moecache.runtime.experts import SlotIndexer, call_mode
from moecache.runtime.hoststore import HostAllocator, HostStore
from moecache.runtime.layout import ALIGN_BYTES, SlotLayout
from moecache.runtime.pool import SlotPool

from .tiny_models import tiny_model


def _store_and_pool(slots: int = 3, layers: int = 2, experts: int = 5) -> tuple[HostStore, SlotPool]:
    m = tiny_model("gpt_oss")  # four kinds, two of them biases: the least regular layout
    ex = m.model.layers[0].mlp.experts
    layout = SlotLayout.from_module(ex, 8)
    store = HostStore(layout, layers, experts, HostAllocator(pin=False))
    for layer in range(layers):
        block = store.allocate_layer(layer)
        block.copy_(torch.arange(block.numel(), dtype=block.dtype).view_as(block) + 1000 * layer)
    return store, SlotPool(layout, slots, "cpu")


def test_layout_aligns_every_kind_and_the_slot_stride():
    ex = tiny_model("gpt_oss").model.layers[0].mlp.experts
    layout = SlotLayout.from_module(ex, 8)
    assert layout.names == ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    elem = layout.element_size
    for k in layout.kinds:
        assert (k.offset * elem) % ALIGN_BYTES == 0
        assert k.numel == int(np.prod(k.shape))
    assert layout.slot_bytes % ALIGN_BYTES == 0
    assert layout.slot_numel >= sum(k.numel for k in layout.kinds)
    flat = torch.zeros(4, layout.slot_numel)
    views = layout.views(flat)
    views["down_proj"][2].fill_(7.0)
    assert views["down_proj"].shape == (4, *ex.down_proj.shape[1:])
    assert views["down_proj"].stride(0) == layout.slot_numel  # a strided view over the slots, no copy
    assert flat[2].sum().item() == 7.0 * views["down_proj"][2].numel()


def test_layout_rejects_quantised_and_mixed_experts():
    ex = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    ex.down_proj = torch.nn.Parameter(ex.down_proj.detach().to(torch.bfloat16))
    with pytest.raises(UnsupportedModelError, match="mix dtypes"):
        SlotLayout.from_module(ex, 8)
    ex.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 4, 4, dtype=torch.uint8), requires_grad=False)
    ex.down_proj = torch.nn.Parameter(torch.zeros(8, 4, 4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="quantised"):
        SlotLayout.from_module(ex, 8)


def test_host_store_rows_and_fill():
    m = tiny_model("mixtral")
    ex = m.model.layers[1].mlp.experts
    layout = SlotLayout.from_module(ex, 8)
    store = HostStore(layout, 3, 8, HostAllocator(pin=False))
    store.fill_layer(1, ex)
    assert not store.pinned  # the CPU-only torch build cannot pin
    views = store.layer_views(1)
    assert torch.equal(views["gate_up_proj"], ex.gate_up_proj.detach())
    row = store.row(store.key_of(1, 5))
    assert torch.equal(row[:layout.kinds[0].numel].view(layout.kinds[0].shape), ex.gate_up_proj[5].detach())
    with pytest.raises(ConfigError, match="shape"):
        store.fill_expert(1, 0, "down_proj", torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="never filled"):
        store.row(store.key_of(0, 0))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA"):
            HostAllocator(pin=True)


@pytest.mark.parametrize("name", ["sync", "worker"])
def test_engines_copy_rows_into_slots(name):
    if name == "worker" and extension() is None:
        pytest.skip("moecache._C not built")
    store, pool = _store_and_pool()
    eng = make_engine(name, store, pool)
    eng.demand([0, 2], [7, 3], [0, 2])
    eng.submit(1, 9, 2.5)
    eng.wait([1])
    assert eng.ready([0, 1, 2]) == [True, True, True]
    for slot, key in ((0, 7), (1, 9), (2, 3)):
        assert torch.equal(pool.data[slot], store.row(key))
    eng.mark_used([0, 1])
    assert eng.stall_seconds() >= 0.0
    eng.close()


def _worker(store, pool):
    if extension() is None:
        pytest.skip("moecache._C not built")
    return make_engine("worker", store, pool)


def test_worker_priority_order_cancel_and_replace():
    store, pool = _store_and_pool(slots=4)
    eng = _worker(store, pool)
    w = eng._w
    w.pause(True)
    eng.submit_many([0, 1, 2], [1, 2, 3], [3.0, 1.0, 2.0])
    assert eng.cancel(2) is True           # not started: cancelled
    eng.submit(3, 4, 0.5)
    eng.submit(3, 5, 0.7)                   # replaces the queued copy into slot 3
    assert eng.counters()["queued"] == 3
    w.pause(False)
    deadline = time.time() + 10
    while eng.counters()["queued"] and time.time() < deadline:
        time.sleep(0.01)
    eng.wait([0, 1, 3])
    assert w.order() == [3, 1, 0]           # by predicted need time: 0.7, 1.0, 3.0
    assert torch.equal(pool.data[3], store.row(5)) and torch.equal(pool.data[1], store.row(2))
    assert eng.cancel(0) is False          # done already
    c = eng.counters()
    assert c["copies"] == 3 and c["cancelled"] == 2
    eng.close()


@pytest.mark.parametrize("mode", ["poll", "sync", ""])
def test_worker_copy_wait_modes_and_a_bad_one(monkeypatch, mode):
    store, pool = _store_and_pool()
    monkeypatch.setenv("MOECACHE_COPY_WAIT", mode)
    eng = _worker(store, pool)
    eng.submit_many([0, 1, 2], [4, 5, 6], [1.0, 2.0, 3.0])
    eng.wait([0, 1, 2])
    assert all(torch.equal(pool.data[s], store.row(k)) for s, k in ((0, 4), (1, 5), (2, 6)))
    eng.close()
    monkeypatch.setenv("MOECACHE_COPY_WAIT", "spin")
    with pytest.raises(ConfigError, match="MOECACHE_COPY_WAIT='spin' is not a copy wait mode"):
        make_engine("worker", store, pool)


def test_worker_wait_issues_queued_copies_itself():
    store, pool = _store_and_pool()
    eng = _worker(store, pool)
    eng._w.pause(True)  # the worker thread would never get to it
    eng.submit(2, 6, 5.0)
    assert eng.ready([2]) == [False]
    eng.wait([2])
    assert eng.ready([2]) == [True] and torch.equal(pool.data[2], store.row(6))
    assert eng.counters()["issued_by_waiter"] == 1
    eng.close()


def test_worker_error_surfaces_as_python_exception():
    store, pool = _store_and_pool()
    eng = _worker(store, pool)
    eng.inject_fault(1)
    eng.submit(0, 1, 1.0)  # the worker thread takes it and fails
    deadline = time.time() + 10
    while not eng._w.error() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(CopyError, match="injected fault"):
        eng.wait([0])
    with pytest.raises(CopyError, match="injected fault"):
        eng.submit(1, 2, 1.0)
    eng.close()


def test_engine_registry_and_auto(no_ext):
    store, pool = _store_and_pool()
    assert set(COPY_ENGINES.names()) == {"sync", "stream", "worker"}
    assert make_engine("auto", store, pool).name == "sync"  # extension disabled, CPU pool
    with pytest.raises(ConfigError, match="needs the compiled extension"):
        make_engine("worker", store, pool)
    with pytest.raises(ConfigError, match="CUDA pool"):
        make_engine("stream", store, pool)
    with pytest.raises(ConfigError, match="unknown copy engine"):
        make_engine("fast", store, pool)


def test_slot_indexer_maps_expert_ids_to_slots():
    view = torch.arange(12.0).view(4, 3)
    lut = np.array([-1, 2, 0, -1, 3])
    ix = SlotIndexer(view, lut, 5)
    assert torch.equal(ix[torch.tensor(1)], view[2])
    assert ix[torch.tensor([2])].data_ptr() == view[0].data_ptr()  # a view, no copy
    assert torch.equal(ix[torch.tensor([1, 4])], view[[2, 3]])
    assert ix.shape == (5, 3) and ix.size(0) == 5
    with pytest.raises(RuntimeError, match="not resident"):
        ix[torch.tensor(0)]
    lut[0] = 1  # the indexer reads the live table
    assert torch.equal(ix[0], view[1])
    assert call_mode("eager") == "indexer" and call_mode("grouped_mm") == "remap" and call_mode("other") == "remap"
