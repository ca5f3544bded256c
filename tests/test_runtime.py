"""The offloading runtime on the CPU: exactness per family and budget, accounting, remove(), budgets."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from moecache.errors import ConfigError, UnsupportedModelError
from moecache.runtime import offload, parse_bytes
from moecache.runtime.offload import WORKSPACE_BYTES

from .tiny_models import FAMILIES, tiny_model

#: Every family the recorder knows runs under the runtime (Switch through its seq2seq generate).
RUNTIME_FAMILIES = FAMILIES
#: Families whose experts run through a family kernel of their own (moecache.runtime.experts).
KERNEL_FAMILIES = ["llama4", "dbrx", "switch_transformers"]
PROMPT = [[5, 6, 7, 8, 9, 10, 11]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(m: torch.nn.Module, n: int = 8, prompt=PROMPT, logits: bool = False):
    x = torch.tensor(prompt)
    out = m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                     output_logits=logits)
    return out


def _moe_shape(m: torch.nn.Module) -> tuple[int, int, int]:
    from moecache.families import detect_family, find_moe_blocks

    a = detect_family(m)
    return len(find_moe_blocks(m, a)), a.num_experts(m.config), a.top_k(m.config)


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_same_tokens_fp32_at_every_budget(family):
    ref = _gen(tiny_model(family)).sequences
    L, E, k = _moe_shape(tiny_model(family))
    for slots in (k, (L * E) // 2, L * E):  # one layer's top-k only, half, all
        m = tiny_model(family)
        experts_params = [weakref.ref(p) for name, p in m.named_parameters() if ".experts." in name]
        h = offload(m, cache_slots=slots, device="cpu")
        gc.collect()
        assert all(r() is None for r in experts_params), "original expert parameters were not released"
        assert h.runtime.pool.data.shape[0] == slots and h.runtime.policy.capacity == slots
        out = _gen(m).sequences
        s = h.stats()
        h.remove()
        assert torch.equal(out, ref), (family, slots)
        assert s["accesses"] == s["hits"] + s["misses"] > 0
        if slots == k:
            assert s["misses"] > 0 and s["evictions"] > 0
        if slots == L * E:
            assert s["evictions"] == 0


@pytest.mark.parametrize("family,impls", [("qwen3_moe", ("grouped_mm", "batched_mm", "eager")),
                                          ("gpt_oss", ("grouped_mm", "batched_mm", "eager")),
                                          ("deepseek_v3", ("grouped_mm", "batched_mm", "eager")),
                                          ("mixtral", ("grouped_mm",)), ("qwen2_moe", ("batched_mm",)),
                                          ("olmoe", ("eager",)), ("deepseek_v2", ("grouped_mm",)),
                                          ("phimoe", ("batched_mm",)), ("granitemoe", ("grouped_mm",)),
                                          ("llama4", ("eager",)), ("dbrx", ("eager",)),
                                          ("switch_transformers", ("eager",))])
def test_bf16_logits_bit_identical_when_experts_fit(family, impls):
    for impl in impls:
        # Each budget with a prompt whose every call fits in it: 1 token at top-k slots, 2 at 2*top-k.
        k = _moe_shape(tiny_model(family))[2]
        for slots, prompt in ((k, [[5]]), (2 * k, [[5, 6]]), (10**6, PROMPT)):
            ref_m = tiny_model(family).to(torch.bfloat16)
            ref_m.set_experts_implementation(impl)
            ref = _gen(ref_m, 6, prompt, logits=True)
            m = tiny_model(family).to(torch.bfloat16)
            m.set_experts_implementation(impl)
            h = offload(m, cache_slots=slots, device="cpu")
            out = _gen(m, 6, prompt, logits=True)
            rounds = h.stats()["round_calls"]
            h.remove()
            assert rounds == 0
            assert torch.equal(out.sequences, ref.sequences), (family, impl, slots)
            for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
                assert torch.equal(a, b), (family, impl, slots, step)


@pytest.mark.parametrize("engine", ["sync", "worker"])
def test_engines_and_rounds_exact(engine, monkeypatch):
    from moecache._ext import extension

    if engine == "worker" and extension() is None:
        pytest.skip("moecache._C not built")
    ref = _gen(tiny_model("qwen3_moe"), 10).sequences
    m = tiny_model("qwen3_moe")
    # 3 slots: the 7-token prefill needs up to 8 experts per layer, so it runs in rounds.
    h = offload(m, cache_slots=3, device="cpu", engine=engine, predictor="temporal", prefetch_depth=2,
                admission="none")  # every candidate: the mechanics (the default gate stops a predictor that cannot pay)
    out = _gen(m, 10).sequences
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    assert s["round_calls"] > 0 and s["config"]["engine"] == engine


def test_python_path_without_extension(no_ext):
    ref = _gen(tiny_model("mixtral")).sequences
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu")
    assert h.stats()["config"]["engine"] == "sync"
    assert torch.equal(_gen(m).sequences, ref)
    h.remove()


def test_stats_prefetch_and_request_boundaries():
    m = tiny_model("qwen3_moe", num_hidden_layers=4)
    h = offload(m, cache_slots=12, device="cpu", predictor="temporal", prefetch_depth=2, admission="none")
    _gen(m, 20)
    s = h.stats()
    for key in ("hits", "misses", "evictions", "ready_rate", "prefetch_precision", "bytes_copied", "stall_s",
                "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "host_ms_per_layer"):
        assert key in s
    assert s["prefetch_issued"] > 0 and 0 < s["prefetch_useful"] <= s["prefetch_issued"]
    assert s["bytes_copied"] == s["copies"] * s["config"]["slot_bytes"]
    assert s["decode_tokens"] == 19 and s["prefill_tokens"] == len(PROMPT[0])
    assert s["ttft_s"] > 0 and s["decode_tokens_per_s"] > 0
    assert s["config"]["policy"] == "lru" and s["config"]["predictor"] == "temporal"
    # A second request resets the per-request state, and counts add up.
    _gen(m, 5)
    assert h.stats()["prefill_tokens"] == 2 * len(PROMPT[0])
    h.remove()


def _hook_count(m: torch.nn.Module) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())


# One family per expert storage: stacked (transformers kernel), stacked (Llama 4 kernel, router hook),
# flat (DBRX), one module per expert (Switch).
@pytest.mark.parametrize("family,wrapper", [("deepseek_v3", "OffloadedExperts"), ("llama4", "OffloadedFamilyExperts"),
                                            ("dbrx", "OffloadedFamilyExperts"),
                                            ("switch_transformers", "OffloadedFamilyExperts")])
def test_remove_restores_modules_and_weights(family, wrapper):
    m = tiny_model(family)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    classes = {n: type(mod) for n, mod in m.named_modules()}
    hooks = _hook_count(m)
    ref = _gen(m).sequences
    h = offload(m, cache_slots=3, device="cpu")
    assert m.moecache is h
    assert any(type(mod).__name__ == wrapper for mod in m.modules())
    assert not any(".experts." in n for n, _ in m.named_parameters())
    h.remove()
    assert not hasattr(m, "moecache")
    assert _hook_count(m) == hooks  # the call hooks and any router hooks are gone
    assert {n: type(mod) for n, mod in m.named_modules()} == classes
    after = dict(m.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert torch.equal(_gen(m).sequences, ref)
    h2 = offload(m, cache_slots=3, device="cpu")  # offloading again after remove() works
    h2.remove()


def test_policies_from_the_registry_and_instances():
    from moecache.policies import new_policy

    ref = _gen(tiny_model("olmoe")).sequences
    for policy in ("lfu", "fifo"):
        m = tiny_model("olmoe")
        h = offload(m, cache_slots=5, device="cpu", policy=policy)
        assert torch.equal(_gen(m).sequences, ref)
        assert h.stats()["config"]["policy"].startswith(policy)
        h.remove()
    m = tiny_model("olmoe")
    with pytest.raises(ConfigError, match="simulator only"):
        offload(m, cache_slots=5, device="cpu", policy="belady")
    with pytest.raises(ConfigError, match="slots"):
        offload(m, cache_slots=5, device="cpu", policy=new_policy("lru", 4, 3, 8, top_k=2, scope="global"))
    h = offload(m, cache_slots=5, device="cpu", policy=new_policy("lru", 5, 3, 8, top_k=2, scope="global"))
    h.remove()


def test_gpu_memory_budget_sets_the_pool():
    m = tiny_model("qwen3_moe")
    non_expert = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if ".experts." not in n)
    non_expert += sum(b.numel() * b.element_size() for b in m.buffers())
    h = offload(m, gpu_memory=10**9, device="cpu")
    slot = h.stats()["config"]["slot_bytes"]
    total = h.stats()["config"]["total_experts"]
    assert h.stats()["config"]["gpu_nonexpert_bytes"] == non_expert
    assert h.runtime.pool.num_slots == total  # a generous budget holds every expert
    h.remove()
    budget = non_expert + WORKSPACE_BYTES + 5 * slot + slot // 2
    h = offload(m, gpu_memory=budget, device="cpu")
    assert h.runtime.pool.num_slots == 5
    h.remove()
    with pytest.raises(ConfigError, match=r"cannot hold the non-expert weights .* top-2 experts"):
        offload(m, gpu_memory=non_expert + slot, device="cpu")
    with pytest.raises(ConfigError, match="exactly one"):
        offload(m, device="cpu")
    with pytest.raises(ConfigError, match="cache_slots=1"):
        offload(m, cache_slots=1, device="cpu")


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(1234) == 1234
    with pytest.raises(ConfigError, match="cannot read memory size"):
        parse_bytes("six gigs")


def test_experts_classes_no_kernel_runs_are_clear_errors():
    from moecache.families import detect_family, find_moe_blocks

    # A family kernel mirrors one transformers class: a (hub or custom) subclass is refused, not guessed at.
    m = tiny_model("llama4")
    for b in find_moe_blocks(m, detect_family(m)):
        b.experts.__class__ = type("HubLlama4Experts", (type(b.experts),), {})
    with pytest.raises(UnsupportedModelError, match=r"not supported by the offloading runtime.*Llama4TextExperts"):
        offload(m, cache_slots=4, device="cpu")

    # The transformers kernel needs a class built with use_experts_implementation.
    class PlainExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 64, 32))
            self.down_proj = torch.nn.Parameter(torch.zeros(8, 32, 32))

    m = tiny_model("mixtral")
    for layer in m.model.layers:
        layer.mlp.experts = PlainExperts()
    with pytest.raises(UnsupportedModelError, match="PlainExperts .* use_experts_implementation"):
        offload(m, cache_slots=4, device="cpu")


def test_model_without_moe_layers_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="not a MoE family"):
        offload(m, cache_slots=4, device="cpu")


def test_quantised_mxfp4_experts_are_a_clear_error():
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts

    m = tiny_model("gpt_oss")
    cfg = m.config
    for layer in m.model.layers:
        layer.mlp.experts = Mxfp4GptOssExperts(cfg)
    with pytest.raises(UnsupportedModelError, match="quantised"):
        offload(m, cache_slots=4, device="cpu")


def test_offloading_twice_is_an_error():
    m = tiny_model("mixtral")
    h = offload(m, cache_slots=4, device="cpu")
    with pytest.raises(ConfigError, match="offloaded already"):
        offload(m, cache_slots=4, device="cpu")
    h.remove()


# -- family kernels (Llama 4, DBRX, Switch) ------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", [("llama4", {}), ("dbrx", {}), ("switch_transformers", {}),
                                              # top-4, as the real DBRX: the order of its sums shows in bf16
                                              ("dbrx", {"ffn_config.moe_top_k": 4})])
def test_family_kernels_bit_identical_at_every_budget(family, overrides):
    # A family kernel adds expert by expert in the module's own order, also when the experts stream
    # through the pool in rounds: bf16 logits are bit-identical at every budget, not only where they fit.
    ref = _gen(tiny_model(family, **overrides).to(torch.bfloat16), 6, logits=True)
    L, E, k = _moe_shape(tiny_model(family, **overrides))
    for slots in (k, (L * E) // 2, L * E):
        m = tiny_model(family, **overrides).to(torch.bfloat16)
        h = offload(m, cache_slots=slots, device="cpu")
        out = _gen(m, 6, logits=True)
        s = h.stats()
        h.remove()
        assert torch.equal(out.sequences, ref.sequences), (family, slots)
        for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
            assert torch.equal(a, b), (family, slots, step)
        if slots == k:
            assert s["round_calls"] > 0  # the 7-token prompt needs more experts per layer than the pool


@pytest.mark.parametrize("engine", ["sync", "worker"])
@pytest.mark.parametrize("family", KERNEL_FAMILIES)
def test_family_kernels_with_prefetch_and_engines(family, engine):
    from moecache._ext import extension

    if engine == "worker" and extension() is None:
        pytest.skip("moecache._C not built")
    ref = _gen(tiny_model(family), 10).sequences
    m = tiny_model(family)
    h = offload(m, cache_slots=3, device="cpu", engine=engine, predictor="temporal", prefetch_depth=2,
                admission="none")  # every candidate: the mechanics (the default gate stops a predictor that cannot pay)
    out = _gen(m, 10).sequences
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    assert s["prefetch_issued"] > 0 and s["config"]["engine"] == engine


def test_switch_dropped_tokens_take_no_expert():
    from moecache.families import detect_family, find_moe_blocks

    ref_m, m = tiny_model("switch_transformers"), tiny_model("switch_transformers")
    adapter = detect_family(m)
    ref_experts = find_moe_blocks(ref_m, adapter)[0].experts
    h = offload(m, cache_slots=2, device="cpu")
    experts = find_moe_blocks(m, adapter)[0].experts
    # The experts' inputs as the sparse MLP passes them, with tokens 2, 5 and 7 dropped over capacity.
    gen = torch.Generator().manual_seed(0)
    T, E = 10, adapter.num_experts(m.config)
    hidden = torch.randn(T, m.config.d_model, generator=gen)
    ids = torch.randint(0, E, (T,), generator=gen)
    mask = torch.nn.functional.one_hot(ids, E).reshape(T, 1, E)
    mask[[2, 5, 7]] = 0
    weights = torch.rand(T, 1, generator=gen)
    with torch.no_grad():
        want = ref_experts(hidden, mask, weights)
        got = experts(hidden, mask, weights)
    s = h.stats()
    assert torch.equal(got, want)
    assert (got[[2, 5, 7]] == 0).all() and (got.abs().sum(1) > 0).sum() == T - 3
    kept = [i for i in range(T) if i not in (2, 5, 7)]
    assert s["accesses"] == len(set(ids[kept].tolist()))  # a dropped token needs no expert
    # Generate with padding, capacity counted per sequence: the same tokens as the unpatched model.
    x = torch.tensor([[0] * 6 + [11, 12, 13, 14], list(range(21, 31))])
    kw = dict(attention_mask=(x != 0).long(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(m.generate(x, **kw), ref_m.generate(x, **kw))
    h.remove()


def test_llama4_experts_without_their_router_are_a_clear_error():
    from moecache.families import detect_family, find_moe_blocks

    m = tiny_model("llama4")
    h = offload(m, cache_slots=4, device="cpu")
    experts = find_moe_blocks(m, detect_family(m))[0].experts
    with pytest.raises(RuntimeError, match="ran without its router"):
        experts(torch.zeros(8 * 3, 32))
    h.remove()


def test_hybrid_execution_with_a_family_kernel_is_a_clear_error():
    with pytest.raises(ConfigError, match="hybrid=False"):
        offload(tiny_model("dbrx"), cache_slots=4, device="cpu", hybrid=True)


@pytest.mark.parametrize("family,shard", [("llama4", "20KB"), ("dbrx", None)])
def test_from_pretrained_round_trip(tmp_path, family, shard):
    from transformers import AutoModelForCausalLM

    from moecache.loading import checkpoint_files, from_pretrained

    tiny_model(family).save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (len(checkpoint_files(str(tmp_path))) > 1) == (shard is not None)
    ref = _gen(AutoModelForCausalLM.from_pretrained(tmp_path).eval()).sequences
    if family == "dbrx":  # flat expert storage: transformers loads it, offload packs it layer by layer
        with pytest.warns(UserWarning, match="dbrx stores its experts 'flat'"):
            m = from_pretrained(tmp_path, cache_slots=4, device="cpu")
    else:  # stacked experts: read from the files one expert at a time into the host store
        m = from_pretrained(tmp_path, cache_slots=4, device="cpu")
    h = m.moecache
    assert h.runtime.pool.num_slots == 4
    assert not any(p.device.type == "meta" for p in m.parameters())
    out = _gen(m).sequences
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    assert s["misses"] > 0 and s["evictions"] > 0
    assert torch.equal(_gen(m).sequences, ref)


def test_from_pretrained_refuses_encoder_decoder_models_clearly(tmp_path):
    from moecache.loading import from_pretrained

    tiny_model("switch_transformers").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder .* moecache.offload"):
        from_pretrained(tmp_path, cache_slots=4, device="cpu")


@pytest.mark.parametrize("depth", [0, 1])
def test_predicted_policy_gets_scores_at_any_prefetch_depth(depth):
    """The ``predicted`` policy wants the predictor's probabilities at its own ``score_depth`` (L layers
    ahead: the same layer, next token) every layer, as the simulator feeds them, whatever the prefetch
    depth; the scores are the row mean of ``predict(layer, score_depth)``."""
    from moecache.policies import new_policy

    ref = _gen(tiny_model("qwen3_moe"), 8).sequences
    m = tiny_model("qwen3_moe")
    L, E, k = m.config.num_hidden_layers, m.config.num_experts, m.config.num_experts_per_tok
    pol = new_policy("predicted", 3 * L, L, E, top_k=k, scope="global")
    seen: list[tuple[int, np.ndarray]] = []
    feed = pol.on_scores

    def spy(layer: int, probs: np.ndarray) -> None:
        seen.append((layer, np.array(probs)))
        feed(layer, probs)

    pol.on_scores = spy  # type: ignore[method-assign]
    h = offload(m, cache_slots=3 * L, device="cpu", policy=pol, predictor="temporal", prefetch_depth=depth)
    out = _gen(m, 8).sequences
    calls = h.stats()["layer_calls"]
    h.remove()
    assert torch.equal(out, ref)
    assert len(seen) == calls > 0
    assert {layer for layer, _ in seen} == set(range(L))
    for _, p in seen:
        assert p.shape == (E,) and abs(p.sum() - k) < 1e-9


def test_preload_places_experts_before_the_run():
    """``handle.preload``: (layer, expert) pairs or the static policy's own placement, copied before the first
    call through the policy; tokens unchanged; bad pairs, an overfull pool and a removed handle are errors."""
    from moecache.policies import new_policy

    ref = _gen(tiny_model("olmoe")).sequences
    m = tiny_model("olmoe")
    L, E, k = _moe_shape(m)
    h = offload(m, cache_slots=5, device="cpu", policy="lru")
    rt = h.runtime
    assert h.preload([(0, 1), (1, 2), (0, 1)]) == 2
    assert rt.slot_of[1] >= 0 and rt.slot_of[E + 2] >= 0
    s = h.stats()
    assert s["resident"] == 2 and s["copies"] == 2
    assert h.preload([(0, 1)]) == 0  # already resident
    assert torch.equal(_gen(m).sequences, ref)
    for bad in ([(L, 0)], [(0, E)], [(-1, 0)]):
        with pytest.raises(ConfigError, match="cannot preload expert"):
            h.preload(bad)
    with pytest.raises(ConfigError, match="no placement of its own"):
        h.preload()
    h.remove()
    with pytest.raises(ConfigError, match="removed"):
        h.preload([(0, 0)])

    # A per-layer pool holds k experts: k + 1 of one layer cannot all be placed.
    m = tiny_model("olmoe")
    h = offload(m, cache_slots=k * L, device="cpu", policy=new_policy("lru", k, L, E, top_k=k, scope="layer"))
    with pytest.raises(ConfigError, match="into MoE layer 0's pool of 2 slots"):
        h.preload([(0, e) for e in range(k + 1)])
    assert h.stats()["resident"] == 0  # nothing placed by the refused call
    h.remove()

    # static: its fitted pinned experts (the most routed) by default.
    counts = np.zeros((L, E), np.int64)
    counts[:, 3], counts[:, 5] = 10, 5
    pol = new_policy("static", 5, L, E, top_k=k, scope="global", scratch=2).fit(counts)
    m = tiny_model("olmoe")
    h = offload(m, cache_slots=5, device="cpu", policy=pol)
    assert h.preload() == len(pol.pinned) == 3
    assert all(h.runtime.slot_of[key] >= 0 for key in pol.pinned)
    assert torch.equal(_gen(m).sequences, ref)
    h.remove()


def test_hidden_state_predictor_in_the_runtime(tmp_path):
    """Record with hidden states, fit ``hidden_state`` on them, and run it in the runtime: it is handed
    each MoE block's input (the predictor sees every layer's hidden state) and the tokens stay exact."""
    import moecache
    from moecache.predictors import PREDICTORS
    from moecache.trace import open_trace

    m = tiny_model("qwen3_moe", num_hidden_layers=3)
    ref = _gen(m, 8).sequences
    with moecache.record(m, tmp_path / "t", hidden_states=True):
        _gen(m, 8)
    trace = open_trace(tmp_path / "t")
    L, E, K = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    pred = PREDICTORS.get("hidden_state")(L, E, K, epochs=2, hidden_units=8).fit(trace)
    seen = []
    observe = pred._observe

    def spy(layer, experts, hidden):
        seen.append((layer, None if hidden is None else tuple(hidden.shape)))
        observe(layer, experts, hidden)
    pred._observe = spy
    h = offload(m, cache_slots=3, device="cpu", predictor=pred, prefetch_depth=2, admission="none")
    out = _gen(m, 8).sequences
    s = h.stats()
    h.remove()
    assert torch.equal(out, ref)
    assert seen and all(shape is not None and shape[-1] == trace.meta.hidden_size for _, shape in seen)
    assert {layer for layer, _ in seen} == set(range(L)) and s["prefetch_issued"] > 0


def test_learned_predictors_by_name_say_how_to_fit_them(tmp_path):
    """``offload(model, predictor="hidden_state")`` cannot build a fitted predictor from a name: a one-line
    error names what is needed (a trace with hidden states) before the model is touched; a predictor fitted
    on another model's hidden size is refused the same way."""
    from moecache.predictors import PREDICTORS
    from moecache.trace import RoutingBlock, Trace, TraceMeta

    m = tiny_model("qwen3_moe", num_hidden_layers=2)
    before = {n: type(mod) for n, mod in m.named_modules()}
    with pytest.raises(ConfigError, match=r"hidden_states=True.*pass that instance") as err:
        offload(m, cache_slots=3, device="cpu", predictor="hidden_state")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"must be fitted before offload: pass an instance after \.fit"):
        offload(m, cache_slots=3, device="cpu", predictor="learned")
    assert {n: type(mod) for n, mod in m.named_modules()} == before  # nothing patched
    cfg = m.config
    L, E, K = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(16)])
    trace = Trace(TraceMeta(num_experts=E, top_k=K, moe_layers=list(range(L)), model="x"),
                  RoutingBlock.build(ids, seq=0, pos=np.arange(16)))
    wrong = PREDICTORS.get("hidden_state")(L, E, K, epochs=1, hidden_units=4).fit(
        trace.with_hidden(rng.normal(size=(16, L, cfg.hidden_size + 1)).astype(np.float32)))
    with pytest.raises(ConfigError, match=f"hidden states of size {cfg.hidden_size + 1}"):
        offload(m, cache_slots=3, device="cpu", predictor=wrong)
    assert {n: type(mod) for n, mod in m.named_modules()} == before
