"""A crowd split over two nodes has one count: each node counts the listeners the others hold.

A crowd's listeners (over 100 in a room) are not in the room's shared value, so
each node knew only its own: a room of 221 on two nodes said 111 on each. Each
node now publishes how many listeners only it holds (a hash in Redis, read on
every heartbeat), and the welcome's ``participant_count`` and presence
``count`` add the other live nodes' counts.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from tests.cluster.conftest import Bell, Cluster, Node, admitted, connect

LISTENERS_PER_NODE = 110  # over PARTICIPANT_LIST_MAX on each node: a crowd
IN_FLIGHT = 40
PING_EVERY = 5.0  # as a page does (the nodes drop a client silent for 30 s)
SEATED_WITHIN = 60.0  # generous: the machine is shared
# The count crosses at the next heartbeat (1 s) and the presence flush after
# it (up to 2 s in a crowd): a few seconds, more on a loaded machine.
COUNTED_WITHIN = 20.0


async def test_a_crowd_on_two_nodes_has_one_count(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    seated: set[str] = set()
    done = trio.Event()
    news = Bell()

    async def listener(node: Node, name: str, gate: trio.Semaphore) -> None:
        async with admitted(gate, node, name) as (conn, first):
            assert first["type"] == "welcome", first
            seated.add(name)
            news.ring()
            next_ping = trio.current_time()
            while not done.is_set():
                if trio.current_time() >= next_ping:
                    await conn.send_message(json.dumps({"type": "ping", "t0": 0}))
                    next_ping = trio.current_time() + PING_EVERY
                with trio.move_on_after(0.2):
                    await conn.get_message()

    async def count_seen_on(node: Node) -> int:
        async with connect(node, name="probe") as probe:
            return int(probe.welcome["participant_count"])

    async with connect(a, name="host") as host, trio.open_nursery() as nursery:
        gate = trio.Semaphore(IN_FLIGHT)
        for node, tag in ((a, "a"), (b, "b")):
            for i in range(LISTENERS_PER_NODE):
                nursery.start_soon(listener, node, f"{tag}{i}", gate)
        with trio.fail_after(SEATED_WITHIN):
            await news.until(lambda: len(seated) == 2 * LISTENERS_PER_NODE)
        everyone = 1 + 2 * LISTENERS_PER_NODE  # the host and the two crowds
        counts: dict[str, Any] = {}
        with trio.fail_after(COUNTED_WITHIN):
            while True:  # a probe joining either node is told the whole room (with itself)
                counts = {"a": await count_seen_on(a), "b": await count_seen_on(b)}
                if counts == {"a": everyone + 1, "b": everyone + 1}:
                    break
                await trio.sleep(0.5)
        # and the host's presence news carry that count too, not its node's own
        with trio.fail_after(COUNTED_WITHIN):
            while True:
                msg = await host.recv()
                if msg["type"] == "presence" and msg["count"] == everyone:
                    break
        done.set()
