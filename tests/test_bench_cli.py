"""``moecache bench``: listing, table and JSON output, fitting, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moecache.cli import main
from moecache.cost.hardware import HOST_TERMS
from moecache.policies import POLICIES
from moecache.predictors import PREDICTORS

from tests.simtools import make_trace


def _write(tmp_path, name="t", seqs=5, n=40, seed=0, bytes_per_expert=2_000_000):
    rng = np.random.default_rng(seed)
    toks = [[rng.choice(8, 2, replace=False) for _ in range(4)] for _ in range(n)]
    t = make_trace(toks, num_experts=8, top_k=2, seq=np.repeat(np.arange(seqs), n // seqs),
                   bytes_per_expert=bytes_per_expert)
    return t.save(tmp_path / name)


def run(capsys, *argv):
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, "--list")
    assert code == 0
    for name in POLICIES.names() + PREDICTORS.names():
        assert name in out
    code, out, _ = run(capsys, "--list", "--json")
    listing = json.loads(out)
    assert set(listing["policies"]) == set(POLICIES.names())
    assert set(listing["predictors"]) == set(PREDICTORS.names())
    assert all(listing["policies"].values()) and "topk" in listing["prefetch_rules"]


def test_json_rows(tmp_path, capsys):
    path = _write(tmp_path)
    code, out, _ = run(capsys, path, "--policies", "lru,belady,lfu:half_life=8", "--capacity", "25%,3",
                       "--scope", "layer,global", "--json", "--quiet")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 3 * 2 * 2
    need = {"trace", "policy", "predictor", "capacity", "scope", "demand_hit_rate", "ready_rate", "bytes_per_token",
            "est_ms_per_token", "bound_ms_per_token", "ratio", "prefetch_precision", "stall_ms_per_token"}
    assert need <= set(rows[0])
    assert {r["policy"] for r in rows} == {"lru", "belady", "lfu(half_life=8)"}
    assert {(r["scope"], r["capacity_label"], r["capacity"]) for r in rows} == {
        ("layer", "25%", 2), ("layer", "3", 3), ("global", "25%", 8), ("global", "3", 3)}
    by = {(r["scope"], r["capacity_label"], r["policy"]): r for r in rows}
    for scope, cap in (("layer", "25%"), ("global", "3")):
        assert by[(scope, cap, "belady")]["demand_hit_rate"] >= by[(scope, cap, "lru")]["demand_hit_rate"]
        assert by[(scope, cap, "lru")]["ratio"] >= 1.0
    assert all(r["trace"] == "t" and r["predictor"] is None and r["fit"] is None for r in rows)
    assert all(r["bytes_per_expert"] == 2_000_000 for r in rows)


def test_table_output_and_prefetch(tmp_path, capsys):
    path = _write(tmp_path)
    code, out, _ = run(capsys, path, "--policies", "lru", "--predictor", "oracle", "--prefetch-depth", "2",
                       "--capacity", "50%")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["trace", "policy", "predictor"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    row = lines[2].split()
    assert row[:4] == ["t", "lru", "oracle", "2"]
    assert "hardware:" in out


def test_fit_share_and_fit_trace(tmp_path, capsys):
    path = _write(tmp_path)
    other = _write(tmp_path, "other", seed=1)
    code, out, err = run(capsys, path, "--policies", "static,lru", "--capacity", "50%", "--json", "--quiet")
    assert code == 0
    rows = json.loads(out)
    # 5 sequences of 8 tokens: the leading 20% (1 sequence) fits, the other 4 are scored by every run
    assert all(r["tokens"] == 32 for r in rows)
    assert all(r["fit"].startswith("leading 20%") for r in rows) and "fitted on" in err
    code, out, _ = run(capsys, path, "--policies", "static", "--capacity", "50%", "--fit", other, "--json", "--quiet")
    rows = json.loads(out)
    assert rows[0]["tokens"] == 40 and rows[0]["fit"] == f"--fit {other}"
    code, out, _ = run(capsys, path, "--policies", "lru", "--predictor", "prior", "--json", "--quiet",
                       "--capacity", "50%", "--fit-share", "0.4")
    rows = json.loads(out)
    assert rows[0]["tokens"] == 24 and rows[0]["predictor"].startswith("prior") and rows[0]["depth"] == 1


def test_hardware_file_and_bytes(tmp_path, capsys):
    path = _write(tmp_path)
    hw = tmp_path / "hw.json"
    # the host and interference terms off (a file that leaves them out keeps the calibrated ones)
    hw.write_text(json.dumps({"bytes_per_expert": 1_000_000, "copy_bandwidth_gbps": 1.0, "copy_latency_ms": 0.0,
                              "gpu_ms": {"1": 0.5}, "non_expert_ms": {"1": 1.0},
                              **{n: 0.0 for n in HOST_TERMS}}))
    code, out, _ = run(capsys, path, "--policies", "lru", "--capacity", "50%", "--hardware", str(hw), "--json",
                       "--quiet")
    row = json.loads(out)[0]
    assert row["bytes_per_expert"] == 1_000_000 and row["hardware"] == str(hw)
    # copies of 1 ms each; GPU 1 ms + 2 x 0.5 ms per layer and token, 4 layers: 8 ms per token, more
    # than Belady's copies (at most 2 per layer and token, and it hits some) -> the bound is the GPU
    assert row["bytes_per_token"] == row["loads"] * 1e6 / row["tokens"]
    assert row["bound_ms_per_token"] == 8.0 and row["est_ms_per_token"] >= 8.0
    code, out, _ = run(capsys, path, "--policies", "lru", "--capacity", "50%", "--bytes-per-expert", "5000000",
                       "--json", "--quiet")
    assert json.loads(out)[0]["bytes_per_expert"] == 5_000_000


@pytest.mark.parametrize("argv, message", [
    (["--policies", "lru,nope"], "unknown policy 'nope'"),
    (["--policies", "lru", "--scope", "ring"], "unknown scope"),
    (["--policies", "lru", "--capacity", "200%"], "(0%, 100%]"),
    (["--policies", "lru", "--capacity", "1"], "below top_k"),
    (["--policies", "lru", "--prefetch-depth", "2"], "needs --predictor"),
    (["--policies", "predicted"], "--predictor"),
    (["--policies", "lru:half_life=3"], "no parameter"),
    (["--policies", "lru", "--predictor", "gate_lookahead"], "hidden states"),
    (["--policies", "lru", "--miss-rule", "teleport"], "unknown miss rule"),
    (["--policies", "lru", "--predictor", "temporal", "--admission", "maybe"],
     "unknown prefetch admission 'maybe'; choose one of: gated, cost, none"),
    (["--policies", "lru", "--admission", ""], "unknown prefetch admission ''"),
    (["--policies", "lru", "--admission", "cost", "-o", "out"], "--admission cost applies to trace runs"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    path = _write(tmp_path)
    code, out, err = run(capsys, path, *argv, "--quiet")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_inputs(tmp_path, capsys):
    code, _, err = run(capsys, "--policies", "lru")
    assert code == 2 and "TRACE" in err
    code, _, err = run(capsys, str(tmp_path / "absent"))
    assert code == 2 and "no trace" in err
    single = make_trace([[(0, 1)]] * 4, num_experts=4, top_k=2).save(tmp_path / "one")
    code, _, err = run(capsys, single, "--policies", "static")
    assert code == 2 and "--fit OTHER_TRACE" in err


def test_old_engine_flag_still_works_with_a_warning(tmp_path, capsys):
    """``--engine`` was renamed ``--sim-engine`` (generate's ``--engine`` is the copy engine): the old
    spelling gives the same rows for one release, with a FutureWarning naming the new flag."""
    from moecache.cli.bench import SIM_ENGINES
    from moecache.sim.engine_cpp import ENGINES

    assert SIM_ENGINES == ENGINES
    path = _write(tmp_path)
    code, new, _ = run(capsys, path, "--policies", "lru,fifo", "--sim-engine", "python", "--json", "--quiet")
    assert code == 0
    with pytest.warns(FutureWarning, match="--engine is deprecated.*use --sim-engine python"):
        code, old, _ = run(capsys, path, "--policies", "lru,fifo", "--engine", "python", "--json", "--quiet")
    assert code == 0 and json.loads(old) == json.loads(new)
    assert {r["engine"] for r in json.loads(old)} == {"python"}
    # the old flag keeps the new one's choices (main: status 2, one line)
    assert main(["bench", path, "--engine", "fast"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- golden counts of activation / predicted on a real prompt -------------------------------------

# DeepSeek-V2-Lite-Chat, the first prompt file of the moe-beyond set (one prefill prompt, 26 MoE layers,
# top-6 of 64), token by token; its leading 20% fits the temporal predictor, 35 tokens are scored (5,460
# accesses). `moecache bench --policies activation,predicted:half_life=0 --predictor temporal
# --capacity 10%,40% --scope layer,global --decode-stream`: (hits, loads, prefetches) per (policy, scope,
# slots). Global pools of 166 and 666 slots take the C++ core's sorted lists, layer pools its scan. A
# change here is a change of behaviour: explain it in the commit.
# Changed with the admission rule's time to the next layer including its host time (more `predicted`
# prefetches pay) and the predictor gate, the default (it stops asking the predictor for `activation`'s
# prefetches, which did not pay: global 166 issued 133 before).
# Changed when the runtime's copy worker became the default copy model: `activation`'s pool scan (the calibrated
# profile's evict_host_by_name) is paid where an insert evicts, not on every insert as under FIFO. In this short
# run the pools fill for much of it, so the host runs less far behind the GPU and some prefetches pay (FIFO:
# GOLDEN_BENCH_FIFO, every one refused). With activation's scan cost set to 0 both models give the same counts at
# its four points; `predicted` has no scan cost and did not move.
GOLDEN_BENCH = {
    ("activation", "layer", 6): (1807, 3653, 78), ("predicted", "layer", 6): (1735, 3725, 718),
    ("activation", "layer", 26): (3355, 2105, 150), ("predicted", "layer", 26): (3360, 2100, 150),
    ("activation", "global", 166): (1304, 4156, 88), ("predicted", "global", 166): (1966, 3494, 2120),
    ("activation", "global", 666): (3244, 2216, 150), ("predicted", "global", 666): (3321, 2139, 344),
}
#: The same command with --copy-queue fifo: the counts pinned before the worker became the default.
GOLDEN_BENCH_FIFO = {**GOLDEN_BENCH, ("activation", "layer", 6): (1794, 3666, 0),
                     ("activation", "layer", 26): (3296, 2164, 0), ("activation", "global", 166): (1296, 4164, 0),
                     ("activation", "global", 666): (3185, 2275, 0)}


def test_golden_counts_activation_predicted(routing_dir, tmp_path, capsys):
    from moecache.trace import Trace
    from moecache.trace.importers import read_sources

    src = sorted((routing_dir / "deepseek-v2-lite-chat__moe-beyond" / "training_data_eamc").glob("*.csv"))[:1]
    _s, imported, _d = read_sources([str(f) for f in src])
    path = Trace(imported[0].meta, imported[0].block).save(tmp_path / "ds")
    argv = [str(path), "--policies", "activation,predicted:half_life=0", "--predictor", "temporal",
            "--capacity", "10%,40%", "--decode-stream", "--json", "--quiet", "--jobs", "1"]
    code, out, _ = run(capsys, *argv, "--scope", "layer,global")
    assert code == 0
    rows = json.loads(out)
    got = {(r["policy"].split("(")[0], r["scope"], r["capacity"]): (r["hits"], r["loads"], r["prefetches"])
           for r in rows}
    assert got == GOLDEN_BENCH
    assert {r["engine"] for r in rows} == {"cpp"} and {r["tokens"] for r in rows} == {35}
    # the Python reference engine gives the same rows (global scope: where the order structures differ most)
    code, out, _ = run(capsys, *argv, "--scope", "global", "--sim-engine", "python")
    assert code == 0
    ref = json.loads(out)
    assert [dict(r, engine=None) for r in ref] == [dict(r, engine=None) for r in rows if r["scope"] == "global"]
    assert {r["copy_queue"] for r in rows} == {"worker"}
    code, out, _ = run(capsys, *argv, "--scope", "layer,global", "--copy-queue", "fifo")
    assert code == 0
    fifo = json.loads(out)
    assert {(r["policy"].split("(")[0], r["scope"], r["capacity"]): (r["hits"], r["loads"], r["prefetches"])
            for r in fifo} == GOLDEN_BENCH_FIFO
    assert {r["copy_queue"] for r in fifo} == {"fifo"}


def test_admission_flag_reaches_the_simulator(tmp_path, capsys):
    """Each --admission name runs and is recorded; ``none`` issues every candidate, the default (gated) reports
    its predictor gate, and the help text names the rules."""
    path = _write(tmp_path)
    rows = {}
    for name in ("gated", "cost", "none"):
        code, out, _ = run(capsys, path, "--policies", "lru", "--predictor", "temporal", "--capacity", "50%",
                           "--admission", name, "--json", "--quiet")
        assert code == 0
        rows[name] = json.loads(out)[0]
    assert {n: r["admission"] for n, r in rows.items()} == {"gated": "gated", "cost": "cost", "none": "none"}
    assert rows["none"]["prefetch_refused"] == 0 and rows["cost"]["prefetch_refused"] > 0
    assert "predictor_calls" in rows["gated"] and "predictor_calls" not in rows["cost"]
    code, out, _ = run(capsys, path, "--policies", "lru", "--predictor", "temporal", "--capacity", "50%",
                       "--json", "--quiet")
    assert json.loads(out)[0]["admission"] == "gated"
    try:
        main(["bench", "--help"])
    except SystemExit:
        pass
    assert "--admission NAME" in capsys.readouterr().out


def test_copy_queue_flag_reaches_the_simulator(tmp_path, capsys):
    """``--copy-queue``: worker (the default, the runtime's copy worker) or fifo, on either engine; each row and the
    table's footer name it; prefetching rows differ, rows without prefetch do not; a suite takes it from its config."""
    path = _write(tmp_path, bytes_per_expert=200_000_000)  # slow copies: prefetches wait in the worker's queue
    base = [path, "--policies", "lru", "--predictor", "temporal", "--capacity", "50%", "--prefetch-budget", "6",
            "--admission", "none", "--decode-stream", "--json", "--quiet", "--jobs", "1"]
    rows = {}
    for flag in ([], ["--copy-queue", "worker"], ["--copy-queue", "fifo"]):
        for engine in ("python", "auto"):
            code, out, _ = run(capsys, *base, "--sim-engine", engine, *flag)
            assert code == 0
            rows[(tuple(flag), engine)] = json.loads(out)[0]
    for engine in ("python", "auto"):
        worker, said, fifo = (rows[(f, engine)] for f in ((), ("--copy-queue", "worker"), ("--copy-queue", "fifo")))
        assert worker == said and worker["copy_queue"] == "worker" and fifo["copy_queue"] == "fifo"
        assert worker["copies_cancelled"] > 0 and "copies_cancelled" not in fifo
        assert worker["time_ms"] != fifo["time_ms"]
    strip = lambda r: {k: v for k, v in r.items() if k != "engine"}  # noqa: E731
    assert strip(rows[((), "python")]) == strip(rows[((), "auto")])
    plain = [path, "--policies", "lru,lfu", "--capacity", "25%", "--json", "--quiet"]
    code, w, _ = run(capsys, *plain)
    code2, f, _ = run(capsys, *plain, "--copy-queue", "fifo")
    assert code == code2 == 0
    w, f = json.loads(w), json.loads(f)
    assert {r.pop("copies_cancelled") for r in w} == {0}
    assert [dict(r, copy_queue=None) for r in w] == [dict(r, copy_queue=None) for r in f]
    code, out, _ = run(capsys, path, "--policies", "lru", "--capacity", "25%", "--quiet", "--copy-queue", "fifo")
    assert code == 0 and "copy model fifo" in out
    code, _, err = run(capsys, "--suite", str(tmp_path / "s.toml"), "-o", str(tmp_path / "o"), "--copy-queue", "fifo")
    assert code == 2 and "copy_queue" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    try:
        main(["bench", "--help"])
    except SystemExit:
        pass
    assert "--copy-queue {worker,fifo}" in capsys.readouterr().out
