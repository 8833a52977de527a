"""Pure tests of musicsync/health.py and of the room's side of device tuning (no sockets)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from musicsync.health import (
    FORGET_MS,
    HEALTH_PERIOD_MS,
    MAX_ROWS,
    STALE_MS,
    Device,
    RoomHealth,
)
from musicsync.protocol import ProtocolError, Report, Resync, SetLatencyOffset, decode_client
from musicsync.room import MAX_LEAD_MS, MIN_LEAD_MS, Error, Reply, Room

T0 = 1_700_000_000_000.0


def report(drift: float | None = 0.5, **fields: Any) -> Report:
    return Report(drift_ms=drift, rtt_ms=fields.pop("rtt_ms", 10.0), **fields)


def device(pid: str, at: float, drift: float | None = 0.5, **fields: Any) -> Device:
    return Device.from_report(pid, f"name-{pid}", report(drift, **fields), at)


# -- the frame ---------------------------------------------------------------------


def test_no_frame_until_someone_reports() -> None:
    health = RoomHealth()
    assert health.next_due() is None
    assert health.poll(T0, 3) is None


def test_a_report_makes_a_frame_with_every_field() -> None:
    health = RoomHealth()
    health.report(
        device(
            "a",
            T0,
            -1.234,
            offset_ms=-12.34,
            engine="webaudio",
            output_latency_ms=21.33,
            latency_offset_ms=180.0,
            drift_ppm=3.14,
            browser="Chrome",
        )
    )
    frame = health.poll(T0 + 250, 2)
    assert frame == {
        "devices": [
            {
                "id": "a",
                "name": "name-a",
                "engine": "webaudio",
                "browser": "Chrome",
                "drift_ms": -1.23,
                "rtt_ms": 10.0,
                "offset_ms": -12.3,
                "output_latency_ms": 21.3,
                "latency_offset_ms": 180.0,
                "drift_ppm": 3.1,
                "age_ms": 250,
            }
        ],
        "summary": {
            "devices": 2,
            "reporting": 1,
            "playing": 1,
            "p50_abs_drift_ms": 1.23,
            "p95_abs_drift_ms": 1.23,
            "worst_abs_drift_ms": 1.23,
        },
    }


def test_at_most_one_frame_a_second_and_only_after_new_reports() -> None:
    health = RoomHealth()
    frames = []
    for ms in range(0, 5000, 100):  # a report every 100 ms for 5 s
        now = T0 + ms
        health.report(device(f"d{ms % 700}", now))
        if health.poll(now, 10) is not None:
            frames.append(now)
    assert len(frames) == 5
    assert all(b - a >= HEALTH_PERIOD_MS for a, b in itertools.pairwise(frames))
    # nobody reports any more: no more frames
    assert health.poll(T0 + 10_000, 10) is not None  # the last report is still unsent
    assert health.next_due() is None
    assert health.poll(T0 + 20_000, 10) is None


def test_a_report_after_a_frame_waits_for_the_period() -> None:
    health = RoomHealth()
    health.report(device("a", T0))
    assert health.poll(T0, 1) is not None
    health.report(device("a", T0 + 300))
    assert health.next_due() == T0 + HEALTH_PERIOD_MS
    assert health.poll(T0 + 999, 1) is None
    assert health.poll(T0 + 1000, 1) is not None


def test_summary_percentiles_over_playing_devices_only() -> None:
    health = RoomHealth()
    for i in range(1, 21):  # |drift| 1..20 ms, signs alternating
        health.report(device(f"d{i}", T0, float(i) * (-1) ** i))
    health.report(device("idle", T0, None))
    frame = health.poll(T0, 30)
    assert frame is not None
    summary = frame["summary"]
    assert summary == {
        "devices": 30,
        "reporting": 21,
        "playing": 20,
        "p50_abs_drift_ms": 10.0,
        "p95_abs_drift_ms": 19.0,
        "worst_abs_drift_ms": 20.0,
    }
    ids = [row["id"] for row in frame["devices"]]
    assert ids[0] == "d20" and ids[-1] == "idle"  # worst first; not playing last


def test_nobody_playing_gives_null_percentiles() -> None:
    health = RoomHealth()
    health.report(device("a", T0, None))
    frame = health.poll(T0, 1)
    assert frame is not None
    assert frame["summary"]["p50_abs_drift_ms"] is None
    assert frame["summary"]["worst_abs_drift_ms"] is None
    assert frame["devices"][0]["drift_ms"] is None


def test_stale_devices_rank_first_then_are_forgotten() -> None:
    health = RoomHealth()
    health.report(device("quiet", T0, 0.1))
    health.report(device("loud", T0 + 4000, 40.0))
    frame = health.poll(T0 + STALE_MS + 1, 2)
    assert frame is not None
    assert [r["id"] for r in frame["devices"]] == ["quiet", "loud"]
    assert frame["devices"][0]["age_ms"] == STALE_MS + 1
    assert frame["summary"]["reporting"] == 1
    assert frame["summary"]["worst_abs_drift_ms"] == 40.0  # the stale one's 0.1 is old news
    # "quiet" reports again: fresh, ranked by its drift
    health.report(device("quiet", T0 + 6000, 0.1))
    frame = health.poll(T0 + 7000, 2)
    assert frame is not None
    assert [r["id"] for r in frame["devices"]] == ["loud", "quiet"]
    # "loud" goes silent for good: stale, then forgotten
    health.report(device("quiet", T0 + FORGET_MS + 5000, 0.1))
    frame = health.poll(T0 + FORGET_MS + 5000, 2)
    assert frame is not None
    assert [r["id"] for r in frame["devices"]] == ["quiet"]
    assert len(health) == 1


def test_forget_drops_a_device_that_left() -> None:
    health = RoomHealth()
    health.report(device("a", T0))
    health.report(device("b", T0))
    health.forget("a")
    health.forget("nobody")
    frame = health.poll(T0, 1)
    assert frame is not None
    assert [r["id"] for r in frame["devices"]] == ["b"]
    assert health.latest("a") is None and health.latest("b") is not None


def test_a_crowd_of_10000_gets_the_50_worst_and_a_summary_over_everyone() -> None:
    """10 000 devices reporting every 2 s for 10 s: one bounded frame a second."""
    n = 10_000
    health = RoomHealth()
    frames: list[dict[str, Any]] = []
    step_ms = 2000.0 / n  # reports evenly spread over each 2 s round
    for rnd in range(5):
        for i in range(n):
            now = T0 + rnd * 2000.0 + i * step_ms
            # device i drifts i/1000 ms; three far-off devices stand out
            drift = {17: 250.0, 4242: -90.0, 9999: 33.0}.get(i, i / 1000.0)
            health.report(device(f"d{i}", now, drift))
            if (frame := health.poll(now, n)) is not None:
                frames.append(frame)
    assert 9 <= len(frames) <= 10  # 10 s of reports: a frame a second, no more
    last = frames[-1]
    rows = last["devices"]
    assert len(rows) == MAX_ROWS
    assert [r["id"] for r in rows[:3]] == ["d17", "d4242", "d9999"]
    drifts = [abs(r["drift_ms"]) for r in rows]
    assert drifts == sorted(drifts, reverse=True)
    assert last["summary"]["devices"] == n
    assert last["summary"]["reporting"] == n
    assert last["summary"]["worst_abs_drift_ms"] == 250.0
    assert last["summary"]["p50_abs_drift_ms"] == pytest.approx(5.0, abs=0.01)
    assert last["summary"]["p95_abs_drift_ms"] == pytest.approx(9.5, abs=0.01)
    assert sum(len(f["devices"]) for f in frames) <= MAX_ROWS * len(frames)


def test_a_report_touches_only_its_own_device() -> None:
    """O(1) per report: a report in a room of 10 000 reads and writes one entry, and
    no frame is built between frames (the percentiles and rows are paid per frame)."""

    class Counting(dict[str, Device]):
        touched = 0

        def __getitem__(self, key: str) -> Device:
            Counting.touched += 1
            return super().__getitem__(key)

        def values(self) -> Any:
            Counting.touched += len(self)
            return super().values()

    health = RoomHealth()
    for i in range(10_000):
        health.report(device(f"d{i}", T0))
    assert health.poll(T0, 10_000) is not None
    health._fresh = Counting(health._fresh)
    for i in range(1000):
        health.report(device(f"d{i}", T0 + 1 + i * 0.5))
        assert health.poll(T0 + 1 + i * 0.5, 10_000) is None  # within the second
    assert Counting.touched == 0


# -- the wire ----------------------------------------------------------------------


def test_report_decodes_the_new_fields() -> None:
    msg = decode_client(
        '{"type":"report","drift_ms":null,"rtt_ms":3,"output_latency_ms":21.3,'
        '"latency_offset_ms":-300,"drift_ppm":-12.5,"browser":"Edge"}'
    )
    assert msg == Report(
        drift_ms=None,
        rtt_ms=3.0,
        output_latency_ms=21.3,
        latency_offset_ms=-300.0,
        drift_ppm=-12.5,
        browser="Edge",
    )


@pytest.mark.parametrize(
    "fields",
    [
        '"output_latency_ms":-1',
        '"output_latency_ms":10001',
        '"latency_offset_ms":-300.5',
        '"latency_offset_ms":1000.5',
        '"latency_offset_ms":"80"',
        '"drift_ppm":10001',
        '"drift_ppm":true',
        '"browser":""',
        '"browser":"a-very-long-browser-name-x"',
        '"browser":"<b>x</b>"',
        '"browser":"Chr\\u00f6me"',
        '"browser":42',
    ],
)
def test_report_refuses_bad_new_fields(fields: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client('{"type":"report","drift_ms":1,"rtt_ms":3,' + fields + "}")
    assert info.value.code == "bad_message"


def test_drift_ms_is_still_required() -> None:
    with pytest.raises(ProtocolError):
        decode_client('{"type":"report","rtt_ms":3}')


@pytest.mark.parametrize("offset", ["-301", "1001", "1e9", '"10"', "null"])
def test_set_latency_offset_refuses_out_of_range(offset: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client('{"type":"set_latency_offset","id":"x","offset_ms":' + offset + "}")
    assert info.value.code == "bad_message"


def test_set_latency_offset_and_resync_decode() -> None:
    assert decode_client('{"type":"set_latency_offset","id":"x","offset_ms":1000}') == (
        SetLatencyOffset(id="x", offset_ms=1000.0)
    )
    assert decode_client('{"type":"resync","id":"x"}') == Resync(id="x")


# -- the room: who may tune a device, and the lead --------------------------------


def room_of(*people: str, cohost: str | None = None) -> Room:
    room = Room("r")
    for pid in people:
        room.join(pid, pid, T0, role="cohost" if pid == cohost else None)
    return room


def test_host_and_cohost_tune_a_device_and_only_it_hears() -> None:
    room = room_of("h", "c", "l", cohost="c")
    assert room.handle("h", SetLatencyOffset(id="l", offset_ms=200.0), T0) == [
        Reply("l", "latency_offset", {"offset_ms": 200.0})
    ]
    assert room.handle("c", Resync(id="l"), T0) == [Reply("l", "resync", {})]
    assert room.handle("c", Resync(id="h"), T0) == [Reply("h", "resync", {})]


def test_a_listener_may_not_tune_anyone() -> None:
    room = room_of("h", "l", "m")
    version = room.version
    for msg in (SetLatencyOffset(id="m", offset_ms=5.0), Resync(id="h")):
        effects = room.handle("l", msg, T0)
        assert len(effects) == 1 and isinstance(effects[0], Error)
        assert effects[0].code == "not_host"
    assert room.version == version and room.lead_ms() == MIN_LEAD_MS


def test_tuning_an_unknown_device_is_refused() -> None:
    room = room_of("h", "l")
    for msg in (SetLatencyOffset(id="ghost", offset_ms=5.0), Resync(id="ghost")):
        assert room.handle("h", msg, T0) == [
            Error("h", "no_such_participant", "no participant with that id")
        ]


def test_the_lead_covers_the_largest_positive_offset() -> None:
    room = room_of("h", "a", "b")
    assert room.lead_ms() == MIN_LEAD_MS
    room.note_latency_offset("a", -300.0)  # plays later: needs no more lead
    assert room.lead_ms() == MIN_LEAD_MS
    room.note_latency_offset("a", 250.0)
    assert room.lead_ms() == MIN_LEAD_MS + 250.0
    room.handle("h", SetLatencyOffset(id="b", offset_ms=800.0), T0)
    assert room.lead_ms() == MIN_LEAD_MS + 800.0
    play = room.handle("h", SetLatencyOffset(id="b", offset_ms=100.0), T0)
    assert play and room.lead_ms() == MIN_LEAD_MS + 250.0  # the largest is a's again
    room.note_rtt("a", 5000.0)
    assert room.lead_ms() == MAX_LEAD_MS + 250.0
    room.leave("a", T0)
    assert room.lead_ms() == MIN_LEAD_MS + 100.0  # a's rtt and offset left with it
    room.note_latency_offset("b", 0.0)
    assert room.lead_ms() == MIN_LEAD_MS


def test_a_resumed_seat_keeps_its_offset_in_the_lead() -> None:
    room = Room("r")
    room.join("h", "h", T0, token="th")
    room.join("a", "a", T0, token="ta")
    room.note_latency_offset("a", 400.0)
    room.leave("a", T0)
    assert room.lead_ms() == MIN_LEAD_MS
    room.resume("ta", T0 + 10)
    assert room.lead_ms() == MIN_LEAD_MS + 400.0


def test_lead_ids_name_hosts_and_cohosts_only() -> None:
    room = room_of("h", "c", "l", cohost="c")
    assert sorted(room.lead_ids()) == ["c", "h"]
