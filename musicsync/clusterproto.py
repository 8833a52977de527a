"""The pure parts of a Redis cluster: keys, the shared room value, messages, the Lua (sans-IO).

A room shared by several nodes is one Redis hash: ``rev`` (the number of
commits: it grows by exactly one per commit, whichever node made it) and
``value`` (JSON: the room's ``snapshot()`` plus what only a cluster needs: which
node each seated participant is connected to, when each held seat expires, the
queue revision, the round trips and the device latency offsets). Every commit
goes through ``COMMIT_LUA``: compare ``rev``, store, publish the change, in one
script. Timed changes also carry the lease token of the room, which the script
checks; a node that lost a race has the room's next turn.

Nothing here imports trio or talks to Redis; ``cluster.py`` is the edge.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .effects import Disconnect
from .room import LISTENER, BroadcastPresence, BroadcastState, Effect, Error, Reply, Room
from .seats import PARTICIPANT_LIST_MAX, PresenceDelta

# -- durations and limits (milliseconds where Redis takes them) -------------------

# A node's presence key lives this long unless renewed; a node renews it (and
# its leases) every NODE_HEARTBEAT_SECONDS. A node killed with -9 is known dead
# NODE_TTL_MS after its last heartbeat, at most.
NODE_TTL_MS = 5_000
NODE_HEARTBEAT_SECONDS = 1.0
# The per-room lease that drives timed changes (queue advance, held seats
# expiring, elections): renewed with the heartbeat, taken over once it lapses.
LEASE_TTL_MS = 5_000
# A node that holds no lease and finds a timed change due retries this often.
LEASE_RETRY_SECONDS = 1.0
# A room's value outlives its last commit (and the last heartbeat of a node
# with someone in it) by the room idle TTL plus this.
ROOM_TTL_MARGIN_MS = 60_000
# A lost compare-and-set is retried this many times before the change is refused.
MAX_COMMIT_ATTEMPTS = 8
# After a lost compare-and-set the node waits this long for the winner's
# published change (so that it delivers it) before reading the value itself.
CATCH_UP_SECONDS = 0.5
# A node that loses a compare-and-set takes the room's turn (in the same
# script): until it commits, or this long, other nodes' commits wait for it.
# Without it, a node with a stream of changes (a crowd joining) won every race
# against one that had to catch up first, and the other's change was refused.
# Longer than a catch-up and a retry on a loaded machine; a dead holder's
# turn lapses after it.
TURN_TTL_MS = 2_000
# A change that meets another node's turn waits for that node's commit to
# arrive, or this long (the turn may have been given back unused), then tries
# again; at most MAX_TURN_WAITS times (longer than a turn lives) before it is
# refused.
TURN_POLL_SECONDS = 0.05
MAX_TURN_WAITS = 100
# Reconnecting to Redis: first delay, doubled up to the cap.
RECONNECT_FIRST_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
# Connecting and each command: past these, Redis counts as unavailable.
CONNECT_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 5.0

DEFAULT_PREFIX = "musicsync"


class BadValue(ValueError):
    """A room value or a message from Redis that this version cannot read."""


# -- key names --------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel a cluster uses, under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def room(self, name: str) -> str:
        return f"{self.prefix}:room:{name}"

    def lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    def epoch(self, name: str) -> str:
        return f"{self.prefix}:epoch:{name}"

    def turn(self, name: str) -> str:
        return f"{self.prefix}:turn:{name}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def connected(self, name: str) -> str:
        """A hash: node id -> how many of the room's participants that node serves."""
        return f"{self.prefix}:connected:{name}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:changes"


# -- the Lua ----------------------------------------------------------------------

# KEYS: room hash, lease, turn. ARGV: expected rev, value JSON, message, lease
# token ('' for a change that is not timed), TTL ms, channel, node id, turn TTL ms.
# Returns {1, rev} committed; {0, rev, value} someone else committed first (the
# caller now has the room's turn, unless another node has it); {-1, rev} the
# lease token is not (or no longer) the room's; {-2, rev} another node has the
# turn: wait for its commit.
COMMIT_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
local turn = redis.call('GET', KEYS[3])
if turn and turn ~= ARGV[7] then
  return {-2, cur}
end
if cur ~= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8])
  return {0, cur, redis.call('HGET', KEYS[1], 'value') or ''}
end
if turn then redis.call('DEL', KEYS[3]) end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then
  return {-1, cur}
