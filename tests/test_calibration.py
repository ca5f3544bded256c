"""The calibrated timing model: its terms on hand-computed timelines, the frozen default profile, the fit
(recovering known terms from synthetic runs) and the fidelity table on the committed end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moecache.cost import default_profile, load_profile
from moecache.cost.hardware import CALIBRATED_PROFILE, HOST_TERMS, calibrated_terms, uncalibrated_profile
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.sim import Schedule, simulate

from tests.simtools import make_trace, unit_profile

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _calibrate():
    sys.path.insert(0, str(EVAL))
    spec = importlib.util.spec_from_file_location("calibrate_timing", EVAL / "calibrate_timing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["calibrate_timing"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _lru(cap, layers=1, experts=4):
    return new_policy("lru", cap, layers, experts, top_k=1, scope="layer")


# -- the terms on hand-computed timelines ---------------------------------------------------------------

def test_layer_and_copy_host_by_hand():
    # one layer, experts A B A; one slot. copy 1, GPU 0.5, non-expert 1; host 0.25 per layer, 0.125 per copy.
    # g0: non-expert 0 -> 1; host 1 -> 1.25; copy issued at 1.375 -> 2.375; compute 2.375 -> 2.875
    # g1: non-expert 2.875 -> 3.875; host -> 4.125; copy at 4.25 -> 5.25; compute -> 5.75
    # g2: non-expert 5.75 -> 6.75; host -> 7.0; B evicted A: copy at 7.125 -> 8.125; compute -> 8.625
    hw = replace(unit_profile(), layer_host_ms=0.25, copy_host_ms=0.125)
    r = simulate(Schedule(make_trace([[0], [1], [0]], num_experts=4)), _lru(1), hardware=hw, bound=False)
    assert r.time_ms == 8.625
    assert r.gpu_busy_ms == 3 * 1.0 + 3 * 0.5
    # a hit pays the layer's host time but no copy's
    r = simulate(Schedule(make_trace([[0], [0]], num_experts=4)), _lru(1), hardware=hw, bound=False)
    assert r.time_ms == (1 + 0.25 + 0.125 + 1 + 0.5) + (1 + 0.25 + 0.5)


def test_copy_slowdown_by_hand():
    # A then B with two slots: B's copy (1 ms) is issued at t_route of g1; nothing else overlaps it.
    # Slowdown 0.5: g0 non-expert 0 -> 1 (no copy in flight); copy 1 -> 2; compute 2 -> 2.5 (copy done).
    # Prefetch-free, so kernels are slowed only when they start before a copy ends: with a hit on A at g1
    # while B ... use three layers' worth: A, then A+B at one step (top-2) -> compute of A starts while B copies.
    trace = make_trace([[[0, 1]]], num_experts=4, top_k=2)
    pol = new_policy("lru", 2, 1, 4, top_k=2, scope="layer")
    hw = replace(unit_profile(copy_ms=1.0, gpu=0.5), copy_slowdown=0.5)
    r = simulate(Schedule(trace), pol, hardware=hw, bound=False)
    # non-expert 0 -> 1; copies A 1 -> 2, B 2 -> 3; A computes 2 -> 2.75 (B in flight: 1.5x); B 3 -> 3.5
    assert r.time_ms == 3.5
    assert r.gpu_busy_ms == 1.0 + 0.75 + 0.5


def test_hybrid_layer_cost_by_hand():
    # every miss on the CPU (2 ms); the step waits for it plus the fixed 0.75 ms
    hw = replace(unit_profile(), hybrid_layer_ms=0.75)
    r = simulate(Schedule(make_trace([[0], [1]], num_experts=4)), _lru(1), hardware=hw, miss_rule="cpu", bound=False)
    assert r.time_ms == (1 + 2 + 0.75) * 2


def test_prefetch_host_by_hand():
    # the oracle prefetches B for g1 at g0: predictor host 0.75, then 0.25 per prefetch; the next layer waits
    from moecache.predictors import PREDICTORS

    trace = make_trace([[0], [1]], num_experts=4)
    hw = replace(unit_profile(), predictor_host_ms=0.75, prefetch_host_ms=0.25)
    pred = PREDICTORS.get("oracle")(1, 4, 1)
    r = simulate(Schedule(trace), _lru(2), pred, hardware=hw, depth=1, bound=False)
    # g0: ne 0 -> 1; A copy 1 -> 2; compute 2 -> 2.5; host 1 + 0.75 + 0.25 = 2: B copy 2 -> 3
    # g1: ne 2.5 -> 3.5 (the host finished at 2); B hit: compute 3.5 -> 4; the predictor's host time
    # (nothing to prefetch past the last token) ends at 3.5 + 0.75 = 4.25, and the replay with it
    assert r.prefetches == 1
    assert r.time_ms == 4.25


def test_grouped_expert_kernel_by_hand():
    # grouped: a step's experts cost the fixed launch once (with the non-expert work) plus each distinct
    # expert's weight read and FLOPs; 1 MB experts read at GPU_READ_GBPS
    from moecache.cost.hardware import GPU_READ_GBPS, GPU_TFLOPS, grouped_launch_ms

    hw = replace(unit_profile(), expert_kernel="grouped", expert_launch_ms=0.25)
    per = 1e6 / (GPU_READ_GBPS * 1e6)
    assert hw.gpu(1) == per + 1e6 / (GPU_TFLOPS * 1e12) * 1e3
    assert hw.gpu(8) > hw.gpu(1) and hw.gpu(1) < unit_profile().gpu(1)
    assert hw.non_expert(1) == 1.0 + 0.25
    # g0: ne + launch 0 -> 1.25; copies A 1.25 -> 2.25, B -> 3.25; A computes 2.25 -> 2.25 + g, B 3.25 -> 3.25 + g
    # g1: both hit: ne + launch, then the two increments
    trace = make_trace([[[0, 1]], [[0, 1]]], num_experts=4, top_k=2)
    pol = new_policy("lru", 2, 1, 4, top_k=2, scope="layer")
    r = simulate(Schedule(trace), pol, hardware=hw, bound=False)
    g = hw.gpu(1)
    assert r.time_ms == pytest.approx((3.25 + g) + (1.25 + g + g))
    # the fixed cost comes from hardware.md's batched_mm decode less the six experts' reads
    assert 0.2 < grouped_launch_ms() < (38.7 - 27.5) / 27
    with pytest.raises(ConfigError, match="expert_kernel"):
        replace(unit_profile(), expert_kernel="fused")


def test_scan_policy_host_per_eviction_by_hand():
    # activation's host cost rides on each copy's host cost; LRU's is untouched. Under the default copy model
    # (the runtime's worker) it is paid where an insert evicts (the second, into the one full slot); the FIFO
    # model pays it on every insert.
    base = replace(unit_profile(), copy_host_ms=0.125, evict_host_by_name={"activation": 0.375})
    trace = make_trace([[0], [1]], num_experts=4)
    lru = simulate(Schedule(trace), _lru(1), hardware=base, bound=False)

    def act(**kw):
        pol = new_policy("activation", 1, 1, 4, top_k=1, scope="layer")
        pol.fit(np.ones((1, 4), np.int64))
        return simulate(Schedule(trace), pol, hardware=base, bound=False, **kw)

    r, fifo = act(), act(copy_queue="fifo")
    assert r.loads == fifo.loads == lru.loads == 2
    assert r.time_ms == lru.time_ms + 1 * 0.375
    assert fifo.time_ms == lru.time_ms + 2 * 0.375
    assert base.evict_host("lru") == 0.0
    with pytest.raises(ConfigError, match="evict_host_by_name"):
        replace(unit_profile(), evict_host_by_name={"activation": -1})


def test_zero_terms_are_the_uncalibrated_model():
    hw = unit_profile()
    assert not hw.calibrated and hw.slowdown == 1.0
    trace = make_trace([[0], [1], [0], [2]], num_experts=4)
    a = simulate(Schedule(trace), _lru(1), hardware=hw).row()
    b = simulate(Schedule(trace), _lru(1), hardware=replace(hw, **{n: 0.0 for n in HOST_TERMS})).row()
    assert a == b


def test_bound_includes_the_layer_host_time():
    trace = make_trace([[0], [1], [0]], num_experts=4)
    r0 = simulate(Schedule(trace), _lru(1), hardware=unit_profile())
    r1 = simulate(Schedule(trace), _lru(1), hardware=replace(unit_profile(), layer_host_ms=0.5, copy_slowdown=0.3))
    assert r1.bound_ms == r0.bound_ms + 3 * 0.5
    assert r1.bound_ms <= r1.time_ms


# -- the frozen profile ------------------------------------------------------------------------------------

def test_frozen_profile_is_the_default():
    frozen = json.loads(Path(CALIBRATED_PROFILE).read_text())
    hw = default_profile(17_301_504)
    for n in HOST_TERMS:
        assert getattr(hw, n) == frozen[n]
    assert hw.calibrated, "the committed profile holds fitted (non-zero) terms"
    assert hw.calibration and hw.calibration["provenance"].keys() >= set(HOST_TERMS)
    assert "calibrated" in hw.source
    unc = uncalibrated_profile(17_301_504)
    assert not unc.calibrated and unc.copy_ms == hw.copy_ms and unc.gpu_ms == hw.gpu_ms


def test_loaded_profiles_keep_the_calibrated_terms_unless_given(tmp_path):
    p = tmp_path / "hw.json"
    p.write_text(json.dumps({"bytes_per_expert": 1 << 24, "copy_bandwidth_gbps": 20.0}))
    hw = load_profile(p)
    assert hw.layer_host_ms == default_profile(1 << 24).layer_host_ms
    p.write_text(json.dumps({"bytes_per_expert": 1 << 24, "layer_host_ms": 0.0, "copy_slowdown": 0.0}))
    hw = load_profile(p)
    assert hw.layer_host_ms == 0.0 and hw.copy_slowdown == 0.0
    p.write_text(json.dumps({"bytes_per_expert": 1 << 24, "layer_host_ms": -1}))
    with pytest.raises(ConfigError, match="layer_host_ms must be a number >= 0"):
        load_profile(p)
    # a profile round-trips through its JSON (to_json -> load), terms and provenance included
    q = tmp_path / "round.json"
    q.write_text(json.dumps(default_profile(1 << 24).to_json()))
    assert load_profile(q).host_terms() == default_profile(1 << 24).host_terms()


def test_damaged_calibrated_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON.*calibrate_timing.py --freeze"):
        calibrated_terms(str(bad))
    bad.write_text(json.dumps({"layer_host_ms": 0.1}))
    with pytest.raises(ConfigError, match="must hold exactly"):
        calibrated_terms(str(bad))
    with pytest.raises(ConfigError, match="is missing"):
        calibrated_terms(str(tmp_path / "absent.json"))


def test_with_format_keeps_the_terms():
    from moecache.cost.hardware import with_format
    from moecache.quant import resolve_format

    hw = with_format(default_profile(1 << 24), resolve_format("int4", 64))
    assert hw.copy_bytes < hw.bytes_per_expert
    assert hw.host_terms() == default_profile(1 << 24).host_terms()


# -- the fit on synthetic runs -------------------------------------------------------------------------

def _synthetic(ct, true, tmp_path):
    """Configurations whose measured ms/step is the simulator's with ``true`` terms (on one small random
    trace), and whose runtime stats follow the host lines of ``true``; with the measuring function of each."""
    from moecache.predictors import PREDICTORS

    rng = np.random.default_rng(0)
    L, E = 4, 8
    tokens = [[[int(x)] for x in rng.integers(0, E, L)] for _ in range(60)]
    trace = make_trace(tokens, num_experts=E, bytes_per_expert=1 << 20)
    base = lambda b: unit_profile(copy_ms=0.4, gpu=0.1, cpu=0.6, non_expert=0.8)  # noqa: E731
    a, sync = 0.09, 0.05
    out = []
    specs = [("lru", "global", "copy", 6, None), ("lru", "layer", "copy", 2, None), ("fifo", "global", "copy", 10, None),
             ("lru", "global", "copy", 6, "oracle"), ("lru", "global", "copy", 14, "oracle"),
             ("lru", "global", "cpu", 6, None), ("lru", "global", "auto", 8, None)]
    for pol, scope, rule, cap, pred in specs:
        spec = ct.SimSpec("offload", policy=pol, scope=scope, miss_rule=rule, predictor=pred, depth=1 if pred else 0)

        def measure(terms, pol=pol, scope=scope, rule=rule, cap=cap, pred=pred):
            p = new_policy(pol, cap, L, E, top_k=1, scope=scope)
            kw = {"depth": 1} if pred else {}
            return simulate(Schedule(trace), p, PREDICTORS.get(pred)(L, E, 1) if pred else None,
                            hardware=replace(base(0), **terms), miss_rule=rule, bound=False, **kw)

        res = measure(true)
        steps = len(tokens)
        calls = steps * L
        pf_host = true["predictor_host_ms"] + true["prefetch_host_ms"] * res.prefetches / calls if pred else None
        row = {"decode_steps": steps, "groups": [], "copies": res.loads + res.prefetches,
               "prefetch_issued": res.prefetches, "sync_ms_per_layer": sync, "prefetch_host_ms_per_layer": pf_host,
               "host_ms_per_layer": (pf_host or 0.0) + a + true["copy_host_ms"] * res.loads / calls,
               "cpu_experts": res.cpu_runs}
        label = f"{pol}-{scope}-{rule}-{cap}-{pred}"
        rep = ct.Repeat("synthetic.json", 1, "toy", 1, 0.25, "e", label, res.time_ms / steps, row,
                        {"expert_bytes": 1 << 20}, 0.4, L)
        out.append((ct.Configuration(("toy", 1, 0.25, label), [rep], spec), measure))
    (tmp_path / "prefetch_ceiling").mkdir()
    (tmp_path / "prefetch_ceiling" / "machine4_upload_contention.json").write_text(json.dumps(
        {"results": {"kernels": {"device_ms": 0.4},
                     "kernels_during_copies": {"device_ms": 0.4 * (1 + true["copy_slowdown"])}}}))
    return out, base


class _FakeSim:
    """The Simulator's face for the fit, over the synthetic configurations."""

    def __init__(self, measure_of):
        self.measure_of = measure_of

    def ms_per_step(self, conf, hw_of):
        rep = conf.repeats[0]
        return self.measure_of[conf.key](hw_of(rep).host_terms()).time_ms / rep.row["decode_steps"]


