"""Sender threads that share a big broadcast's non-blocking socket writes with the event loop.

``socket.send`` releases the GIL, and on a busy server most of a broadcast's
time is that system call (on loopback the kernel also does the receiver's
work in it). ``SenderPool.send`` has its persistent threads and the calling
thread take blocks of the list of clients from one shared counter until none
is left; for each client a thread asks ``direct`` for the socket's ``send``
(None: this one cannot be written to now) and calls it. After every thread is
done it returns the clients that did not take the whole frame. The caller
(the event loop) is blocked meanwhile, so no other code looks at those
clients or writes to their sockets while the pool does: whatever is left over
is handed to each client's writer after ``send`` has returned.

No trio here: the pool is plain threads and locks, tested without an event loop.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

# Sender threads besides the caller: one per further core, at most this many
# (the caller needs the GIL between sends, so more threads than cores only wait).
MAX_SENDER_THREADS = 3
# A thread takes this many sockets at a time from the shared counter: large
# enough that taking a block costs nothing beside the sends, small enough that
# a thread starting late (or sharing its core) leaves the rest to the others.
BLOCK = 64
# Broadcasts to fewer sockets than this use the caller's plain loop: waking a
# thread and handing the GIL back and forth costs about what it saves at ~500
# sockets (bench_senders.py: pool / plain 1.7 at 256, 1.0 at 512, 0.9 at 1000).
PARALLEL_MIN_SOCKETS = 1000
# While the threads share a broadcast, the GIL is handed over this often at
# the latest (CPython's default, 5 ms, is a tenth of a whole broadcast);
# None: leave it alone.
SWITCH_INTERVAL_S: float | None = None
# Stopping: how long ``close`` waits for each thread to finish its share.
JOIN_TIMEOUT_S = 5.0

T = TypeVar("T")
Send = Callable[[bytes], int]
# What happened to a client that did not take the whole frame: the bytes its
# socket took, the send's error (BlockingIOError: the kernel buffer is full,
# nothing was taken), or None: ``direct`` gave no send, nothing was tried.
Outcome = int | OSError | None
Misses = list[tuple[int, Outcome]]


def default_threads() -> int:
    """One sender thread per core beyond the first, at most ``MAX_SENDER_THREADS``."""
    return max(0, min(MAX_SENDER_THREADS, (os.cpu_count() or 1) - 1))


class SenderDied(Exception):
    """A sender thread raised: which of its sockets got the frame is unknown.

    The pool has stopped its threads; later sends are the caller's alone.
    """


def send_share(
    data: bytes,
    items: Sequence[T],
    direct: Callable[[T], Send | None],
    blocks: itertools.count[int],
) -> Misses:
    """``direct(items[i])(data)`` for each i of the blocks taken from ``blocks``;
    (i, outcome) for every item that did not take all of ``data``."""
    misses: Misses = []
    size = len(data)
    count = len(items)
    take = blocks.__next__  # atomic under the GIL: each block goes to one thread
    while True:
        start = take() * BLOCK
        if start >= count:
            return misses
        for i in range(start, min(start + BLOCK, count)):
            send = direct(items[i])
            if send is None:
                misses.append((i, None))
                continue
            try:
                n = send(data)
            except OSError as exc:
                misses.append((i, exc))
                continue
            if n != size:
                misses.append((i, n))


class _Job(Generic[T]):
    __slots__ = ("blocks", "data", "direct", "items", "misses")

    def __init__(
        self,
        data: bytes,
        items: Sequence[T],
        direct: Callable[[T], Send | None],
        blocks: itertools.count[int],
    ) -> None:
        self.data = data
        self.items = items
        self.direct = direct
        self.blocks = blocks
        self.misses: Misses | None = None


class SenderPool:
    """``threads`` persistent sender threads (0: the caller sends alone).

    ``send`` is called from one thread only (the event loop's), never twice at
    once; sockets must be non-blocking. After ``close`` the caller sends alone.
    """

    def __init__(
        self,
        threads: int,
        min_sockets: int = PARALLEL_MIN_SOCKETS,
        switch_interval: float | None = SWITCH_INTERVAL_S,
    ) -> None:
        self.min_sockets = min_sockets
        self.switch_interval = switch_interval
        self._go = [threading.Lock() for _ in range(threads)]
        self._done = [threading.Lock() for _ in range(threads)]
        self._jobs: list[_Job[Any] | None] = [None] * threads
        self._threads: list[threading.Thread] = []
        # For tests and metrics: broadcasts the threads shared, and the sockets
        # in them that did not take the whole frame.
        self.parallel_sends = 0
        self.parallel_misses = 0
        for lock in (*self._go, *self._done):
            lock.acquire()
        for i in range(threads):
            thread = threading.Thread(
                target=self._run, args=(i,), name=f"musicsync-sender-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def threads(self) -> int:
        return len(self._threads)

    def _run(self, i: int) -> None:
        go, done = self._go[i], self._done[i]
        while True:
            go.acquire()
            job = self._jobs[i]
            if job is None:
                done.release()
                return
            try:
                job.misses = send_share(job.data, job.items, job.direct, job.blocks)
            finally:
                done.release()  # even if the share raised: the caller must not hang

    def send(self, data: bytes, items: Sequence[T], direct: Callable[[T], Send | None]) -> Misses:
        """Write ``data`` to each item through ``direct(item)``; the misses
        (item index, outcome), in no order.

        Small lists (under ``min_sockets``) are written by the caller alone.
        """
        blocks = itertools.count()
        if len(items) < self.min_sockets or not self._threads:
            return send_share(data, items, direct, blocks)
        # Only as many helpers as there are blocks beyond the caller's first.
        helpers = min(len(self._threads), (len(items) - 1) // BLOCK)
        jobs: list[_Job[T]] = [_Job(data, items, direct, blocks) for _ in range(helpers)]
        interval = sys.getswitchinterval()
        if self.switch_interval is not None:
            sys.setswitchinterval(self.switch_interval)
        for i, job in enumerate(jobs):
            self._jobs[i] = job
            self._go[i].release()
        try:
            misses = send_share(data, items, direct, blocks)
        finally:
            for i in range(helpers):
                self._done[i].acquire()  # every helper is done with the sockets
                self._jobs[i] = None
            sys.setswitchinterval(interval)
        self.parallel_sends += 1
        for job in jobs:
            if job.misses is None:  # its thread raised (and ended): stop relying on any
                self.close()
                raise SenderDied("a sender thread failed during a broadcast")
            misses.extend(job.misses)
        self.parallel_misses += len(misses)
        return misses

    def close(self) -> None:
        """Stop the threads; from now on ``send`` is the caller's plain loop."""
        threads, self._threads = self._threads, []
        for i, thread in enumerate(threads):
            if thread.is_alive():
                self._jobs[i] = None
                self._go[i].release()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
