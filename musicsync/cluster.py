"""The Redis edge of a cluster: shared rooms, CAS commits, fan-out, leases, node presence (trio).

Every room this node has clients in has a ``RoomPipe``: one task at a time
(started when there is work, gone when there is none) takes the room's
changes in order, applies each to this node's replica of the room, commits the
new value with ``clusterproto.COMMIT_LUA`` and only then delivers the effects
(``Hub._apply``, the fan-out's fast path). Changes other nodes published come
through the same pipe, so a replica is never changed by two tasks at once. A
lost race restores the replica from the winner's value and applies again.

One heartbeat task renews this node's presence key and the leases of its
rooms, hands dead nodes' participants to the resume grace (the lease holder
does), and puts right what an outage left behind. One subscriber task reads
the change channel and reconnects with backoff; when Redis is back every room
is read again. docs/architecture.md has the whole design.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import sys
from collections import Counter, deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from .clusterproto import (
    CATCH_UP_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    COMMIT_LUA,
    CONNECT_TIMEOUT_SECONDS,
    GAP,
    LEASE_LUA,
    LEASE_RETRY_SECONDS,
    LEASE_TTL_MS,
    MAX_COMMIT_ATTEMPTS,
    MAX_TURN_WAITS,
    NODE_HEARTBEAT_SECONDS,
    NODE_TTL_MS,
    RECONNECT_FIRST_SECONDS,
    RECONNECT_MAX_SECONDS,
    RELEASE_LUA,
    RESEED_LUA,
    ROOM_TTL_MARGIN_MS,
    STALE,
    TURN_POLL_SECONDS,
    TURN_TTL_MS,
    BadValue,
    Keys,
    Message,
    addressed_elsewhere,
    capture,
    connected_elsewhere,
    copy_news,
    decode_message,
    decode_value,
    encode_closed,
    encode_commit,
    encode_effects,
    encode_health,
    encode_value,
    for_other_nodes,
    live_elsewhere,
    live_on,
    message_head,
    nodes_in,
    order,
    replica,
    shared_offset,
    unseen_elsewhere,
)
from .config import Settings, redis_url_for_humans
from .hub import CLOSE_REPLACED, CLOSE_ROOM_CLOSED, Client, Hub, RoomEntry
from .room import BroadcastPresence, BroadcastState, Effect, Error, Reply, Room
from .seats import PresenceDelta

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger(__name__)

# What "Redis is not there" looks like (BusyLoadingError, while it reads its
# AOF after a restart, is a ConnectionError).
REDIS_DOWN: tuple[type[Exception], ...] = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    OSError,
)
# The same, raised out of coredis's own task groups (only outages are caught).
REDIS_DOWN_OR_GROUP: tuple[type[BaseException], ...] = (*REDIS_DOWN, BaseExceptionGroup)
# The tick of a room whose poll is queued comes back this soon (not at once).
POLL_PENDING_SECONDS = 0.01
# Close code for a connection refused while Redis is away: try again later.
CLOSE_UNAVAILABLE = 1013
UNAVAILABLE = "unavailable"
UNAVAILABLE_MESSAGE = "the room's shared store is unreachable; try again in a moment"

Op = Callable[[Room, float], list[Effect]]


def redis_down(exc: BaseException) -> bool:
    """True for a Redis outage, also when a task group wraps it."""
    if isinstance(exc, REDIS_DOWN):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(redis_down(e) for e in exc.exceptions)
    return False


def open_client(url: str) -> coredis.Redis[str]:
    """A client that fails fast: this module retries and reconnects itself."""
    return coredis.Redis.from_url(
        url,
        decode_responses=True,
        retry_policy=NoRetryPolicy(),
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        stream_timeout=COMMAND_TIMEOUT_SECONDS,
    )


async def probe(url: str) -> str | None:
    """None if Redis at ``url`` answers a PING; else why not, in one line."""
    shown = redis_url_for_humans(url)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_SECONDS + COMMAND_TIMEOUT_SECONDS):
            async with open_client(url) as client:
                await client.ping()
    except trio.TooSlowError:
        return f"cannot reach Redis at {shown}: no answer"
    except coredis.exceptions.AuthenticationError as exc:
        return f"Redis at {shown} refused us: {exc}"
    except REDIS_DOWN_OR_GROUP as exc:
        if isinstance(exc, BaseExceptionGroup) and not redis_down(exc):
            raise
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        return f"cannot reach Redis at {shown}: {exc or type(exc).__name__}"
    return None


class _Here:
    """The participants connected to this node, and those this change welcomes
    (asked about a few ids per commit: no copy of a crowd's client table)."""

    def __init__(self, clients: Container[str], welcomed: set[str]) -> None:
        self.clients = clients
        self.welcomed = welcomed

    def __contains__(self, pid: object) -> bool:
        return pid in self.welcomed or pid in self.clients


@dataclass(eq=False)
class _Op:
    """One change waiting in a room's pipe."""

    apply: Op
    # Called once the change is committed (or needed no commit), before its
    # effects are delivered; and instead of that if it could not be committed.
    after: Callable[[list[Effect]], None] | None = None
    failed: Callable[[], None] | None = None
    timed: bool = False  # needs the room's lease (poll, dead nodes)
    poll: bool = False
    # Something only the value shares changed (no revision counts it): commit
    # if this says the known value is behind the replica.
    shares: Callable[[Room, dict[str, Any] | None], bool] | None = None
    done: trio.Event = field(default_factory=trio.Event)


class RoomPipe:
    """One shared room on this node: its known value and revision, and the
    changes to it, taken one at a time."""

    def __init__(self, backend: RedisBackend, entry: RoomEntry) -> None:
        self.backend = backend
        self.entry = entry
        self.name = entry.room.name
        self.value: dict[str, Any] | None = None  # the newest value this node knows
        self.rev = 0  # its revision (0: not in Redis yet)
        self.ops: deque[_Op] = deque()
        self.inbox: deque[Message] = deque()
        self.arrived = trio.Event()
        self.running = False
        self.lease: str | None = None  # the lease token this node holds
        self.lease_until = -math.inf  # trio time: renew before trusting it past this
        self.backoff_until = -math.inf  # no lease: do not try timed changes before
        self.poll_queued = False
        self.closed = False
        self.turn = False  # this node has the room's turn (it lost a race and has not committed)
        self.published_connected = 0  # this node's connected count, as the room's hash has it
        self.connected_there = 0  # what the other live nodes serve, as the hash had it

    # -- the queue ---------------------------------------------------------------

    def submit(self, op: _Op) -> trio.Event:
        if self.closed:
            if op.failed is not None:
                op.failed()
            op.done.set()
            return op.done
        self.ops.append(op)
        self._kick()
        return op.done

    def receive(self, msg: Message) -> None:
        """Another node's change (or a value read again): taken in order with ours.

        An idle pipe takes it at once, in the caller's task (the subscriber):
        the fan-out starts without waiting for a task to be scheduled. A busy
        one finds it in its inbox before its next step.
        """
        self.inbox.append(msg)
        self.arrived.set()
        if not self.running and not self.ops:
            self._take_inbox()
            return
        self._kick()

    def _kick(self) -> None:
        if not self.running:
            self.running = True
            self.backend.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while (self.ops or self.inbox) and not self.closed:
                self._take_inbox()
                if self.ops:
                    op = self.ops.popleft()
                    try:
                        await self._run(op)
                    finally:
                        op.done.set()
        finally:
            self.running = False
            while self.ops:  # closed meanwhile: nobody waits forever
                self.ops.popleft().done.set()

    # -- what others committed -----------------------------------------------------

    def _take_inbox(self) -> None:
        hub = self.backend.hub
        while self.inbox and not self.closed:
            msg = self.inbox.popleft()
            if msg.closed:
                self.backend.closed_elsewhere(self)
                return
            if msg.rev is None:  # effects only: another node's presence news
                if msg.node != self.backend.node:
                    hub._apply(self.entry, msg.effects)
                continue
            where = order(self.rev, msg.rev)
            if msg.resync is not None:
                if msg.value is not None and self.rev == msg.resync:
                    self.adopt(msg.rev, msg.value, [], resync=True)
                continue
            if where == STALE or msg.value is None:
                continue
            self.adopt(msg.rev, msg.value, msg.effects, resync=where == GAP)

    def adopt(
        self, rev: int, value: dict[str, Any], effects: list[Effect], *, resync: bool
    ) -> None:
        """Take a newer value: deliver its effects, then catch the replica up.

        With ``resync`` (changes were missed) everyone here is sent the state.
        """
        hub, entry = self.backend.hub, self.entry
        hub._apply(entry, effects)  # the fast path first; the replica after
        self.rev, self.value = rev, value
        self.rebuild()
        for pid in [pid for pid in entry.clients if live_elsewhere(value, pid, self.backend.node)]:
            client = entry.clients.pop(pid)
            client.fail(CLOSE_REPLACED, "replaced by a newer connection")
        if resync:
            room = entry.room
            hub._apply(entry, [BroadcastState(room.state(), room.queue_rev)])
        entry.wake()

    def rebuild(self, news: PresenceDelta | None = None) -> None:
        """The replica again from the known value (after a change or a failed commit).

        ``news``: the presence news from before a change that was not committed
        (else the replica's own are kept).
        """
        entry = self.entry
        if self.value is None:
            if news is not None:
                entry.room.seats.presence = news
            return
        backend = self.backend
        entry.room = replica(
            self.name,
            self.value,
            backend.hub.clock.now_ms(),
            backend.grace_ms,
            rng=backend.hub._rng,
            carry=entry.room,
            local=entry.clients,
            news=news,
        )
        self.recount()

    def recount(self) -> None:
        """The room's participants on other nodes that this copy does not seat,
        from what those nodes serve (as the last heartbeat read it) less those
        this copy seats: again whenever either changes."""
        entry = self.entry
        seats = entry.room.seats
        due = seats.presence.due_at
        unseen = unseen_elsewhere(self.connected_there, seats.participants, entry.clients)
        seats.set_elsewhere(unseen, self.backend.hub.clock.now_ms())
        if seats.presence.due_at != due:
            entry.wake()  # the count's news go out with the next presence flush

    # -- committing ------------------------------------------------------------------

    async def _run(self, op: _Op) -> None:
        try:
            await self._attempts(op)
        finally:
            if self.turn:  # ours after a lost race, and not used up by a commit
                await self.backend.release_turn(self)

    async def _attempts(self, op: _Op) -> None:
        lost = waits = 0
        while lost < MAX_COMMIT_ATTEMPTS and waits <= MAX_TURN_WAITS:
            self._take_inbox()
            if self.closed:
                break
            room = self.entry.room
            before = room.revision
            # A poll's flushed news go out even if it is not committed (below);
            # any other change that is not committed must announce nothing.
            news = None if op.poll else copy_news(room.seats.presence)
            effects = op.apply(room, self.backend.hub.clock.now_ms())
            changed = room.revision != before or any(isinstance(e, BroadcastState) for e in effects)
            if op.shares is not None and not changed:
                changed = op.shares(room, self.value)
            if op.poll:
                self.poll_queued = False
            if not changed:
                elsewhere = addressed_elsewhere(effects, self.entry.clients)
                if elsewhere and not await self.backend.publish(
                    encode_effects(self.name, self.backend.node, elsewhere)
                ):
                    self._refuse(op)  # not sent: the sender hears it was not
                    return
                self._settle(op, effects)
                if op.poll:
                    await self._publish_presence(effects)
                return
            token = ""
            if op.timed:
                token = await self.backend.lease(self) or ""
                if not token:
                    self._without_lease(op)
                    self.rebuild(news)
                    await self._publish_presence(effects)
                    self._deliver_presence(effects)
                    return
            outcome = await self._commit(effects, token)
            if outcome is True:
                self._settle(op, effects)
                return
            self.rebuild(news)
            if op.poll:  # the news of who came and went is not lost with the poll
                self._deliver_presence(effects)
                await self._publish_presence(effects)
            if outcome is None:  # Redis is away
                self._refuse(op)
                return
            if outcome == "lease":
                self._without_lease(op)
                return
            rev, text = outcome
            if text is None:  # another node's turn: until its commit is here, then again
                waits += 1
                self.backend.stats["turn_waits"] += 1
                await self._catch_up(rev + 1, "", TURN_POLL_SECONDS)
                continue
            # lost the race (the turn is ours now): catch up, apply again
            lost += 1
            self.backend.stats["lost_races"] += 1
            await self._catch_up(rev, text)
        log.warning(
            "room %s: a change refused after %d lost races and %d waits for another node",
            self.name,
            lost,
            waits,
        )
        self._refuse(op)

    async def _commit(self, effects: list[Effect], token: str) -> Any:
        """True once committed; None if Redis is away; "lease" if the lease was
        lost; (rev, None) if another node has the room's turn; else (rev, value)
        of the commit that came first (and the turn is this node's)."""
        backend, entry = self.backend, self.entry
        local = _Here(
            entry.clients, {e.to for e in effects if isinstance(e, Reply) and e.kind == "welcome"}
        )
        value = capture(entry.room, backend.node, self.value, local)
        value_json = encode_value(value)
        message = encode_commit(
            self.name, backend.node, self.rev + 1, for_other_nodes(effects, local), value_json
        )
        keys = backend.keys
        try:
            result: Any = await backend.commit_script(
                keys=[keys.room(self.name), keys.lease(self.name), keys.turn(self.name)],
                args=[
                    self.rev,
                    value_json,
                    message,
                    token,
                    backend.room_ttl_ms,
                    keys.channel,
                    backend.node,
                    TURN_TTL_MS,
                ],
            )
        except REDIS_DOWN as exc:
            backend.mark_down(exc)
            return None
        status, rev = int(result[0]), int(result[1])
        if status == -2:
            return rev, None
        self.turn = status == 0  # a lost race takes the turn; anything else gives it up
        if status == 1:
            self.rev, self.value = rev, value
            backend.stats["commits"] += 1
            backend.mark_up()
            return True
        if status == -1:
            return "lease"
        return rev, str(result[2]) if len(result) > 2 else ""

    async def _catch_up(self, rev: int, text: str, wait: float = CATCH_UP_SECONDS) -> None:
        """Wait a moment for the winner's message (to deliver it); else take its value."""
        with trio.move_on_after(wait):
            while self.rev < rev and not self.closed:
                self._take_inbox()
                if self.rev >= rev:
                    break
                self.arrived = trio.Event()
                await self.arrived.wait()
        if self.rev < rev and text and not self.closed:
            try:
                value = decode_value(text)
            except BadValue as exc:
                log.error("room %s: %s", self.name, exc)
                return
            self.adopt(rev, value, [], resync=True)

    def _settle(self, op: _Op, effects: list[Effect]) -> None:
        if op.after is not None:
            op.after(effects)
        self.backend.hub._apply(self.entry, effects)

    def _refuse(self, op: _Op) -> None:
        if op.failed is not None:
            op.failed()

    def _without_lease(self, op: _Op) -> None:
        self.lease, self.lease_until = None, -math.inf
        self.backoff_until = trio.current_time() + LEASE_RETRY_SECONDS
        self.entry.wake()

    def _deliver_presence(self, effects: list[Effect]) -> None:
        presence: list[Effect] = [e for e in effects if isinstance(e, BroadcastPresence)]
        if presence:
            self.backend.hub._apply(self.entry, presence)

    async def _publish_presence(self, effects: list[Effect]) -> None:
        presence: list[Effect] = [e for e in effects if isinstance(e, BroadcastPresence)]
        if presence:
            await self.backend.publish(encode_effects(self.name, self.backend.node, presence))


class RedisBackend:
    """Rooms shared through Redis: the hub's ``RoomBackend`` when ``--redis`` is given."""

    def __init__(self, settings: Settings, url: str, keys: Keys | None = None) -> None:
        self.settings = settings
        self.url = url
        self.keys = keys or Keys()
        self.node = secrets.token_hex(6)
        self.grace_ms = settings.resume_grace * 1000
        self.room_ttl_ms = int(settings.room_idle_ttl * 1000) + ROOM_TTL_MARGIN_MS
        self.pipes: dict[str, RoomPipe] = {}
        self.available = True
        self.stats: Counter[str] = Counter()  # commits, lost_races, turn_waits
        self._hub: Hub | None = None
        self._redis: coredis.Redis[str] | None = None
        self._nursery: trio.Nursery | None = None
        self._resync_needed = False

    # -- plumbing ---------------------------------------------------------------------

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise RuntimeError("the Redis backend is not running")
        return self._hub

    @property
    def redis(self) -> coredis.Redis[str]:
        if self._redis is None:
            raise RuntimeError("the Redis backend is not running")
        return self._redis

    def start_soon(self, fn: Callable[[], Any]) -> None:
        if self._nursery is None:
            raise RuntimeError("the Redis backend is not running")
        self._nursery.start_soon(fn)

    def mark_down(self, exc: BaseException) -> None:
        if self.available:
            log.warning("Redis unavailable (%s): changes are refused until it is back", exc)
        self.available = False
        self._resync_needed = True

    def mark_up(self) -> None:
        if not self.available:
            log.info("Redis is back")
        self.available = True

    async def run(
        self, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the hub's shared rooms until cancelled; raises if Redis is not there at start."""
        self._hub = hub
        async with open_client(self.url) as client:
            await client.ping()
            self._redis = client
            self.commit_script = client.register_script(COMMIT_LUA)
            self.lease_script = client.register_script(LEASE_LUA)
            self.release_script = client.register_script(RELEASE_LUA)
            self.reseed_script = client.register_script(RESEED_LUA)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._subscriber)
                    nursery.start_soon(self._heartbeat)
                    log.info(
                        "sharing rooms through Redis at %s as node %s",
                        redis_url_for_humans(self.url),
                        self.node,
                    )
                    task_status.started()
            finally:
                self._nursery = None
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    with contextlib.suppress(*REDIS_DOWN):
                        await client.delete([self.keys.node(self.node)])

    async def publish(self, message: str) -> bool:
        """Publish on the change channel; False if Redis is away."""
        try:
            await self.redis.publish(self.keys.channel, message)
        except REDIS_DOWN as exc:
            self.mark_down(exc)
            return False
        return True

    # -- the change channel --------------------------------------------------------------

    async def _subscriber(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        delay = RECONNECT_FIRST_SECONDS
        started = False
        while True:
            try:
                async with self.redis.pubsub(
                    channels=[self.keys.channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                ) as pubsub:
                    if not started:
                        started = True
                        task_status.started()
                    elif self._resync_needed:
                        await self._resync_all()
                    delay = RECONNECT_FIRST_SECONDS
                    async for message in pubsub:
                        self.on_message(message["data"])
            except REDIS_DOWN_OR_GROUP as exc:
                if not redis_down(exc):
                    raise
                if not started:
                    raise
                self.mark_down(exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def on_message(self, data: Any) -> None:
        if not isinstance(data, (str, bytes)):
            return
        text = data.decode() if isinstance(data, bytes) else data
        head = message_head(text)
        if head is not None:
            room, rev = head
            pipe = self.pipes.get(room)
            if pipe is None:
                return  # not a room of ours: not even parsed
            if rev is not None and rev <= pipe.rev and not pipe.inbox:
                return  # known already (this node's own commit, echoed): not parsed either
        try:
            msg = decode_message(text)
        except BadValue as exc:
            log.warning("ignored a change message: %s", exc)
            return
        pipe = self.pipes.get(msg.room)
        if pipe is None or self.hub.rooms.get(msg.room) is not pipe.entry:
            return
        if msg.health is not None:  # not a change: straight to the room's health
            if msg.node != self.node and pipe.entry.health.note_remote(msg.node, msg.health):
                pipe.entry.wake()
            return
        pipe.receive(msg)

    def health(self, entry: RoomEntry, now_ms: float) -> dict[str, Any] | None:
        """The room's ``health`` payload if due, merged with other nodes' digests;
        this node's own digest is published if hosts or co-hosts are elsewhere."""
        room = entry.room
        polled = entry.health.poll_cluster(now_ms, len(room.participants), len(entry.clients))
        if polled is None:
            return None
        digest, payload = polled
        pipe = self.pipes.get(room.name)
        if digest is None or pipe is None or self._nursery is None:
            return payload
        if any(live_elsewhere(pipe.value, pid, self.node) for pid in room.lead_ids()):
            self._nursery.start_soon(self.publish, encode_health(room.name, self.node, digest))
        return payload

    async def _resync_all(self) -> None:
        """Redis is back: read every room again; put back one Redis lost."""
        self._resync_needed = False
        for pipe in list(self.pipes.values()):
            try:
                rev, text = await self.redis.hmget(self.keys.room(pipe.name), ["rev", "value"])
                if rev is None and pipe.value is not None:
                    result: Any = await self.reseed_script(
                        keys=[self.keys.room(pipe.name)],
                        args=[pipe.rev, encode_value(pipe.value), self.room_ttl_ms],
                    )
                    if int(result[0]) == 1:
                        log.warning("room %s was not in Redis: put back", pipe.name)
                        continue
                    rev, text = result[1], result[2]
            except REDIS_DOWN as exc:
                self.mark_down(exc)
                return
            if rev is not None and text and int(rev) != pipe.rev:
                try:
                    value = decode_value(text)
                except BadValue as exc:
                    log.error("room %s: %s", pipe.name, exc)
                    continue
                # Through the pipe: a change in flight there must not have its
                # replica swapped under it.
                pipe.receive(Message(pipe.name, self.node, int(rev), [], value, resync=pipe.rev))
        self.mark_up()

    # -- heartbeat: presence, leases, dead nodes, repairs ------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._beat()
            except REDIS_DOWN as exc:
                self.mark_down(exc)
            await trio.sleep(NODE_HEARTBEAT_SECONDS)

    async def _beat(self) -> None:
        redis, keys = self.redis, self.keys
        await redis.set(keys.node(self.node), "1", px=NODE_TTL_MS)
        if self._resync_needed and self.available is False:
            pass  # the subscriber resyncs once it is subscribed again
        leading: list[RoomPipe] = []
        serving: list[RoomPipe] = []
        for pipe in list(self.pipes.values()):
            if pipe.closed:
                continue
            if not pipe.entry.clients:
                if pipe.published_connected:  # its last client left: take its count back
                    serving.append(pipe)
                continue
            serving.append(pipe)
            await redis.pexpire(keys.room(pipe.name), self.room_ttl_ms)
            if await self.lease(pipe, renew=True):
                leading.append(pipe)
            self._repair(pipe)
        await self._count_crowds(serving)
        others = sorted({n for pipe in leading for n in nodes_in(pipe.value)} - {self.node})
        if others:
            alive = await redis.mget([keys.node(n) for n in others])
            dead = {n for n, mark in zip(others, alive, strict=True) if mark is None}
            for pipe in leading:
                gone = dead & nodes_in(pipe.value)
                if gone:
                    log.info("room %s: node(s) %s gone; their seats are held", pipe.name, gone)
                    pipe.submit(_Op(_reap(pipe, gone), timed=True))
        self.mark_up()

    async def _count_crowds(self, pipes: list[RoomPipe]) -> None:
        """A shared crowd's count. A crowd's listeners are in no value, so each
        node writes how many participants it serves into the room's hash (on a
        heartbeat, when that changed) and counts as seated elsewhere what the
        other live nodes serve beyond those its copy seats. At most a couple of
        seconds behind a join or leave on another node."""
        redis, keys = self.redis, self.keys
        others_by_pipe: list[tuple[RoomPipe, dict[str, Any]]] = []
        for pipe in pipes:
            key = keys.connected(pipe.name)
            mine = len(pipe.entry.clients)
            if mine != pipe.published_connected:
                if mine:
                    await redis.hset(key, {self.node: str(mine)})
                else:
                    await redis.hdel(key, [self.node])
                pipe.published_connected = mine
            if mine:
                await redis.pexpire(key, self.room_ttl_ms)
            counts = await redis.hgetall(key)
            others_by_pipe.append((pipe, {n: c for n, c in counts.items() if n != self.node}))
        nodes = sorted({n for _, others in others_by_pipe for n in others})
        alive: set[str] = set()
        if nodes:
            marks = await redis.mget([keys.node(n) for n in nodes])
            alive = {n for n, mark in zip(nodes, marks, strict=True) if mark is not None}
        for pipe, others in others_by_pipe:
            dead = [n for n in others if n not in alive]
            if dead:  # a node killed with its clients: its count goes with it
                await redis.hdel(keys.connected(pipe.name), dead)
            pipe.connected_there = connected_elsewhere(others, self.node, alive)
            pipe.recount()

    def _repair(self, pipe: RoomPipe) -> None:
        """Participants the value says are here but are not (a leave Redis
        missed) leave; ones connected here whose seat is held (this node was
        taken for dead) take it back."""
        entry = pipe.entry
        if pipe.running or pipe.ops:
            return
        for pid in live_on(pipe.value, self.node):
            if pid not in entry.clients:
                self.leave(entry, pid)
        for client in list(entry.clients.values()):
            if client.id not in entry.room.participants and entry.room.holds_seat(client.token):
                pipe.submit(_Op(_reseat(client)))

    async def lease(self, pipe: RoomPipe, renew: bool = False) -> str | None:
        """The room's lease token if this node holds it (taken or renewed now if need be)."""
        now = trio.current_time()
        if pipe.lease is not None and now < pipe.lease_until and not renew:
            return pipe.lease
        keys = self.keys
        try:
            token: Any = await self.lease_script(
                keys=[keys.lease(pipe.name), keys.epoch(pipe.name)],
                args=[self.node, LEASE_TTL_MS, pipe.lease or ""],
            )
        except REDIS_DOWN as exc:
            self.mark_down(exc)
            return None
        if not token:
            pipe.lease, pipe.lease_until = None, -math.inf
            return None
        # Trusted for half its life from before the call; the commit script checks it anyway.
        pipe.lease, pipe.lease_until = str(token), now + LEASE_TTL_MS / 2000
        return pipe.lease

    # -- the hub's RoomBackend -----------------------------------------------------------

    def pipe(self, entry: RoomEntry) -> RoomPipe:
        pipe = self.pipes.get(entry.room.name)
        if pipe is None or pipe.entry is not entry:
            pipe = self.pipes[entry.room.name] = RoomPipe(self, entry)
        return pipe

    async def load(self, room_name: str) -> tuple[str, str, int] | None:
        """Bring the shared room in before admission checks it; a refusal if Redis is away."""
        hub = self.hub
        if room_name in hub.rooms:
            return None
        try:
            rev, text = await self.redis.hmget(self.keys.room(room_name), ["rev", "value"])
        except REDIS_DOWN as exc:
            self.mark_down(exc)
            return UNAVAILABLE, UNAVAILABLE_MESSAGE, CLOSE_UNAVAILABLE
        if room_name in hub.rooms or rev is None or not text:
            return None  # here meanwhile, or a new room
        try:
            value = decode_value(text)
            room = replica(room_name, value, hub.clock.now_ms(), self.grace_ms, rng=hub._rng)
        except BadValue as exc:
            log.error("room %s: %s; refused", room_name, exc)
            return UNAVAILABLE, "this room's stored state cannot be read", CLOSE_UNAVAILABLE
        entry = hub.room_entry(room_name, room)
        entry.empty_since = trio.current_time()
        entry.wake()
        pipe = self.pipe(entry)
        pipe.rev, pipe.value = int(rev), value
        return None

    def join(
        self,
        entry: RoomEntry,
        client: Client,
        name: str,
        resume_token: str | None,
        role: str | None,
    ) -> trio.Event:
        hub = self.hub
        first_id = client.id

        def apply(room: Room, now: float) -> list[Effect]:
            effects = None
            if resume_token:
                live = room.participant_for_token(resume_token)
                if live is not None:  # a second tab, or a reconnect not yet noticed
                    room.leave(live.id, now)
                effects = room.resume(resume_token, now)
            if effects is None:
                effects = room.join(first_id, name, now, client.token, role)
            return effects

        def after(effects: list[Effect]) -> None:
            welcome = effects[0]
            if isinstance(welcome, Reply) and welcome.to != first_id:
                client.id, client.token = welcome.to, resume_token or client.token
            old = entry.clients.pop(client.id, None)
            if old is not None and old is not client:
                old.fail(CLOSE_REPLACED, "replaced by a newer connection")
            entry.clients[client.id] = client
            entry.empty_since = None
            client.queue_rev = entry.room.queue_rev  # the welcome carries the whole queue

        def failed() -> None:
            hub.error(client, UNAVAILABLE, UNAVAILABLE_MESSAGE)
            client.fail(CLOSE_UNAVAILABLE, "redis unavailable")

        return self.pipe(entry).submit(_Op(apply, after=after, failed=failed))

    def leave(self, entry: RoomEntry, pid: str) -> None:
        pipe = self.pipe(entry)

        def apply(room: Room, now: float) -> list[Effect]:
            if pid not in room.participants or live_elsewhere(pipe.value, pid, self.node):
                return []  # gone already, or connected to another node since
            return room.leave(pid, now)

        pipe.submit(_Op(apply))

    def share_offset(self, entry: RoomEntry, pid: str) -> None:
        """A device here reported a new latency offset: into the value, so that
        every node's lead covers it (only a participant the value names)."""

        def behind(room: Room, value: dict[str, Any] | None) -> bool:
            p = room.participants.get(pid)
            if p is None or value is None or pid not in value.get("live", {}):
                return False
            return shared_offset(value, pid) != p.latency_offset_ms

        self.pipe(entry).submit(_Op(lambda room, now: [], shares=behind))

    async def change(self, entry: RoomEntry, client: Client, op: Op) -> None:
        hub = self.hub

        def apply(room: Room, now: float) -> list[Effect]:
            if client.id not in room.participants:
                return [Error(client.id, UNAVAILABLE, "your seat is being restored; try again")]
            return op(room, now)

        def failed() -> None:
            hub.error(client, UNAVAILABLE, UNAVAILABLE_MESSAGE)

        await self.pipe(entry).submit(_Op(apply, failed=failed)).wait()

    def tick(self, entry: RoomEntry, now: float) -> float:
        """The hub's timer found the room due: queue a poll; when to look again."""
        pipe = self.pipe(entry)
        if now < pipe.backoff_until:
            return pipe.backoff_until
        if not pipe.poll_queued:
            pipe.poll_queued = True
            pipe.submit(_Op(lambda room, t: room.poll(t), timed=True, poll=True))
        return now + POLL_PENDING_SECONDS

    def forget(self, room_name: str) -> None:
        pipe = self.pipes.pop(room_name, None)
        if pipe is None:
            return
        pipe.closed = True
        if pipe.lease is not None and self._nursery is not None:
            token = pipe.lease
            self._nursery.start_soon(self._release, room_name, token)
        if pipe.published_connected and self._nursery is not None:
            self._nursery.start_soon(self._uncount, room_name)

    async def release_turn(self, pipe: RoomPipe) -> None:
        """Give the room's turn back (the change that took it needed no commit after all)."""
        pipe.turn = False
        try:
            await self.release_script(keys=[self.keys.turn(pipe.name)], args=[self.node])
        except REDIS_DOWN as exc:
            self.mark_down(exc)

    async def _uncount(self, room_name: str) -> None:
        """This node serves none of the room's participants any more."""
        try:
            await self.redis.hdel(self.keys.connected(room_name), [self.node])
        except REDIS_DOWN as exc:
            self.mark_down(exc)

    async def _release(self, room_name: str, token: str) -> None:
        try:
            await self.release_script(keys=[self.keys.lease(room_name)], args=[token])
        except REDIS_DOWN as exc:
            self.mark_down(exc)

    async def close(self, room_name: str) -> None:
        """The operator closed the room: gone from Redis, and from every node."""
        self.forget(room_name)
        try:
            await self.redis.delete([self.keys.room(room_name)])
            await self.redis.publish(self.keys.channel, encode_closed(room_name, self.node))
        except REDIS_DOWN as exc:
            self.mark_down(exc)

    def closed_elsewhere(self, pipe: RoomPipe) -> None:
        hub = self.hub
        entry = hub.rooms.get(pipe.name)
        if entry is pipe.entry:
            del hub.rooms[pipe.name]
            for client in list(entry.clients.values()):
                client.fail(CLOSE_ROOM_CLOSED, "room closed by the operator")
            entry.clients.clear()
        self.forget(pipe.name)

    async def flush(self) -> None:
        """Until every room's queued changes are through (at shutdown)."""
        while any(pipe.running or pipe.ops for pipe in self.pipes.values()):  # noqa: ASYNC110 - once, at shutdown
            await trio.sleep(0.01)


def _reap(pipe: RoomPipe, dead: Iterable[str]) -> Op:
    gone = set(dead)

    def apply(room: Room, now: float) -> list[Effect]:
        effects: list[Effect] = []
        value = pipe.value or {}
        for pid, node in list(value.get("live", {}).items()):
            if node in gone and pid in room.participants:
                effects += room.leave(pid, now)
        return effects

    return apply


def _reseat(client: Client) -> Op:
    def apply(room: Room, now: float) -> list[Effect]:
        if client.id in room.participants:
            return []
        effects = room.resume(client.token, now)
        # The welcome is not sent again: the client is connected and knows itself.
        return [e for e in effects or [] if not (isinstance(e, Reply) and e.kind == "welcome")]

    return apply