def test_fit_recovers_known_terms(tmp_path, monkeypatch):
    ct = _calibrate()
    true = {"layer_host_ms": 0.31, "copy_host_ms": 0.05, "predictor_host_ms": 0.2, "prefetch_host_ms": 0.015,
            "copy_slowdown": 0.08, "hybrid_layer_ms": 0.4}
    pairs, base = _synthetic(ct, true, tmp_path)
    monkeypatch.setattr(ct, "TRAIN", {("toy", 1)})
    confs = [c for c, _m in pairs]
    st = ct.stats_fit([(r, c.spec) for c in confs for r in c.repeats])
    assert st["copy_host_ms"] == pytest.approx(true["copy_host_ms"], abs=1e-9)
    assert st["host_before_kernel_ms"] == pytest.approx(0.09, abs=1e-9)
    assert st["predictor_host_ms"] == pytest.approx(true["predictor_host_ms"], abs=1e-9)
    assert st["prefetch_host_ms"] == pytest.approx(true["prefetch_host_ms"], abs=1e-9)
    assert st["sync_ms"] == pytest.approx(0.05)
    terms, record = ct.fit_terms(confs, _FakeSim({c.key: m for c, m in pairs}), str(tmp_path), base, log=lambda s: None)
    for n in ("copy_slowdown", "copy_host_ms", "predictor_host_ms", "prefetch_host_ms"):
        assert terms[n] == pytest.approx(true[n], abs=1e-9), n
    # the simulated steps find the GPU idle and the hybrid cost to the search's resolution
    assert terms["layer_host_ms"] == pytest.approx(true["layer_host_ms"], abs=0.02)
    assert terms["hybrid_layer_ms"] == pytest.approx(true["hybrid_layer_ms"], abs=0.05)
    assert record["score_train"] < 0.01


