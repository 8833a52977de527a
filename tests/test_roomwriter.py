"""The group-commit room writer against a real SQLite file: coalescing, one transaction for many
rooms, deletes ordered with saves, failures settled; and the hub's single timer."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import trio

from musicsync.clock import ServerClock
from musicsync.hub import Hub
from musicsync.roomwriter import RoomWriter
from musicsync.store import DB_FILENAME, RoomStore

from .conftest import make_settings


def stored(path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT name, version, snapshot FROM rooms").fetchall()
    return {name: (version, json.loads(snap)) for name, version, snap in rows}


def snap(version: int, **extra: Any) -> Any:
    return lambda: (version, {"v": version, **extra})


async def test_writes_for_one_room_coalesce_and_the_newest_wins(tmp_path: Path) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    lane = trio.CapacityLimiter(1)
    writer = RoomWriter(store, lane)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with lane:  # the disk is busy: the first batch waits for it
            first = writer.submit("a", snap(1))
            await trio.testing.wait_all_tasks_blocked()  # batch 1 is cut, holding v1
            later = [writer.submit("a", snap(v)) for v in (2, 3, 4)]
            later.append(writer.submit("b", snap(7)))
            assert not first.is_set()
        await first.wait()
        for event in later:
            await event.wait()
        nursery.cancel_scope.cancel()
    store.close()
    # v2 and v3 were never written: two batches, three rows in all
    assert (writer.stats.batches, writer.stats.rows, writer.stats.largest_batch) == (2, 3, 2)
    assert stored(tmp_path / DB_FILENAME) == {"a": (4, {"v": 4}), "b": (7, {"v": 7})}


async def test_the_snapshot_is_taken_when_the_batch_is_cut(tmp_path: Path) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    writer = RoomWriter(store)
    room = {"version": 1}

    def capture() -> tuple[int, dict[str, Any]]:
        return room["version"], dict(room)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        done = writer.submit("a", capture)
        room["version"] = 2  # a later change before the writer ran: it is written too
        await done.wait()
        nursery.cancel_scope.cancel()
    store.close()
    assert stored(tmp_path / DB_FILENAME) == {"a": (2, {"version": 2})}


async def test_many_rooms_go_in_one_transaction(tmp_path: Path) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    writer = RoomWriter(store)
    settled: list[tuple[str, bool]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(300):
            name = f"r{i}"
            writer.submit(name, snap(i), lambda ok, name=name: settled.append((name, ok)))
        await writer.flush()
        nursery.cancel_scope.cancel()
    store.close()
    assert (writer.stats.batches, writer.stats.rows) == (1, 300)
    assert settled == [(f"r{i}", True) for i in range(300)]
    assert len(stored(tmp_path / DB_FILENAME)) == 300


async def test_a_forget_after_a_save_is_not_undone_and_a_new_room_after_it_is_kept(
    tmp_path: Path,
) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    store.save("old", 9, {"v": 9})
    store.save("gone", 5, {"v": 5})
    writer = RoomWriter(store)
    settled: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        # queued in this order in one instant: each name's last word wins
        writer.submit("gone", snap(6), settled.append)  # replaced by the forget:
        writer.forget("gone")  # never called back
        writer.forget("old")
        writer.submit("old", snap(0))  # a new room of that name, version 0 < 9
        await writer.flush()
        # a forget queued while a save of the room is on its way to disk
        in_flight = writer.submit("late", snap(1))
        await trio.testing.wait_all_tasks_blocked()
        forgotten = writer.forget("late")
        await in_flight.wait()
        await forgotten.wait()
        nursery.cancel_scope.cancel()
    store.close()
    assert settled == []
    assert stored(tmp_path / DB_FILENAME) == {"old": (0, {"v": 0})}
    assert writer.stats.deletes == 3


async def test_a_failed_batch_is_settled_and_logged_and_the_writer_carries_on(
    tmp_path: Path,
) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    writer = RoomWriter(store)
    outcomes: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.submit("bad", lambda: (1, {"not json": {1, 2}}), outcomes.append)
        await writer.flush()
        writer.submit("good", snap(1), outcomes.append)
        await writer.flush()
        nursery.cancel_scope.cancel()
    assert outcomes == [False, True]
    assert writer.stats.failures == 1
    assert list(store.load_all()) == [("good", {"v": 1})]  # nothing of the bad batch
    store.close()


async def test_waiters_are_released_when_the_writer_stops(tmp_path: Path) -> None:
    store = RoomStore(tmp_path / DB_FILENAME)
    lane = trio.CapacityLimiter(1)
    writer = RoomWriter(store, lane)
    async with lane:  # the disk never frees up
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            cut = writer.submit("a", snap(1))
            await trio.testing.wait_all_tasks_blocked()
            queued = writer.submit("b", snap(1))  # behind the batch that waits for the lane
            nursery.cancel_scope.cancel()  # the hub closes
        assert cut.is_set() and queued.is_set()
    assert writer.stopped
    assert writer.submit("c", snap(1)).is_set()  # dropped, loudly; nobody hangs
    assert stored(tmp_path / DB_FILENAME) == {}
    store.close()


async def test_one_timer_task_serves_every_room_and_forgets_idle_ones(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    settings = make_settings(tmp_path, room_idle_ttl=60.0)
    hub = Hub(settings, ServerClock(trio.current_time))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for i in range(500):
            assert hub.room_refusal(f"room{i}", f"10.0.{i // 50}.{i % 50}") is None
        assert len(hub.rooms) == 500
        assert hub._nursery is not None
        # the timer and the heartbeat sweep; no task per room
        assert len(hub._nursery.child_tasks) == 2
        await trio.sleep(59)
        assert len(hub.rooms) == 500
        await trio.sleep(2)
        assert hub.rooms == {}
        assert len(hub._timer_heap) == 0
        hub.close()
