"""Write only what you were asked to write: --force/overwrite replace only a finished moecache trace or
report, a trace being written is locked, finalise is atomic and idempotent, --token-text never
overwrites a source."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from moecache.cli import main
from moecache.trace import TraceMeta, finalise_partial, open_trace
from moecache.trace.schema import RoutingBlock
from moecache.trace.store import TraceWriter, write_trace

from .test_importers import ds_ids, ds_lines

META = TraceMeta(num_experts=4, top_k=1, moe_layers=[0])


def _block(n: int = 3) -> RoutingBlock:
    return RoutingBlock.build(np.arange(n).reshape(n, 1, 1) % 4)


def _tree(path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with its hash: what 'unchanged' means."""
    out = {}
    path = str(path)
    if os.path.isfile(path):
        return {path: hashlib.sha256(open(path, "rb").read()).hexdigest()}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _user_folder(p):
    p.mkdir()
    (p / "notes.txt").write_text("precious")
    return _tree(p)


def test_overwrite_replaces_only_a_finished_trace(tmp_path):
    target = tmp_path / "t"
    before = _user_folder(target)
    with pytest.raises(FileExistsError, match="not a moecache trace"):
        write_trace(target, META, [_block()], overwrite=True)
    assert _tree(target) == before and not (tmp_path / "t.partial").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a moecache trace"):
        write_trace(f, META, [_block()], overwrite=True)
    assert f.read_text() == "x"
    good = tmp_path / "good"
    write_trace(good, META, [_block(3)])
    with pytest.raises(FileExistsError, match="--force"):
        write_trace(good, META, [_block(5)])
    write_trace(good, META, [_block(5)], overwrite=True)
    assert len(open_trace(good)) == 5


def test_overwrite_leaves_a_folder_named_like_the_old_backup_alone(tmp_path):
    good = tmp_path / "good"
    write_trace(good, META, [_block(3)])
    before = _user_folder(tmp_path / "good.old")
    write_trace(good, META, [_block(4)], overwrite=True)
    assert _tree(tmp_path / "good.old") == before and len(open_trace(good)) == 4
    assert sorted(os.listdir(tmp_path)) == ["good", "good.old"]  # no leftovers


def test_a_trace_being_written_is_locked(tmp_path):
    w = TraceWriter(tmp_path / "r", META, chunk_rows=2)
    w.append(_block(3))
    w.flush()
    for attempt in (lambda: TraceWriter(tmp_path / "r", META), lambda: TraceWriter(tmp_path / "r", META, overwrite=True),
                    lambda: write_trace(tmp_path / "r", META, [_block()], overwrite=True),
                    lambda: finalise_partial(tmp_path / "r.partial")):
        with pytest.raises(FileExistsError, match="being written"):
            attempt()
    assert main(["trace", "finalise", str(tmp_path / "r")]) == 2
    w.append(_block(1))
    assert w.close() == str(tmp_path / "r") and len(open_trace(tmp_path / "r")) == 4


def test_a_stale_partial_is_replaced_only_with_overwrite_and_only_if_ours(tmp_path):
    w = TraceWriter(tmp_path / "r", META, chunk_rows=2)
    w.append(_block(3))
    w.flush()
    w.abandon()  # the recording died
    with pytest.raises(FileExistsError, match="unfinished"):
        TraceWriter(tmp_path / "r", META)
    write_trace(tmp_path / "r", META, [_block(2)], overwrite=True)
    assert len(open_trace(tmp_path / "r")) == 2 and not (tmp_path / "r.partial").exists()
    before = _user_folder(tmp_path / "s.partial")
    with pytest.raises(FileExistsError, match="not an unfinished moecache trace"):
        write_trace(tmp_path / "s", META, [_block(2)], overwrite=True)
    assert _tree(tmp_path / "s.partial") == before