def test_golden_finds_the_minimum():
    ct = _calibrate()
    assert ct.golden(lambda x: (x - 0.37) ** 2, 0.0, 1.0, 30) == pytest.approx(0.37, abs=1e-4)
    assert ct.golden(lambda x: abs(x + 0.1), -0.5, 1.0, 30) == pytest.approx(-0.1, abs=1e-4)


# -- the fidelity table on the committed runs ---------------------------------------------------------------

def test_committed_table_covers_every_committed_configuration():
    ct = _calibrate()
    paths, excluded = ct.result_files()
    confs = ct.configurations(ct.load_repeats(paths))
    table = json.loads((EVAL / "results" / "sim_fidelity.json").read_text())
    got = {(r["model"], r["batch"], r["fraction"], r["label"]) for r in table["rows"]}
    assert got == {c.key for c in confs}, "a new e2e result landed: rerun python eval/calibrate_timing.py"
    assert all("_pre_fix" in f for f in excluded)
    prof = default_profile(1 << 24).host_terms()
    assert {k: table["profile"][k] for k in prof} == prof
    for r in table["rows"]:
        if r["simulated"] is not None:
            med, lo, hi = r["measured_median"], r["measured_min"], r["measured_max"]
            assert r["ok"] == (lo <= r["simulated"] <= hi or abs(r["simulated"] - med) <= 0.15 * med)
        else:
            assert r["notes"], "an unmodelled row says why"


