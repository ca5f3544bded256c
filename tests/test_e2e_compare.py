"""``eval/e2e_compare.py`` (with ``e2e_harness.py`` and ``e2e_targets.py``) on the CPU: configuration specs, sequence plans, the model calls a replay
made, the Belady lower bound (hand-worked), accelerate's device map, targets, and one tiny run of the
whole script on the real Mixtral trace (skipped where ../shared is absent)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moecache.errors import ConfigError
from moecache.forced_routing import run_forced
from moecache.trace import RoutingBlock, Trace, TraceMeta

from .tiny_models import tiny_model

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _load(name: str):
    sys.path.insert(0, str(EVAL))
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def e2e():
    """The script with the harness's and the targets' names next to its own (they are its parts)."""
    harness = _load("e2e_harness")
    targets = _load("e2e_targets")
    script = _load("e2e_compare")
    return SimpleNamespace(**{**vars(harness), **vars(targets), **vars(script)})


def _trace(lengths: list[int], layers: int = 3, experts: int = 8, k: int = 2, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(n)])
    seq = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(x) for x in lengths])
    meta = TraceMeta(num_experts=experts, top_k=k, moe_layers=list(range(layers)), model="synthetic")
    return Trace(meta, RoutingBlock.build(ids.astype(np.int16), seq=seq, pos=pos, phase=0))


def _units(e2e, rows: list[list[int]], timed_from: int, request: int = 0):
    """One-layer, top-1 units, one per step, each listing the experts its rows pick."""
    return [e2e.Unit(np.asarray(r, dtype=np.int64).reshape(-1, 1, 1), request, i >= timed_from)
            for i, r in enumerate(rows)]


def test_candidate_specs_parse_and_bad_ones_say_what_is_valid(e2e):
    c = e2e.Candidate.parse("lrfu+transition:depth=2+hybrid:rule=auto")
    assert (c.policy, c.scope, c.predictor, c.depth, c.hybrid) == ("lrfu", "global", "transition", 2, "auto")
    assert c.label == "lrfu+transition-d2+hybrid-auto" and c.spec == "lrfu+transition:depth=2+hybrid:rule=auto"
    assert e2e.Candidate.parse("lru:scope=layer") == e2e.LRU_LAYER and e2e.LRU_LAYER.label == "lru@layer"
    assert e2e.Candidate.parse("static+hybrid:rule=cpu") == e2e.FIDDLER
    assert e2e.Candidate.parse("lru+hybrid").hybrid == "true"  # offload(hybrid=True)
    c = e2e.Candidate.parse(" lru:scope=layer + temporal:depth=1:width=1:min_prob=0.3 + hybrid:rule=half ")
    assert (c.scope, c.predictor, c.depth, c.width, c.min_prob, c.hybrid) == ("layer", "temporal", 1, 1, 0.3, "half")
    for d in e2e.DEFAULT_CANDIDATES:
        assert e2e.Candidate.parse(d).spec == d
    for bad, msg in (("lruu", "unknown policy 'lruu'; valid: .*lru"), ("belady", "simulator only"),
                     ("lru+transition", "needs a prefetch depth; write transition:depth=1"),
                     ("lru+oracle2:depth=1", "'oracle2' is neither a predictor nor hybrid; valid predictors"),
                     ("lru+oracle2-d1", "unknown predictor"), ("lru+hybrid-fast", "hybrid mode 'fast'"),
                     ("lru+hybrid:rule=fast", "hybrid rule 'fast'; valid: auto"),
                     ("predicted", "add \\+PREDICTOR:depth=N"), ("lru@pool", "scope 'pool'"),
                     ("lru:scope=pool", "scope 'pool' is not 'layer' or 'global'"),
                     ("lru:half_life=3", "'lru' takes no 'half_life'; valid keys: scope"),
                     ("lru+learned:depth=1:p=0.5", "'learned' takes no 'p'; valid keys: depth, min_prob, width"),
                     ("lru+learned:depth=0", "depth=0 is out of range"),
                     ("lru+learned:depth=x", "depth='x' is not an integer"),
                     ("lru+learned:depth=1:min_prob=2", "min_prob=2 is out of range"),
                     ("lru+learned:depth", "'depth' in 'learned:depth' is not key=value"),
                     ("lru+learned:depth=1+temporal:depth=1", "two predictors"),
                     ("lru+hybrid+hybrid:rule=cpu", "hybrid given twice"),
                     ("lru++hybrid", "empty part"),
                     ("lru@layer+learned:depth=1", "mixes the old spelling"),
                     ("lru:scope=layer+learned-d1", "mixes the old spelling")):
        with pytest.raises(ConfigError, match=msg) as err:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                e2e.Candidate.parse(bad)
        assert "\n" not in str(err.value)  # one line


def test_a_candidate_carries_its_predictors_options_to_the_fitted_predictor(e2e):
    c = e2e.Candidate.parse("lrfu+learned:depth=2:width=12:window=12:calibrate=isotonic")
    assert (c.predictor, c.depth, c.width) == ("learned", 2, 12)
    assert c.predictor_options == (("calibrate", "isotonic"), ("window", "12"))
    assert c.predictor_spec == "learned:calibrate=isotonic:window=12"
    assert c.label == c.spec == "lrfu+learned:depth=2:width=12:calibrate=isotonic:window=12"
    assert e2e.Candidate.parse(c.label) == c  # result tables name the row by a spelling that parses back
    assert e2e.Candidate.parse("lru+learned:depth=1").predictor_spec == "learned"
    with pytest.raises(ConfigError, match="'learned' takes no 'windw'; valid keys: depth, .*window"):
        e2e.Candidate.parse("lru+learned:depth=1:windw=12")
    with pytest.raises(ConfigError, match="takes no 'max_depth'"):  # the depth is the candidate's, not an option
        e2e.Candidate.parse("lru+learned:depth=1:max_depth=3")
    # the bench fits the predictor with those options, once per spelling
    trace = _trace([30, 30, 30, 30], layers=3, experts=8, k=2)
    bench = SimpleNamespace(L=3, E=8, k=2, fit_trace=trace, fitted={})
    wide = e2e.Bench.predictor(bench, "learned:window=3")
    plain = e2e.Bench.predictor(bench, "learned")
    assert (wide.window, plain.window) == (3, 2) and set(bench.fitted) == {"learned:window=3", "learned"}
    assert e2e.predictor_options("learned:calibrate=isotonic:window=12") == (
        "learned", {"calibrate": "isotonic", "window": 12})


#: Old candidate spellings cited in recorded results and docs (``policy[@scope]+part+...``).
_OLD_SPELLING = re.compile(r"(?<![\w.+/-])(?:activation|fifo|lfu|lrfu|lru|predicted|static)"
                           r"(?:@(?:layer|global))?(?:\+[A-Za-z0-9_.-]+)*")
#: Matches that are not candidates: eval/results/sim_speed.md's simulator rows ("lru+transition d1").
_NOT_CANDIDATES = {"lru+transition", "predicted+temporal"}


def _cited_old_spellings() -> set[str]:
    root = EVAL.parent
    found: set[str] = set()
    for path in [root / "docs" / "results.md", *sorted((root / "eval" / "results").glob("*.md"))]:
        doc = path.read_text(encoding="utf-8")
        for m in _OLD_SPELLING.finditer(doc):
            text = m.group(0).rstrip(".-")
            if doc[m.end():m.end() + 1] == ":" or doc[m.start() - 1:m.start()] == ":":
                continue  # the registry spelling (docs/results.md shows it too), not an old one
            if "@" in text or "+" in text:
                found.add(text)
    return found


def test_every_cited_old_spelling_parses_to_the_same_configuration_as_its_registry_spelling(e2e):
    cited = _cited_old_spellings()
    assert len(cited) >= 20 and {"lru@layer+hybrid-auto", "lru+oracle-d1", "static+hybrid-cpu",
                                 "lru@layer+temporal-d1+w1+hybrid-cpu"} <= cited, sorted(cited)
    checked = 0
    for old in sorted(cited - _NOT_CANDIDATES):
        with pytest.warns(FutureWarning, match="old spelling") as record:
            cand = e2e.Candidate.parse(old)
        new = cand.spec
        assert f"write {new!r}" in str(record[0].message)
        assert ("@" not in new and "-d" not in new and "hybrid-" not in new), new
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the registry spelling warns of nothing
            again = e2e.Candidate.parse(new)
        assert again == cand and again.label == old  # same configuration, same row label
        checked += 1
    assert checked >= 18
    for text in _NOT_CANDIDATES & cited:  # simulator labels, not candidates: they fail loudly, not silently
        with pytest.raises(ConfigError):
            e2e.Candidate.parse(text)


def test_a_bad_candidate_stops_the_script_with_one_line_before_writing_anything(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "mixtral", "--quick", "--configs", "e", "--out", str(out),
                   "--candidates", "lru,lru+learned:depth=1:p=0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert err.count("\n") == 0 and "'learned' takes no 'p'; valid keys: depth, min_prob, width" in err, err


def test_old_and_registry_spellings_give_equal_offload_arguments(e2e):
    """The same candidate in either spelling resolves to the same moecache.offload arguments."""
    bench = SimpleNamespace(L=4, E=8, k=2, slots=16, dev="cpu", store=None, fit_trace=None,
                            predictor=lambda name: f"<fitted {name}>")
    for old, new in (("lru@layer+transition-d1+p0.3+w2+hybrid-auto",
                      "lru:scope=layer+transition:depth=1:min_prob=0.3:width=2+hybrid:rule=auto"),
                     ("lru+hybrid-true", "lru+hybrid"), ("lrfu+temporal-d2", "lrfu+temporal:depth=2")):
        with pytest.warns(FutureWarning):
            a = e2e.offload_kwargs(bench, e2e.Candidate.parse(old))
        b = e2e.offload_kwargs(bench, e2e.Candidate.parse(new))
        pol_a, pol_b = a.pop("policy"), b.pop("policy")
        assert a == b and type(pol_a) is type(pol_b) and pol_a.num_pools == pol_b.num_pools


    assert e2e.parse_configs("e,a,b") == ["a", "e", "b"]  # (a) first, accelerate last
    with pytest.raises(ConfigError, match="valid: a, b, c, d, e"):
        e2e.parse_configs("a,f")
    assert e2e.parse_batches("1,8") == [1, 8]
    with pytest.raises(ConfigError, match="must be >= 1"):
        e2e.parse_batches("0")


def test_plans_time_long_sequences_fit_on_the_rest_and_warm_up_apart(e2e):
    tr = _trace([12, 3, 12, 12, 5, 12, 12])
    plans, fit, notes, errors = e2e.plan_batches(tr, [1, 2, 8], tokens=10, warm_steps=2, sequences={})
    assert plans[1].groups == [[0], [2]] and plans[2].groups == [[0, 2]]
    assert fit == [1, 3, 4, 5, 6] and plans[1].warm == [1] and plans[2].warm == [1, 3]
    assert not plans[1].warm_is_timed and not notes
    assert 8 in errors and "the trace has 7" in errors[8]
    plans, fit, notes, _ = e2e.plan_batches(tr, [4], tokens=10, warm_steps=4, sequences={4: 3})
    assert plans[4].groups == [[0, 2, 3, 5]] and fit == [1, 4, 6]  # 3 rounded up to a multiple of 4
    assert plans[4].warm == plans[4].groups[0] and plans[4].warm_is_timed  # 2 of 3 fit sequences are short
    plans, _fit, notes, _ = e2e.plan_batches(tr, [2], tokens=20, warm_steps=2, sequences={})
    assert plans[2].groups == [[0, 2]] and "took the 2 longest" in notes[0]


def test_belady_bound_hand_worked(e2e):
    # capacity 2, one layer, top-1: 0 1 2 0 1 0. MIN: miss 0, miss 1, miss 2 evicting 1 (next use
    # later than 0's), hit 0, miss 1, hit 0 -> 4 misses, one of them in the timed steps 3..5.
    units = _units(e2e, [[0], [1], [2], [0], [1], [0]], timed_from=3)
    misses, steps = e2e.belady_misses(units, num_experts=4, capacity=2)
    assert (misses, steps) == ([1], 3)
    # with bypass, 2 (never used again) is not cached: the timed steps all hit
    assert e2e.belady_misses(units, num_experts=4, capacity=2, bypass=True) == ([], 3)
    # a step of two rows needs both experts once, with the tokens that picked each
    units = _units(e2e, [[0, 0], [1, 0], [2, 3]], timed_from=0)
    misses, steps = e2e.belady_misses(units, num_experts=4, capacity=2)
    assert steps == 3 and misses == [2, 1, 1, 1]
    b = e2e.step_bound(10, 5, copy_ms=2.0, compute_ms=3.0, cpu_service_ms=5.0)
    assert (b["copy_ms_per_step"], b["bound_ms_per_step"], b["serial_ms_per_step"]) == (4.0, 4.0, 7.0)
    assert b["miss_service_with_cpu_ms_per_step"] == 1.0
    b = e2e.step_bound(10, 5, copy_ms=0.5, compute_ms=3.0)
    assert b["bound_ms_per_step"] == 3.0  # compute-bound
    assert e2e.step_bound(3, 2, copy_ms=1.0, compute_ms=None)["bound_ms_per_step"] == 1.5


def test_replayed_units_are_the_model_calls_of_a_batched_replay(e2e):
    m = tiny_model("qwen3_moe")
    tr = _trace([6, 6, 6, 4], seed=2)
    seen: list[np.ndarray] = []
    hook = m.model.layers[1].mlp.experts.register_forward_hook(lambda mod, args, out: seen.append(args[1].numpy()))
    warm = run_forced(m, tr, sequences=[3], prefill=2)
    res = run_forced(m, tr, sequences=[0, 1, 2], prefill=1, batch=2)
    hook.remove()
    units = e2e.replayed_units(tr, warm, 0, False) + e2e.replayed_units(tr, res, 1, True)
    assert len(units) == len(seen) == (1 + 2) + (1 + 5) + (1 + 5)
    for u, ids in zip(units, seen):
        assert np.array_equal(u.ids[:, 1], ids)
    assert [u.request for u in units] == [0] * 3 + [1] * 6 + [2] * 6
    assert [u.timed_decode for u in units] == [False] * 4 + [True] * 5 + [False] + [True] * 5


def test_device_map_keeps_non_experts_whole_and_maps_each_experts_module(e2e):
    sys.path.insert(0, str(EVAL))
    from _shapes import experts_module_names

    m = tiny_model("mixtral")
    names = experts_module_names(m, "mixtral")
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    dmap = e2e.device_map_for(m, {names[0]: 0, names[1]: "cpu", names[2]: "cpu"}, 0)
    assert dmap[names[0]] == 0 and dmap[names[1]] == dmap[names[2]] == "cpu"
    assert dmap["lm_head"] == 0 and dmap["model.embed_tokens"] == 0 and dmap["model.layers.0.self_attn"] == 0
    for name, _ in list(m.named_parameters()) + list(m.named_buffers()):
        owners = [k for k in dmap if k == "" or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


def test_replay_lookahead_reads_the_forced_routing_ahead(e2e):
    ids = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)  # (b=2 rows, n=3 steps, L=4 layers, k=2)
    la = e2e.ReplayLookahead(4)
    assert la.target(1) is None  # nothing replayed yet
    la.seek(ids, 1)
    la.layer = 1
    assert np.array_equal(la.target(1), ids[:, 1, 2]) and np.array_equal(la.target(2), ids[:, 1, 3])
    assert np.array_equal(la.target(3), ids[:, 2, 0])  # wraps into the next step's first layer
    assert la.target(7) is None  # past the replayed rows
    oracle = e2e.ReplayOracle(4, 16, 2)
    oracle.lookahead.seek(ids % 16, 0)
    oracle.observe(3, ids[:, 0, 3] % 16)
    p = oracle.predict(3, 1)  # layer 0 of the next step
    assert p.shape == (2, 16) and np.allclose(p.sum(axis=1), 2)
    for r in range(2):
        assert set(np.flatnonzero(p[r] == 1.0)) == set((ids[r, 1, 0] % 16).tolist())


def test_repeated_runs_are_pooled_and_the_best_is_chosen_on_the_pool(e2e):
    def run(label, cfg, tokens, seconds, steps, **kw):
        return {"config": cfg, "label": label, "status": "ok", "decode_tokens": tokens, "decode_s": seconds,
                "decode_steps": steps, "tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds / steps, **kw}

    rows = [run("lru", "e", 100, 10.0, 100, bound={"bound_ms_per_step": 50.0}), run("x", "e", 100, 4.0, 100),
            run("lru", "e", 100, 5.0, 100), run("x", "e", 100, 16.0, 100),
            {"config": "e", "label": "x", "status": "error: boom", "tokens_per_s": None}]
    pooled = {r["label"]: r for r in e2e.pooled_rows(rows)}
    assert pooled["lru"]["tokens_per_s"] == pytest.approx(200 / 15.0)  # not the mean of 10 and 20
    assert pooled["lru"]["ms_per_step"] == pytest.approx(75.0) and pooled["lru"]["decode_steps"] == 200
    assert pooled["lru"]["runs_tokens_per_s"] == [10.0, 20.0]
    assert pooled["lru"]["ms_per_step_over_bound"] == pytest.approx(1.5)
    assert pooled["x"]["tokens_per_s"] == pytest.approx(10.0)  # the failed run is left out
    # x's best run (25 tokens/s) beats lru's, but pooled lru is faster
    assert e2e.best_rows(rows)["e"]["label"] == "lru"


def test_targets_compare_the_best_rows(e2e):
    rows = [{"config": "a", "label": "batched", "status": "ok", "tokens_per_s": 20.0},
            {"config": "a", "label": "grouped", "status": "ok", "tokens_per_s": 25.0},
            {"config": "b", "label": "b", "status": "ok", "tokens_per_s": 0.3},
            {"config": "c", "label": "c", "status": "ok", "tokens_per_s": 15.0},
            {"config": "e", "label": "lru", "status": "ok", "tokens_per_s": 21.0, "ms_per_step": 47.6,
             "bound": {"bound_ms_per_step": 40.0}},
            {"config": "e", "label": "x", "status": "error: x", "tokens_per_s": None}]
    got = {t["target"]: t for t in e2e.check_targets("deepseek", 1, rows)}
    assert got["(e) >= 0.8x (a)"]["met"] and got["(e) >= 0.8x (a)"]["value"] == pytest.approx(21 / 25)
    assert got["(e) >= 1.2x (c)"]["met"] and got["(e) >= 50x (b)"]["met"]
    got = {t["target"]: t for t in e2e.check_targets("deepseek", 8, rows)}
    assert got["(e) >= 1.5x the better of (c), (d)"]["met"] is False
    assert got["(e) within 2x of the lower bound"]["met"] and got["(e) within 2x of the lower bound"]["value"] == \
        pytest.approx(47.6 / 40)
    assert e2e.check_targets("mixtral", 1, rows[:4])[0]["met"] is None  # no (e)


def test_the_whole_script_runs_on_a_tiny_mixtral_shape(e2e, routing_dir, tmp_path):
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "mixtral", "--quick", "--layers", "2", "--tokens", "4", "--warm-steps", "1",
                   "--configs", "a,b,c,d,e", "--repeats", "2",
                   # the oracle issues every candidate (on a CPU device the default profile's copies are too
                   # cheap for the default gate to pay the predictor's host time)
                   "--candidates", "lru,lru+transition:depth=1,lru+oracle:depth=1:admission=none",
                   "--out", str(out),
                   "--trace", str(routing_dir / "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["setup"]["moe_layers"] == 2 and res["setup"]["slots"] == 4 and res["copy"]["ms_per_expert"] > 0
    rows = res["batches"]["1"]["rows"]
    by = {(r["config"], r["label"]): r for r in rows}
    assert {"a", "b", "c", "d", "e", "e*"} == {c for c, _ in by}
    for key in [("a", "resident (batched_mm)"), ("c", "lru@layer"), ("d", "static+hybrid-cpu"), ("e", "lru")]:
        r = by[key]
        assert r["status"] == "ok" and r["decode_steps"] == 2 * 3 and r["tokens_per_s"] > 0, r
        assert r["bound"]["steps"] == 6 and r["bound"]["bound_ms_per_step"] > 0
    assert by[("c", "lru@layer")]["misses"] > 0 and by[("c", "lru@layer")]["runtime_config"]["slots"] == 4
    d = by[("d", "static+hybrid-cpu")]
    assert d["preloaded_experts"] == 3 and d["cpu_experts"] > 0 and d["bytes_copied"] == 0  # nothing copied on a miss
    assert by[("b", "accelerate dispatch_model")]["status"] in ("ok", "unavailable: accelerate is not installed "
                                                                "(pip install accelerate)")
    assert sum(bool(r.get("best_of_e")) for r in rows) == 2  # one per run
    runs: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        runs.setdefault((r["config"], r["label"]), []).append(r["run"])
    assert all(v == [1, 2] for v in runs.values()), runs  # every configuration ran twice, round-robin
    # The oracle's row is the prefetch ceiling: reported apart, never (e); it knew every next layer's experts.
    oracle = by[("e*", "lru+oracle-d1+a-none")]
    assert oracle["status"] == "ok" and not oracle.get("best_of_e") and oracle["prefetch_issued"] > 0
    assert oracle["prefetch_precision"] > 0.9 and oracle["hit_rate"] > by[("e", "lru")]["hit_rate"]
    assert [t["target"] for t in res["batches"]["1"]["targets"]] == ["(e) >= 1.5x the better of (c), (d)",
                                                                     "(e) within 2x of the lower bound"]
    md = (tmp_path / "e2e.md").read_text()
    assert "| c | lru@layer (runs: " in md, md
    assert "Lower bound on (e)'s steps" in md
    assert md.count("| c | lru@layer") == 1  # its two runs pooled into one line
    assert "command: `python eval/e2e_compare.py" in md


def test_null_experts_measures_the_model_around_its_experts(e2e, routing_dir, tmp_path):
    """(n) replays with every experts module answering zeros: no bound, a non-expert time per layer, and
    the experts modules' own forward back afterwards (the resident run after it computes experts again)."""
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "mixtral", "--quick", "--layers", "2", "--tokens", "4", "--warm-steps", "1",
                   "--configs", "a,n", "--out", str(out),
                   "--trace", str(routing_dir / "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe")])
    assert rc == 0
    rows = json.loads(out.read_text())["batches"]["1"]["rows"]
    assert [r["config"] for r in rows][0] == "n"  # measured first, whatever the order asked
    n = rows[0]
    assert n["status"] == "ok" and n["decode_steps"] == 2 * 3 and "bound" not in n
    assert n["non_expert_ms_per_layer"] == pytest.approx(n["ms_per_step"] / 2)
    a = [r for r in rows if r["config"] == "a"]
    assert a and all(r["status"] == "ok" and "bound" in r for r in a)
    with pytest.raises(Exception, match="unknown"):
        e2e.parse_configs("a,z")


