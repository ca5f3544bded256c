"""A recording killed with SIGKILL leaves every flushed chunk readable, and finalise_partial completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moecache
from moecache.trace import PHASE_DECODE, PHASE_PREFILL, finalise_partial, open_trace

from .tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, NEW = 4, 16

CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.tiny_models import tiny_model
    import moecache
    model = tiny_model("qwen3_moe")
    rec = moecache.record(model, {path!r}, flush_rows=8, flush_seconds=0.2).start()
    i = 0
    with torch.no_grad():
        while True:  # until killed
            prompt = torch.tensor([[3 + i % 50, 4, 5, 6]])
            model.generate(prompt, max_new_tokens={new}, min_new_tokens={new}, do_sample=False, pad_token_id=0)
            i += 1
""")


def chunks(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("chunk-")) if folder.is_dir() else []


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_recording_keeps_flushed_rows(tmp_path):
    path = tmp_path / "trace"
    partial = Path(str(path) + ".partial")
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path), new=NEW)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(chunks(partial)) < 4:
            if child.poll() is not None:
                pytest.fail(f"the recording process ended early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no chunks were flushed within 120 s")
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not path.exists()

    t = open_trace(path)  # resolves to PATH.partial
    assert not t.finalised and len(t) >= 8
    assert t.meta.family == "qwen3_moe" and t.meta.source == "moecache.record"
    assert (t.ids >= 0).all() and (t.ids < 8).all()
    assert all(len(set(r)) == 2 for r in t.ids.reshape(-1, 2).tolist())
    np.testing.assert_allclose(t.weights.sum(2), 1.0, rtol=1e-5)
    seqs = t.sequences()
    np.testing.assert_array_equal(seqs, np.arange(len(seqs)))  # in order, none skipped
    prefill_steps = []
    for s, sub in t.iter_sequences():
        n = len(sub)
        assert n <= PROMPT_LEN + NEW - 1
        np.testing.assert_array_equal(sub.pos, np.arange(n))  # every row of a sequence, in order
        np.testing.assert_array_equal(sub.token[:PROMPT_LEN], [3 + s % 50, 4, 5, 6][:n])
        np.testing.assert_array_equal(sub.phase, ([PHASE_PREFILL] * PROMPT_LEN + [PHASE_DECODE] * NEW)[:n])
        assert (np.diff(sub.step[PROMPT_LEN - 1:]) == 1).all()
        prefill_steps.append(int(sub.step[0]))
        if s < seqs[-1]:  # every sequence but the one cut by the kill is complete
            assert n == PROMPT_LEN + NEW - 1
    assert prefill_steps == sorted(prefill_steps)

    # The flushed routing is the model's: replay the first sequence in one forward and compare.
    model = tiny_model("qwen3_moe")
    first = t.select(t.seq == 0)
    with torch.no_grad(), moecache.record(model, tmp_path / "replay") as rec:
        model(input_ids=torch.tensor(first.token[None].astype(np.int64)))
    replay = rec.trace()
    np.testing.assert_array_equal(np.sort(replay.ids, 2), np.sort(first.ids, 2))
    np.testing.assert_allclose(np.sort(replay.weights, 2), np.sort(first.weights, 2), rtol=1e-4, atol=1e-6)

    final = finalise_partial(partial)
    assert Path(final) == path and not partial.exists()
    done = open_trace(path)
    assert done.finalised and len(done) == len(t)
    np.testing.assert_array_equal(done.ids, t.ids)