def test_fidelity_command_runs_on_the_committed_runs(routing_dir, tmp_path):
    ct = _calibrate()
    out = tmp_path / "fid"
    rc = ct.main(["--only", "lru@layer+hybrid-auto", "--model", "mixtral", "--out", str(out), "--cache", "",
                  "--routing", str(routing_dir)])
    assert rc == 0
    doc = json.loads((out.with_suffix(".json")).read_text())
    assert [r["label"] for r in doc["rows"]] == ["lru@layer+hybrid-auto"]
    r = doc["rows"][0]
    assert r["held_out"] and r["repeats"] >= 2 and r["simulated"] > 0 and r["simulated_uncalibrated"] > 0
    assert r["simulated"] != r["simulated_uncalibrated"]
    assert "| mixtral | 1 |" in out.with_suffix(".md").read_text()


def test_measured_non_expert_time_replaces_the_profile_figure():
    """Config n rows (the model without its experts) give each shape's non-expert time per layer and batch;
    the simulator uses them for that shape only, and they are not configurations of the table."""
    ct = _calibrate()

    def rep(model, batch, config, ms, layers=4):
        return ct.Repeat("f.json", 1, model, batch, 0.25, config, "x" if config == "n" else "lru", ms, {}, {}, 0.3,
                         layers)

    reps = [rep("deepseek", 1, "n", 8.0), rep("deepseek", 1, "n", 12.0), rep("deepseek", 1, "n", 10.0),
            rep("deepseek", 8, "n", 20.0), rep("deepseek", 1, "e", 50.0)]
    ne = ct.measured_non_expert(reps)
    assert ne == {"deepseek": {1: {"median": 2.5, "min": 2.0, "max": 3.0, "repeats": 3},
                               8: {"median": 5.0, "min": 5.0, "max": 5.0, "repeats": 1}}}
    confs = ct.configurations(reps)
    assert [c.repeats[0].config for c in confs] == ["e"]
    sim = ct.Simulator(non_expert=ne, progress=False)
    hw = default_profile(1 << 24)
    got = sim.profile(confs[0], hw)
    launch = hw.expert_launch_ms
    assert got.non_expert(1) == pytest.approx(2.5 + launch) and got.non_expert(8) == pytest.approx(5.0 + launch)
    assert got.non_expert(4) == pytest.approx(2.5 + 3 * 2.5 / 7 + launch)  # interpolated between the two
    assert got.copy_ms == hw.copy_ms and got.host_terms() == hw.host_terms()  # nothing else changes
    other = ct.Configuration(("mixtral", 1, 0.25, "lru"), [rep("mixtral", 1, "e", 9.0)], confs[0].spec)
    assert sim.profile(other, hw) is hw  # no measurement for this shape: the profile's own figure


