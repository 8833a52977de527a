"""The sender pool on real sockets, and a big room's fan-out through it on a real server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from musicsync.fanpool import BLOCK, SenderDied, SenderPool, default_threads
from musicsync.protocol import Volume

from .conftest import connect, make_settings, open_server
from .test_e2e_slow import open_stalled_client

FRAME = b"\x81\x05hello"
SMALL_BUFFER = 4096


@pytest.fixture
def pool() -> Iterator[SenderPool]:
    senders = SenderPool(2, min_sockets=1)
    yield senders
    senders.close()


def own_send(sock: socket.socket) -> Callable[[bytes], int]:
    return sock.send


def same(send: Callable[[bytes], int]) -> Callable[[bytes], int]:
    return send


def socket_pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = [socket.socketpair() for _ in range(n)]
    for ours, _ in pairs:
        ours.setblocking(False)
    return pairs


def close_all(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for ours, theirs in pairs:
        ours.close()
        theirs.close()


def test_every_socket_gets_the_frame_once(pool: SenderPool) -> None:
    pairs = socket_pairs(10 * BLOCK + 3)  # blocks for every thread, and a short last one
    try:
        assert pool.send(FRAME, [ours for ours, _ in pairs], own_send) == []
        for _, theirs in pairs:
            theirs.setblocking(False)
            assert theirs.recv(100) == FRAME  # exactly once: nothing more waits
        assert pool.parallel_sends == 1
    finally:
        close_all(pairs)


def test_the_threads_share_the_sends(pool: SenderPool) -> None:
    """Each helper takes blocks too (a helper that woke late takes fewer)."""
    pairs = socket_pairs(40 * BLOCK)
    senders: set[str] = set()
    first_helper = threading.Event()

    def watched(send: Callable[[bytes], int]) -> Callable[[bytes], int]:
        def call(data: bytes) -> int:
            name = threading.current_thread().name
            senders.add(name)
            if name != threading.main_thread().name:
                first_helper.set()
            else:  # the loop's own share waits (boundedly) for a helper to join in
                first_helper.wait(5)
            return send(data)

        return call

    try:
        assert pool.send(FRAME, [watched(ours.send) for ours, _ in pairs], same) == []
        assert threading.main_thread().name in senders
        assert senders & {"musicsync-sender-0", "musicsync-sender-1"}
    finally:
        close_all(pairs)


def test_full_partial_and_broken_sockets_are_reported(pool: SenderPool) -> None:
    """A full buffer: BlockingIOError; room for part: the count; a gone peer: its error."""
    pairs = socket_pairs(3 * BLOCK)
    full, partial = pairs[5][0], pairs[BLOCK + 7][0]
    big = b"x" * (64 * 1024)  # the default buffers take it whole
    for ours in (full, partial):
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    with pytest.raises(BlockingIOError):
        while True:
            full.send(big)
    pairs[2 * BLOCK + 1][1].close()
    try:
        misses = dict(pool.send(big, [ours for ours, _ in pairs], own_send))
        assert set(misses) == {5, BLOCK + 7, 2 * BLOCK + 1}
        assert isinstance(misses[5], BlockingIOError)
        taken = misses[BLOCK + 7]
        assert isinstance(taken, int) and 0 < taken < len(big)
        assert isinstance(misses[2 * BLOCK + 1], BrokenPipeError)
    finally:
        close_all(pairs)


def test_items_without_a_direct_send_are_reported_untried(pool: SenderPool) -> None:
    pairs = socket_pairs(3 * BLOCK)
    skipped = {0, BLOCK, 3 * BLOCK - 1}
    items = list(enumerate(ours for ours, _ in pairs))

    def direct(item: tuple[int, socket.socket]) -> Callable[[bytes], int] | None:
        return None if item[0] in skipped else item[1].send

    try:
        assert sorted(pool.send(FRAME, items, direct)) == sorted((i, None) for i in skipped)
        for i, (_, theirs) in enumerate(pairs):
            theirs.setblocking(False)
            if i in skipped:
                with pytest.raises(BlockingIOError):
                    theirs.recv(100)
            else:
                assert theirs.recv(100) == FRAME
    finally:
        close_all(pairs)


def test_small_lists_are_sent_by_the_caller_alone() -> None:
    senders = SenderPool(1, min_sockets=100)
    pairs = socket_pairs(99)
    try:
        assert senders.send(FRAME, [ours for ours, _ in pairs], own_send) == []
        assert senders.parallel_sends == 0
    finally:
        senders.close()
        close_all(pairs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_sender_thread_that_dies_is_reported_once_then_the_caller_sends_alone() -> None:
    senders = SenderPool(1, min_sockets=1)
    pairs = socket_pairs(4 * BLOCK)
    helper_failed = threading.Event()

    def failing_in_helpers(send: Callable[[bytes], int]) -> Callable[[bytes], int]:
        def call(data: bytes) -> int:
            if threading.current_thread() is not threading.main_thread():
                helper_failed.set()
                raise ValueError("a bug in a sender thread")
            helper_failed.wait(5)  # the helper takes a block before the loop is done
            return send(data)

        return call

    try:
        with pytest.raises(SenderDied):
            senders.send(FRAME, [failing_in_helpers(ours.send) for ours, _ in pairs], same)
        assert senders.threads == 0
        assert senders.send(FRAME, [ours for ours, _ in pairs], own_send) == []  # the caller alone
    finally:
        senders.close()
        close_all(pairs)


def test_close_stops_the_threads_and_sends_go_on() -> None:
    senders = SenderPool(2, min_sockets=1)
    threads = [t for t in threading.enumerate() if t.name.startswith("musicsync-sender-")]
    assert len(threads) >= 2
    senders.close()
    senders.close()  # twice is fine
    assert senders.threads == 0
    pairs = socket_pairs(3)
    try:
        assert senders.send(FRAME, [ours for ours, _ in pairs], own_send) == []
    finally:
        close_all(pairs)


def test_default_threads_leave_one_core_to_the_loop() -> None:
    assert 0 <= default_threads() <= 3


# -- a real server whose every room is "big" ----------------------------------


async def test_a_pooled_broadcast_wakes_no_task_per_listener(tmp_path: Path) -> None:
    async with open_server(make_settings(tmp_path)) as server, AsyncExitStack() as stack:
        hub = server.hub
        hub.senders.min_sockets = 2
        if not hub.senders.threads:
            pytest.skip("one core: the hub starts no sender thread")
        host = await stack.enter_async_context(connect(server, name="H"))
        peers = [await stack.enter_async_context(connect(server, name=f"L{i}")) for i in range(20)]
        await trio.sleep(0.2)  # presence settled; every writer asleep
        entry = hub.rooms["main"]

        def change(volume: float) -> None:  # the hub's fan-out, synchronously
            hub._apply(entry, entry.room.handle(host.id, Volume(volume=volume), hub.clock.now_ms()))

        before = trio.lowlevel.current_statistics().tasks_runnable
        sent, pooled = hub.stats.messages_out, hub.senders.parallel_sends
        change(0.5)
        assert hub.senders.parallel_sends == pooled + 1
        assert hub.stats.messages_out - sent == 21
        assert trio.lowlevel.current_statistics().tasks_runnable - before == 0
        entry.clients[peers[0].id].sink = None  # as if its socket were full
        change(0.25)
        assert hub.senders.parallel_sends == pooled + 2
        assert trio.lowlevel.current_statistics().tasks_runnable - before == 1  # its writer only
        for peer in (host, *peers):
            assert (await peer.expect_state(version=1))["volume"] == 0.5
            assert (await peer.expect_state(version=2))["volume"] == 0.25


async def test_a_stalled_listener_in_a_pooled_room_is_queued_then_dropped(tmp_path: Path) -> None:
    """Its full socket goes back to its writer (newest state wins); the others
    get every state, in order; it is dropped (by the writer's send timeout or
    the kernel's TCP_USER_TIMEOUT, whichever comes first)."""
    settings = make_settings(tmp_path, send_timeout=1.0, heartbeat_timeout=60.0)
    async with open_server(settings) as server, connect(server, name="H") as host:
        server.hub.senders.min_sockets = 2
        stalled = await open_stalled_client(server.http)
        try:
            async with connect(server, name="L") as listener:
                with trio.fail_after(20):
                    for version in range(1, 31):
                        url = f"https://example.com/{version}/" + "a" * 1900 + ".mp3"
                        await host.send("set_track", url=url, title="t" * 200)
                        assert (await listener.expect_state())["version"] == version
                        await host.send("ping", t0=version)
                        await listener.send("ping", t0=version)
                        await trio.sleep(0.07)  # inside the host's 10/s budget
                    while server.hub.connection_count > 2:
                        await host.send("ping", t0=0)
                        await listener.send("ping", t0=0)
                        await trio.sleep(0.1)
                assert server.hub.senders.parallel_misses > 0  # its socket, through the pool
                # its outbox kept only the newest of the states its full socket could not take
                assert server.hub.coalesced_states() > 0
                await host.send("play", position=1)
                assert (await listener.expect_state(paused=False))["position"] == 1
        finally:
            await stalled.aclose()
