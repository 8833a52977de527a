"""One room's state machine: participants, host election and the timeline (sans-IO).

Everything here is plain Python. Callers pass the server time ``now`` (epoch
milliseconds, from ``ServerClock``) and get back a list of effects to carry out;
nothing here touches a socket, a clock or trio.

Invariants (checked by the property tests in tests/test_room_properties.py):

* A room with participants in it has exactly one host. An empty room has none.
* ``version`` never decreases, and grows by exactly one with every change that
  is broadcast as a ``state``.
* A change to the timeline takes effect at a scheduled server time ``start_at``
  that is never earlier than the ``start_at`` of the timeline it replaces, so the
  position is a continuous function of server time except at explicit seeks.
* Only the host changes the room. A refused message changes nothing and yields
  exactly one ``Error`` effect addressed to its sender.

Errors are kept apart: a *remote* error (the client asked for something it may
not have) is an ``Error`` effect and the room carries on; a *local* error (the
caller broke this module's contract, e.g. an unknown participant id) raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .protocol import (
    ClaimHost,
    ClientMessage,
    Pause,
    Play,
    Seek,
    SetTrack,
    TransferHost,
    Volume,
)
from .urls import BadURL, validate_track_url

MIN_LEAD_MS = 150.0
MAX_LEAD_MS = 1000.0
LEAD_RTT_FACTOR = 1.5
LEAD_MARGIN_MS = 50.0
# Extra time granted when a new track starts playing at once, so that clients
# can fetch and decode it before the scheduled start.
TRACK_PRELOAD_LEAD_MS = 1000.0
PRESENCE_COALESCE_MS = 50.0
MS_PER_SECOND = 1000.0
DEFAULT_VOLUME = 1.0

HOST = "host"
LISTENER = "listener"


@dataclass(frozen=True)
class Track:
    url: str
    title: str
    duration: float | None

    def to_wire(self) -> dict[str, Any]:
        return {"url": self.url, "title": self.title, "duration": self.duration}


@dataclass(frozen=True)
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


@dataclass
class Participant:
    id: str
    name: str
    role: str
    seq: int
    rtt_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "role": self.role}


# -- effects ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send ``kind`` with ``payload`` to one participant."""

    to: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Error:
    to: str
    code: str
    message: str


@dataclass(frozen=True)
class BroadcastState:
    """The room state changed; send it to everyone (the newest one wins)."""

    state: dict[str, Any]


@dataclass(frozen=True)
class BroadcastPresence:
    delta: dict[str, Any]


Effect = Reply | Error | BroadcastState | BroadcastPresence


@dataclass
class _PresenceDelta:
    joined: dict[str, Participant] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)
    due_at: float | None = None

    def empty(self) -> bool:
        return not (self.joined or self.left or self.changed)


