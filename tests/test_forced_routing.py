"""``moecache.run_forced``: routing forced to a trace (offloaded and plain models), equal weights where the
trace has none, the model's own routing where the trace misses a layer, and mismatches as errors.
Also the ``generate`` command and the embedded default model's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecache.errors import ConfigError
from moecache.forced_routing import run_forced
from moecache.runtime import offload
from moecache.trace import RoutingBlock, Trace, TraceMeta

from .tiny_models import tiny_model


def _trace(layers: int, experts: int, top_k: int, rows: int, seqs: int = 2, weights: bool = False,
           seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(rows * seqs)]).astype(np.int16)
    w = None
    if weights:
        w = rng.random(ids.shape).astype(np.float32)
        w /= w.sum(axis=2, keepdims=True)
    meta = TraceMeta(num_experts=experts, top_k=top_k, moe_layers=list(range(layers)), model="synthetic",
                     weights="renormalized" if weights else "absent")
    block = RoutingBlock.build(ids, seq=np.repeat(np.arange(seqs), rows), pos=np.tile(np.arange(rows), seqs),
                               token=rng.integers(3, 90, rows * seqs), phase=0, weights=w)
    return Trace(meta, block)


def _recording(handle):
    """Wrap every OffloadedExperts so that the (ids, weights) it receives are recorded per layer."""
    seen: dict[int, list] = {}
    for layer in handle.runtime.layers:
        wrapper = getattr(layer.block, handle.adapter.experts_attr)
        run = wrapper._run

        def rec(li, hidden, idx, w, _run=run):
            seen.setdefault(li, []).append((idx.clone(), w.clone()))
            return _run(li, hidden, idx, w)

        object.__setattr__(wrapper, "_run", rec)
    return seen


def test_replay_forces_the_trace_routing_with_equal_weights():
    m = tiny_model("qwen3_moe")
    tr = _trace(3, 8, 2, rows=6)
    h = offload(m, cache_slots=4, device="cpu")
    seen = _recording(h)
    res = run_forced(m, tr, prefill=2)
    assert res.sequences == 2 and res.prefill_tokens == 4 and res.decode_tokens == 8
    for layer in range(3):
        ids = torch.cat([i for i, _ in seen[layer]]).numpy()
        assert np.array_equal(ids, tr.ids[:, layer, :])
        w = torch.cat([x for _, x in seen[layer]])
        assert torch.all(w == 0.5)  # the trace has no gate weights: 1 / top_k each
    s = h.stats()
    # One access per distinct expert per layer call: a 2-row prefill call, then one call per row.
    calls = [slice(0, 2)] + [slice(r, r + 1) for r in range(2, 6)] + [slice(6, 8)] + \
        [slice(r, r + 1) for r in range(8, 12)]
    assert s["accesses"] == sum(len(np.unique(tr.ids[c, l])) for c in calls for l in range(3))
    assert s["prefill_tokens"] == 4 and s["decode_tokens"] == 8
    h.remove()


def test_replay_on_a_plain_model_uses_trace_weights_and_fills_missing_layers():
    m = tiny_model("mixtral")
    tr = _trace(3, 8, 2, rows=4, seqs=1, weights=True)
    tr.ids[1, 2, :] = -1  # a layer the trace has no record of: the model routes it itself
    captured: list = []
    hook = m.model.layers[2].mlp.experts.register_forward_hook(
        lambda mod, args, out: captured.append((args[1].clone(), args[2].clone())))
    # registered after replay's pre-hook would be too late; a forward hook sees the forced args
    res = run_forced(m, tr, prefill=1, sequences=1)
    hook.remove()
    assert res.decode_tokens == 3
    ids = torch.cat([a for a, _ in captured]).numpy()
    w = torch.cat([b for _, b in captured]).numpy()
    assert np.array_equal(ids[[0, 2, 3]], tr.ids[[0, 2, 3], 2])
    assert np.allclose(w[[0, 2, 3]], tr.weights[[0, 2, 3], 2])
    assert (ids[1] >= 0).all() and not np.allclose(w[1], tr.weights[1, 2])


def test_a_trace_that_does_not_match_the_model_is_an_error():
    m = tiny_model("qwen3_moe")
    for tr, what in ((_trace(3, 16, 2, 3), "experts 16 vs 8"), (_trace(3, 8, 3, 3), "top-k 3 vs 2"),
                     (_trace(5, 8, 2, 3), "MoE layers 5 vs 3")):
        with pytest.raises(ConfigError, match=what):
            run_forced(m, tr)


def _logits_hook(model, store: list):
    return model.lm_head.register_forward_hook(lambda mod, args, out: store.append(out.detach().clone()))


def test_batched_replay_feeds_each_row_its_sequence_routing_step_by_step():
    m = tiny_model("qwen3_moe")
    tr = _trace(3, 8, 2, rows=6, seqs=4, weights=True, seed=3)
    h = offload(m, cache_slots=5, device="cpu")
    seen = _recording(h)
    res = run_forced(m, tr, prefill=2, batch=2)
    assert (res.sequences, res.batch, res.decode_steps) == (4, 2, 8)
    assert res.prefill_tokens == 2 * 2 * 2 and res.decode_tokens == 2 * 2 * 4
    assert [g["seqs"] for g in res.per_sequence] == [[0, 1], [2, 3]]
    for layer in range(3):
        calls = [i.numpy() for i, _ in seen[layer]]
        weights = [x.numpy() for _, x in seen[layer]]
        # per group: one prefill call of 2 rows x 2 steps, then 4 decode calls of 2 rows
        assert [c.shape[0] for c in calls] == [4, 2, 2, 2, 2] * 2
        for g, (a, b) in enumerate(((0, 1), (2, 3))):
            ra, rb = tr.ids[tr.seq == a, layer], tr.ids[tr.seq == b, layer]
            wa, wb = tr.weights[tr.seq == a, layer], tr.weights[tr.seq == b, layer]
            pre = calls[5 * g]
            assert np.array_equal(pre, np.concatenate([ra[:2], rb[:2]]))  # (row, step) order
            assert np.allclose(weights[5 * g], np.concatenate([wa[:2], wb[:2]]))
            for t in range(2, 6):
                assert np.array_equal(calls[5 * g + t - 1], np.stack([ra[t], rb[t]]))
                assert np.allclose(weights[5 * g + t - 1], np.stack([wa[t], wb[t]]))
    s = h.stats()
    assert s["prefill_tokens"] == 8 and s["decode_tokens"] == 16 and s["misses"] > 0
    h.remove()


def test_batched_rows_match_one_sequence_at_a_time_and_the_recorder_sees_the_trace(tmp_path):
    import moecache

    m = tiny_model("mixtral")
    tr = _trace(3, 8, 2, rows=7, seqs=2, weights=True, seed=5)
    tr = tr.select(~((tr.seq == 1) & (tr.pos >= 5)))  # sequence 1 is 2 rows shorter: common length 5
    alone: list = []
    hk = _logits_hook(m, alone)
    one = [run_forced(m, tr, sequences=[s], prefill=1) for s in (0, 1)]
    hk.remove()
    assert [r.decode_tokens for r in one] == [6, 4]
    together: list = []
    hk = _logits_hook(m, together)
    with moecache.record(m, tmp_path / "rec") as rec:
        res = run_forced(m, tr, prefill=1, batch=2)
    hk.remove()
    assert res.decode_steps == 4 and res.decode_tokens == 8 and res.unreplayed_rows == 2
    # the same logits per row as running each sequence alone (its first 5 rows)
    seq0 = torch.cat([x[0] for x in alone[:5]])
    seq1 = torch.cat([x[0] for x in alone[7:12]])
    batched = torch.cat(together, dim=1)
    assert torch.allclose(batched[0], seq0, atol=1e-5) and torch.allclose(batched[1], seq1, atol=1e-5)
    # the recorder sees the forced routing: one sequence per batch row, the trace's rows in order
    got = rec.trace()
    assert [int(s) for s in got.sequences()] == [0, 1]
    for row, sid in enumerate((0, 1)):
        assert np.array_equal(got.ids[got.seq == row], tr.ids[tr.seq == sid][:5])
        assert np.allclose(got.weights[got.seq == row], tr.weights[tr.seq == sid][:5], atol=1e-6)


def test_batch_one_is_the_sequence_by_sequence_replay_and_limits_are_checked():
    m = tiny_model("qwen3_moe")
    tr = _trace(3, 8, 2, rows=5, seqs=3)
    res = run_forced(m, tr, prefill=1, batch=1, max_tokens=4)
    assert [(g["seq"], g["rows"], g["prefill"], g["decode"]) for g in res.per_sequence] == [(0, 1, 1, 3), (1, 1, 1, 3),
                                                                                          (2, 1, 1, 3)]
    assert res.decode_tokens == res.decode_steps == 9 and res.unreplayed_rows == 0
    # three sequences at batch 2: the last group runs with the one row it has
    res = run_forced(m, tr, prefill=1, batch=2)
    assert [g["rows"] for g in res.per_sequence] == [2, 1] and res.decode_tokens == 2 * 4 + 4
    cut = run_forced(m, tr, prefill=1, time_limit_s=1e-9)
    assert cut.truncated and cut.decode_tokens == 0 and cut.sequences == 1
    with pytest.raises(ConfigError, match="batch=0 is out of range"):
        run_forced(m, tr, batch=0)
    with pytest.raises(ConfigError, match="time_limit_s"):
        run_forced(m, tr, time_limit_s=0)


def test_generate_command_checks_tokens_against_the_unpatched_model(tmp_path, capsys):
    from moecache.cli import main

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "ck")
    rc = main(["generate", "--model", str(tmp_path / "ck"), "--prompt", "ABC", "--max-new-tokens", "6",
               "--cache-slots", "3", "--check", "--device", "cpu", "--json", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "identical to the unpatched model" in err and "hit rate" in err and "tokens/s" in err
    import json

    s = json.load(open(tmp_path / "s.json"))
    assert s["check"] is True and s["config"]["slots"] == 3
    rc = main(["generate", "--model", str(tmp_path / "ck"), "--cache-slots", "1", "--device", "cpu"])
    assert rc == 2 and "cache_slots=1" in capsys.readouterr().err


def test_default_model_size():
    from moecache.default_model import DEFAULT_CONFIG, default_config
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        m = Qwen3MoeForCausalLM(default_config())
    n = sum(p.numel() for p in m.parameters())
    assert 100e6 <= n <= 300e6
    assert DEFAULT_CONFIG["num_experts"] * DEFAULT_CONFIG["num_hidden_layers"] == 256
