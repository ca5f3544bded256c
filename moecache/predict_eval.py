"""Recall of expert predictors: replay a trace token by token and score every prediction.

Replay: the sequences to score are packed side by side as batch rows (longest first, ``rows`` at a
time, shorter ones padded with missing ids), the predictor is ``reset()`` for each pack, and for
each token and MoE layer ``l`` in order it is shown ``observe(l, ids[token, l])`` (plus that
layer's hidden state when given) and then asked ``predict(l, d)`` for every depth ``d``. The
target of depth ``d`` is layer ``(l + d) % L`` of token ``token + (l + d) // L`` of the same
sequence (see ``Predictor.target``); targets past a sequence's end or whose record is missing
(all ids negative) are skipped, and dropped slots (-2) do not count as selected experts.

Scores, per depth and prefetch-set size ``m`` (default ``top_k`` and ``2 * top_k``):

* the predicted set is the ``m`` experts with the highest probability, ties to the lowest id;
* ``recall@m = sum hits / sum selected`` over all scored targets, where ``hits`` counts the truly
  selected experts inside the set (a micro average: every selected expert weighs the same);
* ``precision@m = sum hits / (m * targets)``: the share of prefetched experts that get used.

Packing rows changes nothing for a predictor whose rows are independent (the contract tests check
that); it only amortises the Python overhead of the replay loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import ConfigError
from .registry import Registry
from .trace.schema import RoutingBlock
from .trace.store import Trace


@dataclass
class RecallRow:
    """The figures of one (predictor, trace, depth) replay and the configuration that produced them."""

    predictor: str
    params: dict[str, Any]
    trace: str
    depth: int
    top_k: int
    targets: int = 0
    selected: int = 0
    hits: dict[int, int] = field(default_factory=dict)
    #: time spent inside the predictor (observe, shared among the depths, plus predict)
    seconds: float = 0.0
    #: (request row, layer) steps replayed, padding rows excluded: seconds / layer_steps is the
    #: predictor's cost per row and layer, amortised over the packed rows
    layer_steps: int = 0
    #: seconds ``fit`` took (set by ``evaluate``; 0 when the caller fitted the predictor)
    fit_seconds: float = 0.0
    #: token offset of the target (0 = a later layer of the same token, 1 = the next token, ...)
    #: -> ``[selected, hits@top_k]``, to tell within-token from next-token prediction apart
    by_offset: dict[int, list[int]] = field(default_factory=dict)

    def recall_at_offset(self, offset: int) -> float:
        """``recall@top_k`` over the targets ``offset`` tokens ahead only; NaN when there were none."""
        sel, hit = self.by_offset.get(offset, (0, 0))
        return hit / sel if sel else math.nan

    def recall(self, m: int | None = None) -> float:
        """``hits@m / selected``; NaN when nothing was scored."""
        m = self.top_k if m is None else m
        return self.hits[m] / self.selected if self.selected else math.nan

    def precision(self, m: int | None = None) -> float:
        """``hits@m / (m * targets)``; NaN when nothing was scored."""
        m = self.top_k if m is None else m
        return self.hits[m] / (m * self.targets) if self.targets else math.nan

    def to_json(self) -> dict[str, Any]:
        out = {"predictor": self.predictor, "params": self.params, "trace": self.trace, "depth": self.depth,
               "top_k": self.top_k, "targets": self.targets, "selected": self.selected,
               "hits": {str(m): h for m, h in sorted(self.hits.items())}, "seconds": round(self.seconds, 3),
               "layer_steps": self.layer_steps, "fit_seconds": round(self.fit_seconds, 3),
               "by_offset": {str(o): {"selected": v[0], f"hits@{self.top_k}": v[1]} for o, v in sorted(self.by_offset.items())}}
        for m in sorted(self.hits):
            out[f"recall@{m}"] = self.recall(m)
            out[f"precision@{m}"] = self.precision(m)
        return out


# -- fit / score splits -------------------------------------------------------------------------

def _sequence_mask(trace: Any, fit_seqs: np.ndarray) -> np.ndarray:
    return np.isin(trace.seq, fit_seqs)


def _split_alternate(trace: Any, fraction: float) -> np.ndarray:
    # Bresenham-style spread: sequence i fits when floor((i+1)f + 1/2) steps up, so with f = 1/2
    # the sequences alternate fit, score, fit, ... starting with fit.
    seqs = np.asarray(trace.sequences())
    i = np.arange(len(seqs))
    return _sequence_mask(trace, seqs[np.floor((i + 1) * fraction + 0.5) > np.floor(i * fraction + 0.5)])


def _split_head(trace: Any, fraction: float) -> np.ndarray:
    seqs = np.asarray(trace.sequences())
    return _sequence_mask(trace, seqs[: int(round(len(seqs) * fraction))])


def _split_stream(trace: Any, fraction: float) -> np.ndarray:
    # For logs that do not separate requests: the first part of the tokens (recorded order) fits.
    return np.arange(len(trace)) < int(round(len(trace) * fraction))


#: How a trace is divided into a fitting part and a scored part: ``f(trace, fraction) -> fit mask``
#: over the trace's rows (True = fitting).
SPLITS: Registry[Callable[[Any, float], np.ndarray]] = Registry("split")
SPLITS.register("alternate", "every other sequence fits (fit, score, fit, ...); spread evenly for other fractions")(
    _split_alternate)
SPLITS.register("head", "the first fraction of the sequences fits, the rest is scored")(_split_head)
SPLITS.register("stream", "the first fraction of the tokens fits, the rest is scored (one-stream logs)")(_split_stream)


def split_mask(trace: Any, mode: str = "alternate", fraction: float = 0.5) -> np.ndarray:
    """Boolean mask over ``trace``'s rows, True for the fitting part. Raises ``ConfigError`` if a side is empty.

    ``mode`` names a rule in ``SPLITS``; ``fraction`` is the share (of sequences, or of tokens for
    ``stream``) that fits.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fit fraction must be strictly between 0 and 1, got {fraction}")
    mask = np.asarray(SPLITS.get(mode)(trace, fraction), bool)
    if mask.all() or not mask.any():
        raise ConfigError(f"split {mode!r} at {fraction} leaves one side empty ({len(trace.sequences())} "
                          "sequence(s)): use a trace with more sequences, or mode='stream' to cut one stream "
                          "of tokens in two")
    return mask


