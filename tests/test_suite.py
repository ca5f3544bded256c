"""The policy suite (``moecache bench --suite``): config validation, grid expansion, resumability after a
kill, and the content of its tables. Tiny synthetic traces, so the whole file runs in seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from moecache.cli import main
from moecache.errors import ConfigError, MoecacheError
from moecache.bench import load_config, plan_suite, run_suite
from moecache.bench.journal import DirLock, Journal

from tests.simtools import make_trace

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = ("results.md", "results.csv", "skipped.csv", "demand_hit_rate.png", "demand_hit_rate_ratio.png",
                "ready_rate.png", "ready_rate_ratio.png", "bytes_per_token.png", "bytes_per_token_ratio.png",
                "ms_per_token.png", "ms_per_token_ratio.png")


def _traces(folder: Path, seed: int = 0) -> None:
    """``multi``: 3 MoE layers x 8 experts, top-2, 6 sequences of 12 tokens; ``stream``: one layer, one
    sequence of 60 tokens (split by tokens)."""
    rng = np.random.default_rng(seed)
    hot = [0, 1, 2]  # some locality, so policies differ
    toks = [[(rng.choice(hot, 2, replace=False) if rng.random() < 0.5 else rng.choice(8, 2, replace=False))
             for _ in range(3)] for _ in range(72)]
    make_trace(toks, num_experts=8, top_k=2, seq=np.repeat(np.arange(6), 12),
               bytes_per_expert=4_000_000).save(folder / "multi", overwrite=True)
    stream = [[rng.choice(8, 2, replace=False)] for _ in range(60)]
    make_trace(stream, num_experts=8, top_k=2, seq=0, bytes_per_expert=4_000_000).save(folder / "stream",
                                                                                      overwrite=True)


GRID = """\
name = "tiny"
decode_stream = true
fit_share = 0.5
policies = {policies}
predictors = ["none", "temporal", "prior"]
depths = [0, 1]
capacities = ["25%", "50%", 2]
scopes = ["layer", "global"]
"""

TRACES = """
[[traces]]
name = "multi"
path = "traces/multi"

