"""A room's playback timeline: the track, its position at any server time, volume, lead (sans-IO).

Invariants (tests/test_timeline.py, tests/test_room_properties.py):

* Every change takes effect at a scheduled server time ``start_at`` that is
  never earlier than the ``start_at`` of the timeline it replaces, so the
  position is a continuous function of server time except at explicit seeks
  and track changes.
* ``position_at`` is never negative, nor past the track's known duration.
* A change that would change nothing (play while playing, pause while paused,
  the same volume) returns False and leaves the part exactly as it was; a
  change returns True. The room turns True into one broadcast state.
* The lead (how far ahead a change is scheduled) lies within
  [MIN_LEAD_MS, MAX_LEAD_MS], whatever the round trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

MIN_LEAD_MS = 150.0
MAX_LEAD_MS = 1000.0
LEAD_RTT_FACTOR = 1.5
LEAD_MARGIN_MS = 50.0
# Extra time granted when a new track starts playing at once, so that clients
# can fetch and decode it before the scheduled start.
TRACK_PRELOAD_LEAD_MS = 1000.0
MS_PER_SECOND = 1000.0
DEFAULT_VOLUME = 1.0


def lead_for_rtt(worst_rtt_ms: float | None) -> float:
    """How far ahead a change is scheduled when the worst round trip is ``worst_rtt_ms``."""
    worst = worst_rtt_ms if worst_rtt_ms is not None else 0.0
    return min(MAX_LEAD_MS, max(MIN_LEAD_MS, worst * LEAD_RTT_FACTOR + LEAD_MARGIN_MS))


@dataclass(frozen=True, slots=True)
class Track:
    url: str
    title: str
    duration: float | None

    def to_wire(self) -> dict[str, Any]:
        return {"url": self.url, "title": self.title, "duration": self.duration}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Track:
        return cls(d["url"], d["title"], d["duration"])


@dataclass(frozen=True, slots=True)
class Timeline:
    """Where playback is: ``position`` seconds at server time ``start_at`` ms."""

    paused: bool = True
    position: float = 0.0
    start_at: float = 0.0
    rate: float = 1.0

    def position_at(self, t_ms: float, duration: float | None = None) -> float:
        if self.paused or t_ms <= self.start_at:
            pos = self.position
        else:
            pos = self.position + (t_ms - self.start_at) / MS_PER_SECOND * self.rate
        if duration is not None:
            pos = min(pos, duration)
        return max(0.0, pos)


@dataclass(slots=True)
class Playback:
    """The timeline part of a room: what plays, from where, since when, how loud."""

    track: Track | None = None
    timeline: Timeline = field(default_factory=Timeline)
    volume: float = DEFAULT_VOLUME

    # -- queries -------------------------------------------------------------

    def position_at(self, t_ms: float) -> float:
        duration = self.track.duration if self.track else None
        return self.timeline.position_at(t_ms, duration)

    def track_end_at(self, min_seconds: float = 0.0) -> float | None:
        """Server time at which the track runs out, if playing with a known length
        of at least ``min_seconds`` (shorter ones just play out)."""
        t = self.timeline
        if self.track is None or self.track.duration is None or t.paused:
            return None
        if self.track.duration < min_seconds:
            return None
        return t.start_at + max(0.0, self.track.duration - t.position) * MS_PER_SECOND / t.rate

    def effective_time(self, now: float, lead_ms: float, extra_ms: float = 0.0) -> float:
        """When a change made at ``now`` takes effect: a lead ahead, never before the last one."""
        return max(now + lead_ms + extra_ms, self.timeline.start_at)

    def clamp(self, position: float) -> float:
        if self.track is not None and self.track.duration is not None:
            return min(max(0.0, position), self.track.duration)
        return max(0.0, position)

    # -- transitions (True: changed) -------------------------------------------

    def start(self, track: Track, at: float, *, autoplay: bool) -> bool:
        """``track`` from its beginning at ``at``: playing, or paused there."""
        self.track = track
        self.timeline = Timeline(paused=not autoplay, position=0.0, start_at=at)
        return True

    def set_track(self, track: Track, now: float, lead_ms: float, *, autoplay: bool) -> bool:
        extra = TRACK_PRELOAD_LEAD_MS if autoplay else 0.0
        return self.start(track, self.effective_time(now, lead_ms, extra), autoplay=autoplay)

    def play(self, position: float | None, now: float, lead_ms: float) -> bool:
        if not self.timeline.paused and position is None:
            return False
        at = self.effective_time(now, lead_ms)
        start = self.position_at(at) if position is None else self.clamp(position)
        self.timeline = Timeline(paused=False, position=start, start_at=at)
        return True

    def pause(self, now: float, lead_ms: float) -> bool:
        if self.timeline.paused:
            return False
        at = self.effective_time(now, lead_ms)
        self.timeline = Timeline(paused=True, position=self.position_at(at), start_at=at)
        return True

    def seek(self, position: float, now: float, lead_ms: float) -> bool:
        at = self.effective_time(now, lead_ms)
        self.timeline = replace(self.timeline, position=self.clamp(position), start_at=at)
        return True

    def settle_at_end(self, end: float) -> bool:
        """Nothing follows: paused at the track's end from ``end`` on."""
        duration = self.track.duration if self.track else None
        self.timeline = Timeline(paused=True, position=duration or 0.0, start_at=end)
        return True

    def set_volume(self, volume: float) -> bool:
        if volume == self.volume:
            return False
        self.volume = volume
        return True

    # -- the wire and the database -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        t = self.timeline
        return {
            "track": self.track.to_wire() if self.track else None,
            "paused": t.paused,
            "position": t.position,
            "start_at": t.start_at,
            "volume": self.volume,
            "rate": t.rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Playback:
        track = d.get("track")
        timeline = Timeline(
            paused=bool(d["paused"]),
            position=float(d["position"]),
            start_at=float(d["start_at"]),
            rate=float(d.get("rate", 1.0)),
        )
        return cls(Track.from_wire(track) if track else None, timeline, float(d["volume"]))
