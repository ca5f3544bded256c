"""``offload(..., compile=True)`` on CUDA: inductor pieces captured as CUDA graphs (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moecache.runtime import offload

from .tiny_models import tiny_model

pytestmark = pytest.mark.gpu
PROMPT = [[5, 6, 7, 8, 9, 10, 11]]
#: bf16: max |logit difference| between the compiled and the eager offloaded model while their tokens agree.
BF16_LOGIT_TOL = 5e-2


def _gen(m, n: int, prompt=PROMPT, logits: bool = False):
    x = torch.tensor(prompt, device="cuda")
    with torch.no_grad():
        return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x),
                          return_dict_in_generate=True, output_logits=logits, pad_token_id=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_graphs_fp32_tokens_equal_and_no_recompile(family):
    m = tiny_model(family, max_position_embeddings=512).cuda()
    h = offload(m, cache_slots=5, device="cuda")
    ref = _gen(m, 64).sequences
    h.remove()
    h = offload(m, cache_slots=5, device="cuda", compile=True, max_cache_len=128)
    _gen(m, 3)  # compile, warm up, capture
    before = int(counters["stats"]["unique_graphs"])
    out = _gen(m, 64).sequences
    s = h.stats()
    h.remove()
    c = s["compile"]
    assert torch.equal(out, ref)
    assert int(counters["stats"]["unique_graphs"]) == before
    L = h.config["moe_layers"]
    # The warm-up's first decode call runs the compiled pieces; its second captures each piece once.
    assert c["pieces"] == L + 1 and c["captures"] == L + 1 and c["recaptures"] == 0
    assert c["ungraphed"] == L + 1 and c["replays"] == (1 + 63) * (L + 1)
    assert s["kv_cache_allocated_bytes"] == h.config["kv_cache_bytes"]


def test_bf16_logits_within_tolerance():
    m = tiny_model("qwen3_moe").to(torch.bfloat16).cuda()
    h = offload(m, cache_slots=5, device="cuda")
    ref = _gen(m, 16, logits=True)
    h.remove()
    h = offload(m, cache_slots=5, device="cuda", compile=True, max_cache_len=64)
    out = _gen(m, 16, logits=True)
    h.remove()
    agree = 0
    for a, b, ta, tb in zip(out.logits, ref.logits, out.sequences[0, 7:], ref.sequences[0, 7:]):
        assert float((a.float() - b.float()).abs().max()) <= BF16_LOGIT_TOL
        agree += 1
        if int(ta) != int(tb):
            break
    assert agree >= 4


def test_prefetch_hybrid_and_streaming_prefill_under_graphs():
    m = tiny_model("qwen3_moe").cuda()
    prompt = [list(range(3, 40))]
    results = []
    for compile_ in (False, True):
        kw = dict(compile=True, max_cache_len=64) if compile_ else {}
        h = offload(m, cache_slots=6, device="cuda", predictor="temporal", prefetch_depth=2, hybrid="cpu",
                    stream_prefill=16, **kw)
        out = _gen(m, 12, prompt=prompt).sequences
        results.append((out, h.stats()))
        h.remove()
    (ref, a), (out, b) = results
    assert torch.equal(out, ref)
    assert b["prefill_streamed"] > 0 and b["prefetch_issued"] > 0
    assert b["compile"]["replays"] > 0
