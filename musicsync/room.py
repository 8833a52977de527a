"""One room's state machine: participants, host election and the timeline (sans-IO).

Everything here is plain Python. Callers pass the server time ``now`` (epoch
milliseconds, from ``ServerClock``) and get back a list of effects to carry out;
nothing here touches a socket, a clock or trio.

Invariants (checked by the property tests in tests/test_room_properties.py):

* A room has at most one host. A room with participants in it has exactly one
  host, except while the departed host's seat is held for its resume grace
  period (``host_reserved``); then it has none, and ``poll`` elects one when
  the grace period ends.
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

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .access import hash_token
from .protocol import (
    ClaimHost,
    ClientMessage,
    CreateInvite,
    Kick,
    Pause,
    Play,
    QueueAdd,
    QueueMode,
    QueueMove,
    QueueNext,
    QueueRemove,
    Resync,
    RevokeInvite,
    RoomSettingsUpdate,
    Seek,
    SetLatencyOffset,
    SetPassword,
    SetTrack,
    TransferHost,
    Volume,
)
from .ratelimit import TokenBucket
from .urls import BadURL, clean_title, validate_track_url

MIN_LEAD_MS = 150.0
MAX_LEAD_MS = 1000.0
LEAD_RTT_FACTOR = 1.5
LEAD_MARGIN_MS = 50.0
# Extra time granted when a new track starts playing at once, so that clients
# can fetch and decode it before the scheduled start.
TRACK_PRELOAD_LEAD_MS = 1000.0
PRESENCE_COALESCE_MS = 50.0
# Every presence flush costs one frame per participant, so big rooms flush
# less often: the window grows with the room (0.5 ms a head, at most 2 s),
# which bounds presence traffic to ~2000 frames/s however fast people come.
PRESENCE_MS_PER_PARTICIPANT = 0.5
PRESENCE_MAX_COALESCE_MS = 2000.0
# Past this many participants a room is a crowd: its welcome names the hosts,
# co-hosts and this many listeners, and presence names only hosts and co-hosts
# (and at most this many who left); ``count`` is always exact. Without it a
# festival room sends O(N) names to N clients on every join (O(N^2) bytes).
PARTICIPANT_LIST_MAX = 100
# The state that switches to the next queued track goes out this long before
# the current one ends, so every client has it (and the track) in time.
ADVANCE_NOTICE_MS = 4000.0
MAX_QUEUE_ITEMS = 500
# Tracks shorter than this never advance the queue by themselves (queue_next does).
MIN_ADVANCE_SECONDS = 0.5
MAX_INVITES = 100
# Control messages one room takes per second from all its senders together
# (each connection also has 10/s of its own); past it: rate_limited.
ROOM_CHANGES_PER_SECOND = 20.0
ROOM_CHANGE_BURST = 40.0
MS_PER_SECOND = 1000.0
DEFAULT_VOLUME = 1.0

# A participant who drops keeps their id, name and role for this long, so a
# reload or a network blip is not a hand-over.
RESUME_GRACE_MS = 30_000.0
# A kicked participant's token cannot rejoin for this long.
KICK_BAN_MS = 10 * 60_000.0

HOST = "host"
COHOST = "cohost"
LISTENER = "listener"
# Who may drive playback (play, pause, seek, volume, track, queue).
PLAYBACK_ROLES = (HOST, COHOST)


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
    # The device's own latency offset (ms, positive plays earlier), as it last
    # reported it or the host last set it: the lead covers the largest.
    latency_offset_ms: float = 0.0
    # access.hash_token of the resume token; the token itself is only ever sent
    # to its owner, in the welcome, and kept nowhere.
    token_hash: str | None = field(default=None, repr=False)

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
    """The room state changed; send it to everyone (the newest one wins).

    ``queue_rev`` grows when the queue changed: a client that already has this
    revision of the queue may get the state without it (a 500-item queue is
    1 MB; a volume change need not resend it).
    """

    state: dict[str, Any]
    queue_rev: int = 0


@dataclass(frozen=True)
class BroadcastPresence:
    delta: dict[str, Any]


Effect = Reply | Error | BroadcastState | BroadcastPresence


@dataclass(frozen=True)
class QueueItem:
    id: str
    track: Track
    added_by: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, **self.track.to_wire(), "added_by": self.added_by}


@dataclass
class RoomSettings:
    listeners_may_upload: bool = False


@dataclass(frozen=True)
class Invite:
    code: str
    role: str
    expires_at: float


@dataclass
class _Reservation:
    participant: Participant
    until: float


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

    def __init__(
        self,
        name: str,
        resume_grace_ms: float = RESUME_GRACE_MS,
        rng: random.Random | None = None,
        new_code: Callable[[], str] = lambda: secrets.token_urlsafe(16),
    ) -> None:
        self.name = name
        self.password_hash: str | None = None  # set by the edge, which does the hashing
        self.invites: dict[str, Invite] = {}
        self._new_code = new_code
        self.queue: list[QueueItem] = []
        self.repeat = "off"  # off | one | all
        self.shuffle = False
        self._rng = rng or random.Random()
        self._queue_seq = 0
        self.track: Track | None = None
        self.timeline = Timeline()
        self.volume = DEFAULT_VOLUME
        self.version = 0
        # Grows with every change that snapshot() covers (state, seats, bans,
        # invites, password), broadcast or not: the edge persists when it moved.
        self.revision = 0
        self.settings = RoomSettings()
        self.participants: dict[str, Participant] = {}
        self.resume_grace_ms = resume_grace_ms
        # Held seats by token hash, in the order they fall due (a leave adds one
        # at now + grace, so insertion order is deadline order); bans likewise.
        self._reserved: dict[str, _Reservation] = {}
        self._banned: dict[str, float] = {}  # token hash -> until
        # Indexes that keep a crowd's joins O(1): seated participants by token
        # hash, hosts and co-hosts, held seats of hosts and co-hosts, and who
        # has the worst round trip (the scheduling lead follows it).
        self._by_hash: dict[str, Participant] = {}
        self._leads: dict[str, Participant] = {}
        self._reserved_leads: dict[str, _Reservation] = {}
        self._worst_rtt: tuple[float, str] | None = None
        self._max_offset: tuple[float, str] | None = None  # the largest positive offset
        self._seq = 0
        self._presence = _PresenceDelta()
        # Changes the whole room may take, whoever sends them: every connection has
        # its own budget, but many co-hosts of one room must not flood its fan-out.
        self._changes = TokenBucket(ROOM_CHANGES_PER_SECOND, ROOM_CHANGE_BURST)
        # Which queue the last broadcast carried (see BroadcastState.queue_rev).
        self.queue_rev = 0
        self._queue_key: tuple[str, ...] = ()

    # -- queries -----------------------------------------------------------

    @property
    def host_id(self) -> str | None:
        for p in self._leads.values():
            if p.role == HOST:
                return p.id
        return None

    @property
    def host_reserved(self) -> bool:
        return any(r.participant.role == HOST for r in self._reserved_leads.values())

    def participant_for_token(self, token: str) -> Participant | None:
        return self._participant_for_hash(hash_token(token))

    def _participant_for_hash(self, token_hash: str) -> Participant | None:
        return self._by_hash.get(token_hash)

    def holds_seat(self, token: str) -> bool:
        """True for the token of someone seated now or within their resume grace."""
        token_hash = hash_token(token)
        return token_hash in self._reserved or self._participant_for_hash(token_hash) is not None

    def valid_invite(self, code: str, now: float) -> Invite | None:
        invite = self.invites.get(code)
        return invite if invite is not None and now < invite.expires_at else None

    def admission(
        self, now: float, token: str | None = None, invite: str | None = None
    ) -> tuple[bool, str | None]:
        """(may enter without a password, role an invite grants) for a new connection."""
        granted = self.valid_invite(invite, now) if invite else None
        role = granted.role if granted else None
        if self.password_hash is None or granted is not None:
            return True, role
        return bool(token and self.holds_seat(token)), role

    def set_password_hash(self, pid: str, password_hash: str | None) -> list[Effect]:
        """The host protects the room (a salted hash made by the edge) or opens it."""
        sender = self.participants.get(pid)
        if sender is None or sender.role != HOST:
            return [Error(pid, "not_host", "only the host may set the password")]
        self.password_hash = password_hash
        return self._commit()

    def is_banned(self, token: str, now: float) -> bool:
        until = self._banned.get(hash_token(token))
        return until is not None and now < until

    def lead_ms(self) -> float:
        """The RTT-derived lead plus the largest positive device offset: a device that
        plays that much earlier (a Bluetooth speaker) must still hear of a change in time."""
        worst = self._worst_rtt[0] if self._worst_rtt is not None else 0.0
        lead = min(MAX_LEAD_MS, max(MIN_LEAD_MS, worst * LEAD_RTT_FACTOR + LEAD_MARGIN_MS))
        return lead + (self._max_offset[0] if self._max_offset is not None else 0.0)

    def lead_ids(self) -> list[str]:
        """The seated hosts and co-hosts (from the index: O(leads), not O(participants))."""
        return list(self._leads)

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
            "settings": {
                "listeners_may_upload": self.settings.listeners_may_upload,
                "protected": self.password_hash is not None,
            },
            "queue": [item.to_wire() for item in self.queue],
            "repeat": self.repeat,
            "shuffle": self.shuffle,
        }

    def track_end_at(self) -> float | None:
        """Server time at which the current track runs out, if playing with a known length."""
        t = self.timeline
        if self.track is None or self.track.duration is None or t.paused:
            return None
        if self.track.duration < MIN_ADVANCE_SECONDS:
            return None  # too short to schedule around: it just plays out
        return t.start_at + max(0.0, self.track.duration - t.position) * MS_PER_SECOND / t.rate

    def _advance_due_at(self) -> float | None:
        end = self.track_end_at()
        if end is None or self.track is None or self.track.duration is None:
            return None
        if self.queue or self.repeat != "off":
            # A short track is announced half-way through, so that each advance
            # lands in the future and a tiny looping track cannot spin the timer.
            half = self.track.duration * MS_PER_SECOND / 2
            return end - min(ADVANCE_NOTICE_MS, half)
        return end  # nothing follows: settle into "paused at the end" then

    def next_deadline(self) -> float | None:
        """Server time at which ``poll`` has work to do, or None."""
        times = [next(iter(self._reserved.values())).until] if self._reserved else []
        if self._presence.due_at is not None:
            times.append(self._presence.due_at)
        advance = self._advance_due_at()
        if advance is not None:
            times.append(advance)
        return min(times, default=None)

    # -- persistence -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a restart, as plain JSON-able data."""
        if self._crowded():
            held = (r.participant for r in self._reserved_leads.values())
            seats = [*self._leads.values(), *held]
        else:
            held = (r.participant for r in self._reserved.values())
            seats = [*self.participants.values(), *held]
        return {
            "state": self.state(),
            "queue_seq": self._queue_seq,
            "seq": self._seq,
            # hashes only (access.hash_token): the database holds no live token
            "seats": [
                {
                    "id": p.id,
                    "name": p.name,
                    "role": p.role,
                    "seq": p.seq,
                    "token_hash": p.token_hash,
                }
                for p in seats
                if p.token_hash is not None
            ],
            "banned_hashes": self._banned,
            "password_hash": self.password_hash,
            "invites": {
                code: {"role": inv.role, "expires_at": inv.expires_at}
                for code, inv in self.invites.items()
            },
        }

    @classmethod
    def restore(
        cls,
        name: str,
        snap: dict[str, Any],
        now: float,
        resume_grace_ms: float = RESUME_GRACE_MS,
        rng: random.Random | None = None,
    ) -> Room:
        """A room from ``snapshot()``. Everyone who was in it gets a held seat."""
        room = cls(name, resume_grace_ms=resume_grace_ms, rng=rng)
        state = snap["state"]
        track = state.get("track")
        room.track = Track(track["url"], track["title"], track["duration"]) if track else None
        room.timeline = Timeline(
            paused=bool(state["paused"]),
            position=float(state["position"]),
            start_at=float(state["start_at"]),
            rate=float(state.get("rate", 1.0)),
        )
        room.volume = float(state["volume"])
        room.version = int(state["version"])
        saved = state.get("settings", {})
        room.settings = RoomSettings(listeners_may_upload=bool(saved.get("listeners_may_upload")))
        room.password_hash = snap.get("password_hash")
        room.invites = {
            code: Invite(code, inv["role"], float(inv["expires_at"]))
            for code, inv in snap.get("invites", {}).items()
        }
        room.queue = [
            QueueItem(q["id"], Track(q["url"], q["title"], q["duration"]), q["added_by"])
            for q in state.get("queue", [])
        ]
        room.repeat = state.get("repeat", "off")
        room.shuffle = bool(state.get("shuffle", False))
        room._queue_seq = int(snap.get("queue_seq", 0))
        room._seq = int(snap.get("seq", 0))
        # Snapshots from before token hashing hold plain tokens ("banned", and
        # "token" in seats): hash them now, so that they too resume and stay banned.
        room._banned = {hash_token(str(k)): float(v) for k, v in snap.get("banned", {}).items()}
        room._banned.update((str(k), float(v)) for k, v in snap.get("banned_hashes", {}).items())
        room._banned = dict(sorted(room._banned.items(), key=lambda item: item[1]))  # due order
        grace = max(resume_grace_ms, 0.0)
        for seat in snap.get("seats", []):
            token_hash = seat.get("token_hash")
            if token_hash is None and seat.get("token") is not None:
                token_hash = hash_token(str(seat["token"]))
            if token_hash is None:
                continue
            p = Participant(
                seat["id"], seat["name"], seat["role"], seat["seq"], token_hash=str(token_hash)
            )
            room._hold(str(token_hash), _Reservation(p, now + grace))
        return room

    # -- membership ----------------------------------------------------------

    def join(
        self, pid: str, name: str, now: float, token: str | None = None, role: str | None = None
    ) -> list[Effect]:
        """A new participant. ``role`` (co-host, from an invite) is a floor, not a grant of host."""
        if pid in self.participants:
            raise ValueError(f"participant {pid!r} already in room {self.name!r}")
        self._seq += 1
        if self.host_id is None and not self.host_reserved and not self.participants:
            role = HOST
        elif role != COHOST:
            role = LISTENER
        token_hash = hash_token(token) if token is not None else None
        p = Participant(pid, name, role, self._seq, token_hash=token_hash)
        self._seat(p)
        self._note_joined(p, now)
        return [self._welcome(p, now, token)]

    def resume(self, token: str, now: float) -> list[Effect] | None:
        """Seat a participant again by their token: same id, name and role.

        None when the token names no held seat (expired, unknown or banned);
        the caller then joins them as someone new. A token whose owner is still
        connected (a second tab, or a reconnect the server has not noticed the
        drop of yet) must be released with ``leave`` by the caller first.
        """
        token_hash = hash_token(token)
        if token_hash not in self._reserved or self.is_banned(token, now):
            return None
        p = self._release(token_hash).participant  # keeps its seniority (seq)
        if p.role == HOST and self.host_id is not None:
            p.role = LISTENER  # someone claimed it meanwhile
        self._seat(p)
        self._note_joined(p, now)
        return [self._welcome(p, now, token)]

    def _welcome(self, p: Participant, now: float, token: str | None) -> Reply:
        you = p.to_wire()
        if token is not None:
            you["token"] = token  # to its owner only; the room keeps its hash
        welcome = {
            "you": you,
            "room": self.state(),
            "room_name": self.name,
            "participants": self._listed_participants(),
            "participant_count": len(self.participants),
            "server_time": now,
            "lead_ms": self.lead_ms(),
        }
        return Reply(p.id, "welcome", welcome)

    def _crowded(self) -> bool:
        return len(self.participants) > PARTICIPANT_LIST_MAX

    def _listed_participants(self) -> list[dict[str, Any]]:
        """Everyone in a small room; in a crowd, hosts and co-hosts and the
        first ``PARTICIPANT_LIST_MAX`` listeners (a welcome stays small)."""
        if not self._crowded():
            return [q.to_wire() for q in self.participants.values()]
        listeners = (q for q in self.participants.values() if q.role == LISTENER)
        some = [q for q, _ in zip(listeners, range(PARTICIPANT_LIST_MAX), strict=False)]
        return [q.to_wire() for q in (*self._leads.values(), *some)]

    # -- the indexes ----------------------------------------------------------

    def _seat(self, p: Participant) -> None:
        self.participants[p.id] = p
        if p.token_hash is not None:
            self._by_hash[p.token_hash] = p
        if p.role != LISTENER:
            self._leads[p.id] = p
        if p.rtt_ms is not None:
            self.note_rtt(p.id, p.rtt_ms)
        self._index_offset(p)

    def _unseat(self, pid: str) -> Participant:
        p = self.participants.pop(pid)
        if p.token_hash is not None:
            self._by_hash.pop(p.token_hash, None)
        self._leads.pop(pid, None)
        if self._worst_rtt is not None and self._worst_rtt[1] == pid:
            self._find_worst_rtt()
        if self._max_offset is not None and self._max_offset[1] == pid:
            self._find_max_offset()
        return p

    def _hold(self, token_hash: str, reservation: _Reservation) -> None:
        self._reserved.pop(token_hash, None)  # a re-hold moves to the end (its new deadline)
        self._reserved[token_hash] = reservation
        if reservation.participant.role != LISTENER:
            self._reserved_leads[token_hash] = reservation

    def _release(self, token_hash: str) -> _Reservation:
        self._reserved_leads.pop(token_hash, None)
        return self._reserved.pop(token_hash)

    def _find_worst_rtt(self) -> None:
        rtts = ((p.rtt_ms, p.id) for p in self.participants.values() if p.rtt_ms is not None)
        self._worst_rtt = max(rtts, default=None)

    def _index_offset(self, p: Participant) -> None:
        best = self._max_offset
        if p.latency_offset_ms > 0 and (best is None or p.latency_offset_ms >= best[0]):
            self._max_offset = (p.latency_offset_ms, p.id)

    def _find_max_offset(self) -> None:
        offsets = (
            (p.latency_offset_ms, p.id)
            for p in self.participants.values()
            if p.latency_offset_ms > 0
        )
        self._max_offset = max(offsets, default=None)

    def leave(self, pid: str, now: float, *, hold: bool = True) -> list[Effect]:
        """``pid`` is gone. With a token and ``hold``, their seat waits for ``resume``."""
        p = self._unseat(pid)
        self._note_left(p, now)
        if hold and p.token_hash is not None and self.resume_grace_ms > 0:
            self._hold(p.token_hash, _Reservation(p, now + self.resume_grace_ms))
        elif p.role == HOST:
            self._elect(now)
        return []

    def _elect(self, now: float) -> None:
        if self.host_id is None and not self.host_reserved and self.participants:
            heir = min(self.participants.values(), key=lambda q: q.seq)
            self._set_role(heir, HOST, now)

    def poll(self, now: float) -> list[Effect]:
        """Advance the queue, expire held seats, flush coalesced presence."""
        effects = self._maybe_advance(now)
        # Both are in deadline order: stop at the first that is not due.
        while self._reserved:
            token, reservation = next(iter(self._reserved.items()))
            if now < reservation.until:
                break
            self.revision += 1
            self._release(token)
            if reservation.participant.role == HOST:
                self._elect(now)
        while self._banned:
            token, until = next(iter(self._banned.items()))
            if now < until:
                break
            self.revision += 1
            del self._banned[token]
        delta = self._presence
        if delta.due_at is None or now < delta.due_at:
            return effects
        self._presence = _PresenceDelta()
        if delta.empty():
            return effects
        left = set(delta.left) - set(delta.joined)  # a resumed seat is back, not gone
        joined = list(delta.joined.values())
        gone = [pid for pid in delta.left if pid in left]
        if self._crowded():
            # A crowd hears of hosts and co-hosts by name, of listeners by count.
            joined = [p for p in joined if p.role != LISTENER]
            gone = gone[:PARTICIPANT_LIST_MAX]
        payload = {
            "joined": [p.to_wire() for p in joined],
            "left": gone,
            "changed": [
                {"id": pid, "role": role} for pid, role in delta.changed.items() if pid not in left
            ],
            "count": len(self.participants),
        }
        return [*effects, BroadcastPresence(payload)]

    def presence_window_ms(self) -> float:
        scaled = len(self.participants) * PRESENCE_MS_PER_PARTICIPANT
        return min(PRESENCE_MAX_COALESCE_MS, max(PRESENCE_COALESCE_MS, scaled))

    def _schedule_presence(self, now: float) -> None:
        if self._presence.due_at is None:
            self._presence.due_at = now + self.presence_window_ms()

    def _keeps_seat(self, p: Participant) -> bool:
        """Whether ``p``'s seat is durable: hosts' and co-hosts' always; a listener's
        unless the room is a crowd, whose listeners rejoin afresh after a restart
        (10 000 seats rewritten on every join would make filling a room O(N^2))."""
        return p.role != LISTENER or not self._crowded()

    def _note_joined(self, p: Participant, now: float) -> None:
        if self._keeps_seat(p):
            self.revision += 1
        self._presence.joined[p.id] = p
        self._schedule_presence(now)

    def _note_left(self, p: Participant, now: float) -> None:
        # Even a join from this same window is reported as left: whoever got a
        # welcome in between already knows the participant.
        pid = p.id
        if self._keeps_seat(p):
            self.revision += 1
        self._presence.joined.pop(pid, None)
        if pid not in self._presence.left:
            self._presence.left.append(pid)
        self._presence.changed.pop(pid, None)
        self._schedule_presence(now)

    def _set_role(self, p: Participant, role: str, now: float) -> None:
        self.revision += 1
        p.role = role
        if role == LISTENER:
            self._leads.pop(p.id, None)
        elif p.id in self.participants:
            self._leads[p.id] = p
        if p.id not in self._presence.joined:
            self._presence.changed[p.id] = role
        self._schedule_presence(now)

    # -- messages ------------------------------------------------------------

    def note_rtt(self, pid: str, rtt_ms: float) -> None:
        self.participants[pid].rtt_ms = rtt_ms
        worst = self._worst_rtt
        if worst is None or rtt_ms >= worst[0]:
            self._worst_rtt = (rtt_ms, pid)
        elif worst[1] == pid:  # the worst link got better: who is worst now?
            self._find_worst_rtt()

    def note_latency_offset(self, pid: str, offset_ms: float) -> None:
        """``pid``'s device offset (its report, or the host's set_latency_offset). O(1)
        unless the largest offset in the room shrinks."""
        p = self.participants[pid]
        if p.latency_offset_ms == offset_ms:
            return
        p.latency_offset_ms = offset_ms
        best = self._max_offset
        if best is not None and best[1] == pid and offset_ms < best[0]:
            self._find_max_offset()
        else:
            self._index_offset(p)

    def handle(self, pid: str, msg: ClientMessage, now: float) -> list[Effect]:
        """Apply one decoded control message from participant ``pid``."""
        sender = self.participants[pid]
        if isinstance(msg, ClaimHost):
            return self._claim(sender, now)
        if isinstance(msg, QueueAdd) and (
            sender.role in PLAYBACK_ROLES or self.settings.listeners_may_upload
        ):
            if not self._changes.try_take(now / MS_PER_SECOND):
                return [
                    Error(pid, "rate_limited", "this room is changing too fast; try again soon")
                ]
            return self.queue_add(sender, msg, now)
        if sender.role not in PLAYBACK_ROLES:
            return [Error(pid, "not_host", f"only the host may send {msg.TYPE}")]
        if isinstance(msg, (SetLatencyOffset, Resync)):
            return self._tune_device(sender, msg)  # one frame to one device: no room budget
        refused = self._over_budget(pid, now)
        if refused:
            return refused
        if isinstance(msg, Kick):
            return self.kick(pid, msg.id, now)
        if (
            isinstance(msg, (TransferHost, RoomSettingsUpdate, CreateInvite, RevokeInvite))
            and sender.role != HOST
        ):
            return [Error(pid, "not_host", f"only the host may send {msg.TYPE}")]
        if isinstance(msg, TransferHost):
            return self._transfer(sender, msg.to, now)
        if isinstance(msg, RoomSettingsUpdate):
            return self._update_settings(msg)
        if isinstance(msg, CreateInvite):
            return self._create_invite(sender, msg, now)
        if isinstance(msg, RevokeInvite):
            return self._revoke_invite(sender, msg.code)
        if isinstance(msg, SetPassword):
            raise TypeError("set_password needs hashing at the edge: use set_password_hash")
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
        if isinstance(msg, QueueRemove):
            return self._queue_remove(sender, msg.item)
        if isinstance(msg, QueueMove):
            return self._queue_move(sender, msg.item, msg.index)
        if isinstance(msg, QueueNext):
            return self._queue_next(sender, now)
        if isinstance(msg, QueueMode):
            return self._queue_mode(msg)
        raise TypeError(f"not a control message: {msg!r}")

    def _over_budget(self, pid: str, now: float) -> list[Effect]:
        """[] while the room may change, else the refusal (the room's own budget)."""
        if self._changes.try_take(now / MS_PER_SECOND):
            return []
        return [Error(pid, "rate_limited", "this room is changing too fast; try again soon")]

    def _tune_device(self, sender: Participant, msg: SetLatencyOffset | Resync) -> list[Effect]:
        """A host or co-host sets a device's offset or has it resync; only the device hears."""
        if msg.id not in self.participants:
            return [Error(sender.id, "no_such_participant", "no participant with that id")]
        if isinstance(msg, Resync):
            return [Reply(msg.id, "resync", {})]
        self.note_latency_offset(msg.id, msg.offset_ms)  # the lead covers it at once
        return [Reply(msg.id, "latency_offset", {"offset_ms": msg.offset_ms})]

    def _claim(self, sender: Participant, now: float) -> list[Effect]:
        if sender.role == HOST:
            return []
        if self.host_id is not None:
            return [Error(sender.id, "host_exists", "the room already has a host")]
        if self.host_reserved:
            return [Error(sender.id, "host_exists", "the host is reconnecting")]
        self._set_role(sender, HOST, now)
        return []

    def _transfer(self, sender: Participant, to: str, now: float) -> list[Effect]:
        target = self.participants.get(to)
        if target is None:
            return [Error(sender.id, "no_such_participant", "no participant with that id")]
        if target is sender:
            return []
        self._set_role(sender, COHOST if target.role == COHOST else LISTENER, now)
        self._set_role(target, HOST, now)
        return []

    def kick(self, pid: str, target_id: str, now: float) -> list[Effect]:
        """The host removes ``target_id``; its token may not come back for a while.

        On success the caller must close the target's connection; the returned
        list then holds a ``Reply(target, "kicked")`` marker.
        """
        sender = self.participants[pid]
        if sender.role != HOST:
            return [Error(pid, "not_host", "only the host may kick")]
        target = self.participants.get(target_id)
        if target is None or target is sender:
            return [Error(pid, "no_such_participant", "no other participant with that id")]
        if target.token_hash is not None:
            self.revision += 1
            self._banned.pop(target.token_hash, None)  # re-banned: moves to the end
            self._banned[target.token_hash] = now + KICK_BAN_MS
        self.leave(target_id, now, hold=False)
        return [Reply(target_id, "kicked", {})]

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
        self.revision += 1
        queue_key = tuple(item.id for item in self.queue)  # ids are never reused
        if queue_key != self._queue_key:
            self._queue_key = queue_key
            self.queue_rev += 1
        return [BroadcastState(self.state(), self.queue_rev)]

    def _set_track(self, sender: Participant, msg: SetTrack, now: float) -> list[Effect]:
        try:
            url = validate_track_url(msg.url)
        except BadURL as exc:
            return [Error(sender.id, "bad_url", str(exc))]
        title = clean_title(msg.title) or _title_from_url(url)
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

    # -- queue ---------------------------------------------------------------

    def queue_add(
        self, sender: Participant, msg: QueueAdd, now: float, resolved: Track | None = None
    ) -> list[Effect]:
        """Queue ``msg.url`` (or ``resolved``, a library track the edge looked up)."""
        if resolved is None:
            if msg.url is None:
                code = "no_such_track" if msg.track_id else "bad_message"
                return [Error(sender.id, code, "queue_add needs a url or a known track_id")]
            try:
                url = validate_track_url(msg.url)
            except BadURL as exc:
                return [Error(sender.id, "bad_url", str(exc))]
            title = clean_title(msg.title) or _title_from_url(url)
            resolved = Track(url, title, msg.duration)
        if len(self.queue) >= MAX_QUEUE_ITEMS:
            return [Error(sender.id, "queue_full", f"the queue holds {MAX_QUEUE_ITEMS} tracks")]
        self._queue_seq += 1
        item = QueueItem(f"q{self._queue_seq}", resolved, sender.name)
        if msg.next:
            self.queue.insert(0, item)
        else:
            self.queue.append(item)
        if self.track is None:  # an empty room: the first track becomes current, paused
            return self._start_next(now, autoplay=False)
        return self._commit()

    def _find_item(self, item_id: str) -> int | None:
        return next((i for i, item in enumerate(self.queue) if item.id == item_id), None)

    def _queue_remove(self, sender: Participant, item_id: str) -> list[Effect]:
        index = self._find_item(item_id)
        if index is None:
            return [Error(sender.id, "no_such_item", "no queue item with that id")]
        del self.queue[index]
        return self._commit()

    def _queue_move(self, sender: Participant, item_id: str, to: int) -> list[Effect]:
        index = self._find_item(item_id)
        if index is None:
            return [Error(sender.id, "no_such_item", "no queue item with that id")]
        item = self.queue.pop(index)
        self.queue.insert(min(to, len(self.queue)), item)
        return self._commit()

    def _queue_next(self, sender: Participant, now: float) -> list[Effect]:
        if not self.queue and not (self.repeat == "all" and self.track is not None):
            return [Error(sender.id, "queue_empty", "nothing is queued")]
        return self._start_next(now, autoplay=True, skipping=True)

    def _queue_mode(self, msg: QueueMode) -> list[Effect]:
        repeat = self.repeat if msg.repeat is None else msg.repeat
        shuffle = self.shuffle if msg.shuffle is None else msg.shuffle
        if (repeat, shuffle) == (self.repeat, self.shuffle):
            return []
        self.repeat, self.shuffle = repeat, shuffle
        return self._commit()

    def _pick_next(self, skipping: bool) -> Track | None:
        """Take the track that follows the current one, honouring repeat and shuffle."""
        current = self.track
        if self.repeat == "one" and current is not None and not skipping:
            return current
        if self.repeat == "all" and current is not None:
            self._queue_seq += 1
            self.queue.append(QueueItem(f"q{self._queue_seq}", current, "repeat"))
        if not self.queue:
            return None
        index = self._rng.randrange(len(self.queue)) if self.shuffle else 0
        if self.repeat == "all" and self.shuffle and len(self.queue) > 1:
            index = self._rng.randrange(len(self.queue) - 1)  # not the one just played
        return self.queue.pop(index).track

    def _start_next(
        self, now: float, autoplay: bool, skipping: bool = False, at: float | None = None
    ) -> list[Effect]:
        track = self._pick_next(skipping)
        if track is None:
            return []
        self.track = track
        if at is None:
            extra = TRACK_PRELOAD_LEAD_MS if autoplay else 0.0
            at = max(now + self.lead_ms() + extra, self.timeline.start_at)
        return self._commit(Timeline(paused=not autoplay, position=0.0, start_at=at))

    def _maybe_advance(self, now: float) -> list[Effect]:
        """At the advance time, schedule the next track to start exactly when this one ends."""
        due = self._advance_due_at()
        end = self.track_end_at()
        if due is None or end is None or now < due:
            return []
        effects = self._start_next(now, autoplay=True, at=end)
        if effects:
            return effects
        duration = self.track.duration if self.track else None
        return self._commit(Timeline(paused=True, position=duration or 0.0, start_at=end))

    def _create_invite(self, sender: Participant, msg: CreateInvite, now: float) -> list[Effect]:
        for code, invite in list(self.invites.items()):
            if now >= invite.expires_at:
                self.revision += 1
                del self.invites[code]
        if len(self.invites) >= MAX_INVITES:
            return [Error(sender.id, "too_many_invites", f"at most {MAX_INVITES} live invites")]
        invite = Invite(self._new_code(), msg.role, now + msg.expires_in * MS_PER_SECOND)
        self.invites[invite.code] = invite
        self.revision += 1
        payload = {
            "code": invite.code,
            "role": invite.role,
            "expires_at": invite.expires_at,
            "url": f"/r/{self.name}?invite={invite.code}",
        }
        return [Reply(sender.id, "invite", payload)]

    def _revoke_invite(self, sender: Participant, code: str) -> list[Effect]:
        if self.invites.pop(code, None) is None:
            return [Error(sender.id, "no_such_invite", "no live invite with that code")]
        self.revision += 1
        return [Reply(sender.id, "invite_revoked", {"code": code})]

    def _update_settings(self, msg: RoomSettingsUpdate) -> list[Effect]:
        if msg.listeners_may_upload is None:
            return []
        self.settings = replace(self.settings, listeners_may_upload=msg.listeners_may_upload)
        return self._commit()

    def _set_volume(self, volume: float) -> list[Effect]:
        if volume == self.volume:
            return []
        self.volume = volume
        return self._commit()


def _title_from_url(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    stem = last.rsplit(".", 1)[0]
    return clean_title(stem) or "untitled"  # %-escapes may decode to control characters
