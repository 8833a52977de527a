"""One room as a value: four pure parts behind the facade the hub drives (sans-IO).

Everything here is plain Python. Callers pass the server time ``now`` (epoch
milliseconds, from ``ServerClock``) and get back a list of effects to carry out
(effects.py); nothing here touches a socket, a clock or trio.

The parts, each in its own module with its own invariants, tests and dict form:

=============  ===========================================================
``playback``   timeline.Playback: the track, the timeline, the volume
``playqueue``  playqueue.PlayQueue: what follows, repeat and shuffle
``seats``      seats.Seats: participants, roles, held seats, presence
``gate``       gate.Gate: password hash, invites, bans, listener rights
=============  ===========================================================

The room owns what ties them together:

* ``version``, shared by every part: it grows by exactly one with every
  change that is broadcast as a ``state`` (``_commit``), and never decreases.
* ``PERMISSIONS``: which role may send which message, the one place that
  says so; ``TRANSITIONS``: which transition a message runs. ``handle`` looks
  both up, then takes the room's change budget, then runs the transition.
* Only the roles PERMISSIONS names change the room. A refused message changes
  nothing and yields exactly one ``Error`` effect addressed to its sender.
* ``revision`` grows with every change ``snapshot()`` covers, broadcast or
  not (seats, invites, bans too): the edge persists whenever it moved.
* ``Room.restore(room.snapshot())`` behaves as the room did (same ``state()``,
  same ``next_deadline()``), except that everyone seated holds a seat instead.

Errors are kept apart: a *remote* error (the client asked for something it may
not have) is an ``Error`` effect and the room carries on (parts raise
``Refusal`` before they change anything); a *local* error (the caller broke
this module's contract, e.g. an unknown participant id) raises.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .access import hash_token
from .calibration import (
    CALIBRATION_PREPARE_MS,
    TICK_MODE_MAX_MS,
    TICK_PERIOD_MS,
    Calibration,
    schedule,
)
from .effects import (
    CLOSE_KICKED,
    BroadcastPresence,
    BroadcastState,
    Disconnect,
    Effect,
    Error,
    Refusal,
    Reply,
)
from .gate import KICK_BAN_MS, MAX_INVITES, Gate, Invite, RoomSettings, new_invite_code
from .playqueue import (
    ADVANCE_NOTICE_MS,
    MAX_QUEUE_ITEMS,
    MIN_ADVANCE_SECONDS,
    PlayQueue,
    QueueItem,
)
from .protocol import (
    MAX_CALIBRATION_DEVICES,
    Calibrate,
    CalibrationResult,
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
    TickMode,
    TransferHost,
    Volume,
)
from .ratelimit import TokenBucket
from .seats import (
    COHOST,
    HOST,
    LISTENER,
    PARTICIPANT_LIST_MAX,
    PRESENCE_COALESCE_MS,
    PRESENCE_MAX_COALESCE_MS,
    PRESENCE_MS_PER_PARTICIPANT,
    RESUME_GRACE_MS,
    Participant,
    Reservation,
    Seats,
)
from .timeline import (
    DEFAULT_VOLUME,
    LEAD_MARGIN_MS,
    LEAD_RTT_FACTOR,
    MAX_LEAD_MS,
    MIN_LEAD_MS,
    MS_PER_SECOND,
    TRACK_PRELOAD_LEAD_MS,
    Playback,
    Timeline,
    Track,
    lead_for_rtt,
)
from .urls import BadURL, clean_title, validate_track_url

__all__ = [
    "ADVANCE_NOTICE_MS",
    "CLOSE_KICKED",
    "COHOST",
    "DEFAULT_VOLUME",
    "HOST",
    "KICK_BAN_MS",
    "LEAD_MARGIN_MS",
    "LEAD_RTT_FACTOR",
    "LISTENER",
    "MAX_INVITES",
    "MAX_LEAD_MS",
    "MAX_QUEUE_ITEMS",
    "MIN_ADVANCE_SECONDS",
    "MIN_LEAD_MS",
    "MS_PER_SECOND",
    "PARTICIPANT_LIST_MAX",
    "PERMISSIONS",
    "PLAYBACK_ROLES",
    "PRESENCE_COALESCE_MS",
    "PRESENCE_MAX_COALESCE_MS",
    "PRESENCE_MS_PER_PARTICIPANT",
    "RESUME_GRACE_MS",
    "ROOM_CHANGES_PER_SECOND",
    "ROOM_CHANGE_BURST",
    "SNAPSHOT_FORMAT",
    "TRACK_PRELOAD_LEAD_MS",
    "TRANSITIONS",
    "BroadcastPresence",
    "BroadcastState",
    "Disconnect",
    "Effect",
    "Error",
    "Invite",
    "Participant",
    "QueueItem",
    "Reply",
    "Room",
    "RoomSettings",
    "RoomSettingsUpdate",
    "Timeline",
    "Track",
]

# Control messages one room takes per second from all its senders together
# (each connection also has 10/s of its own); past it: rate_limited.
ROOM_CHANGES_PER_SECOND = 20.0
ROOM_CHANGE_BURST = 40.0

# -- who may send what ----------------------------------------------------------

# Who may drive playback (play, pause, seek, volume, track, queue).
PLAYBACK_ROLES = (HOST, COHOST)
_EVERYONE = frozenset({HOST, COHOST, LISTENER})
_PLAYBACK = frozenset(PLAYBACK_ROLES)
_HOST = frozenset({HOST})

PERMISSIONS: dict[type[ClientMessage], frozenset[str]] = {
    ClaimHost: _EVERYONE,  # refused with host_exists while there is a host
    SetTrack: _PLAYBACK,
    Play: _PLAYBACK,
    Pause: _PLAYBACK,
    Seek: _PLAYBACK,
    Volume: _PLAYBACK,
    QueueAdd: _PLAYBACK,  # and listeners, where the room lets them (LISTENER_RIGHTS)
    QueueRemove: _PLAYBACK,
    QueueMove: _PLAYBACK,
    QueueNext: _PLAYBACK,
    QueueMode: _PLAYBACK,
    TransferHost: _HOST,
    Kick: _HOST,
    RoomSettingsUpdate: _HOST,
    CreateInvite: _HOST,
    RevokeInvite: _HOST,
    SetPassword: _HOST,
    SetLatencyOffset: _PLAYBACK,
    Resync: _PLAYBACK,
    Calibrate: _PLAYBACK,
    TickMode: _PLAYBACK,
    CalibrationResult: _EVERYONE,  # only the open calibration's measuring device gets through
}
# Messages a listener may also send while the room's settings say "listeners
# may upload" (they suggest tracks).
LISTENER_RIGHTS: frozenset[type[ClientMessage]] = frozenset({QueueAdd})
# Messages that do not take from the room's change budget: they broadcast no state
# (tuning a device is one frame to that device).
# calibration_result is one frame to the hosts, once per calibration. (calibrate and
# tick_mode do take from it: they reach many devices.)
FREE_MESSAGES: frozenset[type[ClientMessage]] = frozenset(
    {ClaimHost, SetLatencyOffset, Resync, CalibrationResult}
)

# -- snapshots ------------------------------------------------------------------

# Format 1 (no "format" key): {"state": <the wire state>, "queue_seq", "seq",
# "seats", "banned_hashes" (or, older, "banned" by plain token, and "token" in
# seats), "password_hash", "invites"}. Format 2: the parts' own dicts.
SNAPSHOT_FORMAT = 2


def _from_format_1(snap: dict[str, Any]) -> dict[str, Any]:
    """Format 1 to 2; plain tokens (from before token hashing) are hashed here."""
    state = snap["state"]
    seats = []
    for seat in snap.get("seats", []):
        token_hash = seat.get("token_hash")
        if token_hash is None and seat.get("token") is not None:
            token_hash = hash_token(str(seat["token"]))
        if token_hash is not None:
            fields = {k: seat[k] for k in ("id", "name", "role", "seq")}
            seats.append({**fields, "token_hash": token_hash})
    banned = {hash_token(str(k)): float(v) for k, v in snap.get("banned", {}).items()}
    banned.update((str(k), float(v)) for k, v in snap.get("banned_hashes", {}).items())
    playback_keys = ("track", "paused", "position", "start_at", "volume")
    return {
        "format": 2,
        "version": state["version"],
        "playback": {**{k: state[k] for k in playback_keys}, "rate": state.get("rate", 1.0)},
        "queue": {
            "items": state.get("queue", []),
            "repeat": state.get("repeat", "off"),
            "shuffle": state.get("shuffle", False),
            "seq": snap.get("queue_seq", 0),
        },
        "seats": {"seq": snap.get("seq", 0), "seats": seats},
        "gate": {
            "password_hash": snap.get("password_hash"),
            "invites": snap.get("invites", {}),
            "banned_hashes": banned,
            "listeners_may_upload": state.get("settings", {}).get("listeners_may_upload"),
        },
    }


# Each entry upgrades a snapshot from format N-1 to N.
SNAPSHOT_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {2: _from_format_1}


def migrate_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    """``snap`` in today's format, whichever format it was written in."""
    fmt = snap.get("format", 1)
    if not isinstance(fmt, int) or not 1 <= fmt <= SNAPSHOT_FORMAT:
        raise ValueError(f"unknown room snapshot format {fmt!r}")
    for step in range(fmt + 1, SNAPSHOT_FORMAT + 1):
        snap = SNAPSHOT_MIGRATIONS[step](snap)
    return snap


