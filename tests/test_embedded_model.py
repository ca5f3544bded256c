"""The embedded default model (moecache/assets/qwen3moe-stdlib): the asset, its recipe, and that it runs.

Quality itself (held-out bits per byte over the whole held-out set, generated lines that tokenize) is
measured by eval/embedded_model_quality.py; here a short fixed snippet checks the weights are trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from moecache.default_model import (EMBEDDED_MODEL_DIR, EMBEDDED_PROMPT, EMBEDDED_SHA256, embedded_available,
                                    embedded_model, embedded_model_sha256, encode)

ROOT = Path(__file__).resolve().parent.parent
needs_asset = pytest.mark.skipif(not embedded_available(), reason="the embedded model's weights are not in this "
                                 "checkout (eval/train_embedded_model.py trains them)")
MAX_BYTES = 8_000_000

# Code written for this test (not from the standard library): a trained model predicts it far better
# than the 8 bits per byte of a uniform guess over bytes.
SNIPPET = '''def count_words(path):
    """Return a dict mapping each word in the file to its count."""
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.split():
                counts[word] = counts.get(word, 0) + 1
    return counts
'''


@pytest.fixture(scope="module")
def model():
    if not embedded_available():
        pytest.skip("the embedded model's weights are not in this checkout")
    return embedded_model(torch.float32)


@needs_asset
def test_asset_size_hash_and_config():
    weights = EMBEDDED_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    assert embedded_model_sha256() == EMBEDDED_SHA256
    recipe = json.loads((EMBEDDED_MODEL_DIR / "training.json").read_text())
    assert recipe["model_sha256"] == EMBEDDED_SHA256
    cfg = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["vocab_size"] == 256
    # transformers 5.17 saves the expert count as num_local_experts, newer versions as num_experts
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    assert (cfg["num_hidden_layers"], experts, cfg["num_experts_per_tok"]) == (6, 16, 4)
    # The recipe pins the data: Python 3.11 sources, with their hashes and the held-out file list.
    data = recipe["data"]
    assert data["python"].startswith("3.11.")
    assert len(data["train"]["sha256"]) == 64 and len(data["heldout"]["sha256"]) == 64
    assert data["heldout"]["n_files"] == len(data["heldout"]["files"]) > 0
    assert recipe["heldout_bits_per_byte_fp32_trained_weights"] <= 2.2


@needs_asset
def test_asset_matches_the_training_script_layout():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        from train_embedded_model import MODEL_CONFIG
    finally:
        sys.path.remove(str(ROOT / "eval"))
    cfg = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    for key, value in MODEL_CONFIG.items():
        if key in cfg:
            assert cfg[key] == value, key


@needs_asset
def test_loads_as_a_supported_family(model):
    from moecache.families import detect_family, find_moe_blocks

    adapter = detect_family(model)
    assert adapter.name == "qwen3_moe"
    assert len(find_moe_blocks(model, adapter)) == 6
    assert sum(p.numel() for p in model.parameters()) == 3_314_496


@needs_asset
def test_weights_are_trained(model):
    x = torch.tensor([encode(SNIPPET)])
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
    bits = float(nll) / math.log(2)
    assert bits < 2.5, bits


@needs_asset
def test_greedy_generation_writes_ascii_code(model):
    x = torch.tensor([encode(EMBEDDED_PROMPT)])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                             eos_token_id=2, pad_token_id=0)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    assert text.startswith(EMBEDDED_PROMPT) and len(text) > len(EMBEDDED_PROMPT) + 8
    assert all(c.isprintable() or c in "\n\t" for c in text), text
    assert "(" in text[len(EMBEDDED_PROMPT):], text  # the function's name is followed by its parameters


@needs_asset
def test_generate_cli_runs_the_embedded_model_offloaded_and_checked(tmp_path, capsys):
    from moecache.cli import main

    rc = main(["generate", "--check", "--max-new-tokens", "12", "--device", "cpu", "--json", str(tmp_path / "s.json")])
    cap = capsys.readouterr()
    assert rc == 0
    assert "trained on the Python 3.11 standard library" in cap.err
    assert "identical to the unpatched model" in cap.err
    assert cap.out.startswith(EMBEDDED_PROMPT)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["check"] is True and s["config"]["slots"] == 24  # a quarter of 6 x 16 experts


def test_generate_cli_samples_reproducibly_and_checks_the_sampled_tokens(tmp_path, capsys):
    from moecache.cli import main

    def sampled(seed: int) -> str:
        rc = main(["generate", "--random-weights", "--device", "cpu", "--max-new-tokens", "16", "--temperature",
                   "1.0", "--top-p", "0.95", "--sample-seed", str(seed), "--check"])
        cap = capsys.readouterr()
        assert rc == 0 and "identical to the unpatched model" in cap.err, cap.err
        return cap.out

    first, again, other = sampled(3), sampled(3), sampled(4)
    assert first == again
    assert first != other  # random weights: near-uniform next-byte distributions, so seeds 3 and 4 part ways
    for bad in (["--top-p", "0"], ["--temperature", "-1"], ["--sample-seed", "-2"]):
        assert main(["generate", "--random-weights", "--device", "cpu", *bad]) == 2
        assert bad[0] in capsys.readouterr().err


def test_generate_cli_random_weights_flag(capsys):
    from moecache.cli import main

    rc = main(["generate", "--random-weights", "--model", "x"])
    assert rc == 2 and "--random-weights" in capsys.readouterr().err


@needs_asset
def test_sha256_helper_reads_the_file():
    assert embedded_model_sha256() == hashlib.sha256((EMBEDDED_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()


def test_tokenize_measure_counts_generated_lines():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        from embedded_model_quality import line_flags
    finally:
        sys.path.remove(str(ROOT / "eval"))
    # dedent mismatch, a stray $, a docstring with an apostrophe, an unterminated one-line string, and
    # a last line cut mid-way (not counted)
    completion = "    return x\n  y = 1\n    z = $\n\"\"\"doc\nit's here\n\"\"\"\nprint('abc)\nfoo(1,\n 2"
    assert line_flags("def f(x):\n", completion) == [True, False, False, True, True, True, False, True]
    assert line_flags("x = '''\n", "it's inside a string\n") == [True]


@needs_asset
def test_demo_generates_records_and_analyses(tmp_path, capsys):
    from moecache.demo import main

    rc = main(["--out", str(tmp_path), "--max-new-tokens", "4", "--record-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert (tmp_path / "embedded.trace").is_dir()
    assert "6 MoE layers" in out and "16 per layer, top-4" in out
    assert out.count("embedded.trace  lru") == 2 and out.count("embedded.trace  belady") == 2
    assert main(["--out", str(tmp_path), "--max-new-tokens", "4", "--device", "cpu"]) == 2  # trace exists