def test_each_run_replays_with_the_admission_it_used():
    ct = _calibrate()

    def rep(cfg):
        return ct.Repeat("f.json", 1, "deepseek", 1, 0.25, "e", "lru", 1.0, {"runtime_config": cfg}, {}, 0.3, 26)

    assert ct.admission_of(rep({"policy": "lru"})) == "none"  # recorded before the runtime had a rule
    assert ct.admission_of(rep({"admission": "gated"})) == "gated"
    assert ct.admission_of(rep(None)) == "none"


def test_runtime_config_names_its_admission_rule():
    from moecache.runtime.offload import offload
    from tests.tiny_models import tiny_model

    m = tiny_model("qwen3_moe")
    h = offload(m, cache_slots=4, device="cpu", admission="cost")
    cfg = h.stats()["config"]
    assert cfg["admission"] == "cost" and cfg["admission_clock"] == "model"
    h.remove()


def test_fidelity_command_bad_input(tmp_path, capsys):
    ct = _calibrate()
    assert ct.main(["--results", str(tmp_path)]) == 2
    assert "no end-to-end result files" in capsys.readouterr().err
    assert ct.main(["--freeze", "--only", "lru"]) == 2
    assert "drop them" in capsys.readouterr().err


def test_replay_follows_the_runs_copy_engine_and_candidate_probability():
    ct = _calibrate()

    def rep(cfg):
        return ct.Repeat("f.json", 1, "deepseek", 8, 0.25, "e", "lru", 1.0, {"runtime_config": cfg}, {}, 0.3, 26)

    assert ct.copy_queue_of(rep({"engine": "worker"})) == "worker"
    assert ct.copy_queue_of(rep({"engine": "stream"})) == "fifo"
    assert ct.copy_queue_of(rep(None)) == "worker"  # stats without an engine: the default, the worker
    assert ct.any_row_candidates(rep({"engine": "worker"}))
    assert not ct.any_row_candidates(rep({"admission": "none"}))


