"""A room's seats: who is in with which role, held seats, host election, presence (sans-IO).

Invariants (tests/test_seats.py, tests/test_room_properties.py):

* At most one host. With anyone seated there is exactly one host, except
  while the departed host's seat is held for its resume grace
  (``host_reserved``); then there is none, and ``expire`` elects the
  longest-seated participant (lowest ``seq``) once the grace ends.
* A seat's token is known only by its hash (``access.hash_token``); the token
  itself is never kept. A token hash names at most one seat, seated or held.
* Resuming a held seat gives back the same id, name, role and seniority
  (``seq``); a role the room has given away meanwhile (host) becomes listener.
* The indexes always say what a full scan would: ``_by_hash`` (seated, by
  token hash), ``_leads`` (seated hosts and co-hosts), ``_reserved_leads``
  (held seats of hosts and co-hosts), ``_worst_rtt`` (the largest round trip
  seated), and ``_reserved`` is in deadline order (insertion order). They keep
  a crowd's join, leave and expiry O(1).
* Presence is coalesced: joins, leaves and role changes within one window go
  out as one delta, the window growing with the room (at most
  PRESENCE_MAX_COALESCE_MS), and a participant who joined and left within it
  is reported as left.
* ``revision`` grows with every change ``to_dict`` covers: a durable seat
  joining or leaving, a role change, a held seat expiring.

Contract breaches (an id seated twice, an unknown id) raise KeyError or
ValueError; what a participant may not do raises ``Refusal``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .effects import Refusal

HOST = "host"
COHOST = "cohost"
LISTENER = "listener"
ROLES = (HOST, COHOST, LISTENER)

# A participant who drops keeps their id, name and role for this long, so a
# reload or a network blip is not a hand-over.
RESUME_GRACE_MS = 30_000.0
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


@dataclass(slots=True)
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


@dataclass(slots=True)
class Reservation:
    """A held seat: ``participant`` may resume it until server time ``until``."""

    participant: Participant
    until: float


@dataclass(slots=True)
class PresenceDelta:
    joined: dict[str, Participant] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    changed: dict[str, str] = field(default_factory=dict)
    recount: bool = False  # only the count moved (participants on other nodes)
    due_at: float | None = None

    def empty(self) -> bool:
        return not (self.joined or self.left or self.changed or self.recount)


class Seats:
    """The seats part of a room."""

    __slots__ = (
        "_by_hash",
        "_leads",
        "_max_offset",
        "_reserved",
        "_reserved_leads",
        "_worst_rtt",
        "elsewhere",
        "participants",
        "presence",
        "resume_grace_ms",
        "revision",
        "seq",
    )

    def __init__(self, resume_grace_ms: float = RESUME_GRACE_MS) -> None:
        self.participants: dict[str, Participant] = {}
        self.resume_grace_ms = resume_grace_ms
        self.revision = 0
        self.seq = 0  # the last seat's seniority
        self.presence = PresenceDelta()
        # A shared room's crowd (clusterproto): listeners seated on other nodes
        # that this copy does not hold. They count; they are not listed.
        self.elsewhere = 0
        # Held seats by token hash, in the order they fall due (a leave adds one
        # at now + grace, so insertion order is deadline order).
        self._reserved: dict[str, Reservation] = {}
        self._by_hash: dict[str, Participant] = {}
        self._leads: dict[str, Participant] = {}
        self._reserved_leads: dict[str, Reservation] = {}
        self._worst_rtt: tuple[float, str] | None = None
        self._max_offset: tuple[float, str] | None = None  # the largest positive offset

    # -- queries -----------------------------------------------------------------

    @property
    def host_id(self) -> str | None:
        for p in self._leads.values():
            if p.role == HOST:
                return p.id
        return None

    @property
    def host_reserved(self) -> bool:
        return any(r.participant.role == HOST for r in self._reserved_leads.values())

    @property
    def held(self) -> dict[str, Reservation]:
        """Held seats by token hash, in deadline order (read only, please)."""
        return self._reserved

    def by_hash(self, token_hash: str) -> Participant | None:
        """The seated participant whose token has this hash."""
        return self._by_hash.get(token_hash)

    def holds(self, token_hash: str) -> bool:
        """True for the token of someone seated now or within their resume grace."""
        return token_hash in self._reserved or token_hash in self._by_hash

    def worst_rtt(self) -> float | None:
        return self._worst_rtt[0] if self._worst_rtt is not None else None

    def max_offset(self) -> float:
        """The largest positive device latency offset among the seated (0 if none)."""
        return self._max_offset[0] if self._max_offset is not None else 0.0

    def lead_ids(self) -> list[str]:
        """The seated hosts and co-hosts (from the index: O(leads), not O(participants))."""
        return list(self._leads)

    def crowded(self) -> bool:
        return len(self.participants) > PARTICIPANT_LIST_MAX

    def count(self) -> int:
        """Everyone in the room: those seated here and a shared crowd's elsewhere."""
        return len(self.participants) + self.elsewhere

    def set_elsewhere(self, count: int, now: float) -> None:
        """Other nodes hold ``count`` listeners this copy does not: news of the count."""
        if count == self.elsewhere:
            return
        self.elsewhere = count
        self.presence.recount = True
        self._schedule_presence(now)

    def listed(self) -> list[dict[str, Any]]:
        """Everyone in a small room; in a crowd, hosts and co-hosts and the
        first ``PARTICIPANT_LIST_MAX`` listeners (a welcome stays small)."""
        if not self.crowded():
            return [q.to_wire() for q in self.participants.values()]
        listeners = (q for q in self.participants.values() if q.role == LISTENER)
        some = [q for q, _ in zip(listeners, range(PARTICIPANT_LIST_MAX), strict=False)]
        return [q.to_wire() for q in (*self._leads.values(), *some)]

    def presence_window_ms(self) -> float:
        scaled = len(self.participants) * PRESENCE_MS_PER_PARTICIPANT
        return min(PRESENCE_MAX_COALESCE_MS, max(PRESENCE_COALESCE_MS, scaled))

    def next_deadline(self) -> float | None:
        """The earliest of the first held seat's expiry and the presence flush."""
        times = [next(iter(self._reserved.values())).until] if self._reserved else []
        if self.presence.due_at is not None:
            times.append(self.presence.due_at)
        return min(times, default=None)

    # -- transitions ----------------------------------------------------------------

    def join(
        self, pid: str, name: str, now: float, token_hash: str | None, role: str | None = None
    ) -> Participant:
        """A new participant. ``role`` (co-host, from an invite) is a floor, not a grant of host."""
        if pid in self.participants:
            raise ValueError(f"participant {pid!r} already seated")
        self.seq += 1
        if self.host_id is None and not self.host_reserved and not self.participants:
            role = HOST
        elif role != COHOST:
            role = LISTENER
        p = Participant(pid, name, role, self.seq, token_hash=token_hash)
        self._seat(p)
        self._note_joined(p, now)
        return p

    def resume(self, token_hash: str, now: float) -> Participant | None:
        """Seat a held seat's participant again: same id, name, seniority and role
        (host only if nobody took it meanwhile). None if no seat is held for it."""
        if token_hash not in self._reserved:
            return None
        p = self._release(token_hash).participant
        if p.role == HOST and self.host_id is not None:
            p.role = LISTENER  # someone claimed it meanwhile
        self._seat(p)
        self._note_joined(p, now)
        self._elect(now)  # back in a room whose host left for good: someone hosts
        return p

    def leave(self, pid: str, now: float, *, hold: bool = True) -> Participant:
        """``pid`` is gone. With a token and ``hold``, their seat waits for ``resume``."""
        p = self._unseat(pid)
        self._note_left(p, now)
        if hold and p.token_hash is not None and self.resume_grace_ms > 0:
            self._hold(p.token_hash, Reservation(p, now + self.resume_grace_ms))
        elif p.role == HOST:
            self._elect(now)
        return p

    def claim(self, pid: str, now: float) -> bool:
        """``pid`` becomes host of a hostless room."""
        p = self.participants[pid]
        if p.role == HOST:
            return False
        if self.host_id is not None:
            raise Refusal("host_exists", "the room already has a host")
        if self.host_reserved:
            raise Refusal("host_exists", "the host is reconnecting")
        self._set_role(p, HOST, now)
        return True

    def transfer(self, pid: str, to: str, now: float) -> bool:
        """The host ``pid`` hands the role to ``to`` (a co-host stays co-host after)."""
        sender = self.participants[pid]
        target = self.participants.get(to)
        if target is None:
            raise Refusal("no_such_participant", "no participant with that id")
        if target is sender:
            return False
        self._set_role(sender, COHOST if target.role == COHOST else LISTENER, now)
        self._set_role(target, HOST, now)
        return True

    def note_rtt(self, pid: str, rtt_ms: float) -> None:
        self.participants[pid].rtt_ms = rtt_ms
        worst = self._worst_rtt
        if worst is None or rtt_ms >= worst[0]:
            self._worst_rtt = (rtt_ms, pid)
        elif worst[1] == pid:  # the worst link got better: who is worst now?
            self._find_worst_rtt()

    def note_latency_offset(self, pid: str, offset_ms: float) -> None:
        """``pid``'s device offset (its report, or a host's set_latency_offset). O(1)
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

    def expire(self, now: float) -> None:
        """Give up the held seats that fell due; elect a host if theirs was one."""
        while self._reserved:  # in deadline order: stop at the first not due
            token_hash, reservation = next(iter(self._reserved.items()))
            if now < reservation.until:
                break
            self.revision += 1
            self._release(token_hash)
            if reservation.participant.role == HOST:
                self._elect(now)

    def flush_presence(self, now: float) -> dict[str, Any] | None:
        """The coalesced presence delta once its window is over, else None."""
        delta = self.presence
        if delta.due_at is None or now < delta.due_at:
            return None
        self.presence = PresenceDelta()
        if delta.empty():
            return None
        left = set(delta.left) - set(delta.joined)  # a resumed seat is back, not gone
        joined = list(delta.joined.values())
        gone = [pid for pid in delta.left if pid in left]
        if self.crowded():
            # A crowd hears of hosts and co-hosts by name, of listeners by count.
            joined = [p for p in joined if p.role != LISTENER]
            gone = gone[:PARTICIPANT_LIST_MAX]
        return {
            "joined": [p.to_wire() for p in joined],
            "left": gone,
            "changed": [
                {"id": pid, "role": role} for pid, role in delta.changed.items() if pid not in left
            ],
            "count": self.count(),
        }

    # -- a shared room's copy on one node (clusterproto.replica) -----------------------

    def seat_held(self, token_hash: str) -> None:
        """Seat again the held seat of a participant connected to another node."""
        self._seat(self._release(token_hash).participant)

    def seat_only_here(self, p: Participant) -> None:
        """Seat a participant that only this node knows (a crowd's listener)."""
        self._seat(p)

    def set_deadlines(self, until: Mapping[str, float]) -> None:
        """Held seats fall due when ``until`` says (others keep theirs), in deadline order."""
        for token_hash, at in until.items():
            reservation = self._reserved.get(token_hash)
            if reservation is not None:
                reservation.until = float(at)
        held = sorted(self._reserved.items(), key=lambda item: item[1].until)
        self._reserved = dict(held)
        self._reserved_leads = {h: r for h, r in held if r.participant.role != LISTENER}

    # -- the indexes -------------------------------------------------------------------

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

    def _hold(self, token_hash: str, reservation: Reservation) -> None:
        self._reserved.pop(token_hash, None)  # a re-hold moves to the end (its new deadline)
        self._reserved[token_hash] = reservation
        if reservation.participant.role != LISTENER:
            self._reserved_leads[token_hash] = reservation

    def _release(self, token_hash: str) -> Reservation:
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

    # -- roles and presence ------------------------------------------------------------

    def _elect(self, now: float) -> None:
        if self.host_id is None and not self.host_reserved and self.participants:
            heir = min(self.participants.values(), key=lambda q: q.seq)
            self._set_role(heir, HOST, now)

    def _set_role(self, p: Participant, role: str, now: float) -> None:
        self.revision += 1
        p.role = role
        if role == LISTENER:
            self._leads.pop(p.id, None)
        elif p.id in self.participants:
            self._leads[p.id] = p
        if p.id not in self.presence.joined:
            self.presence.changed[p.id] = role
        self._schedule_presence(now)

    def _keeps_seat(self, p: Participant) -> bool:
        """Whether ``p``'s seat is durable: hosts' and co-hosts' always; a listener's
        unless the room is a crowd, whose listeners rejoin afresh after a restart
        (10 000 seats rewritten on every join would make filling a room O(N^2))."""
        return p.role != LISTENER or not self.crowded()

    def _note_joined(self, p: Participant, now: float) -> None:
        if self._keeps_seat(p):
            self.revision += 1
        self.presence.joined[p.id] = p
        self._schedule_presence(now)

    def _note_left(self, p: Participant, now: float) -> None:
        # Even a join from this same window is reported as left: whoever got a
        # welcome in between already knows the participant.
        pid = p.id
        if self._keeps_seat(p):
            self.revision += 1
        self.presence.joined.pop(pid, None)
        if pid not in self.presence.left:
            self.presence.left.append(pid)
        self.presence.changed.pop(pid, None)
        self._schedule_presence(now)

    def _schedule_presence(self, now: float) -> None:
        if self.presence.due_at is None:
            self.presence.due_at = now + self.presence_window_ms()

    # -- the database ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Seated and held seats with a token (hashes only), and the seniority counter.

        A crowd keeps only its hosts' and co-hosts' seats (see ``_keeps_seat``).
        """
        if self.crowded():
            held = (r.participant for r in self._reserved_leads.values())
            seats = [*self._leads.values(), *held]
        else:
            held = (r.participant for r in self._reserved.values())
            seats = [*self.participants.values(), *held]
        return {
            "seq": self.seq,
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
        }

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], now: float, resume_grace_ms: float = RESUME_GRACE_MS
    ) -> Seats:
        """Seats from ``to_dict()``: nobody is seated; every seat is held for the grace."""
        seats = cls(resume_grace_ms)
        seats.seq = int(d.get("seq", 0))
        until = now + max(resume_grace_ms, 0.0)
        for seat in d.get("seats", []):
            role = seat["role"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            token_hash = str(seat["token_hash"])
            p = Participant(seat["id"], seat["name"], role, int(seat["seq"]), token_hash=token_hash)
            seats._hold(token_hash, Reservation(p, until))
        return seats
