"""The timeline part on its own: scheduling, continuity, no-ops, lead maths, dict round trip."""

from __future__ import annotations

import json

import pytest

from musicsync.timeline import (
    MAX_LEAD_MS,
    MIN_LEAD_MS,
    TRACK_PRELOAD_LEAD_MS,
    Playback,
    Timeline,
    Track,
    lead_for_rtt,
)

T0 = 1_800_000_000_000.0
LEAD = 200.0
SONG = Track("/media/song.mp3", "Song", 60.0)


def playing(at: float = T0) -> Playback:
    p = Playback()
    p.set_track(SONG, at - LEAD, LEAD, autoplay=False)
    p.play(None, at - LEAD, LEAD)
    return p


@pytest.mark.parametrize(
    ("rtt", "lead"),
    [(None, MIN_LEAD_MS), (0.0, MIN_LEAD_MS), (100.0, 200.0), (5000.0, MAX_LEAD_MS)],
)
def test_lead_follows_the_worst_round_trip_within_bounds(rtt: float | None, lead: float) -> None:
    assert lead_for_rtt(rtt) == lead


def test_a_new_track_with_autoplay_gets_time_to_load() -> None:
    p = Playback()
    assert p.set_track(SONG, T0, LEAD, autoplay=True)
    assert p.timeline == Timeline(
        paused=False, position=0.0, start_at=T0 + LEAD + TRACK_PRELOAD_LEAD_MS
    )


def test_play_pause_play_is_continuous_and_no_ops_change_nothing() -> None:
    p = playing()
    before = (p.track, p.timeline, p.volume)
    assert not p.play(None, T0 + 1000, LEAD)  # already playing
    assert (p.track, p.timeline, p.volume) == before
    assert p.pause(T0 + 3000, LEAD)
    assert p.timeline == Timeline(paused=True, position=3.2, start_at=T0 + 3000 + LEAD)
    assert not p.pause(T0 + 4000, LEAD)
    assert p.play(None, T0 + 10_000, LEAD)
    assert p.position_at(T0 + 10_000 + LEAD) == pytest.approx(3.2)
    assert not p.set_volume(1.0)
    assert p.set_volume(0.5) and p.volume == 0.5


def test_changes_never_schedule_before_the_last_one() -> None:
    p = Playback()
    p.set_track(SONG, T0, 900.0, autoplay=False)  # a slow listener: scheduled far ahead
    p.seek(10.0, T0 + 1, LEAD)  # the lead dropped since: still not before the last change
    assert p.timeline.start_at == T0 + 900.0


def test_position_stays_within_the_track_and_seeks_are_clamped() -> None:
    p = playing()
    assert p.position_at(T0 + 3_600_000) == SONG.duration
    assert p.position_at(T0 - 10_000) == 0.0
    p.seek(1e9, T0, LEAD)
    assert p.timeline.position == SONG.duration
    assert p.track_end_at() == p.timeline.start_at
    p.seek(0.0, T0, LEAD)
    assert p.track_end_at(min_seconds=SONG.duration + 1) is None  # too short to schedule around


def test_settling_at_the_end_pauses_there() -> None:
    p = playing()
    end = p.track_end_at()
    assert end == T0 + 60_000
    p.settle_at_end(end)
    assert p.timeline == Timeline(paused=True, position=60.0, start_at=end)
    assert p.track_end_at() is None


@pytest.mark.parametrize("part", [Playback(), playing()])
def test_round_trips_through_a_plain_dict(part: Playback) -> None:
    d = json.loads(json.dumps(part.to_dict()))
    assert Playback.from_dict(d) == part
    assert Playback.from_dict(d).to_dict() == part.to_dict()
