"""Stack distances of LRU and of Belady's OPT: one pass gives the hit rate at every capacity.

The cache model is the simulator's (``policies/base.py``): a request is one (token, layer) *row*,
the set of experts that layer needs for that token; every expert of the row must be resident at
once, so a row's experts are protected from eviction while the row is served, and a capacity
below the row size (``top_k``) is not allowed. A row's hits are decided when the row starts.

LRU and OPT are stack algorithms in this model too (Mattson et al., 1970): the cache of capacity
``c >= top_k`` always holds the top ``c`` entries of one priority stack, so an access hits at
capacity ``c`` exactly when the expert's depth in the stack at the start of its row (its *stack
distance*, 0-based) is below ``c``. One pass gives the whole curve::

    hits(c) = #{accesses with 0 <= distance < c}    (distance -1 = first access: a miss at every c)

Two scopes: ``layer`` (one cache of ``c`` experts per MoE layer; a stream per layer) and
``global`` (one cache of ``c`` experts shared by all layers; items ``layer * experts + expert``,
rows in the order token, then layer).

LRU: the stack is ordered by last use, a row's experts touched in ascending id order (as the
simulator does; it matters when a capacity boundary splits an older row). The distance of ``x`` in
a row is the number of experts whose last use is later than ``x``'s, counted at the row's start.
Vectorised: per layer, a token-by-expert table of last-use times and one comparison per access;
for the global scope a loop over tokens with a sorted array of last-use times, adding the experts
of the token's earlier layers that were below ``x``.

OPT: priority = time (row) of the expert's next use, sooner = higher; ties (same next row, or never
used again) make the lower id count as *later*, i.e. it is evicted first, as ``policies/belady.py``
does. A row is applied as one Mattson pushdown per expert of the row: the expert goes to the top;
the item carried down from position ``j - 1`` meets the one at ``j``; the one used sooner stays,
the other is carried on; the last carry fills the expert's old position. The carry is the running
argmax of the priority key, which makes one pushdown a handful of vectorised operations. While
the row is served its experts keep the key "needed now" (sooner than anything else), which keeps
them out of every carry -- the protection rule -- and they receive their real next-use keys when
the row ends (they then sit in the top positions). Experts never seen sit below every seen one.
``tests/test_analysis.py`` checks both curves against direct simulations at every capacity.
Independent stacks (one per layer) advance in lockstep; the cost is ``O(rows * top_k)`` steps of
a few numpy calls each, which is why the global-scope OPT pass accepts a budget (see
``opt_global_distances``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .access import Accesses

COLD = -1  #: distance of a first access (a miss at every capacity)

_SH = np.int64(1) << 20  # key = row_time * _SH + (_SH - 1 - item): ties on the row go to the lower id
_NEVER_T = np.int64(1) << 41  # row time of "never used again" (after every real row)
_UNSEEN_T = np.int64(1) << 42  # row time of "not seen yet" (after "never again")


def next_use(items: np.ndarray) -> np.ndarray:
    """Index of the next access to the same item in ``items``, or -1 where there is none."""
    n = items.shape[0]
    order = np.lexsort((np.arange(n), items))
    nxt = np.full(n, -1, np.int64)
    if n > 1:
        same = items[order[1:]] == items[order[:-1]]
        nxt[order[:-1][same]] = order[1:][same]
    return nxt


def prev_use(items: np.ndarray) -> np.ndarray:
    """Index of the previous access to the same item in ``items``, or -1 where there is none."""
    n = items.shape[0]
    order = np.lexsort((np.arange(n), items))
    prv = np.full(n, -1, np.int64)
    if n > 1:
        same = items[order[1:]] == items[order[:-1]]
        prv[order[1:][same]] = order[:-1][same]
    return prv


def _key(row_time: np.ndarray | int, item: np.ndarray | int) -> np.ndarray:
    return np.int64(row_time) * _SH + (_SH - 1 - np.asarray(item, np.int64))


# -- LRU -----------------------------------------------------------------------------------------

def lru_layer_distances(acc: Accesses, chunk: int = 1 << 16) -> np.ndarray:
    """LRU stack distance of every access with one cache per layer, aligned with ``acc`` (int64)."""
    rows = acc.rows  # (T, L, k), ascending ids first, -1 where no access
    T, L, k = rows.shape
    E = acc.num_experts
    out_rows = np.full((T, L, k), COLD, np.int64)
    for l in range(L):
        r = rows[:, l, :]
        valid = r >= 0
        # P[t, e]: time (t * k + slot) of e's last use strictly before token t, -1 if none
        A = np.full((T + 1, E), -1, np.int64)
        ti, si = np.nonzero(valid)
        A[ti + 1, r[ti, si]] = ti * k + si
        P = np.maximum.accumulate(A, axis=0)[:-1]
        del A
        Pr = np.take_along_axis(P, np.maximum(r, 0), axis=1)  # (T, k): P of each slot's expert
        d = np.full((T, k), COLD, np.int64)
        warm_t, warm_s = np.nonzero(valid & (Pr >= 0))
        for a in range(0, len(warm_t), chunk):  # chunked: the comparison is (chunk, experts)
            t_, s_ = warm_t[a:a + chunk], warm_s[a:a + chunk]
            d[t_, s_] = (P[t_] > Pr[t_, s_][:, None]).sum(axis=1)
        out_rows[:, l, :] = d
    return out_rows[rows >= 0]


def lru_global_distances(acc: Accesses, tick: Callable[[int], None] | None = None) -> np.ndarray:
    """LRU stack distance of every access with one cache shared by all layers (aligned with ``acc``)."""
    items = acc.item
    n = items.shape[0]
    M = acc.num_layers * acc.num_experts
    out = np.full(n, COLD, np.int64)
    if n == 0:
        return out
    last = np.full(M, -1, np.int64)
    bounds = np.flatnonzero(np.diff(acc.token)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    layer = acc.layer
    srt = np.sort(last)
    step = max(1, len(starts) // 200)
    for i, (a, b) in enumerate(zip(starts, ends)):
        x = items[a:b]
        px = last[x]
        above = M - np.searchsorted(srt, px, side="right")
        # experts of this token's earlier layers (earlier rows) that were below x now sit above it
        lay = layer[a:b]
        lower = ((px[None, :] <= px[:, None]) & (lay[None, :] < lay[:, None])).sum(axis=1)
        out[a:b] = np.where(px >= 0, above + lower, COLD)
        last[x] = np.arange(a, b)
        srt = np.sort(last)  # M is small (10^2..10^4): re-sorting beats bookkeeping
        if tick is not None and (i % step == 0 or i == len(starts) - 1):
            tick(int(b))
    return out


# -- OPT -----------------------------------------------------------------------------------------

def opt_lockstep(rows: np.ndarray, row_time: np.ndarray, universe: int,
                 tick: Callable[[int], None] | None = None) -> np.ndarray:
    """OPT stack distances of ``S`` independent row streams advanced in lockstep.

    ``rows``: int ``(S, R, k)``, the items of row ``r`` of stream ``s`` (ids in ``0..universe-1``,
    -1 = no access; valid ones first). ``row_time``: int ``(S, R)``, the row's time (increasing
    along each stream; used to order next uses). Returns ``(S, R, k)`` distances, ``COLD`` for first
    accesses and for slots that are no access.

    The stack is held as the priority keys alone: a key encodes its item in its low bits, and the
    current key of every expert of a row is known in advance (its "needed now" key, or its "unseen"
    key on a first access), so the expert's depth is found by comparing keys.
    """
    S, R, k = rows.shape
    M = int(universe)
    dist = np.full((S, R, k), COLD, np.int64)
    if S == 0 or R == 0:
        return dist
    if M >= _SH:
        raise ValueError(f"at most {int(_SH) - 1} items per stack, got {M}")
    valid = rows >= 0
    if valid.any() and int(rows[valid].max()) >= M:
        raise ValueError(f"item ids must be below {M}")
    # real next-use key of every access: the row time of the same item's next access in its stream
    nxt_key = np.zeros((S, R, k), np.int64)
    first = np.zeros((S, R, k), bool)
    for s in range(S):
        rr, jj = np.nonzero(valid[s])
        it = rows[s, rr, jj].astype(np.int64)
        nx = next_use(it)
        t_next = np.where(nx >= 0, row_time[s, rr[np.maximum(nx, 0)]], _NEVER_T)
        nxt_key[s, rr, jj] = _key(t_next, it)
        first[s, rr, jj] = prev_use(it) < 0
    item0 = np.maximum(rows, 0)
    now_all = _key(row_time[:, :, None], item0)  # "needed now" key of each access
    cur_all = np.where(first, _key(_UNSEEN_T, item0), now_all)  # its key in the stack at the row's start
    inf = np.int64(np.iinfo(np.int64).max)
    cols = np.arange(M)
    sidx = np.arange(S)
    offs = (sidx * M)[:, None]
    skey = np.tile(_key(_UNSEEN_T, cols), (S, 1))
    future = np.concatenate([skey.copy(), np.zeros((S, 1), np.int64)], axis=1)  # column M: dummy
    prevrec = np.zeros((S, M), np.int64)
    low = _SH - 1
    step = max(1, R // 200)
    for r in range(R):
        ok = valid[:, r, :]
        cur = cur_all[:, r, :]
        # hits are decided at the row's start: depth of every expert of the row now
        depth = (skey[:, :, None] == cur[:, None, :]).argmax(axis=1)
        dist[:, r, :] = np.where(ok & ~first[:, r, :], depth, COLD)
        for j in range(k):
            okj = ok[:, j]
            if okj.all():
                cx, nk = cur[:, j], now_all[:, r, j]
            elif not okj.any():
                continue
            else:  # a stream without this slot re-touches its top item: a no-op
                cx = np.where(okj, cur[:, j], skey[:, 0])
                nk = np.where(okj, now_all[:, r, j], skey[:, 0])
            d = (skey == cx[:, None]).argmax(axis=1)
            # positions where the running max of the key rises ("records") hand their item down and
            # take the previous carry; the item's own position d, raised to +inf, is the last record,
            # so it receives the final carry and nothing below d moves
            skey[sidx, d] = inf
            rec = skey == np.maximum.accumulate(skey, axis=1)
            lastrec = np.maximum.accumulate(rec * cols, axis=1)
            prevrec[:, 1:] = lastrec[:, :-1]
            skey = skey.ravel()[np.where(rec, prevrec, cols) + offs]
            skey[:, 0] = nk
        # the row is served: its experts (now the top ones) get their real next-use keys
        future[sidx[:, None], np.where(ok, rows[:, r, :], M)] = nxt_key[:, r, :]
        top_items = low - (skey[:, :k] & low)
        skey[:, :k] = np.take_along_axis(future, top_items, axis=1)
        if tick is not None and (r % step == 0 or r == R - 1):
            tick(r + 1)
    return dist


def opt_layer_distances(acc: Accesses, tick: Callable[[int], None] | None = None) -> np.ndarray:
    """OPT stack distance of every access with one cache per layer (aligned with ``acc``)."""
    rows = acc.rows  # (T, L, k)
    T, L, k = rows.shape
    streams = np.ascontiguousarray(rows.transpose(1, 0, 2))  # (L, T, k)
    times = np.tile(np.arange(T, dtype=np.int64), (L, 1))
    dist = opt_lockstep(streams, times, acc.num_experts, tick)
    return dist.transpose(1, 0, 2)[rows >= 0]


def opt_global_distances(acc: Accesses, tokens: int | None = None,
                         tick: Callable[[int], None] | None = None) -> np.ndarray:
    """OPT stack distance with one shared cache, for the accesses of the first ``tokens`` tokens.

    Next uses are looked up inside that prefix only, so the result is exact OPT for the prefix taken
    as a trace of its own. ``tokens=None`` takes the whole trace.
    """
    rows = acc.rows
    T, L, k = rows.shape
    n = T if tokens is None else min(int(tokens), T)
    E = acc.num_experts
    sub = rows[:n]
    items = np.where(sub >= 0, sub + (np.arange(L) * E)[None, :, None], -1).reshape(1, n * L, k)
    times = np.arange(n * L, dtype=np.int64)[None, :]
    dist = opt_lockstep(items, times, L * E, tick)[0].reshape(n, L, k)
    return dist[sub >= 0]


# -- curves --------------------------------------------------------------------------------------

def hit_curve(dist: np.ndarray, max_capacity: int) -> np.ndarray:
    """Hits at capacities ``0..max_capacity`` (index = capacity): ``hits[c] = #{0 <= d < c}``."""
    d = dist[dist >= 0]
    h = np.bincount(np.minimum(d, max_capacity), minlength=max_capacity + 1)[:max_capacity]
    return np.concatenate([[0], np.cumsum(h)]).astype(np.int64)


def hit_curves_by_group(dist: np.ndarray, group: np.ndarray, groups: int, max_capacity: int) -> np.ndarray:
    """``hit_curve`` for each group (e.g. layer): int64 ``(groups, max_capacity + 1)``."""
    ok = dist >= 0
    g, d = group[ok].astype(np.int64), np.minimum(dist[ok], max_capacity)
    h = np.bincount(g * (max_capacity + 1) + d, minlength=groups * (max_capacity + 1))
    h = h.reshape(groups, max_capacity + 1)[:, :max_capacity]
    return np.concatenate([np.zeros((groups, 1), np.int64), np.cumsum(h, axis=1)], axis=1)
