"""The seats part on its own: roles, token hashes, held seats, election, presence, dicts."""

from __future__ import annotations

import json

import pytest

from musicsync.access import hash_token
from musicsync.effects import Refusal
from musicsync.seats import (
    COHOST,
    HOST,
    LISTENER,
    PARTICIPANT_LIST_MAX,
    PRESENCE_COALESCE_MS,
    Seats,
)

T0 = 1_800_000_000_000.0
GRACE = 30_000.0


def seated(*names: str, roles: dict[str, str] | None = None) -> Seats:
    s = Seats(GRACE)
    for name in names:
        s.join(name, name.upper(), T0, hash_token(f"tok-{name}"), (roles or {}).get(name))
    s.flush_presence(T0 + PRESENCE_COALESCE_MS)
    return s


def test_first_is_host_an_invite_gives_cohost_never_host() -> None:
    s = seated("a", "b", "c", roles={"b": COHOST, "c": HOST})
    assert {p.id: p.role for p in s.participants.values()} == {
        "a": HOST,
        "b": COHOST,
        "c": LISTENER,
    }
    with pytest.raises(ValueError):
        s.join("a", "again", T0, None)


def test_a_held_seat_resumes_with_id_name_role_and_seniority() -> None:
    s = seated("a", "b")
    s.leave("a", T0 + 1000)
    assert s.host_id is None and s.host_reserved
    assert s.holds(hash_token("tok-a")) and s.by_hash(hash_token("tok-a")) is None
    p = s.resume(hash_token("tok-a"), T0 + 2000)
    assert p is not None and (p.id, p.name, p.role, p.seq) == ("a", "A", HOST, 1)
    assert s.by_hash(hash_token("tok-a")) is p
    assert s.resume(hash_token("tok-a"), T0 + 2000) is None  # seated, not held


def test_a_claimed_host_role_is_not_given_back() -> None:
    s = seated("a", "b")
    s.leave("a", T0 + 1000)
    with pytest.raises(Refusal, match="reconnecting"):
        s.claim("b", T0 + 1000)
    s.expire(T0 + 1000 + GRACE)  # the grace ended: b, the longest seated, is elected
    assert s.host_id == "b"
    s.join("c", "C", T0 + 40_000, hash_token("tok-c"))
    s.leave("c", T0 + 41_000)
    assert s.resume(hash_token("tok-a"), T0 + 42_000) is None  # expired


def test_leaving_without_hold_elects_at_once() -> None:
    s = seated("a", "b", "c")
    s.leave("a", T0 + 1, hold=False)
    assert s.host_id == "b" and not s.holds(hash_token("tok-a"))


def test_transfer_and_claim_refusals_change_nothing() -> None:
    s = seated("a", "b", roles={"b": COHOST})
    before = s.to_dict()
    with pytest.raises(Refusal) as info:
        s.transfer("a", "nobody", T0)
    assert info.value.code == "no_such_participant"
    with pytest.raises(Refusal, match="already has a host"):
        s.claim("b", T0)
    assert s.to_dict() == before and s.presence.empty()
    assert s.transfer("a", "b", T0)
    assert (s.participants["a"].role, s.participants["b"].role) == (COHOST, HOST)


def test_presence_is_coalesced_and_a_join_then_leave_is_a_leave() -> None:
    s = seated("a")
    s.join("b", "B", T0 + 100, None)
    s.join("c", "C", T0 + 110, None)
    s.leave("b", T0 + 120)
    assert s.next_deadline() == T0 + 100 + PRESENCE_COALESCE_MS
    assert s.flush_presence(T0 + 100) is None
    delta = s.flush_presence(T0 + 100 + PRESENCE_COALESCE_MS)
    assert delta == {
        "joined": [{"id": "c", "name": "C", "role": LISTENER}],
        "left": ["b"],
        "changed": [],
        "count": 2,
    }


def test_a_shared_crowd_elsewhere_counts_and_its_news_is_a_count() -> None:
    s = seated("a", "b")
    s.flush_presence(T0 + PRESENCE_COALESCE_MS)
    s.set_elsewhere(0, T0)  # no change: no news
    assert s.next_deadline() is None
    s.set_elsewhere(250, T0 + 10)  # other nodes hold 250 listeners this copy does not
    assert s.count() == 252
    assert s.flush_presence(T0 + 10) is None  # coalesced like any presence news
    assert s.flush_presence(T0 + 10 + PRESENCE_COALESCE_MS) == {
        "joined": [],
        "left": [],
        "changed": [],
        "count": 252,
    }
    s.set_elsewhere(250, T0 + 100)
    assert s.next_deadline() is None  # the same count again: nothing to say
    s.join("c", "C", T0 + 200, None)
    delta = s.flush_presence(T0 + 200 + PRESENCE_COALESCE_MS)
    assert delta is not None and delta["count"] == 253


def test_the_worst_round_trip_follows_joins_leaves_and_reports() -> None:
    s = seated("a", "b")
    s.note_rtt("a", 100.0)
    s.note_rtt("b", 300.0)
    assert s.worst_rtt() == 300.0
    s.note_rtt("b", 50.0)
    assert s.worst_rtt() == 100.0
    s.leave("a", T0)
    assert s.worst_rtt() == 50.0


def test_a_crowd_keeps_only_its_leads_seats() -> None:
    s = seated("h")
    for i in range(PARTICIPANT_LIST_MAX + 1):
        s.join(f"l{i}", "L", T0, hash_token(f"t{i}"))
    assert s.crowded()
    assert [seat["id"] for seat in s.to_dict()["seats"]] == ["h"]
    assert len(s.listed()) == 1 + PARTICIPANT_LIST_MAX


def test_round_trips_through_a_plain_dict_every_seat_held() -> None:
    s = seated("a", "b", "c", roles={"b": COHOST})
    s.join("x", "X", T0, None)  # no token: nothing to resume with, not kept
    s.leave("c", T0 + 10)
    d = json.loads(json.dumps(s.to_dict()))
    assert "tok-" not in json.dumps(d)  # hashes only
    again = Seats.from_dict(d, T0 + 100, GRACE)
    assert again.participants == {}
    assert list(again.held) == [hash_token(f"tok-{n}") for n in ("a", "b", "c")]
    assert all(r.until == T0 + 100 + GRACE for r in again.held.values())
    assert again.to_dict() == d
    p = again.join("new", "N", T0 + 200, None)
    assert p.seq == 5 and p.role == LISTENER  # seniority goes on; the host's seat is held
    with pytest.raises(ValueError):
        Seats.from_dict({"seats": [{**d["seats"][0], "role": "admin"}]}, T0)


def test_a_listener_resuming_into_a_room_its_host_left_for_good_hosts_it() -> None:
    """Found by the property test: ann hosts without a token, dee holds a seat;
    ann leaves (no seat to hold), then dee resumes: the room had no host."""
    s = Seats()
    s.join("ann", "Ann", T0, None)
    s.join("dee", "Dee", T0, hash_token("tok"))
    s.leave("dee", T0 + 1)
    s.leave("ann", T0 + 2)
    assert s.host_id is None and not s.participants
    p = s.resume(hash_token("tok"), T0 + 3)
    assert p is not None and p.role == HOST and s.host_id == "dee"
