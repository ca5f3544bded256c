"""The probe list: bad and degenerate inputs a new user tries, kept as regression tests.

Each case builds its files under ``tmp_path``, runs the CLI's ``main()`` in-process, and checks the
error style (``moecache.cli``): the expected status; for status 2 one ``error:`` line and no
traceback; never status 3; no control character from a file reaching the terminal; and no file
outside the case's output path created, changed or deleted. Cases are grouped by the class of the
issue they belong to (validate before touching, write only what was asked, read only what was
pointed at, one error style, degenerate inputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from moecache.cli import main
from moecache.trace import TraceMeta
from moecache.trace.schema import RoutingBlock
from moecache.trace.store import TraceWriter, write_trace

from .test_importers import ds_ids, ds_lines, qwen_lines

OUT = "OUT"  # every case's output path, relative to tmp_path (may be unused)
ESC = "\x1b[31m"


def snapshot(root: Path, skip: str | None = None) -> dict[str, str]:
    """Hash of every entry under ``root`` (not following symlinks), except ``skip`` and what is under it."""
    out: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if skip and (rel_dir == skip or rel_dir.startswith(skip + os.sep) or rel_dir.startswith(skip + ".")):
            dirs[:] = []
            continue
        for name in dirs + files:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if skip and (rel == skip or rel.startswith(skip + os.sep) or rel.startswith(skip + ".")):
                continue
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


# -- builders of inputs -----------------------------------------------------------------------------------

META = TraceMeta(num_experts=8, top_k=2, moe_layers=[0, 1], model="probe", bytes_per_expert=2**20)


def good_trace(tmp: Path, name: str = "t", tokens: int = 40, seqs: int = 4, meta: TraceMeta = META,
               ids: np.ndarray | None = None) -> str:
    rng = np.random.default_rng(0)
    if ids is None:
        ids = np.stack([np.stack([rng.choice(meta.num_experts, meta.top_k, replace=False)
                                  for _ in range(meta.num_layers)]) for _ in range(tokens)])
    seq = np.repeat(np.arange(seqs), int(np.ceil(len(ids) / seqs)))[: len(ids)]
    write_trace(tmp / name, meta, [RoutingBlock.build(ids, seq=seq)])
    return str(tmp / name)


def damaged(edit: Callable[[dict], object]) -> Callable[[Path], str]:
    """A trace whose manifest is edited by ``edit`` (which may return a replacement value)."""
    def build(tmp: Path) -> str:
        path = good_trace(tmp)
        mf = Path(path) / "manifest.json"
        header = json.loads(mf.read_text())
        new = edit(header)
        mf.write_text(json.dumps(header if new is None else new))
        return path
    return build


def raw_manifest(text: bytes) -> Callable[[Path], str]:
    def build(tmp: Path) -> str:
        path = good_trace(tmp)
        (Path(path) / "manifest.json").write_bytes(text)
        return path
    return build


def chunk_edit(fn: Callable[[Path], None]) -> Callable[[Path], str]:
    def build(tmp: Path) -> str:
        path = good_trace(tmp)
        fn(Path(path) / "chunk-000000")
        return path
    return build


def csv_file(tmp: Path, name: str = "prompt_1_data.csv", tokens: tuple[str, ...] = ("a", "b", "c")) -> str:
    p = tmp / name
    p.write_bytes(b"\n".join(ds_lines(list(tokens), ds_ids(len(tokens)))) + b"\n")
    return str(p)


def csv_folder(tmp: Path) -> str:
    d = tmp / "src"
    d.mkdir()
    csv_file(d)
    return str(d)


def fifo(tmp: Path, name: str = "pipe.csv") -> str:
    p = tmp / name
    os.mkfifo(p)
    return str(p)


def with_special(kind: str) -> Callable[[Path], str]:
    """A source folder holding one good log and one special entry."""
    def build(tmp: Path) -> str:
        d = Path(csv_folder(tmp))
        if kind == "fifo":
            os.mkfifo(d / "zz.csv")
        elif kind == "socket":
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(d / "zz.sock"))
            s.close()
        elif kind == "loop":
            os.symlink(d / "loop_b", d / "loop_a")
            os.symlink(d / "loop_a", d / "loop_b")
        elif kind == "dangling":
            os.symlink(tmp / "nowhere", d / "dangling.csv")
        elif kind == "outside":
            other = tmp / "elsewhere"
            other.mkdir()
            csv_file(other, "prompt_9_data.csv")
            os.symlink(other / "prompt_9_data.csv", d / "prompt_9_data.csv")
        elif kind == "dirloop":
            os.symlink(d, d / "again")
        elif kind == "devnull":
            os.symlink("/dev/zero", d / "zero.csv")
        return str(d)
    return build


def _p(tmp: Path, *parts: str) -> str:
    return str(tmp.joinpath(*parts))


# -- the probe list ----------------------------------------------------------------------------------------
# (id, argv builder (tmp -> argv), expected statuses). OUT is the only path a case may write.

def T(tmp):  # a good trace
    return good_trace(tmp)


CASES: list[tuple[str, Callable[[Path], list[str]], set[int]]] = []


def case(name: str, statuses: set[int] | int = 2):
    def deco(fn):
        CASES.append((name, fn, {statuses} if isinstance(statuses, int) else statuses))
        return fn
    return deco


# one error style: argument errors ---------------------------------------------------------------------
for i, argv in enumerate([[], ["nope"], ["trace"], ["trace", "nope"], ["trace", "info"], ["analyze"],
                          ["analyze", "x"], ["trace", "import"], ["trace", "import", "x"], ["bench", "--nope"],
                          ["generate", "--max-new-tokens", "x"], ["generate", "--cache-slots", "1.5"],
                          ["generate", "--experts-fraction", "nan"], ["generate", "--max-new-tokens", "0"],
                          ["generate", "--max-new-tokens", "-3"], ["generate", "--experts-fraction", "0"],
                          ["generate", "--experts-fraction", "1.5"], ["generate", "--experts-fraction", "inf"],
                          ["generate", "--gpu-memory", "lots"], ["generate", "--gpu-memory", "1e40"],
                          ["generate", "--dtype", "int8"], ["generate", "--dtype", "nope"],
                          ["generate", "--device", "tpu"], ["generate", "--engine", "warp"], ["generate", "--copy-engine", "warp"],
                          ["generate", "--policy", "nope"], ["generate", "--predictor", "nope"],
                          ["generate", "--hybrid", "sometimes"], ["generate", "--prefetch-depth", "-1"],
                          ["generate", "--cache-slots", "0"], ["generate", "--seed", "-1"],
                          ["doctor", "--nope"], ["analyze", "x", "-o"], ["bench", "--capacity"],
                          ["analyze", "t", "-o", "o", "--capacities", "0%"],
                          ["analyze", "t", "-o", "o", "--windows", "0"],
                          ["analyze", "t", "-o", "o", "--belady-tokens", "-1"],
                          ["analyze", "t", "-o", "o", "--capacities", "nan"]]):
    CASES.append((f"args{i}:{' '.join(argv)[:30]}", lambda tmp, a=argv: list(a), {2}))


@case("generate-model-missing")
def _(tmp):
    return ["generate", "--model", _p(tmp, "nope")]


@case("generate-model-is-file")
def _(tmp):
    return ["generate", "--model", csv_file(tmp)]


@case("generate-model-no-config")
def _(tmp):
    (tmp / "m").mkdir()
    return ["generate", "--model", _p(tmp, "m")]


@case("generate-json-is-dir")
def _(tmp):
    (tmp / "d").mkdir()
    return ["generate", "--json", _p(tmp, "d")]


@case("generate-json-foreign-file")
def _(tmp):
    (tmp / "mine.json").write_text('{"a": 1}')
    return ["generate", "--json", _p(tmp, "mine.json")]


@case("generate-json-no-parent")
def _(tmp):
    return ["generate", "--json", _p(tmp, "no", "x.json")]


# trace info: read only what you were pointed at; damaged traces ----------------------------------------
@case("info-missing")
def _(tmp):
    return ["trace", "info", _p(tmp, "missing")]


@case("info-file")
def _(tmp):
    return ["trace", "info", csv_file(tmp)]


@case("info-fifo")
def _(tmp):
    return ["trace", "info", fifo(tmp)]


@case("info-empty-dir")
def _(tmp):
    (tmp / "e").mkdir()
    return ["trace", "info", _p(tmp, "e")]


for name, build in {
    "manifest-not-json": raw_manifest(b"{oops"),
    "manifest-binary": raw_manifest(b"\xff\xfe\x00garbage"),
    "manifest-list": raw_manifest(b"[1, 2]"),
    "manifest-null": raw_manifest(b"null"),
    "manifest-empty": raw_manifest(b""),
    "manifest-deep": raw_manifest(b"[" * 100000),
    "version-string": damaged(lambda h: h.update(version="1")),
    "version-zero": damaged(lambda h: h.update(version=0)),
    "version-missing": damaged(lambda h: h.pop("version")),
    "version-future": damaged(lambda h: h.update(version=99)),
    "version-float": damaged(lambda h: h.update(version=1.0)),
    "version-bool": damaged(lambda h: h.update(version=True)),
    "format-wrong": damaged(lambda h: h.update(format="other")),
    "meta-missing": damaged(lambda h: h.pop("meta")),
    "meta-list": damaged(lambda h: h.update(meta=[])),
    "meta-no-experts": damaged(lambda h: h["meta"].pop("num_experts")),
    "meta-experts-string": damaged(lambda h: h["meta"].update(num_experts="8")),
    "meta-experts-float": damaged(lambda h: h["meta"].update(num_experts=8.5)),
    "meta-experts-zero": damaged(lambda h: h["meta"].update(num_experts=0)),
    "meta-experts-huge": damaged(lambda h: h["meta"].update(num_experts=10**12)),
    "meta-topk-big": damaged(lambda h: h["meta"].update(top_k=99)),
    "meta-layers-strings": damaged(lambda h: h["meta"].update(moe_layers=["a", "b"])),
    "meta-layers-empty": damaged(lambda h: h["meta"].update(moe_layers=[])),
    "meta-layers-dup": damaged(lambda h: h["meta"].update(moe_layers=[1, 1])),
    "meta-unknown-key": damaged(lambda h: h["meta"].update(colour="blue")),
    "meta-weights-kind": damaged(lambda h: h["meta"].update(weights="magic")),
    "meta-files-type": damaged(lambda h: h["meta"].update(files="a.csv")),
    "chunks-missing": damaged(lambda h: h.pop("chunks")),
    "chunks-string": damaged(lambda h: h.update(chunks="chunk-000000")),
    "chunk-traversal": damaged(lambda h: h["chunks"][0].update(name="../../etc")),
    "chunk-absolute": damaged(lambda h: h["chunks"][0].update(name="/etc")),
    "chunk-newline": damaged(lambda h: h["chunks"][0].update(name="chunk-000000\n")),
    "chunk-not-object": damaged(lambda h: h.update(chunks=[1])),
    "chunk-listed-twice": damaged(lambda h: h["chunks"].append(dict(h["chunks"][0]))),
    "chunk-absent": damaged(lambda h: h["chunks"].append({"name": "chunk-000009", "rows": 1})),
    "rows-wrong": damaged(lambda h: h.update(rows=7)),
    "rows-string": damaged(lambda h: h.update(rows="40")),
    "drops-list": damaged(lambda h: h.update(drops=[1])),
    "chunk-ids-missing": chunk_edit(lambda c: (c / "ids.npy").unlink()),
    "chunk-ids-garbage": chunk_edit(lambda c: (c / "ids.npy").write_bytes(b"not numpy")),
    "chunk-ids-truncated": chunk_edit(lambda c: (c / "ids.npy").write_bytes((c / "ids.npy").read_bytes()[:90])),
    "chunk-ids-pickle": chunk_edit(lambda c: np.save(c / "ids.npy", np.array([object()]), allow_pickle=True)),
    "chunk-ids-shape": chunk_edit(lambda c: np.save(c / "ids.npy", np.zeros((40, 3), np.int16))),
    "chunk-ids-fifo": chunk_edit(lambda c: ((c / "ids.npy").unlink(), os.mkfifo(c / "ids.npy"))),
    "chunk-ids-symlink": chunk_edit(lambda c: ((c / "ids.npy").unlink(), os.symlink("/etc/hostname", c / "ids.npy"))),
    "chunk-drops-garbage": chunk_edit(lambda c: (c / "drops.json").write_text("{oops")),
    "chunk-drops-list": chunk_edit(lambda c: (c / "drops.json").write_text("[1]")),
    "chunk-seq-missing": chunk_edit(lambda c: (c / "seq.npy").unlink()),
    "chunk-folder-gone": chunk_edit(lambda c: shutil.rmtree(c)),
}.items():
    CASES.append((f"info-{name}", lambda tmp, b=build: ["trace", "info", b(tmp)], {2}))
    if name in ("version-string", "chunk-traversal", "chunk-ids-garbage", "meta-layers-strings", "rows-wrong"):
        CASES.append((f"analyze-{name}", lambda tmp, b=build: ["analyze", b(tmp), "-o", _p(tmp, OUT), "-q"], {2}))
        CASES.append((f"bench-{name}", lambda tmp, b=build: ["bench", b(tmp), "--quiet"], {2}))


@case("info-escapes-control-characters", 0)
def _(tmp):
    meta = TraceMeta(num_experts=8, top_k=2, moe_layers=[0, 1], model="evil" + ESC + "\u202e", source="s\rx")
    return ["trace", "info", good_trace(tmp, meta=meta)]


@case("info-partial-ok", 0)
def _(tmp):
    w = TraceWriter(tmp / "r", META, chunk_rows=1)
    w.append(RoutingBlock.build(np.zeros((2, 2, 2), int) + np.array([0, 1])))
    w.abandon()
    return ["trace", "info", _p(tmp, "r")]


# trace finalise ------------------------------------------------------------------------------------------
@case("finalise-missing")
def _(tmp):
    return ["trace", "finalise", _p(tmp, "nope")]


@case("finalise-finished-is-idempotent", 0)
def _(tmp):
    return ["trace", "finalise", good_trace(tmp)]


@case("finalise-target-exists")
def _(tmp):
    w = TraceWriter(tmp / "r", META, chunk_rows=1)
    w.append(RoutingBlock.build(np.zeros((2, 2, 2), int) + np.array([0, 1])))
    w.abandon()
    (tmp / "r").mkdir()
    (tmp / "r" / "keep.txt").write_text("x")
    return ["trace", "finalise", _p(tmp, "r.partial")]


@case("finalise-foreign-folder")
def _(tmp):
    (tmp / "f").mkdir()
    return ["trace", "finalise", _p(tmp, "f")]


# trace import: read only what you were pointed at; write only what you were asked to ----------------------
@case("import-missing")
def _(tmp):
    return ["trace", "import", _p(tmp, "nope.csv"), "-o", _p(tmp, OUT)]


@case("import-fifo")
def _(tmp):
    return ["trace", "import", fifo(tmp), "-o", _p(tmp, OUT)]


@case("import-dev-null")
def _(tmp):
    return ["trace", "import", "/dev/null", "-o", _p(tmp, OUT)]


@case("import-empty-file")
def _(tmp):
    (tmp / "e.csv").write_bytes(b"")
    return ["trace", "import", _p(tmp, "e.csv"), "-o", _p(tmp, OUT)]


@case("import-empty-folder")
def _(tmp):
    (tmp / "e").mkdir()
    return ["trace", "import", _p(tmp, "e"), "-o", _p(tmp, OUT)]


@case("import-binary-file")
def _(tmp):
    (tmp / "b.csv").write_bytes(os.urandom(3000))
    return ["trace", "import", _p(tmp, "b.csv"), "-o", _p(tmp, OUT)]


@case("import-unknown-format")
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--format", "nope"]


@case("import-wrong-format")
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--format", "vllm-moe-logger"]


@case("import-malformed-line")
def _(tmp):
    lines = qwen_lines()
    lines[3] = b"{oops" + ESC.encode()
    (tmp / "q.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return ["trace", "import", _p(tmp, "q.jsonl"), "-o", _p(tmp, OUT)]


@case("import-token-text-is-source")
def _(tmp):
    src = csv_file(tmp)
    return ["trace", "import", src, "-o", _p(tmp, OUT), "--token-text", src, "--force"]


@case("import-token-text-foreign")
def _(tmp):
    (tmp / "notes.txt").write_text("mine")
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--token-text", _p(tmp, "notes.txt"), "--force"]


@case("import-token-text-dir")
def _(tmp):
    (tmp / "d").mkdir()
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--token-text", _p(tmp, "d")]


@case("import-out-is-source")
def _(tmp):
    src = csv_file(tmp)
    return ["trace", "import", src, "-o", src, "--force"]


@case("import-out-is-source-folder")
def _(tmp):
    d = csv_folder(tmp)
    return ["trace", "import", d, "-o", d, "--force"]


@case("import-out-foreign-folder")
def _(tmp):
    (tmp / "keep").mkdir()
    (tmp / "keep" / "a.txt").write_text("x")
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, "keep"), "--force"]


@case("import-out-exists-no-force")
def _(tmp):
    good_trace(tmp, "have")
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, "have")]


@case("import-out-new-folders", 0)
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT, "such", "out"), "-q"]


@case("import-out-under-file")
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", os.path.join(csv_file(tmp, "x_1.csv"), "out")]


@case("import-out-symlink")
def _(tmp):
    good_trace(tmp, "real")
    os.symlink(tmp / "real", tmp / "link")
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, "link"), "--force"]


@case("import-out-locked-partial")
def _(tmp):
    w = TraceWriter(tmp / OUT, META)
    _LIVE.append(w)  # held open for the case: a recording in progress
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--force"]


@case("import-out-foreign-partial")
def _(tmp):
    (tmp / (OUT + ".partial")).mkdir()
    (tmp / (OUT + ".partial") / "x").write_text("x")
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, OUT), "--force"]


@case("import-given-twice")
def _(tmp):
    src = csv_file(tmp)
    return ["trace", "import", src, src, "-o", _p(tmp, OUT)]


@case("import-long-name")
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, "x" * 300)]


@case("import-nul-in-name")
def _(tmp):
    return ["trace", "import", csv_file(tmp), "-o", _p(tmp, "a\x00b")]


@case("import-hostile-name", 0)
def _(tmp):
    return ["trace", "import", csv_file(tmp, "prompt_1" + ESC + "\u202e.csv"), "-o", _p(tmp, OUT), "-q"]


for kind in ("fifo", "socket", "loop", "dangling", "outside", "dirloop", "devnull"):
    CASES.append((f"import-folder-with-{kind}",
                  lambda tmp, k=kind: ["trace", "import", with_special(k)(tmp), "-o", _p(tmp, OUT), "-q"], {0}))


# analyze ------------------------------------------------------------------------------------------------
@case("analyze-out-is-file")
def _(tmp):
    return ["analyze", T(tmp), "-o", csv_file(tmp), "-q"]


@case("analyze-out-foreign-folder")
def _(tmp):
    (tmp / "keep").mkdir()
    (tmp / "keep" / "a.txt").write_text("x")
    return ["analyze", T(tmp), "-o", _p(tmp, "keep"), "-q"]


@case("analyze-out-is-the-trace")
def _(tmp):
    t = T(tmp)
    return ["analyze", t, "-o", t, "-q"]


@case("analyze-against-missing")
def _(tmp):
    return ["analyze", T(tmp), "-o", _p(tmp, OUT), "-q", "--against", _p(tmp, "nope")]


@case("analyze-against-other-model")
def _(tmp):
    other = good_trace(tmp, "o", meta=TraceMeta(num_experts=4, top_k=1, moe_layers=[0]))
    return ["analyze", T(tmp), "-o", _p(tmp, OUT), "-q", "--against", other, "--no-simulate"]


# degenerate but valid inputs: an answer or a clear refusal ---------------------------------------------
DEGENERATE = {
    "one-token": lambda tmp: good_trace(tmp, tokens=1, seqs=1),
    "two-tokens": lambda tmp: good_trace(tmp, tokens=2, seqs=1),
    "one-expert": lambda tmp: good_trace(tmp, meta=TraceMeta(num_experts=1, top_k=1, moe_layers=[0], bytes_per_expert=2**20)),
    "one-layer-topk-all": lambda tmp: good_trace(tmp, meta=TraceMeta(num_experts=2, top_k=2, moe_layers=[3], bytes_per_expert=2**20)),
    "all-missing": lambda tmp: good_trace(tmp, ids=np.full((30, 2, 2), -1, np.int16)),
    "all-dropped": lambda tmp: good_trace(tmp, ids=np.full((30, 2, 2), -2, np.int16)),
    "one-sequence": lambda tmp: good_trace(tmp, seqs=1),
    "empty": lambda tmp: good_trace(tmp, ids=np.zeros((0, 2, 2), np.int16)),
}
for name, build in DEGENERATE.items():
    CASES.append((f"degenerate-info-{name}", lambda tmp, b=build: ["trace", "info", b(tmp)], {0}))
    CASES.append((f"degenerate-analyze-{name}",
                  lambda tmp, b=build: ["analyze", b(tmp), "-o", _p(tmp, OUT), "-q", "--belady-tokens", "50",
                                        "--sim-tokens", "20"], {0, 2}))
    CASES.append((f"degenerate-bench-{name}",
                  lambda tmp, b=build: ["bench", b(tmp), "--quiet", "--policies", "lru,belady",
                                        "--capacity", "50%", "--jobs", "1"], {0, 2}))
    CASES.append((f"degenerate-bench-fit-{name}",
                  lambda tmp, b=build: ["bench", b(tmp), "--quiet", "--policies", "static,lru", "--predictor",
                                        "transition", "--fit", b(tmp / "fit") if (tmp / "fit").mkdir() is None else "",
                                        "--capacity", "1", "--jobs", "1", "--json"], {0, 2}))


# bench arguments ------------------------------------------------------------------------------------------
for i, extra in enumerate([["--policies", "nope"], ["--policies", ""], ["--policies", "lru:x"],
                           ["--policies", "lru:half_life=oops"], ["--capacity", "abc"], ["--capacity", "0%"],
                           ["--capacity", "1"], ["--capacity", "nan%"], ["--capacity", "-5"], ["--scope", "nope"],
                           ["--fit-share", "2"], ["--fit-share", "nan"], ["--jobs", "0"], ["--jobs", "-2"],
                           ["--prefetch-depth", "2"], ["--predictor", "nope"], ["--miss-rule", "nope"],
                           ["--prefetch-rule", "nope"], ["--hardware", "/nonexistent.json"],
                           ["--bytes-per-expert", "-5"], ["--prefetch-budget", "-1"],
                           ["--predictor", "transition", "--prefetch-depth", "99"],
                           ["--predictor-param", "oops"], ["--fit", "/nonexistent"], ["--suite", "x"],
                           ["-o", "x"]]):
    CASES.append((f"bench{i}:{' '.join(extra)[:30]}",
                  lambda tmp, e=extra: ["bench", T(tmp), "--quiet", *e], {2}))


@case("bench-hardware-not-json")
def _(tmp):
    return ["bench", T(tmp), "--quiet", "--hardware", csv_file(tmp)]


@case("bench-hardware-fifo")
def _(tmp):
    return ["bench", T(tmp), "--quiet", "--hardware", fifo(tmp, "hw.json")]


# record and serve --------------------------------------------------------------------------------------
for i, argv in enumerate([["record"], ["record", "--prompts", "/nonexistent", "-o", "OUT"], ["record", "--prompts", "/dev/null", "-o", "OUT"],
                          ["serve", "--port", "abc"], ["serve", "--max-queue", "x"]]):
    CASES.append((f"cmd{i}:{' '.join(argv)[:30]}", lambda tmp, a=argv: [x if x != "OUT" else _p(tmp, OUT) for x in a],
                  {2}))


@case("record-out-foreign-folder")
def _(tmp):
    (tmp / "p.txt").write_text("hello\n")
    (tmp / "keep").mkdir()
    (tmp / "keep" / "a.txt").write_text("x")
    return ["record", "--prompts", _p(tmp, "p.txt"), "-o", _p(tmp, "keep"), "--force", "--max-new-tokens", "2"]


@case("record-prompts-fifo")
def _(tmp):
    return ["record", "--prompts", fifo(tmp, "p.txt"), "-o", _p(tmp, OUT)]


@case("record-bad-flush")
def _(tmp):
    (tmp / "p.txt").write_text("hello\n")
    return ["record", "--prompts", _p(tmp, "p.txt"), "-o", _p(tmp, OUT), "--flush-seconds", "nan"]


_LIVE: list[TraceWriter] = []


@pytest.fixture(autouse=True)
def _release_live_writers():
    yield
    while _LIVE:
        _LIVE.pop().abandon()


def run_case(tmp: Path, build: Callable[[Path], list[str]], capsys) -> tuple[int, str, str, dict, dict]:
    argv = build(tmp)
    before = snapshot(tmp, OUT)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err, before, snapshot(tmp, OUT)


def check_style(code: int, out: str, err: str) -> None:
    assert code != 3, f"internal error: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    for text in (out, err):
        assert "\x1b[31m" not in text and "\u202e" not in text, "a control character from a file reached the terminal"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ": error: " in ln]
        assert len(errors) == 1 and lines[-1] == errors[0], err
        assert lines[-1].startswith("moecache")
    if code == 0:
        assert " nan" not in out.lower() and "nan%" not in out.lower(), "a 0/0 shown as a figure"


@pytest.mark.parametrize("name,build,statuses", CASES, ids=[c[0] for c in CASES])
def test_probe(name, build, statuses, tmp_path, capsys):
    code, out, err, before, after = run_case(tmp_path, build, capsys)
    check_style(code, out, err)
    assert code in statuses, f"status {code}; stderr: {err[-500:]}"
    assert before == after, f"files outside {OUT} changed: " + str(
        sorted(set(before.items()) ^ set(after.items()))[:5])


def test_probe_list_is_long_enough():
    assert len(CASES) >= 100
