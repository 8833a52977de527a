"""A crowd split over two nodes has one count: each node counts the listeners the others hold.

A crowd's listeners (over 100 in a room) are not in the room's shared value, so
each node knew only its own: a room of 221 on two nodes said 111 on each. Each
node now publishes how many listeners only it holds (a hash in Redis, read on
every heartbeat), and the welcome's ``participant_count`` and presence
``count`` add the other live nodes' counts.
"""

from __future__ import annotations

import json
from collections import Counter

import trio
from trio_websocket import WebSocketConnection

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
    counts: dict[str, int] = {}  # the count of the last presence news each one heard
    done = trio.Event()
    news = Bell()

    async def listen(conn: WebSocketConnection, name: str) -> None:
        """Note every presence count; ping as a page does."""
        next_ping = trio.current_time()
        while not done.is_set():
            if trio.current_time() >= next_ping:
                await conn.send_message(json.dumps({"type": "ping", "t0": 0}))
                next_ping = trio.current_time() + PING_EVERY
            with trio.move_on_after(0.2):
                msg = json.loads(await conn.get_message())
                if msg["type"] == "presence":
                    counts[name] = int(msg["count"])
                    news.ring()

    async def listener(node: Node, name: str, gate: trio.Semaphore) -> None:
        async with admitted(gate, node, name) as (conn, first):
            assert first["type"] == "welcome", first
            seated.add(name)
            news.ring()
            await listen(conn, name)

    everyone = 1 + 2 * LISTENERS_PER_NODE  # the host and the two crowds
    async with connect(a, name="host") as host, trio.open_nursery() as nursery:
        nursery.start_soon(listen, host.conn, "host")
        gate = trio.Semaphore(IN_FLIGHT)
        for node, tag in ((a, "a"), (b, "b")):
            for i in range(LISTENERS_PER_NODE):
                nursery.start_soon(listener, node, f"{tag}{i}", gate)
        with trio.fail_after(SEATED_WITHIN):
            await news.until(lambda: len(seated) == 2 * LISTENERS_PER_NODE)
        # every one of them, on either node, is told the whole room's count
        with trio.move_on_after(COUNTED_WITHIN):
            await news.until(lambda: len(counts) == everyone and set(counts.values()) == {everyone})
        wrong = {name: n for name, n in counts.items() if n != everyone}
        assert len(counts) == everyone and not wrong, (len(counts), Counter(wrong.values()))
        # and a page joining node B is told it in its welcome (itself included),
        # once B's copy has caught up with the last change it heard of
        seen: list[int] = []
        with trio.move_on_after(COUNTED_WITHIN):
            while not seen or seen[-1] != everyone + 1:
                async with connect(b, name="late") as late:
                    seen.append(int(late.welcome["participant_count"]))
                await trio.sleep(0.2)
        assert seen and seen[-1] == everyone + 1, seen
        done.set()
