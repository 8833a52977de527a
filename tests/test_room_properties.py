"""Property tests of the room's invariants under random sequences of events."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from musicsync.protocol import (
    ClaimHost,
    ClientMessage,
    Pause,
    Play,
    Seek,
    SetTrack,
    TransferHost,
    Volume,
)
from musicsync.room import (
    HOST,
    LISTENER,
    MAX_LEAD_MS,
    MIN_LEAD_MS,
    BroadcastPresence,
    BroadcastState,
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


class RoomMachine(RuleBasedStateMachine):
    """Joins, leaves, RTT reports, polls and control messages from anyone."""

    people = Bundle("people")

    def __init__(self) -> None:
        super().__init__()
        self.room = Room("prop")
        self.now = T0
        self.counter = 0
        self.last_version = 0
        self.last_broadcast_version = 0
        self.last_start_at = self.room.timeline.start_at

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
            assert isinstance(e, (Reply, Error, BroadcastState, BroadcastPresence))

    # -- rules ---------------------------------------------------------------

    @rule(target=people, name=st.sampled_from(["ann", "bob", "cy"]))
    def join(self, name: str) -> str:
        self.counter += 1
        pid = f"p{self.counter}"
        before = copy.deepcopy(self.room.state())
        was_empty = not self.room.participants
        effects = self.room.join(pid, name, self.now)
        assert len(effects) == 1
        assert isinstance(effects[0], Reply)
        assert effects[0].payload["you"]["role"] == (HOST if was_empty else LISTENER)
        self._check_effects(effects, before)
        return pid

    @rule(pid=consumes(people))
    def leave(self, pid: str) -> None:
        before = copy.deepcopy(self.room.state())
        host_before = self.room.host_id
        remaining = [p for p in self.room.participants.values() if p.id != pid]
        heir = min(remaining, key=lambda p: p.seq).id if remaining else None
        assert self.room.leave(pid, self.now) == []
        if host_before == pid:
            assert self.room.host_id == heir
        else:
            assert self.room.host_id == host_before
        self._check_effects([], before)

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

    def _handle(self, pid: str, msg: ClientMessage) -> None:
        before = copy.deepcopy(self.room.state())
        roles_before = {p.id: p.role for p in self.room.participants.values()}
        is_host = roles_before[pid] == HOST
        effects = self.room.handle(pid, msg, self.now)
        self._check_effects(effects, before)
        errors = [e for e in effects if isinstance(e, Error)]
        if errors:
            # A refusal is exactly one error to the sender and changes nothing.
            assert len(effects) == 1
            assert errors[0].to == pid
            assert self.room.state() == before
            assert {p.id: p.role for p in self.room.participants.values()} == roles_before
        if not is_host and not isinstance(msg, ClaimHost):
            assert [e.code for e in errors] == ["not_host"]

    # -- invariants ----------------------------------------------------------

    @invariant()
    def exactly_one_host_when_occupied(self) -> None:
        hosts = [p for p in self.room.participants.values() if p.role == HOST]
        if self.room.participants:
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

    @precondition(lambda self: self.room.participants)
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
