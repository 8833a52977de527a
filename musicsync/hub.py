"""The trio edge of rooms: live clients, their outboxes, fan-out and room timers."""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import math
import random
import secrets
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .access import hash_password
from .clock import ServerClock
from .config import Settings
from .fanpool import SenderDied, SenderPool, default_threads
from .health import Device, RoomHealth
from .metrics import Metrics
from .outbox import Frame, Outbox, OutboxOverflow, PendingPong
from .protocol import ClientMessage, QueueAdd, Report, SetPassword, encode, error_frame
from .ratelimit import TokenBucket
from .room import (
    HOST,
    PLAYBACK_ROLES,
    BroadcastPresence,
    BroadcastState,
    Disconnect,
    Effect,
    Error,
    Participant,
    Reply,
    Room,
    Track,
)
from .roomwriter import RoomWriter
from .store import RoomStore

log = logging.getLogger(__name__)

# Close codes (docs/protocol.md lists them all).
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
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

# The hub looks for silent clients this often (at most; a quarter of the
# heartbeat timeout when that is shorter).
HEARTBEAT_SWEEP_PERIOD = 1.0
HEARTBEAT_SWEEPS_PER_TIMEOUT = 4

# Wrong-password guesses allowed per address: a burst, then one every 12 s.
PASSWORD_ATTEMPT_BURST = 5.0
PASSWORD_ATTEMPTS_PER_SECOND = 1 / 12
# Per-address buckets kept at most; past this they are dropped wholesale.
MAX_TRACKED_ADDRESSES = 10_000
# New rooms per address: settings.new_rooms_per_ip_per_hour at once, refilled
# over this window.
NEW_ROOMS_REFILL_SECONDS = 3600.0
# A room the timer has just polled is not polled again sooner than this, even
# if its deadline stayed in the past (a bug there must not spin the loop).
TIMER_MIN_REPOLL = 0.001
# Stale timer entries (a room's deadline moved earlier) are swept out once the
# heap holds more than twice the live rooms plus this many.
TIMER_HEAP_SLACK = 64


class Sink(Protocol):
    """A client's socket seen from the fan-out: bytes in without waiting."""

    @property
    def idle(self) -> bool:
        """Nothing of an earlier frame is still waiting to be written."""
        ...

    def offer(self, data: bytes) -> bool:
        """Write what the socket takes now and keep the rest for the writer.

        False only when the socket took nothing (its buffer is full): the
        caller then queues the frame instead.
        """
        ...

    @property
    def raw_send(self) -> Callable[[bytes], int] | None:
        """The non-blocking socket's own ``send``, for the sender pool to call
        while the loop waits (None: only ``offer`` writes here)."""
        ...

    def settle(self, data: bytes, outcome: int | OSError) -> bool:
        """Take note of what a ``raw_send(data)`` did (bytes taken, or its
        error) as ``offer`` would have; returns what ``offer`` would have."""
        ...


# A change to a room, applied to whichever copy of it is current: (room, now) -> effects.
RoomOp = Callable[[Room, float], list[Effect]]


