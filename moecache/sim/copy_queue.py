"""The runtime's copy worker as the simulator's copy queue (``copy_queue="worker"``, the default).

The runtime's ``worker`` copy engine (``moecache.runtime.engine``, ``csrc/copy_worker.cpp``) does not copy in
issue order. Prefetches wait in a priority queue (priority = layers ahead + 1 - probability, lower first) and
the worker thread takes the best one whenever fewer than ``inflight`` copies are outstanding on the GPU;
until taken, a queued copy can still be dropped. Three things follow, which the FIFO model
(``copy_queue="fifo"``: every copy, demand or prefetch, on one engine in issue order; selectable, no longer the
default, since the runtime always copies through the worker) leaves out:

* **cancellation**: when the target layer's routing is known, its queued prefetches of experts the routing
  did not pick are cancelled (no copy, the slot goes back to the pool); so is a queued prefetch whose
  expert the policy evicts;
* **demand first**: a demand copy is issued at once on its own stream, behind only the copies already
  taken (at most ``inflight``), not behind the queued prefetches; a needed expert whose prefetch is still
  queued is issued then, as a demand copy;
* **order by priority**: a later layer's likelier prefetch is taken before an earlier layer's less likely one.

Without prefetches the two models give the same rows: every copy is a demand copy issued at once, the queue holds
nothing and the runtime's backlog estimate below is the FIFO timeline itself. The one exception is a scan
policy's host time (``evict_host_by_name``): the worker model charges it where an insert evicts, as the runtime
pays it, the FIFO model on every insert (tests/test_sim_copy_queue.py).

The runtime's hybrid rule does not see that queue: it keeps its own estimate of the copy backlog, every
copy issued (demand or prefetch) added at the end of a FIFO once, when it is issued (a queued prefetch that the
target layer then needs is not counted again), cancellations never taken back, a miss copied in a lower precision
(its own landing engine) not counted (``Runtime._copied``, ``HybridExecutor.copies_issued``). ``RuleView`` gives the miss rule that view. The prefetch admission rule
reads the same estimate (``issued_free``): the runtime's admission clock queues every copy issued too.

Both engines implement it (``csrc/sim/timeline.h`` WorkerQueue, ``csrc/sim/driver.cpp``). Times are the replay's (ms). ``advance(t)`` commits the copies the worker has taken by ``t``: call it before
anything that depends on the queue at ``t`` (a cancellation, a demand copy, a readiness check); copies are
submitted in nondecreasing issue time (the host clock).
"""

from __future__ import annotations

import heapq
from collections import deque

from ..cost.timing import Timeline

#: Copies the runtime's worker keeps outstanding on the GPU before it waits (``WorkerEngine``'s ``max_inflight``).
WORKER_INFLIGHT = 2

#: The simulator's copy-queue models (``simulate(copy_queue=...)``), the default first.
COPY_QUEUES = ("worker", "fifo")

#: The default copy model: the one the runtime runs (its copy engine is always the worker).
DEFAULT_COPY_QUEUE = "worker"


class WorkerQueue:
    """Queued prefetch copies over a ``Timeline`` whose ``copy`` is the end of the copies already taken."""

    __slots__ = ("tl", "copy_ms", "lag", "waiting", "heap", "live", "seq", "issued_free", "issued", "cancelled")

    def __init__(self, tl: Timeline, copy_ms: float, inflight: int = WORKER_INFLIGHT):
        self.tl = tl
        self.copy_ms = copy_ms
        #: the worker takes the next copy when the last one taken has this long left (``inflight - 1`` copies)
        self.lag = (inflight - 1) * copy_ms
        self.waiting: deque[tuple[float, float, int, int]] = deque()  # (issue time, priority, seq, key), issue order
        self.heap: list[tuple[float, int, int, float]] = []            # (priority, seq, key, issue time): eligible
        self.live: dict[int, int] = {}                                 # key -> seq of its queued copy
        self.seq = 0
        #: the hybrid rule's view: where a FIFO of every copy issued would end, and how many were issued
        self.issued_free = 0.0
        self.issued = 0
        self.cancelled = 0

    def note_issued(self, t: float) -> None:
        """A copy (demand or prefetch) was issued at ``t``: the hybrid rule's backlog grows by one copy."""
        start = t if t > self.issued_free else self.issued_free
        self.issued_free = start + self.copy_ms
        self.issued += 1

    def submit(self, t: float, key: int, priority: float) -> None:
        """Queue a prefetch copy of ``key`` issued at ``t``."""
        self.seq += 1
        self.waiting.append((t, priority, self.seq, key))
        self.live[key] = self.seq

    def queued(self, key: int) -> bool:
        return key in self.live

    def advance(self, t: float, ready_at: dict[int, float]) -> None:
        """Commit every queued copy the worker has taken by ``t``, best priority first among those issued
        by the time it takes one; each copy's end goes to ``ready_at``."""
        tl, waiting, heap, live = self.tl, self.waiting, self.heap, self.live
        while heap or waiting:
            take = tl.copy - self.lag
            if not heap and waiting[0][0] > take:
                take = waiting[0][0]
            if take > t:
                return
            while waiting and waiting[0][0] <= take:
                it, prio, seq, key = waiting.popleft()
                heapq.heappush(heap, (prio, seq, key, it))
            prio, seq, key, it = heapq.heappop(heap)
            if live.get(key) != seq:
                continue  # cancelled
            del live[key]
            ready_at[key] = tl.issue_copy(take, self.copy_ms)

    def cancel(self, key: int) -> bool:
        """Drop ``key``'s queued copy; False where it was taken already (or none was queued)."""
        if self.live.pop(key, None) is None:
            return False
        self.cancelled += 1
        return True

    def promote(self, key: int, t: float) -> float:
        """``key`` is needed now and its copy is still queued: issued at ``t`` as a demand copy. Its end."""
        del self.live[key]
        return self.tl.issue_copy(t, self.copy_ms)


class RuleView:
    """What the miss rule reads instead of the ``Timeline`` under the worker queue: the CPU queue and the
    reuse counts as they are, the copy backlog and the copies as the runtime's hybrid rule counts them."""

    __slots__ = ("tl", "wq")

    def __init__(self, tl: Timeline, wq: WorkerQueue):
        self.tl = tl
        self.wq = wq

    @property
    def copy(self) -> float:
        return self.wq.issued_free

    @property
    def cpu(self) -> float:
        return self.tl.cpu

    @property
    def hits(self) -> int:
        return self.tl.hits

    @property
    def copies(self) -> int:
        return self.wq.issued
