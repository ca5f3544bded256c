"""Streaming prefill (``offload(..., stream_prefill=...)``): the order of its copies, and no change in the output."""

from __future__ import annotations

import pytest
import torch

from moecache.errors import ConfigError
from moecache.runtime import offload

from .tiny_models import tiny_model

L, E = 3, 8
PROMPT = [list(range(3, 35))]  # 32 tokens: nearly every expert of every layer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spy(h) -> list[tuple]:
    """Log the engine's copies and the runtime's layer calls, in order."""
    rt, eng = h.runtime, h.runtime.engine
    log: list[tuple] = []
    submit_many, demand, run_layer = eng.submit_many, eng.demand, rt.run_layer

    def spy_submit(slots, keys, prios):
        log.append(("submit", list(keys), list(prios)))
        return submit_many(slots, keys, prios)

    def spy_demand(copy_slots, copy_keys, wait_slots):
        log.append(("demand", list(copy_keys)))
        return demand(copy_slots, copy_keys, wait_slots)

    def spy_layer(li, *args, **kwargs):
        log.append(("layer", li))
        return run_layer(li, *args, **kwargs)

    eng.submit_many, eng.demand = spy_submit, spy_demand
    for layer in rt.layers:  # the experts modules call the runtime through the bound method they hold
        mod = getattr(layer.block, h.adapter.experts_attr)
        object.__setattr__(mod, "_run", spy_layer)
    return log


def _forward(m, prompt=PROMPT):
    with torch.no_grad():
        return m(torch.tensor(prompt)).logits


def test_each_next_layer_is_queued_before_the_current_kernel():
    m = tiny_model("qwen3_moe")
    ref = _forward(m)
    h = offload(m, cache_slots=L * E, device="cpu", engine="sync", stream_prefill=16)
    log = _spy(h)
    out = _forward(m)
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    layers = [i for i, ev in enumerate(log) if ev[0] == "layer"]
    assert [log[i][1] for i in layers] == [0, 1, 2]
    # Layer 0's experts go at the call's start, before any layer runs.
    first = log[0]
    assert first[0] == "submit" and first[1] == list(range(E)) and 0 == log.index(first) < layers[0]
    for li in range(L - 1):
        between = log[layers[li] + 1:layers[li + 1]]
        subs = [ev for ev in between if ev[0] == "submit"]
        assert subs, f"layer {li + 1}'s experts were not queued during layer {li}"
        keys, prios = subs[0][1], subs[0][2]
        assert all(k // E == li + 1 for k in keys) and prios == sorted(prios) and all(p >= 1 for p in prios)
    assert not any(ev for ev in log[layers[-1]:] if ev[0] == "submit")  # nothing past the last layer
    # Everything arrived ahead: no demand copy, every access a hit.
    assert not any(ev[1] for ev in log if ev[0] == "demand")
    assert s["misses"] == 0 and s["prefill_streamed"] == L * E
    assert s["prefill_stream_useful"] == s["accesses"] > 0


def test_small_pool_streams_what_fits_and_output_is_unchanged():
    m = tiny_model("qwen3_moe")
    ref = _forward(m)
    h = offload(m, cache_slots=E + 3, device="cpu", engine="sync", stream_prefill=16)
    out = _forward(m)
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    assert 0 < s["prefill_streamed"] < L * E  # stopped where the policy had no room
    assert s["evictions"] > 0


def test_short_prompts_and_decode_do_not_stream():
    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=L * E, device="cpu", stream_prefill=16)
    x = torch.tensor([list(range(3, 10))])  # 7 tokens: under the threshold
    with torch.no_grad():
        m.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(x),
                   pad_token_id=0)
    assert h.stats()["prefill_streamed"] == 0
    h.remove()
    h = offload(m, cache_slots=L * E, device="cpu")  # off by default
    _forward(m)
    assert h.stats()["prefill_streamed"] == 0
    h.remove()


@pytest.mark.parametrize("bad", [1, "yes", 2.5])
def test_bad_stream_prefill_is_a_clear_error(bad):
    m = tiny_model("qwen3_moe")
    with pytest.raises(ConfigError, match="stream_prefill"):
        offload(m, cache_slots=4, device="cpu", stream_prefill=bad)
    assert not hasattr(m, "moecache")
