"""The router-hook recorder on tiny random models of every family, and on the trained tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moecache
from moecache import ConfigError, UnsupportedModelError
from moecache.families import find_moe_blocks, get_family
from moecache.trace import ID_DROPPED, PHASE_DECODE, PHASE_PREFILL, WEIGHT_KINDS, open_trace

from .tiny_models import CAUSAL_FAMILIES, EXPERTS, FAMILIES, tiny_model

#: MoE layers of each tiny model (tiny_models.py): dense layers left out, Switch's decoder after its encoder.
MOE_LAYERS = {"qwen2_moe": [0, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "llama4": [1, 3], "dbrx": [0, 1],
              "switch_transformers": [1, 3, 5, 7]}
WEIGHTS = {"mixtral": "renormalized", "qwen2_moe": "softmax", "qwen3_moe": "renormalized", "olmoe": "softmax",
           "deepseek_v2": "scaled", "deepseek_v3": "scaled", "gpt_oss": "renormalized", "phimoe": "scaled",
           "granitemoe": "renormalized", "llama4": "sigmoid", "dbrx": "renormalized",
           "switch_transformers": "softmax"}


def model_for(family: str) -> torch.nn.Module:
    model = tiny_model(family)
    if family == "deepseek_v3":  # the correction bias only changes the choice when it is not zero
        gen = torch.Generator().manual_seed(7)
        for b in find_moe_blocks(model, get_family(family)):
            b.router.e_score_correction_bias.copy_(torch.randn(EXPERTS, generator=gen) * 0.3)
    return model


# -- the reference: call each block's router directly -------------------------------------------------

def _by_kind(outputs, n: int, k: int):
    """(ids, weights) among a router's outputs, found by dtype and shape (never by position)."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    ids = [o for o in outs if torch.is_tensor(o) and not o.is_floating_point() and tuple(o.shape) == (n, k)]
    w = [o for o in outs if torch.is_tensor(o) and o.is_floating_point() and tuple(o.shape) == (n, k)]
    assert len(ids) == 1 and len(w) == 1, [tuple(o.shape) for o in outs]
    return ids[0], w[0]


def reference_routing(family: str, block, hidden: torch.Tensor, k: int):
    """What the block's router returns for ``hidden`` (batch, length, hidden): ids and weights (tokens, k)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    n = flat.shape[0]
    if family in ("gpt_oss", "phimoe", "granitemoe"):
        return _by_kind(block.router(flat), n, k)
    if family == "dbrx":
        return _by_kind(block.route_tokens_to_experts(block.router(flat)), n, k)
    if family == "llama4":
        # (scores, logits), both (tokens, experts): the scores are sigmoid(top-k logits), 0 elsewhere.
        outs = block.router(flat)
        scores = [o for o in outs if torch.is_tensor(o) and (o >= 0).all() and ((o > 0).sum(1) == k).all()]
        assert len(scores) == 1
        ids = torch.topk(scores[0], k, dim=1).indices
        return ids, scores[0].gather(1, ids)
    if family == "switch_transformers":
        outs = block.router(hidden)  # capacity is counted per sequence: route the unflattened batch
        onehot = [o for o in outs if torch.is_tensor(o) and not o.is_floating_point()][0].reshape(n, -1)
        probs = [o for o in outs if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == 1][0]
        ids = torch.where(onehot.sum(1) > 0, onehot.argmax(1), torch.full((n,), ID_DROPPED))
        return ids[:, None], probs.reshape(n, 1)
    return _by_kind(block.gate(flat), n, k)


def capture_block_inputs(model, family):
    blocks = find_moe_blocks(model, get_family(family))
    seen: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    handles = [b.block.register_forward_pre_hook(lambda m, a, _l=b.layer: seen[_l].append(a[0].detach().clone()))
               for b in blocks]
    return blocks, seen, handles


def cache_kwarg(model) -> str:
    """The KV cache's keyword in this transformers version (5.24: cache, 5.17: past_key_values)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded(batch_rows: list[list[int]]):
    width = max(map(len, batch_rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in batch_rows])
    return ids, (ids != 0).long()


