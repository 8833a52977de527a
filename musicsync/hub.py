"""The trio edge of rooms: live clients, their outboxes, fan-out and room timers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .access import hash_password
from .clock import ServerClock
from .config import Settings
from .metrics import Metrics
from .outbox import Outbox, OutboxOverflow, PendingPong
from .protocol import ClientMessage, QueueAdd, SetPassword, encode, error_frame
from .ratelimit import TokenBucket
from .room import (
    HOST,
    PLAYBACK_ROLES,
    BroadcastPresence,
    BroadcastState,
    Effect,
    Error,
    Participant,
    Reply,
    Room,
    Track,
)
from .store import RoomStore, StoreError

log = logging.getLogger(__name__)

# Close codes (docs/protocol.md lists them all).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_HEARTBEAT = 4000
CLOSE_SLOW = 4008
CLOSE_BAD_ROOM = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_KICKED = 4403
CLOSE_REPLACED = 4409
CLOSE_ROOM_CLOSED = 4410
CLOSE_TOO_MANY = 4429

# Wrong-password guesses allowed per address: a burst, then one every 12 s.
PASSWORD_ATTEMPT_BURST = 5.0
PASSWORD_ATTEMPTS_PER_SECOND = 1 / 12
# Per-address buckets kept at most; past this they are dropped wholesale.
MAX_TRACKED_ADDRESSES = 10_000


class Client:
    """One connected participant as the edge sees it: outbox, doorbell, fate."""

    def __init__(self, ip: str, outbox_max_frames: int) -> None:
        self.id = secrets.token_urlsafe(8)
        self.token = secrets.token_urlsafe(16)  # 128 bits; never logged
        self.ip = ip
        self.outbox = Outbox(outbox_max_frames)
        self._bell_send, self._bell_recv = trio.open_memory_channel[None](1)
        self.last_seen = trio.current_time()
        self.close_code: int | None = None
        self.close_reason = ""
        # The newest state frame handed to this client and when (broadcast latency).
        self.state_frame: str | None = None
        self.state_queued_at = 0.0

    def _ring(self) -> None:
        with contextlib.suppress(trio.WouldBlock):  # the writer is already due to wake
            self._bell_send.send_nowait(None)

    def deliver(self, frame: str) -> None:
        self._guarded(self.outbox.push, frame)

    def deliver_state(self, frame: str) -> None:
        self.state_frame, self.state_queued_at = frame, trio.current_time()
        self._guarded(self.outbox.push_state, frame)

    def deliver_pong(self, t0: float, t1: float) -> None:
        try:
            self.outbox.push_pong(t0, t1)
        except OutboxOverflow:
            self.fail(CLOSE_SLOW, "slow consumer")
        self._ring()

    def _guarded(self, push: Any, frame: str) -> None:
        if self.close_code is not None:
            return
        try:
            push(frame)
        except OutboxOverflow:
            self.fail(CLOSE_SLOW, "slow consumer")
        self._ring()

    def fail(self, code: int, reason: str) -> None:
        """Ask the writer to close this connection once it has flushed."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self._ring()

    async def wait_for_frames(self) -> None:
        await self._bell_recv.receive()


@dataclass
class RoomEntry:
    room: Room
    clients: dict[str, Client] = field(default_factory=dict)
    empty_since: float | None = None
    bell: trio.Event = field(default_factory=trio.Event)

    def wake(self) -> None:
        self.bell.set()


@dataclass
class HubStats:
    connections_total: int = 0
    messages_in: int = 0
    messages_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    coalesced_states: int = 0


