"""Expert predictors: hand-worked cases per predictor, one contract over all of them, the recall replay.

The hand-worked cases pin exact probabilities on traces small enough to count by hand; the contract
runs every registered predictor on routing recorded from a tiny random Qwen3-MoE model (so the
hidden-state predictor runs on the same trace); the last tests use the trained model in ../shared.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache.errors import ConfigError, UnsupportedModelError
from moecache.predict_eval import RecallRow, evaluate, measure_recall, split, split_mask
from moecache.predictors import PREDICTORS, Predictor
from moecache.predictors._common import multi_hot, token_order
from moecache.predictors.gate_lookahead import GateLookaheadPredictor, capture, moe_routers
from moecache.predictors.learned import feature_layers
from moecache.predictors.transition import transition_counts
from moecache.trace import RoutingBlock, Trace, TraceMeta


def make_trace(ids_per_seq, num_experts, top_k, seqs=None):
    """A trace from a list of ``(tokens, layers, top_k)`` id arrays, one per sequence."""
    blocks = []
    for i, ids in enumerate(ids_per_seq):
        ids = np.asarray(ids, np.int64)
        blocks.append(RoutingBlock.build(ids, seq=i if seqs is None else seqs[i], pos=np.arange(len(ids))))
    L = np.asarray(ids_per_seq[0]).shape[1]
    meta = TraceMeta(num_experts=num_experts, top_k=top_k, moe_layers=list(range(L)))
    return Trace(meta, RoutingBlock.concat(blocks))


def col(*experts):
    """Ids for a top-1 trace with one layer: ``col(0, 0, 1)`` -> shape (3, 1, 1)."""
    return np.array(experts, np.int64).reshape(-1, 1, 1)


# -- base helpers ------------------------------------------------------------------------------

def _normalise_reference(row, k):
    """Water-filling written out per row, the way the docstring states it."""
    s = np.maximum(np.asarray(row, float), 0)
    n = len(s)
    if s.sum() <= 0:
        return np.full(n, k / n)
    capped = np.zeros(n, bool)
    while True:
        free = ~capped
        rest = k - capped.sum()
        base = s[free].sum()
        p = np.where(capped, 1.0, 0.0)
        p[free] = s[free] * rest / base if base > 0 else rest / free.sum()
        if (p <= 1 + 1e-12).all():
            return p
        capped |= p >= 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(6, 12), st.integers(0, 10**6))
def test_normalise_matches_per_row_water_filling(k, n, seed):
    rng = np.random.default_rng(seed)
    s = rng.random((7, n)) ** rng.integers(1, 8)  # skewed rows need several capping rounds
    s[0] = 0.0
    s[1, : n - 1] = 0.0  # one positive score: the rest is spread evenly
    s[2, :k] = 1e6
    p = Predictor(1, n, k).normalise(s)
    for r in range(len(s)):
        np.testing.assert_allclose(p[r], _normalise_reference(s[r], k), atol=1e-9)
    assert np.allclose(p.sum(axis=1), k) and (p >= 0).all() and (p <= 1 + 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(6, 64), st.integers(0, 10**6))
def test_normalise_one_row_equals_the_batched_path_bit_for_bit(k, n, seed):
    # The one-row fast path (batch-1 decode) must give the very bits of the rows path that the C++
    # simulator core reproduces; a row alone and the same row among others are compared.
    rng = np.random.default_rng(seed)
    s = rng.random((6, n)) ** rng.integers(1, 12)
    s[0] = 0.0
    s[1, : n - 1] = 0.0
    s[2, :k] = 1e6
    s[3, k:] = 0.0
    pred = Predictor(1, n, k)
    batched = pred.normalise(s)
    for r in range(len(s)):
        alone = pred.normalise(s[r])
        assert alone.shape == (1, n)
        assert np.array_equal(alone[0], batched[r]), r


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(8, 64), st.integers(0, 10**6))
def test_normalise_does_not_depend_on_memory_layout(k, n, seed):
    # A column-ordered (rows, experts) array must give the bits of the same rows in row order.
    rng = np.random.default_rng(seed)
    s = rng.random((5, n)) ** rng.integers(1, 12)
    pred = Predictor(1, n, k)
    assert np.array_equal(pred.normalise(np.asfortranarray(s)), pred.normalise(s))


def test_normalise_hand_worked():
    p = Predictor(1, 4, 2).normalise(np.array([[4.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]))
    np.testing.assert_allclose(p, [[1, 1 / 3, 1 / 3, 1 / 3], [0.5] * 4, [1, 1 / 3, 1 / 3, 1 / 3]])


def test_target_wraps_into_next_token():
    p = Predictor(3, 4, 1)
    assert p.target(0, 1) == (1, 0) and p.target(2, 1) == (0, 1) and p.target(1, 2) == (0, 1)
    assert p.target(0, 3) == (0, 1) and p.target(2, 4) == (0, 2)
    with pytest.raises(ConfigError):
        p.target(0, 0)


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="alpha"):
        PREDICTORS.get("prior")(2, 4, 1, decay=0.5)  # a temporal parameter given to the prior
    with pytest.raises(ConfigError, match="combine rule"):
        PREDICTORS.get("transition")(2, 4, 1, combine="max")
    with pytest.raises(ConfigError, match="top_k"):
        PREDICTORS.get("temporal")(2, 4, 5)
    p = PREDICTORS.get("temporal")(2, 4, 1)
    for bad in ([[-3]], [[0.5]], [[4]], [[0, 1]]):
        p.reset()
        with pytest.raises(ConfigError):
            p.observe(0, bad)
            p.predict(0, 1)
    with pytest.raises(ConfigError, match="before any observe"):
        p.reset()
        p.predict(0, 1)


def test_multi_hot_ignores_missing_and_duplicates():
    h = multi_hot(np.array([[1, -1], [2, 2], [-2, -1]]), 4)
    np.testing.assert_array_equal(h, [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    with pytest.raises(ConfigError, match="out of range"):
        multi_hot(np.array([[4]]), 4)


def test_token_order_groups_interleaved_sequences():
    t = make_trace([col(0, 1, 2), col(3, 3)], 4, 1, seqs=[7, 5])
    t = t.select(np.array([0, 3, 1, 4, 2]))  # interleave: 7, 5, 7, 5, 7
    order, nxt = token_order(t)
    assert list(t.seq[order]) == [7, 7, 7, 5, 5]
    assert list(t.ids[order, 0, 0]) == [0, 1, 2, 3, 3]
    assert list(nxt) == [True, True, False, True, False]


# -- hand-worked cases -------------------------------------------------------------------------

def test_prior_hand_worked():
    # layer 0 chose 0, 0, 1 and layer 1 chose 3, 3, 3; Laplace alpha 1 over 4 experts
    t = make_trace([np.array([[[0], [3]], [[0], [3]], [[1], [3]]])], 4, 1)
    p = PREDICTORS.get("prior")(2, 4, 1).fit(t)
    p.reset()
    p.observe(0, [[2]])
    np.testing.assert_allclose(p.predict(0, 1), [[1 / 7, 1 / 7, 1 / 7, 4 / 7]])
    p.observe(1, [[0]])
    np.testing.assert_allclose(p.predict(1, 1), [[3 / 7, 2 / 7, 1 / 7, 1 / 7]])  # next token's layer 0
    # top-2 where layer 1's second slot was always dropped (-2): prior (1, 1, 1, 4)/7, and
    # 2 * 4/7 > 1 is capped at 1 while the others share the remaining 1 evenly
    t2 = make_trace([np.array([[[0, 1], [3, -2]], [[0, 1], [3, -2]], [[1, 2], [3, -2]]])], 4, 2)
    p2 = PREDICTORS.get("prior")(2, 4, 2).fit(t2)
    p2.reset()
    p2.observe(0, [[0, 1]])
    np.testing.assert_allclose(p2.predict(0, 1), [[1 / 3, 1 / 3, 1 / 3, 1]])


def test_prior_must_be_fitted():
    p = PREDICTORS.get("prior")(2, 4, 1)
    p.observe(0, [[1]])
    with pytest.raises(ConfigError, match="fit"):
        p.predict(0, 1)


def test_temporal_hand_worked():
    # decay 0.5, strength 1, uniform prior 1/3 (not fitted): (c + 1/3) / (h + 1)
    p = PREDICTORS.get("temporal")(1, 3, 1, decay=0.5, strength=1.0)
    p.reset()
    np.testing.assert_allclose(_first_predict(p, [[0]]), [[2 / 3, 1 / 6, 1 / 6]])  # c=[1,0,0], h=1
    p.observe(0, [[1]])  # c = [0.5, 1, 0], h = 1.5
    np.testing.assert_allclose(p.predict(0, 1), [[1 / 3, 8 / 15, 2 / 15]])
    p.observe(0, [[-1]])  # a missing record leaves the state alone
    np.testing.assert_allclose(p.predict(0, 1), [[1 / 3, 8 / 15, 2 / 15]])
    p.reset()  # a new request forgets everything
    np.testing.assert_allclose(_first_predict(p, [[2]]), [[1 / 6, 1 / 6, 2 / 3]])


def test_temporal_rows_are_separate_requests():
    p = PREDICTORS.get("temporal")(1, 3, 1, decay=0.5, strength=1.0)
    p.observe(0, [[0], [-1]])
    np.testing.assert_allclose(p.predict(0, 1), [[2 / 3, 1 / 6, 1 / 6], [1 / 3, 1 / 3, 1 / 3]])
    with pytest.raises(ConfigError, match="reset"):
        p.observe(0, [[0]])  # a different batch size without reset()


def _first_predict(p, experts, layer=0, depth=1):
    p.observe(layer, experts)
    return p.predict(layer, depth)


def test_transition_hand_worked():
    # one sequence, 2 layers, 3 experts, top-1; (layer 0, layer 1) per token:
    toks = np.array([[[0], [1]], [[0], [1]], [[1], [2]], [[2], [2]]])
    t = make_trace([toks], 3, 1)
    p = PREDICTORS.get("transition")(2, 3, 1, alpha=1.0, combine="mean").fit(t)
    # depth 1 from layer 0: pairs 0->1, 0->1, 1->2, 2->2; prior of layer 1 = (1, 3, 3)/7
    # P(. | 0) = ([0, 2, 0] + (1, 3, 3)/7) / 3
    p.reset()
    np.testing.assert_allclose(_first_predict(p, [[0]]), [[1 / 21, 17 / 21, 3 / 21]])
    # depth 1 from layer 1 = layer 0 of the next token: pairs 1->0, 1->1, 2->2; prior of layer 0 = (3, 2, 2)/7
    p.observe(1, [[1]])
    np.testing.assert_allclose(p.predict(1, 1), [[10 / 21, 9 / 21, 2 / 21]])
    # a missing record at the source layer gives the target prior
    p.observe(1, [[-1]])
    np.testing.assert_allclose(p.predict(1, 1), [[3 / 7, 2 / 7, 2 / 7]])
    # pairs never cross sequences: appending a sequence adds its own pairs only
    two = make_trace([toks, np.array([[[2], [0]], [[1], [1]]])], 3, 1)
    counts = transition_counts(two, 4)
    assert counts[0, 1].sum() == 3 + 1  # depth 1 from layer 1: 3 next-token pairs in seq 0, 1 in seq 1
    assert counts[0, 1, 1, 0] == 1 and counts[0, 1, 0, 1] == 1  # seq 1's pair 0 -> 1 is its own
    assert counts[0, 1, 2, 2] == 1  # seq 0's last token (layer 1 = 2) is not paired with seq 1's first
    q = PREDICTORS.get("transition")(2, 3, 1).fit(two)
    assert q.cond.shape == (4, 2, 3, 3)
    q.observe(1, [[0]])
    with pytest.raises(ConfigError, match="max_depth"):
        q.predict(1, 5)


def test_transition_product_combines_evidence():
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(5, 2, replace=False) for _ in range(2)]) for _ in range(60)])
    t = make_trace([ids], 5, 2)
    prod = PREDICTORS.get("transition")(2, 5, 2, combine="product").fit(t)
    prod.reset()
    prod.observe(0, [[1, 3]])
    c, prior = prod.cond[0, 0], prod.prior[1]
    expect = prior * (c[1] / prior) * (c[3] / prior)
    np.testing.assert_allclose(prod.predict(0, 1), prod.normalise(expect[None] / expect.sum()))
    # with one observed expert (top-1) product and mean agree
    t1 = make_trace([ids[:, :, :1]], 5, 1)
    a = PREDICTORS.get("transition")(2, 5, 1, combine="product").fit(t1)
    b = PREDICTORS.get("transition")(2, 5, 1, combine="mean").fit(t1)
    np.testing.assert_allclose(_first_predict(a, [[2]]), _first_predict(b, [[2]]))


def test_activation_matrix_hand_worked():
    # library: A = [2, 1, 0] (seq 0: 0, 0, 1) and B = [0, 0, 2] (seq 1: 2, 2); one layer, top-1
    t = make_trace([col(0, 0, 1), col(2, 2)], 3, 1)
    p = PREDICTORS.get("activation_matrix")(1, 3, 1, matches=1).fit(t)
    np.testing.assert_array_equal(p.library[:, 0], [[2, 1, 0], [0, 0, 2]])
    prior = np.array([1 / 3, 1 / 6, 1 / 2])  # mean of the per-layer distributions (2/3, 1/3, 0) and (0, 0, 1)
    p.reset()
    got = _first_predict(p, [[0]])  # current A = [1, 0, 0]: cos with A = 2/sqrt(5), with B = 0
    s = 2 / np.sqrt(5) * np.array([2 / 3, 1 / 3, 0]) + 1e-3 * prior
    np.testing.assert_allclose(got, [s / s.sum()])
    p.observe(0, [[2]])
    p.observe(0, [[2]])  # A = [1, 0, 2]: cos with A = 2/5, with B = 2/sqrt(5): B wins
    s = 2 / np.sqrt(5) * np.array([0, 0, 1]) + 1e-3 * prior
    np.testing.assert_allclose(p.predict(0, 1), [s / s.sum()])
    p.reset()
    p.observe(0, [[-1]])  # nothing observed yet: only the prior is left
    np.testing.assert_allclose(p.predict(0, 1), [prior])


def test_activation_matrix_library_is_bounded():
    rng = np.random.default_rng(1)
    t = make_trace([rng.integers(0, 6, (5, 2, 1)) for _ in range(12)], 6, 1)
    p = PREDICTORS.get("activation_matrix")(2, 6, 1, library_size=4).fit(t)
    assert p.library.shape == (4, 2, 6) and (p.library >= 0).all()


def test_learned_feature_layers():
    # after layer 0 of 3, window 2: this token's layer 0, the previous token's layer 2, then the target
    assert feature_layers(0, 1, 3, 2) == [(0, 0), (2, -1), (1, -1)]
    assert feature_layers(2, 0, 3, 2) == [(2, 0), (1, 0), (0, 0)]
    assert feature_layers(0, 0, 1, 3) == [(0, 0), (0, 0)]  # one layer: the window is that layer


def test_learned_finds_cross_token_and_window_rules():
    # 3 layers, 4 experts, top-1; layer 1 of token t copies layer 2 of token t-1 (reached through the
    # window's wrap into the previous token); layer 0 of token t+1 copies layer 1 of token t
    rng = np.random.default_rng(2)
    seqs = []
    for _ in range(30):
        n = 20
        ids = np.zeros((n, 3, 1), np.int64)
        ids[:, 2, 0] = rng.integers(0, 4, n)
        ids[0, 0, 0], ids[0, 1, 0] = rng.integers(0, 4, 2)
        for i in range(1, n):
            ids[i, 1, 0] = ids[i - 1, 2, 0]
            ids[i, 0, 0] = ids[i - 1, 1, 0]
        seqs.append(ids)
    fit, score = make_trace(seqs[:20], 4, 1), make_trace(seqs[20:], 4, 1)
    p = PREDICTORS.get("learned")(3, 4, 1, window=2).fit(fit)
    rows = measure_recall(p, score, (1,))
    assert rows[0].recall() > 0.6  # layer 2 is random (1/4), layers 0 and 1 follow rules
    p.reset()
    seq = seqs[25]
    for tok in range(3):
        for l in range(3):
            p.observe(l, seq[tok, l])
            if l == 0 and tok > 0:
                assert p.predict(0, 1)[0].argmax() == seq[tok - 1, 2, 0]  # window wrap: previous token's layer 2
            if l == 1:
                assert p.predict(1, 2)[0].argmax() == seq[tok, 1, 0]  # next token's layer 0
    with pytest.raises(ConfigError, match="max_depth"):
        p.predict(0, 3)


# -- gate lookahead on a tiny random Qwen3-MoE ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_moe():
    torch = pytest.importorskip("torch")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # random routers large enough that routing is not a near-tie everywhere
        for _, _, router, norm in moe_routers(model):
            router.weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_routing(tiny_moe):
    """Routing and hidden states of 6 random sequences of 24 tokens, as a trace plus aligned hidden."""
    rng = np.random.default_rng(3)
    ids, hid, blocks = [], [], []
    for s in range(6):
        i, h = capture(tiny_moe, rng.integers(3, 64, 24))
        blocks.append(RoutingBlock.build(i, seq=s, pos=np.arange(len(i))))
        hid.append(h)
    meta = TraceMeta(num_experts=8, top_k=2, moe_layers=[0, 1, 2], model="tiny-random-qwen3moe")
    return Trace(meta, RoutingBlock.concat(blocks)), np.concatenate(hid)


def test_capture_matches_the_routers(tiny_moe, tiny_routing):
    import torch

    trace, hidden = tiny_routing
    for l, (_, _, router, _) in enumerate(moe_routers(tiny_moe)):
        with torch.no_grad():
            _, _, idx = router(torch.from_numpy(hidden[:24, l]))
        np.testing.assert_array_equal(np.sort(idx.numpy(), 1), np.sort(trace.ids[:24, l], 1))


def test_gate_lookahead_equals_the_later_router(tiny_moe, tiny_routing):
    import torch

    trace, hidden = tiny_routing
    routers = moe_routers(tiny_moe)
    p = GateLookaheadPredictor.from_model(tiny_moe)
    assert (p.num_layers, p.num_experts, p.top_k) == (3, 8, 2)
    p.reset()
    h = hidden[:10]
    for layer, depth in ((0, 1), (0, 2), (1, 1)):
        p.observe(layer, trace.ids[:10, layer], h[:, layer])
        got = p.predict(layer, depth)
        with torch.no_grad():
            logits, _, idx = routers[layer + depth][2](torch.from_numpy(h[:, layer]))
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        np.testing.assert_allclose(got, p.normalise(probs), rtol=1e-5, atol=1e-7)
        top = np.argsort(-got, axis=1, kind="stable")[:, :2]
        np.testing.assert_array_equal(np.sort(top, 1), np.sort(idx.numpy(), 1))


def test_gate_lookahead_norm_rescale_and_fallback(tiny_moe, tiny_routing):
    trace, hidden = tiny_routing
    p = GateLookaheadPredictor.from_model(tiny_moe, rescale="norm")
    rng = np.random.default_rng(4)
    norms = rng.uniform(0.5, 2.0, p.norms.shape).astype(np.float32)
    p.set_routers(p.routers, norms)
    p.observe(0, trace.ids[:4, 0], hidden[:4, 0])
    x = (hidden[:4, 0] * (norms[1] / norms[0])).astype(np.float64)  # layer 0's norm weight swapped for layer 1's
    z = x @ p.routers[1].T.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p.predict(0, 1), p.normalise(e / e.sum(1, keepdims=True)), rtol=1e-6)
    # next-token targets and rows without a hidden state: exactly the temporal estimate
    g = GateLookaheadPredictor.from_model(tiny_moe).fit(trace)
    t = PREDICTORS.get("temporal")(3, 8, 2).fit(trace)
    for pred in (g, t):
        pred.reset()
    for l in range(3):
        g.observe(l, trace.ids[:4, l], hidden[:4, l] if l < 2 else None)
        t.observe(l, trace.ids[:4, l])
    np.testing.assert_allclose(g.predict(2, 1), t.predict(2, 1))
    np.testing.assert_allclose(g.predict(1, 2), t.predict(1, 2))
    np.testing.assert_allclose(g.predict(2, 2), t.predict(2, 2))


def test_gate_lookahead_needs_routers_and_supported_models():
    p = PREDICTORS.get("gate_lookahead")(2, 4, 1)
    p.observe(0, [[1]], np.zeros((1, 8)))
    with pytest.raises(ConfigError, match="from_model"):
        p.predict(0, 1)
    from types import SimpleNamespace

    with pytest.raises(UnsupportedModelError, match="supported families"):  # grouped, bias-corrected router
        GateLookaheadPredictor.from_model(SimpleNamespace(config=SimpleNamespace(model_type="deepseek_v3")))
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError):  # not a MoE model at all
        GateLookaheadPredictor.from_model(dense)


# -- contract over every registered predictor ----------------------------------------------------

#: The oracle reads the simulator's future (set_future) and is covered by the simulator's tests.
STREAM_PREDICTORS = [n for n in PREDICTORS.names() if n != "oracle"]

#: Non-default configurations that take other code paths, checked by the contract too.
VARIANTS = {"transition": [{"combine": "mean"}], "learned": [{"model": "logistic"}, {"calibrate": "isotonic"}],
            "gate_lookahead": [{"rescale": "norm"}]}
CONFIGS = [(n, {}) for n in STREAM_PREDICTORS] + [(n, v) for n in STREAM_PREDICTORS for v in VARIANTS.get(n, [])]


def _build(name, params, model, trace, hidden=None):
    cls = PREDICTORS.get(name)
    if name == "hidden_state":  # fitted on the routing and the hidden states recorded with it
        return cls(3, 8, 2, **{"epochs": 2, "hidden_units": 16, **params}).fit(trace.with_hidden(hidden))
    if cls.needs_model:
        return GateLookaheadPredictor.from_model(model, **params).fit(trace)
    return cls(3, 8, 2, **params).fit(trace)


def _run(pred, trace, hidden, seq_rows):
    """Observe/predict over tokens of the given rows (one request per row); returns all predictions."""
    pred.reset()
    out = []
    ids = np.stack([trace.ids[r] for r in seq_rows], axis=1)  # (tokens, rows, L, k)
    hid = np.stack([hidden[r] for r in seq_rows], axis=1)
    for t in range(ids.shape[0]):
        for l in range(3):
            pred.observe(l, ids[t, :, l], hid[t, :, l])
            for d in (1, 2):
                out.append(pred.predict(l, d))
    return np.stack(out)


@pytest.mark.parametrize("name,params", CONFIGS, ids=[f"{n}{'-' + '-'.join(map(str, p.values())) if p else ''}" for n, p in CONFIGS])
def test_contract(name, params, tiny_moe, tiny_routing, tmp_path):
    trace, hidden = tiny_routing
    fit_mask = split_mask(trace, "alternate")
    fit = trace.select(fit_mask)
    seq_rows = [np.nonzero(trace.seq == s)[0] for s in np.unique(trace.seq[~fit_mask])]
    pred = _build(name, params, tiny_moe, fit, hidden[fit_mask])
    got = _run(pred, trace, hidden, seq_rows)
    assert got.shape == (24 * 3 * 2, len(seq_rows), 8) and got.dtype == np.float64
    assert (got >= 0).all() and (got <= 1 + 1e-12).all()
    np.testing.assert_allclose(got.sum(axis=2), 2.0, atol=1e-9)
    # deterministic: a second predictor built and fitted the same way says exactly the same
    np.testing.assert_array_equal(_run(_build(name, params, tiny_moe, fit, hidden[fit_mask]), trace, hidden, seq_rows),
                                  got)
    # rows are independent requests: each row alone gives its column of the batched run
    alone = _run(pred, trace, hidden, seq_rows[1:2])
    np.testing.assert_allclose(alone[:, 0], got[:, 1], rtol=1e-9, atol=1e-12)
    # save/load (JSON + npz, no pickle) gives identical predictions
    pred.save(tmp_path / name)
    back = Predictor.load(tmp_path / name)
    assert type(back) is type(pred) and back.params == pred.params
    np.testing.assert_array_equal(_run(back, trace, hidden, seq_rows), got)
    # missing records in observe are skipped, not taken as expert 0 (or -1 as the last expert)
    pred.reset()
    pred.observe(0, np.full((2, 2), -1), hidden[:2, 0])
    p = pred.predict(0, 1)
    assert np.allclose(p.sum(axis=1), 2.0)
    with pytest.raises(ConfigError):
        pred.observe(3, trace.ids[:2, 0])  # no layer 3


def test_every_predictor_documents_tie_break_and_cost():
    import importlib

    for name in STREAM_PREDICTORS:
        doc = importlib.import_module(PREDICTORS.get(name).__module__).__doc__ or ""
        assert "Tie-break" in doc and "Cost" in doc, name


# -- splits and the recall replay --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["alternate", "head", "stream"])
def test_split_never_overlaps(mode):
    rng = np.random.default_rng(5)
    t = make_trace([rng.integers(0, 4, (n, 2, 1)) for n in (3, 5, 2, 7, 4)], 4, 1)
    fit, score = split(t, mode)
    assert len(fit) + len(score) == len(t) and len(fit) and len(score)
    assert not set(np.unique(fit.seq)) & set(np.unique(score.seq))
    mask = split_mask(t, mode)
    np.testing.assert_array_equal(fit.ids, t.ids[mask])
    np.testing.assert_array_equal(score.ids, t.ids[~mask])
    if mode == "alternate":
        assert list(np.unique(fit.seq)) == [0, 2, 4]


def test_split_refuses_an_empty_side():
    t = make_trace([col(0, 1, 2)], 4, 1)
    with pytest.raises(ConfigError, match="stream"):
        split(t, "alternate")
    fit, score = split(t, "stream")  # one stream cut in two: the scored half gets a new sequence id
    assert len(fit) == 2 and len(score) == 1 and set(fit.seq) != set(score.seq)


class _Fixed(Predictor):
    """Always predicts the same probabilities (for hand-checking the scorer)."""

    name = "fixed"

    def __init__(self, p):
        super().__init__(2, 4, 1)
        self.p = np.asarray(p, float)
        self.calls = []

    def observe(self, layer, experts, hidden=None):
        self.calls.append(("observe", layer, np.asarray(experts).copy()))
        self.rows = len(experts)

    def predict(self, layer, depth):
        return np.tile(self.p, (self.rows, 1))


def test_replay_recall_hand_worked():
    # ranking 2 > 0 > 1 = 3 (tie: lowest id first, so the order is 2, 0, 1, 3)
    fixed = _Fixed([0.3, 0.1, 0.5, 0.1])
    toks = np.array([[[2], [0]], [[1], [-1]], [[3], [2]]])  # token 1's layer-1 record is missing
    t = make_trace([toks], 4, 1)
    d1, d2 = measure_recall(fixed, t, (1, 2), set_sizes=(1, 2, 3))
    # depth 1 targets: t0L1=0, t1L0=1, t1L1=missing (skipped), t2L0=3, t2L1=2 ; t2L1 -> past the end
    assert d1.targets == 4 and d1.selected == 4
    assert d1.hits == {1: 1, 2: 2, 3: 3}  # 2 in top-1; 0 in top-2; 1 in top-3; 3 never
    assert d1.recall(1) == 0.25 and d1.precision(2) == 2 / 8
    # within the token: t0L1=0 (miss), t2L1=2 (hit); next token: t1L0=1, t2L0=3 (both missed at top-1)
    assert d1.by_offset == {0: [2, 1], 1: [2, 0]} and d1.recall_at_offset(0) == 0.5
    # depth 2 targets: t0L0 -> t1L0=1, t0L1 -> t1L1 missing, t1L0 -> t2L0=3, t1L1 -> t2L1=2
    assert d2.targets == 3 and d2.hits == {1: 1, 2: 1, 3: 2}
    # the predictor saw every record in order, missing ones included as -1
    assert [c[1] for c in fixed.calls] == [0, 1] * 3


def test_replay_packs_rows_without_changing_results():
    rng = np.random.default_rng(6)
    t = make_trace([rng.integers(0, 6, (n, 3, 2)) for n in (9, 4, 7, 1, 6)], 6, 2)
    t = Trace(t.meta, RoutingBlock.build(np.sort(t.ids, axis=2), seq=t.seq, pos=t.pos))
    one = measure_recall(PREDICTORS.get("temporal")(3, 6, 2), t, (1, 2), rows=1)
    many = measure_recall(PREDICTORS.get("temporal")(3, 6, 2), t, (1, 2), rows=64)
    for a, b in zip(one, many):
        assert (a.targets, a.selected, a.hits) == (b.targets, b.selected, b.hits)


def test_replay_checks_its_inputs():
    t = make_trace([col(0, 1)], 4, 1)
    with pytest.raises(ConfigError, match="built for"):
        measure_recall(PREDICTORS.get("temporal")(2, 4, 1), t)
    with pytest.raises(ConfigError, match="hidden"):
        measure_recall(PREDICTORS.get("gate_lookahead")(1, 4, 1), t)


def test_evaluate_fits_on_one_part_and_scores_the_other():
    rng = np.random.default_rng(7)
    t = make_trace([rng.integers(0, 4, (5, 2, 1)) for _ in range(4)], 4, 1)
    seen = []

    class Spy(type(PREDICTORS.get("prior")(2, 4, 1))):
        def fit(self, trace):
            seen.append(set(np.unique(trace.seq)))
            return super().fit(trace)

    rows = evaluate([Spy(2, 4, 1)], t, (1,))
    assert seen == [{0, 2}] and isinstance(rows[0], RecallRow)
    assert rows[0].targets == 2 * (5 * 2 - 1)  # sequences 1 and 3: every target but the last


# -- the trained model in ../shared --------------------------------------------------------------

def test_gate_lookahead_beats_the_prior_on_the_trained_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    text = (tiny_model_dir / "heldout_sample.txt").read_bytes()[:2048]
    blocks, hid = [], []
    for s in range(4):
        ids, h = capture(model, list(text[s * 512:(s + 1) * 512]))
        blocks.append(RoutingBlock.build(ids, seq=s, pos=np.arange(len(ids))))
        hid.append(h)
    meta = TraceMeta(num_experts=32, top_k=4, moe_layers=list(range(6)), model="qwen3moe-tiny-code")
    trace, hidden = Trace(meta, RoutingBlock.concat(blocks)), np.concatenate(hid)
    gate = evaluate([GateLookaheadPredictor.from_model(model)], trace, (1,), hidden=hidden)[0]
    prior = evaluate([PREDICTORS.get("prior")(6, 32, 4)], trace, (1,))[0]
    assert gate.targets == prior.targets > 1000
    assert gate.recall() > prior.recall() + 0.1, (gate.recall(), prior.recall())


def test_transition_product_single_row_fast_path_is_the_masked_fold():
    """The one-row path (batch-1 decode) returns exactly what the row-masked fold returns for that row."""
    from moecache.predictors.transition import _observed, _product

    def masked(hot, cond, prior_t):
        w = np.tile(prior_t, (hot.shape[0], 1))
        for e in _observed(hot):
            w *= np.where(hot[:, e:e + 1] > 0, (cond[e] / prior_t)[None, :], 1.0)
        total = w.sum(axis=1, keepdims=True)
        ok = (total > 0) & np.isfinite(total)
        return np.where(ok, w / np.where(ok, total, 1.0), prior_t[None, :])

    rng = np.random.default_rng(0)
    for _ in range(300):
        E = int(rng.integers(2, 70))
        cond = rng.random((E, E)) + 1e-3
        cond /= cond.sum(axis=1, keepdims=True)
        prior = rng.random(E) + 1e-3
        prior /= prior.sum()
        hot = np.zeros((1, E))
        hot[0, rng.choice(E, size=int(rng.integers(0, min(E, 8) + 1)), replace=False)] = 1
        assert np.array_equal(_product(hot, cond, prior), masked(hot, cond, prior))
    # a product that underflows to 0 falls back to the prior, as the masked fold does
    E = 4
    cond = np.full((E, E), 1e-300)
    hot = np.ones((1, E))
    prior = np.full(E, 0.25)
    assert np.array_equal(_product(hot, cond, prior), masked(hot, cond, prior))


@pytest.mark.parametrize("combine", ["product", "mean"])
def test_transition_batched_rows_equal_each_row_alone(combine):
    """A row's probabilities do not depend on the batch around it: every row of a batched fold equals, bit for
    bit, the same row folded alone (the one-row path), as the C++ simulator core computes them (numpy sums a row
    pairwise only where the row is contiguous in memory, so the fold's array must be C-ordered)."""
    from moecache.predictors.transition import COMBINE

    fold = COMBINE.get(combine)
    rng = np.random.default_rng(1)
    for _ in range(200):
        E = int(rng.integers(8, 70))  # pairwise summation differs from a sequential one from 8 terms on
        rows = int(rng.integers(2, 7))
        cond = rng.random((E, E)) + 1e-3
        cond /= cond.sum(axis=1, keepdims=True)
        prior = rng.random(E) + 1e-3
        prior /= prior.sum()
        hot = np.zeros((rows, E))
        for r in range(rows):
            hot[r, rng.choice(E, size=int(rng.integers(1, min(E, 6) + 1)), replace=False)] = 1
        batched = fold(hot, cond, prior)
        assert batched.flags.c_contiguous
        for r in range(rows):
            assert np.array_equal(batched[r], fold(hot[r:r + 1], cond, prior)[0]), (E, rows, r)


# -- hidden_state: a learned network on the residual stream ----------------------------------------

def test_hidden_state_learns_the_next_router_and_refuses_traces_without_hidden(tiny_moe, tiny_routing):
    from moecache.predict_eval import measure_recall

    trace, hidden = tiny_routing
    fit_mask = split_mask(trace, "alternate")
    fit, score = trace.select(fit_mask), trace.select(~fit_mask)
    with pytest.raises(ConfigError, match="hidden_states=True"):
        PREDICTORS.get("hidden_state")(3, 8, 2).fit(fit)
    pred = PREDICTORS.get("hidden_state")(3, 8, 2, epochs=30, hidden_units=64, lr=1e-2).fit(
        fit.with_hidden(hidden[fit_mask]))
    prior = PREDICTORS.get("prior")(3, 8, 2).fit(fit)
    got = {r.depth: r for r in measure_recall(pred, score, (1, 2), hidden=hidden[~fit_mask])}
    base = {r.depth: r for r in measure_recall(prior, score, (1, 2))}
    # the next layer's routing is a function of this hidden state (plus attention): far above the prior
    assert got[1].recall_at_offset(0) > base[1].recall_at_offset(0) + 0.15
    with pytest.raises(ConfigError, match="fitted up to depth 2"):
        pred.predict(0, 3)
    pred.reset()
    pred.observe(0, trace.ids[:1, 0], None)  # no hidden state: the target layer's prior
    np.testing.assert_allclose(pred.predict(0, 1)[0], pred.normalise(pred.prior[1][None])[0])
    with pytest.raises(ConfigError, match="expected \\(1, 32\\)"):
        pred.reset()
        pred.observe(0, trace.ids[:1, 0], np.zeros((1, 5)))


def _synthetic_hidden_trace(seqs: int = 8, tokens: int = 40, L: int = 3, E: int = 8, k: int = 2, H: int = 12, seed: int = 0):
    """Routing made from hidden states: layer l's router reads a random walk through ``H`` dims, so the
    next layer's (and the next token's) experts follow from what the predictor sees."""
    rng = np.random.default_rng(seed)
    routers = rng.normal(size=(L, H, E))
    ids, hid, blocks = [], [], []
    for s in range(seqs):
        h = np.zeros((tokens, L, H), np.float32)
        state = rng.normal(size=H)
        for t in range(tokens):
            for l in range(L):
                state = 0.85 * state + 0.5 * rng.normal(size=H)
                h[t, l] = state
        i = np.argsort(-np.einsum("tlh,lhe->tle", h, routers), axis=2, kind="stable")[:, :, :k]
        blocks.append(RoutingBlock.build(i, seq=s, pos=np.arange(tokens)))
        hid.append(h)
    meta = TraceMeta(num_experts=E, top_k=k, moe_layers=list(range(L)), model="synthetic")
    return Trace(meta, RoutingBlock.concat(blocks)).with_hidden(np.concatenate(hid))


def _hidden_state_reference(pred, ids: np.ndarray, hid: np.ndarray, layer: int, depth: int, t: int) -> np.ndarray:
    """``hidden_state``'s prediction for one request (``ids (tokens, L, k)``, ``hid (tokens, L, H)``) at
    token ``t``, layer ``layer``, recomputed from its documented formula and weight layout (no online state)."""
    L, E, D, U = pred.num_layers, pred.num_experts, pred.max_depth, pred.hidden_units
    d = depth - 1
    target, offset = (layer + depth) % L, (layer + depth) // L
    x = np.concatenate([hid[t, layer], multi_hot(ids[t, layer], E)]).astype(np.float32)
    z = x @ pred.w_fused[layer][:, d * U:(d + 1) * U] + pred.b1[d, layer]
    src = t if offset else t - 1  # the most recent observation at the target layer
    if src >= 0:
        y = np.concatenate([hid[src, target], multi_hot(ids[src, target], E)]).astype(np.float32)
        z = z + (y @ pred.w_fused[target][:, (D + d) * U:(D + d + 1) * U] + pred.by[d, layer])
    logits = np.maximum(z, 0.0) @ pred.w2[d, layer] + pred.b2[d, layer]
    if pred.linear_skip:  # the linear skip: its columns follow the perceptrons' in the fused matrix
        c = 2 * D * U
        logits = logits + x @ pred.w_fused[layer][:, c + d * E:c + (d + 1) * E]
        if src >= 0:
            logits = logits + y @ pred.w_fused[target][:, c + (D + d) * E:c + (D + d + 1) * E] + pred.b2y[d, layer]
    else:
        assert pred.w_fused.shape[2] == 2 * D * U and pred.b2y is None
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


@pytest.mark.parametrize("linear_skip", [True, False])
def test_hidden_state_fast_path_matches_formula_and_batches(tmp_path, linear_skip):
    """On a synthetic trace: recall far above the prior; the online state (own part, the stored part of the
    target layer) gives the documented formula, with and without the linear skip; batch 1 equals each row
    of a batched call bit for bit; a saved and loaded predictor says exactly the same."""
    trace = _synthetic_hidden_trace()
    fit_mask = trace.seq < 6
    fit, score = trace.select(fit_mask), trace.select(~fit_mask)
    pred = PREDICTORS.get("hidden_state")(3, 8, 2, epochs=40, hidden_units=32, lr=1e-2,
                                          linear_skip=linear_skip).fit(fit)
    prior = PREDICTORS.get("prior")(3, 8, 2).fit(fit)
    got = {r.depth: r for r in measure_recall(pred, score, (1, 2), hidden=np.asarray(score.hidden, np.float32))}
    base = {r.depth: r for r in measure_recall(prior, score, (1, 2))}
    assert got[1].recall() > base[1].recall() + 0.2 and got[1].recall_at_offset(1) > base[1].recall_at_offset(1) + 0.1
    # the formula, token by token, for one request; and two requests side by side give the same bits per row
    reqs = [np.flatnonzero(score.seq == s) for s in np.unique(score.seq)]
    ids = [np.asarray(score.ids)[r] for r in reqs]
    hid = [np.asarray(score.hidden, np.float32)[r] for r in reqs]
    pred.save(tmp_path / "hs")
    back = Predictor.load(tmp_path / "hs")
    single, batched, loaded = (pred, pred, back)
    outs = {}
    for name, p, rows in (("single", single, [0]), ("batched", batched, [1, 0]), ("loaded", loaded, [0])):
        p.reset()
        out = []
        for t in range(ids[0].shape[0]):
            for l in range(3):
                p.observe(l, np.stack([ids[r][t, l] for r in rows]), np.stack([hid[r][t, l] for r in rows]))
                out.append(np.stack([p.predict(l, d) for d in (1, 2)]))
        outs[name] = np.stack(out)  # (steps, depths, rows, E)
    np.testing.assert_array_equal(outs["batched"][:, :, 1], outs["single"][:, :, 0])
    np.testing.assert_array_equal(outs["loaded"], outs["single"])
    for step in range(0, outs["single"].shape[0], 7):
        t, l = divmod(step, 3)
        for d in (1, 2):
            ref = pred.normalise(_hidden_state_reference(pred, ids[0], hid[0], l, d, t)[None])[0]
            np.testing.assert_allclose(outs["single"][step, d - 1, 0], ref, rtol=1e-5, atol=1e-6)


def test_hidden_state_skip_option_and_saves_from_before_it(tmp_path):
    """``linear_skip`` must be a bool (one-line error before anything is built); the skip is learned (its
    columns are not zero); a save from before the skip (no ``linear_skip`` param, no ``b2y``) loads as
    ``linear_skip=False`` and predicts exactly as before."""
    import json

    with pytest.raises(ConfigError, match="linear_skip must be True or False"):
        PREDICTORS.get("hidden_state")(3, 8, 2, linear_skip="yes")
    fit = _synthetic_hidden_trace(seqs=4, tokens=20)
    skip = PREDICTORS.get("hidden_state")(3, 8, 2, epochs=3, hidden_units=8).fit(fit)
    D, U = skip.max_depth, skip.hidden_units
    assert skip.params["linear_skip"] and skip.w_fused.shape[2] == 2 * D * (U + 8)
    assert np.abs(skip.w_fused[:, :, 2 * D * U:]).max() > 0 and np.abs(skip.b2y).max() > 0
    old = PREDICTORS.get("hidden_state")(3, 8, 2, epochs=3, hidden_units=8, linear_skip=False).fit(fit)
    old.save(tmp_path / "old")
    head = json.loads((tmp_path / "old" / "predictor.json").read_text())
    del head["params"]["linear_skip"]  # as an older moecache wrote it
    (tmp_path / "old" / "predictor.json").write_text(json.dumps(head))
    back = Predictor.load(tmp_path / "old")
    assert back.linear_skip is False and back.params["linear_skip"] is False and back.b2y is None
    ids, hid = np.asarray(fit.ids), np.asarray(fit.hidden, np.float32)
    for p in (old, back):
        p.reset()
    for t in range(5):
        for l in range(3):
            for p in (old, back):
                p.observe(l, ids[t, l][None], hid[t, l][None])
            for d in (1, 2):
                np.testing.assert_array_equal(back.predict(l, d), old.predict(l, d))


def test_hidden_state_reads_torch_tensors_without_torch_ops():
    """bfloat16 / float16 / float32 CPU tensors (strided too, as the runtime's last-position view) give the
    float32 values numpy would; the bfloat16 path widens the bits in numpy."""
    torch = pytest.importorskip("torch")
    from moecache.predictors.hidden_state import host_float32

    x = torch.randn(3, 5, 16) * 7
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = x.to(dtype)[:, -1]  # strided
        got = host_float32(t)
        assert got.dtype == np.float32 and got.shape == (3, 16)
        np.testing.assert_array_equal(got, t.float().numpy())


# -- learned: the gather-and-sum scoring against the dense product --------------------------------

#: Absolute tolerance of the gathered scores against the dense product's: both sum the same at most
#: ``(window + 1) * top_k`` coefficients of magnitude ~1 per expert, in different orders.
GATHER_ATOL = 1e-12


@pytest.mark.parametrize("model,window,rows", [("ridge", 1, 1), ("ridge", 3, 1), ("ridge", 3, 3), ("ridge", 9, 2),
                                               ("logistic", 2, 1), ("logistic", 2, 3)])
def test_learned_gather_equals_dense_product(model, window, rows):
    from moecache.predictors.learned import DenseLearnedPredictor

    rng = np.random.default_rng(window * 10 + rows)
    L, E, k = 4, 7, 2
    seqs = [np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(12)])
            for _ in range(16)]
    fast = PREDICTORS.get("learned")(L, E, k, window=window, max_depth=3, model=model, C=0.5)
    fast.fit(make_trace(seqs, E, k))
    # a fit that is not degenerate: large, mixed-sign coefficients make rounding differences visible if any
    assert np.abs(fast.coef).max() > 0.05
    ref = DenseLearnedPredictor.from_fitted(fast)
    worst = 0.0
    for p in (fast, ref):
        p.reset()
    for tok in range(6):
        for l in range(L):
            ids = np.stack([rng.choice(E, k, replace=False) for _ in range(rows)])
            if tok == 2:
                ids[0, 0] = -1  # a missing record: no feature
            if tok == 3:
                ids[-1, 1] = ids[-1, 0]  # an id listed twice counts once
            if tok == 4:
                ids = ids[:, ::-1].copy()  # the router's order does not matter
            for p in (fast, ref):
                p.observe(l, ids)
            for d in (1, 2, 3):
                t, o = fast.target(l, d)
                got, want = fast._scores(l, t, o, d), ref._scores(l, t, o, d)
                assert got.shape == want.shape == (rows, E)
                worst = max(worst, float(np.abs(got - want).max()))
                np.testing.assert_allclose(fast.predict(l, d), ref.predict(l, d), rtol=0, atol=1e-11)
                # the same ranking wherever two dense scores differ by more than the tolerance
                z = want[:, :, None] - want[:, None, :]
                zg = got[:, :, None] - got[:, None, :]
                clear = np.abs(z) > 2 * GATHER_ATOL
                assert (np.sign(z[clear]) == np.sign(zg[clear])).all()
    assert worst <= GATHER_ATOL


