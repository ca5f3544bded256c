"""Validate before touching: a failing ``offload(...)`` leaves every parameter of the model bit-identical.

Two halves: bad arguments (property-based, plus a fixed table) must fail in the checks, before any
change; failures injected after the model was changed (pool, engine, kernels, device move, hybrid)
must be undone, the experts restored from the host store. Either way the model can be offloaded
again and generates the same tokens as before.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moecache
from moecache.errors import MoecacheError
from moecache.runtime import offload

from .tiny_models import tiny_model

offload_mod = importlib.import_module("moecache.runtime.offload")
PROMPT = torch.tensor([[5, 6, 7, 8, 9]])


def _snapshot(model: torch.nn.Module) -> dict[str, tuple]:
    """Every parameter and buffer: device, dtype, requires_grad and the bytes."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = (t.device, t.dtype, t.requires_grad, t.detach().cpu().clone())
    return out


def _assert_same(before: dict, model: torch.nn.Module) -> None:
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for name, (dev, dtype, grad, value) in before.items():
        dev2, dtype2, grad2, value2 = after[name]
        assert (dev, dtype, grad) == (dev2, dtype2, grad2), name
        assert value.shape == value2.shape and torch.equal(value.view(-1).view(torch.uint8) if value.numel() else value,
                                                           value2.view(-1).view(torch.uint8) if value2.numel()
                                                           else value2), name


