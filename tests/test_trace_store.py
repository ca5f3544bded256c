import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moecache import TraceFormatError
from moecache._ext import extension
from moecache.trace import (ID_DROPPED, ID_MISSING, PHASE_DECODE, PHASE_PREFILL, RoutingBlock, TraceMeta,
                            TraceWriter, count_ids, finalise_partial, open_trace, write_trace)


def meta(**kw):
    base = dict(num_experts=8, top_k=2, moe_layers=[1, 3, 5], model="toy", family="mixtral",
                weights="renormalized", id_order="score")
    base.update(kw)
    return TraceMeta(**base)


def block(n, seq=0, rng=None, weights=True, m=None):
    rng = rng or np.random.default_rng(0)
    m = m or meta()
    ids = np.stack([np.stack([rng.choice(m.num_experts, m.top_k, replace=False) for _ in range(m.num_layers)])
                    for _ in range(n)])
    w = rng.random(ids.shape).astype(np.float32) if weights else None
    return RoutingBlock.build(ids, seq=seq, pos=np.arange(n), token=np.arange(n) + 10, step=np.arange(n),
                              phase=np.where(np.arange(n) < 3, PHASE_PREFILL, PHASE_DECODE), weights=w)


def test_round_trip(tmp_path):
    b1, b2 = block(5, seq=0), block(7, seq=1, rng=np.random.default_rng(1))
    p = write_trace(tmp_path / "t", meta(), [b1, b2], drops={"warmup": 4})
    t = open_trace(p)
    assert t.finalised and len(t) == 12
    np.testing.assert_array_equal(t.ids[:5], b1.ids)
    np.testing.assert_array_equal(t.ids[5:], b2.ids)
    np.testing.assert_array_equal(t.weights[5:], b2.weights)
    assert t.ids.dtype == np.int16
    assert list(t.sequences()) == [0, 1]
    assert t.drops == {"warmup": 4}
    s = t.summary()
    assert s["tokens"] == 12 and s["sequences"] == 2 and s["layers"] == 3 and s["experts"] == 8 and s["top_k"] == 2
    assert s["phases"] == {"prefill": 6, "decode": 6}
    assert s["coverage"] == 1.0
    assert t.meta.moe_layers == [1, 3, 5]


def test_unknown_columns_stay_unknown(tmp_path):
    ids = np.zeros((4, 3, 2), np.int64)
    ids[..., 1] = 1
    ids[3, 2] = ID_MISSING
    b = RoutingBlock.build(ids, seq=0)
    t = open_trace(write_trace(tmp_path / "t", meta(weights="absent"), [b]))
    assert (t.pos == -1).all() and (t.token == -1).all() and (t.phase == -1).all() and t.weights is None
    s = t.summary()
    assert s["known"] == {"pos": 0.0, "token": 0.0, "step": 0.0}
    assert s["missing_records"] == 1 and s["phases"] == {"unknown": 4}


def test_validation_errors(tmp_path):
    m = meta(weights="absent")
    bad = RoutingBlock.build(np.full((2, 3, 2), 8))
    with pytest.raises(TraceFormatError, match="out of range"):
        write_trace(tmp_path / "a", m, [bad])
    with pytest.raises(TraceFormatError, match="shape"):
        write_trace(tmp_path / "b", m, [RoutingBlock.build(np.zeros((2, 2, 2), int))])
    with pytest.raises(TraceFormatError, match="weights"):
        write_trace(tmp_path / "c", m, [block(2)])
    with pytest.raises(TraceFormatError, match="top_k"):
        TraceMeta(num_experts=4, top_k=5, moe_layers=[0])
    with pytest.raises(TraceFormatError, match="id_order"):
        TraceMeta(num_experts=4, top_k=1, moe_layers=[0], id_order="random")


def test_writer_refuses_to_clobber(tmp_path):
    write_trace(tmp_path / "t", meta(), [block(2)])
    with pytest.raises(FileExistsError):
        write_trace(tmp_path / "t", meta(), [block(2)])
    write_trace(tmp_path / "t", meta(), [block(3)], overwrite=True)
    assert len(open_trace(tmp_path / "t")) == 3


def test_open_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trace"):
        open_trace(tmp_path / "nope")
    (tmp_path / "log.jsonl").write_text("{}\n")
    with pytest.raises(TraceFormatError, match="trace import"):
        open_trace(tmp_path / "log.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(TraceFormatError, match="trace import"):
        open_trace(tmp_path / "d")


def test_exception_in_writer_keeps_flushed_chunks(tmp_path):
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path / "t", meta(), chunk_rows=4) as w:
            w.append(block(5))
            w.append(block(2))
            raise RuntimeError("boom")
    assert not (tmp_path / "t").exists()
    t = open_trace(tmp_path / "t")  # finds t.partial
    assert not t.finalised and len(t) == 7
    out = finalise_partial(tmp_path / "t.partial")
    t2 = open_trace(out)
    assert t2.finalised and len(t2) == 7


def test_partial_survives_kill(tmp_path):
    """A writer process killed mid-recording leaves every flushed chunk readable."""
    path = tmp_path / "rec"
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        from moecache.trace import RoutingBlock, TraceMeta, TraceWriter
        m = TraceMeta(num_experts=8, top_k=2, moe_layers=[0, 1])
        w = TraceWriter({str(path)!r}, m, chunk_rows=10)
        for i in range(5):
            w.append(RoutingBlock.build(np.full((10, 2, 2), i), seq=i))
        w._buffer.append(RoutingBlock.build(np.full((3, 2, 2), 7), seq=99))  # buffered, never flushed
        print("ready", flush=True)
        os.kill(os.getpid(), 9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert "ready" in proc.stdout
    t = open_trace(path)
    assert not t.finalised
    assert len(t) == 50 and list(t.sequences()) == [0, 1, 2, 3, 4]


def test_count_ids_matches_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    ids = rng.integers(-2, 8, size=(100, 3, 2))
    t = open_trace(write_trace(tmp_path / "t", meta(weights="absent"), [RoutingBlock.build(ids)]))
    ref = np.stack([np.bincount(ids[:, l][ids[:, l] >= 0], minlength=8) for l in range(3)])
    monkeypatch.setenv("MOECACHE_DISABLE_EXT", "1")
    assert extension() is None
    np.testing.assert_array_equal(count_ids(t), ref)
    monkeypatch.delenv("MOECACHE_DISABLE_EXT")
    if extension() is None:
        pytest.skip("extension not built")
    np.testing.assert_array_equal(count_ids(t), ref)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_round_trip_property(tmp_path_factory, data):
    e = data.draw(st.integers(1, 40000))
    k = data.draw(st.integers(1, min(e, 4)))
    layers = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(0, 30))
    ids = data.draw(st.lists(st.integers(ID_DROPPED, e - 1), min_size=n * layers * k, max_size=n * layers * k))
    ids = np.array(ids, dtype=np.int64).reshape(n, layers, k)
    m = TraceMeta(num_experts=e, top_k=k, moe_layers=list(range(layers)))
    p = tmp_path_factory.mktemp("t") / "trace"
    t = open_trace(write_trace(p, m, [RoutingBlock.build(ids, seq=0)]))
    assert len(t) == n
    np.testing.assert_array_equal(t.ids.astype(np.int64), ids)
    manifest = json.loads((p / "manifest.json").read_text())
    assert manifest["rows"] == n and manifest["version"] == 1


def test_atomic_write_mode_follows_umask(tmp_path):
    from moecache.atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(str(tmp_path / "f.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind
