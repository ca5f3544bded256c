"""gpu_memory="auto" and the host-memory check: planning logic on fake device numbers (CPU only)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moecache
from moecache.errors import ConfigError
from moecache.runtime import memplan
from moecache.runtime.memplan import check_host_memory, kv_bytes_per_token, plan_gpu_memory

from .serve_helpers import SMALL_DEFAULT, small_default_model

GiB, MiB = 2**30, 2**20


def test_plan_follows_the_formula_and_prints_each_part():
    p = plan_gpu_memory(free=24 * GiB, non_expert=2 * GiB, slot_bytes=100 * MiB, top_k=8, total_experts=1000,
                        kv_per_token=128 * 1024, max_context=8192, batch=2, device="cuda:0")
    assert p.kv_cache == 2 * GiB
    assert p.margin == int(0.05 * 24 * GiB)
    assert p.budget == 24 * GiB - 2 * GiB - p.margin
    assert p.slots == (24 * GiB - 2 * GiB - p.margin - 2 * GiB) // (100 * MiB)
    text = "\n".join(p.lines())
    assert "non-expert weights  2.00 GiB" in text and f"{p.slots} slots" in text
    assert "KV cache            2.00 GiB: 8192 tokens x batch 2" in text and "safety margin" in text
    assert f"{p.slots / 1000:.1%} of the 1000 experts" in text


def test_small_budgets_keep_the_minimum_margin_and_cap_at_all_experts():
    p = plan_gpu_memory(free=64 * GiB, non_expert=GiB, slot_bytes=MiB, top_k=2, total_experts=64, kv_per_token=1024,
                        max_context=100, batch=1)
    assert p.slots == 64
    q = plan_gpu_memory(free=2 * GiB, non_expert=0, slot_bytes=MiB, top_k=2, total_experts=10**6, kv_per_token=0,
                        max_context=1, batch=1)
    assert q.margin == 512 * MiB


@settings(max_examples=60, deadline=None)
@given(free=st.integers(1, 80 * 1024), non_expert=st.integers(0, 40 * 1024), slot=st.integers(1, 2048),
       top_k=st.integers(1, 8), kv_tok=st.integers(1, 512), ctx=st.integers(1, 65536), batch=st.integers(1, 16))
def test_what_would_fit_does_fit(free, non_expert, slot, top_k, kv_tok, ctx, batch):
    """Sizes in MiB/KiB; where the plan fails, each suggestion it names succeeds (and one more token does not)."""
    kw = dict(free=free * MiB, non_expert=non_expert * MiB, slot_bytes=slot * MiB, top_k=top_k, total_experts=4096,
              kv_per_token=kv_tok * 1024)
    try:
        p = plan_gpu_memory(**kw, max_context=ctx, batch=batch)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("gpu_memory=auto: ") and "would fit: " in msg
        import re

        m = re.search(r"max_context (\d+) at batch", msg)
        if m:
            n = int(m.group(1))
            assert plan_gpu_memory(**kw, max_context=n, batch=batch).slots >= top_k
            with pytest.raises(ConfigError):
                plan_gpu_memory(**kw, max_context=n + 1, batch=batch)
        m = re.search(r"batch (\d+) at max_context", msg)
        if m:
            assert plan_gpu_memory(**kw, max_context=ctx, batch=int(m.group(1))).slots >= top_k
        assert msg.endswith("more free device memory")
    else:
        assert top_k <= p.slots <= 4096
        assert p.non_expert + p.slots * p.slot_bytes + p.kv_cache + p.margin <= p.free


def test_kv_bytes_match_a_real_cache():
    model = small_default_model()
    x = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        out = model(input_ids=x, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    real = 0
    for layer in cache.layers:
        real += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    assert real == kv_bytes_per_token(model.config, 4) * 37 * 2


def test_offload_auto_on_fake_free_memory(monkeypatch, capsys):
    model = small_default_model()
    monkeypatch.setattr(memplan, "device_free_bytes", lambda dev: 600 * MiB)
    h = moecache.offload(model, "auto", device="cpu", max_context=256, batch=2)
    try:
        p = h.memory_plan
        assert p.max_context == 256 and p.batch == 2 and p.margin == 512 * MiB
        assert p.kv_cache == kv_bytes_per_token(model.config, 4) * 512
        assert h.stats()["config"]["slots"] == p.slots == min(16, (p.budget - p.non_expert) // p.slot_bytes)
        assert "memory plan (gpu_memory=auto) on cpu" in capsys.readouterr().err
    finally:
        h.remove()


def test_offload_auto_refuses_and_changes_nothing(monkeypatch):
    model = small_default_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(memplan, "device_free_bytes", lambda dev: 100 * MiB)
    with pytest.raises(ConfigError, match=r"would fit: .*more free device memory"):
        moecache.offload(model, "auto", device="cpu")
    assert getattr(model, "moecache", None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_host_check():
    with pytest.raises(ConfigError, match=r"needs 3\.00 GiB of host memory .* host_memory is 2\.00 GiB: raise host_memory to at least 3\.00 GiB"):
        check_host_memory(experts=2 * GiB, other=GiB, host_memory="2GiB")
    assert check_host_memory(experts=GiB, other=0, host_memory="auto", available=2 * GiB) == 2 * GiB
    with pytest.raises(ConfigError, match=r"available host memory is 1\.00 GiB: free 1\.00 GiB or use a machine"):
        check_host_memory(experts=2 * GiB, other=0, host_memory=None, available=GiB)
    model = small_default_model()
    with pytest.raises(ConfigError, match="host memory"):
        moecache.offload(model, cache_slots=4, device="cpu", host_memory="100KiB")
    assert getattr(model, "moecache", None) is None
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"


def test_from_pretrained_refuses_before_reading(tiny_model_dir, monkeypatch):
    from moecache import tensorfile

    def no_reading(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(tensorfile.TensorFile, "get_tensor", no_reading)
    monkeypatch.setattr(tensorfile.TensorFile, "get_row", no_reading)
    with pytest.raises(ConfigError, match=r"host memory .* but the host_memory is 1\.0 MiB"):
        moecache.from_pretrained(tiny_model_dir, cache_slots=8, device="cpu", host_memory="1MiB")
    monkeypatch.setattr(memplan, "host_available_bytes", lambda: 2 * MiB)
    with pytest.raises(ConfigError, match="available host memory is 2.0 MiB"):
        moecache.from_pretrained(tiny_model_dir, cache_slots=8, device="cpu")


def test_cli_size_options_are_checked_up_front(capsys):
    from moecache.cli import main

    assert main(["generate", "--gpu-memory", "lots"]) == 2
    assert capsys.readouterr().err == ("moecache generate: error: --gpu-memory 'lots': write e.g. 8GiB, 512MiB, 16GB "
                                       "or auto\n")
    assert main(["serve", "--host-memory", "x"]) == 2
    assert "--host-memory 'x'" in capsys.readouterr().err


def test_record_batch_and_context_reach_the_plan():
    from moecache.cli import build_parser
    from moecache.cli.model_options import offload_options

    args = build_parser().parse_args(["record", "--prompts", "p.txt", "-o", "o", "--offload", "--gpu-memory", "auto",
                                      "--batch", "4", "--max-context", "512", "--host-memory", "8GiB"])
    opts = offload_options(args, "cpu")
    assert (opts["batch"], opts["max_context"], opts["host_memory"]) == (4, 512, "8GiB")
    args = build_parser().parse_args(["serve", "--cache-slots", "8"])
    assert "batch" not in offload_options(args, "cpu") and "max_context" not in offload_options(args, "cpu")