def test_learned_gather_rejects_bad_ids_and_stale_tables(tmp_path):
    rng = np.random.default_rng(5)
    L, E, k = 3, 5, 1
    seqs = [rng.integers(0, E, (10, L, k)) for _ in range(10)]
    p = PREDICTORS.get("learned")(L, E, k, window=2).fit(make_trace(seqs, E, k))
    p.reset()
    with pytest.raises(ConfigError, match="out of range for 5 experts"):
        p.observe(0, np.array([[5]]))
    p.observe(0, np.array([[1]]))
    before = p.predict(0, 1)
    # refitting on other routing replaces the gather tables built from the old coefficients
    p.fit(make_trace([rng.integers(0, E, (10, L, k)) for _ in range(10)], E, k))
    p.reset()
    p.observe(0, np.array([[1]]))
    from moecache.predictors.learned import DenseLearnedPredictor

    ref = DenseLearnedPredictor.from_fitted(p)
    ref.reset()
    ref.observe(0, np.array([[1]]))
    np.testing.assert_allclose(p.predict(0, 1), ref.predict(0, 1), atol=1e-11)
    assert not np.allclose(p.predict(0, 1), before)
    # loading coefficients saved with another window is refused in one line, before anything changes
    p.save(tmp_path / "w2")
    other = PREDICTORS.get("learned")(L, E, k, window=1)
    with np.load(tmp_path / "w2" / "state.npz") as z:
        arrays = {n: z[n] for n in z.files}
    with pytest.raises(ConfigError, match="load it with the parameters"):
        other.load_state(arrays)
    assert (other.coef == 0).all()


