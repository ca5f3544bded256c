"""Fuzzing every importer with malformed input.

Strict: the project's own error (TraceFormatError / MoecacheError) every time, never a bare
KeyError / ValueError / IndexError or a crash, and for a bad record the error names its file and
1-based line. Lenient: no exception, and the ``malformed:*`` counts add up to the number of bad
records injected (where a record is well defined: a JSON line, a CSV row, a step object).
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecache.errors import MoecacheError, TraceFormatError
from moecache.trace.importers import hf_gate_csv, read_sources

from .test_importers import (ds_ids, ds_lines, llama_steps, mix_ids, mix_processed_lines, mix_raw_lines, qwen_lines,
                             write_lines)

FUZZ = settings(max_examples=30, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])


def malformed(drops: dict[str, int]) -> int:
    return sum(v for k, v in drops.items() if k.startswith("malformed:"))


def run(paths, fmt, lenient):
    """Import; return the traces, or the project's error (anything else fails the test)."""
    try:
        return read_sources([str(p) for p in paths], fmt, lenient=lenient)[1]
    except MoecacheError as e:
        return e


# -- corruptions of one JSON record -----------------------------------------------------------------

WRONG_VALUES = ["3", 1.5, None, [], {}, True]


@st.composite
def json_corruption(draw, fields: list[str], ids_key: str, experts: int):
    """A function bytes -> bytes that makes one JSON-line record unreadable, and its name."""
    kind = draw(st.sampled_from(["truncate", "bad_json", "non_utf8", "wrong_type", "out_of_range",
                                 "mixed_top_k", "missing_field", "nan_weight", "not_object"]))
    cut = draw(st.floats(0.05, 0.95))
    field = draw(st.sampled_from(fields))
    value = draw(st.sampled_from(WRONG_VALUES))
    big = draw(st.integers(0, 10**6))

    def apply(raw: bytes) -> bytes:
        obj = json.loads(raw)
        if kind == "truncate":
            return raw[: max(1, min(len(raw) - 1, int(len(raw) * cut)))]
        if kind == "bad_json":
            return raw.replace(b":", b"", 1)
        if kind == "non_utf8":
            k = int(len(raw) * cut)
            return raw[:k] + b"\xff\xfe" + raw[k:]
        if kind == "wrong_type":  # a string field given another string would still be valid
            obj[field] = 1.5 if type(obj.get(field)) is str and type(value) is str else value
        elif kind == "out_of_range":
            obj[ids_key][0] = experts + big if big % 2 else -1 - big
        elif kind == "mixed_top_k":
            obj[ids_key] = obj[ids_key][:-1] if big % 2 else obj[ids_key] + [max(obj[ids_key]) + 1]
        elif kind == "missing_field":
            del obj[field]
        elif kind == "nan_weight":
            obj["topk_weights" if "topk_weights" in obj else "gating_probs"][0] = math.nan
        elif kind == "not_object":
            obj = [obj]
        return json.dumps(obj).encode()

    return kind, apply


