"""A join refused while Redis is away announces nothing; once Redis is back, it is taken."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.cluster.conftest import Bell, Cluster, Node, connect
from tests.conftest import Peer, open_ws

CLOSE_UNAVAILABLE = 1013
# Redis restarts and the nodes' subscribers reconnect (backoff up to 5 s).
BACK_WITHIN = 30.0
PING_EVERY = 5.0  # as the page's heartbeat (the nodes drop a client silent for 30 s)


async def refused(node: Node, name: str) -> tuple[dict[str, Any], int]:
    """Connect and read what the node says before it closes: (error frame, close code)."""
    async with open_ws(node.ws_url("main", name)) as conn:
        first = json.loads(await conn.get_message())
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(10):
            await conn.get_message()
    assert info.value.reason.code is not None
    return first, info.value.reason.code


async def collect(peer: Peer, into: list[dict[str, Any]], done: trio.Event, bell: Bell) -> None:
    """Every presence the peer gets until ``done``; it pings as a page does (the
    test outlasts the heartbeat timeout on a loaded machine: Redis down, then back)."""
    next_ping = trio.current_time()
    while not done.is_set():
        if trio.current_time() >= next_ping:
            await peer.send("ping", t0=0)
            next_ping = trio.current_time() + PING_EVERY
        with trio.move_on_after(0.1):
            msg = await peer.recv()
            if msg["type"] == "presence":
                into.append(msg)
                bell.ring()


def heard_by_all(seen: dict[str, list[dict[str, Any]]], pid: str) -> bool:
    return all(any(p["id"] == pid for m in ms for p in m["joined"]) for ms in seen.values())


async def test_a_join_refused_while_redis_is_down_is_never_announced(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="lis") as lis:
        await host.expect_presence(lambda m: any(p["name"] == "lis" for p in m["joined"]))
        count_before = 2
        seen: dict[str, list[dict[str, Any]]] = {"host": [], "lis": []}
        done = trio.Event()
        bell = Bell()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, host, seen["host"], done, bell)
            nursery.start_soon(collect, lis, seen["lis"], done, bell)
            cluster.redis.kill()
            for node in (a, b):  # the room is live on both: admitted, then its seat is refused
                first, code = await refused(node, "late")
                assert first["type"] == "error" and first["code"] == "unavailable", first
                assert code == CLOSE_UNAVAILABLE
            await host.send("volume", volume=0.4)  # a change wakes the room's timer on A
            cluster.redis.start()
            with trio.fail_after(BACK_WITHIN):
                while True:  # until the nodes are back on Redis: then the join is taken
                    try:
                        async with connect(a, name="late") as late:
                            late_id = late.id
                            assert late.welcome["participant_count"] == count_before + 1
                            await bell.until(functools.partial(heard_by_all, seen, late.id))
                            break
                    except (ConnectionClosed, HandshakeError):
                        await trio.sleep(0.25)  # refused (an error frame, then 1013): again
            with trio.fail_after(10):  # both heard it leave again: its news are all in
                await bell.until(
                    lambda: all(any(late_id in m["left"] for m in ms) for ms in seen.values())
                )
            done.set()
        for name, presences in seen.items():
            joined = [p for m in presences for p in m["joined"] if p["name"] == "late"]
            # Only the join Redis took is announced (left again when it closed).
            assert [p["id"] for p in joined] == [late_id], (name, presences)
            counts = [m["count"] for m in presences]
            assert max(counts) == count_before + 1, (name, presences)