def _noisy_copy_trace(rng, seqs, tokens=30, E=5, keep=0.7):
    """3 layers, top-1: layer 1 repeats layer 0's expert with probability ``keep``, else a random one; layer 2
    follows layer 1 the same way."""
    out = []
    for _ in range(seqs):
        ids = np.zeros((tokens, 3, 1), np.int64)
        ids[:, 0, 0] = rng.integers(0, E, tokens)
        for l in (1, 2):
            copy = rng.random(tokens) < keep
            ids[:, l, 0] = np.where(copy, ids[:, l - 1, 0], rng.integers(0, E, tokens))
        out.append(ids)
    return make_trace(out, E, 1)


def test_learned_isotonic_calibration_matches_held_out_frequency():
    from moecache.predictors.learned import DenseLearnedPredictor

    rng = np.random.default_rng(11)
    head, tail = _noisy_copy_trace(rng, 30), _noisy_copy_trace(rng, 10)
    p = PREDICTORS.get("learned")(3, 5, 1, window=1, max_depth=2, calibrate="isotonic")
    p._fit_models(head)
    p._fit_calibration(tail)
    assert p.calib_x.shape == p.calib_y.shape and p.calib_x.shape[0] == 2
    assert (np.diff(p.calib_x, axis=1) >= 0).all() and (np.diff(p.calib_y, axis=1) >= 0).all()
    assert (p.calib_y >= 0).all() and (p.calib_y <= 1).all()
    # isotonic regression keeps the mean: the calibrated scores of the held-out samples average to the frequency
    for d in (1, 2):
        z, y = [], []
        for dd, l, X, Y in p._design(tail):
            if dd == d:
                z.append(p._calibrated(p._link(X @ p.coef[d - 1, l].T + p.intercept[d - 1, l]), d).ravel())
                y.append(Y.ravel())
        assert abs(np.concatenate(z).mean() - np.concatenate(y).mean()) < 1e-9
    # the full fit: gather and dense reference agree through the map, save/load keeps it
    full = PREDICTORS.get("learned")(3, 5, 1, window=1, max_depth=2, calibrate="isotonic").fit(head)
    ref = DenseLearnedPredictor.from_fitted(full)
    for q in (full, ref):
        q.reset()
        q.observe(0, np.array([[2]]))
    np.testing.assert_allclose(full.predict(0, 1), ref.predict(0, 1), atol=1e-11)
    # a strong rule is sharpened: the repeated expert's calibrated probability is above the ridge score's
    raw = PREDICTORS.get("learned")(3, 5, 1, window=1, max_depth=2).fit(head)
    raw.reset()
    raw.observe(0, np.array([[2]]))
    assert full.predict(0, 1)[0, 2] > raw.predict(0, 1)[0, 2]


