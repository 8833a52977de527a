"""The group-commit room writer: every room's newest snapshot, many rooms per SQLite transaction.

Changes to a room wait until their snapshot is durable, but never behind other
rooms' writes one by one: the writer takes every pending room at once, takes
each snapshot on the event loop (so it is consistent), then encodes and writes
them all in one transaction in its worker thread and wakes everyone whose
change that batch covered. Writes for one room coalesce: a room changed ten
times while a batch is being written is written once, in its newest state.

A delete (``forget``) takes the room's place in the queue, so a save queued
before it can never bring the room back; a save queued after it (a new room of
the same name) is written after the delete, in the same transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .store import RoomStore, SaveRow, StoreError

log = logging.getLogger(__name__)

# A snapshot source: called on the event loop when the batch is cut; returns
# (version, snapshot). The snapshot must not be mutated afterwards (the writer
# thread encodes it).
Capture = Callable[[], tuple[int, dict[str, Any]]]
# Called on the event loop once the batch that captured the room is settled
# (committed, or failed and logged): True if it is durable.
Settled = Callable[[bool], None]


@dataclass
class _Pending:
    delete_first: bool = False
    capture: Capture | None = None
    settled: Settled | None = None


@dataclass
class WriterStats:
    batches: int = 0
    rows: int = 0
    deletes: int = 0
    failures: int = 0
    largest_batch: int = 0


class RoomWriter:
    """One writer loop for every room; run ``run`` in a nursery."""

    def __init__(self, store: RoomStore, lane: trio.CapacityLimiter | None = None) -> None:
        self.store = store
        self._lane = lane or trio.CapacityLimiter(1)
        self._pending: dict[str, _Pending] = {}
        self._wake = trio.Event()
        self._done = trio.Event()  # set when the batch that takes ``_pending`` is settled
        self.stats = WriterStats()
        self.running = False
        self.stopped = False

    # -- the event loop side ---------------------------------------------------

    def submit(self, name: str, capture: Capture, settled: Settled | None = None) -> trio.Event:
        """Queue the room's newest snapshot; the event is set once it is settled.

        A submission replaces any queued one for the room (newest wins); the
        replaced one's ``settled`` is not called.
        """
        op = self._pending.get(name)
        if op is None:
            op = self._pending[name] = _Pending()
        op.capture, op.settled = capture, settled
        return self._kick()

    def forget(self, name: str) -> trio.Event:
        """Queue the room's deletion, ordered after every save queued before it."""
        self._pending[name] = _Pending(delete_first=True)
        return self._kick()

    async def save(self, name: str, capture: Capture, settled: Settled | None = None) -> None:
        """``submit`` and wait until the snapshot is settled."""
        await self.submit(name, capture, settled).wait()

    async def flush(self) -> None:
        """Wait until everything queued so far is settled."""
        if self._pending:
            await self._kick().wait()

    def _kick(self) -> trio.Event:
        if self.stopped:
            # Nobody will write it: say so and let the caller carry on.
            log.error("room writer stopped; %d room write(s) dropped", len(self._pending))
            self._pending.clear()
            done = trio.Event()
            done.set()
            return done
        self._wake.set()
        return self._done

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled; whoever waits is released at the end."""
        self.running = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._write_batch()
        finally:
            self.running = False
            self.stopped = True
            self._pending.clear()
            self._done.set()

    async def _write_batch(self) -> None:
        # No checkpoint from here to the thread call: the batch is cut, and every
        # snapshot taken, at one instant of the event loop.
        batch, self._pending = self._pending, {}
        done, self._done = self._done, trio.Event()
        deletes: list[str] = []
        rows: list[SaveRow] = []
        for name, op in batch.items():
            if op.delete_first:
                deletes.append(name)
            if op.capture is not None:
                version, snapshot = op.capture()
                rows.append((name, version, snapshot))
        ok = True
        try:
            try:
                await trio.to_thread.run_sync(
                    self.store.save_many, rows, deletes, limiter=self._lane
                )
            except (sqlite3.Error, StoreError, TypeError, ValueError) as exc:
                ok = False
                self.stats.failures += 1
                log.error("could not write %d room(s): %s", len(rows) + len(deletes), exc)
            self.stats.batches += 1
            self.stats.rows += len(rows)
            self.stats.deletes += len(deletes)
            self.stats.largest_batch = max(self.stats.largest_batch, len(rows) + len(deletes))
            for op in batch.values():
                if op.settled is not None:
                    op.settled(ok)
        finally:
            done.set()  # cancelled (the hub is closing) or not, nobody waits forever
