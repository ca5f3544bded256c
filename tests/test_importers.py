"""Importers for published routing traces: the real files (from ../shared, skipped where absent) and
small hand-made files for every format and every defect rule."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from moecache.cli import main
from moecache.errors import ConfigError, TraceFormatError, UnsupportedModelError
from moecache.trace import PHASE_DECODE, PHASE_PREFILL, PHASE_UNKNOWN, open_trace
from moecache.trace.importers import FORMATS, collect_sources, detect_format, import_traces, read_sources
from moecache.trace.importers import hf_gate_csv, vllm_logger
from moecache.trace.importers.base import Defects

QWEN = "qwen1.5-moe-a2.7b-chat__vllm-moe-logger"
DEEPSEEK = "deepseek-v2-lite-chat__moe-beyond"
LLAMA = "llama-4-maverick-17b-128e-instruct__patterns-behind-chaos-subset"
MIXTRAL = "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe"
QWEN_MODEL = "Qwen/Qwen1.5-MoE-A2.7B-Chat"


# -- writers of small hand-made files (shared with test_importers_fuzz.py) ---------------------------

def qwen_lines(layer: int = 8, warm: int = 20, real: int = 12, seed: int = 0, pass_size: int = 5) -> list[bytes]:
    """A vLLM-logger file: meta line, ``warm`` dummy records (one id set, permuted), ``real`` records
    in forward passes of ``pass_size`` tokens (token_idx restarts each pass)."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"type": "meta", "model_id": QWEN_MODEL, "vllm_version": "x", "layers_logged": [layer],
                         "top_k": 4, "seed": 1}).encode()]
    dummy = [3, 17, 42, 5]
    for i in range(warm):
        ids = dummy if i < warm // 2 else dummy[::-1]
        lines.append(_route(layer, i, ids, [0.4, 0.3, 0.2, 0.1]))
    for i in range(real):
        ids = [int(x) for x in rng.choice(60, 4, replace=False)]
        w = sorted((float(x) for x in rng.random(4) / 4), reverse=True)
        lines.append(_route(layer, i % pass_size, ids, w))
    return lines


def _route(layer, token_idx, ids, w) -> bytes:
    return json.dumps({"type": "route", "req_id": "r1", "token_idx": token_idx, "layer": layer, "topk_ids": ids,
                       "topk_weights": w}).encode()


def ds_ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(64, 6, replace=False) for _ in range(26)]) for _ in range(n)])


