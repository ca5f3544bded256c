"""Requests served one at a time, in arrival order, by one worker thread; a bounded waiting line.

``Scheduler.submit`` puts a ``Job`` in line or raises ``QueueFull`` when ``max_waiting`` jobs
already wait (the one being generated does not count). The worker runs each job's
``TextGenerator.stream`` and hands its pieces to the job's asyncio queue on the server's event
loop. ``Job.cancel`` (a client that went away) frees the job's place at once: a waiting job leaves
the line's count and is skipped; a running one stops before its next token.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .textgen import Finished, SamplingParams, TextGenerator


class QueueFull(Exception):
    """The waiting line is full (the server answers 429)."""


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # str pieces, then Finished or Exception
    id: int = 0
    state: str = "waiting"           # waiting -> running -> done or failed; or cancelled
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None

    def cancel(self, scheduler: "Scheduler") -> None:
        scheduler._cancel(self)


class Scheduler:
    def __init__(self, generator: TextGenerator, max_waiting: int = 64):
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.generator = generator
        self.max_waiting = int(max_waiting)
        self._line: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.waiting = 0
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.busy_s = 0.0                # time spent generating
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="moecache-serve-worker", daemon=True)
        self._thread.start()

    # -- submitting ------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Job:
        with self._lock:
            if self.waiting >= self.max_waiting:
                raise QueueFull(f"{self.waiting} requests are waiting (the limit, --max-queue); retry later")
            job = Job(prompt_ids, params, loop, id=next(self._ids))
            self.waiting += 1
        self._line.put(job)
        return job

    def _cancel(self, job: Job) -> None:
        with self._lock:
            if job.state == "waiting":
                self.waiting -= 1
            if job.state in ("waiting", "running"):
                job.state = "cancelled"
                self.cancelled += 1

    def close(self) -> None:
        """Stop the worker: the running request ends before its next token, the waiting ones are dropped."""
        self._closing = True
        running = self.running
        if running is not None:
            self._cancel(running)
        self._line.put(None)
        self._thread.join(timeout=30)

    # -- the worker ------------------------------------------------------------------------------
    def _emit(self, job: Job, item: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _work(self) -> None:
        while True:
            job = self._line.get()
            if job is None:
                return
            if self._closing:
                self._cancel(job)
            with self._lock:
                if job.state != "waiting":
                    continue  # cancelled while it waited, or the server is stopping
                job.state = "running"
                self.waiting -= 1
                self.running = job
            job.started = time.monotonic()
            try:
                for item in self.generator.stream(job.prompt_ids, job.params, lambda: job.state == "cancelled"):
                    if isinstance(item, Finished):
                        with self._lock:
                            job.state = "done"
                            self.completed += 1
                            self.completion_tokens += item.completion_tokens
                            self.prompt_tokens += item.prompt_tokens
                    elif job.first_token is None:
                        job.first_token = time.monotonic()
                    self._emit(job, item)
            except Exception as e:  # the server stays up; the request gets the error
                with self._lock:
                    job.state = "failed"
                    self.failed += 1
                self._emit(job, e)
            finally:
                self.busy_s += time.monotonic() - job.started
                with self._lock:
                    self.running = None