def split(trace: Any, mode: str = "alternate", fraction: float = 0.5) -> tuple[Any, Any]:
    """``(fit_trace, score_trace)``: disjoint in tokens and in sequence ids, together all of ``trace``.

    A sequence cut in two (``stream``) continues on the scored side under a new id (its id plus
    ``max(seq) + 1``), so no per-request state can cross the cut.
    """

    mask = split_mask(trace, mode, fraction)
    fit, rest = trace.select(mask), trace.select(~mask)
    seq = np.asarray(rest.seq).copy()
    shared = np.isin(seq, np.asarray(fit.seq))
    if shared.any():
        seq[shared] += int(max(np.max(trace.seq), 0)) + 1
        b = rest.block
        rest = Trace(rest.meta, RoutingBlock(seq, b.pos, b.token, b.step, b.phase, b.ids, b.weights),
                     drops=rest.drops, path=rest.path, finalised=rest.finalised)
    return fit, rest


# -- recall -------------------------------------------------------------------------------------

def _packs(trace: Any, rows: int) -> list[list[np.ndarray]]:
    """Token indices per sequence, longest first (stable), grouped ``rows`` at a time."""
    order = np.argsort(trace.seq, kind="stable")  # groups each sequence, keeps recorded token order
    seq_sorted = np.asarray(trace.seq)[order]
    cuts = np.nonzero(np.diff(seq_sorted))[0] + 1
    per_seq = np.split(order, cuts) if len(order) else []
    per_seq.sort(key=len, reverse=True)  # list.sort is stable: equal lengths keep sequence-id order
    return [per_seq[i:i + rows] for i in range(0, len(per_seq), rows)]