def ds_lines(tokens: list[str], ids: np.ndarray, *, crlf: bool = True, sep: str = ", ") -> list[bytes]:
    """A gate-hook CSV: header, then layer-major rows (csv-quoted like the published files)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(hf_gate_csv.HEADER)
    for j in range(26):
        for i, tok in enumerate(tokens):
            w.writerow([j + 1, 0, tok, "[" + sep.join(str(int(x)) for x in ids[i, j]) + "]"])
    lines = out.getvalue().split("\n")[:-1]
    return [(line + ("\r" if crlf else "")).encode() for line in lines]


def llama_steps(n0: int = 4, decode: int = 6, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    steps = []
    for s in range(decode + 1):
        n = n0 if s == 0 else 1
        steps.append({str(k): ([[int(rng.integers(128))] for _ in range(n)] if k % 2 else None) for k in range(48)})
    return steps


def llama_text(steps: list) -> str:
    return json.dumps(steps, indent=4)


def mix_ids(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(32)]) for _ in range(n)])
    p = rng.uniform(0.5, 1.0, (n, 32))
    return ids, np.stack([p, 1 - p], axis=-1)


def mix_processed_lines(problems: dict[int, tuple[np.ndarray, np.ndarray]], dataset: str = "gsm8k",
                        missing: set = frozenset()) -> list[bytes]:
    """Layer-major records per problem; ``missing`` = {(problem, token, layer)} left out."""
    lines = []
    for pid, (ids, w) in problems.items():
        for layer in range(32):
            for t in range(len(ids)):
                if (pid, t, layer) in missing:
                    continue
                lines.append(json.dumps({"dataset": dataset, "problem_id": pid, "layer": layer,
                                         "experts": [int(x) for x in ids[t, layer]],
                                         "gating_probs": [float(x) for x in w[t, layer]], "token_idx": t}).encode())
    return lines


def mix_raw_lines(pre: tuple[np.ndarray, np.ndarray], dec: tuple[np.ndarray, np.ndarray], pid: int = 0,
                  dataset: str = "humaneval", missing: set = frozenset()) -> list[bytes]:
    """Prefill layer-major (token_pos = position), then decode token-major with token_pos 0;
    ``missing`` = {("pre"|"dec", token, layer)} left out."""
    def rec(layer, pos, e, p):
        return json.dumps({"dataset": dataset, "problem_id": pid, "layer": layer, "token_pos": pos,
                           "experts": [int(x) for x in e], "gating_probs": [float(x) for x in p]}).encode()
    lines = [rec(l, t, pre[0][t, l], pre[1][t, l]) for l in range(32) for t in range(len(pre[0]))
             if ("pre", t, l) not in missing]
    lines += [rec(l, 0, dec[0][t, l], dec[1][t, l]) for t in range(len(dec[0])) for l in range(32)
              if ("dec", t, l) not in missing]
    return lines


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.write_bytes(b"\n".join(lines) + end)
    return path


def only(sources, fmt="auto", lenient=False):
    """Read sources that make exactly one trace."""
    _, traces, _ = read_sources([str(s) for s in sources], fmt, lenient=lenient)
    assert len(traces) == 1
    return traces[0]


# -- registry and detection -----------------------------------------------------------------------

def test_registry_lists_the_four_formats():
    assert FORMATS.names() == ["hf-gate-csv", "orders-in-chaos", "speculative-moe", "vllm-moe-logger"]
    with pytest.raises(ConfigError, match="valid names: hf-gate-csv"):
        collect_sources(["."], "parquet")


def test_detect_format_from_content(tmp_path):
    q = write_lines(tmp_path / "a.jsonl", qwen_lines())
    d = write_lines(tmp_path / "b.csv", ds_lines(["a", "b"], ds_ids(2)))
    (tmp_path / "c.json").write_text(llama_text(llama_steps()))
    m = write_lines(tmp_path / "d.jsonl", mix_processed_lines({0: mix_ids(3)}))
    r = write_lines(tmp_path / "e.jsonl", mix_raw_lines(mix_ids(2), mix_ids(2, 1)))
    (tmp_path / "f.txt").write_text("hello\n")
    assert [detect_format(p) for p in (q, d, tmp_path / "c.json", m, r, tmp_path / "f.txt")] == \
        ["vllm-moe-logger", "hf-gate-csv", "orders-in-chaos", "speculative-moe", "speculative-moe", None]
    # the name of a file does not matter, only its content
    (tmp_path / "x.csv").write_text(llama_text(llama_steps()))
    assert detect_format(tmp_path / "x.csv") == "orders-in-chaos"
    with pytest.raises(TraceFormatError, match="cannot tell the format"):
        collect_sources([tmp_path / "f.txt"])
    with pytest.raises(ConfigError, match="mix formats"):
        collect_sources([q, d])


def test_folder_natural_order_and_skips(tmp_path):
    for n in (10, 2, 1):
        write_lines(tmp_path / f"prompt_{n}_data.csv", ds_lines(["t"], ds_ids(1, n)))
    (tmp_path / "README.md").write_text("notes\n")
    src = collect_sources([tmp_path])
    assert [os.path.basename(p) for p in src.files] == ["prompt_1_data.csv", "prompt_2_data.csv", "prompt_10_data.csv"]
    assert src.skipped == [(str(tmp_path / "README.md"), "not a log of a known format")]
    with pytest.raises(ConfigError, match="given twice"):
        collect_sources([tmp_path, tmp_path / "prompt_2_data.csv"])
    with pytest.raises(FileNotFoundError):
        collect_sources([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="no orders-in-chaos logs found"):
        collect_sources([tmp_path], "orders-in-chaos")


# -- vLLM MoE-logger (Qwen) -------------------------------------------------------------------------

def test_vllm_warmup_steps_and_weights(tmp_path):
    lines = qwen_lines(layer=8, warm=20, real=12, pass_size=5)
    t = only([write_lines(tmp_path / "moe_layer8.jsonl", lines)])
    assert t.drops == {"warmup_dummy": 20}
    assert len(t.block) == 12 and t.meta.moe_layers == [8] and t.meta.top_k == 4 and t.meta.num_experts == 60
    first = json.loads(lines[21])
    assert t.block.ids[0, 0].tolist() == first["topk_ids"]
    np.testing.assert_allclose(t.block.weights[-1, 0], json.loads(lines[-1])["topk_weights"], rtol=1e-6)
    assert t.block.step.tolist() == [0] * 5 + [1] * 5 + [2] * 2  # passes restart token_idx
    assert (t.block.phase == PHASE_UNKNOWN).all() and (t.block.pos == -1).all()
    assert t.meta.weights == "softmax" and t.meta.id_order == "score" and t.meta.family == "qwen2_moe"
    assert t.meta.bytes_per_expert == 3 * 2048 * 1408 * 2


def test_vllm_short_leading_run_is_real_text(tmp_path):
    lines = qwen_lines(warm=vllm_logger.WARMUP_MIN_RUN - 1, real=4)
    t = only([write_lines(tmp_path / "a.jsonl", lines)])
    assert "warmup_dummy" not in t.drops and len(t.block) == vllm_logger.WARMUP_MIN_RUN - 1 + 4


def test_vllm_weights_out_of_order_mean_router_order(tmp_path):
    lines = qwen_lines(warm=0, real=3)
    r = json.loads(lines[2])
    r["topk_weights"] = r["topk_weights"][::-1]
    lines[2] = json.dumps(r).encode()
    assert only([write_lines(tmp_path / "a.jsonl", lines)]).meta.id_order == "router"


def test_vllm_malformed_line_names_file_and_line(tmp_path):
    lines = qwen_lines(warm=20, real=6)
    lines[5] = lines[5][:30]
    p = write_lines(tmp_path / "a.jsonl", lines)
    with pytest.raises(TraceFormatError) as e:
        only([p])
    assert e.value.path == str(p) and e.value.line == 6
    t = only([p], lenient=True)
    assert t.drops == {"malformed:json": 1, "warmup_dummy": 19}


def test_vllm_header_model_and_layer_rules(tmp_path):
    lines = qwen_lines()
    with pytest.raises(TraceFormatError, match="meta object"):
        only([write_lines(tmp_path / "a.jsonl", lines[1:])], "vllm-moe-logger")
    bad = json.loads(lines[0])
    bad["model_id"] = "some/other-moe"
    with pytest.raises(UnsupportedModelError, match="Qwen1.5-MoE"):
        only([write_lines(tmp_path / "b.jsonl", [json.dumps(bad).encode()] + lines[1:])])
    other = [_route(9, 0, [1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1])]
    with pytest.raises(TraceFormatError, match="layer"):
        only([write_lines(tmp_path / "c.jsonl", lines + other)])


def test_vllm_several_layers_become_several_traces(tmp_path):
    a = write_lines(tmp_path / "moe_layer12.jsonl", qwen_lines(layer=12))
    b = write_lines(tmp_path / "moe_layer0.jsonl", qwen_lines(layer=0, seed=1))
    rep = import_traces([a, b], tmp_path / "out")
    assert [w.name for w in rep.written] == ["layer0", "layer12"]
    assert open_trace(tmp_path / "out" / "layer0").meta.moe_layers == [0]
    assert open_trace(tmp_path / "out" / "layer12").meta.files == [str(a)]
    c = write_lines(tmp_path / "again12.jsonl", qwen_lines(layer=12, seed=2))
    with pytest.raises(TraceFormatError, match="two runs of one layer"):
        read_sources([a, c])
    # --force replaces a trace but never a folder of something else
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a moecache trace"):
        import_traces([a], tmp_path / "keep", overwrite=True)
    assert (tmp_path / "keep" / "data.txt").exists()
    rep = import_traces([a], tmp_path / "out" / "layer0", overwrite=True, progress=True)
    assert open_trace(rep.written[0].path).meta.moe_layers == [12]


# -- HF gate-hook CSV (DeepSeek) --------------------------------------------------------------------

def test_csv_rows_positions_and_token_strings(tmp_path):
    toks = ["<｜begin▁of▁sentence｜>", "Hi", ",", '"', 'Ġ"))', "a,b"]
    ids = ds_ids(len(toks))
    p = write_lines(tmp_path / "prompt_1_data.csv", ds_lines(toks, ids))
    t = only([p])
    np.testing.assert_array_equal(t.block.ids, ids)
    assert t.block.pos.tolist() == list(range(6)) and (t.block.step == 0).all()
    assert (t.block.phase == PHASE_PREFILL).all() and (t.block.token == -1).all()
    assert t.token_text == [toks]
    assert t.meta.id_order == "router" and t.meta.weights == "absent" and t.meta.moe_layers == list(range(1, 27))


@pytest.mark.parametrize("variant", ["lf", "no_space", "quoted_layer", "no_final_newline"])
def test_csv_fast_and_slow_parsers_agree(tmp_path, variant):
    toks = ["a", "Ġb", ",", 'x"y']
    ids = ds_ids(4, 3)
    lines = ds_lines(toks, ids, crlf=variant != "lf", sep="," if variant == "no_space" else ", ")
    if variant == "quoted_layer":
        lines[3] = b'"' + lines[3][:1] + b'"' + lines[3][1:]
    p = write_lines(tmp_path / "p.csv", lines, end=b"" if variant == "no_final_newline" else b"\n")
    canonical = variant in ("lf", "no_final_newline")
    data = p.read_bytes()
    assert (hf_gate_csv._fast_rows(data) is not None) == canonical
    slow = hf_gate_csv._assemble(hf_gate_csv._slow_rows(data.decode(), str(p), Defects(), set()), str(p), Defects())
    np.testing.assert_array_equal(slow[0], ids)
    assert slow[1] == toks
    t = only([p])
    np.testing.assert_array_equal(t.block.ids, ids)
    assert t.token_text == [toks]


def test_csv_bad_row_strict_and_lenient(tmp_path):
    ids = ds_ids(3)
    lines = ds_lines(["a", "b", "c"], ids)
    lines[5] = lines[5].replace(b"[", b"[99, ")  # layer 2, token 1: seven ids
    p = write_lines(tmp_path / "p.csv", lines)
    with pytest.raises(TraceFormatError) as e:
        only([p])
    assert e.value.line == 6 and "top k" in str(e.value)
    t = only([p], lenient=True)
    assert t.drops == {"malformed:top_k": 1}
    assert (t.block.ids[1, 1] == -1).all()
    mask = np.ones(ids.shape, bool)
    mask[1, 1] = False
    np.testing.assert_array_equal(t.block.ids[mask], ids[mask])


def test_csv_unaligned_file_is_skipped_when_lenient(tmp_path):
    good = write_lines(tmp_path / "prompt_1_data.csv", ds_lines(["a", "b"], ds_ids(2)))
    lines = ds_lines(["a", "b"], ds_ids(2, 1))
    del lines[7]  # layer 4 loses a row
    bad = write_lines(tmp_path / "prompt_2_data.csv", lines)
    with pytest.raises(TraceFormatError, match="cannot be aligned"):
        only([good, bad])
    t = only([good, bad], lenient=True)
    assert t.drops == {"malformed:unaligned_file_rows": 51, "malformed:unaligned_files": 1}
    assert t.meta.files == [str(good)] and t.meta.extra["skipped_files"][0][0] == str(bad)


def test_csv_token_mismatch_between_layers(tmp_path):
    lines = ds_lines(["a", "b"], ds_ids(2))
    lines[4] = lines[4].replace(b",b,", b",B,")  # layer 2's second token
    p = write_lines(tmp_path / "p.csv", lines)
    with pytest.raises(TraceFormatError, match="do not line up") as e:
        only([p])
    assert e.value.line == 5
    t = only([p], lenient=True)
    assert t.drops == {"malformed:token_mismatch": 1} and (t.block.ids[1, 1] == -1).all()


def test_csv_non_utf8_row(tmp_path):
    lines = ds_lines(["a", "b"], ds_ids(2))
    lines[3] = lines[3].replace(b",a,", b",\xff,")
    p = write_lines(tmp_path / "p.csv", lines)
    with pytest.raises(TraceFormatError, match="not UTF-8") as e:
        only([p])
    assert e.value.line == 4
    t = only([p], lenient=True)
    assert t.drops == {"malformed:encoding": 1} and (t.block.ids[0, 1] == -1).all()
    assert t.token_text == [["a", "b"]]  # the position's token comes from another layer


# -- Orders in Chaos per-step JSON (Llama-4) --------------------------------------------------------

def test_chaos_steps_positions_and_phases(tmp_path):
    steps = llama_steps(n0=4, decode=6)
    (tmp_path / "7.json").write_text(llama_text(steps))
    t = only([tmp_path / "7.json"])
    assert len(t.block) == 10
    assert t.block.step.tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert t.block.pos.tolist() == list(range(10))
    assert t.block.phase.tolist() == [PHASE_PREFILL] * 4 + [PHASE_DECODE] * 6
    assert t.block.ids[2, 5, 0] == steps[0]["11"][2][0] and t.block.ids[9, 23, 0] == steps[6]["47"][0][0]
    assert t.meta.moe_layers == list(range(1, 48, 2)) and t.meta.top_k == 1 and t.meta.num_experts == 128
    assert any("relative to the first logged token" in n for n in t.meta.extra["notes"])


def test_chaos_bad_step_strict_and_lenient(tmp_path):
    steps = llama_steps(n0=3, decode=5)
    steps[2]["9"] = [[4, 5]]  # top-2 in a top-1 model
    text = llama_text(steps)
    (tmp_path / "0.json").write_text(text)
    with pytest.raises(TraceFormatError, match="bad step 2") as e:
        only([tmp_path / "0.json"])
    assert e.value.line == text[: text.index("{", text.index("}", text.index("}") + 1))].count("\n") + 1
    t = only([tmp_path / "0.json"], lenient=True)
    assert t.drops == {"malformed:top_k": 1}
    assert t.block.step.tolist() == [0, 0, 0, 1, 3, 4, 5]
    assert t.block.pos.tolist() == [0, 1, 2, 3, 5, 6, 7]  # positions come from the step index


def test_chaos_truncated_file_keeps_earlier_steps_when_lenient(tmp_path):
    text = llama_text(llama_steps(n0=2, decode=4))
    cut = text.index('"47"', text.index('"47"') + 1)  # inside step 1
    (tmp_path / "1.json").write_text(text[:cut])
    with pytest.raises(TraceFormatError, match="invalid JSON"):
        only([tmp_path / "1.json"])
    t = only([tmp_path / "1.json"], lenient=True)
    assert len(t.block) == 2 and t.drops == {"malformed:json_syntax": 1}


def test_chaos_numeric_file_order(tmp_path):
    for n in (10, 9):
        (tmp_path / f"{n}.json").write_text(llama_text(llama_steps(n0=n, decode=1, seed=n)))
    t = only([tmp_path])
    assert t.meta.extra["sequence_label"] == [f"{tmp_path.name}/9.json", f"{tmp_path.name}/10.json"]
    assert np.bincount(t.block.seq).tolist() == [10, 11]


# -- speculative-moe (Mixtral) ----------------------------------------------------------------------

def test_mixtral_processed_missing_layers_are_kept_and_counted(tmp_path):
    ids, w = mix_ids(5)
    p = write_lines(tmp_path / "gsm8k_2_routing.jsonl",
                    mix_processed_lines({0: (ids, w), 1: mix_ids(2, 1)}, missing={(0, 4, 3), (0, 4, 31), (0, 3, 7)}))
    t = only([p])
    assert t.meta.extra["sequence_label"] == ["gsm8k problem 0", "gsm8k problem 1"]
    assert t.drops == {"missing_layer_records": 3}
    b = t.block
    assert (b.ids[4, 3] == -1).all() and np.isnan(b.weights[4, 31]).all() and (b.ids[3, 7] == -1).all()
    assert b.ids[4, 4].tolist() == ids[4, 4].tolist()
    assert b.step[:5].tolist() == [1, 2, 3, 4, 5] and (b.pos == -1).all() and (b.phase == PHASE_DECODE).all()
    assert t.meta.weights == "renormalized" and t.meta.id_order == "score"


def test_mixtral_raw_prefill_then_token_major_decode(tmp_path):
    pre, dec = mix_ids(4), mix_ids(3, 1)
    missing = {("pre", 2, 5), ("dec", 0, 31), ("dec", 1, 0)}  # token 0 lacks its last layer, 1 its first
    p = write_lines(tmp_path / "routing_raw.jsonl", mix_raw_lines(pre, dec, missing=missing))
    t = only([p])
    b = t.block
    assert len(b) == 7 and b.phase.tolist() == [PHASE_PREFILL] * 4 + [PHASE_DECODE] * 3
    assert b.pos.tolist() == list(range(7)) and b.step.tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert (b.ids[2, 5] == -1).all() and (b.ids[4, 31] == -1).all() and (b.ids[5, 0] == -1).all()
    assert b.ids[5, 1].tolist() == dec[0][1, 1].tolist() and b.ids[6, 0].tolist() == dec[0][2, 0].tolist()
    assert t.drops == {"missing_layer_records": 3}


def test_mixtral_duplicate_request_keeps_the_raw_copy(tmp_path):
    ids, w = mix_ids(4, 2)
    other = mix_ids(3, 3)
    proc = write_lines(tmp_path / "humaneval_2_routing.jsonl",
                       mix_processed_lines({0: (ids, w), 1: other}, dataset="humaneval"))
    raw = write_lines(tmp_path / "routing_raw.jsonl",
                      mix_raw_lines(mix_ids(2, 4), (ids, w), missing={("dec", 1, 3)}))
    t = only([proc, raw])
    assert t.meta.extra["sequence_label"] == ["humaneval problem 1", "humaneval problem 0"]
    assert t.meta.files == [str(proc), str(raw)] and t.meta.extra["sequence_file"] == [0, 1]
    assert t.drops == {"duplicate_request_records": 4 * 32, "missing_layer_records": 1}
    assert t.meta.extra["duplicates"] == [{"request": "humaneval problem 0", "kept": str(raw), "dropped": str(proc),
                                           "records": 128}]
    assert (t.block.phase[t.block.seq == 1] == PHASE_PREFILL).sum() == 2
    # same key, different routing: two different runs, not a duplicate
    raw2 = write_lines(tmp_path / "raw2.jsonl", mix_raw_lines(mix_ids(2, 4), mix_ids(4, 9)))
    with pytest.raises(TraceFormatError, match="different routing"):
        only([proc, raw2])


# -- the real published files -----------------------------------------------------------------------

def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))[1:]


def test_real_deepseek_all_600_prompts(routing_dir, tmp_path):
    folder = routing_dir / DEEPSEEK
    start = time.perf_counter()
    t = only([folder])
    took = time.perf_counter() - start
    s = t.trace().summary()
    assert (s["tokens"], s["sequences"], s["layers"], s["experts"], s["top_k"]) == (55926, 600, 26, 64, 6)
    assert s["coverage"] == 1.0 and t.drops == {}
    assert took < 10, f"importing 600 CSVs took {took:.1f}s"
    labels = t.meta.extra["sequence_label"]
    nums = [int(x.split("_")[1]) for x in labels]
    assert nums == sorted(nums) and nums[:3] == [1, 2, 3] and 317 not in nums and nums[-1] == 601
    first, last = _csv_rows(folder / "training_data_eamc" / "prompt_1_data.csv"), \
        _csv_rows(folder / "training_data_eamc" / "prompt_601_data.csv")
    assert t.block.ids[0, 0].tolist() == json.loads(first[0][3]) == [8, 26, 56, 57, 60, 43]
    assert t.block.ids[-1, 25].tolist() == json.loads(last[-1][3])
    n601 = len(last) // 26
    assert int((t.block.seq == 599).sum()) == n601 and t.block.pos[-1] == n601 - 1
    assert t.token_text[0][0] == first[0][2] == "<｜begin▁of▁sentence｜>"
    assert t.token_text[-1][-1] == last[-1][2]


def test_real_deepseek_fast_parser_matches_csv_module(routing_dir):
    folder = routing_dir / DEEPSEEK / "training_data_eamc"
    for name in ("prompt_1_data.csv", "prompt_100_data.csv", "prompt_333_data.csv"):
        data = (folder / name).read_bytes()
        fast = hf_gate_csv._fast_rows(data)
        assert fast is not None
        slow = hf_gate_csv._slow_rows(data.decode(), name, Defects(), set())
        a, b = hf_gate_csv._assemble(fast, name, Defects()), hf_gate_csv._assemble(slow, name, Defects())
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]


def test_real_qwen_layers_warmup_and_rows(routing_dir):
    folder = routing_dir / QWEN
    _, traces, _ = read_sources([folder])
    assert [t.name for t in traces] == ["layer0", "layer8", "layer12", "layer18", "layer23"]
    for t in traces:
        layer = t.meta.moe_layers[0]
        lines = (folder / f"moe_layer{layer}.jsonl").read_text().splitlines()
        assert t.drops == {"warmup_dummy": 8448}
        assert len(t.block) == 12805 - 8448 == 4357
        assert t.block.ids[0, 0].tolist() == json.loads(lines[1 + 8448])["topk_ids"]
        assert t.block.ids[-1, 0].tolist() == json.loads(lines[-1])["topk_ids"]
        assert int(t.block.step.max()) + 1 == 129 and (t.block.seq == 0).all()
        assert t.meta.id_order == "score" and t.meta.files == [str(folder / f"moe_layer{layer}.jsonl")]


def test_real_mixtral_duplicates_and_missing_layers(routing_dir):
    folder = routing_dir / MIXTRAL
    t = only([folder])
    assert t.meta.extra["sequence_label"] == ["gsm8k problem 0", "gsm8k problem 1", "humaneval problem 1",
                                              "humaneval problem 0"]
    per_seq = np.bincount(t.block.seq).tolist()
    assert per_seq == [168, 79, 255, 135 + 83]
    # 10 + 5 + 29 missing at the last tokens of the processed problems (SOURCE.md), 122 in the raw
    # prefill, 77 in the raw decode
    assert t.drops == {"duplicate_request_records": 2648, "missing_layer_records": 10 + 5 + 29 + 122 + 77}
    first = json.loads((folder / "gsm8k_2_routing.jsonl").open().readline())
    assert t.block.ids[0, 0].tolist() == first["experts"] == [7, 0]
    np.testing.assert_allclose(t.block.weights[0, 0], first["gating_probs"], rtol=1e-6)
    assert (t.block.ids[166, 9] == -1).all()  # GSM8K problem 0, token 166 lacks layer 9
    raw = t.block.seq == 3
    assert t.block.pos[raw].tolist() == list(range(218)) and int(t.block.step[raw].max()) == 83
    # without the raw log, HumanEval problem 0 comes from the processed file
    t2 = only([folder / "humaneval_2_routing.jsonl"])
    assert np.bincount(t2.block.seq).tolist() == [83, 255] and t2.drops == {"missing_layer_records": 8 + 29}


def test_real_llama_requests(routing_dir):
    folder = routing_dir / LLAMA
    t = only([folder])
    s = t.trace().summary()
    assert (s["tokens"], s["sequences"], s["layers"], s["experts"], s["top_k"]) == (34517, 235, 24, 128, 1)
    labels = t.meta.extra["sequence_label"]
    assert labels[0] == "llama4-mmlu-abstract_algebra/0.json" and labels[99] == "llama4-mmlu-abstract_algebra/99.json"
    assert labels[100] == "llama4-mmlu-anatomy/100.json" and labels[-1] == "llama4-mmlu-anatomy/234.json"
    pre = np.bincount(t.block.seq[t.block.phase == PHASE_PREFILL], minlength=235)
    dec = np.bincount(t.block.seq[t.block.phase == PHASE_DECODE], minlength=235)
    assert (pre[:100].min(), round(pre[:100].mean(), 1), pre[:100].max()) == (2, 29.2, 59)
    assert (pre[100:].min(), round(pre[100:].mean(), 1), pre[100:].max()) == (2, 14.1, 51)
    assert (dec[:100] == 128).all() and (dec[100:].min(), round(dec[100:].mean(), 1), dec[100:].max()) == (53, 125.1, 128)
    first = json.loads((folder / "llama4-mmlu-abstract_algebra" / "0.json").read_text())
    assert t.block.ids[0, 0, 0] == first[0]["1"][0][0] and t.block.ids[pre[0], 23, 0] == first[1]["47"][0][0]


def test_cli_import_and_info_end_to_end(routing_dir, tmp_path, capsys):
    out = tmp_path / "mix"
    assert main(["trace", "import", str(routing_dir / MIXTRAL), "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "720 rows, 4 sequence(s) from 3 file(s)" in printed and "duplicate_request_records: 2,648" in printed
    assert "gsm8k_2_outputs.jsonl" in printed  # folder files left out are named
    assert "duplicate: humaneval problem 0 is logged in" in printed and "routing_raw.jsonl; kept the latter" in printed
    assert main(["trace", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info[k] for k in ("tokens", "sequences", "layers", "experts", "top_k")} == \
        {"tokens": 720, "sequences": 4, "layers": 32, "experts": 8, "top_k": 2}
    assert info["drops"]["missing_layer_records"] == 243 and len(info["files"]) == 3
    # existing output needs --force; the error is one line, exit status 2
    assert main(["trace", "import", str(routing_dir / MIXTRAL), "-o", str(out), "-q"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["trace", "import", str(routing_dir / MIXTRAL), "-o", str(out), "-q", "--force"]) == 0


def test_cli_qwen_layers_and_token_text(routing_dir, tmp_path, capsys):
    out = tmp_path / "qwen"
    assert main(["trace", "import", str(routing_dir / QWEN / "moe_layer8.jsonl"),
                 str(routing_dir / QWEN / "moe_layer23.jsonl"), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'layer8'}: 4,357 rows" in printed and "warmup_dummy: 8,448" in printed
    assert sorted(os.listdir(out)) == ["layer23", "layer8"]
    folder = routing_dir / DEEPSEEK / "training_data_eamc"
    files = [str(folder / f"prompt_{n}_data.csv") for n in (10, 2)]  # explicit files keep the given order
    tt = tmp_path / "tokens.jsonl"
    assert main(["trace", "import", *files, "-o", str(tmp_path / "ds"), "-q", "--token-text", str(tt)]) == 0
    rows = [json.loads(x) for x in tt.read_text(encoding="utf-8").splitlines()]
    assert [r["label"] for r in rows] == ["prompt_10_data", "prompt_2_data"]
    assert rows[1]["tokens"] == [r[2] for r in _csv_rows(folder / "prompt_2_data.csv")[: len(rows[1]["tokens"])]]
    assert main(["trace", "import", str(routing_dir / QWEN / "moe_layer8.jsonl"), "-o", str(tmp_path / "q2"), "-q",
                 "--token-text", str(tmp_path / "x.jsonl")]) == 2
    assert "no token strings" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    lines = qwen_lines()
    lines[3] = b"{oops"
    p = write_lines(tmp_path / "a.jsonl", lines)
    assert main(["trace", "import", str(p), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{p}:4:" in err and "--lenient" in err and "Traceback" not in err
    assert main(["trace", "import", str(p), "-o", str(tmp_path / "o"), "-q", "--lenient"]) == 0
    assert "malformed:json: 1" in capsys.readouterr().out
    assert main(["trace", "import", str(p), "-o", str(tmp_path / "o2"), "-q", "--format", "nope"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_real_mixtral_processed_token_idx_is_a_per_layer_counter(routing_dir):
    """The caveat the trace's notes state: in humaneval_2_routing.jsonl a layer that lost a record
    mid-sequence has its later records one token early; the raw log (token-major) has no shift."""
    folder = routing_dir / MIXTRAL
    proc = only([folder / "humaneval_2_routing.jsonl"]).block
    raw = only([folder / "routing_raw.jsonl"]).block
    p0 = proc.take(proc.seq == 0)
    dec = raw.take(raw.phase == PHASE_DECODE)
    assert len(p0) == len(dec) == 83
    assert (p0.ids[:, 0] == dec.ids[:, 0]).all() and (p0.ids[:, 0] >= 0).all()  # layer 0 lost nothing
    # layer 31 lost the record of token 6 (absent in both logs); from token 7 on the processed file
    # holds token t's record at index t - 1
    assert (dec.ids[6, 31] == -1).all()
    assert (p0.ids[6:81, 31] == dec.ids[7:82, 31]).all(axis=1)[(dec.ids[7:82, 31, 0] >= 0)].all()
    assert not (p0.ids[7:82, 31] == dec.ids[7:82, 31]).all(axis=1).all()