@pytest.mark.gpu
def test_the_whole_script_on_the_gpu_with_a_tiny_shape(e2e, request, tmp_path):
    """The CUDA paths: pinned copy timing, bf16, accelerate's CPU offload, the copy engine, hybrid.
    The trace: ``build/mixtral_trace`` (``moecache trace import`` of the Mixtral source, carried to a
    GPU machine without ../shared) where present, else ../shared's source folder."""
    imported = EVAL.parent / "build" / "mixtral_trace"
    trace = imported if (imported / "manifest.json").is_file() else \
        request.getfixturevalue("routing_dir") / "mixtral-8x7b-instruct-v0.1-fp8__speculative-moe"
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--model", "mixtral", "--quick", "--device", "cuda", "--layers", "4", "--tokens", "8",
                   "--batch", "1", "--candidates", "lru,lru+transition:depth=1,lru+transition:depth=1+hybrid:rule=auto",
                   "--out", str(out), "--trace", str(trace)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["setup"]["dtype"] == "bfloat16" and res["setup"]["host_pinned"] and res["copy"]["gb_per_s"] > 1
    rows = res["batches"]["1"]["rows"]
    assert all(r["status"] == "ok" for r in rows), [(r["label"], r["status"]) for r in rows]
    b = next(r for r in rows if r["config"] == "b")
    assert b["offloaded_to"] == "cpu" and b["experts_layers_on_gpu"] == 1 and b["decode_steps"] > 0
    d = next(r for r in rows if r["config"] == "d")
    assert d["bytes_copied"] == 0 and d["cpu_experts"] > 0