def _track_from(url: str, title: str | None, duration: float | None) -> Track:
    try:
        url = validate_track_url(url)
    except BadURL as exc:
        raise Refusal("bad_url", str(exc)) from None
    return Track(url, clean_title(title) or _title_from_url(url), duration)


def _title_from_url(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    last = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    stem = last.rsplit(".", 1)[0]
    return clean_title(stem) or "untitled"  # %-escapes may decode to control characters


class Room:
    """The authoritative state of one room: the facade over its parts."""

    __slots__ = (
        "_calibration_rev",
        "_changes",
        "_commits",
        "_rng",
        "calibration",
        "gate",
        "name",
        "playback",
        "playqueue",
        "seats",
        "ticks",
        "version",
    )

    def __init__(
        self,
        name: str,
        resume_grace_ms: float = RESUME_GRACE_MS,
        rng: random.Random | None = None,
        new_code: Callable[[], str] = new_invite_code,
    ) -> None:
        self.name = name
        self.version = 0
        self.playback = Playback()
        self.playqueue = PlayQueue()
        self.seats = Seats(resume_grace_ms)
        self.gate = Gate(new_code)
        self._commits = 0
        self._rng = rng or random.Random()
        # The open calibration (calibration.py): only its measuring device may answer.
        self.calibration: Calibration | None = None
        # Tick mode while on: the ``ticks`` payload and the server time it ends
        # (a page that joins meanwhile gets it in its welcome).
        self.ticks: tuple[dict[str, Any], float] | None = None
        self._calibration_rev = 0
        # Changes the whole room may take, whoever sends them: every connection has
        # its own budget, but many co-hosts of one room must not flood its fan-out.
        self._changes = TokenBucket(ROOM_CHANGES_PER_SECOND, ROOM_CHANGE_BURST)

    # -- the parts' fields, as the edge and the tests read them -------------------

    @property
    def participants(self) -> dict[str, Participant]:
        return self.seats.participants

    @property
    def track(self) -> Track | None:
        return self.playback.track

    @property
    def timeline(self) -> Timeline:
        return self.playback.timeline

    @property
    def volume(self) -> float:
        return self.playback.volume

    @property
    def queue(self) -> list[QueueItem]:
        return self.playqueue.items

    @property
    def repeat(self) -> str:
        return self.playqueue.repeat

    @property
    def shuffle(self) -> bool:
        return self.playqueue.shuffle

    @property
    def queue_rev(self) -> int:
        """Which queue the last broadcast carried (see BroadcastState.queue_rev)."""
        return self.playqueue.rev

    @property
    def settings(self) -> RoomSettings:
        return self.gate.settings

    @property
    def invites(self) -> dict[str, Invite]:
        return self.gate.invites

    @property
    def password_hash(self) -> str | None:
        return self.gate.password_hash

    @password_hash.setter
    def password_hash(self, value: str | None) -> None:
        self.gate.password_hash = value  # no broadcast: see set_password_hash

    @property
    def resume_grace_ms(self) -> float:
        return self.seats.resume_grace_ms

    @property
    def _reserved(self) -> dict[str, Reservation]:
        """Held seats by token hash (the abuse tests reach in here)."""
        return self.seats.held

    @property
    def revision(self) -> int:
        """Grows with every change ``snapshot()`` covers, broadcast or not."""
        return self._commits + self.seats.revision + self.gate.revision + self._calibration_rev

    # -- queries -------------------------------------------------------------------

    @property
    def host_id(self) -> str | None:
        return self.seats.host_id

    @property
    def host_reserved(self) -> bool:
        return self.seats.host_reserved

    def participant_for_token(self, token: str) -> Participant | None:
        return self.seats.by_hash(hash_token(token))

    def holds_seat(self, token: str) -> bool:
        """True for the token of someone seated now or within their resume grace."""
        return self.seats.holds(hash_token(token))

    def valid_invite(self, code: str, now: float) -> Invite | None:
        return self.gate.valid_invite(code, now)

    def admission(
        self, now: float, token: str | None = None, invite: str | None = None
    ) -> tuple[bool, str | None]:
        """(may enter without a password, role an invite grants) for a new connection."""
        return self.gate.admission(now, invite, lambda: bool(token and self.holds_seat(token)))

    def is_banned(self, token: str, now: float) -> bool:
        return self.gate.is_banned(hash_token(token), now)

    def lead_ms(self) -> float:
        """The RTT-derived lead plus the largest positive device offset: a device that
        plays that much earlier (a Bluetooth speaker) must still hear of a change in time."""
        return lead_for_rtt(self.seats.worst_rtt()) + self.seats.max_offset()

    def lead_ids(self) -> list[str]:
        """The seated hosts and co-hosts, who get the room's ``health`` frames."""
        return self.seats.lead_ids()

    def position_at(self, t_ms: float) -> float:
        return self.playback.position_at(t_ms)

    def presence_window_ms(self) -> float:
        return self.seats.presence_window_ms()

    def may_send(self, sender: Participant, kind: type[ClientMessage]) -> bool:
        """Whether ``sender``'s role lets it send messages of type ``kind`` here."""
        if sender.role in PERMISSIONS[kind]:
            return True
        return kind in LISTENER_RIGHTS and self.gate.settings.listeners_may_upload

    def state(self) -> dict[str, Any]:
        return {
            **self.playback.to_dict(),
            "version": self.version,
            "settings": self.gate.settings_wire(),
            "queue": self.playqueue.wire(),
            "repeat": self.playqueue.repeat,
            "shuffle": self.playqueue.shuffle,
        }

    def track_end_at(self) -> float | None:
        """Server time at which the current track runs out, if playing with a known length."""
        return self.playback.track_end_at(MIN_ADVANCE_SECONDS)

    def _advance_due_at(self) -> float | None:
        end = self.track_end_at()
        track = self.playback.track
        if end is None or track is None or track.duration is None:
            return None
        return self.playqueue.advance_due_at(end, track.duration)

    def next_deadline(self) -> float | None:
        """Server time at which ``poll`` has work to do, or None."""
        times = [t for t in (self.seats.next_deadline(), self._advance_due_at()) if t is not None]
        return min(times, default=None)

    # -- persistence -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a restart, as plain JSON-able data (fresh
        containers: the writer thread may encode it while the room goes on)."""
        return {
            "format": SNAPSHOT_FORMAT,
            "version": self.version,
            "playback": self.playback.to_dict(),
            "queue": self.playqueue.to_dict(),
            "seats": self.seats.to_dict(),
            "gate": self.gate.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "ticks": None if self.ticks is None else {**self.ticks[0], "until": self.ticks[1]},
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
        """A room from ``snapshot()`` (any format). Everyone who was in it gets a held seat."""
        snap = migrate_snapshot(snap)
        room = cls(name, resume_grace_ms=resume_grace_ms, rng=rng)
        room.version = int(snap["version"])
        room.playback = Playback.from_dict(snap["playback"])
        room.playqueue = PlayQueue.from_dict(snap["queue"])
        room.seats = Seats.from_dict(snap["seats"], now, resume_grace_ms)
        room.gate = Gate.from_dict(snap["gate"])
        cal = snap.get("calibration")  # absent in snapshots from before calibration
        room.calibration = None if cal is None else Calibration.from_dict(cal)
        ticks = snap.get("ticks")  # absent in snapshots from before tick mode was kept
        if ticks is not None:
            payload = {"on": True, "by": str(ticks["by"]), "period_ms": float(ticks["period_ms"])}
            room.ticks = (payload, float(ticks["until"]))
        return room

    def carry_over(self, older: Room) -> None:
        """Keep what only this node's copy ``older`` knew: the change budget, the
        presence news not yet sent and the count of a crowd seated elsewhere (a
        shared room's new copy replaces the old)."""
        self._changes = older._changes
        self.seats.presence = older.seats.presence
        self.seats.elsewhere = older.seats.elsewhere

    # -- membership --------------------------------------------------------------------

    def join(
        self, pid: str, name: str, now: float, token: str | None = None, role: str | None = None
    ) -> list[Effect]:
        """A new participant. ``role`` (co-host, from an invite) is a floor, not a grant of host."""
        token_hash = hash_token(token) if token is not None else None
        p = self.seats.join(pid, name, now, token_hash, role)
        return [self._welcome(p, now, token)]

    def resume(self, token: str, now: float) -> list[Effect] | None:
        """Seat a participant again by their token: same id, name and role.

        None when the token names no held seat (expired, unknown or banned);
        the caller then joins them as someone new. A token whose owner is still
        connected (a second tab, or a reconnect the server has not noticed the
        drop of yet) must be released with ``leave`` by the caller first.
        """
        token_hash = hash_token(token)
        if self.gate.is_banned(token_hash, now):
            return None
        p = self.seats.resume(token_hash, now)
        return None if p is None else [self._welcome(p, now, token)]

    def leave(self, pid: str, now: float, *, hold: bool = True) -> list[Effect]:
        """``pid`` is gone. With a token and ``hold``, their seat waits for ``resume``."""
        self.seats.leave(pid, now, hold=hold)
        return []

    def note_rtt(self, pid: str, rtt_ms: float) -> None:
        self.seats.note_rtt(pid, rtt_ms)

    def note_latency_offset(self, pid: str, offset_ms: float) -> None:
        """``pid``'s device offset, as it reported it: the lead covers the largest."""
        self.seats.note_latency_offset(pid, offset_ms)

    def _welcome(self, p: Participant, now: float, token: str | None) -> Reply:
        you = p.to_wire()
        if token is not None:
            you["token"] = token  # to its owner only; the room keeps its hash
        welcome = {
            "you": you,
            "room": self.state(),
            "room_name": self.name,
            "participants": self.seats.listed(),
            "participant_count": self.seats.count(),
            "server_time": now,
            "lead_ms": self.lead_ms(),
            "ticks": self._ticks_now(now),
        }
        return Reply(p.id, "welcome", welcome)

    def _ticks_now(self, now: float) -> dict[str, Any] | None:
        """The ``ticks`` payload while tick mode is on (it ends by itself)."""
        if self.ticks is None or now >= self.ticks[1]:
            return None
        return self.ticks[0]

    # -- time ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[Effect]:
        """Advance the queue, expire held seats and bans, flush coalesced presence."""
        effects = self._maybe_advance(now)
        self.seats.expire(now)
        self.gate.expire(now)
        delta = self.seats.flush_presence(now)
        return effects if delta is None else [*effects, BroadcastPresence(delta)]

    def _maybe_advance(self, now: float) -> list[Effect]:
        """At the advance time, schedule the next track to start exactly when this one ends."""
        due = self._advance_due_at()
        end = self.track_end_at()
        if due is None or end is None or now < due:
            return []
        effects = self._start_next(now, autoplay=True, at=end)
        if effects:
            return effects
        self.playback.settle_at_end(end)
        return self._commit()

    def _start_next(
        self, now: float, autoplay: bool, skipping: bool = False, at: float | None = None
    ) -> list[Effect]:
        track = self.playqueue.pick_next(self.playback.track, self._rng, skipping=skipping)
        if track is None:
            return []
        if at is None:
            extra = TRACK_PRELOAD_LEAD_MS if autoplay else 0.0
            at = self.playback.effective_time(now, self.lead_ms(), extra)
        self.playback.start(track, at, autoplay=autoplay)
        return self._commit()

    def _commit(self) -> list[Effect]:
        """One change every part agrees on: a new version, broadcast as a state."""
        self.version += 1
        self._commits += 1
        queue_rev = self.playqueue.note_broadcast()
        return [BroadcastState(self.state(), queue_rev)]

    def _changed(self, changed: bool) -> list[Effect]:
        return self._commit() if changed else []

    # -- messages --------------------------------------------------------------------------

    def handle(self, pid: str, msg: ClientMessage, now: float) -> list[Effect]:
        """Apply one decoded control message from participant ``pid``."""
        sender = self.seats.participants[pid]
        kind = type(msg)
        transition = TRANSITIONS.get(kind)
        if transition is None:
            raise TypeError(f"not a control message: {msg!r}")
        if not self.may_send(sender, kind):
            return [Error(pid, "not_host", f"only the host may send {msg.TYPE}")]
        if kind not in FREE_MESSAGES and not self._changes.try_take(now / MS_PER_SECOND):
            return [Error(pid, "rate_limited", "this room is changing too fast; try again soon")]
        try:
            return transition(self, sender, msg, now)
        except Refusal as refusal:
            return [Error(pid, refusal.code, refusal.message)]

    def set_password_hash(self, pid: str, password_hash: str | None) -> list[Effect]:
        """The host protects the room (a salted hash made by the edge) or opens it."""
        sender = self.seats.participants.get(pid)
        if sender is None or not self.may_send(sender, SetPassword):
            return [Error(pid, "not_host", "only the host may set the password")]
        return self._changed(self.gate.set_password_hash(password_hash))

    def kick(self, pid: str, target_id: str, now: float) -> list[Effect]:
        """The host removes ``target_id``; its token may not come back for a while.

        On success the effects hold a ``Disconnect`` for the target: the caller
        closes its connection.
        """
        sender = self.seats.participants[pid]
        if not self.may_send(sender, Kick):
            return [Error(pid, "not_host", "only the host may send kick")]
        try:
            return self._kick(sender, Kick(id=target_id), now)
        except Refusal as refusal:
            return [Error(pid, refusal.code, refusal.message)]

    def queue_add(
        self, sender: Participant, msg: QueueAdd, now: float, resolved: Track | None = None
    ) -> list[Effect]:
        """Queue ``msg.url`` (or ``resolved``, a library track the edge looked up)."""
        try:
            return self._queue_add(sender, msg, now, resolved)
        except Refusal as refusal:
            return [Error(sender.id, refusal.code, refusal.message)]

    # -- transitions (TRANSITIONS): each raises Refusal before it changes anything ----------

    def _claim(self, sender: Participant, msg: ClaimHost, now: float) -> list[Effect]:
        self.seats.claim(sender.id, now)
        return []

    def _transfer(self, sender: Participant, msg: TransferHost, now: float) -> list[Effect]:
        self.seats.transfer(sender.id, msg.to, now)
        return []

    def _kick(self, sender: Participant, msg: Kick, now: float) -> list[Effect]:
        target = self.seats.participants.get(msg.id)
        if target is None or target is sender:
            raise Refusal("no_such_participant", "no other participant with that id")
        if target.token_hash is not None:
            self.gate.ban(target.token_hash, now + KICK_BAN_MS)
        self.seats.leave(target.id, now, hold=False)
        reason = "the host removed you from this room"
        return [Disconnect(target.id, "kicked", reason, CLOSE_KICKED)]

    def _update_settings(
        self, sender: Participant, msg: RoomSettingsUpdate, now: float
    ) -> list[Effect]:
        return self._changed(self.gate.set_listeners_may_upload(msg.listeners_may_upload))

    def _create_invite(self, sender: Participant, msg: CreateInvite, now: float) -> list[Effect]:
        invite = self.gate.create_invite(msg.role, msg.expires_in, now)
        payload = {
            "code": invite.code,
            "role": invite.role,
            "expires_at": invite.expires_at,
            "url": f"/r/{self.name}?invite={invite.code}",
        }
        return [Reply(sender.id, "invite", payload)]

    def _revoke_invite(self, sender: Participant, msg: RevokeInvite, now: float) -> list[Effect]:
        self.gate.revoke_invite(msg.code)
        return [Reply(sender.id, "invite_revoked", {"code": msg.code})]

    def _set_password(self, sender: Participant, msg: SetPassword, now: float) -> list[Effect]:
        raise TypeError("set_password needs hashing at the edge: use set_password_hash")

    def _set_track(self, sender: Participant, msg: SetTrack, now: float) -> list[Effect]:
        track = _track_from(msg.url, msg.title, msg.duration)
        return self._changed(
            self.playback.set_track(track, now, self.lead_ms(), autoplay=msg.autoplay)
        )

    def _play(self, sender: Participant, msg: Play, now: float) -> list[Effect]:
        return self._changed(self.playback.play(msg.position, now, self.lead_ms()))

    def _pause(self, sender: Participant, msg: Pause, now: float) -> list[Effect]:
        return self._changed(self.playback.pause(now, self.lead_ms()))

    def _seek(self, sender: Participant, msg: Seek, now: float) -> list[Effect]:
        return self._changed(self.playback.seek(msg.position, now, self.lead_ms()))

    def _set_volume(self, sender: Participant, msg: Volume, now: float) -> list[Effect]:
        return self._changed(self.playback.set_volume(msg.volume))

    def _queue_add(
        self, sender: Participant, msg: QueueAdd, now: float, resolved: Track | None = None
    ) -> list[Effect]:
        if resolved is None:
            if msg.url is None:
                code = "no_such_track" if msg.track_id else "bad_message"
                raise Refusal(code, "queue_add needs a url or a known track_id")
            resolved = _track_from(msg.url, msg.title, msg.duration)
        self.playqueue.add(resolved, sender.name, front=msg.next)
        if self.playback.track is None:  # an empty room: the first track becomes current, paused
            return self._start_next(now, autoplay=False)
        return self._commit()

    def _queue_remove(self, sender: Participant, msg: QueueRemove, now: float) -> list[Effect]:
        return self._changed(self.playqueue.remove(msg.item))

    def _queue_move(self, sender: Participant, msg: QueueMove, now: float) -> list[Effect]:
        return self._changed(self.playqueue.move(msg.item, msg.index))

    def _queue_next(self, sender: Participant, msg: QueueNext, now: float) -> list[Effect]:
        if not self.playqueue.has_follower(self.playback.track):
            raise Refusal("queue_empty", "nothing is queued")
        return self._start_next(now, autoplay=True, skipping=True)

    def _queue_mode(self, sender: Participant, msg: QueueMode, now: float) -> list[Effect]:
        return self._changed(self.playqueue.set_mode(msg.repeat, msg.shuffle))

    def _tune_device(
        self, sender: Participant, msg: SetLatencyOffset | Resync, now: float
    ) -> list[Effect]:
        """A host or co-host sets a device's offset or has it resync; only the device hears."""
        if msg.id not in self.seats.participants:
            raise Refusal("no_such_participant", "no participant with that id")
        if isinstance(msg, Resync):
            return [Reply(msg.id, "resync", {})]
        self.seats.note_latency_offset(msg.id, msg.offset_ms)  # the lead covers it at once
        return [Reply(msg.id, "latency_offset", {"offset_ms": msg.offset_ms})]

    def _calibrate(self, sender: Participant, msg: Calibrate, now: float) -> list[Effect]:
        """Schedule a calibration: one payload (encoded once by the edge) to the measuring
        device, every device measured and the hosts; it replaces any open one."""
        seated = self.seats.participants
        if msg.mic not in seated:
            raise Refusal("no_such_participant", "no participant with that id (mic)")
        if msg.devices is None:
            devices = [pid for pid in seated if pid != msg.mic]
            if len(devices) > MAX_CALIBRATION_DEVICES:
                raise Refusal(
                    "bad_message",
                    f"more than {MAX_CALIBRATION_DEVICES} devices: name the ones to calibrate",
                )
        else:
            devices = list(msg.devices)
            if any(pid not in seated for pid in devices):
                raise Refusal("no_such_participant", "no participant with that id (devices)")
        if not devices:
            raise Refusal("bad_message", "no device to calibrate but the microphone")
        cal_id = f"cal-{self._rng.getrandbits(48):012x}"
        start_at = now + self.lead_ms() + CALIBRATION_PREPARE_MS
        record, payload = schedule(cal_id, msg.mic, sender.id, devices, start_at, msg.rounds)
        self.calibration = record
        self._calibration_rev += 1
        to = dict.fromkeys([msg.mic, *devices, *self.seats.lead_ids()])
        return [Reply(pid, "calibration", payload) for pid in to]

    def _calibration_result(
        self, sender: Participant, msg: CalibrationResult, now: float
    ) -> list[Effect]:
        """The measuring device's result, once, to the room's hosts and co-hosts."""
        cal = self.calibration
        if cal is None or cal.id != msg.id or sender.id != cal.mic or now > cal.until:
            raise Refusal(
                "no_such_calibration",
                "no open calibration with that id for which this device measures",
            )
        if any(m.id not in cal.devices for m in msg.devices):
            raise Refusal("no_such_participant", "a device that was not in this calibration")
        self.calibration = None
        self._calibration_rev += 1
        devices = [m.to_wire() for m in msg.devices]
        payload = {"id": msg.id, "from": sender.id, "devices": devices}
        return [Reply(pid, "calibration_result", payload) for pid in self.seats.lead_ids()]

    def _tick_mode(self, sender: Participant, msg: TickMode, now: float) -> list[Effect]:
        """Every device ticks together (or stops): one payload to everyone in the room."""
        payload = {"on": msg.on, "by": sender.id, "period_ms": TICK_PERIOD_MS}
        self.ticks = (payload, now + TICK_MODE_MAX_MS) if msg.on else None
        self._calibration_rev += 1  # kept: a page that joins while it is on ticks too
        return [Reply(pid, "ticks", payload) for pid in self.seats.participants]


Transition = Callable[[Room, Participant, Any, float], list[Effect]]

# Which transition each control message runs (PERMISSIONS says who may send it).
TRANSITIONS: dict[type[ClientMessage], Transition] = {
    ClaimHost: Room._claim,
    SetTrack: Room._set_track,
    Play: Room._play,
    Pause: Room._pause,
    Seek: Room._seek,
    Volume: Room._set_volume,
    QueueAdd: Room._queue_add,
    QueueRemove: Room._queue_remove,
    QueueMove: Room._queue_move,
    QueueNext: Room._queue_next,
    QueueMode: Room._queue_mode,
    TransferHost: Room._transfer,
    Kick: Room._kick,
    RoomSettingsUpdate: Room._update_settings,
    CreateInvite: Room._create_invite,
    RevokeInvite: Room._revoke_invite,
    SetPassword: Room._set_password,
    SetLatencyOffset: Room._tune_device,
    Resync: Room._tune_device,
    Calibrate: Room._calibrate,
    TickMode: Room._tick_mode,
    CalibrationResult: Room._calibration_result,
}