# -- routing equals the router's own answer ----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_equals_router(tmp_path, family):
    model = model_for(family)
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 90, 7).tolist(), rng.integers(3, 90, 12).tolist()]
    ids, mask = left_padded(rows)
    blocks, seen, handles = capture_block_inputs(model, family)
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        if family == "switch_transformers":
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]))
        else:
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    t = rec.trace()
    meta = t.meta
    assert meta.family == family and meta.source == "moecache.record" and meta.id_order == "router"
    assert meta.moe_layers == MOE_LAYERS.get(family, [0, 1, 2])
    assert meta.weights == WEIGHTS[family] and meta.weights in WEIGHT_KINDS
    assert meta.num_experts == EXPERTS and meta.top_k == (1 if family == "switch_transformers" else 2)

    real = mask.bool().ravel().numpy()
    checked_tokens = dropped = 0
    for li, b in enumerate(blocks):
        (hidden,) = seen[b.layer]
        with torch.no_grad():
            want_ids, want_w = reference_routing(family, b.block, hidden, meta.top_k)
        want_ids, want_w = want_ids.numpy(), want_w.float().numpy()
        assert len(np.unique(want_ids[want_ids >= 0])) > 2, "degenerate routing would make this test vacuous"
        # The rows of the call that went through this layer, in (batch row, position) order.
        step_rows = t.step == (1 if (family == "switch_transformers" and b.stack == "decoder") else 0)
        got_ids, got_w = t.ids[step_rows, li], t.weights[step_rows, li]
        if hidden.shape[:2] == ids.shape:  # the encoder / decoder-only call: padding removed
            want_ids, want_w = want_ids[real], want_w[real]
        if family == "llama4":  # the reference reads the dense scores, so compare id-sorted
            order_got, order_want = np.argsort(got_ids, 1), np.argsort(want_ids, 1)
            got_ids, got_w = np.take_along_axis(got_ids, order_got, 1), np.take_along_axis(got_w, order_got, 1)
            want_ids, want_w = np.take_along_axis(want_ids, order_want, 1), np.take_along_axis(want_w, order_want, 1)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=1e-7)
        checked_tokens += len(got_ids)
        dropped += int((want_ids == ID_DROPPED).sum())
    assert checked_tokens > 0
    assert int((t.ids == ID_DROPPED).sum()) == dropped
    if family == "switch_transformers":
        # (transformers 5.24 drops over capacity here; 5.17's router never drops: its capacity cumsum
        # runs over a singleton dimension. The recorder shows whichever happened.)
        enc = t.step == 0
        assert (t.ids[enc][:, 2:] == -1).all() and (t.ids[~enc][:, :2] == -1).all()


def test_onehot_dispatch_capture_marks_dropped_tokens():
    from moecache.families import CAPTURES

    mask = torch.zeros(4, 1, 5, dtype=torch.long)
    mask[0, 0, 3] = mask[2, 0, 0] = mask[3, 0, 4] = 1  # token 1 went over capacity: an all-zero row
    probs = torch.tensor([[0.5], [0.9], [0.4], [0.7]])
    ids, w = CAPTURES.get("onehot_dispatch").fn(None, (torch.zeros(4, 8), mask, probs), {}, None)
    assert ids.tolist() == [[3], [ID_DROPPED], [0], [4]]
    assert w.tolist() == probs.tolist()


def test_deepseek_v3_bias_and_group_limit_are_what_the_trace_shows(tmp_path):
    """The correction bias changes the choice, and every choice stays within topk_group groups."""
    model = model_for("deepseek_v3")
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        model(input_ids=ids)
    t = rec.trace()
    cfg = model.config
    groups = t.ids // (EXPERTS // cfg.n_group)
    assert max(len(set(row)) for row in groups.reshape(-1, cfg.num_experts_per_tok).tolist()) <= cfg.topk_group
    blocks = find_moe_blocks(model, get_family("deepseek_v3"))
    for b in blocks:
        b.router.e_score_correction_bias.zero_()
    with torch.no_grad(), moecache.record(model, tmp_path / "u") as rec0:
        model(input_ids=ids)
    assert (np.sort(rec0.trace().ids, 2) != np.sort(t.ids, 2)).any()


# -- generate: row counts, tokens, phases, and no change to the output ---------------------------------

@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_generate_rows_tokens_and_identical_output(tmp_path, family):
    model = model_for(family)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28]]
    ids, mask = left_padded(prompts)
    new = 5
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kw)
    with moecache.record(model, tmp_path / "t") as rec:
        recorded = model.generate(ids, **kw)
    assert torch.equal(plain, recorded)
    t = rec.trace()
    assert list(t.sequences()) == [0, 1]
    for s, prompt in enumerate(prompts):
        sub = t.select(t.seq == s)
        generated = recorded[s, ids.shape[1]:].tolist()
        assert len(sub) == len(prompt) + new - 1
        np.testing.assert_array_equal(sub.pos, np.arange(len(sub)))
        np.testing.assert_array_equal(sub.token, prompt + generated[:-1])
        np.testing.assert_array_equal(sub.phase, [PHASE_PREFILL] * len(prompt) + [PHASE_DECODE] * (new - 1))
        np.testing.assert_array_equal(sub.step, [0] * len(prompt) + list(range(1, new)))
    assert (t.ids >= 0).all() and np.isfinite(t.weights).all()
    if t.meta.weights == "renormalized":
        np.testing.assert_allclose(t.weights.sum(2), 1.0, rtol=1e-5)
    assert t.drops == {}
    assert rec.rows == len(t) == sum(map(len, prompts)) + 2 * (new - 1)