class Room:
    """The authoritative state of one room."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.track: Track | None = None
        self.timeline = Timeline()
        self.volume = DEFAULT_VOLUME
        self.version = 0
        self.participants: dict[str, Participant] = {}
        self._seq = 0
        self._presence = _PresenceDelta()

    # -- queries -----------------------------------------------------------

    @property
    def host_id(self) -> str | None:
        for p in self.participants.values():
            if p.role == HOST:
                return p.id
        return None

    def lead_ms(self) -> float:
        rtts = [p.rtt_ms for p in self.participants.values() if p.rtt_ms is not None]
        worst = max(rtts, default=0.0)
        return min(MAX_LEAD_MS, max(MIN_LEAD_MS, worst * LEAD_RTT_FACTOR + LEAD_MARGIN_MS))

    def position_at(self, t_ms: float) -> float:
        duration = self.track.duration if self.track else None
        return self.timeline.position_at(t_ms, duration)

    def state(self) -> dict[str, Any]:
        return {
            "track": self.track.to_wire() if self.track else None,
            "paused": self.timeline.paused,
            "position": self.timeline.position,
            "start_at": self.timeline.start_at,
            "volume": self.volume,
            "rate": self.timeline.rate,
            "version": self.version,
        }

    def next_deadline(self) -> float | None:
        """Server time at which ``poll`` has work to do, or None."""
        return self._presence.due_at

    # -- membership ----------------------------------------------------------

    def join(self, pid: str, name: str, now: float) -> list[Effect]:
        if pid in self.participants:
            raise ValueError(f"participant {pid!r} already in room {self.name!r}")
        self._seq += 1
        role = HOST if self.host_id is None and not self.participants else LISTENER
        p = Participant(pid, name, role, self._seq)
        self.participants[pid] = p
        self._note_joined(p, now)
        welcome = {
            "you": p.to_wire(),
            "room": self.state(),
            "room_name": self.name,
            "participants": [q.to_wire() for q in self.participants.values()],
            "server_time": now,
            "lead_ms": self.lead_ms(),
        }
        return [Reply(pid, "welcome", welcome)]

    def leave(self, pid: str, now: float) -> list[Effect]:
        p = self.participants.pop(pid)
        self._note_left(pid, now)
        if p.role == HOST and self.participants:
            heir = min(self.participants.values(), key=lambda q: q.seq)
            self._set_role(heir, HOST, now)
        return []

    def poll(self, now: float) -> list[Effect]:
        """Flush coalesced presence once its window has passed."""
        delta = self._presence
        if delta.due_at is None or now < delta.due_at:
            return []
        self._presence = _PresenceDelta()
        if delta.empty():
            return []
        left = set(delta.left)
        payload = {
            "joined": [p.to_wire() for p in delta.joined.values() if p.id not in left],
            "left": delta.left,
            "changed": [
                {"id": pid, "role": role} for pid, role in delta.changed.items() if pid not in left
            ],
            "count": len(self.participants),
        }
        return [BroadcastPresence(payload)]

    def _schedule_presence(self, now: float) -> None:
        if self._presence.due_at is None:
            self._presence.due_at = now + PRESENCE_COALESCE_MS

    def _note_joined(self, p: Participant, now: float) -> None:
        self._presence.joined[p.id] = p
        self._schedule_presence(now)

    def _note_left(self, pid: str, now: float) -> None:
        if self._presence.joined.pop(pid, None) is None:
            self._presence.left.append(pid)
        self._presence.changed.pop(pid, None)
        self._schedule_presence(now)

    def _set_role(self, p: Participant, role: str, now: float) -> None:
        p.role = role
        if p.id not in self._presence.joined:
            self._presence.changed[p.id] = role
        self._schedule_presence(now)

    # -- messages ------------------------------------------------------------

    def note_rtt(self, pid: str, rtt_ms: float) -> None:
        self.participants[pid].rtt_ms = rtt_ms

    def handle(self, pid: str, msg: ClientMessage, now: float) -> list[Effect]:
        """Apply one decoded control message from participant ``pid``."""
        sender = self.participants[pid]
        if isinstance(msg, ClaimHost):
            return self._claim(sender, now)
        if sender.role != HOST:
            return [Error(pid, "not_host", f"only the host may send {msg.TYPE}")]
        if isinstance(msg, TransferHost):
            return self._transfer(sender, msg.to, now)
        if isinstance(msg, SetTrack):
            return self._set_track(sender, msg, now)
        if isinstance(msg, Play):
            return self._play(msg.position, now)
        if isinstance(msg, Pause):
            return self._pause(now)
        if isinstance(msg, Seek):
            return self._seek(msg.position, now)
        if isinstance(msg, Volume):
            return self._set_volume(msg.volume)
        raise TypeError(f"not a control message: {msg!r}")

    def _claim(self, sender: Participant, now: float) -> list[Effect]:
        if sender.role == HOST:
            return []
        if self.host_id is not None:
            return [Error(sender.id, "host_exists", "the room already has a host")]
        self._set_role(sender, HOST, now)
        return []

    def _transfer(self, sender: Participant, to: str, now: float) -> list[Effect]:
        target = self.participants.get(to)
        if target is None:
            return [Error(sender.id, "no_such_participant", "no participant with that id")]
        if target is sender:
            return []
        self._set_role(sender, LISTENER, now)
        self._set_role(target, HOST, now)
        return []

    def _effective_time(self, now: float, extra_ms: float = 0.0) -> float:
        return max(now + self.lead_ms() + extra_ms, self.timeline.start_at)

    def _clamp(self, position: float) -> float:
        if self.track is not None and self.track.duration is not None:
            return min(max(0.0, position), self.track.duration)
        return max(0.0, position)

    def _commit(self, timeline: Timeline | None = None) -> list[Effect]:
        if timeline is not None:
            self.timeline = timeline
        self.version += 1
        return [BroadcastState(self.state())]

    def _set_track(self, sender: Participant, msg: SetTrack, now: float) -> list[Effect]:
        try:
            url = validate_track_url(msg.url)
        except BadURL as exc:
            return [Error(sender.id, "bad_url", str(exc))]
        title = msg.title.strip() if msg.title and msg.title.strip() else _title_from_url(url)
        self.track = Track(url, title, msg.duration)
        extra = TRACK_PRELOAD_LEAD_MS if msg.autoplay else 0.0
        at = self._effective_time(now, extra)
        return self._commit(Timeline(paused=not msg.autoplay, position=0.0, start_at=at))

    def _play(self, position: float | None, now: float) -> list[Effect]:
        if not self.timeline.paused and position is None:
            return []
        at = self._effective_time(now)
        start = self.position_at(at) if position is None else self._clamp(position)
        return self._commit(Timeline(paused=False, position=start, start_at=at))

    def _pause(self, now: float) -> list[Effect]:
        if self.timeline.paused:
            return []
        at = self._effective_time(now)
        return self._commit(Timeline(paused=True, position=self.position_at(at), start_at=at))

    def _seek(self, position: float, now: float) -> list[Effect]:
        at = self._effective_time(now)
        return self._commit(replace(self.timeline, position=self._clamp(position), start_at=at))

    def _set_volume(self, volume: float) -> list[Effect]:
        if volume == self.volume:
            return []
        self.volume = volume
        return self._commit()


def _title_from_url(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    stem = last.rsplit(".", 1)[0]
    return stem[:200] or "untitled"