[[traces]]
name = "stream"
path = "traces/stream"
fit_by = "tokens"
scored_tokens = 20
"""


@pytest.fixture
def workdir(tmp_path):
    _traces(tmp_path / "traces")
    return tmp_path


def _config(folder: Path, policies: str = '["lru", "lfu", "static", "predicted", "belady"]', extra: str = "",
            traces: str = TRACES, name: str = "suite.toml", plots: bool = False) -> Path:
    """A suite config; plots (seconds of matplotlib) only where a test looks at them."""
    path = folder / name
    path.write_text(GRID.format(policies=policies) + f"plots = {str(plots).lower()}\n" + extra + traces)
    return path


def _read(folder: Path) -> dict[str, bytes]:
    """The result files a run wrote (the PNGs where plots are on)."""
    return {n: (folder / n).read_bytes() for n in RESULT_FILES if (folder / n).exists()}


def _csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


# -- config validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (('"lru"', '"lru", "nope"'), "unknown policy 'nope'; valid names: activation, belady"),
    (('"prior"]', '"prior", "psychic"]'), "unknown predictor 'psychic'"),
    (('"prior"]', '"prior", "gate_lookahead"]'), "hidden states"),
    (('["layer", "global"]', '["layer", "ring"]'), "unknown scope(s) ['ring']; valid: layer, global"),
    (('"50%"', '"200%"'), "(0%, 100%]"),
    (('"50%"', '"half"'), "neither a percentage"),
    (('depths = [0, 1]', 'depths = [0, -1]'), "depths: -1"),
    (('"none", ', ''), "must include \"none\""),
    (('"lru"', '"lru:half_life=3"'), "no parameter(s) ['half_life']"),
    (('"temporal"', '"temporal:decay=7"'), "decay must be in [0, 1]"),
    (('"lru"', '"lru", "lru"'), "listed more than once: lru"),
    (('fit_share = 0.5', 'fit_share = 1.5'), "fit_share must be a number in (0, 1)"),
    (('fit_share = 0.5', 'fit_share = 0.5\nmiss_rule = "teleport"'), "unknown miss rule 'teleport'"),
    (('fit_share = 0.5', 'fit_share = 0.5\nprefetch_rul = "topk"'), "unknown key(s) ['prefetch_rul']"),
    (('fit_share = 0.5', 'fit_share = 0.5\ncopy_queue = "lifo"'), "copy_queue 'lifo' is not one of worker, fifo"),
    (('path = "traces/multi"', 'path = "traces/absent"'), "no moecache trace at"),
    (('fit_by = "tokens"', 'fit_by = "bytes"'), "fit_by 'bytes'"),
    (('fit_by = "tokens"', 'fit_by = "sequences"'), "scored_tokens needs fit_by = \"tokens\""),
    (('scored_tokens = 20', 'scored_tokens = 20\ncolour = "red"'), "unknown key(s) ['colour']"),
    (('name = "tiny"', 'name = "tiny'), "not valid TOML"),
])
def test_config_errors_name_the_problem_before_any_work(workdir, capsys, change, message):
    text = (GRID.format(policies='["lru", "lfu", "static", "predicted", "belady"]') + TRACES)
    old, new = change
    assert old in text
    path = workdir / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    out = workdir / "out"
    assert main(["bench", "--suite", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_config_other_errors(workdir, capsys):
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        load_config(_config(workdir, name="suite.yaml"))
    one_seq = TRACES.replace('fit_by = "tokens"\nscored_tokens = 20\n', "")
    with pytest.raises(ConfigError, match=r"set fit_by = \"tokens\" for a trace that is one stream"):
        plan_suite(load_config(_config(workdir, traces=one_seq)))
    assert main(["bench", "--suite", str(_config(workdir))]) == 2
    assert "both --suite CONFIG and -o DIR" in capsys.readouterr().err
    assert main(["bench", str(workdir / "traces" / "multi"), "--suite", str(_config(workdir)), "-o",
                 str(workdir / "o")]) == 2
    assert "give no TRACE" in capsys.readouterr().err


def test_json_config_same_plan_as_toml(workdir):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    toml_path = _config(workdir)
    obj = tomllib.loads(toml_path.read_text())
    (workdir / "suite.json").write_text(json.dumps(obj))
    a, b = plan_suite(load_config(toml_path)), plan_suite(load_config(workdir / "suite.json"))
    assert [r.key for r in a.runs] == [r.key for r in b.runs] and len(a.skipped) == len(b.skipped)


def test_paths_resolve_against_the_config_folder(workdir, monkeypatch):
    sub = workdir / "configs"
    sub.mkdir()
    path = _config(sub, traces=TRACES.replace("traces/", "../traces/"))
    monkeypatch.chdir("/")
    s = load_config(path)
    assert s.traces[0].path == str(workdir / "traces" / "multi")


# -- grid expansion ---------------------------------------------------------------------------------

def test_grid_every_combination_is_run_or_skipped_with_a_reason(workdir):
    s = load_config(_config(workdir, policies='["lru", "predicted"]'))
    assert s.bound.name == "belady" and s.bound_added and [p.label for p in s.policies][-1] == "belady"
    plan = plan_suite(s)
    total = len(s.traces) * len(s.scopes) * len(s.capacities) * len(s.policies) * len(s.predictors) * len(s.depths)
    assert len(plan.runs) + len(plan.skipped) == total == 2 * 2 * 3 * 3 * 3 * 2
    reasons = {}
    for sk in plan.skipped:
        reasons.setdefault(sk.reason, []).append(sk.config)
    # multi, layer scope: "2" slots is what 25% gives (round(0.25 * 8) = 2): skipped as a duplicate
    dup = [c for c in reasons["2 resolves to 2 slots, the same as 25%"]]
    assert {(c.trace, c.scope) for c in dup} == {("multi", "layer"), ("stream", "layer")}
    # the one-layer trace: global scope = layer scope
    assert all(c.trace == "stream" for c in
               reasons["the trace has one MoE layer: global scope is the same as layer scope"])
    assert all(c.depth > 0 and c.predictor is None for c in reasons["prefetch depth > 0 needs a predictor"])
    assert all(c.policy.name == "predicted" and c.predictor is None
               for c in reasons["the policy evicts by predictions: it needs a predictor"])
    assert all(c.policy.name == "belady" and c.predictor is not None
               for c in reasons["offline policies run demand-only: no predictor, no prefetch"])
    runs = {(r.config.trace, r.config.scope, r.config.capacity, r.config.label) for r in plan.runs}
    # per (multi, layer/global 25%/50%, global 2): lru, lru + P D=1 (2), predicted + P D=0/1 (4), belady
    assert ("multi", "global", "2", "lru + temporal D=1") in runs
    assert ("multi", "layer", "50%", "predicted + prior D=0") in runs
    assert ("multi", "layer", "50%", "lru + prior D=0") not in runs
    assert len(plan.runs) == 5 * 8 + 2 * 8  # multi: 5 cells, stream: 2 cells, 8 configurations each
    assert len({r.key for r in plan.runs}) == len(plan.runs)


def test_capacity_below_top_k_is_skipped_not_an_error(workdir):
    path = _config(workdir)
    path.write_text(path.read_text().replace('capacities = ["25%", "50%", 2]', 'capacities = ["50%", 1]'))
    plan = plan_suite(load_config(path))
    assert {s.reason for s in plan.skipped if s.config.capacity == "1" and s.config.trace == "multi"} == {
        "1 slots is below the trace's top_k=2"}
    assert not [r for r in plan.runs if r.config.capacity == "1"]
    assert [r for r in plan.runs if r.config.capacity == "50%"]


def test_of_capacities_with_the_same_slots_the_most_exact_runs(workdir):
    path = _config(workdir)
    # 8 experts per layer: 10% asks 0.8 slots (raised to top_k = 2), 25% asks exactly 2
    path.write_text(path.read_text().replace('capacities = ["25%", "50%", 2]', 'capacities = ["10%", "25%"]'))
    plan = plan_suite(load_config(path))
    layer = {(r.config.trace, r.config.capacity) for r in plan.runs if r.config.scope == "layer"}
    assert layer == {("multi", "25%"), ("stream", "25%")}
    assert {s.reason for s in plan.skipped if s.config.capacity == "10%" and s.config.scope == "layer"} == {
        "10% resolves to 2 slots, the same as 25%"}
    # global scope of multi: 24 experts in all, 10% = 2 slots (2.4), 25% = 6: both run
    assert {r.config.capacity for r in plan.runs if r.config.scope == "global"} == {"10%", "25%"}


def test_keys_follow_what_determines_a_row(workdir):
    base = [r.key for r in plan_suite(load_config(_config(workdir))).runs]
    assert base == [r.key for r in plan_suite(load_config(_config(workdir))).runs]
    miss = plan_suite(load_config(_config(workdir, extra='miss_rule = "cpu"\n')))
    assert not set(base) & {r.key for r in miss.runs}
    assert miss.suite.bound.name == "belady_bypass"
    _traces(workdir / "traces", seed=1)  # same shape, other routing: every key changes
    assert not set(base) & {r.key for r in plan_suite(load_config(_config(workdir))).runs}


def test_copy_model_is_a_setting_of_the_key_and_the_report(workdir):
    # the default is the runtime's copy worker; FIFO rows keep the keys they had when FIFO was the default (a
    # journal written then is read back only by a config that asks for fifo), worker rows are keyed apart
    worker = plan_suite(load_config(_config(workdir)))
    said = plan_suite(load_config(_config(workdir, extra='copy_queue = "worker"\n')))
    fifo = plan_suite(load_config(_config(workdir, extra='copy_queue = "fifo"\n')))
    assert worker.suite.settings.copy_queue == "worker" and fifo.suite.settings.copy_queue == "fifo"
    assert [r.key for r in worker.runs] == [r.key for r in said.runs]
    assert not {r.key for r in worker.runs} & {r.key for r in fifo.runs}
    # the rows and the report say which model ran
    out_w, out_f = workdir / "w", workdir / "f"
    run_suite(_config(workdir, policies='["lru", "belady"]'), out_w)
    run_suite(_config(workdir, policies='["lru", "belady"]', extra='copy_queue = "fifo"\n'), out_f)
    assert "copy model `worker` (the runtime's copy worker)" in (out_w / "results.md").read_text()
    assert "copy model `fifo` (every copy in issue order)" in (out_f / "results.md").read_text()
    rows_w = [json.loads(ln)["row"] for ln in (out_w / "rows.jsonl").read_text().splitlines()]
    rows_f = [json.loads(ln)["row"] for ln in (out_f / "rows.jsonl").read_text().splitlines()]
    assert {r["copy_queue"] for r in rows_w} == {"worker"} and {r["copy_queue"] for r in rows_f} == {"fifo"}
    plain = lambda rows: sorted((r["trace"], r["scope"], r["capacity_label"], r["policy"], r["time_ms"])  # noqa: E731
                                for r in rows if not r["depth"])
    assert plain(rows_w) == plain(rows_f)  # without prefetch: the same rows (no scan policy here)


# -- running, tables --------------------------------------------------------------------------------

def test_run_tables_and_ratios(workdir, capsys):
    out = workdir / "out"
    cfg = _config(workdir, plots=True)
    assert main(["bench", "--suite", str(cfg), "-o", str(out), "--jobs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    plan = plan_suite(load_config(cfg))
    assert f"{len(plan.runs)} configurations: {len(plan.runs)} computed now, 0 loaded" in printed
    rows = _csv(out)
    by_cell = {(r["trace"], r["scope"], r["capacity_label"]): r for r in rows if r["policy"] == "belady"}
    assert len(rows) == len(plan.runs)
    assert [r["key"] for r in rows] == [r.key for r in plan.runs]  # grid order
    with open(out / "skipped.csv") as f:
        assert len(list(csv.DictReader(f))) == len(plan.skipped)
    hits = []
    for r in rows:
        bts, ms = float(r["bytes_ratio"]), float(r["ms_ratio"])
        # decode stream, miss rule copy: Belady is the optimum of demand loading and makes the fewest loads
        assert bts >= 1 - 1e-12 and ms >= 1 - 1e-12, r
        bound_hit = float(by_cell[(r["trace"], r["scope"], r["capacity_label"])]["demand_hit_rate"])
        if bound_hit == 0.0:  # e.g. top_k slots in all (global "2"): every access misses; no ratio
            assert r["hit_ratio"] == "" and float(r["demand_hit_rate"]) == 0.0
            continue
        hit = float(r["hit_ratio"])
        assert hit == float(r["demand_hit_rate"]) / bound_hit
        if r["predictor"] == "none":
            assert hit <= 1 + 1e-12, r
        if r["policy"] == "belady":
            assert hit == 1.0 and bts == 1.0 and r["engine"] in ("cpp", "python")
        assert float(r["demand_hit_rate"]) == int(r["hits"]) / int(r["accesses"])
        hits.append(hit)
    assert min(hits) < 1.0 < max(hits)  # not all trivially 1; prefetching rows beat demand-only Belady
    assert {r["fit"] for r in rows if r["trace"] == "multi"} == {
        "fitted on the leading 3 of 6 sequences (50%); scored on the next 3 sequences (36 tokens)"}
    assert {r["tokens"] for r in rows if r["trace"] == "stream"} == {"20"}
    md = (out / "results.md").read_text()
    assert "fitted on the leading 30 of 60 tokens in recorded order (50%); scored on the next 20 tokens" in md
    assert "## Headline" in md and "best with predictor" in md and "| bound | `belady`" in md
    assert "prefetch depth > 0 needs a predictor" in md
    assert "decode stream" in md and "not from a GPU run" in md
    for name in RESULT_FILES:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["computed"] == len(plan.runs) and meta["machine"]["cpus"] and "suite.toml" in meta["command"]
    assert set(meta["fit"]) == {"multi", "stream"} and len(meta["runs"]) == 1

    # resumed from the first 7 rows of the journal: the same bytes, plots included
    part = workdir / "part"
    part.mkdir()
    (part / "rows.jsonl").write_bytes(b"".join((out / "rows.jsonl").read_bytes().splitlines(keepends=True)[:7]))
    res = run_suite(cfg, part)
    assert (res.loaded, res.computed) == (7, len(plan.runs) - 7)
    assert _read(part) == _read(out) and len(_read(out)) == len(RESULT_FILES)


def test_suite_row_equals_bench_row(workdir, capsys):
    """The suite replays one configuration as `moecache bench` does (same split, engine choice, figures)."""
    out = workdir / "out"
    run_suite(_config(workdir), out)
    rows = {(r["trace"], r["scope"], r["capacity_label"], r["policy"], r["predictor"], r["depth"]): r
            for r in _csv(out)}
    for policy, extra in (("static", []), ("lru", ["--predictor", "prior", "--prefetch-depth", "1"])):
        assert main(["bench", str(workdir / "traces" / "multi"), "--policies", policy, "--capacity", "50%",
                     "--scope", "layer", "--fit-share", "0.5", "--decode-stream", "--json", "--quiet", *extra]) == 0
        b = json.loads(capsys.readouterr().out)[0]
        s = rows[("multi", "layer", "50%", policy, "prior" if extra else "none", "1" if extra else "0")]
        for k in ("tokens", "accesses", "hits", "ready", "loads", "prefetches", "prefetch_used"):
            assert int(s[k]) == b[k], k
        for k in ("demand_hit_rate", "est_ms_per_token", "bound_ms_per_token", "bytes_per_token"):
            assert float(s[k]) == b[k], k


# -- resumability -----------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import multiprocessing, os, signal, sys
    from moecache.bench import journal, suite

    after, torn, jobs, pids = int(sys.argv[3]), sys.argv[4] == "torn", int(sys.argv[5]), sys.argv[6]
    append = journal.Journal.append
    done = []

    def die():
        with open(pids, "w") as f:  # the worker processes, to check that they do not outlive the sweep
            f.write(" ".join(str(p.pid) for p in multiprocessing.active_children()))
        os.kill(os.getpid(), signal.SIGKILL)

    def dying_append(self, key, row, seconds):
        if torn and len(done) == after:  # die in the middle of writing a line
            with open(self.path, "ab") as f:
                f.write(b'{"key": "' + key.encode() + b'", "row": {"trace": ')
                f.flush()
            die()
        append(self, key, row, seconds)
        done.append(key)
        if not torn and len(done) == after:
            die()

    journal.Journal.append = dying_append
    suite.run_suite(sys.argv[1], sys.argv[2], jobs=jobs)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("how, jobs", [("clean", 1), ("torn", 1), ("clean", 2)])
def test_killed_sweep_resumes_to_the_same_output(workdir, how, jobs):
    cfg = _config(workdir)  # plots: test_run_tables_and_ratios compares a resumed run's PNGs
    whole, resumed = workdir / "whole", workdir / "resumed"
    ref = run_suite(cfg, whole)
    n = len(ref.plan.runs)
    kill_after = 11
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pids = workdir / "pids"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg), str(resumed), str(kill_after), how, str(jobs),
                           str(pids)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup ran
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == (jobs if jobs > 1 else 0)
    deadline = time.time() + 30
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "worker processes outlived the killed sweep"
    journal = (resumed / "rows.jsonl").read_bytes()
    assert journal.count(b"\n") == kill_after
    assert journal.endswith(b"\n") == (how == "clean")
    assert not (resumed / "results.md").exists()

    res = run_suite(cfg, resumed, jobs=jobs)  # with jobs 2 the whole sweep ran in worker processes
    assert (res.loaded, res.computed, res.torn) == (kill_after, n - kill_after, int(how == "torn"))
    assert _read(resumed) == _read(whole)
    lines = (resumed / "rows.jsonl").read_bytes().splitlines()
    assert len(lines) == n and len({json.loads(x)["key"] for x in lines}) == n  # nothing computed twice

    again = run_suite(cfg, resumed)  # a finished sweep recomputes nothing
    assert (again.loaded, again.computed) == (n, 0)
    assert _read(resumed) == _read(whole)


def test_rows_of_other_configs_are_kept_but_not_shown(workdir):
    out = workdir / "out"
    full = run_suite(_config(workdir), out)
    smaller = _config(workdir, name="small.toml").read_text().replace('capacities = ["25%", "50%", 2]',
                                                                       'capacities = ["50%"]')
    (workdir / "small.toml").write_text(smaller)
    res = run_suite(workdir / "small.toml", out)
    assert res.computed == 0 and res.loaded == len(res.plan.runs) and res.stale == len(full.plan.runs) - res.loaded
    assert {r["capacity_label"] for r in _csv(out)} == {"50%"}


def test_journal_errors_and_lock(workdir):
    out = workdir / "out"
    run_suite(_config(workdir, policies='["lru", "belady"]'), out)
    path = out / "rows.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"not json\n" + b"".join(lines[1:]))
    with pytest.raises(MoecacheError, match=r"rows.jsonl:2: not a suite row record; delete that line"):
        Journal(str(path)).load()
    path.write_bytes(b"".join(lines))
    with DirLock(str(out)):
        with pytest.raises(MoecacheError, match="another suite run is writing"):
            run_suite(_config(workdir, policies='["lru", "belady"]'), out)


def test_engine_choice_reaches_every_row(workdir):
    """``--sim-engine python`` replays every row on the reference; the rows equal the default engine's."""
    cfg = _config(workdir, policies='["lru", "predicted", "belady"]')
    auto, ref = workdir / "auto", workdir / "ref"
    assert main(["bench", "--suite", str(cfg), "-o", str(ref), "--sim-engine", "python", "--quiet", "--jobs", "1"]) == 0
    run_suite(cfg, auto)
    assert {r["engine"] for r in _csv(ref)} == {"python"}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "engine"} for r in rows]  # noqa: E731
    assert strip(_csv(ref)) == strip(_csv(auto))
    with pytest.raises(ConfigError, match="unknown engine 'gpu'"):
        run_suite(cfg, auto, engine="gpu")