def test_batching_does_not_change_the_trace(tmp_path):
    """40 decode steps packed 32 at a time equal the same steps packed one by one."""
    model = model_for("qwen3_moe")
    ids, mask = left_padded([[11, 12, 13], [21, 22, 23, 24, 25]])
    kw = dict(attention_mask=mask, max_new_tokens=41, min_new_tokens=41, do_sample=False, pad_token_id=0)
    traces = []
    for name, flush_rows in (("batched", 16384), ("single", 1)):
        with moecache.record(model, tmp_path / name, flush_rows=flush_rows) as rec:
            model.generate(ids, **kw)
        traces.append(rec.trace())
    a, b = traces
    assert len(a) == 3 + 5 + 2 * 40
    for col in ("seq", "pos", "token", "step", "phase", "ids", "weights"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    np.testing.assert_array_equal(a.pos[a.seq == 1], np.arange(45))


def test_inputs_reused_in_place_are_read_per_call(tmp_path):
    """A decode loop that rewrites one input buffer in place still gets each step's token recorded."""
    model = model_for("olmoe")
    buf = torch.tensor([[7]])
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        out = model(input_ids=torch.tensor([[5, 6]]))
        cache = getattr(out, "cache", None) or out.past_key_values
        for i in range(4):
            buf.fill_(40 + i)
            mask = torch.ones(1, 3 + i, dtype=torch.long)
            out = model(input_ids=buf, attention_mask=mask, **{cache_kwarg(model): cache})
    t = rec.trace()
    np.testing.assert_array_equal(t.token, [5, 6, 40, 41, 42, 43])
    np.testing.assert_array_equal(t.pos, np.arange(6))
    np.testing.assert_array_equal(t.seq, np.zeros(6))


def test_encoder_decoder_generate(tmp_path):
    model = model_for("switch_transformers")
    ids, mask = left_padded([[11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    plain = model.generate(ids, **kw)
    with moecache.record(model, tmp_path / "t") as rec:
        recorded = model.generate(ids, **kw)
    assert torch.equal(plain, recorded)
    t = rec.trace()
    # encoder rows: sequences 0, 1 (their prompts); decoder rows: sequences 2, 3, one row per output token
    # except the last (the decoder start token is fed first).
    assert [int((t.seq == s).sum()) for s in t.sequences()] == [4, 6, 4, 4]
    dec = t.select(t.seq == 3)
    np.testing.assert_array_equal(dec.token, recorded[1, :-1].numpy())
    np.testing.assert_array_equal(dec.phase, [PHASE_PREFILL] + [PHASE_DECODE] * 3)


def test_right_padding_direct_forward_and_manual_decode(tmp_path):
    model = model_for("qwen3_moe")
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        out = model(input_ids=ids, attention_mask=mask)
        # continue the second row by hand, passing the cache the first call returned
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = torch.tensor([[13], [14]])
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        model(input_ids=nxt, attention_mask=mask2, **{cache_kwarg(model): cache})
    t = rec.trace()
    assert len(t) == 3 + 5 + 2
    assert 0 not in t.token.tolist()  # no pad rows
    a, b = t.select(t.seq == 0), t.select(t.seq == 1)
    np.testing.assert_array_equal(a.pos, [0, 1, 2, 3])
    np.testing.assert_array_equal(a.token, [5, 6, 7, 13])
    np.testing.assert_array_equal(b.pos, np.arange(6))
    np.testing.assert_array_equal(a.phase, [0, 0, 0, 1])


def test_recording_started_mid_generation(tmp_path):
    """A cache the recorder never saw: new sequence ids, positions continue after the cached prompt."""
    model = model_for("mixtral")
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11, 12]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        cache = getattr(out, "cache", None) or out.past_key_values
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with moecache.record(model, tmp_path / "t") as rec:
            model(input_ids=torch.tensor([[13], [14]]), attention_mask=mask2, **{cache_kwarg(model): cache})
    t = rec.trace()
    np.testing.assert_array_equal(t.seq, [0, 1])
    np.testing.assert_array_equal(t.pos, [3, 5])
    np.testing.assert_array_equal(t.phase, [PHASE_DECODE, PHASE_DECODE])


def test_sequence_ids_are_unique_across_calls(tmp_path):
    model = model_for("olmoe")
    with moecache.record(model, tmp_path / "t") as rec:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        model.generate(torch.tensor([[8, 9], [10, 11]]), max_new_tokens=2, min_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    t = rec.trace()
    assert list(t.sequences()) == [0, 1, 2]
    assert [int((t.seq == s).sum()) for s in range(3)] == [5, 3, 3]
    assert sorted(set(t.step[t.seq == 0].tolist())) == [0, 1, 2] and sorted(set(t.step[t.seq >= 1].tolist())) == [3, 4]


# -- metadata, errors, drops ----------------------------------------------------------------------------

def test_meta_sizes(tmp_path):
    model = model_for("mixtral")
    with moecache.record(model, tmp_path / "t", model_name="tiny-mixtral") as rec:
        pass
    meta = open_trace(rec.path).meta
    assert meta.model == "tiny-mixtral"
    assert meta.bytes_per_expert == 3 * 32 * 32 * 4  # gate, up, down of 32 x 32 in fp32
    assert meta.extra["model_class"] == "MixtralForCausalLM" and meta.extra["capture"] == "experts_args"


def test_dense_and_unknown_models_are_refused(tmp_path):
    import transformers as tr

    dense = tr.Qwen3ForCausalLM(tr.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(UnsupportedModelError, match=r"Qwen3ForCausalLM.*Qwen3MLP.*Supported model types:.*mixtral"):
        moecache.record(dense, tmp_path / "a")
    with pytest.raises(UnsupportedModelError, match=r"no MoE layers.*Qwen3MLP"):
        moecache.record(dense, tmp_path / "b", family="qwen3_moe")
    with pytest.raises(ConfigError, match="valid names"):
        moecache.record(dense, tmp_path / "c", family="nope")
    assert not (tmp_path / "a.partial").exists()


def test_block_called_outside_forward_is_counted(tmp_path):
    model = model_for("qwen3_moe")
    block = find_moe_blocks(model, get_family("qwen3_moe"))[0].block
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        block(torch.randn(1, 3, 32))
        model(input_ids=torch.tensor([[4, 5]]))
    t = rec.trace()
    assert len(t) == 2 and t.drops == {"MoE call outside a model forward": 1}


def test_exception_keeps_partial_and_second_recorder_refused(tmp_path):
    model = model_for("granitemoe")
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), moecache.record(model, tmp_path / "t", flush_rows=4) as rec:
            with pytest.raises(ConfigError, match="already being recorded"):
                moecache.record(model, tmp_path / "u").start()
            model(input_ids=torch.tensor([[4, 5, 6]]))
            raise RuntimeError("boom")
    t = open_trace(tmp_path / "t")
    assert not t.finalised and len(t) == 3
    assert not hasattr(model, "_moecache_recorder") and not model.model._forward_pre_hooks


# -- the trained tiny model: real routing on held-out text ----------------------------------------------

def test_record_trained_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    text = (tiny_model_dir / "heldout_sample.txt").read_bytes()[:2000].decode("ascii")
    a, b = list(text[:200].encode("ascii")), list(text[1000:1120].encode("ascii"))
    ids, mask = left_padded([a, b])
    with torch.no_grad(), moecache.record(model, tmp_path / "t") as rec:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    t = rec.trace()
    assert (t.meta.num_experts, t.meta.top_k, t.meta.moe_layers) == (32, 4, list(range(6)))
    assert t.meta.weights == "renormalized" and t.meta.family == "qwen3_moe"
    assert t.meta.bytes_per_expert == 3 * 256 * 128 * 4
    assert len(t) == len(a) + len(b) + 2 * 5
    np.testing.assert_array_equal(t.token[t.seq == 0][:len(a)], a)
    np.testing.assert_array_equal(t.token[t.seq == 1][:len(b)], b)
    np.testing.assert_allclose(t.weights.sum(2), 1.0, rtol=1e-5)
    assert all(len(set(r)) == 4 for r in t.ids.reshape(-1, 4).tolist())  # top-4 distinct experts
    counts = np.stack([np.bincount(t.ids[:, l].ravel(), minlength=32) for l in range(6)])
    p = counts / counts.sum(1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(1)
    assert (entropy > 3.5).all() and (entropy <= 5.0).all(), entropy  # SOURCE.md: 4.0-4.75 bits of 5


# -- the CUDA path (pinned buffers, events) ------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_recording_matches_rows_and_routing(tmp_path):
    model = model_for("qwen3_moe").cuda()
    ids, mask = left_padded([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28]])
    ids, mask = ids.cuda(), mask.cuda()
    blocks, seen, handles = capture_block_inputs(model, "qwen3_moe")
    with torch.no_grad(), moecache.record(model, tmp_path / "t", max_pending=1) as rec:
        for _ in range(70):  # three packed batches with one allowed in flight: the bounded wait runs
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    t = rec.trace()
    real = mask.bool().ravel().cpu().numpy()
    assert len(t) == 70 * int(real.sum())
    for li, b in enumerate(blocks):
        for call, hidden in enumerate(seen[b.layer]):
            with torch.no_grad():
                want_ids, want_w = reference_routing("qwen3_moe", b.block, hidden, 2)
            np.testing.assert_array_equal(t.ids[t.step == call, li], want_ids.cpu().numpy()[real])
            np.testing.assert_allclose(t.weights[t.step == call, li], want_w.float().cpu().numpy()[real], rtol=1e-6)


# -- hidden states (format version 2) -----------------------------------------------------------------

def test_hidden_states_recorded_on_request(tmp_path):
    """With hidden_states=True every (token, layer) carries its MoE block's input; padding and the
    packing of decode steps change nothing; without it the trace is version 1 as before."""
    import json

    from moecache.predictors.gate_lookahead import capture

    model = model_for("qwen3_moe")
    ids, mask = left_padded([[11, 12, 13], [21, 22, 23, 24, 25]])
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    traces = []
    for name, hs in (("plain", False), ("hidden", True), ("hidden1", True)):
        with moecache.record(model, tmp_path / name, hidden_states=hs, flush_rows=1 if name == "hidden1" else 16384):
            model.generate(ids, **kw)
        traces.append(open_trace(tmp_path / name))
    plain, hid, hid1 = traces
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["version"] == 1
    assert "hidden_size" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["meta"]
    assert json.loads((tmp_path / "hidden" / "manifest.json").read_text())["version"] == 2
    assert plain.hidden is None and plain.meta.hidden_size is None
    H = model.config.hidden_size
    assert hid.meta.hidden_size == H and hid.hidden.shape == (len(hid), hid.meta.num_layers, H) and hid.hidden.dtype == np.float16
    np.testing.assert_array_equal(hid.ids, plain.ids)
    np.testing.assert_array_equal(hid.hidden, hid1.hidden)
    assert np.isfinite(hid.hidden).all()
    # the prompt rows equal the block inputs of a plain forward pass over the same tokens
    want_ids, want_h = capture(model, [21, 22, 23, 24, 25])
    first = hid.select((hid.seq == 1) & (hid.phase == PHASE_PREFILL))
    np.testing.assert_array_equal(first.ids, want_ids)
    np.testing.assert_allclose(first.hidden.astype(np.float32), want_h, rtol=2e-3, atol=2e-3)
    # select / save keep the column
    sub = hid.select(hid.seq == 0)
    sub.save(tmp_path / "sub")
    again = open_trace(tmp_path / "sub")
    np.testing.assert_array_equal(again.hidden, hid.hidden[hid.seq == 0])


def test_hidden_states_schema_errors(tmp_path):
    from moecache.errors import TraceFormatError
    from moecache.trace import RoutingBlock, TraceMeta, write_trace

    meta = TraceMeta(num_experts=4, top_k=1, moe_layers=[0, 1], hidden_size=3)
    ids = np.zeros((2, 2, 1), np.int16)
    with pytest.raises(TraceFormatError, match="declares hidden_size=3 but a block has no hidden"):
        write_trace(tmp_path / "a", meta, [RoutingBlock.build(ids)])
    with pytest.raises(TraceFormatError, match=r"hidden shape \(2, 2, 5\)"):
        write_trace(tmp_path / "b", meta, [RoutingBlock.build(ids, hidden=np.zeros((2, 2, 5)))])
    with pytest.raises(TraceFormatError, match="hidden_size is null"):
        write_trace(tmp_path / "c", TraceMeta(num_experts=4, top_k=1, moe_layers=[0, 1]),
                    [RoutingBlock.build(ids, hidden=np.zeros((2, 2, 3)))])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    path = write_trace(tmp_path / "ok", meta, [RoutingBlock.build(ids, hidden=np.ones((2, 2, 3)))])
    import os
    os.remove(os.path.join(path, "chunk-000000", "hidden.npy"))
    t = open_trace(path)  # ids still read; the missing column is named when asked for
    assert len(t) == 2
    with pytest.raises(TraceFormatError, match="hidden.npy is missing"):
        t.hidden
