"""``moecache.from_pretrained``: saved tiny checkpoints (sharded or not, per-expert or stacked keys) and
the trained model at 25% of its experts, against plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from moecache.errors import ConfigError
from moecache.loading import checkpoint_files, from_pretrained

from .tiny_models import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _tokens(m, n=8):
    x = torch.tensor([[5, 6, 7, 8, 9]])
    return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("family,shard", [("qwen3_moe", "20KB"), ("mixtral", "30KB"), ("gpt_oss", None),
                                          ("deepseek_v2", "25KB"), ("qwen2_moe", None)])
def test_round_trip_same_tokens_as_a_plain_load(tmp_path, family, shard):
    src = tiny_model(family)
    kwargs = {"max_shard_size": shard} if shard else {}
    src.save_pretrained(tmp_path, **kwargs)
    files = checkpoint_files(str(tmp_path))
    assert (len(files) > 1) == (shard is not None)
    keys = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"] if shard else {}
    if shard:  # the Hub's per-expert layout, converted by transformers' rules on the way in
        assert any(".experts.0." in k for k in keys)
    ref = _tokens(_plain(tmp_path))
    m = from_pretrained(tmp_path, cache_slots=4, device="cpu")
    h = m.moecache
    assert h.runtime.pool.num_slots == 4
    assert not any(p.device.type == "meta" for p in m.parameters())
    assert torch.equal(_tokens(m), ref)
    h.remove()  # restores the experts (on the CPU: they were never anywhere else)
    assert torch.equal(_tokens(m), ref)


def test_stacked_expert_keys_are_read_one_expert_at_a_time(tmp_path):
    from safetensors.torch import save_file

    src = tiny_model("olmoe")
    src.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    m = from_pretrained(tmp_path, cache_slots=3, device="cpu")
    assert torch.equal(_tokens(m), _tokens(src))
    m.moecache.remove()


def test_missing_checkpoint_and_missing_experts_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        from_pretrained(tmp_path / "nope", cache_slots=4)
    src = tiny_model("qwen3_moe")
    src.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        from_pretrained(tmp_path, cache_slots=4, device="cpu")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in src.state_dict().items() if "layers.1.mlp.experts.down_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"lacks expert weights: model\.layers\.1\.mlp\.experts\.down_proj"):
        from_pretrained(tmp_path, cache_slots=4, device="cpu")


def test_trained_model_same_text_at_25_percent(tiny_model_dir):
    text = (tiny_model_dir / "heldout_sample.txt").read_text()[:192]
    x = torch.tensor([list(text.encode("ascii"))])
    plain = _plain(tiny_model_dir).float()
    ref = plain.generate(x, max_new_tokens=32, do_sample=False)
    m = from_pretrained(tiny_model_dir, cache_slots=48, device="cpu", dtype=torch.float32)  # 48 of 6 x 32
    out = m.generate(x, max_new_tokens=32, do_sample=False)
    s = m.moecache.stats()
    m.moecache.remove()
    assert bytes(out[0, x.shape[1]:].tolist()).decode("ascii") == bytes(ref[0, x.shape[1]:].tolist()).decode("ascii")
    assert s["config"]["slots"] == 48 and s["config"]["total_experts"] == 192
    assert s["misses"] > 0 and s["evictions"] > 0


def test_falls_back_to_transformers_loading_when_its_helpers_differ(tmp_path, monkeypatch):
    import moecache.loading as loading

    src = tiny_model("qwen3_moe")
    src.save_pretrained(tmp_path, max_shard_size="20KB")

    def broken(*args, **kwargs):
        raise TypeError("rename_source_key() got an unexpected keyword argument")

    monkeypatch.setattr(loading, "load_offloaded", broken)
    with pytest.warns(UserWarning, match="loading with transformers on the CPU"):
        m = from_pretrained(tmp_path, cache_slots=4, device="cpu")
    assert torch.equal(_tokens(m), _tokens(_plain(tmp_path)))
    m.moecache.remove()