def test_any_row_predictor_ranks_as_the_runtime_before_the_admission_rule():
    ct = _calibrate()

    class Rows:
        name = "rows"

        def __init__(self, p):
            self.p = np.asarray(p, dtype=np.float64)

        def predict(self, layer, depth):
            return self.p

    # two rows: expert 0 wanted by both at 0.4 (any row: 0.64, summed 0.8); expert 1 by one row at 0.7
    p = [[0.4, 0.7, 0.0], [0.4, 0.0, 0.0]]
    got = ct.AnyRowPredictor(Rows(p)).predict(0, 1)
    assert got.shape == (1, 3)
    assert got[0] == pytest.approx([0.64, 0.7, 0.0])
    summed = np.asarray(p).sum(axis=0)
    assert np.argmax(summed) == 0 and np.argmax(got.sum(axis=0)) == 1  # the order differs from the summed rows
    # one row: the capped score, as the simulator's own
    assert ct.AnyRowPredictor(Rows([[1.3, 0.2, 0.0]])).predict(0, 1)[0] == pytest.approx([1.0, 0.2, 0.0])
    assert ct.AnyRowPredictor(Rows(p)).name == "rows"


def test_a_run_whose_hybrid_rule_copied_every_miss_replays_with_the_copy_rule():
    ct = _calibrate()
    spec = ct.SimSpec("offload", miss_rule="auto")

    def rep(row):
        return ct.Repeat("f.json", 1, "deepseek", 1, 0.25, "e", "lru+hybrid-auto", 1.0, row, {}, 0.3, 26)

    assert ct.miss_rule_of(rep({"decisions": {"copy": 12633, "cpu": 0}, "cpu_experts": 0}), spec) == "copy"
    assert ct.miss_rule_of(rep({"decisions": {"copy": 6587, "cpu": 11643}, "cpu_experts": 11643}), spec) == "auto"
    assert ct.miss_rule_of(rep({"decisions": {"copy": 0, "cpu": 0}}), spec) == "auto"  # nothing decided: no evidence
    assert ct.miss_rule_of(rep({"decisions": {"copy": 5, "cpu": 0}}), ct.SimSpec("offload", miss_rule="cpu")) == "cpu"


