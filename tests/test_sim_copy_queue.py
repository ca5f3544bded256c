"""The runtime's copy worker as the simulator's copy queue (moecache.sim.copy_queue): hand-computed timelines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecache.cost.timing import MISS_RULES, Timeline
from moecache.errors import ConfigError
from moecache.policies import new_policy
from moecache.predictors import PREDICTORS
from moecache.sim import Schedule, simulate
from moecache.sim.copy_queue import COPY_QUEUES, DEFAULT_COPY_QUEUE, RuleView, WorkerQueue
from moecache.trace import count_ids

from tests.simtools import make_trace, unit_profile


def _has_cpp() -> bool:
    from moecache._ext import extension

    ext = extension()
    return ext is not None and getattr(ext, "sim_core_version", 0) >= 6


class FixedGuess:
    """A predictor that always answers probability 1 for ``experts`` (right or wrong), whatever it saw."""

    name = "fixed_guess"
    fitted = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, experts: list[int]):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.experts = experts
        self.rows = 1

    def reset(self) -> None:
        pass

    def observe(self, layer: int, ids: np.ndarray) -> None:
        self.rows = len(ids)

    def predict(self, layer: int, depth: int) -> np.ndarray:
        out = np.zeros((self.rows, self.num_experts))
        out[:, self.experts] = 1.0
        return out


def _run(tokens, queue, guess=(1, 2, 3, 4, 5, 6), cap=7, engine="python"):
    trace = make_trace(tokens, num_experts=8)
    pol = new_policy("lru", cap, 1, 8, top_k=1, scope="layer")
    pred = FixedGuess(1, 8, 1, list(guess))
    return simulate(Schedule(trace), pol, pred, hardware=unit_profile(), depth=1, budget=len(guess), bound=False,
                    admission="none", copy_queue=queue, engine=engine)


def test_unneeded_queued_prefetches_are_cancelled_at_their_target():
    # Copy 1 ms, GPU 0.5, non-expert 1; expert 0 every step; six wrong prefetches (1..6) per step.
    # g0: ne 0 -> 1; 0 copied 1 -> 2; computed 2 -> 2.5; prefetches 1..6 queued at 1.
    # g1 (t_route 3.5): the worker took 1 at 1 (copy 2 -> 3), 2 at 2 (3 -> 4), 3 at 3 (4 -> 5); 4 would be taken
    #     at 4 > 3.5: 4, 5, 6 are still queued and are cancelled (not needed); 0 hits; 4, 5, 6 queued again at 3.5.
    # g2 (t_route 5): 4 taken at 4 (5 -> 6), 5 at 5 (6 -> 7); 6 cancelled; queued again at 5.
    r = _run([[0], [0], [0]], "worker")
    assert r.loads == 1 and r.prefetches == 6 + 3 + 1
    if _has_cpp():  # the C++ core's worker queue gives the same row (a streamed Python predictor)
        assert _run([[0], [0], [0]], "worker", engine="cpp").row() == r.row()
    assert r.extra["copies_cancelled"] == 3 + 1
    assert r.copy_busy_ms == 1 + 5  # the demand copy and the five copies the worker took
    assert r.time_ms == 5.5
    # the FIFO model copies all six at once and never cancels
    f = _run([[0], [0], [0]], "fifo")
    assert f.prefetches == 6 and f.copy_busy_ms == 7 and "copies_cancelled" not in f.extra


def test_a_needed_queued_prefetch_is_issued_at_once_as_a_demand_copy():
    # g0 as above; g1 needs 6, still queued: issued at h = 3.5 behind the copies taken (3 ends at 5): 5 -> 6,
    # computed 6 -> 6.5; 4 and 5 cancelled. FIFO: 6 is the sixth copy queued at 1 (2 -> 8), computed 8 -> 8.5.
    r = _run([[0], [6]], "worker")
    assert r.extra["copies_cancelled"] == 2
    assert r.prefetch_used == 1 and r.loads == 1
    assert r.time_ms == 6.5
    assert _run([[0], [6]], "fifo").time_ms == 8.5


def test_a_promoted_prefetch_is_not_a_second_copy_in_the_runtimes_estimate(monkeypatch):
    # the runtime counts a copy in its backlog estimate (admission clock, hybrid rule) once, when it is queued
    # (``Runtime._copied``); the target layer needing it while still queued issues it without a new count
    counted = []
    real = WorkerQueue.note_issued
    monkeypatch.setattr(WorkerQueue, "note_issued", lambda self, t: counted.append(t) or real(self, t))
    r = _run([[0], [6]], "worker")
    assert r.prefetch_used == 1 and r.loads == 1 and r.prefetches == 8  # 6 at g0, 2 cancelled ones again at g1
    assert len(counted) == r.loads + r.prefetches  # the promotion of 6 at g1 adds none


def test_worker_takes_queued_copies_by_priority_among_those_issued():
    tl = Timeline()
    wq = WorkerQueue(tl, 1.0)
    ready: dict[int, float] = {}
    tl.issue_copy(0.0, 1.0)  # a demand copy 0 -> 1
    wq.submit(0.0, 10, 1.9)
    wq.submit(0.0, 11, 1.1)  # likelier: taken first though issued second
    wq.submit(5.0, 12, 1.0)  # issued later: not a candidate before 5
    wq.advance(0.5, ready)
    assert ready == {11: 2.0}  # taken at 0 (one copy outstanding), runs 1 -> 2
    wq.advance(4.0, ready)
    assert ready == {11: 2.0, 10: 3.0}  # taken at 1 (one copy left), runs 2 -> 3; 12 not issued yet
    assert wq.queued(12) and not wq.queued(10)
    assert not wq.cancel(10)  # taken: too late
    wq.advance(5.0, ready)
    assert ready[12] == 6.0  # the engine idle since 3: taken at 5, copied 5 -> 6
    wq.submit(6.0, 13, 1.0)
    assert wq.cancel(13) and wq.cancelled == 1
    wq.advance(100.0, ready)
    assert 13 not in ready


def test_rule_view_counts_every_issued_copy_in_a_fifo():
    # the runtime's hybrid rule adds every issued copy to its backlog and never takes a cancelled one back
    tl = Timeline()
    wq = WorkerQueue(tl, 2.0)
    for k in range(3):
        wq.submit(1.0, k, 1.0)
        wq.note_issued(1.0)
    wq.cancel(2)
    view = RuleView(tl, wq)
    assert view.copy == 7.0 and view.copies == 3
    tl.issue_cpu(0.0, 4.0)
    tl.hits = 5
    assert view.cpu == 4.0 and view.hits == 5


def test_worker_queue_names_and_the_fifo_without_prefetch():
    trace = make_trace([[0], [1]], num_experts=4)
    pol = new_policy("lru", 1, 1, 4, top_k=1, scope="layer")
    with pytest.raises(ConfigError, match="unknown copy queue"):
        simulate(Schedule(trace), pol, hardware=unit_profile(), copy_queue="lifo", bound=False)
    assert COPY_QUEUES[0] == DEFAULT_COPY_QUEUE == "worker"  # the runtime's copy worker is the default
    # without prefetches the worker queue is the FIFO model (demand copies in issue order); the row names its model
    a = simulate(Schedule(trace), new_policy("lru", 1, 1, 4, top_k=1, scope="layer"), hardware=unit_profile(),
                 bound=False)
    b = simulate(Schedule(trace), new_policy("lru", 1, 1, 4, top_k=1, scope="layer"), hardware=unit_profile(),
                 copy_queue="fifo", bound=False)
    assert a.time_ms == b.time_ms == 5.0 and a.loads == b.loads == 2
    assert a.extra["copy_queue"] == "worker" and b.extra["copy_queue"] == "fifo"


#: Every registered policy but ``predicted`` (which needs a predictor: its own case below), with what it needs.
_NO_PREFETCH_POLICIES = ("lru", "lfu", "lrfu", "fifo", "static", "activation", "belady", "belady_bypass")


@st.composite
def _small_runs(draw):
    L, E = draw(st.integers(1, 3)), draw(st.integers(3, 8))
    K = draw(st.integers(1, min(2, E - 1)))
    n = draw(st.integers(1, 16))
    tokens = [[sorted(draw(st.lists(st.integers(0, E - 1), min_size=K, max_size=K, unique=True)))
               for _l in range(L)] for _t in range(n)]
    step = np.cumsum([0] + draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1))).tolist()
    # a new sequence (request) before about one token in four
    seq = np.cumsum([0] + [int(x == 0) for x in draw(st.lists(st.integers(0, 3), min_size=n - 1,
                                                             max_size=n - 1))]).tolist()
    trace = make_trace(tokens, num_experts=E, top_k=K, step=step, seq=seq)
    scope = draw(st.sampled_from(["layer", "global"]))
    total = E if scope == "layer" else L * E
    return trace, scope, draw(st.integers(K, total))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_runs(), st.sampled_from(_NO_PREFETCH_POLICIES + ("predicted",)), st.sampled_from(list(MISS_RULES.names())),
       st.booleans(), st.sampled_from(["python", "auto"]))
def test_without_prefetch_both_copy_models_give_the_same_rows(run, name, miss_rule, decode, engine):
    # Without prefetches every copy is a demand copy, issued at once: the worker queue holds nothing, the
    # runtime's backlog estimate (every copy issued, in a FIFO) is the FIFO timeline itself, and nothing is
    # cancelled. So the two models give the same row and the same outcome per need, on either engine, for every
    # policy and miss rule (a scan policy's host time aside: the next test). ``predicted`` reads scores only.
    # (engine auto: the C++ core where it runs the configuration.)
    trace, scope, cap = run
    m = trace.meta
    rows = []
    for queue in ("fifo", "worker"):
        pol = new_policy(name, cap, m.num_layers, m.num_experts, top_k=m.top_k, scope=scope)
        if pol.needs_fit:
            pol.fit(count_ids(trace))
        pred = PREDICTORS.get("temporal")(m.num_layers, m.num_experts, m.top_k) if name == "predicted" else None
        log: list = []
        r = simulate(Schedule(trace, decode_stream=decode), pol, pred, hardware=unit_profile(), miss_rule=miss_rule,
                     copy_queue=queue, bound=False, record=log, engine=engine).row()
        assert r.pop("copy_queue") == queue
        assert r.pop("copies_cancelled", 0) == 0
        rows.append((r, log))
    assert rows[0] == rows[1]


def test_without_prefetch_a_scan_policy_differs_by_its_non_evicting_inserts():
    # The one difference without prefetch: a scan policy's host time (evict_host_by_name) is charged per insert
    # by the FIFO model and per eviction by the worker model (as the runtime pays it: the pool is scanned only
    # when an insert must evict). One layer, two slots, experts 0, 1, 2: copy 1, GPU 0.5, non-expert 1, scan 0.25.
    # FIFO: g0 h = 1 + 0.25, copy 1.25 -> 2.25, GPU -> 2.75; g1 ne -> 3.75, h 4, copy -> 5, GPU -> 5.5;
    #       g2 ne -> 6.5, h 6.75, copy -> 7.75, GPU -> 8.25.
    # worker: g0 h = 1 (no eviction), copy 1 -> 2, GPU -> 2.5; g1 ne -> 3.5, copy -> 4.5, GPU -> 5;
    #       g2 ne -> 6, evicts: h 6.25, copy -> 7.25, GPU -> 7.75.
    trace = make_trace([[0], [1], [2]], num_experts=4)

    def run(queue, scan):
        pol = new_policy("activation", 2, 1, 4, top_k=1, scope="layer")
        pol.fit(np.ones((1, 4), np.int64))
        hw = replace(unit_profile(), evict_host_by_name={"activation": scan})
        return simulate(Schedule(trace), pol, hardware=hw, bound=False, copy_queue=queue)

    assert run("fifo", 0.25).time_ms == 8.25
    assert run("worker", 0.25).time_ms == 7.75
    assert run("fifo", 0.0).time_ms == run("worker", 0.0).time_ms == 7.5


def test_scan_policy_host_time_per_eviction_under_the_worker_queue():
    # a cancelled prefetch frees its slot: the next insert needs no pool scan, and pays none
    hw = replace(unit_profile(), evict_host_by_name={"activation": 0.25})
    trace = make_trace([[0], [0], [0]], num_experts=8)

    def run(queue):
        pol = new_policy("activation", 7, 1, 8, top_k=1, scope="layer")
        pol.fit(np.ones((1, 8), np.int64))
        return simulate(Schedule(trace), pol, FixedGuess(1, 8, 1, [1, 2, 3, 4, 5, 6]), hardware=hw, depth=1,
                        budget=6, bound=False, admission="none", copy_queue=queue)

    fifo, worker = run("fifo"), run("worker")
    # FIFO: every insert pays the scan (7 inserts, none evicting: 7 x 0.25 on the host); the worker queue: none
    # evicts (seven slots, cancelled prefetches give theirs back), so no scan is paid
    assert fifo.loads == worker.loads == 1
    assert worker.time_ms == 5.5  # as the LRU timeline above: the host never waits for a scan
    assert fifo.time_ms > worker.time_ms


def test_admission_reads_the_runtimes_backlog_estimate_under_the_worker_queue():
    # the runtime's admission rule reads its own FIFO estimate of the copies issued (cancellations not taken
    # back), not the worker's queue, and within one layer's call each prefetch it has already placed adds one
    # copy to the backlog the next candidate is weighed against (``backlog0 + len(slots) * copy_ms``), although
    # the step's prefetches reach the worker together after the loop. Nothing is cancelled here, so the estimate
    # is the FIFO timeline and the two copy models weigh alike. Weighed against the backlog before the call
    # alone, the worker model admitted all six wrong guesses of the first token.
    one_w, one_f = _run_adm("worker", tokens=1), _run_adm("fifo", tokens=1)
    assert (one_w.prefetches, one_w.extra["prefetch_refused"]) == (one_f.prefetches, one_f.extra["prefetch_refused"])
    assert one_w.prefetches == 2 and one_w.extra["prefetch_refused"] == 4
    worker, fifo = _run_adm("worker"), _run_adm("fifo")
    assert worker.extra["copies_cancelled"] == 0
    assert (worker.prefetches, worker.extra["prefetch_refused"], worker.time_ms) == \
        (fifo.prefetches, fifo.extra["prefetch_refused"], fifo.time_ms) == (5, 8, 5.5)
    if _has_cpp():
        cpp = _run_adm("worker", engine="cpp")
        assert (cpp.prefetches, cpp.extra["prefetch_refused"]) == (5, 8)


def _run_adm(queue, tokens=3, engine="python"):
    trace = make_trace([[0]] * tokens, num_experts=8)
    pol = new_policy("lru", 7, 1, 8, top_k=1, scope="layer")
    pred = FixedGuess(1, 8, 1, [1, 2, 3, 4, 5, 6])
    return simulate(Schedule(trace), pol, pred, hardware=unit_profile(), depth=1, budget=6, bound=False,
                    admission="cost", copy_queue=queue, engine=engine)
