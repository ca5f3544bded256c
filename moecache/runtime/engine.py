"""Copy engines: they execute the copies the runtime decided on (host row -> pool slot).

One interface, three implementations, chosen by name from ``COPY_ENGINES``:

* ``sync`` (pure Python, any device): copies at once, on the calling thread. The CPU-only
  reference: every copy is on the critical path, so its time counts as stall.
* ``stream`` (pure Python, CUDA): issues each copy at once on a dedicated copy stream and records a
  per-slot event; the compute stream waits on the events of the experts it needs now. No queue,
  so nothing can be reordered or cancelled. The fallback where the extension is missing.
* ``worker`` (C++ ``torch.classes.moecache.CopyWorker``, CPU or CUDA): a worker thread with a
  priority queue ordered by predicted need time, cancellation of copies not yet started, copy
  stream(s), and the same per-slot events. No Python on the copy path. With ``max_inflight``
  copies enqueued on the GPU it waits for the oldest by polling its event every 20 us
  (``$MOECACHE_COPY_WAIT=poll``, the default); ``sync`` blocks in ``cudaEventSynchronize`` instead
  (the two compared: ``eval/results/prefetch_ceiling/README.md``).

``auto`` picks ``worker`` where the extension is built (and not disabled by
``MOECACHE_DISABLE_EXT=1``), else ``stream`` on CUDA and ``sync`` on the CPU.

Protocol (slots are pool slot indices, keys host-store rows):

* ``submit(slot, key, priority)``: copy row ``key`` into ``slot``; ``priority`` is the predicted
  need time, lower first, ``0`` = needed now. A slot holds at most one pending copy (a new one
  replaces a queued one). ``submit_many`` queues several in one call.
* ``demand(copy_slots, copy_keys, wait_slots)``: one MoE layer's demand path in one call: copy
  those rows now, then ``wait(wait_slots)``.
* ``cancel(slot) -> bool``: drop a copy not yet started.
* ``ready(slots) -> list[bool]``: whether each slot's last copy has completed (no sync).
* ``wait(slots)``: the compute stream waits for those copies (device-side on the GPU).
* ``mark_used(slots)``: every read of those slots is enqueued; a later copy into one of them
  waits for the reads (write-after-read fence).
* ``stall_seconds()``: time the computation waited for copies so far (CUDA events on the GPU).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from .._ext import extension
from ..errors import ConfigError, MoecacheError
from ..registry import Registry
from .hoststore import HostStore
from .pool import SlotPool


class CopyError(MoecacheError, RuntimeError):
    """A copy failed inside a copy engine (e.g. in the C++ worker thread)."""


class CopyEngine:
    """Base class: counts copies and bytes; subclasses implement the protocol above."""

    name = "base"
    #: Whether ``cancel`` can ever succeed (a queue exists).
    can_cancel = False
    #: Whether a copy is complete when ``submit`` returns (no need to ask ``ready``).
    sync_copies = False

    def __init__(self, store: HostStore, pool: SlotPool):
        self.store = store
        self.pool = pool
        self.row_bytes = pool.layout.slot_bytes
        self.submitted = 0

    def submit(self, slot: int, key: int, priority: float) -> None:
        raise NotImplementedError

    def submit_many(self, slots: Sequence[int], keys: Sequence[int], priorities: Sequence[float]) -> None:
        for s, k, p in zip(slots, keys, priorities):
            self.submit(s, k, p)

    def demand(self, copy_slots: Sequence[int], copy_keys: Sequence[int], wait_slots: Sequence[int]) -> None:
        for s, k in zip(copy_slots, copy_keys):
            self.submit(s, k, 0.0)
        if wait_slots:
            self.wait(wait_slots)

    def cancel(self, slot: int) -> bool:
        return False

    def ready(self, slots: Sequence[int]) -> list[bool]:
        raise NotImplementedError

    def wait(self, slots: Sequence[int]) -> None:
        raise NotImplementedError

    def mark_used(self, slots: Sequence[int]) -> None:
        pass

    def stall_seconds(self) -> float:
        return 0.0

    def counters(self) -> dict[str, int]:
        return {"submitted": self.submitted}

    def close(self) -> None:
        pass


COPY_ENGINES: Registry[Callable[[HostStore, SlotPool], CopyEngine]] = Registry("copy engine")


@COPY_ENGINES.register("sync", "copies at once on the calling thread (pure Python; the CPU reference)")
class SyncEngine(CopyEngine):
    name = "sync"
    sync_copies = True

    def __init__(self, store: HostStore, pool: SlotPool):
        super().__init__(store, pool)
        self._stall = 0.0

    def submit(self, slot: int, key: int, priority: float) -> None:
        t0 = time.perf_counter()
        self.pool.data[slot].copy_(self.store.row(key))
        if self.pool.device.type == "cuda":  # pageable or not, the copy must be complete on return
            torch.cuda.current_stream(self.pool.device).synchronize()
        self._stall += time.perf_counter() - t0
        self.submitted += 1

    def ready(self, slots: Sequence[int]) -> list[bool]:
        return [True] * len(slots)

    def wait(self, slots: Sequence[int]) -> None:
        pass

    def stall_seconds(self) -> float:
        return self._stall


@COPY_ENGINES.register("stream", "issues copies at once on a CUDA copy stream with per-slot events (pure Python)")
class StreamEngine(CopyEngine):
    name = "stream"

    def __init__(self, store: HostStore, pool: SlotPool):
        super().__init__(store, pool)
        if pool.device.type != "cuda":
            raise ConfigError("the 'stream' copy engine needs a CUDA pool; use 'sync' on the CPU")
        self.copy_stream = torch.cuda.Stream(device=pool.device)
        self.done = [torch.cuda.Event() for _ in range(pool.num_slots)]
        self.fence: list[torch.cuda.Event | None] = [None] * pool.num_slots
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_ms = 0.0

    def submit(self, slot: int, key: int, priority: float) -> None:
        s = self.copy_stream
        fence = self.fence[slot]
        if fence is not None:
            s.wait_event(fence)
        with torch.cuda.stream(s):
            self.pool.data[slot].copy_(self.store.row(key), non_blocking=True)
            self.done[slot].record(s)
        self.submitted += 1

    def ready(self, slots: Sequence[int]) -> list[bool]:
        return [self.done[s].query() for s in slots]

    def wait(self, slots: Sequence[int]) -> None:
        compute = torch.cuda.current_stream(self.pool.device)
        stalls = not all(self.done[s].query() for s in slots)
        if stalls:  # timing events only around waits that can stall; read back lazily
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(compute)
        for s in slots:
            compute.wait_event(self.done[s])
        if stalls:
            b.record(compute)
            self._pending.append((a, b))

    def mark_used(self, slots: Sequence[int]) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.pool.device))
        for s in slots:
            self.fence[s] = ev

    def stall_seconds(self) -> float:
        while self._pending and self._pending[0][1].query():
            a, b = self._pending.pop(0)
            self._stall_ms += a.elapsed_time(b)
        return self._stall_ms / 1e3

    def close(self) -> None:
        self.copy_stream.synchronize()


#: How the worker thread waits for its oldest copy in flight (read by the C++ worker at construction).
ENV_COPY_WAIT = "MOECACHE_COPY_WAIT"
COPY_WAITS = ("poll", "sync")


@COPY_ENGINES.register("worker", "C++ worker thread: priority queue, cancellation, copy streams, CUDA events")
class WorkerEngine(CopyEngine):
    name = "worker"
    can_cancel = True

    def __init__(self, store: HostStore, pool: SlotPool, max_inflight: int = 2, num_streams: int = 2):
        super().__init__(store, pool)
        if extension() is None:
            raise ConfigError("the 'worker' copy engine needs the compiled extension moecache._C "
                              "(not built, or disabled by MOECACHE_DISABLE_EXT=1); use engine='auto'")
        wait = os.environ.get(ENV_COPY_WAIT, "") or "poll"  # the C++ worker reads the same variable
        if wait not in COPY_WAITS:
            raise ConfigError(f"{ENV_COPY_WAIT}={wait!r} is not a copy wait mode: set it to "
                              f"{' or '.join(COPY_WAITS)}, or unset it (poll)")
        # Keep the host store rows alive as long as the worker holds their addresses.
        self._ptrs = store.row_pointers()
        self._w = torch.classes.moecache.CopyWorker(self._ptrs, pool.data, int(max_inflight), int(num_streams))
        self._cuda = pool.device.type == "cuda"

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.pool.device).cuda_stream if self._cuda else 0

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:
            raise CopyError(str(e)) from None

    def submit(self, slot: int, key: int, priority: float) -> None:
        self._call(self._w.submit, int(slot), int(key), float(priority))
        self.submitted += 1

    def submit_many(self, slots: Sequence[int], keys: Sequence[int], priorities: Sequence[float]) -> None:
        self._call(self._w.submit_many, list(slots), list(keys), [float(p) for p in priorities])
        self.submitted += len(slots)

    def demand(self, copy_slots: Sequence[int], copy_keys: Sequence[int], wait_slots: Sequence[int]) -> None:
        self._call(self._w.demand, list(copy_slots), list(copy_keys), list(wait_slots), self._stream())
        self.submitted += len(copy_slots)

    def cancel(self, slot: int) -> bool:
        return bool(self._call(self._w.cancel, int(slot)))

    def ready(self, slots: Sequence[int]) -> list[bool]:
        return [bool(x) for x in self._call(self._w.ready, [int(s) for s in slots])]

    def wait(self, slots: Sequence[int]) -> None:
        self._call(self._w.wait, [int(s) for s in slots], self._stream())

    def mark_used(self, slots: Sequence[int]) -> None:
        if self._cuda:
            self._call(self._w.mark_used, [int(s) for s in slots], self._stream())

    def stall_seconds(self) -> float:
        return float(self._w.stall_ms()) / 1e3

    def counters(self) -> dict[str, int]:
        copies, cancelled, stolen, queued = self._w.counters()
        return {"submitted": self.submitted, "copies": copies, "cancelled": cancelled,
                "issued_by_waiter": stolen, "queued": queued}

    def inject_fault(self, nth: int = 1) -> None:
        """Test hook: the worker thread's ``nth`` next copy raises inside the worker."""
        self._w.inject_fault(int(nth))

    def close(self) -> None:
        self._w.close()


def make_engine(name: str, store: HostStore, pool: SlotPool) -> CopyEngine:
    """Build the copy engine ``name`` (``auto`` or a ``COPY_ENGINES`` name)."""
    if name == "auto":
        if extension() is not None:
            name = "worker"
        else:
            name = "stream" if pool.device.type == "cuda" else "sync"
    return COPY_ENGINES.get(name)(store, pool)