@pytest.mark.slow
def test_batch8_prefetch_replay_counts_follow_the_runtimes(routing_dir):
    """DeepSeek b8 ``lru+transition-d1+p0.3+hybrid-auto``: the runtime cancelled 311 of its 1045 prefetches per
    step and ran 168 misses per step on the CPU (its stats, e2e_deepseek_one_run.json). The replay with the
    runtime's copy worker and any-row candidates follows those counts; the FIFO model cancels none."""
    ct = _calibrate()
    paths, _ = ct.result_files()
    confs = [c for c in ct.configurations(ct.load_repeats(paths)) if c.key == (
        "deepseek", 8, 0.25, "lru+transition-d1+p0.3+hybrid-auto")]
    assert len(confs) == 1
    conf = confs[0]
    row = conf.longest.row
    steps = row["decode_steps"]
    sim = ct.Simulator(ct.ReplayBuilder(str(routing_dir)), None, progress=False)
    got = sim.step(conf, lambda r: default_profile(int(r.setup["expert_bytes"])))
    assert got["prefetches"] == pytest.approx(row["prefetch_issued"] / steps, rel=0.05)
    assert got["cancelled"] == pytest.approx(row["prefetch_cancelled"] / steps, rel=0.1)
    assert got["cpu_runs"] == pytest.approx(row["cpu_experts"] / steps, rel=0.1)
    assert got["ms_per_step"] == pytest.approx(conf.measured[0], rel=0.15)
    # the FIFO model (every prefetch copied in issue order) is what the table used before: far off
    fifo = ct.simulate_step
    old = ct.copy_queue_of
    try:
        ct.copy_queue_of = lambda rep: "fifo"
        f = fifo(conf.longest, conf.spec, sim.replay(conf), default_profile(int(conf.longest.setup["expert_bytes"])))
    finally:
        ct.copy_queue_of = old
    assert f["cancelled"] == 0 and f["ms_per_step"] > 1.25 * conf.measured[0]


def test_frozen_terms_carry_the_measured_non_expert_time():
    # --freeze writes the training shape's measured non-expert time; the fidelity replay applies it like the others
    ct = _calibrate()
    terms = {n: 0.5 for n in ct.HOST_TERMS}
    out = ct.rounded({**terms, "non_expert_ms": {1: 1.6750461, 8: 1.6542}})
    assert out["non_expert_ms"] == {1: 1.675046, 8: 1.6542}
    assert "non_expert_ms" not in ct.rounded(terms)
    hw = ct.apply_terms(ct.uncalibrated_profile(17_301_504), out)
    assert hw.non_expert(8) == pytest.approx(1.6542 + hw.expert_launch_ms)
    assert hw.non_expert(1) != ct.uncalibrated_profile(17_301_504).non_expert(1)


def test_fitted_predictor_cache_is_keyed_by_the_predictor_code(tmp_path, monkeypatch):
    ct = _calibrate()
    a = ct._DiskFits(str(tmp_path), ("deepseek", 26, (1, 2)))
    monkeypatch.setattr(ct, "_predictor_code_digest", lambda: b"other code")
    b = ct._DiskFits(str(tmp_path), ("deepseek", 26, (1, 2)))
    assert a.path != b.path and a.path.startswith(str(tmp_path))