def test_finalise_is_idempotent_and_completes_an_interrupted_finalise(tmp_path):
    w = TraceWriter(tmp_path / "r", META, chunk_rows=2)
    w.append(_block(3))
    w.flush()
    w.abandon()
    out = finalise_partial(tmp_path / "r.partial")
    assert out == str(tmp_path / "r")
    assert finalise_partial(tmp_path / "r") == out and finalise_partial(out) == out
    assert len(open_trace(out)) == 3
    # a finalise that wrote the manifest and died before the rename
    w = TraceWriter(tmp_path / "q", META, chunk_rows=1)
    w.append(_block(2))
    w.abandon()
    partial = tmp_path / "q.partial"
    header = json.loads((partial / "meta.json").read_text())
    manifest = {**header, "chunks": [{"name": "chunk-000000", "rows": 2}], "rows": 2, "drops": {}}
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert finalise_partial(tmp_path / "q") == str(tmp_path / "q") and len(open_trace(tmp_path / "q")) == 2
    # a target that exists is refused before anything is written
    w = TraceWriter(tmp_path / "z", META, chunk_rows=1)
    w.append(_block(1))
    w.abandon()
    before = _user_folder(tmp_path / "z")
    with pytest.raises(FileExistsError, match="move it away"):
        finalise_partial(tmp_path / "z.partial")
    assert _tree(tmp_path / "z") == before and not (tmp_path / "z.partial" / "manifest.json").exists()


def test_missing_or_read_only_output_folders_are_clean_errors(tmp_path):
    # folders named in the output path are made; a file in the way is an error before anything is written
    write_trace(tmp_path / "new" / "sub" / "t", META, [_block()])
    assert len(open_trace(tmp_path / "new" / "sub" / "t")) == 3
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception, match="is a file"):
        write_trace(tmp_path / "f" / "sub" / "t", META, [_block()])
    assert (tmp_path / "f").read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(Exception, match="permission denied"):
            write_trace(ro / "t", META, [_block()])
    finally:
        ro.chmod(0o755)


def _csv(tmp_path, name="prompt_1_data.csv"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(ds_lines(["a", "b", "c"], ds_ids(3))) + b"\n")
    return p


def test_token_text_never_overwrites_a_source_or_a_foreign_file(tmp_path, capsys):
    src = _csv(tmp_path)
    before = _tree(src)
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t"), "-q", "--token-text", str(src)]) == 2
    assert "one of the sources" in capsys.readouterr().err
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t"), "-q", "--token-text", str(src),
                 "--force"]) == 2
    assert _tree(src) == before and not (tmp_path / "t").exists()
    other = tmp_path / "other.txt"
    other.write_text("mine")
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t"), "-q", "--token-text", str(other),
                 "--force"]) == 2
    assert other.read_text() == "mine" and not (tmp_path / "t").exists()
    tt = tmp_path / "tokens.jsonl"
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t"), "-q", "--token-text", str(tt)]) == 0
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t"), "-q", "--token-text", str(tt),
                 "--force"]) == 0  # our own token text and trace: replaced
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "t2"), "-q", "--token-text",
                 str(tmp_path / "t" / "x.jsonl")]) == 2
    capsys.readouterr()


def test_import_force_refuses_a_folder_of_other_files(tmp_path, capsys):
    src = _csv(tmp_path)
    before = _user_folder(tmp_path / "out")
    assert main(["trace", "import", str(src), "-o", str(tmp_path / "out"), "-q", "--force"]) == 2
    assert "not a moecache trace" in capsys.readouterr().err
    assert _tree(tmp_path / "out") == before


def test_analyze_replaces_only_its_own_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    before = _user_folder(tmp_path / "rep")
    write_trace(tmp_path / "t", META, [_block(40)])
    assert main(["analyze", str(tmp_path / "t"), "-o", str(tmp_path / "rep"), "-q", "--no-simulate"]) == 2
    assert "not a moecache report" in capsys.readouterr().err and _tree(tmp_path / "rep") == before


def test_recorder_checks_its_output_before_hooking(tmp_path):
    import moecache

    from .tiny_models import tiny_model

    m = tiny_model("qwen3_moe")
    before = _user_folder(tmp_path / "rec")
    for kwargs in ({}, {"overwrite": True}, {"flush_seconds": float("nan")}, {"flush_rows": 0.5}):
        with pytest.raises(moecache.MoecacheError if kwargs.get("flush_seconds") or kwargs.get("flush_rows")
                           else FileExistsError):
            path = tmp_path / ("rec" if "flush_seconds" not in kwargs and "flush_rows" not in kwargs else "new")
            moecache.record(m, path, **kwargs)
    assert _tree(tmp_path / "rec") == before and not (tmp_path / "new").exists()
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
