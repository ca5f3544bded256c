"""A trace laid out for replay, and the future it offers to offline policies and the oracle.

Replay order: sequences one after another in order of first appearance, each sequence's tokens in
recorded order. The replay walks *units*: in ``decode`` mode every token is a unit; in ``step`` mode
(batched prefill) consecutive tokens of one sequence with the same known ``step`` form one unit,
and a token whose step is unknown (-1) is a unit of its own. A *step* of the replay is one (unit,
MoE layer), numbered ``g = unit * layers + layer``; its *group* is the set of experts its tokens
need at that layer, each with the number of tokens that picked it. Missing (-1) and dropped (-2)
ids are not needs.

``Future`` is the one object through which anything reads ahead: the simulator positions it at the
step being served (``seek``); ``next_use(key)`` is the next step after it that needs ``key``
(``Future.NEVER`` if none), by binary search over the key's precomputed step list; ``target(depth)``
is the ids of the step ``depth`` MoE layers ahead (the oracle predictor reads it).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

import numpy as np

from ..errors import ConfigError

MODES = ("step", "decode")


def replay_order(seq: np.ndarray) -> np.ndarray:
    """Row indices sequence by sequence (first appearance order), recorded order within each."""
    seq = np.asarray(seq)
    if len(seq) == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return np.argsort(rank[inverse.ravel()], kind="stable")


class Schedule:
    """Units of a trace in replay order, with their groups per MoE layer."""

    def __init__(self, trace: Any, *, decode_stream: bool = False, name: str | None = None):
        meta = trace.meta
        self.meta = meta
        self.name = name or (trace.path or meta.model)
        self.num_layers = meta.num_layers
        self.num_experts = meta.num_experts
        self.top_k = meta.top_k
        self.mode = "decode" if decode_stream else "step"
        order = replay_order(trace.seq)
        self.ids = np.ascontiguousarray(np.asarray(trace.ids)[order]).astype(np.int64)
        seq = np.asarray(trace.seq)[order]
        step = np.asarray(trace.step)[order]
        n = len(order)
        if n == 0:
            raise ConfigError("cannot replay an empty trace (no tokens selected)")
        if decode_stream:
            starts = np.arange(n)
        else:
            same = (seq[1:] == seq[:-1]) & (step[1:] == step[:-1]) & (step[1:] >= 0)
            starts = np.concatenate([[0], np.nonzero(~same)[0] + 1])
        self.unit_start = np.concatenate([starts, [n]]).astype(np.int64)
        self.unit_seq = seq[starts]
        self.new_request = np.ones(len(starts), bool)
        self.new_request[1:] = self.unit_seq[1:] != self.unit_seq[:-1]
        self.num_units = len(starts)
        self.tokens = n
        self.accesses = int((self.ids >= 0).sum())
        self._multi: dict[int, list[tuple[list[int], list[int]]]] = {}
        self._future: Future | None = None
        self._bounds: dict = {}
        #: Gate weights in replay order, ``(tokens, layers, top_k)``, read on first use (None: the trace has none).
        self.has_weights = bool(meta.has_weights)
        self._weights: np.ndarray | None = None
        self._weights_src: Any = (trace, order) if self.has_weights else None

    @property
    def num_steps(self) -> int:
        return self.num_units * self.num_layers

    def rows(self, u: int) -> int:
        return int(self.unit_start[u + 1] - self.unit_start[u])

    def unit_ids(self, u: int) -> np.ndarray:
        """``(rows, layers, top_k)`` ids of unit ``u``."""
        return self.ids[self.unit_start[u]:self.unit_start[u + 1]]

    def groups(self, u: int) -> list[tuple[list[int], list[int]]]:
        """Per MoE layer: (keys ascending, tokens per key) of unit ``u``. Key = layer * experts + expert."""
        a, b = int(self.unit_start[u]), int(self.unit_start[u + 1])
        E = self.num_experts
        if b - a == 1:
            out = []
            for l, row in enumerate(self.ids[a].tolist()):
                base = l * E
                ks = sorted(set(row))
                if ks and ks[0] < 0:
                    ks = [k for k in ks if k >= 0]
                if len(ks) == len(row):
                    out.append(([base + k for k in ks], [1] * len(ks)))
                else:  # missing ids, or an id listed twice (counted once per listing)
                    c = Counter(k for k in row if k >= 0)
                    out.append(([base + k for k in ks], [c[k] for k in ks]))
            return out
        cached = self._multi.get(u)
        if cached is None:
            cached = []
            block = self.ids[a:b]
            for l in range(self.num_layers):
                x = block[:, l, :].ravel()
                keys, counts = np.unique(x[x >= 0], return_counts=True)
                cached.append(((keys + l * E).tolist(), counts.tolist()))
            self._multi[u] = cached
        return cached

    def unit_weights(self, u: int) -> np.ndarray:
        """``(rows, layers, top_k)`` gate weights of unit ``u`` (the trace must have them: ``has_weights``)."""
        if self._weights is None:
            if self._weights_src is None:
                raise ConfigError("this trace records no gate weights; the per-miss precision rule needs them "
                                  "(record the trace with weights, or leave --low-precision-misses out)")
            trace, order = self._weights_src
            self._weights = np.ascontiguousarray(np.asarray(trace.weights)[order], dtype=np.float32)
            self._weights_src = None
        return self._weights[self.unit_start[u]:self.unit_start[u + 1]]

    @property
    def future(self) -> "Future":
        if self._future is None:
            self._future = Future(self)
        return self._future


class Future:
    """Read-ahead over a schedule, positioned by the simulator at the step being served."""

    NEVER = 1 << 62

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.now = 0
        L, E = schedule.num_layers, schedule.num_experts
        ids = schedule.ids
        unit_of_row = np.repeat(np.arange(schedule.num_units), np.diff(schedule.unit_start))
        r, l, _k = np.nonzero(ids >= 0)
        steps = unit_of_row[r] * L + l
        keys = l * E + ids[r, l, _k]
        pairs = np.unique(keys.astype(np.int64) * (schedule.num_steps + 1) + steps)
        pk, ps = np.divmod(pairs, schedule.num_steps + 1)
        bounds = np.searchsorted(pk, np.arange(L * E + 1))
        ps_list = ps.tolist()
        self._uses: list[list[int]] = [ps_list[bounds[k]:bounds[k + 1]] for k in range(L * E)]

    def seek(self, step: int) -> None:
        self.now = step

    def next_use(self, key: int) -> int:
        """The first step after ``now`` that needs ``key`` (``NEVER`` if none)."""
        uses = self._uses[key]
        i = bisect.bisect_right(uses, self.now)
        return uses[i] if i < len(uses) else self.NEVER

    def next_uses(self, key: int, count: int) -> tuple[int, ...]:
        """The first ``count`` steps after ``now`` that need ``key``, padded with ``NEVER``."""
        uses = self._uses[key]
        i = bisect.bisect_right(uses, self.now)
        got = tuple(uses[i:i + count])
        return got + (self.NEVER,) * (count - len(got))

    def uses(self, key: int) -> list[int]:
        return self._uses[key]

    def target(self, depth: int) -> np.ndarray | None:
        """Ids ``(rows, top_k)`` of the step ``depth`` MoE layers ahead, or None past the end."""
        g = self.now + depth
        s = self.schedule
        if g >= s.num_steps:
            return None
        u, l = divmod(g, s.num_layers)
        return s.unit_ids(u)[:, l, :]