end
redis.call('HSET', KEYS[1], 'rev', cur + 1, 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[3])
return {1, cur + 1}
"""

# KEYS: room hash. ARGV: rev, value JSON, TTL ms. Puts a room back that Redis
# lost (restarted without persistence) at the revision this node knew, unless
# another node did first: then {0, rev, value} as COMMIT_LUA.
RESEED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'rev') or '0'),
          redis.call('HGET', KEYS[1], 'value') or ''}
end
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, tonumber(ARGV[1])}
"""

# KEYS: lease, epoch counter. ARGV: node id, TTL ms, the token this node holds
# ('' if none). Returns the token held after the call (renewed or newly taken,
# with an epoch one higher than any before), or false if another node holds it.
LEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

# KEYS: lease (or turn). ARGV: token (or node id). Gives the lease (or the
# room's turn) up if this node still holds it.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_epoch(token: str) -> int:
    """The epoch in a lease token ``node:epoch``."""
    try:
        return int(token.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise BadValue(f"not a lease token: {token!r}") from None


# -- revisions ----------------------------------------------------------------------

STALE = "stale"  # already known (our own echo, or older): ignore
NEXT = "next"  # the one after what we know: deliver its effects, take its value
GAP = "gap"  # something in between was missed: take its value and resend the state


def order(known_rev: int, rev: int) -> str:
    """Where a published revision stands against the one a node knows."""
    if rev <= known_rev:
        return STALE
    return NEXT if rev == known_rev + 1 else GAP


# -- effects on the wire --------------------------------------------------------------


def effects_to_wire(effects: Iterable[Effect]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in effects:
        if isinstance(e, BroadcastState):
            out.append({"t": "state", "state": e.state, "queue_rev": e.queue_rev})
        elif isinstance(e, BroadcastPresence):
            out.append({"t": "presence", "delta": e.delta})
        elif isinstance(e, Reply):
            out.append({"t": "reply", "to": e.to, "kind": e.kind, "payload": e.payload})
        elif isinstance(e, Disconnect):
            out.append(
                {
                    "t": "disconnect",
                    "to": e.to,
                    "code": e.code,
                    "reason": e.reason,
                    "close_code": e.close_code,
                }
            )
        else:
            out.append({"t": "error", "to": e.to, "code": e.code, "message": e.message})
    return out


def effects_from_wire(items: Iterable[Mapping[str, Any]]) -> list[Effect]:
    out: list[Effect] = []
    for item in items:
        kind = item.get("t")
        try:
            if kind == "state":
                out.append(BroadcastState(dict(item["state"]), int(item["queue_rev"])))
            elif kind == "presence":
                out.append(BroadcastPresence(dict(item["delta"])))
            elif kind == "reply":
                out.append(Reply(str(item["to"]), str(item["kind"]), dict(item["payload"])))
            elif kind == "disconnect":
                out.append(
                    Disconnect(
                        str(item["to"]),
                        str(item["code"]),
                        str(item["reason"]),
                        int(item["close_code"]),
                    )
                )
            elif kind == "error":
                out.append(Error(str(item["to"]), str(item["code"]), str(item["message"])))
            else:
                raise BadValue(f"unknown effect {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise BadValue(f"bad effect {item!r}: {exc}") from None
    return out


def for_other_nodes(effects: Iterable[Effect], local: Container[str]) -> list[Effect]:
    """What other nodes must deliver: broadcasts, and replies or errors to
    participants not connected here (a kick of someone on another node)."""
    return [
        e
        for e in effects
        if isinstance(e, (BroadcastState, BroadcastPresence)) or e.to not in local
    ]


def addressed_elsewhere(effects: Iterable[Effect], local: Container[str]) -> list[Effect]:
    """Effects for participants not connected here, of a change that needs no
    commit (a host's ``resync`` or ``set_latency_offset`` for a device on
    another node): they cross as a message of effects."""
    return [
        e
        for e in effects
        if (isinstance(e, Disconnect) or (isinstance(e, Reply) and e.kind != "welcome"))
        and e.to not in local
    ]


# -- messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One published change: a commit (``rev`` and ``value``), effects only
    (presence: ``rev`` None), or the room closed by the operator."""

    room: str
    node: str
    rev: int | None
    effects: list[Effect]
    value: dict[str, Any] | None = None
    closed: bool = False
    # A node's digest of the room's device health (health.RoomHealth.poll_cluster).
    health: dict[str, Any] | None = None
    # Read from Redis by this node (never published) while it knew revision
    # ``resync``: taken even if older (Redis lost writes), unless the node
    # moved on since; everyone here is sent the state.
    resync: int | None = None


def encode_commit(room: str, node: str, rev: int, effects: list[Effect], value_json: str) -> str:
    """The message for a commit; the value (already JSON) is spliced in, not re-encoded."""
    head = json.dumps(
        {"room": room, "node": node, "rev": rev, "fx": effects_to_wire(effects)},
        separators=(",", ":"),
    )
    return f'{head[:-1]},"value":{value_json}}}'


def encode_effects(room: str, node: str, effects: list[Effect]) -> str:
    return json.dumps(
        {"room": room, "node": node, "rev": None, "fx": effects_to_wire(effects)},
        separators=(",", ":"),
    )


def encode_health(room: str, node: str, digest: Mapping[str, Any]) -> str:
    return json.dumps(
        {"room": room, "node": node, "rev": None, "fx": [], "health": digest},
        separators=(",", ":"),
    )


def encode_closed(room: str, node: str) -> str:
    return json.dumps({"room": room, "node": node, "rev": None, "fx": [], "closed": True})


# Room names are short and plain (urls.is_valid_room_name), so the room a
# message is for, and a commit's revision, can be read from its head (as the
# encoders above write it) before the whole JSON is parsed.
_HEAD = re.compile(r'^\{"room":"([^"\\]{1,200})"(?:,"node":"[^"\\]*","rev":(\d{1,18})[,}])?')


def message_head(text: str) -> tuple[str, int | None] | None:
    """The room a message is for and, for a commit, its revision (None for
    effects, health or anything else); None if the head is not in the form
    the encoders write (then parse the whole message)."""
    head = _HEAD.match(text)
    if head is None:
        return None
    rev = head.group(2)
    return head.group(1), None if rev is None else int(rev)


def decode_message(data: str | bytes) -> Message:
    try:
        raw = json.loads(data)
        rev = raw["rev"]
        value = raw.get("value")
        health = raw.get("health")
        return Message(
            room=str(raw["room"]),
            node=str(raw["node"]),
            rev=None if rev is None else int(rev),
            effects=effects_from_wire(raw["fx"]),
            value=value if isinstance(value, dict) else None,
            closed=bool(raw.get("closed", False)),
            health=health if isinstance(health, dict) else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadValue(f"unreadable change message: {exc}") from None


# -- the room value ----------------------------------------------------------------


def capture(
    room: Room, node: str, previous: Mapping[str, Any] | None, local: Container[str]
) -> dict[str, Any]:
    """The shared value of ``room`` as this node sees it after a change.

    ``previous`` is the value the change was applied to (None for a new room);
    ``local`` the participants connected to this node (only asked about the
    snapshot's seats, so a crowd's listeners cost nothing: no copy, no pass
    over them before every commit). A seated participant is live on this node
    if connected here, else where the previous value said.
    """
    snap = room.snapshot()
    prev_live: Mapping[str, str] = previous.get("live", {}) if previous else {}
    prev_rtt: Mapping[str, float] = previous.get("rtt", {}) if previous else {}
    prev_offset: Mapping[str, float] = previous.get("offset", {}) if previous else {}
    seats = snap["seats"]["seats"]
    seat_hashes = {seat["token_hash"] for seat in seats}
    live: dict[str, str] = {}
    rtt: dict[str, float] = {}
    offset: dict[str, float] = {}
    participants = room.participants
    for seat in seats:
        pid = seat["id"]
        p = participants.get(pid)
        if p is None:
            continue
        here = pid in local
        live[pid] = node if here else prev_live.get(pid, node)
        known = p.rtt_ms if here else prev_rtt.get(pid, p.rtt_ms)
        if known is not None:
            rtt[pid] = known
        # The device's node knows its offset (it reports it); others keep the shared one.
        device = p.latency_offset_ms if here else prev_offset.get(pid, p.latency_offset_ms)
        if device:
            offset[pid] = device
    return {
        "snap": snap,
        "live": live,
        "held": {h: res.until for h, res in room.seats.held.items() if h in seat_hashes},
        "queue_rev": room.queue_rev,
        "rtt": rtt,
        "offset": offset,
    }


def shared_offset(value: Mapping[str, Any] | None, pid: str) -> float:
    """``pid``'s device latency offset as the value shares it (0 if none)."""
    return float(value.get("offset", {}).get(pid, 0.0)) if value else 0.0


def encode_value(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def decode_value(text: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadValue(f"unreadable room value: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("snap"), dict):
        raise BadValue("a room value needs a snapshot")
    return value


def copy_news(delta: PresenceDelta) -> PresenceDelta:
    """The presence news not yet flushed, as they are now (a change that is
    then not committed must not leave its own news behind)."""
    return PresenceDelta(
        dict(delta.joined), list(delta.left), dict(delta.changed), delta.recount, delta.due_at
    )


def replica(
    name: str,
    value: Mapping[str, Any],
    now: float,
    resume_grace_ms: float,
    rng: random.Random | None = None,
    carry: Room | None = None,
    local: Iterable[str] = (),
    news: PresenceDelta | None = None,
) -> Room:
    """This node's copy of a shared room, from its value.

    ``Room.restore`` holds every seat for the resume grace; here the seats of
    participants live on some node are seated again, held seats keep the
    deadlines the value gives them, and the queue revision is the shared one.
    From ``carry`` (the replica this one replaces) come what only this node
    knows: its connected participants that the value leaves out (a crowd's
    listeners, seated as listeners: hosts and co-hosts are always in the
    value), their round trips, the room's change budget and the presence news
    not yet flushed: ``carry``'s own, or ``news`` (those from before a change
    that was not committed). Those news name this copy's participants, so a
    role the value gives is the one announced.
    """
    try:
        room = Room.restore(name, dict(value["snap"]), now, resume_grace_ms, rng=rng)
        live: Mapping[str, str] = value.get("live", {})
        held: Mapping[str, float] = value.get("held", {})
        rtts: Mapping[str, float] = value.get("rtt", {})
        offsets: Mapping[str, float] = value.get("offset", {})
        queue_rev = int(value.get("queue_rev", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadValue(f"room {name!r}: unreadable value: {exc}") from None
    seats = room.seats
    for token_hash, reservation in list(seats.held.items()):
        if reservation.participant.id in live:
            seats.seat_held(token_hash)
    seats.set_deadlines(held)
    try:
        for pid, rtt in rtts.items():
            if pid in room.participants:
                room.note_rtt(pid, float(rtt))
        for pid, device in offsets.items():
            if pid in room.participants:
                room.note_latency_offset(pid, float(device))
    except (TypeError, ValueError) as exc:
        raise BadValue(f"room {name!r}: unreadable value: {exc}") from None
    room.playqueue.adopt_rev(queue_rev)
    if carry is not None:
        room.carry_over(carry)
        # Once per change for every listener connected here (a crowd's are
        # not in the value): the lookups are taken out of the loop.
        carried, seated, held_hashes = carry.participants, room.participants, seats.held
        seat_only_here = seats.seat_only_here
        for pid in local:
            mine = carried.get(pid)
            if mine is None:
                continue
            if pid not in seated and (
                mine.token_hash is None or mine.token_hash not in held_hashes
            ):
                if mine.role != LISTENER:  # a role from a change that was not committed
                    mine = dataclasses.replace(mine, role=LISTENER)
                seat_only_here(mine)
            elif pid in seated:  # what its own reports said last, here
                if mine.rtt_ms is not None:
                    room.note_rtt(pid, mine.rtt_ms)
                room.note_latency_offset(pid, mine.latency_offset_ms)
    if news is not None:
        seats.presence = news
    joined = seats.presence.joined
    for pid in joined:
        now_seated = seats.participants.get(pid)
        if now_seated is not None:
            joined[pid] = now_seated
    return room


def live_elsewhere(value: Mapping[str, Any] | None, pid: str, node: str) -> bool:
    """True if the value says ``pid`` is connected to another node (a newer tab)."""
    if not value:
        return False
    where = value.get("live", {}).get(pid)
    return where is not None and where != node


def connected_elsewhere(counts: Mapping[str, Any], node: str, alive: Container[str]) -> int:
    """How many participants the other live nodes serve, from the room's
    ``connected`` hash (node id -> its connected count); a dead node's or an
    unreadable count is none."""
    total = 0
    for other, count in counts.items():
        if other == node or other not in alive:
            continue
        try:
            total += max(0, int(count))
        except (TypeError, ValueError):
            continue
    return total


def unseen_elsewhere(
    connected_there: int, participants: Iterable[str], local: Collection[str]
) -> int:
    """Participants on other nodes that this copy does not seat (a crowd's
    listeners are in no value): what the other nodes serve, less those of
    theirs this copy seats. Connected counts do not depend on what a value
    names, so a commit that changes it moves nothing here. A room that is no
    crowd anywhere has every participant in its value: none (its count stays
    exact, not a heartbeat behind)."""
    if len(local) + connected_there <= PARTICIPANT_LIST_MAX:
        return 0
    seated_there = sum(1 for pid in participants if pid not in local)
    return max(0, connected_there - seated_there)


def nodes_in(value: Mapping[str, Any] | None) -> set[str]:
    return set(value.get("live", {}).values()) if value else set()


def live_on(value: Mapping[str, Any] | None, node: str) -> list[str]:
    """Participants the value says are connected to ``node``."""
    if not value:
        return []
    return [pid for pid, where in value.get("live", {}).items() if where == node]