class RoomBackend(Protocol):
    """Where rooms live when other server processes share them (cluster.py, ``--redis``).

    Without one the hub keeps rooms itself and persists them to SQLite. With
    one, every change to a room goes through it as an operation (applied, and
    applied again after a lost race) and its effects are delivered only once
    the backend has committed it.
    """

    async def run(self, hub: Hub, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    async def load(self, room_name: str) -> tuple[str, str, int] | None:
        """Bring in the shared room's newest state; a refusal (code, message, close code)."""
        ...

    def join(
        self,
        entry: RoomEntry,
        client: Client,
        name: str,
        resume_token: str | None,
        role: str | None,
    ) -> trio.Event: ...

    def leave(self, entry: RoomEntry, pid: str) -> None: ...

    def share_offset(self, entry: RoomEntry, pid: str) -> None:
        """``pid``, connected here, reported a new device latency offset."""
        ...

    def health(self, entry: RoomEntry, now_ms: float) -> dict[str, Any] | None:
        """The room's ``health`` payload if one is due, with other nodes' devices."""
        ...

    async def change(self, entry: RoomEntry, client: Client, op: RoomOp) -> None: ...

    def tick(self, entry: RoomEntry, now: float) -> float:
        """The room's timer is due; returns the trio time before which not to tick it again."""
        ...

    def forget(self, room_name: str) -> None: ...

    async def close(self, room_name: str) -> None: ...

    async def flush(self) -> None: ...


class Client:
    """One connected participant as the edge sees it: outbox, doorbell, fate.

    A frame goes straight to the socket (``sink``) when nothing is waiting
    ahead of it; only a socket whose kernel buffer is full hands frames to the
    outbox and wakes this client's writer task.
    """

    def __init__(self, ip: str, outbox_max_frames: int) -> None:
        self.id = secrets.token_urlsafe(8)
        self.token = secrets.token_urlsafe(16)  # 128 bits; never logged
        self.ip = ip
        self.outbox: Outbox[Frame] = Outbox(outbox_max_frames)
        self.sink: Sink | None = None
        self._waiter: trio.lowlevel.Task | None = None
        self._rung = False
        self.last_seen = trio.current_time()
        self.close_code: int | None = None
        self.close_reason = ""
        # The newest state frame handed to this client and when (broadcast latency).
        self.state_frame: Frame | None = None
        self.state_queued_at = 0.0
        # The newest revision of the room's queue this client was sent.
        self.queue_rev = 0

    def _ring(self) -> None:
        """Wake the writer (or make its next wait return at once)."""
        waiter = self._waiter
        if waiter is None:
            self._rung = True
        else:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def send_now(self, frame: Frame) -> bool:
        """Write ``frame`` directly if nothing is queued ahead of it; True if it went."""
        sink = self.sink
        if sink is None or not sink.idle or self.outbox or self.close_code is not None:
            return False
        if not sink.offer(frame.wire):
            return False
        if not sink.idle:
            self._ring()  # the writer flushes the tail
        return True

    def direct_send(self) -> Callable[[bytes], int] | None:
        """The socket's ``send`` if a frame may go straight to it now (as
        ``send_now`` would write it), else None."""
        sink = self.sink
        if sink is None or not sink.idle or self.outbox or self.close_code is not None:
            return None
        return sink.raw_send

    def settle_direct(self, data: bytes, outcome: int | OSError) -> bool:
        """After the sender pool called ``direct_send()(data)``: what ``send_now``
        would have returned (False: nothing went, queue the frame)."""
        sink = self.sink
        assert sink is not None
        if not sink.settle(data, outcome):
            return False
        if not sink.idle:
            self._ring()  # the writer flushes the tail
        return True

    def deliver(self, frame: Frame) -> bool:
        """Queue (or write at once) one frame; True if it was written directly."""
        if self.send_now(frame):
            return True
        self.enqueue(frame)
        return False

    def enqueue(self, frame: Frame) -> None:
        """Hand ``frame`` to the writer, behind whatever waits already."""
        self._guarded(self.outbox.push, frame)

    def deliver_state(self, frame: Frame) -> bool:
        """Like ``deliver``, but a queued state is replaced by a newer one."""
        if self.send_now(frame):
            self.saw(frame)
            return True
        self.enqueue_state(frame)
        return False

    def enqueue_state(self, frame: Frame) -> None:
        """Hand a state to the writer; it replaces a state still waiting."""
        self.state_frame, self.state_queued_at = frame, trio.current_time()
        self._guarded(self.outbox.push_state, frame)

    def saw(self, frame: Frame) -> None:
        """``frame`` reached the socket: note the queue it carried, if any."""
        if frame.queue_rev is not None and frame.queue_rev > self.queue_rev:
            self.queue_rev = frame.queue_rev

    def deliver_pong(self, t0: float, t1: float) -> None:
        try:
            self.outbox.push_pong(t0, t1)
        except OutboxOverflow:
            self.fail(CLOSE_SLOW, "slow consumer")
        self._ring()

    def _guarded(self, push: Callable[[Frame], None], frame: Frame) -> None:
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
        """Until ``_ring``; at once if it rang since the last wait."""
        if self._rung:
            self._rung = False
            await trio.lowlevel.checkpoint()
            return
        self._waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


@dataclass(slots=True, eq=False)
class RoomEntry:
    """A live room: its clients, idle clock, timer slot and changes waiting for the disk."""

    room: Room
    clients: dict[str, Client] = field(default_factory=dict)
    empty_since: float | None = None
    # The hub's timer: wake() asks it to look at this room's deadline again.
    on_wake: Callable[[RoomEntry], None] | None = field(default=None, repr=False)
    due: float = math.inf  # trio time the timer will poll this room at
    timer_seq: int = -1  # which heap item is this room's live one
    durable_revision: int = 0  # room.revision known to be on disk
    captured_revision: int = 0  # room.revision of the snapshot last handed to the writer
    # Effects held until the room's revision (first item) is on disk, in order.
    backlog: list[tuple[int, list[Effect]]] = field(default_factory=list)
    # Devices' latest reports: the health frame its hosts and co-hosts get.
    health: RoomHealth = field(default_factory=RoomHealth)

    def wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake(self)


@dataclass
class HubStats:
    connections_total: int = 0
    messages_in: int = 0
    messages_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    coalesced_states: int = 0  # of clients that left (``Hub.coalesced_states`` adds the others)


class Hub:
    """All rooms of this process and the clients in them."""

    def __init__(
        self,
        settings: Settings,
        clock: ServerClock,
        store: RoomStore | None = None,
        backend: RoomBackend | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.store = store
        self.backend = backend  # rooms shared with other processes (--redis), or None
        self._db_lane = trio.CapacityLimiter(1)  # one writer thread, writes in order
        self.writer = RoomWriter(store, self._db_lane) if store is not None else None
        # One timer for every room: (due, seq, entry); see _timer_loop.
        self._timer_heap: list[tuple[float, int, RoomEntry]] = []
        self._timer_seq = 0
        self._timer_bell = trio.Event()
        self._timer_next = math.inf
        self._room_buckets: dict[str, TokenBucket] = {}
        # One shuffle generator for every room (a Random each cost ~3 KB a room).
        self._rng = random.Random()
        self._nursery: trio.Nursery | None = None
        self.rooms: dict[str, RoomEntry] = {}
        self.track_lookup: Callable[[str], Track | None] | None = None
        self.per_ip: Counter[str] = Counter()
        self._password_buckets: dict[str, TokenBucket] = {}
        self.stats = HubStats()
        self.closing = False
        # Big rooms' broadcasts share their sends with these threads (run()
        # starts them); until then, and after, the loop sends alone.
        self.senders = SenderPool(0)
        self.metrics = Metrics(self)  # last: registering it reads the hub once

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the room writer, the rooms' timer and the heartbeat sweep until ``close``."""
        self.senders = SenderPool(default_threads())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.writer is not None:
                    await nursery.start(self.writer.run)
                if self.backend is not None:
                    await nursery.start(self.backend.run, self)
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self.sweep_heartbeats)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.senders.close()  # idle threads: returns at once

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

    def coalesced_states(self) -> int:
        """States replaced in a full socket's outbox by a newer one, since start."""
        live = sum(c.outbox.coalesced for e in self.rooms.values() for c in e.clients.values())
        return self.stats.coalesced_states + live

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
        if self.backend is not None:
            await self.backend.close(room_name)
        await self._forget(room_name)  # the timer drops the entry: no longer in self.rooms
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
        """The live room of that name, created (on the hub's timer) if need be."""
        entry = self.rooms.get(room_name)
        if entry is None:
            if self._nursery is None:
                raise RuntimeError("Hub.run() is not running")
            grace_ms = self.settings.resume_grace * 1000
            entry = RoomEntry(room or Room(room_name, resume_grace_ms=grace_ms, rng=self._rng))
            entry.on_wake = self._reschedule
            entry.durable_revision = entry.captured_revision = entry.room.revision
            self.rooms[room_name] = entry
            entry.wake()
            log.info("room %s %s", room_name, "restored" if room else "created")
        return entry

    def room_refusal(self, room_name: str, ip: str) -> tuple[str, str, int] | None:
        """None if the room exists or ``ip`` may open it; else (code, message, close code).

        A room that may be opened is opened here, empty, with no await between
        the count and the creation, so that concurrent handshakes cannot pass
        ``max_rooms`` together; it is forgotten after ``room_idle_ttl`` unless
        someone joins it.
        """
        if room_name in self.rooms:
            return None
        if len(self.rooms) >= self.settings.max_rooms:
            self.stats.errors["too_many_rooms"] += 1
            return (
                "too_many_rooms",
                f"this server holds {self.settings.max_rooms} rooms; join one or try later",
                CLOSE_TOO_MANY,
            )
        if len(self._room_buckets) > MAX_TRACKED_ADDRESSES:
            self._room_buckets.clear()  # bounded memory; max_rooms still holds
        burst = float(self.settings.new_rooms_per_ip_per_hour)
        bucket = self._room_buckets.setdefault(
            ip, TokenBucket(burst / NEW_ROOMS_REFILL_SECONDS, burst)
        )
        if not bucket.try_take(trio.current_time()):
            self.stats.errors["too_many_new_rooms"] += 1
            return (
                "too_many_new_rooms",
                "this address opened too many rooms; join one or try later",
                CLOSE_TOO_MANY,
            )
        entry = self.room_entry(room_name)
        entry.empty_since = trio.current_time()
        entry.wake()
        return None

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
                grace_ms = self.settings.resume_grace * 1000
                room = Room.restore(name, snap, now, grace_ms, rng=self._rng)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("room %s could not be restored (%s); skipped", name, exc)
                continue
            entry = self.room_entry(name, room)
            entry.empty_since = trio.current_time()
            entry.wake()
        return len(rows)

    async def persist(self, entry: RoomEntry) -> None:
        """Commit the room's snapshot if it changed; returns once it is durable."""
        done = self._persist_soon(entry, [])
        if done is not None:
            await done.wait()

    async def load_room(self, room_name: str) -> tuple[str, str, int] | None:
        """Before admission: a shared room's newest state (a refusal if it cannot be had)."""
        if self.backend is None:
            return None
        return await self.backend.load(room_name)

    async def persist_all(self) -> None:
        if self.backend is not None:
            await self.backend.flush()
        for entry in list(self.rooms.values()):
            self._persist_soon(entry, [])
        if self.writer is not None:
            await self.writer.flush()  # one transaction for all of them

    def _persist_soon(self, entry: RoomEntry, effects: list[Effect]) -> trio.Event | None:
        """Apply ``effects`` once the room's current revision is durable.

        None if that is already so (they were applied now); else the event that
        is set once the writer has settled the batch holding the room (the
        effects are applied, in order, just before). Only the hub's tasks apply
        them, so a cancelled waiter loses nothing.
        """
        room = entry.room
        if self.writer is None or (room.revision <= entry.durable_revision and not entry.backlog):
            self._apply(entry, effects)
            return None
        entry.backlog.append((room.revision, effects))
        capture = functools.partial(self._capture, entry)
        return self.writer.submit(room.name, capture, functools.partial(self._settled, entry))

    @staticmethod
    def _capture(entry: RoomEntry) -> tuple[int, dict[str, Any]]:
        room = entry.room
        entry.captured_revision = room.revision
        # The writer thread encodes it while the loop goes on (the room's parts
        # hand out fresh containers; this shallow copy of the top is a guard).
        snapshot = {k: dict(v) if isinstance(v, dict) else v for k, v in room.snapshot().items()}
        return room.version, snapshot

    def _settled(self, entry: RoomEntry, durable: bool) -> None:
        """The writer wrote (or failed to write: logged) the captured revision."""
        upto = entry.captured_revision
        if durable:
            entry.durable_revision = max(entry.durable_revision, upto)
        else:
            self.stats.errors["store"] += 1
        ready = [effects for revision, effects in entry.backlog if revision <= upto]
        entry.backlog = [item for item in entry.backlog if item[0] > upto]
        for effects in ready:
            self._apply(entry, effects)

    async def _forget(self, room_name: str) -> None:
        """Delete the stored room, after any save of it queued before."""
        if self.writer is not None:
            await self.writer.forget(room_name).wait()

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
    ) -> trio.Event | None:
        """Seat ``client``: as the participant ``resume_token`` names, else as someone new.

        With a backend the seat is taken once the backend has committed it: the
        event is set then (or once it was refused: ``client.close_code`` is set).
        """
        entry = self.room_entry(room_name)
        if self.backend is not None:
            return self.backend.join(entry, client, name, resume_token, role)
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
        client.queue_rev = room.queue_rev  # the welcome carries the whole queue
        self._apply(entry, effects)
        return None

    def participant_for_token(self, room_name: str, token: str) -> Participant | None:
        entry = self.rooms.get(room_name)
        return entry.room.participant_for_token(token) if entry and token else None

    def may_upload(self, room_name: str, participant: Participant) -> bool:
        entry = self.rooms.get(room_name)
        if entry is None or participant.id not in entry.room.participants:
            return False
        return participant.role in PLAYBACK_ROLES or entry.room.settings.listeners_may_upload

    def leave(self, room_name: str, client: Client) -> None:
        self.stats.coalesced_states += client.outbox.coalesced
        self.per_ip[client.ip] -= 1
        if self.per_ip[client.ip] <= 0:
            del self.per_ip[client.ip]
        if client.close_code is not None:
            self.stats.closes[client.close_code] += 1
        entry = self.rooms.get(room_name)
        if entry is None or entry.clients.get(client.id) is not client:
            return  # never seated, or replaced by a newer connection
        del entry.clients[client.id]
        entry.health.forget(client.id)
        if self.backend is not None:
            self.backend.leave(entry, client.id)
        else:
            self._apply(entry, entry.room.leave(client.id, self.clock.now_ms()))
        if not entry.clients:
            entry.empty_since = trio.current_time()
            entry.wake()

    async def handle(self, room_name: str, client: Client, msg: ClientMessage) -> None:
        """Apply a control message; a change is durable before anyone hears of it."""
        entry = self.rooms[room_name]
        if isinstance(msg, QueueAdd) and msg.track_id is not None and msg.url is None:
            msg = self._resolve_queue_add(msg)
        if self.backend is not None:
            await self.backend.change(entry, client, await self._room_op(entry, client, msg))
            return
        if isinstance(msg, SetPassword):
            effects = await self._set_password(entry, client, msg.password)
        else:
            effects = entry.room.handle(client.id, msg, self.clock.now_ms())
        await self._persist_then_apply(entry, effects)

    async def _room_op(self, entry: RoomEntry, client: Client, msg: ClientMessage) -> RoomOp:
        """``msg`` as an operation on whichever copy of the room is current."""
        if not isinstance(msg, SetPassword):
            return lambda room, now: room.handle(client.id, msg, now)
        sender = entry.room.participants.get(client.id)
        if sender is None or sender.role != HOST:
            refusal: list[Effect] = [
                Error(client.id, "not_host", "only the host may set the password")
            ]
            return lambda room, now: refusal
        hashed = None
        if msg.password:
            hashed = await trio.to_thread.run_sync(hash_password, msg.password)
        return lambda room, now: room.set_password_hash(client.id, hashed)

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
        """Apply ``effects`` once every change to the room so far is durable."""
        done = self._persist_soon(entry, effects)
        if done is not None:
            await done.wait()

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
        room = self.rooms[room_name].room
        if client.id in room.participants:  # with a backend: not before its seat is committed
            room.note_rtt(client.id, rtt_ms)

    def note_report(self, room_name: str, client: Client, report: Report) -> None:
        """A device's sync report: its offset (the lead) and the room's health frame."""
        self.metrics.observe_report(report)
        entry = self.rooms.get(room_name)
        participant = entry.room.participants.get(client.id) if entry else None
        if entry is None or participant is None:
            return
        if report.latency_offset_ms is not None:
            before = participant.latency_offset_ms
            entry.room.note_latency_offset(client.id, report.latency_offset_ms)
            if self.backend is not None and participant.latency_offset_ms != before:
                self.backend.share_offset(entry, client.id)  # every node's lead covers it
        now = self.clock.now_ms()
        entry.health.report(Device.from_report(client.id, participant.name, report, now))
        self._send_health(entry, now)
        entry.wake()  # the timer sends the frame a report made due later

    def _send_health(self, entry: RoomEntry, now_ms: float) -> None:
        """The health frame, if due: encoded once, to the room's hosts and co-hosts only
        (with a backend: merged with other nodes' devices)."""
        if self.backend is not None:
            payload = self.backend.health(entry, now_ms)
        else:
            payload = entry.health.poll(now_ms, len(entry.room.participants))
        if payload is None:
            return
        frame = Frame(encode("health", **payload))
        for pid in entry.room.lead_ids():
            target = entry.clients.get(pid)
            if target is not None:
                self.stats.messages_out += target.deliver(frame)

    def announce(self, kind: str, **payload: Any) -> None:
        """One frame to every client of every room, encoded once."""
        frame = Frame(encode(kind, **payload))
        for entry in self.rooms.values():
            self._fan_out(entry, frame)

    def error(self, client: Client, code: str, message: str) -> None:
        self.stats.errors[code] += 1
        self.stats.messages_out += client.deliver(Frame(error_frame(code, message)))

    # -- fan-out -------------------------------------------------------------

    def _apply(self, entry: RoomEntry, effects: list[Effect]) -> None:
        # Replies that share one payload object (a calibration schedule, tick mode: one
        # message to many devices) are encoded once.
        shared: tuple[str, dict[str, Any], Frame] | None = None
        for effect in effects:
            if isinstance(effect, Disconnect):
                target = entry.clients.pop(effect.to, None)
                if target is not None:
                    self.error(target, effect.code, effect.reason)
                    target.fail(effect.close_code, effect.code)
            elif isinstance(effect, Reply):
                target = entry.clients.get(effect.to)
                if target is not None:
                    same = shared is not None and shared[1] is effect.payload
                    if shared is None or not same or shared[0] != effect.kind:
                        frame = Frame(encode(effect.kind, **effect.payload))
                        shared = (effect.kind, effect.payload, frame)
                    self.stats.messages_out += target.deliver(shared[2])
            elif isinstance(effect, Error):
                target = entry.clients.get(effect.to)
                if target is not None:
                    self.error(target, effect.code, effect.message)
            elif isinstance(effect, BroadcastState):
                self._fan_out_state(entry, effect)
            elif isinstance(effect, BroadcastPresence):
                self._fan_out(entry, Frame(encode("presence", **effect.delta)))
        if entry.room.next_deadline() is not None:
            entry.wake()

    def _fan_out(self, entry: RoomEntry, frame: Frame) -> None:
        """One frame to every client of a room, written socket by socket.

        No task is woken for a client whose socket takes the frame at once;
        only a full socket queues it for its writer.
        """
        self.stats.messages_out += self._deliver_all(entry.clients.values(), frame, state=False)

    def _fan_out_state(self, entry: RoomEntry, effect: BroadcastState) -> None:
        """A state to every client of a room, encoded once per variant (JSON and
        frame): with the queue for clients not yet sent this revision of it,
        without for everyone else. Written socket by socket, as ``_fan_out``;
        a full socket's queued state is replaced by a newer one."""
        rev = effect.queue_rev
        light_state = {k: v for k, v in effect.state.items() if k != "queue"}
        light = Frame(encode("state", room=light_state))
        full: Frame | None = None
        started = trio.current_time()
        clients: Collection[Client] = entry.clients.values()
        lacking = [client for client in clients if client.queue_rev < rev]
        if lacking:
            full = Frame(encode("state", room=effect.state), queue_rev=rev)
            clients = [client for client in clients if client.queue_rev >= rev]
        direct = self._deliver_all(clients, light, state=True)
        for client in lacking:
            assert full is not None
            direct += client.deliver_state(full)
        self.stats.messages_out += direct
        if direct:
            self.metrics.broadcast_latency.observe(trio.current_time() - started)

    def _deliver_all(self, clients: Collection[Client], frame: Frame, *, state: bool) -> int:
        """``frame`` to each of ``clients`` (``deliver_state`` or ``deliver``);
        returns how many were written directly.

        A big room's direct writes are shared with the sender pool's threads
        (``socket.send`` releases the GIL); the loop waits for them, so nothing
        else touches those sockets meanwhile. Afterwards, on the loop: a socket
        that took only part of the frame wakes its writer for the tail, one
        that took nothing gets the frame queued, as in ``send_now``.
        """
        pool = self.senders
        if len(clients) < pool.min_sockets or not pool.threads:
            deliver = Client.deliver_state if state else Client.deliver
            return sum([deliver(client, frame) for client in clients])
        takers = clients if isinstance(clients, list) else list(clients)
        data = frame.wire
        try:
            misses = pool.send(data, takers, Client.direct_send)
        except SenderDied:
            log.exception("a sender thread failed; the broadcast's clients are asked to reconnect")
            for client in takers:  # which of them got the frame is unknown
                client.fail(CLOSE_INTERNAL, "internal error")
            return 0
        queued: set[int] = set()
        for i, outcome in misses:
            client = takers[i]
            if outcome is None or not client.settle_direct(data, outcome):
                queued.add(i)
                if state:
                    client.enqueue_state(frame)
                else:
                    client.enqueue(frame)
        if state and frame.queue_rev is not None:
            for i, client in enumerate(takers):
                if i not in queued:
                    client.saw(frame)
        return len(takers) - len(queued)

    def encode_pong(self, pong: PendingPong) -> Frame:
        return Frame(encode("pong", t0=pong.t0, t1=pong.t1, t2=self.clock.now_ms()))

    async def sweep_heartbeats(self) -> None:
        """Drop clients silent for ``heartbeat_timeout``: one task for the hub,
        not one per client; a silent client goes within a sweep period of its
        deadline."""
        timeout = self.settings.heartbeat_timeout
        period = min(HEARTBEAT_SWEEP_PERIOD, timeout / HEARTBEAT_SWEEPS_PER_TIMEOUT)
        while True:
            await trio.sleep(period)
            cutoff = trio.current_time() - timeout
            for entry in self.rooms.values():
                for client in entry.clients.values():
                    if client.last_seen <= cutoff and client.close_code is None:
                        client.fail(CLOSE_HEARTBEAT, "heartbeat timeout")

    # -- timers --------------------------------------------------------------

    def _due(self, entry: RoomEntry) -> float:
        """The trio time at which the room needs its poll (or its idle check)."""
        due = math.inf
        deadline_ms = entry.room.next_deadline()
        if deadline_ms is not None:
            due = trio.current_time() + (deadline_ms - self.clock.now_ms()) / 1000.0
        if entry.empty_since is not None:
            due = min(due, entry.empty_since + self.settings.room_idle_ttl)
        health_ms = entry.health.next_due()
        if health_ms is not None:
            due = min(due, trio.current_time() + (health_ms - self.clock.now_ms()) / 1000.0)
        return due

    def _reschedule(self, entry: RoomEntry, not_before: float = -math.inf) -> None:
        """The room's deadline may have moved: make sure the timer wakes by then.

        A later deadline keeps the earlier heap item (its poll is then early and
        harmless, and it reschedules); an earlier one adds an item and marks the
        old one stale.
        """
        due = max(self._due(entry), not_before)
        if due >= entry.due:
            return
        self._timer_seq += 1
        entry.due, entry.timer_seq = due, self._timer_seq
        heapq.heappush(self._timer_heap, (due, self._timer_seq, entry))
        if due < self._timer_next:
            self._timer_bell.set()
        if len(self._timer_heap) > 2 * len(self.rooms) + TIMER_HEAP_SLACK:
            self._timer_heap = [item for item in self._timer_heap if item[2].timer_seq == item[1]]
            heapq.heapify(self._timer_heap)

    async def _timer_loop(self) -> None:
        """Every room's timer: poll each room at its deadline; forget idle rooms.

        One task and one heap for the hub (a task per room cost kilobytes each).
        The bell is reset only after the due rooms are polled: their own polls
        ring it (``_apply`` wakes a room with a deadline, and a playing track
        always has one), and a bell rung by our own poll would wake this loop at
        once, forever. The heap already holds their next deadlines.
        """
        while True:
            now = trio.current_time()
            while self._timer_heap and self._timer_heap[0][0] <= now:
                _, seq, entry = heapq.heappop(self._timer_heap)
                if entry.timer_seq == seq:  # else stale: the room was rescheduled
                    entry.due, entry.timer_seq = math.inf, -1
                    self._tick(entry, now)
            self._timer_bell = trio.Event()
            self._timer_next = self._timer_heap[0][0] if self._timer_heap else math.inf
            with trio.move_on_at(self._timer_next):
                await self._timer_bell.wait()

    def _tick(self, entry: RoomEntry, now: float) -> None:
        """Flush coalesced presence on time; forget the room once idle long enough."""
        room_name = entry.room.name
        if self.rooms.get(room_name) is not entry:
            return  # closed or forgotten: nothing to time
        if self.backend is not None:
            not_before = self.backend.tick(entry, now)
        else:
            # Not awaited: the effects go out once durable, and no other room waits.
            self._persist_soon(entry, entry.room.poll(self.clock.now_ms()))
            not_before = now + TIMER_MIN_REPOLL
        self._send_health(entry, self.clock.now_ms())
        if entry.empty_since is not None and now >= entry.empty_since + self.settings.room_idle_ttl:
            del self.rooms[room_name]
            if self.writer is not None:
                self.writer.forget(room_name)  # ordered after any save queued before
            if self.backend is not None:
                self.backend.forget(room_name)  # here only: Redis keeps it for the others
            log.info("room %s forgotten after being idle", room_name)
            return
        self._reschedule(entry, not_before=not_before)
