"""``moecache record``: prompts file -> trace; bad input refused before anything is written; kill -9 mid-run
leaves OUT.partial, which ``moecache trace finalise`` completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moecache.cli import main
from moecache.trace import PHASE_DECODE, PHASE_PREFILL, open_trace

ROOT = Path(__file__).resolve().parents[1]


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out.trace"
    assert main(["record", "--prompts", str(tmp_path / "missing.txt"), "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"moecache record: error: --prompts {tmp_path / 'missing.txt'}: no such file\n"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert main(["record", "--prompts", str(bad), "-o", str(out)]) == 2
    assert capsys.readouterr().err == f"moecache record: error: {bad}:2: needs a \"prompt\" string field\n"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    assert main(["record", "--prompts", str(bad), "-o", str(out)]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["record", "--prompts", str(empty), "-o", str(out)]) == 2
    assert "no prompts" in capsys.readouterr().err
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    assert main(["record", "--prompts", str(good), "-o", str(out), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert main(["record", "--prompts", str(good), "-o", str(out), "--cache-slots", "8"]) == 2
    assert "--cache-slots applies to an offloaded model; add --offload" in capsys.readouterr().err
    out.mkdir()
    (out / "keep").write_text("mine")
    assert main(["record", "--prompts", str(good), "-o", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "out.trace", "p.jsonl", "p.txt"]


def test_records_every_prompt(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["def add(a, b):", "import os", "class Stack:\n    def push(self, x):"]
    prompts.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "run.trace"
    n = 5
    assert main(["record", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(prompts), "-o",
                 str(out), "--max-new-tokens", str(n), "--batch", "2"]) == 0
    assert f"of 3 prompts" in capsys.readouterr().err
    t = open_trace(out)
    assert t.finalised and t.meta.model == tiny_model_dir.name
    seqs = list(t.iter_sequences())
    assert len(seqs) == 3
    for (s, sub), text in zip(seqs, texts):
        ids = list(text.encode())
        assert len(sub) == len(ids) + n - 1  # the prompt, then every generated token but the last
        np.testing.assert_array_equal(sub.token[:len(ids)], ids)  # left padding is not recorded
        np.testing.assert_array_equal(sub.phase, [PHASE_PREFILL] * len(ids) + [PHASE_DECODE] * (n - 1))
    # offloaded (a quarter of the experts resident): the same routing
    assert main(["record", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(prompts), "-o",
                 str(tmp_path / "off.trace"), "--max-new-tokens", str(n), "--batch", "2", "--offload",
                 "--experts-fraction", "0.25"]) == 0
    off = open_trace(tmp_path / "off.trace")
    np.testing.assert_array_equal(off.ids, t.ids)
    np.testing.assert_array_equal(off.token, t.token)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_then_trace_finalise(tmp_path):
    """The embedded model records a long prompts file; SIGKILL mid-run; `trace finalise` completes the trace."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(200)))
    out = tmp_path / "killed.trace"
    partial = Path(str(out) + ".partial")
    child = subprocess.Popen([sys.executable, "-m", "moecache", "record", "--prompts", str(prompts), "-o", str(out),
                              "--device", "cpu", "--max-new-tokens", "64", "--flush-rows", "8", "--flush-seconds",
                              "0.2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len([n for n in os.listdir(partial) if n.startswith("chunk-")] if partial.is_dir() else []) < 3:
            if child.poll() is not None:
                pytest.fail(f"the recording ended early: {child.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no chunks flushed within 300 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not out.exists()
    r = subprocess.run([sys.executable, "-m", "moecache", "trace", "finalise", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    t = open_trace(out)
    assert t.finalised and len(t) >= len("prompt number 0") and t.meta.source == "moecache.record"
    first = next(iter(t.iter_sequences()))[1]
    np.testing.assert_array_equal(first.token[:len("prompt number 0")], list(b"prompt number 0"))
    assert (t.ids >= 0).all() and (t.ids < t.meta.num_experts).all()
