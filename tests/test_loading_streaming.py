"""``moecache.from_pretrained`` with compressed experts streams the checkpoint: each expert is read, encoded into the
host store and dropped before the next, so host memory never holds the experts in bf16 all at once; and a budget
that cannot work is refused before any weight is read."""

from __future__ import annotations

import ctypes
import gc
import ctypes.util

import pytest
import torch

from moecache.errors import ConfigError
from moecache.loading import from_pretrained
from moecache.quant import ExpertCodec

from .tiny_models import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """Bytes this process holds from malloc right now (torch's CPU tensors included): glibc's ``mallinfo2``, in
    use in the arenas plus mmapped chunks. Unlike resident size, it counts live allocations only (no page cache,
    no freed memory kept by the allocator), so it does not depend on what else runs on the machine."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return lambda: (lambda m: m.uordblks + m.hblkhd)(fn())


LAYERS, HIDDEN, INTER = 3, 128, 256


def _checkpoint(path):
    """A Mixtral checkpoint in the Hub's per-expert layout whose experts dominate its bytes."""
    src = tiny_model("mixtral", num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_attention_heads=4, num_key_value_heads=2).to(torch.bfloat16)
    src.save_pretrained(path, max_shard_size="400KB")
    return src


def test_compressed_loading_never_holds_the_bf16_experts_at_once(tmp_path, monkeypatch):
    in_use = _malloc_in_use()
    if in_use is None:
        pytest.skip("glibc mallinfo2 is not available here")
    _checkpoint(tmp_path)
    # Once first, so that lazy imports and one-time buffers are not counted; its model is freed before the baseline.
    from_pretrained(tmp_path, cache_slots=4, device="cpu", engine="sync", expert_dtype="int8", group_size=32)
    gc.collect()
    layer_bf16 = 8 * 3 * HIDDEN * INTER * 2
    live = []
    encode = ExpertCodec.encode_kind

    def watched(self, rows, name, value, *a, **kw):
        live.append(in_use())  # before this expert is encoded: whatever the loader holds now
        return encode(self, rows, name, value, *a, **kw)

    monkeypatch.setattr(ExpertCodec, "encode_kind", watched)
    base = in_use()
    m = from_pretrained(tmp_path, cache_slots=4, device="cpu", engine="sync", expert_dtype="int8", group_size=32)
    assert len(live) == LAYERS * 8 * 2  # gate_up (w1 and w3 merged) and down, one expert at a time
    store = m.moecache.runtime.store
    # Held beyond the baseline at any encode: the store so far, the non-expert weights, one expert being
    # converted, and Python objects. All bf16 experts at once would be LAYERS layers' worth (4x this bound).
    extra = max(v - base for v in live) - store.nbytes
    assert extra < layer_bf16, (extra, layer_bf16)
    # The bound can fail: the same loader with every expert tensor kept alive goes over it.
    from moecache import tensorfile

    kept = []
    get = tensorfile.TensorFile.get_tensor

    def keep(self, key):
        t = get(self, key)
        if ".experts." in key:
            kept.append(t)
        return t

    monkeypatch.setattr(tensorfile.TensorFile, "get_tensor", keep)
    live.clear()
    del m
    gc.collect()
    base = in_use()
    m = from_pretrained(tmp_path, cache_slots=4, device="cpu", engine="sync", expert_dtype="int8", group_size=32)
    assert max(v - base for v in live) - m.moecache.runtime.store.nbytes > 2 * layer_bf16


def test_a_budget_that_cannot_work_is_refused_before_reading(tmp_path, monkeypatch):
    _checkpoint(tmp_path)
    from moecache import tensorfile

    def no_reading(self, *a, **kw):
        raise AssertionError("a weight was read before the budget was checked")

    monkeypatch.setattr(tensorfile.TensorFile, "get_tensor", no_reading)
    monkeypatch.setattr(tensorfile.TensorFile, "get_row", no_reading)
    with pytest.raises(ConfigError, match="dense scratch of 8 experts.*scratch_experts="):
        from_pretrained(tmp_path, gpu_memory="300KiB", device="cpu", expert_dtype="int4", group_size=32)
    with pytest.raises(ConfigError, match="policy"):
        from_pretrained(tmp_path, cache_slots=4, device="cpu", expert_dtype="int4", group_size=32,
                        policy="no-such-policy")
    with pytest.raises(ConfigError, match="must be fitted"):  # a model-reading predictor by name, unfitted
        from_pretrained(tmp_path, cache_slots=4, device="cpu", predictor="hidden_state")


# -- the per-miss precision rule's low copy, encoded while reading --------------------------------------------

@pytest.mark.parametrize("family,shard,below", [("qwen3_moe", None, 0.9), ("mixtral", "30KB", 0.9),
                                                ("qwen3_moe", "20KB", 100.0)])
def test_from_pretrained_low_precision_misses_equals_offload(tmp_path, family, shard, below):
    """The low copy that from_pretrained encodes while reading equals the one offload packs from a loaded model:
    same tokens, same logits, same low copies, same host bytes."""
    from moecache.runtime.offload import offload

    kw = {"moe_intermediate_size": 32} if family == "qwen3_moe" else {"intermediate_size": 64}
    src = tiny_model(family, **kw).to(torch.bfloat16)
    src.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    rule = dict(low_precision_misses="int4", group_size=32, low_precision_below=below)
    x = torch.tensor([[5, 17, 33, 8, 61, 12]])

    def run(m):
        out = m.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
        return out.sequences, torch.stack(out.logits), m.moecache.stats()

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # the same checkpoint, loaded whole
    offload(ref, cache_slots=5, device="cpu", engine="sync", **rule)
    want_tokens, want_logits, want = run(ref)
    m = from_pretrained(tmp_path, cache_slots=5, device="cpu", engine="sync", **rule)
    got_tokens, got_logits, got = run(m)
    assert want["low_copies"] > 0 and want["misses"] > 0
    assert torch.equal(got_tokens, want_tokens)
    assert torch.equal(got_logits, want_logits)
    for key in ("low_copies", "upgrades", "misses", "bytes_copied"):
        assert got[key] == want[key], key
    assert got["config"]["low_copy_host_bytes"] == want["config"]["low_copy_host_bytes"] > 0
    assert got["config"]["low_precision_misses"] == want["config"]["low_precision_misses"]
    low_a, low_b = m.moecache.runtime.low.store, ref.moecache.runtime.low.store
    assert all(torch.equal(a, b) for a, b in zip(low_a.blocks, low_b.blocks))
    m.moecache.remove()


def test_from_pretrained_low_precision_bad_input_before_reading(tmp_path, monkeypatch):
    _checkpoint(tmp_path)
    from moecache import tensorfile

    def no_reading(self, *a, **kw):
        raise AssertionError("a weight was read before the arguments were checked")

    monkeypatch.setattr(tensorfile.TensorFile, "get_tensor", no_reading)
    monkeypatch.setattr(tensorfile.TensorFile, "get_row", no_reading)
    for kwargs, words in [(dict(low_precision_misses="int2"), "low_precision_misses"),
                          (dict(low_precision_misses="int4", expert_dtype="int8"), "already"),
                          (dict(low_precision_misses="int4", group_size=48), "group_size"),
                          (dict(low_precision_misses="int4", hybrid="cpu"), "hybrid"),
                          (dict(low_precision_misses="int4", low_precision_below=0), "low_precision_below")]:
        with pytest.raises(ConfigError, match=words):
            from_pretrained(tmp_path, cache_slots=4, device="cpu", **kwargs)