def test_learned_calibration_errors(tmp_path):
    rng = np.random.default_rng(12)
    with pytest.raises(ConfigError, match="calibrate must be one of"):
        PREDICTORS.get("learned")(3, 5, 1, calibrate="platt")
    with pytest.raises(ConfigError, match="calibrate_share must be strictly between 0 and 1"):
        PREDICTORS.get("learned")(3, 5, 1, calibrate="isotonic", calibrate_share=1.0)
    one = _noisy_copy_trace(rng, 1)
    p = PREDICTORS.get("learned")(3, 5, 1, calibrate="isotonic")
    with pytest.raises(ConfigError, match="the trace has 1; fit on a trace with 2 or more sequences"):
        p.fit(one)
    assert not p.fitted and (p.coef == 0).all()  # refused before anything was fitted
    # a state saved without a map does not load as a calibrated predictor
    plain = PREDICTORS.get("learned")(3, 5, 1).fit(_noisy_copy_trace(rng, 5))
    plain.save(tmp_path / "plain")
    with np.load(tmp_path / "plain" / "state.npz") as z:
        arrays = {n: z[n] for n in z.files}
    with pytest.raises(ConfigError, match="no calibration map"):
        PREDICTORS.get("learned")(3, 5, 1, calibrate="isotonic").load_state(arrays)
