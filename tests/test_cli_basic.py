import json
import subprocess
import sys

import numpy as np
import pytest

from moecache.cli import main
from moecache.trace import RoutingBlock, TraceMeta, TraceWriter, write_trace


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("moecache", "torch", "transformers", "numpy", "extension"):
        assert key in info
    assert "available" in info["extension"]


def test_doctor_names_the_cpu_kernel_and_honours_the_override(capsys, monkeypatch):
    from moecache._ext import extension

    monkeypatch.setenv("MOECACHE_CPU_KERNEL", "portable")
    assert main(["doctor", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)["cpu_kernel"]
    assert cpu["requested"] == "portable"
    if extension() is not None:
        assert cpu["kernel"] == "portable" and set(cpu["features"]) == {"avx2", "fma", "avx512f"}
    monkeypatch.setenv("MOECACHE_CPU_KERNEL", "bogus")
    assert main(["doctor"]) == 0  # a bad value is reported, not raised
    out = capsys.readouterr().out
    assert "cpu kernel" in out and ("invalid MOECACHE_CPU_KERNEL" in out or "not built" in out)


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "moecache", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "extension" in out.stdout


def _trace(tmp_path):
    m = TraceMeta(num_experts=4, top_k=2, moe_layers=[1, 2], model="toy", weights="absent")
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [-1, -1]], [[3, 0], [0, 1]]])
    return write_trace(tmp_path / "t", m, [RoutingBlock.build(ids, seq=[0, 0, 1], phase=[0, 1, 0])], drops={"warmup": 5})


def test_trace_info_json(tmp_path, capsys):
    p = _trace(tmp_path)
    assert main(["trace", "info", p, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["tokens"], s["sequences"], s["layers"], s["experts"], s["top_k"]) == (3, 2, 2, 4, 2)
    assert s["drops"] == {"warmup": 5}
    assert s["missing_records"] == 1 and s["accesses"] == 10


def test_trace_info_text(tmp_path, capsys):
    p = _trace(tmp_path)
    assert main(["trace", "info", p]) == 0
    out = capsys.readouterr().out
    assert "3 in 2 sequence(s)" in out and "warmup: 5" in out and "model layers 1-2" in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["trace", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no trace at" in err and "Traceback" not in err


def test_finalise_cli(tmp_path, capsys):
    m = TraceMeta(num_experts=4, top_k=1, moe_layers=[0])
    w = TraceWriter(tmp_path / "r", m, chunk_rows=2)
    w.append(RoutingBlock.build(np.zeros((3, 1, 1), int)))
    w.flush()
    assert main(["trace", "info", str(tmp_path / "r")]) == 0
    assert "UNFINISHED" in capsys.readouterr().out
    # the writer still holds the folder: finalise refuses and changes nothing
    assert main(["trace", "finalise", str(tmp_path / "r.partial")]) == 2
    assert "being written" in capsys.readouterr().err and not (tmp_path / "r").exists()
    w.abandon()  # as if the recording process had died
    assert main(["trace", "finalise", str(tmp_path / "r.partial")]) == 0
    assert (tmp_path / "r" / "manifest.json").exists()


def test_generate_copy_engine_flag_and_its_old_spelling():
    import warnings

    from moecache.cli import build_parser

    parser = build_parser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the new flag or the default
        assert parser.parse_args(["generate"]).copy_engine == "auto"
        assert parser.parse_args(["generate", "--copy-engine", "sync"]).copy_engine == "sync"
    with pytest.warns(FutureWarning, match="--engine is deprecated.*use --copy-engine stream"):
        assert parser.parse_args(["generate", "--engine", "stream"]).copy_engine == "stream"


def test_replay_is_a_deprecated_name_of_run_forced(monkeypatch):
    import moecache
    import moecache.forced_routing

    calls = []
    monkeypatch.setattr(moecache.forced_routing, "run_forced", lambda model, trace, **kw: calls.append((model, trace, kw)))
    with pytest.warns(DeprecationWarning, match="use moecache.run_forced"):
        moecache.replay("m", "t", batch=2)
    moecache.run_forced("m2", "t2")
    assert calls == [("m", "t", {"batch": 2}), ("m2", "t2", {})]


def test_generate_refuses_a_predictor_it_cannot_fit_before_loading(tmp_path, capsys):
    """``generate --predictor hidden_state`` (or any predictor that must be fitted) fails in one line naming
    what it needs, before the checkpoint is read (here a config.json no model could load from)."""
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path), "--predictor", "hidden_state", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden_states=True" in err and "Python API" in err and len(err.splitlines()) == 1