def test_combinations_the_simulator_refuses_are_skipped_up_front(workdir):
    """``predicted`` asks for predictions a whole token (3 MoE layers) ahead: a transition predictor fitted
    to depth 1 cannot give them; the dry run finds that before any work, per trace shape."""
    path = _config(workdir, policies='["lru", "predicted"]')
    path.write_text(path.read_text().replace('predictors = ["none", "temporal", "prior"]',
                                             'predictors = ["none", "transition:max_depth=1"]'))
    plan = plan_suite(load_config(path))
    refused = {(s.config.trace, s.config.label): s.reason for s in plan.skipped
               if s.reason.startswith("the simulator refuses it")}
    why = refused[("multi", "predicted + transition:max_depth=1 D=0")]
    assert "transition was fitted up to depth 1, asked for 3" in why
    assert ("multi", "lru + transition:max_depth=1 D=1") not in refused  # depth 1 is within reach
    runs = {(r.config.trace, r.config.label) for r in plan.runs}
    assert ("multi", "lru + transition:max_depth=1 D=1") in runs
    assert ("stream", "predicted + transition:max_depth=1 D=0") in runs  # one layer: a token ahead is depth 1


def test_the_shipped_config_is_valid(workdir):
    """eval/suite.toml names only registered policies and predictors and a sound grid (its traces are built by
    eval/suite_traces.py, so here each is pointed at a synthetic trace)."""
    tomllib = pytest.importorskip("tomllib")
    from moecache.bench.config import parse_config
    from moecache.bench.plan import describe_trace, expand

    obj = tomllib.loads((ROOT / "eval" / "suite.toml").read_text())
    names = [t["name"] for t in obj["traces"]]
    assert len(names) == 9
    assert {"mixtral-8x7b", "llama4-maverick", "deepseek-v2-lite", "qwen3moe-tiny-code"} <= set(names)
    for t in obj["traces"]:
        t["path"] = str(workdir / "traces" / ("stream" if t.get("fit_by") == "tokens" else "multi"))
        t.pop("scored_sequences", None)
    suite = parse_config(obj, str(ROOT / "eval"), "eval/suite.toml")
    assert suite.bound.label == "belady" and not suite.bound_added and suite.settings.miss_rule == "copy"
    plan = expand(suite, {t.name: describe_trace(t, suite.settings) for t in suite.traces})
    assert plan.runs and all(r.config.trace in names for r in plan.runs)
