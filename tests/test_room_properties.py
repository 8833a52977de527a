"""Property tests of the room's invariants under random sequences of events."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from musicsync.protocol import (
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
    RevokeInvite,
    RoomSettingsUpdate,
    Seek,
    SetTrack,
    TransferHost,
    Volume,
)
from musicsync.room import (
    COHOST,
    HOST,
    KICK_BAN_MS,
    LISTENER,
    MAX_LEAD_MS,
    MIN_LEAD_MS,
    RESUME_GRACE_MS,
    BroadcastPresence,
    BroadcastState,
    Disconnect,
    Error,
    Reply,
    Room,
    Timeline,
)

T0 = 1_700_000_000_000.0
# Time only moves forward, in steps of 0.1 ms up to 2 s.
time_steps = st.integers(min_value=0, max_value=20_000).map(lambda us: us / 10.0)
positions = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False)
rtts = st.floats(min_value=0.0, max_value=3000.0, allow_nan=False)

GOOD_URLS = ["/media/a.mp3", "https://example.com/b.ogg", "/media/dir/c.flac"]
BAD_URLS = ["javascript:alert(1)", "/media/../x.mp3", "ftp://h/x.mp3", "/static/x.mp3"]

control_messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.builds(Play, position=st.none() | positions),
    st.just(Pause()),
    st.builds(Seek, position=positions),
    st.builds(Volume, volume=st.floats(min_value=0.0, max_value=1.0)),
    st.builds(
        SetTrack,
        url=st.sampled_from(GOOD_URLS + BAD_URLS),
        title=st.none() | st.sampled_from(["", " t ", "Title"]),
        duration=st.none() | st.floats(min_value=0.0, max_value=600.0),
        autoplay=st.booleans(),
    ),
    st.just(ClaimHost()),
)
queue_messages: st.SearchStrategy[ClientMessage] = st.one_of(
    st.builds(
        QueueAdd,
        url=st.sampled_from(GOOD_URLS + BAD_URLS[:1]) | st.none(),
        duration=st.none() | st.floats(min_value=0.0, max_value=30.0),
        next=st.booleans(),
    ),
    st.builds(QueueRemove, item=st.sampled_from(["q1", "q2", "q3", "q4", "nope"])),
    st.builds(
        QueueMove,
        item=st.sampled_from(["q1", "q2", "q3", "nope"]),
        index=st.integers(min_value=0, max_value=5),
    ),
    st.just(QueueNext()),
    st.builds(
        QueueMode,
        repeat=st.none() | st.sampled_from(["off", "one", "all"]),
        shuffle=st.none() | st.booleans(),
    ),
    st.builds(RoomSettingsUpdate, listeners_may_upload=st.none() | st.booleans()),
)
# What each role may send, written out apart from the room's PERMISSIONS table.
PLAYBACK_MESSAGES = (SetTrack, Play, Pause, Seek, Volume, QueueAdd, QueueRemove, QueueMove)
PLAYBACK_MESSAGES += (QueueNext, QueueMode)
HOST_MESSAGES = (TransferHost, Kick, RoomSettingsUpdate, CreateInvite, RevokeInvite)


def may_send(role: str, msg: ClientMessage, listeners_may_upload: bool) -> bool:
    if isinstance(msg, ClaimHost) or role == HOST:
        return True
    if isinstance(msg, QueueAdd) and listeners_may_upload:
        return True
    return role == COHOST and isinstance(msg, PLAYBACK_MESSAGES)


class RoomMachine(RuleBasedStateMachine):
    """Joins, leaves, RTT reports, polls and control messages from anyone."""

    people = Bundle("people")

    def __init__(self) -> None:
        super().__init__()
        self.rng = random.Random(0)
        self.room = Room("prop", rng=self.rng)
        self.now = T0
        self.counter = 0
        self.last_version = 0
        self.last_broadcast_version = 0
        self.last_start_at = self.room.timeline.start_at
        self.tokens: dict[str, str] = {}  # pid -> token, for those who have one
        # token -> (id, name, role, left at) of a seat held for its resume grace
        self.held: dict[str, tuple[str, str, str, float]] = {}
        self.kicked: dict[str, float] = {}  # token -> kicked at
        self.invite_codes: list[str] = []

    # -- helpers -------------------------------------------------------------

    def _check_effects(self, effects: list[Any], before: dict[str, Any]) -> None:
        states = [e for e in effects if isinstance(e, BroadcastState)]
        assert len(states) <= 1
        for e in states:
            assert e.state["version"] > self.last_broadcast_version
            assert e.state["version"] == self.room.version
            assert e.state == self.room.state()
            self.last_broadcast_version = e.state["version"]
        if states:
            assert self.room.version == before["version"] + 1
        else:
            assert self.room.state() == before
        for e in effects:
            assert isinstance(e, (Reply, Error, Disconnect, BroadcastState, BroadcastPresence))

    # -- rules ---------------------------------------------------------------

    @rule(target=people, name=st.sampled_from(["ann", "bob", "cy"]))
    def join(self, name: str) -> str:
        self.counter += 1
        pid = f"p{self.counter}"
        before = copy.deepcopy(self.room.state())
        was_empty = not self.room.participants and not self.room.host_reserved
        effects = self.room.join(pid, name, self.now)
        assert len(effects) == 1
        assert isinstance(effects[0], Reply)
        assert effects[0].payload["you"]["role"] == (HOST if was_empty else LISTENER)
        self._check_effects(effects, before)
        return pid

    @rule(target=people, name=st.sampled_from(["dee", "eve"]), invited=st.booleans())
    def join_with_token(self, name: str, invited: bool) -> str:
        """A browser's join: with a token, and maybe an invite's role."""
        self.counter += 1
        pid, token = f"p{self.counter}", f"tok-{self.counter}"
        role = None
        if invited and self.invite_codes:
            role = self.room.admission(self.now, token, self.invite_codes[-1])[1]
        was_empty = not self.room.participants and not self.room.host_reserved
        (welcome,) = self.room.join(pid, name, self.now, token=token, role=role)
        assert isinstance(welcome, Reply)
        you = welcome.payload["you"]
        expected = HOST if was_empty else (COHOST if role == COHOST else LISTENER)
        assert you == {"id": pid, "name": name, "role": expected, "token": token}
        assert self.room.participant_for_token(token) is self.room.participants[pid]
        self.tokens[pid] = token
        return pid

    @rule(pid=consumes(people))
    def leave(self, pid: str) -> None:
        before = copy.deepcopy(self.room.state())
        host_before = self.room.host_id
        me = self.room.participants[pid]
        remaining = [p for p in self.room.participants.values() if p.id != pid]
        heir = min(remaining, key=lambda p: p.seq).id if remaining else None
        assert self.room.leave(pid, self.now) == []
        token = self.tokens.pop(pid, None)
        if token is not None:  # the seat is held: nobody inherits yet
            self.held[token] = (pid, me.name, me.role, self.now)
            assert self.room.holds_seat(token)
            assert self.room.host_id == (None if host_before == pid else host_before)
        elif host_before == pid:
            assert self.room.host_id == heir
        else:
            assert self.room.host_id == host_before
        self._check_effects([], before)

    @precondition(lambda self: self.held)
    @rule(target=people, data=st.data())
    def resume(self, data: st.DataObject) -> Any:
        """A held token resumes as the same id, name and role, within its grace only."""
        token = data.draw(st.sampled_from(sorted(self.held)))
        pid, name, role, left_at = self.held.pop(token)
        host_taken = self.room.host_id is not None
        # nobody hosts and nobody's host seat is held: whoever comes back hosts
        hostless = not host_taken and not self.room.host_reserved
        effects = self.room.resume(token, self.now)
        # expired (if polled since) or still held (if not): either way not twice
        if self.now >= left_at + RESUME_GRACE_MS and effects is None:
            assert not self.room.holds_seat(token)
            return multiple()
        assert effects is not None
        (welcome,) = effects
        assert isinstance(welcome, Reply)
        expected = LISTENER if role == HOST and host_taken else role
        if hostless:
            expected = HOST
        assert welcome.payload["you"] == {"id": pid, "name": name, "role": expected, "token": token}
        assert self.room.participants[pid].role == expected
        self.tokens[pid] = token
        return pid  # back in the bundle: later rules use the id again

    @rule(pid=people, out=consumes(people))
    def kick(self, pid: str, out: str) -> None:
        sender = self.room.participants[pid]
        victim = self.room.participants[out]
        token = self.tokens.get(out)
        effects = self.room.handle(pid, Kick(id=out), self.now)
        if sender.role != HOST:
            assert [(type(e), e.code) for e in effects] == [(Error, "not_host")]  # type: ignore[union-attr]
            return
        if out == pid:
            assert [(type(e), e.code) for e in effects] == [(Error, "no_such_participant")]  # type: ignore[union-attr]
            return
        assert effects == [Disconnect(out, "kicked", "the host removed you from this room", 4403)]
        assert out not in self.room.participants
        assert victim.role != HOST
        if token is not None:
            del self.tokens[out]
            self.kicked[token] = self.now
            assert self.room.is_banned(token, self.now)
            assert not self.room.holds_seat(token)
            assert self.room.resume(token, self.now) is None  # a kicked token does not resume
            assert self.room.is_banned(token, self.now + KICK_BAN_MS - 1)

    @rule(pid=people, role=st.sampled_from([LISTENER, COHOST]))
    def create_invite(self, pid: str, role: str) -> None:
        is_host = self.room.participants[pid].role == HOST
        effects = self.room.handle(pid, CreateInvite(role=role, expires_in=3600), self.now)
        if not is_host:
            assert [e.code for e in effects] == ["not_host"]  # type: ignore[union-attr]
            return
        (reply,) = effects
        assert isinstance(reply, Reply) and reply.kind == "invite"
        code = reply.payload["code"]
        assert self.room.admission(self.now, None, code) == (True, role)
        self.invite_codes.append(code)

    @precondition(lambda self: self.invite_codes)
    @rule(pid=people)
    def revoke_invite(self, pid: str) -> None:
        code = self.invite_codes[-1]
        is_host = self.room.participants[pid].role == HOST
        effects = self.room.handle(pid, RevokeInvite(code=code), self.now)
        if is_host:
            assert effects == [Reply(pid, "invite_revoked", {"code": code})]
            self.invite_codes.pop()
            assert self.room.valid_invite(code, self.now) is None
        else:
            assert [e.code for e in effects] == ["not_host"]  # type: ignore[union-attr]

    @rule(pid=people, msg=queue_messages)
    def queue(self, pid: str, msg: ClientMessage) -> None:
        ids_before = [item.id for item in self.room.queue]
        effects = self._handle(pid, msg)
        ids = [item.id for item in self.room.queue]
        assert len(set(ids)) == len(ids)
        if not any(isinstance(e, BroadcastState) for e in effects):
            assert ids == ids_before

    @rule(dt=time_steps)
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def poll(self) -> None:
        before = copy.deepcopy(self.room.state())
        effects = self.room.poll(self.now)
        for e in effects:
            # presence, or the state that ends a track / advances the queue
            assert isinstance(e, (BroadcastPresence, BroadcastState))
            if isinstance(e, BroadcastPresence):
                assert e.delta["count"] == len(self.room.participants)
        self._check_effects(effects, before)

    @rule(pid=people, rtt=rtts)
    def note_rtt(self, pid: str, rtt: float) -> None:
        self.room.note_rtt(pid, rtt)
        assert MIN_LEAD_MS <= self.room.lead_ms() <= MAX_LEAD_MS

    @rule(pid=people, msg=control_messages)
    def command(self, pid: str, msg: ClientMessage) -> None:
        self._handle(pid, msg)

    @rule(pid=people, to=people)
    def transfer(self, pid: str, to: str) -> None:
        self._handle(pid, TransferHost(to=to))

    @rule(pid=people)
    def transfer_to_stranger(self, pid: str) -> None:
        self._handle(pid, TransferHost(to="stranger"))

    def _handle(self, pid: str, msg: ClientMessage) -> list[Any]:
        before = copy.deepcopy(self.room.state())
        roles_before = {p.id: p.role for p in self.room.participants.values()}
        allowed = may_send(roles_before[pid], msg, self.room.settings.listeners_may_upload)
        effects = self.room.handle(pid, msg, self.now)
        self._check_effects(effects, before)
        errors = [e for e in effects if isinstance(e, Error)]
        if errors:
            # A refusal is exactly one error to the sender and changes nothing.
            assert len(effects) == 1
            assert errors[0].to == pid
            assert self.room.state() == before
            assert {p.id: p.role for p in self.room.participants.values()} == roles_before
        if not allowed:
            assert [e.code for e in errors] == ["not_host"]
        else:
            assert "not_host" not in [e.code for e in errors]
        return effects

    # -- invariants ----------------------------------------------------------

    @invariant()
    def exactly_one_host_when_occupied(self) -> None:
        hosts = [p for p in self.room.participants.values() if p.role == HOST]
        if self.room.host_reserved:  # the host's seat is held: nobody else is host
            assert hosts == []
            assert self.room.host_id is None
        elif self.room.participants:
            assert len(hosts) == 1
            assert self.room.host_id == hosts[0].id
        else:
            assert hosts == []
            assert self.room.host_id is None

    @invariant()
    def indexes_match_a_full_scan(self) -> None:
        """The O(1) indexes (crowds) say what scanning every participant would."""
        seats = self.room.seats
        people = seats.participants.values()
        assert seats._leads == {p.id: p for p in people if p.role != LISTENER}
        assert seats._by_hash == {p.token_hash: p for p in people if p.token_hash is not None}
        held_leads = {h: r for h, r in seats.held.items() if r.participant.role != "listener"}
        assert seats._reserved_leads == held_leads
        rtts = [p.rtt_ms for p in people if p.rtt_ms is not None]
        assert seats.worst_rtt() == max(rtts, default=None)
        untils = [r.until for r in seats.held.values()]
        assert untils == sorted(untils)  # deadline order: poll and next_deadline rely on it

    @invariant()
    def version_never_decreases(self) -> None:
        assert self.room.version >= self.last_version
        self.last_version = self.room.version

    @invariant()
    def start_at_never_goes_back(self) -> None:
        assert self.room.timeline.start_at >= self.last_start_at
        self.last_start_at = self.room.timeline.start_at

    @invariant()
    def position_is_within_bounds(self) -> None:
        pos = self.room.position_at(self.now)
        assert pos >= 0.0
        if self.room.track is not None and self.room.track.duration is not None:
            assert pos <= self.room.track.duration

    @invariant()
    def presence_deadline_is_near(self) -> None:
        deadline = self.room.seats.presence.due_at
        if deadline is not None:
            assert deadline <= self.now + 50.0 + 1e-6
        overall = self.room.next_deadline()
        if deadline is not None:
            assert overall is not None and overall <= deadline

    @invariant()
    def restores_to_the_same_room(self) -> None:
        """Room.restore(room.snapshot()) shows the same state and deadlines and goes
        on as the room does; every seat with a token is held for its grace."""
        room = self.room
        snap = json.loads(json.dumps(room.snapshot()))
        again = Room.restore("prop", snap, self.now, rng=copy.deepcopy(self.rng))
        assert again.state() == room.state()
        assert again.snapshot() == snap
        assert again.participants == {}
        held = [t for t in [*self.tokens.values(), *self.held] if room.holds_seat(t)]
        assert [t for t in held if again.holds_seat(t)] == held
        for token in self.kicked:
            assert again.is_banned(token, self.now) == room.is_banned(token, self.now)
        timeline_deadline = room._advance_due_at()
        seat_deadline = self.now + RESUME_GRACE_MS if again.seats.held else None
        deadlines = [t for t in (timeline_deadline, seat_deadline) if t is not None]
        assert again.next_deadline() == min(deadlines, default=None)
        if room.seats.next_deadline() is None:
            assert again.next_deadline() == room.next_deadline() or seat_deadline is not None
        twin = copy.deepcopy(room)
        for later in (self.now + 5_000.0, self.now + 60_000.0):
            mine = [e.state for e in twin.poll(later) if isinstance(e, BroadcastState)]
            theirs = [e.state for e in again.poll(later) if isinstance(e, BroadcastState)]
            assert theirs == mine

    @precondition(lambda self: self.room.host_id is not None)
    @rule()
    def host_can_always_control(self) -> None:
        host = self.room.host_id
        assert host is not None
        effects = self.room.handle(host, Seek(position=1.0), self.now)
        assert [type(e) for e in effects] == [BroadcastState]
        self.last_broadcast_version = self.room.version


TestRoomMachine = RoomMachine.TestCase
TestRoomMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- continuity of the position across pause and resume -----------------------

EPS_MS = 1e-3  # "just before" / "just after" a scheduled change
TOLERANCE = 1e-6  # seconds


def _continuity_ops() -> st.SearchStrategy[list[tuple[str, Any]]]:
    op = st.one_of(
        st.tuples(st.just("pause"), st.none()),
        st.tuples(st.just("play"), st.none()),
        st.tuples(st.just("wait"), time_steps),
        st.tuples(st.just("wait_long"), st.integers(min_value=0, max_value=120_000)),
        st.tuples(st.just("rtt"), rtts),
        st.tuples(st.just("volume"), st.floats(min_value=0.0, max_value=1.0)),
    )
    return st.lists(op, min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    ops=_continuity_ops(),
    duration=st.none() | st.floats(min_value=1.0, max_value=600.0),
    autoplay=st.booleans(),
)
def test_position_is_continuous_across_pause_and_resume(
    ops: list[tuple[str, Any]], duration: float | None, autoplay: bool
) -> None:
    room = Room("cont")
    room.join("h", "host", T0)
    room.join("l", "listener", T0)
    now = T0
    room.handle("h", SetTrack(url="/media/a.mp3", duration=duration, autoplay=autoplay), now)
    last_start = room.timeline.start_at
    last_version = room.version
    for kind, arg in ops:
        if kind in ("wait", "wait_long"):
            now += float(arg)
            continue
        if kind == "rtt":
            room.note_rtt("l", arg)
            continue
        old: Timeline = room.timeline
        msg: ClientMessage = (
            Volume(volume=arg) if kind == "volume" else (Pause() if kind == "pause" else Play())
        )
        effects = room.handle("h", msg, now)
        new = room.timeline
        if not effects:
            # No-op: play while playing, pause while paused, same volume.
            assert new == old
            assert room.version == last_version
            continue
        (effect,) = effects
        assert isinstance(effect, BroadcastState)
        assert room.version == last_version + 1
        last_version = room.version
        assert new.start_at >= last_start
        last_start = new.start_at
        if kind == "volume":
            assert new == old
            continue
        at = new.start_at
        assert at >= now + MIN_LEAD_MS - 1e-6
        assert new.paused is (kind == "pause")
        before = old.position_at(at - EPS_MS, duration)
        after = new.position_at(at + EPS_MS, duration)
        assert abs(after - before) <= 2 * EPS_MS / 1000.0 + TOLERANCE, (kind, old, new)
        # Exactly at the switch both timelines agree.
        assert abs(old.position_at(at, duration) - new.position_at(at, duration)) <= TOLERANCE
