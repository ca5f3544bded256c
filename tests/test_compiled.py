"""``offload(..., compile=True)`` on the CPU: the compiled path without CUDA graphs (moecache.runtime.compiled).

Pieces are compiled with ``aot_eager`` or ``eager`` here: dynamo's trace, the split at every experts op,
the static KV cache and the guards that decide recompiles are the same as with inductor, whose CPU code
generation would take minutes of CI. ``test_compiled_gpu.py`` runs inductor and CUDA graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import moecache
from moecache.errors import ConfigError
from moecache.runtime import offload
from moecache.runtime.compiled import EXPERTS_OP, _EXPERTS, allocated_kv_bytes, kv_cache_bytes
from moecache.runtime.experts import OffloadedExperts

from .tiny_models import tiny_model

PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(m: torch.nn.Module, n: int, prompt=PROMPT, logits: bool = False):
    x = torch.tensor(prompt)
    with torch.no_grad():
        return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x),
                          return_dict_in_generate=True, output_logits=logits, pad_token_id=0)


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_no_recompile_over_512_decode_steps_and_same_tokens():
    """512 decode steps: one dynamo graph, split into one piece per segment between MoE layers, no recompile
    after the first compiled step; fp32 tokens equal the eager offloaded model's."""
    m = tiny_model("qwen3_moe", num_hidden_layers=2, max_position_embeddings=1024)
    h = offload(m, cache_slots=5, device="cpu")
    ref = _gen(m, 512).sequences
    h.remove()
    h = offload(m, cache_slots=5, device="cpu", compile="eager", max_cache_len=600)
    _gen(m, 2)  # first request: compiles the decode graph
    before = _unique_graphs()
    out = _gen(m, 512).sequences
    s = h.stats()["compile"]
    h.remove()
    assert torch.equal(out, ref)
    assert _unique_graphs() == before  # no recompilation in 511 more decode steps (and a new request)
    h = offload(m, cache_slots=5, device="cpu", compile="eager", max_cache_len=600)
    again = _gen(m, 4).sequences
    h.remove()
    assert torch.equal(again, ref[:, :again.shape[1]])
    assert _unique_graphs() == before  # offloading the same model again reuses the compiled graph
    assert s["graphs"] == 1 and s["experts_ops"] == 2 and s["pieces"] == 3  # L MoE layers -> L + 1 pieces
    assert s["compiled_calls"] == 1 + 511 and s["eager_calls"] == 2  # the prefills run eagerly
    assert s["captures"] == 0 and s["replays"] == 0  # no CUDA graphs on the CPU


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_tokens_equal_and_kv_estimate_exact(family):
    """aot_eager pieces (functionalised, like inductor's input): same fp32 tokens; the static KV cache the
    budget reserved is exactly what transformers allocated."""
    m = tiny_model(family)
    h = offload(m, cache_slots=4, device="cpu")
    ref = _gen(m, 10).sequences
    h.remove()
    h = offload(m, cache_slots=4, device="cpu", compile="aot_eager", max_cache_len=48)
    out = _gen(m, 10).sequences
    s = h.stats()
    pieces = h.compiled.backend.pieces
    h.remove()
    assert torch.equal(out, ref)
    assert s["kv_cache_allocated_bytes"] == h.config["kv_cache_bytes"] > 0
    moe_layers = h.config["moe_layers"]
    assert s["compile"]["experts_ops"] == moe_layers and s["compile"]["pieces"] == moe_layers + 1
    # Every piece but the last updates the KV cache in place: those inputs keep their address under a graph.
    mutated = [len(p.mutated) for p in pieces]
    assert len(mutated) == moe_layers + 1 and all(n >= 2 for n in mutated[:-1]) and mutated[-1] == 0