class Hub:
    """All rooms of this process and the clients in them."""

    def __init__(
        self, settings: Settings, clock: ServerClock, store: RoomStore | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self._db_lane = trio.CapacityLimiter(1)  # one writer thread, writes in order
        self._nursery: trio.Nursery | None = None
        self.rooms: dict[str, RoomEntry] = {}
        self.track_lookup: Callable[[str], Track | None] | None = None
        self.per_ip: Counter[str] = Counter()
        self._password_buckets: dict[str, TokenBucket] = {}
        self.stats = HubStats()
        self.metrics = Metrics(self)
        self.closing = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the room timers until ``close``."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def shutdown(self) -> None:
        """Tell every client to reconnect (1001) and wait for the writers to flush.

        Returns once every client has left, or after ``settings.shutdown_grace``.
        """
        self.closing = True
        for entry in list(self.rooms.values()):
            for client in list(entry.clients.values()):
                client.fail(CLOSE_GOING_AWAY, "server restarting")
        with trio.move_on_after(self.settings.shutdown_grace):
            while self.connection_count:  # noqa: ASYNC110 - once, at shutdown
                await trio.sleep(0.01)

    def close(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- queries -------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return sum(self.per_ip.values())

    def password_attempt_allowed(self, ip: str) -> bool:
        if len(self._password_buckets) > MAX_TRACKED_ADDRESSES:
            self._password_buckets.clear()  # bounded memory under a distributed storm
        bucket = self._password_buckets.setdefault(
            ip, TokenBucket(PASSWORD_ATTEMPTS_PER_SECOND, PASSWORD_ATTEMPT_BURST)
        )
        return bucket.try_take(trio.current_time())

    async def close_room(self, room_name: str) -> int | None:
        """Operator action: disconnect everyone and forget the room (and its storage)."""
        entry = self.rooms.pop(room_name, None)
        if entry is None:
            return None
        clients = list(entry.clients.values())
        entry.clients.clear()
        for client in clients:
            client.fail(CLOSE_ROOM_CLOSED, "room closed by the operator")
        entry.empty_since = trio.current_time() - self.settings.room_idle_ttl
        entry.wake()
        await self._forget(room_name)
        return len(clients)

    def admits(self, ip: str) -> bool:
        return self.per_ip[ip] < self.settings.max_connections_per_ip

    # -- membership ----------------------------------------------------------

    def new_client(self, ip: str) -> Client:
        self.per_ip[ip] += 1
        self.stats.connections_total += 1
        client = Client(ip, self.settings.outbox_max_frames)
        if self.closing:
            client.fail(CLOSE_GOING_AWAY, "server restarting")
        return client

    def room_entry(self, room_name: str, room: Room | None = None) -> RoomEntry:
        """The live room of that name, created (with its timer) if need be."""
        entry = self.rooms.get(room_name)
        if entry is None:
            grace_ms = self.settings.resume_grace * 1000
            entry = RoomEntry(room or Room(room_name, resume_grace_ms=grace_ms))
            self.rooms[room_name] = entry
            if self._nursery is None:
                raise RuntimeError("Hub.run() is not running")
            self._nursery.start_soon(self._room_timer, room_name, entry)
            log.info("room %s %s", room_name, "restored" if room else "created")
        return entry

    # -- persistence -----------------------------------------------------------

    async def restore_rooms(self) -> int:
        """Bring back every stored room, its timeline running on as the clock says."""
        if self.store is None:
            return 0
        store = self.store
        rows = await trio.to_thread.run_sync(lambda: list(store.load_all()), limiter=self._db_lane)
        now = self.clock.now_ms()
        for name, snap in rows:
            try:
                room = Room.restore(name, snap, now, self.settings.resume_grace * 1000)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("room %s could not be restored (%s); skipped", name, exc)
                continue
            entry = self.room_entry(name, room)
            entry.empty_since = trio.current_time()
        return len(rows)

    async def persist(self, entry: RoomEntry) -> None:
        """Commit the room's snapshot; returns once it is durable."""
        if self.store is None:
            return
        room = entry.room
        save = functools.partial(self.store.save, room.name, room.version, room.snapshot())
        try:
            await trio.to_thread.run_sync(save, limiter=self._db_lane)
        except (sqlite3.Error, StoreError) as exc:
            self.stats.errors["store"] += 1
            log.error("could not save room %s: %s", room.name, exc)

    async def persist_all(self) -> None:
        for entry in list(self.rooms.values()):
            await self.persist(entry)

    async def _forget(self, room_name: str) -> None:
        if self.store is None:
            return
        forget = functools.partial(self.store.delete, room_name)
        try:
            await trio.to_thread.run_sync(forget, limiter=self._db_lane)
        except (sqlite3.Error, StoreError) as exc:
            log.error("could not delete room %s: %s", room_name, exc)

    async def close_store(self) -> None:
        """Close the database in the writers' lane, after any write in flight."""
        if self.store is not None:
            await trio.to_thread.run_sync(self.store.close, limiter=self._db_lane)

    def join(
        self,
        room_name: str,
        client: Client,
        name: str,
        resume_token: str | None = None,
        role: str | None = None,
    ) -> None:
        """Seat ``client``: as the participant ``resume_token`` names, else as someone new."""
        entry = self.room_entry(room_name)
        room = entry.room
        now = self.clock.now_ms()
        effects = None
        if resume_token:
            live = room.participant_for_token(resume_token)
            if live is not None:  # a second tab, or a drop the server has not seen yet
                old = entry.clients.pop(live.id, None)
                if old is not None:
                    old.fail(CLOSE_REPLACED, "replaced by a newer connection")
                self._apply(entry, room.leave(live.id, now))
            effects = room.resume(resume_token, now)
        if effects is None:
            effects = room.join(client.id, name, now, client.token, role)
        else:
            client.id, client.token = effects[0].to, resume_token or client.token  # type: ignore[union-attr]
        entry.clients[client.id] = client
        entry.empty_since = None
        self._apply(entry, effects)

    def participant_for_token(self, room_name: str, token: str) -> Participant | None:
        entry = self.rooms.get(room_name)
        return entry.room.participant_for_token(token) if entry and token else None

    def may_upload(self, room_name: str, participant: Participant) -> bool:
        entry = self.rooms.get(room_name)
        if entry is None or participant.id not in entry.room.participants:
            return False
        return participant.role in PLAYBACK_ROLES or entry.room.settings.listeners_may_upload

    def leave(self, room_name: str, client: Client) -> None:
        self.per_ip[client.ip] -= 1
        if self.per_ip[client.ip] <= 0:
            del self.per_ip[client.ip]
        if client.close_code is not None:
            self.stats.closes[client.close_code] += 1
        entry = self.rooms.get(room_name)
        if entry is None or entry.clients.get(client.id) is not client:
            return  # never seated, or replaced by a newer connection
        del entry.clients[client.id]
        self._apply(entry, entry.room.leave(client.id, self.clock.now_ms()))
        if not entry.clients:
            entry.empty_since = trio.current_time()
            entry.wake()

    async def handle(self, room_name: str, client: Client, msg: ClientMessage) -> None:
        """Apply a control message; a change is durable before anyone hears of it."""
        entry = self.rooms[room_name]
        if isinstance(msg, QueueAdd) and msg.track_id is not None and msg.url is None:
            msg = self._resolve_queue_add(msg)
        if isinstance(msg, SetPassword):
            effects = await self._set_password(entry, client, msg.password)
        else:
            effects = entry.room.handle(client.id, msg, self.clock.now_ms())
        await self._persist_then_apply(entry, effects)

    async def _set_password(
        self, entry: RoomEntry, client: Client, password: str | None
    ) -> list[Effect]:
        sender = entry.room.participants.get(client.id)
        if sender is None or sender.role != HOST:
            return [Error(client.id, "not_host", "only the host may set the password")]
        hashed = None
        if password:
            hashed = await trio.to_thread.run_sync(hash_password, password)
        return entry.room.set_password_hash(client.id, hashed)

    async def _persist_then_apply(self, entry: RoomEntry, effects: list[Effect]) -> None:
        if any(isinstance(e, (BroadcastState, BroadcastPresence)) for e in effects):
            await self.persist(entry)
        self._apply(entry, effects)

    def _resolve_queue_add(self, msg: QueueAdd) -> QueueAdd:
        track = self.resolve_track(msg.track_id or "")
        if track is None:
            return msg  # the room answers no_such_track
        title = msg.title or track.title
        return dataclasses.replace(msg, url=track.url, title=title, duration=track.duration)

    def resolve_track(self, track_id: str) -> Track | None:
        """A library track by id; the app installs the library's lookup here."""
        return self.track_lookup(track_id) if self.track_lookup is not None else None

    def note_rtt(self, room_name: str, client: Client, rtt_ms: float) -> None:
        self.rooms[room_name].room.note_rtt(client.id, rtt_ms)

    def announce(self, kind: str, **payload: Any) -> None:
        """One frame to every client of every room, encoded once."""
        frame = encode(kind, **payload)
        for entry in self.rooms.values():
            for client in entry.clients.values():
                client.deliver(frame)

    def error(self, client: Client, code: str, message: str) -> None:
        self.stats.errors[code] += 1
        client.deliver(error_frame(code, message))

    # -- fan-out -------------------------------------------------------------

    def _apply(self, entry: RoomEntry, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Reply) and effect.kind == "kicked":
                target = entry.clients.pop(effect.to, None)
                if target is not None:
                    self.error(target, "kicked", "the host removed you from this room")
                    target.fail(CLOSE_KICKED, "kicked")
            elif isinstance(effect, Reply):
                target = entry.clients.get(effect.to)
                if target is not None:
                    target.deliver(encode(effect.kind, **effect.payload))
            elif isinstance(effect, Error):
                target = entry.clients.get(effect.to)
                if target is not None:
                    self.error(target, effect.code, effect.message)
            elif isinstance(effect, BroadcastState):
                frame = encode("state", room=effect.state)  # encoded once for everyone
                for c in entry.clients.values():
                    c.deliver_state(frame)
            elif isinstance(effect, BroadcastPresence):
                frame = encode("presence", **effect.delta)
                for c in entry.clients.values():
                    c.deliver(frame)
        if entry.room.next_deadline() is not None:
            entry.wake()

    def encode_pong(self, pong: PendingPong) -> str:
        return encode("pong", t0=pong.t0, t1=pong.t1, t2=self.clock.now_ms())

    # -- timers --------------------------------------------------------------

    async def _room_timer(self, room_name: str, entry: RoomEntry) -> None:
        """Flush coalesced presence on time; forget the room once idle long enough."""
        while True:
            deadline_ms = entry.room.next_deadline()
            deadline = trio.current_time() + (
                (deadline_ms - self.clock.now_ms()) / 1000.0 if deadline_ms is not None else 1e9
            )
            if entry.empty_since is not None:
                deadline = min(deadline, entry.empty_since + self.settings.room_idle_ttl)
            with trio.move_on_at(deadline):
                await entry.bell.wait()
            await self._persist_then_apply(entry, entry.room.poll(self.clock.now_ms()))
            # Only after applying: _apply rings the bell whenever the room has a
            # deadline (a playing track always has one), and a bell rung by our
            # own poll would wake this loop at once, forever (a busy loop that
            # took a whole core). The deadline is recomputed from the room's
            # state at the top of the loop, so no other task's change is lost.
            entry.bell = trio.Event()
            if (
                entry.empty_since is not None
                and trio.current_time() >= entry.empty_since + self.settings.room_idle_ttl
            ):
                if self.rooms.get(room_name) is entry:
                    del self.rooms[room_name]
                    await self._forget(room_name)
                log.info("room %s forgotten after being idle", room_name)
                return
