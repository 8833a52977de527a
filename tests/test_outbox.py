"""A client's outbox: pongs first, the newest state wins, bounded backlog."""

from __future__ import annotations

import pytest

from musicsync.outbox import Outbox, OutboxOverflow, PendingPong


def drain(box: Outbox) -> list[str | PendingPong]:
    out: list[str | PendingPong] = []
    while (item := box.pop()) is not None:
        out.append(item)
    return out


def test_empty_outbox() -> None:
    box = Outbox(8)
    assert len(box) == 0
    assert box.pop() is None
    assert box.coalesced == 0


def test_frames_keep_their_order() -> None:
    box = Outbox(8)
    for frame in ("welcome", "presence", "error"):
        box.push(frame)
    assert len(box) == 3
    assert drain(box) == ["welcome", "presence", "error"]
    assert len(box) == 0


def test_pongs_jump_the_queue() -> None:
    box = Outbox(8)
    box.push("welcome")
    box.push_state("state-1")
    box.push_pong(1.0, 2.0)
    box.push("presence")
    box.push_pong(3.0, 4.0)
    assert len(box) == 5
    assert drain(box) == [
        PendingPong(1.0, 2.0),
        PendingPong(3.0, 4.0),
        "welcome",
        "state-1",
        "presence",
    ]


def test_pong_pushed_between_pops_is_next() -> None:
    box = Outbox(8)
    box.push("a")
    box.push("b")
    assert box.pop() == "a"
    box.push_pong(5.0, 6.0)
    assert box.pop() == PendingPong(5.0, 6.0)
    assert box.pop() == "b"


def test_newest_state_wins_in_the_oldest_ones_place() -> None:
    box = Outbox(8)
    box.push("welcome")
    box.push_state("state-1")
    box.push("presence-1")
    box.push_state("state-2")
    box.push("presence-2")
    box.push_state("state-3")
    assert box.coalesced == 2
    assert len(box) == 4
    assert drain(box) == ["welcome", "state-3", "presence-1", "presence-2"]


def test_a_state_after_the_previous_one_was_sent_is_queued_anew() -> None:
    box = Outbox(8)
    box.push_state("state-1")
    box.push("presence")
    assert box.pop() == "state-1"
    box.push_state("state-2")
    assert box.coalesced == 0
    assert drain(box) == ["presence", "state-2"]


def test_coalesced_count_accumulates() -> None:
    box = Outbox(8)
    for i in range(10):
        box.push_state(f"s{i}")
    assert box.coalesced == 9
    assert drain(box) == ["s9"]
    for i in range(3):
        box.push_state(f"t{i}")
    assert box.coalesced == 11
    assert drain(box) == ["t2"]


def test_overflow_at_max_frames() -> None:
    box = Outbox(3)
    box.push("a")
    box.push("b")
    box.push("c")
    with pytest.raises(OutboxOverflow):
        box.push("d")
    assert drain(box) == ["a", "b", "c"]


def test_a_new_state_counts_against_the_limit() -> None:
    box = Outbox(2)
    box.push("a")
    box.push_state("s1")
    with pytest.raises(OutboxOverflow):
        box.push("b")
    # Replacing the waiting state does not grow the backlog.
    for i in range(100):
        box.push_state(f"s{i + 2}")
    assert len(box) == 2
    assert drain(box) == ["a", "s101"]


def test_a_state_that_does_not_fit_overflows_and_is_not_kept() -> None:
    box = Outbox(1)
    box.push("a")
    with pytest.raises(OutboxOverflow):
        box.push_state("s1")
    assert drain(box) == ["a"]
    box.push_state("s2")
    assert drain(box) == ["s2"]


def test_pongs_do_not_count_against_the_frame_limit_but_have_their_own() -> None:
    box = Outbox(2)
    box.push("a")
    box.push("b")
    box.push_pong(1.0, 1.0)
    box.push_pong(2.0, 2.0)
    with pytest.raises(OutboxOverflow):
        box.push_pong(3.0, 3.0)
    assert len(box) == 4
    assert drain(box) == [PendingPong(1.0, 1.0), PendingPong(2.0, 2.0), "a", "b"]


def test_room_frees_up_after_popping() -> None:
    box = Outbox(2)
    box.push("a")
    box.push("b")
    assert box.pop() == "a"
    box.push("c")
    assert drain(box) == ["b", "c"]
