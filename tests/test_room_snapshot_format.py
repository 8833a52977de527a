"""Rooms stored before the room was split into parts (snapshot format 1) still restore.

``tests/data/room_snapshot_v1.json`` is a snapshot written by the code of that time
(every part in use: a playing track, a queue with repeat and shuffle, a password,
an invite, a ban, seats of a host, a co-host, listeners and one held seat), and
``room_snapshot_v1_trace.json`` what that code did with it once restored. Today's
code must restore it and do the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from musicsync.protocol import (
    CreateInvite,
    Kick,
    QueueAdd,
    QueueMode,
    RoomSettingsUpdate,
    SetTrack,
    Volume,
)
from musicsync.room import Room

DATA = Path(__file__).parent / "data"
SNAPSHOT_V1 = DATA / "room_snapshot_v1.json"
TRACE_V1 = DATA / "room_snapshot_v1_trace.json"
T0 = 1_800_000_000_000.0
RESTORED_AT = T0 + 60_000.0
TOKENS = ("tok-h", "tok-c", "tok-l", "tok-m", "tok-k", "tok-x")
STEP_MS = 1_000.0
STEPS = 40


def build_room() -> Room:
    """The room whose snapshot was captured (kept to show how the file was made)."""
    codes = iter(["invite-co", "invite-li"])
    room = Room("club", rng=random.Random(3), new_code=lambda: next(codes))
    room.join("h", "Host", T0, token="tok-h")
    room.handle("h", CreateInvite(role="cohost", expires_in=3600), T0)
    room.join("c", "Co", T0, token="tok-c", role="cohost")
    room.join("l", "Lis", T0, token="tok-l")
    room.join("m", "Mo", T0, token="tok-m")
    room.join("k", "Kay", T0, token="tok-k")
    room.handle("h", CreateInvite(role="listener", expires_in=7200), T0)
    room.set_password_hash("h", "scrypt$16384$8$1$c2FsdA$ZGlnZXN0")
    room.handle("h", Kick(id="k"), T0 + 10)
    room.note_rtt("l", 120.0)
    room.handle("h", SetTrack(url="/media/a.mp3", title="A", duration=30.0, autoplay=True), T0)
    for n in range(3):
        room.handle("c", QueueAdd(url=f"/media/q{n}.mp3", duration=20.0 + n), T0 + 20)
    room.handle("h", QueueMode(repeat="all", shuffle=True), T0 + 30)
    room.handle("h", Volume(volume=0.5), T0 + 40)
    room.handle("h", RoomSettingsUpdate(listeners_may_upload=True), T0 + 50)
    room.leave("m", T0 + 55_000)
    room.poll(T0 + 56_000)
    return room


def trace(room: Room, now: float) -> dict[str, Any]:
    """What a restored room shows and does: state, deadlines, admissions, resumes, polls."""
    out: dict[str, Any] = {
        "state": room.state(),
        "next_deadline": room.next_deadline(),
        "lead_ms": room.lead_ms(),
        "banned": {t: room.is_banned(t, now) for t in TOKENS},
        "holds_seat": {t: room.holds_seat(t) for t in TOKENS},
        "admission": {
            "none": list(room.admission(now)),
            "token": list(room.admission(now, token="tok-l")),
            "invite": list(room.admission(now, invite="invite-co")),
            "bad_invite": list(room.admission(now, invite="nope")),
        },
    }
    resumes: dict[str, Any] = {}
    for token in ("tok-c", "tok-l", "tok-k", "tok-x"):
        effects = room.resume(token, now)
        resumes[token] = None if effects is None else effects[0].payload["you"]  # type: ignore[union-attr]
    out["resumes"] = resumes
    polls = []
    t = now
    for _ in range(STEPS):
        t += STEP_MS
        effects = room.poll(t)
        polls.append([t, [_effect(e) for e in effects], room.state(), room.next_deadline()])
    out["polls"] = polls
    return out


def _effect(effect: Any) -> list[Any]:
    kind = type(effect).__name__
    if kind == "BroadcastState":
        return [kind, effect.state]
    if kind == "BroadcastPresence":
        return [kind, effect.delta]
    return [kind, repr(effect)]


def test_a_format_1_snapshot_restores_and_behaves_as_it_did() -> None:
    snap = json.loads(SNAPSHOT_V1.read_text())
    assert "format" not in snap  # format 1 had no marker
    room = Room.restore("club", snap, RESTORED_AT, rng=random.Random(5))
    expected = json.loads(TRACE_V1.read_text())
    assert json.loads(json.dumps(trace(room, RESTORED_AT))) == expected


def test_a_restored_format_1_room_round_trips_through_todays_format() -> None:
    snap = json.loads(SNAPSHOT_V1.read_text())
    room = Room.restore("club", snap, RESTORED_AT, rng=random.Random(5))
    today = json.loads(json.dumps(room.snapshot()))
    again = Room.restore("club", today, RESTORED_AT, rng=random.Random(5))
    expected = json.loads(TRACE_V1.read_text())
    assert json.loads(json.dumps(trace(again, RESTORED_AT))) == expected