def test_prefetch_and_hybrid_work_under_compile():
    """A predictor's prefetches and hybrid CPU experts run inside the experts op: same tokens and counts as
    the eager offloaded model with the same configuration (the sync copy engine: with the worker thread,
    whether a prefetch can still be cancelled depends on timing)."""
    m = tiny_model("qwen3_moe")
    results = []
    for compile_ in (False, "aot_eager"):
        kw = dict(max_cache_len=40) if compile_ else {}
        # admission "none": every candidate issued (the default gate would rightly stop asking a predictor that
        # cannot pay on random routing, and this test is about the prefetch mechanics under compile)
        h = offload(m, cache_slots=5, device="cpu", predictor="temporal", prefetch_depth=2, hybrid="cpu", engine="sync",
                    compile=compile_, admission="none", **kw)
        out = _gen(m, 8).sequences
        s = h.stats()
        results.append((out, s))
        h.remove()
    (ref, a), (out, b) = results
    assert torch.equal(out, ref)
    assert b["cpu_experts"] == a["cpu_experts"] > 0
    for key in ("hits", "misses", "prefetch_issued", "prefetch_useful"):
        assert b[key] == a[key], key
    assert a["prefetch_issued"] > 0


def test_record_under_compile_writes_the_same_trace(tmp_path):
    m = tiny_model("qwen3_moe")
    traces = []
    for i, compile_ in enumerate((False, "aot_eager")):
        kw = dict(max_cache_len=40) if compile_ else {}
        h = offload(m, cache_slots=5, device="cpu", compile=compile_, **kw)
        with moecache.record(m, tmp_path / f"t{i}") as rec:
            out = _gen(m, 6).sequences
        traces.append((out, rec.trace()))
        h.remove()
    (o1, t1), (o2, t2) = traces
    assert torch.equal(o1, o2)
    assert len(t2) == len(t1) == len(PROMPT[0]) + 5
    np.testing.assert_array_equal(t2.ids, t1.ids)
    np.testing.assert_array_equal(t2.phase, t1.phase)
    np.testing.assert_array_equal(t2.token, t1.token)


def test_bf16_logits_close_to_eager():
    """bf16: the compiled pieces may fuse differently; logits stay within 2e-2 of the eager offloaded model's
    (max abs difference over every step; aot_eager on the CPU keeps the eager kernels)."""
    m = tiny_model("qwen3_moe").to(torch.bfloat16)
    h = offload(m, cache_slots=4, device="cpu")
    ref = _gen(m, 6, logits=True)
    h.remove()
    h = offload(m, cache_slots=4, device="cpu", compile="aot_eager", max_cache_len=32)
    out = _gen(m, 6, logits=True)
    h.remove()
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out.logits, ref.logits))
    assert diff <= 2e-2
    assert torch.equal(out.sequences, ref.sequences)


def test_static_kv_cache_counts_against_gpu_memory():
    m = tiny_model("qwen3_moe")
    h = offload(m, gpu_memory=10**9, device="cpu")
    nonexp, slot, total = h.config["gpu_nonexpert_bytes"], h.config["slot_bytes"], h.config["total_experts"]
    h.remove()
    kv = kv_cache_bytes(m.config, 2, 64, torch.float32)
    budget = nonexp + kv + 7 * slot + slot // 2
    h = offload(m, gpu_memory=budget, device="cpu", compile="eager", max_cache_len=64, max_batch_size=2)
    assert h.config["slots"] == 7 < total and h.config["kv_cache_bytes"] == kv
    h.remove()
    h = offload(m, gpu_memory=budget, device="cpu")
    assert h.config["slots"] > 7  # without the cache the same budget holds more experts
    h.remove()
    with pytest.raises(ConfigError, match="static KV cache"):
        offload(m, gpu_memory=nonexp + 3 * slot, device="cpu", compile="eager", max_cache_len=64)
    assert not hasattr(m, "moecache")