def measure_recall(predictor: Any, trace: Any, depths: Sequence[int] = (1, 2), *, hidden: np.ndarray | None = None,
           set_sizes: Sequence[int] | None = None, rows: int = 64, label: str | None = None,
           progress: bool = False) -> list[RecallRow]:
    """Run ``predictor`` over ``trace`` and return one ``RecallRow`` per depth (in ``depths`` order).

    ``hidden`` (optional) is ``(tokens, layers, hidden_size)`` aligned with the trace's rows: the
    input of each MoE block, passed to ``observe`` for predictors that read it. ``set_sizes``
    defaults to ``(top_k, 2 * top_k)`` capped at the expert count.
    """
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    if (predictor.num_layers, predictor.num_experts, predictor.top_k) != (L, E, k):
        raise ConfigError(f"predictor {predictor.name!r} is built for {predictor.num_layers} layers x "
                          f"{predictor.num_experts} experts, top-{predictor.top_k}; the trace has {L} x {E}, top-{k}")
    depths = [int(d) for d in depths]
    if not depths or min(depths) < 1:
        raise ConfigError(f"depths must be >= 1, got {depths}")
    sizes = sorted({min(int(m), E) for m in (set_sizes or (k, 2 * k))})
    if min(sizes) < 1:
        raise ConfigError(f"set sizes must be >= 1, got {set_sizes}")
    if getattr(predictor, "needs_model", False) and hidden is None:
        raise ConfigError(f"predictor {predictor.name!r} reads hidden states: pass hidden=(tokens, layers, "
                          "hidden_size) recorded with the trace")
    if hidden is not None and (hidden.shape[0] != len(trace) or hidden.shape[1] != L):
        raise ConfigError(f"hidden has shape {hidden.shape}, expected ({len(trace)}, {L}, hidden_size)")
    name = label or str(trace.path or meta.model)
    out = [RecallRow(predictor.name, dict(predictor.params), name, d, k, hits={m: 0 for m in sizes}) for d in depths]
    ids_all = np.asarray(trace.ids)
    packs = _packs(trace, max(1, int(rows)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: the bar shows on a terminal only (quiet in logs and pipes)
        bar = tqdm(total=len(trace), unit="tok", desc=f"{predictor.name} on {name}", leave=False, disable=None)
    with _one_blas_thread():
        for pack in packs:
            R, T = len(pack), len(pack[0])
            ids = np.full((T, R, L, k), -1, ids_all.dtype)
            hid = None if hidden is None else np.zeros((T, R, L, hidden.shape[2]), hidden.dtype)
            for r, idx in enumerate(pack):
                ids[:len(idx), r] = ids_all[idx]
                if hid is not None:
                    hid[:len(idx), r] = hidden[idx]
            lengths = np.array([len(idx) for idx in pack])
            predictor.reset()
            for t in range(T):
                active = int((lengths > t).sum())  # rows whose request is still running (the rest are padding)
                for l in range(L):
                    t0 = time.perf_counter()
                    predictor.observe(l, ids[t, :, l], None if hid is None else hid[t, :, l])
                    spent = time.perf_counter() - t0
                    for row in out:
                        t1 = time.perf_counter()
                        p = predictor.predict(l, row.depth)
                        spent_d = time.perf_counter() - t1
                        row.seconds += spent_d + spent / len(out)
                        row.layer_steps += active
                        tl = l + row.depth
                        tt, tl = t + tl // L, tl % L
                        if tt >= T:
                            continue
                        truth = ids[tt, :, tl]
                        valid = (truth >= 0).any(axis=1)
                        if not valid.any():
                            continue
                        _score(row, p[valid], truth[valid], E, sizes, tt - t)
                if bar is not None:
                    bar.update(active)
    if bar is not None:
        bar.close()
    return out


def _one_blas_thread() -> Any:
    """Limit BLAS to one thread while replaying.

    The loop does many tiny products (rows x features x experts); extra BLAS threads only add
    synchronisation, which costs more than such a product on a loaded machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its default
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _score(row: RecallRow, p: np.ndarray, truth: np.ndarray, E: int, sizes: list[int], offset: int) -> None:
    n, k = truth.shape
    valid = truth >= 0
    t = np.where(valid, truth, 0)
    pt = np.take_along_axis(p, t, axis=1)[:, :, None]  # (n, k, 1) probability of each selected expert
    # rank of a selected expert = #experts ranked before it: higher probability, or equal and lower id
    before = (p[:, None, :] > pt) | ((p[:, None, :] == pt) & (np.arange(E)[None, None, :] < t[:, :, None]))
    rank = before.sum(axis=2)
    # an id listed twice in one record is one expert: count it once
    dup = np.zeros_like(valid)
    for j in range(1, k):
        dup[:, j] = (valid[:, :j] & (t[:, :j] == t[:, j:j + 1])).any(axis=1)
    use = valid & ~dup
    row.targets += n
    row.selected += int(use.sum())
    for m in sizes:
        row.hits[m] += int((use & (rank < m)).sum())
    acc = row.by_offset.setdefault(offset, [0, 0])
    acc[0] += int(use.sum())
    acc[1] += int((use & (rank < row.top_k)).sum())


def evaluate(predictors: Iterable[Any], trace: Any, depths: Sequence[int] = (1, 2), *, mode: str = "alternate",
             fraction: float = 0.5, hidden: np.ndarray | None = None, label: str | None = None, rows: int = 64,
             progress: bool = False) -> list[RecallRow]:
    """Split ``trace`` (see ``split``), fit every predictor on the fitting part, replay it on the rest.

    Splitting here guarantees that nothing scored was seen when fitting. Predictors that need no
    fitting but can use it (the layer prior behind ``temporal``) are fitted too. ``hidden`` is
    aligned with ``trace``'s rows and is cut with the same mask.
    """
    mask = split_mask(trace, mode, fraction)
    fit_trace, score_trace = split(trace, mode, fraction)
    score_hidden = None
    if hidden is not None:
        if hidden.shape[0] != len(trace):
            raise ConfigError(f"hidden has {hidden.shape[0]} rows, the trace {len(trace)}")
        score_hidden = hidden[~mask]
    rows_out: list[RecallRow] = []
    for pred in predictors:
        t0 = time.perf_counter()
        pred.fit(fit_trace)
        fit_s = time.perf_counter() - t0
        got = measure_recall(pred, score_trace, depths, hidden=score_hidden, label=label, rows=rows, progress=progress)
        for r in got:
            r.fit_seconds = fit_s
        rows_out += got
    return rows_out