def _tokens(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=4, min_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def reference(model):
    return _tokens(model)


# -- bad arguments: refused before anything changes -------------------------------------------------------

#: (keyword arguments, a word the one-line message must contain). Budget defaults to cache_slots=4.
BAD_OFFLOAD_ARGS = [
    ({"predictor": "nope"}, "nope"),
    ({"policy": "nope"}, "nope"),
    ({"policy": 3}, "policy"),
    ({"predictor": 3.5}, "predictor"),
    ({"cache_slots": 2.5}, "whole number"),
    ({"cache_slots": float("nan")}, "whole number"),
    ({"cache_slots": float("inf")}, "whole number"),
    ({"cache_slots": -1}, "cache_slots"),
    ({"cache_slots": 0}, "cache_slots"),
    ({"cache_slots": 1}, "top-2"),
    ({"cache_slots": True}, "whole number"),
    ({"cache_slots": "4"}, "whole number"),
    ({"cache_slots": None, "gpu_memory": "lots"}, "memory"),
    ({"cache_slots": None, "gpu_memory": float("nan")}, "memory"),
    ({"cache_slots": None, "gpu_memory": float("inf")}, "memory"),
    ({"cache_slots": None, "gpu_memory": -5}, "memory"),
    ({"cache_slots": None, "gpu_memory": "9e30GiB"}, "1 PiB"),
    ({"cache_slots": None, "gpu_memory": 10}, "gpu_memory"),
    ({"cache_slots": None, "gpu_memory": None}, "exactly one"),
    ({"gpu_memory": "1GiB"}, "exactly one"),
    ({"prefetch_depth": -1}, "prefetch_depth"),
    ({"prefetch_depth": 99, "predictor": "transition"}, "prefetch_depth"),
    ({"prefetch_depth": 1.5}, "whole number"),
    ({"prefetch_width": 0}, "prefetch_width"),
    ({"prefetch_width": 10_000}, "prefetch_width"),
    ({"min_prob": float("nan")}, "finite"),
    ({"min_prob": 2.0}, "min_prob"),
    ({"min_prob": "0.1"}, "number"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda"}, "CUDA"),
    ({"device": 7}, "device"),
    ({"engine": "warp"}, "engine"),
    ({"engine": None}, "engine"),
    ({"family": "nope"}, "nope"),
    ({"policy_params": {"nope": 1}}, "nope"),
    ({"policy_params": [1, 2]}, "policy_params"),
    ({"predictor": "transition", "predictor_params": {"nope": 1}}, "predictor"),
    ({"predictor": "transition"}, "fitted"),
    ({"pin": "yes"}, "pin"),
    ({"pin": True}, "CUDA"),
    ({"own_store": 0}, "own_store"),
    ({"host_store": "store"}, "host_store"),
    ({"hybrid": "sometimes"}, "sometimes"),
    ({"hybrid": 3}, "hybrid"),
    ({"policy": "belady"}, "simulator"),
    ({"policy": "static"}, "fitted"),
]


@pytest.mark.parametrize("kwargs,word", BAD_OFFLOAD_ARGS, ids=[str(i) for i in range(len(BAD_OFFLOAD_ARGS))])
def test_bad_offload_arguments_change_nothing(model, reference, kwargs, word):
    args = {"cache_slots": 4, "device": "cpu", **kwargs}
    before = _snapshot(model)
    experts_before = [type(b.mlp.experts) for b in model.model.layers]
    with pytest.raises(MoecacheError) as info:
        offload(model, **args)
    msg = str(info.value)
    assert "\n" not in msg and word.lower() in msg.lower()
    assert getattr(model, "moecache", None) is None
    assert [type(b.mlp.experts) for b in model.model.layers] == experts_before
    _assert_same(before, model)


def test_moecache_offload_with_unknown_predictor_keeps_the_model(reference):
    """The issue's example: the experts used to be on meta after this error."""
    m = tiny_model("qwen3_moe")
    before = _snapshot(m)
    with pytest.raises(MoecacheError, match="nope"):
        moecache.offload(m, cache_slots=4, predictor="nope")
    _assert_same(before, m)
    h = moecache.offload(m, cache_slots=4, device="cpu")
    assert torch.equal(_tokens(m), reference)
    h.remove()
    _assert_same(before, m)


_bad_value = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=1))
_names = st.sampled_from(["cache_slots", "gpu_memory", "policy", "predictor", "prefetch_depth", "device", "engine",
                          "family", "policy_params", "predictor_params", "prefetch_width", "min_prob", "pin",
                          "own_store", "hybrid", "host_store"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_names, value=_bad_value)
def test_any_failing_offload_leaves_every_parameter_bit_identical(model, name, value):
    """Property: whatever one argument is, offload either works (and remove() restores the model) or
    raises a one-line moecache error having changed nothing."""
    args = {"cache_slots": 4, "device": "cpu"}
    if name == "gpu_memory":
        args.pop("cache_slots")
    args[name] = value
    before = _snapshot(model)
    try:
        h = offload(model, **args)
    except MoecacheError as e:
        assert "\n" not in str(e)
        assert getattr(model, "moecache", None) is None
    else:
        h.remove()
    _assert_same(before, model)


# -- failures after the model was changed: undone from the host store --------------------------------------

class Boom(RuntimeError):
    pass


def _raise(*_a, **_k):
    raise Boom("injected")


STAGES = {
    "fill": lambda mp: mp.setattr(offload_mod.HostStore, "fill_layer",
                                  _fail_on_call(offload_mod.HostStore.fill_layer, 2)),
    "pool": lambda mp: mp.setattr(offload_mod, "SlotPool", _raise),
    "engine": lambda mp: mp.setattr(offload_mod, "make_engine", _raise),
    "attach": lambda mp: mp.setattr(offload_mod.EXPERT_KERNELS.get("transformers"), "attach",
                                    classmethod(_fail_on_call(offload_mod.EXPERT_KERNELS.get("transformers").attach.__func__,
                                                              2))),
    "to": lambda mp: mp.setattr(torch.nn.Module, "to", _raise),
    "hybrid": lambda mp: mp.setattr(offload_mod, "make_hybrid", _raise),
    "hooks": lambda mp: mp.setattr(torch.nn.Module, "register_forward_hook", _raise),
}


def _fail_on_call(fn, n):
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] >= n:
            raise Boom("injected")
        return fn(*a, **k)

    return wrapped


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failure_after_changes_is_undone(stage, reference, monkeypatch):
    m = tiny_model("qwen3_moe")
    before = _snapshot(m)
    with monkeypatch.context() as mp:
        STAGES[stage](mp)
        with pytest.raises(Boom):
            offload(m, cache_slots=4, device="cpu", predictor=None)
    _assert_same(before, m)
    assert getattr(m, "moecache", None) is None
    assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(type(layer.mlp.experts).__name__ != "OffloadedExperts" for layer in m.model.layers)
    assert torch.equal(_tokens(m), reference)
    h = offload(m, cache_slots=4, device="cpu")  # offloadable again
    assert torch.equal(_tokens(m), reference)
    h.remove()
    _assert_same(before, m)


def test_memory_sizes_refuse_nan_inf_and_absurd_values():
    from moecache.runtime import parse_bytes

    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes(1e9) == 10**9 and parse_bytes("1.5e3") == 1500
    for bad in (float("nan"), math.inf, -1, "2 parsecs", "1e30", True, None):
        with pytest.raises(MoecacheError):
            parse_bytes(bad)