def test_bad_arguments_fail_before_the_model_changes():
    m = tiny_model("qwen3_moe")
    experts = m.model.layers[0].mlp.experts
    cases = [(dict(compile="fast"), "compile='fast'"), (dict(max_cache_len=64), "compile=True"),
             (dict(compile=True, max_cache_len=0), "max_cache_len"),
             (dict(compile=True, max_batch_size=1.5), "max_batch_size")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            offload(m, cache_slots=4, device="cpu", **kw)
        assert not hasattr(m, "moecache") and m.model.layers[0].mlp.experts is experts
    with pytest.raises(ConfigError, match="compile=False"):
        offload(tiny_model("dbrx"), cache_slots=4, device="cpu", compile=True)


def test_cache_limits_are_clear_errors_and_remove_restores():
    m = tiny_model("qwen3_moe")
    flag = m.generation_config.disable_compile
    h = offload(m, cache_slots=4, device="cpu", compile="eager", max_cache_len=9, max_batch_size=1)
    assert m.generation_config.disable_compile is True  # transformers' own compile would wrap ours
    stack = m.model
    assert "forward" in stack.__dict__
    with pytest.raises(ConfigError, match="max_cache_len>=12"):
        _gen(m, 2, prompt=[list(range(3, 15))])
    with pytest.raises(ConfigError, match="max_batch_size>=2"):
        _gen(m, 2, prompt=[PROMPT[0], PROMPT[0]])
    with pytest.raises(ConfigError, match="outgrew"):
        _gen(m, 4)  # 7 + 3 positions > 9
    experts = [mod for mod in m.modules() if isinstance(mod, OffloadedExperts)]
    key = h._compiled_key
    h.remove()
    assert "forward" not in stack.__dict__ and not any(k[0] == key for k in _EXPERTS)
    assert all(e.compiled_key is None for e in experts)
    assert m.generation_config.disable_compile is flag
    assert EXPERTS_OP == "moecache::offloaded_experts"
    assert allocated_kv_bytes(object()) == 0


def test_a_caller_passing_its_own_cache_every_step_continues_the_static_one():
    """A replay loop passes its own (empty) cache on every call: the static cache that stood in for it on the
    first call continues, the request is not restarted, and the logits equal the eager offloaded model's."""
    from moecache.forced_routing import _cache_argument, _new_cache

    m = tiny_model("qwen3_moe")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    arg = _cache_argument(m)
    outs = []
    for compile_ in (False, "eager"):
        kw = dict(max_cache_len=16) if compile_ else {}
        h = offload(m, cache_slots=5, device="cpu", engine="sync", predictor="temporal", compile=compile_, **kw)
        # prefetch choices depend on which copies are still pending (an async engine's timing) and, under the
        # cost admission rule, on measured layer times: a sync engine and no admission make the runs comparable
        h.runtime.admission = "none"
        calls = []
        begin = h.runtime.policy.begin_request
        h.runtime.policy.begin_request = lambda: (calls.append(1), begin())[1]
        cache = _new_cache(m)
        with torch.no_grad():
            logits = [m(input_ids=ids[:, t:t + 1], use_cache=True, **{arg: cache}).logits for t in range(ids.shape[1])]
        outs.append((torch.cat(logits, 1), len(calls), h.stats()))
        h.remove()
    (ref, n_ref, a), (out, n, b) = outs
    # The static cache attends over its padded length (masked): equal up to rounding, same choices.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert n == n_ref == 1  # one request
    assert b["compile"]["compiled_calls"] == ids.shape[1] - 1 and b["compile"]["eager_calls"] == 1
    assert b["prefetch_issued"] == a["prefetch_issued"] > 0


def test_self_fitting_budget_reserves_the_static_cache():
    """gpu_memory="auto" plans for the static cache's size (max_cache_len x max_batch_size); only what the
    plan's estimate left out is taken from the pool as well."""
    m = tiny_model("qwen3_moe")
    h = offload(m, gpu_memory="auto", device="cpu", compile="eager", max_cache_len=64, max_batch_size=2)
    plan, cfg = h.memory_plan, h.config
    h.remove()
    assert (plan.max_context, plan.batch) == (64, 2)
    assert cfg["kv_cache_bytes"] == max(0, kv_cache_bytes(m.config, 2, 64, torch.float32) - plan.kv_cache)
