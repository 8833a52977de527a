"""The queue part on its own: add, remove, move, modes, what comes next, revisions, dicts."""

from __future__ import annotations

import json
import random

import pytest

from musicsync.effects import Refusal
from musicsync.playqueue import ADVANCE_NOTICE_MS, MAX_QUEUE_ITEMS, PlayQueue
from musicsync.timeline import Track


def track(n: int) -> Track:
    return Track(f"/media/t{n}.mp3", f"t{n}", 10.0 + n)


def queue_of(*ns: int) -> PlayQueue:
    q = PlayQueue()
    for n in ns:
        q.add(track(n), "H")
    return q


def urls(q: PlayQueue) -> list[str]:
    return [item.track.url for item in q.items]


def test_ids_are_never_reused_and_next_goes_first() -> None:
    q = queue_of(1, 2)
    q.remove("q2")
    item = q.add(track(3), "H", front=True)
    assert item.id == "q3"
    assert [i.id for i in q.items] == ["q3", "q1"]


def test_refusals_change_nothing() -> None:
    q = queue_of(1, 2)
    before = q.to_dict()
    for op in (lambda: q.remove("q9"), lambda: q.move("q9", 0)):
        with pytest.raises(Refusal) as info:
            op()
        assert info.value.code == "no_such_item"
    assert q.to_dict() == before
    full = queue_of(*range(MAX_QUEUE_ITEMS))
    with pytest.raises(Refusal, match="holds"):
        full.add(track(0), "H")
    assert len(full.items) == MAX_QUEUE_ITEMS


def test_move_clamps_the_index() -> None:
    q = queue_of(1, 2, 3)
    assert q.move("q1", 99)
    assert urls(q) == ["/media/t2.mp3", "/media/t3.mp3", "/media/t1.mp3"]


def test_modes_and_what_comes_next() -> None:
    q = queue_of(1, 2)
    rng = random.Random(1)
    assert not q.set_mode(None, None)
    assert q.set_mode("one", None)
    assert q.pick_next(track(0), rng, skipping=False) == track(0)  # repeat one
    assert q.pick_next(track(0), rng, skipping=True) == track(1)  # unless skipped
    q.set_mode("all", None)
    assert q.pick_next(track(1), rng, skipping=False) == track(2)
    assert urls(q) == ["/media/t1.mp3"]  # the one that ended went back to the end
    assert q.items[-1].added_by == "repeat"
    with pytest.raises(ValueError):
        q.set_mode("sometimes", None)


def test_shuffle_all_never_replays_the_track_just_played() -> None:
    q = queue_of(1, 2, 3)
    q.set_mode("all", True)
    current = track(0)
    for seed in range(50):
        nxt = q.pick_next(current, random.Random(seed), skipping=False)
        assert nxt is not None and nxt != current
        current = nxt


def test_follower_and_advance_time() -> None:
    q = PlayQueue()
    assert not q.has_follower(track(1))
    assert q.advance_due_at(100_000.0, 60.0) == 100_000.0  # nothing follows: at the end
    q.set_mode("all", None)
    assert q.has_follower(track(1)) and not q.has_follower(None)
    assert q.advance_due_at(100_000.0, 60.0) == 100_000.0 - ADVANCE_NOTICE_MS
    assert q.advance_due_at(100_000.0, 2.0) == 99_000.0  # a short track: half-way


def test_the_revision_moves_only_when_the_items_did() -> None:
    q = PlayQueue()
    assert q.note_broadcast() == 0
    q.add(track(1), "H")
    assert q.note_broadcast() == 1
    assert q.note_broadcast() == 1
    q.set_mode("one", True)
    assert q.note_broadcast() == 1


def test_round_trips_through_a_plain_dict() -> None:
    q = queue_of(1, 2, 3)
    q.remove("q2")
    q.set_mode("all", True)
    d = json.loads(json.dumps(q.to_dict()))
    again = PlayQueue.from_dict(d)
    assert again.to_dict() == q.to_dict()
    assert again.add(track(4), "H").id == "q4"  # the id counter came along
    with pytest.raises(ValueError):
        PlayQueue.from_dict({**d, "repeat": "forever"})
