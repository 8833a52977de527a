"""Pure tests of calibration and tick mode: decoding, the room's transitions, the open record."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from musicsync.calibration import (
    CALIBRATION_PREPARE_MS,
    CALIBRATION_RESULT_GRACE_MS,
    CALIBRATION_SLOT_MS,
    TICK_MODE_MAX_MS,
    TICK_PERIOD_MS,
)
from musicsync.protocol import (
    MAX_CALIBRATION_DEVICES,
    Calibrate,
    CalibrationResult,
    Measurement,
    ProtocolError,
    TickMode,
    decode_client,
)
from musicsync.room import MIN_LEAD_MS, Error, Reply, Room

T0 = 1_700_000_000_000.0


def room_of(*people: str, cohost: str | None = None) -> Room:
    room = Room("r", rng=random.Random(1))
    for pid in people:
        room.join(pid, pid, T0, role="cohost" if pid == cohost else None)
    return room


def measured(pid: str, delay: float | None = 12.5, rounds: int = 3) -> Measurement:
    reason = None if delay is not None else "round 1: no clear peak (peak/noise 2.0 < 6)"
    return Measurement(pid, delay, rounds if delay is not None else 0, 0.3, reason)


def decode(obj: dict[str, Any]) -> Any:
    return decode_client(json.dumps(obj))


# -- decoding ---------------------------------------------------------------------


def test_calibrate_decodes_with_defaults() -> None:
    assert decode({"type": "calibrate", "mic": "m"}) == Calibrate(mic="m", devices=None, rounds=3)
    assert decode({"type": "calibrate", "mic": "m", "devices": ["a", "b"], "rounds": 5}) == (
        Calibrate(mic="m", devices=("a", "b"), rounds=5)
    )
    assert decode({"type": "tick_mode", "on": True}) == TickMode(on=True)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"mic": 3},
        {"mic": "m", "rounds": 2},
        {"mic": "m", "rounds": 6},
        {"mic": "m", "rounds": 3.5},
        {"mic": "m", "rounds": True},
        {"mic": "m", "devices": []},
        {"mic": "m", "devices": "a"},
        {"mic": "m", "devices": ["a", "a"]},
        {"mic": "m", "devices": [f"d{i}" for i in range(MAX_CALIBRATION_DEVICES + 1)]},
        {"mic": "m", "devices": [1]},
        {"mic": "m", "extra": 1},
    ],
)
def test_bad_calibrate_is_a_bad_message(fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as err:
        decode({"type": "calibrate", **fields})
    assert err.value.code == "bad_message"


def test_calibration_result_decodes_each_measurement() -> None:
    row = {"id": "a", "delay_ms": 40.25, "rounds": 3, "spread_ms": 0.4, "reason": None}
    missing = {"id": "b", "delay_ms": None, "rounds": 0, "spread_ms": None, "reason": "not heard"}
    msg = decode({"type": "calibration_result", "id": "cal-1", "devices": [row, missing]})
    assert msg == CalibrationResult(
        id="cal-1",
        devices=(
            Measurement("a", 40.25, 3, 0.4, None),
            Measurement("b", None, 0, None, "not heard"),
        ),
    )
    assert msg.devices[0].to_wire() == row


@pytest.mark.parametrize(
    "row",
    [
        {"id": "a", "delay_ms": 1.0, "rounds": 3, "spread_ms": 0.1},  # a key missing
        {"id": "a", "delay_ms": 1.0, "rounds": 3, "spread_ms": 0.1, "reason": None, "x": 1},
        {"id": "a", "delay_ms": 6000.0, "rounds": 3, "spread_ms": 0.1, "reason": None},
        {"id": "a", "delay_ms": "1", "rounds": 3, "spread_ms": 0.1, "reason": None},
        {"id": "a", "delay_ms": 1.0, "rounds": 6, "spread_ms": 0.1, "reason": None},
        {"id": "a", "delay_ms": 1.0, "rounds": -1, "spread_ms": 0.1, "reason": None},
        {"id": "a", "delay_ms": 1.0, "rounds": 3, "spread_ms": -1.0, "reason": None},
        {"id": "a", "delay_ms": 1.0, "rounds": 3, "spread_ms": 0.1, "reason": "x" * 161},
        {"id": 7, "delay_ms": 1.0, "rounds": 3, "spread_ms": 0.1, "reason": None},
        [1, 2],
    ],
)
def test_bad_measurements_are_a_bad_message(row: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        decode({"type": "calibration_result", "id": "c", "devices": [row]})
    assert err.value.code == "bad_message"


def test_a_result_naming_a_device_twice_or_none_is_a_bad_message() -> None:
    row = {"id": "a", "delay_ms": 1.0, "rounds": 3, "spread_ms": 0.1, "reason": None}
    for devices in ([row, row], [], None):
        with pytest.raises(ProtocolError):
            decode({"type": "calibration_result", "id": "c", "devices": devices})


# -- the room ---------------------------------------------------------------------------


def test_calibrate_schedules_every_other_device_in_its_own_slot() -> None:
    room = room_of("h", "a", "m", "b")
    effects = room.handle("h", Calibrate(mic="m"), T0)
    assert [e.to for e in effects if isinstance(e, Reply)] == ["m", "h", "a", "b"]
    payloads = {id(e.payload) for e in effects if isinstance(e, Reply)}
    assert len(payloads) == 1  # one payload: the edge encodes it once
    payload = effects[0].payload
    assert all(isinstance(e, Reply) and e.kind == "calibration" for e in effects)
    assert payload["mic"] == "m" and payload["by"] == "h"
    assert payload["slots"] == {"h": 0, "a": 1, "b": 2}
    assert payload["start_at"] == T0 + MIN_LEAD_MS + CALIBRATION_PREPARE_MS
    assert payload["slot_ms"] == CALIBRATION_SLOT_MS and payload["rounds"] == 3
    assert room.calibration is not None and room.calibration.id == payload["id"]
    assert room.calibration.until == (
        payload["start_at"] + 3 * 3 * CALIBRATION_SLOT_MS + CALIBRATION_RESULT_GRACE_MS
    )


def test_named_devices_take_the_slots_in_order_and_the_leads_hear_of_it() -> None:
    room = room_of("h", "c", "a", "b", "m", cohost="c")
    room.note_latency_offset("a", 400.0)  # the lead covers it: so does slot 0
    effects = room.handle("c", Calibrate(mic="m", devices=("b", "m"), rounds=5), T0)
    assert [e.to for e in effects if isinstance(e, Reply)] == ["m", "b", "h", "c"]
    payload = effects[0].payload
    assert payload["slots"] == {"b": 0, "m": 1}  # the microphone's own speaker may be measured
    assert payload["rounds"] == 5 and payload["by"] == "c"
    assert payload["start_at"] == T0 + MIN_LEAD_MS + 400.0 + CALIBRATION_PREPARE_MS


def test_calibrate_refusals_change_nothing() -> None:
    room = room_of("h", "l", "m")
    revision = room.revision
    cases = [
        ("l", Calibrate(mic="m"), "not_host"),
        ("h", Calibrate(mic="ghost"), "no_such_participant"),
        ("h", Calibrate(mic="m", devices=("l", "ghost")), "no_such_participant"),
        ("l", TickMode(on=True), "not_host"),
    ]
    for sender, msg, code in cases:
        effects = room.handle(sender, msg, T0)
        assert len(effects) == 1 and isinstance(effects[0], Error), effects
        assert (effects[0].to, effects[0].code) == (sender, code)
    alone = room_of("h")
    assert alone.handle("h", Calibrate(mic="h"), T0)[0] == Error(
        "h", "bad_message", "no device to calibrate but the microphone"
    )
    assert room.calibration is None and room.revision == revision


def test_a_crowd_must_name_its_devices() -> None:
    room = room_of("h", *(f"l{i}" for i in range(MAX_CALIBRATION_DEVICES + 1)))
    effects = room.handle("h", Calibrate(mic="l0"), T0)
    assert isinstance(effects[0], Error) and effects[0].code == "bad_message"
    effects = room.handle("h", Calibrate(mic="l0", devices=("h", "l1")), T0)
    assert all(isinstance(e, Reply) for e in effects)


def test_only_the_measuring_device_answers_once_and_the_hosts_hear_it() -> None:
    room = room_of("h", "c", "a", "m", cohost="c")
    cal_id = room.handle("h", Calibrate(mic="m"), T0)[0].payload["id"]
    result = CalibrationResult(id=cal_id, devices=(measured("a"), measured("h", None)))
    for sender in ("a", "h", "c"):  # not the microphone
        refused = room.handle(sender, result, T0 + 10_000)
        assert [(e.to, e.code) for e in refused] == [(sender, "no_such_calibration")]
    wrong_id = CalibrationResult(id="cal-other", devices=(measured("a"),))
    assert room.handle("m", wrong_id, T0)[0].code == "no_such_calibration"
    stranger = CalibrationResult(id=cal_id, devices=(measured("m"),))  # m was not measured
    assert room.handle("m", stranger, T0)[0].code == "no_such_participant"
    revision = room.revision
    effects = room.handle("m", result, T0 + 10_000)
    payload = {
        "id": cal_id,
        "from": "m",
        "devices": [m.to_wire() for m in result.devices],
    }
    assert effects == [
        Reply("h", "calibration_result", payload),
        Reply("c", "calibration_result", payload),
    ]
    assert room.calibration is None and room.revision == revision + 1
    again = room.handle("m", result, T0 + 10_001)
    assert again[0].code == "no_such_calibration"


def test_a_late_result_or_one_for_a_replaced_calibration_is_refused() -> None:
    room = room_of("h", "a", "m")
    first = room.handle("h", Calibrate(mic="m"), T0)[0].payload
    late = CalibrationResult(id=first["id"], devices=(measured("a"),))
    assert room.calibration is not None
    until = room.calibration.until
    assert room.handle("m", late, until + 1)[0].code == "no_such_calibration"
    second = room.handle("h", Calibrate(mic="a"), T0 + 1)[0].payload
    assert second["id"] != first["id"]
    assert room.handle("m", late, T0 + 2)[0].code == "no_such_calibration"


def test_the_open_calibration_survives_a_snapshot() -> None:
    room = room_of("h", "a", "m")
    cal_id = room.handle("h", Calibrate(mic="m"), T0)[0].payload["id"]
    snap = json.loads(json.dumps(room.snapshot()))
    restored = Room.restore("r", snap, T0 + 1000)
    assert restored.calibration == room.calibration
    assert restored.snapshot() == room.snapshot()
    # a restored room's measuring device resumes its seat and may still answer
    older = dict(snap)
    del older["calibration"]  # a snapshot from before calibration existed
    assert Room.restore("r", older, T0).calibration is None
    assert cal_id


def test_tick_mode_reaches_everyone_with_one_payload() -> None:
    room = room_of("h", "c", "a", "b", cohost="c")
    revision, version = room.revision, room.version
    effects = room.handle("c", TickMode(on=True), T0)
    assert [e.to for e in effects if isinstance(e, Reply)] == ["h", "c", "a", "b"]
    assert {id(e.payload) for e in effects if isinstance(e, Reply)} == {id(effects[0].payload)}
    assert effects[0] == Reply("h", "ticks", {"on": True, "by": "c", "period_ms": TICK_PERIOD_MS})
    assert (room.revision, room.version) == (revision + 1, version)  # kept; not a state
    off = room.handle("h", TickMode(on=False), T0)
    assert off[0].payload["on"] is False
    assert (room.revision, room.version) == (revision + 2, version)


def welcome_ticks(room: Room, pid: str, now: float) -> object:
    (reply,) = room.join(pid, pid.upper(), now)
    assert isinstance(reply, Reply) and reply.kind == "welcome"
    return reply.payload["ticks"]


def test_a_page_that_joins_while_ticks_are_on_ticks_too_until_they_end() -> None:
    room = room_of("h", "a")
    assert welcome_ticks(room, "b", T0) is None
    (on, *_) = room.handle("h", TickMode(on=True), T0)
    assert welcome_ticks(room, "c", T0 + 1000) == on.payload
    # kept across a restart (the value SQLite and Redis hold)
    restored = Room.restore("r", json.loads(json.dumps(room.snapshot())), T0 + 2000)
    assert restored.snapshot() == room.snapshot()
    assert welcome_ticks(restored, "d", T0 + 2000) == on.payload
    # it ends by itself, as the pages that heard it stop by themselves
    assert welcome_ticks(room, "e", T0 + TICK_MODE_MAX_MS) is None
    room.handle("h", TickMode(on=True), T0)
    room.handle("h", TickMode(on=False), T0 + 5)
    assert welcome_ticks(room, "f", T0 + 10) is None
    older = room.snapshot()
    del older["ticks"]  # a snapshot from before tick mode was kept
    assert Room.restore("r", older, T0).ticks is None