QWEN_FIELDS = ["type", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"]
MIX_FIELDS = ["dataset", "problem_id", "layer", "experts", "gating_probs", "token_idx"]


@FUZZ
@given(data=st.data(), n_bad=st.integers(1, 4), warm=st.integers(0, 30), real=st.integers(1, 12))
def test_vllm_corrupt_records(data, n_bad, warm, real):
    lines = qwen_lines(warm=warm, real=real + n_bad)
    rows = data.draw(st.lists(st.integers(1, len(lines) - 1), min_size=n_bad, max_size=n_bad, unique=True))
    for i in rows:
        _, apply = data.draw(json_corruption(QWEN_FIELDS, "topk_ids", 60))
        lines[i] = apply(lines[i])
    with tempfile.TemporaryDirectory() as d:
        p = write_lines(Path(d) / "moe_layer8.jsonl", lines)
        err = run([p], "vllm-moe-logger", False)
        assert isinstance(err, TraceFormatError) and err.path == str(p) and err.line == min(rows) + 1
        traces = run([p], "vllm-moe-logger", True)
        assert isinstance(traces, list), traces
        drops = traces[0].drops
        assert malformed(drops) == n_bad
        assert len(traces[0].block) + drops.get("warmup_dummy", 0) == len(lines) - 1 - n_bad


@FUZZ
@given(data=st.data(), n_bad=st.integers(1, 4), raw=st.booleans())
def test_speculative_corrupt_records(data, n_bad, raw):
    if raw:
        lines = mix_raw_lines(mix_ids(2, 1), mix_ids(3, 2))
        fields = [f if f != "token_idx" else "token_pos" for f in MIX_FIELDS]
    else:
        lines = mix_processed_lines({0: mix_ids(3), 1: mix_ids(2, 1)})
        fields = MIX_FIELDS
    rows = data.draw(st.lists(st.integers(0, len(lines) - 1), min_size=n_bad, max_size=n_bad, unique=True))
    for i in rows:
        _, apply = data.draw(json_corruption(fields, "experts", 8))
        lines[i] = apply(lines[i])
    with tempfile.TemporaryDirectory() as d:
        p = write_lines(Path(d) / "x_routing.jsonl", lines)
        err = run([p], "speculative-moe", False)
        assert isinstance(err, TraceFormatError) and err.line == min(rows) + 1
        traces = run([p], "speculative-moe", True)
        assert isinstance(traces, list), traces
        t = traces[0]
        assert malformed(t.drops) == n_bad
        present = int((t.block.ids[..., 0] >= 0).sum())
        assert present == len(lines) - n_bad  # every readable record is in the trace


# -- gate-hook CSV -------------------------------------------------------------------------------------

CSV_BAD_IDS = ["[1, 2, 3]", "[1, 2, 3, 4, 5, 64]", "[1, 1, 2, 3, 4, 5]", "x", "[1, 2, 3, 4, 5, -1]", "[]",
               "[1, 2, 3, 4, 5, 999999999999999999999]", "[1.0, 2, 3, 4, 5, 6]"]


@FUZZ
@given(data=st.data(), n=st.integers(1, 3), n_bad=st.integers(1, 5))
def test_csv_corrupt_rows(data, n, n_bad):
    ids = ds_ids(n, data.draw(st.integers(0, 99)))
    lines = ds_lines([f"t{i}" for i in range(n)], ids)
    rows = data.draw(st.lists(st.integers(1, len(lines) - 1), min_size=n_bad, max_size=n_bad, unique=True))
    for i in rows:
        kind = data.draw(st.sampled_from(["ids", "batch", "non_utf8", "drop_field", "extra_field"]))
        layer, batch, tok, rest = lines[i].split(b",", 3)
        if kind == "ids":
            lines[i] = b",".join([layer, batch, tok, b'"' + data.draw(st.sampled_from(CSV_BAD_IDS)).encode() + b'"\r'])
        elif kind == "batch":
            lines[i] = b",".join([layer, data.draw(st.sampled_from([b"1", b"x", b""])), tok, rest])
        elif kind == "non_utf8":
            lines[i] = b",".join([layer, batch, tok + b"\xc3\x28", rest])
        elif kind == "drop_field":
            lines[i] = b",".join([layer, batch, tok]) + b"\r"
        else:
            lines[i] = b",".join([layer, batch, tok, b"extra", rest])
    with tempfile.TemporaryDirectory() as d:
        p = write_lines(Path(d) / "prompt_1_data.csv", lines)
        err = run([p], "hf-gate-csv", False)
        assert isinstance(err, TraceFormatError) and err.path == str(p) and err.line == min(rows) + 1
        traces = run([p], "hf-gate-csv", True)
        assert isinstance(traces, list), traces
        t = traces[0]
        assert malformed(t.drops) == n_bad
        bad = np.zeros((n, 26), bool)
        for i in rows:
            bad[(i - 1) % n, (i - 1) // n] = True
        assert ((t.block.ids < 0).all(axis=2) == bad).all()
        np.testing.assert_array_equal(t.block.ids[~bad], ids[~bad])


@FUZZ
@given(tokens=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"),
                               max_size=6), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_csv_any_token_text_round_trips(tokens, seed):
    """Quotes, commas and newlines in token strings: both parsers give back the written tokens."""
    ids = ds_ids(len(tokens), seed)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\r\n")
            w.writerow(hf_gate_csv.HEADER)
            for j in range(26):
                for i, tok in enumerate(tokens):
                    w.writerow([j + 1, 0, tok, "[" + ", ".join(str(x) for x in ids[i, j]) + "]"])
        traces = run([p], "hf-gate-csv", False)
        assert isinstance(traces, list), traces
        assert traces[0].token_text == [tokens]
        np.testing.assert_array_equal(traces[0].block.ids, ids)


# -- per-step JSON -------------------------------------------------------------------------------------

def step_lines(steps: list) -> tuple[str, list[int]]:
    """Serialise a list of steps one indented object after another; also each step's first line."""
    parts, starts, line = [], [], 2
    for s in steps:
        text = json.dumps(s, indent=4)
        parts.append(text)
        starts.append(line)
        line += text.count("\n") + 1
    return "[\n" + ",\n".join(parts) + "\n]\n", starts


draw_free = ["x", {}, None]


@st.composite
def step_corruption(draw):
    kind = draw(st.sampled_from(["ids_type", "expert_id", "top_k", "dense_layer", "missing_key", "extra_key",
                                 "layer_type", "token_count", "step_type"]))
    layer = str(draw(st.sampled_from(range(1, 48, 2))))
    value = draw(st.sampled_from([["3"], [1.5], [True], [None], "7", 7]))
    big = draw(st.integers(0, 10**6))

    def apply(step):
        step = json.loads(json.dumps(step))
        if kind == "ids_type":
            step[layer][0] = value
        elif kind == "expert_id":
            step[layer][0] = [128 + big] if big % 2 else [-1 - big]
        elif kind == "top_k":
            step[layer][0] = [1, 2] if big % 2 else []
        elif kind == "dense_layer":
            step[str(2 * (big % 24))] = [[1]]
        elif kind == "missing_key":
            del step[layer]
        elif kind == "extra_key":
            step["48"] = None
        elif kind == "layer_type":
            step[layer] = draw_free[big % 3]
        elif kind == "token_count":
            step[layer] = step[layer] + [[0]]
        elif kind == "step_type":
            return draw_free[big % 3]
        return step

    return kind, apply


@FUZZ
@given(data=st.data(), n_bad=st.integers(1, 3), n0=st.integers(1, 4), decode=st.integers(2, 6))
def test_chaos_corrupt_steps(data, n_bad, n0, decode):
    steps = llama_steps(n0=n0, decode=decode, seed=data.draw(st.integers(0, 99)))
    bad = data.draw(st.lists(st.integers(0, len(steps) - 1), min_size=n_bad, max_size=n_bad, unique=True))
    for i in bad:
        _, apply = data.draw(step_corruption())
        steps[i] = apply(steps[i])
    text, starts = step_lines(steps)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "0.json"
        p.write_text(text)
        err = run([p], "orders-in-chaos", False)
        assert isinstance(err, TraceFormatError) and err.line == starts[min(bad)]
        traces = run([p], "orders-in-chaos", True)
        if len(bad) == len(steps):
            assert isinstance(traces, TraceFormatError)  # nothing left to import
            return
        assert isinstance(traces, list), traces
        t = traces[0]
        assert malformed(t.drops) == n_bad
        assert sorted(set(t.block.step.tolist())) == [s for s in range(len(steps)) if s not in bad]
        if 0 in bad:
            assert (t.block.pos == -1).all()


# -- whole-file damage and arbitrary bytes -------------------------------------------------------------

def good_file(fmt: str, d: Path, name: str) -> Path:
    if fmt == "vllm-moe-logger":
        return write_lines(d / (name + ".jsonl"), qwen_lines())
    if fmt == "hf-gate-csv":
        return write_lines(d / (name + ".csv"), ds_lines(["a", "b"], ds_ids(2)))
    if fmt == "orders-in-chaos":
        p = d / (name + ".json")
        p.write_text(json.dumps(llama_steps(), indent=4))
        return p
    return write_lines(d / (name + ".jsonl"), mix_processed_lines({0: mix_ids(2)}))


FORMATS = ["vllm-moe-logger", "hf-gate-csv", "orders-in-chaos", "speculative-moe"]


@FUZZ
@given(fmt=st.sampled_from(FORMATS), kind=st.sampled_from(["empty", "truncate", "non_utf8", "garbage", "nested"]),
       cut=st.floats(0.0, 0.99))
def test_damaged_file_strict_errors_lenient_skips(fmt, kind, cut):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        damaged = good_file(fmt, d, "damaged")
        data = damaged.read_bytes()
        data = {"empty": b"", "truncate": data[: int(len(data) * cut)],
                "non_utf8": data[: int(len(data) * cut)] + b"\x80\xff" + data[int(len(data) * cut):],
                "garbage": b"\x00\x01 not a log \xfe",
                "nested": data[: int(len(data) * cut)] + b"[" * 5000 + b"\n"}[kind]
        damaged.write_bytes(data)
        strict = run([damaged], fmt, False)
        assert isinstance(strict, (MoecacheError, list))
        if fmt == "vllm-moe-logger":
            return  # a second file of another layer would make a second trace; covered above
        good = good_file(fmt, d, "good")
        lenient = run([good, damaged], fmt, True)
        assert isinstance(lenient, list), lenient


@settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), edits=st.lists(st.tuples(st.floats(0, 1), st.binary(max_size=4)), max_size=4),
       lenient=st.booleans())
def test_random_byte_edits_never_crash(fmt, edits, lenient):
    """Overwrite random spots of a valid file with random bytes: our error or a trace, nothing else."""
    with tempfile.TemporaryDirectory() as d:
        p = good_file(fmt, Path(d), "f")
        data = bytearray(p.read_bytes())
        for where, junk in edits:
            k = int(where * len(data))
            data[k:k + len(junk)] = junk
        p.write_bytes(bytes(data))
        out = run([p], fmt, lenient)
        assert isinstance(out, (MoecacheError, list))
        if isinstance(out, list):
            for t in out:
                t.trace()  # what an importer returns always validates


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.binary(max_size=300), lenient=st.booleans())
def test_arbitrary_bytes_never_crash(fmt, data, lenient):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.bin"
        p.write_bytes(data)
        out = run([p], fmt, lenient)
        assert isinstance(out, (MoecacheError, list))
