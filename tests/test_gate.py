"""The access part on its own: password, invites, bans, listener rights, dict round trip."""

from __future__ import annotations

import json
from itertools import count

import pytest

from musicsync.effects import Refusal
from musicsync.gate import MAX_INVITES, Gate

T0 = 1_800_000_000_000.0


def gate() -> Gate:
    codes = count(1)
    return Gate(new_code=lambda: f"code-{next(codes)}")


def test_an_open_room_admits_anyone_a_protected_one_only_seats_and_invites() -> None:
    g = gate()
    assert g.admission(T0, None, lambda: False) == (True, None)
    assert g.set_password_hash("scrypt$x")
    assert g.protected and g.settings_wire() == {"listeners_may_upload": False, "protected": True}
    assert g.admission(T0, None, lambda: False) == (False, None)
    assert g.admission(T0, None, lambda: True) == (True, None)
    invite = g.create_invite("cohost", 60, T0)
    assert g.admission(T0 + 59_999, invite.code, lambda: False) == (True, "cohost")
    assert g.admission(T0 + 60_000, invite.code, lambda: False) == (False, None)
    assert g.admission(T0, "guessed", lambda: False) == (False, None)


def test_invites_are_capped_expired_ones_dropped_and_revoked_ones_gone() -> None:
    g = gate()
    for _ in range(MAX_INVITES):
        g.create_invite("listener", 60, T0)
    with pytest.raises(Refusal) as info:
        g.create_invite("listener", 60, T0)
    assert info.value.code == "too_many_invites"
    assert len(g.invites) == MAX_INVITES
    fresh = g.create_invite("listener", 60, T0 + 60_000)  # the old ones expired: dropped
    assert list(g.invites) == [fresh.code]
    g.revoke_invite(fresh.code)
    with pytest.raises(Refusal, match="no live invite"):
        g.revoke_invite(fresh.code)
    with pytest.raises(ValueError):
        g.create_invite("host", 60, T0)  # invites never make a host


def test_bans_last_until_they_fall_due_in_order() -> None:
    g = gate()
    g.ban("hash-a", T0 + 100)
    g.ban("hash-b", T0 + 50)
    g.ban("hash-a", T0 + 200)  # a re-ban moves to the end
    assert g.is_banned("hash-a", T0 + 199) and not g.is_banned("hash-c", T0)
    revision = g.revision
    g.expire(T0 + 60)
    assert not g.is_banned("hash-b", T0 + 60)
    assert g.revision == revision + 1
    g.expire(T0 + 200)
    assert not g.is_banned("hash-a", T0 + 200)


def test_listener_rights_change_only_when_asked() -> None:
    g = gate()
    assert not g.set_listeners_may_upload(None)
    assert g.set_listeners_may_upload(True) and g.settings.listeners_may_upload


def test_round_trips_through_a_plain_dict_that_shares_nothing() -> None:
    g = gate()
    g.set_password_hash("scrypt$x")
    g.create_invite("cohost", 3600, T0)
    g.ban("hash-a", T0 + 100)
    g.ban("hash-b", T0 + 50)
    g.set_listeners_may_upload(True)
    d = g.to_dict()
    g.ban("hash-c", T0 + 300)  # the writer thread may encode d meanwhile
    assert "hash-c" not in d["banned_hashes"]
    again = Gate.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert list(again.to_dict()["banned_hashes"]) == ["hash-b", "hash-a"]  # due order
