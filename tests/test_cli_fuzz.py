"""Property-based fuzzing of the CLI: every command on generated bad inputs (damaged traces, wrong types,
hostile file names, special files) through ``main()`` in-process.

Properties: the status is never 3 (internal error); status 2 comes with exactly one ``error:`` line and
no traceback; no control character from a file reaches the terminal; no file outside the output path
is created, changed or deleted. Example counts are bounded so the suite stays fast on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecache.cli import main

from .test_probe_cli import OUT, check_style, csv_file, good_trace, snapshot

FUZZ = settings(max_examples=int(os.environ.get("MOECACHE_FUZZ_EXAMPLES", "25")), deadline=None,
                derandomize=not os.environ.get("MOECACHE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- inputs ------------------------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)
hostile_names = st.sampled_from(["plain", "sp ace", "-dash", "--force", "\x1b[2J", "ünï", "\u202ertl", "a\nb",
                                 "x" * 255, "..", ".hidden", "*", "$(id)", "a\tb", "\x7f"])
numbers = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "1.5", "", " ", "0x10", "9" * 40, "1e-400",
                           "½", "NaN%", "50%", "-50%", "1000%", "abc", "1,2,", ",", "0%"])
SPECIAL = ["missing", "file", "fifo", "dir", "empty-dir", "trace", "damaged", "partial", "symlink-loop", "dev"]


def make_input(root: Path, kind: str, name: str, damage: tuple[str, object] | None) -> str:
    """One input path of ``kind`` under ``root``."""
    path = root / ("in_" + name.replace("/", "_").replace("\0", "_"))[:200]
    if kind == "missing":
        return str(path)
    if kind == "file":
        return csv_file(root, path.name + ".csv")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
        csv_file(path)
    elif kind == "empty-dir":
        path.mkdir()
    elif kind in ("trace", "damaged", "partial"):
        good_trace(root, path.name, tokens=12, seqs=2)
        if kind == "damaged" and damage is not None:
            mf = path / "manifest.json"
            header = json.loads(mf.read_text())
            key, value = damage
            where = header["meta"] if key.startswith("meta.") else header
            where[key.split(".", 1)[-1]] = value
            mf.write_text(json.dumps(header, default=str))
        if kind == "partial":
            (path / "manifest.json").unlink()
            path.rename(str(path) + ".partial")
            return str(path) + ".partial"
    elif kind == "symlink-loop":
        os.symlink(str(path) + "_b", path)
        os.symlink(path, str(path) + "_b")
    elif kind == "dev":
        return "/dev/null"
    return str(path)


damages = st.tuples(st.sampled_from(["version", "format", "chunks", "rows", "drops", "meta", "meta.num_experts",
                                     "meta.top_k", "meta.moe_layers", "meta.weights", "meta.id_order",
                                     "meta.files", "meta.extra", "meta.model", "meta.bytes_per_expert"]),
                    json_values)


def run_and_check(root: Path, argv: list[str], capsys) -> int:
    before = snapshot(root, OUT)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    check_style(code, out, err)
    assert code in (0, 1, 2), (argv, code, err)
    assert snapshot(root, OUT) == before, f"files outside {OUT} changed by {argv}"
    return code


def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="moecache-fuzz-"))


# -- properties --------------------------------------------------------------------------------------------
@FUZZ
@given(kind=st.sampled_from(SPECIAL), name=hostile_names, damage=damages, json_flag=st.booleans())
def test_trace_info_and_finalise(capsys, kind, name, damage, json_flag):
    root = _root()
    try:
        p = make_input(root, kind, name, damage)
        run_and_check(root, ["trace", "info", p] + (["--json"] if json_flag else []), capsys)
        if kind != "partial":  # finalising a partial renames it: that is its output
            run_and_check(root, ["trace", "finalise", p], capsys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(kind=st.sampled_from(SPECIAL), name=hostile_names, out_kind=st.sampled_from(["new", "file", "dir", "trace",
                                                                                     "src", "nested"]),
       force=st.booleans(), lenient=st.booleans(), fmt=st.sampled_from(["auto", "hf-gate-csv", "nope",
                                                                         "vllm-moe-logger"]),
       token_text=st.sampled_from([None, "new", "src", "file", "dir"]))
def test_trace_import(capsys, kind, name, out_kind, force, lenient, fmt, token_text):
    root = _root()
    try:
        src = make_input(root, kind, name, None)
        out = {"new": root / OUT, "file": Path(csv_file(root, "o.csv")), "dir": root / "odir",
               "trace": Path(good_trace(root, "otrace")), "src": Path(src), "nested": root / "no" / "OUT"}[out_kind]
        if out_kind == "dir":
            out.mkdir()
            (out / "keep.txt").write_text("keep")
        argv = ["trace", "import", src, "-o", str(out), "-q", "--format", fmt]
        argv += ["--force"] if force else []
        argv += ["--lenient"] if lenient else []
        if token_text is not None:
            tt = {"new": str(root / "tokens.jsonl"), "src": src, "file": csv_file(root, "t.csv"),
                  "dir": str(root)}[token_text]
            argv += ["--token-text", tt]
        # the output path is OUT only when out_kind is "new"; other outputs must stay untouched
        run_and_check(root, argv, capsys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(kind=st.sampled_from(SPECIAL), name=hostile_names, damage=damages,
       option=st.sampled_from(["--belady-tokens", "--sim-tokens", "--capacities", "--windows", "--segments",
                               "--depths", "--predictor-tokens", "--against"]),
       value=numbers)
def test_analyze(capsys, kind, name, damage, option, value):
    root = _root()
    try:
        p = make_input(root, kind, name, damage)
        if option == "--against":
            value = make_input(root, "damaged", "other", damage)
        run_and_check(root, ["analyze", p, "-o", str(root / OUT), "-q", "--no-simulate", "--belady-tokens", "20",
                             option, value], capsys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(kind=st.sampled_from(SPECIAL), name=hostile_names, damage=damages,
       option=st.sampled_from(["--capacity", "--fit-share", "--jobs", "--prefetch-depth", "--prefetch-budget",
                               "--bytes-per-expert", "--policies", "--scope", "--predictor", "--hardware", "--fit",
                               "--miss-rule", "--prefetch-rule", "--predictor-param", "--suite"]),
       value=numbers | hostile_names)
def test_bench(capsys, kind, name, damage, option, value):
    root = _root()
    try:
        p = make_input(root, kind, name, damage)
        if option in ("--hardware", "--fit", "--suite"):
            value = make_input(root, kind if kind != "trace" else "damaged", "opt", damage)
        run_and_check(root, ["bench", p, "--quiet", "--policies", "lru", "--capacity", "50%", "--jobs", "1",
                             option, value], capsys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(option=st.sampled_from(["--max-new-tokens", "--cache-slots", "--experts-fraction", "--gpu-memory",
                               "--prefetch-depth", "--dtype", "--device", "--copy-engine", "--policy", "--predictor",
                               "--hybrid", "--seed", "--model", "--json"]),
       value=numbers | hostile_names, kind=st.sampled_from(SPECIAL))
def test_generate_bad_arguments(capsys, option, value, kind):
    root = _root()
    try:
        if option in ("--model", "--json"):
            value = make_input(root, kind if kind != "missing" or option == "--model" else "dir", "m", None)
        argv = ["generate", option, value, "--max-new-tokens", "0"]  # always one bad value: nothing generates
        if option == "--max-new-tokens":
            argv = ["generate", option, value if value not in ("1.5",) else "-1"]
            try:
                if int(value) >= 1:
                    argv += ["--dtype", "int8"]
            except ValueError:
                pass
        assert run_and_check(root, argv, capsys) == 2
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_fuzz_inputs_cover_every_command():
    from moecache.cli import COMMAND_MODULES

    fuzzed = {"trace", "analyze", "bench", "generate"}
    # record: its bad inputs are in the probe list; serve starts a server on valid input, so only its
    # argument errors are probed there; doctor takes no input
    assert fuzzed | {"doctor", "record", "serve"} == set(COMMAND_MODULES)
    assert np.isfinite(1.0)
