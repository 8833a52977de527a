"""The room's queue: operations, permissions, repeat/shuffle and scheduled advance (sans-IO)."""

from __future__ import annotations

import random

from musicsync.protocol import QueueAdd, QueueMode, QueueMove, QueueNext, QueueRemove
from musicsync.room import (
    ADVANCE_NOTICE_MS,
    BroadcastState,
    Error,
    Room,
    RoomSettingsUpdate,
)

T0 = 1_800_000_000_000.0


def room_with(*names: str) -> Room:
    room = Room("main", rng=random.Random(7))
    for name in names:
        room.join(name, name.upper(), T0)
    return room


def states(effects: list[object]) -> list[dict[str, object]]:
    return [e.state for e in effects if isinstance(e, BroadcastState)]


def errors(effects: list[object]) -> list[str]:
    return [e.code for e in effects if isinstance(e, Error)]


def add(room: Room, who: str, n: int, duration: float | None = 10.0, **kw: object) -> None:
    effects = room.handle(who, QueueAdd(url=f"/media/t{n}.mp3", duration=duration, **kw), T0)
    assert not errors(effects), effects


def test_first_queued_track_becomes_current_paused() -> None:
    room = room_with("h")
    add(room, "h", 1)
    assert room.track is not None and room.track.url == "/media/t1.mp3"
    assert room.timeline.paused
    assert room.queue == []
    add(room, "h", 2)
    assert [item.track.url for item in room.queue] == ["/media/t2.mp3"]
    state = room.state()
    assert state["queue"] == [
        {"id": "q2", "url": "/media/t2.mp3", "title": "t2", "duration": 10.0, "added_by": "H"}
    ]


def test_listeners_may_not_change_the_queue_unless_allowed() -> None:
    room = room_with("h", "l")
    add(room, "h", 1)
    add(room, "h", 2)
    version = room.version
    for msg in (
        QueueAdd(url="/media/x.mp3"),
        QueueRemove(item="q2"),
        QueueMove(item="q2", index=0),
        QueueNext(),
        QueueMode(repeat="all"),
    ):
        assert errors(room.handle("l", msg, T0)) == ["not_host"]
    assert room.version == version
    room.handle("h", RoomSettingsUpdate(listeners_may_upload=True), T0)
    assert errors(room.handle("l", QueueAdd(url="/media/x.mp3"), T0)) == []
    assert errors(room.handle("l", QueueRemove(item="q2"), T0)) == ["not_host"]


def test_remove_move_and_errors() -> None:
    room = room_with("h")
    for n in range(1, 5):
        add(room, "h", n)
    assert [i.id for i in room.queue] == ["q2", "q3", "q4"]
    room.handle("h", QueueMove(item="q4", index=0), T0)
    assert [i.id for i in room.queue] == ["q4", "q2", "q3"]
    room.handle("h", QueueMove(item="q4", index=99), T0)
    assert [i.id for i in room.queue] == ["q2", "q3", "q4"]
    room.handle("h", QueueRemove(item="q3"), T0)
    assert [i.id for i in room.queue] == ["q2", "q4"]
    assert errors(room.handle("h", QueueRemove(item="q3"), T0)) == ["no_such_item"]
    assert errors(room.handle("h", QueueMove(item="nope", index=0), T0)) == ["no_such_item"]
    add(room, "h", 9, next=True)
    assert room.queue[0].track.url == "/media/t9.mp3"


def test_bad_urls_are_refused_in_the_queue() -> None:
    room = room_with("h")
    assert errors(room.handle("h", QueueAdd(url="javascript:alert(1)"), T0)) == ["bad_url"]
    assert errors(room.handle("h", QueueAdd(), T0)) == ["bad_message"]
    assert errors(room.handle("h", QueueAdd(track_id="abc"), T0)) == ["no_such_track"]
    assert room.queue == [] and room.track is None


def test_next_track_is_scheduled_exactly_at_the_end_of_the_current_one() -> None:
    room = room_with("h")
    add(room, "h", 1, duration=10.0)
    add(room, "h", 2, duration=20.0)
    from musicsync.protocol import Play

    room.handle("h", Play(), T0)
    start = room.timeline.start_at
    end = start + 10_000
    assert room.track_end_at() == end
    assert room.next_deadline() == min(d for d in [end - ADVANCE_NOTICE_MS, T0 + 50] if d)
    assert states(room.poll(end - ADVANCE_NOTICE_MS - 1)) == []
    (state,) = states(room.poll(end - ADVANCE_NOTICE_MS))
    assert state["track"]["url"] == "/media/t2.mp3"  # type: ignore[index]
    assert state["start_at"] == end  # gapless: starts as the old one ends
    assert state["paused"] is False and state["position"] == 0.0
    assert room.queue == []
    # nothing follows t2: at its end the room settles paused at the end
    end2 = end + 20_000
    assert room.next_deadline() == end2
    (state,) = states(room.poll(end2))
    assert state["paused"] is True and state["position"] == 20.0
    assert room.next_deadline() is None


def test_repeat_one_and_all() -> None:
    from musicsync.protocol import Play

    room = room_with("h")
    add(room, "h", 1, duration=10.0)
    room.handle("h", QueueMode(repeat="one"), T0)
    room.handle("h", Play(), T0)
    end = room.track_end_at()
    assert end is not None
    (state,) = states(room.poll(end - ADVANCE_NOTICE_MS))
    assert state["track"]["url"] == "/media/t1.mp3"  # type: ignore[index]
    assert state["start_at"] == end
    room.handle("h", QueueMode(repeat="all"), T0)
    add(room, "h", 2, duration=10.0)
    end = room.track_end_at()
    assert end is not None
    (state,) = states(room.poll(end - ADVANCE_NOTICE_MS))
    assert state["track"]["url"] == "/media/t2.mp3"  # type: ignore[index]
    assert [i.track.url for i in room.queue] == ["/media/t1.mp3"]  # cycled to the back


def test_shuffle_picks_from_the_whole_queue_deterministically() -> None:
    picks = []
    for seed in range(20):
        room = Room("main", rng=random.Random(seed))
        room.join("h", "H", T0)
        for n in range(1, 6):
            add(room, "h", n)
        room.handle("h", QueueMode(shuffle=True), T0)
        room.handle("h", QueueNext(), T0)
        assert room.track is not None
        picks.append(room.track.url)
        assert len(room.queue) == 3
    assert len(set(picks)) > 1  # not always the head


def test_queue_next_skips_now_and_errors_when_empty() -> None:
    room = room_with("h")
    assert errors(room.handle("h", QueueNext(), T0)) == ["queue_empty"]
    add(room, "h", 1)
    add(room, "h", 2)
    (state,) = states(room.handle("h", QueueNext(), T0 + 5))
    assert state["track"]["url"] == "/media/t2.mp3"  # type: ignore[index]
    assert state["paused"] is False
    assert state["start_at"] >= T0 + 5 + 150  # scheduled, with time to load


def test_tiny_looping_tracks_cannot_spin_the_timer() -> None:
    from musicsync.protocol import Play

    for duration in (0.0, 0.001, 0.6):
        room = room_with("h")
        add(room, "h", 1, duration=duration)
        room.handle("h", QueueMode(repeat="one"), T0)
        room.handle("h", Play(), T0)
        now = T0 + 10_000.0
        versions = room.version
        for _ in range(100):  # a timer that polls whenever a deadline is due
            deadline = room.next_deadline()
            if deadline is None or deadline > now:
                break
            room.poll(now)
        else:
            raise AssertionError(f"timer spins for a {duration} s track")
        assert room.version - versions <= 1 + 10_000 / (duration * 1000 or 1)
