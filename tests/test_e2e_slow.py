"""A client that stops reading is dropped; it never delays anyone else; heartbeats."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from musicsync.app import _writer
from musicsync.clock import ServerClock
from musicsync.config import Settings
from musicsync.hub import CLOSE_HEARTBEAT, CLOSE_SLOW, Client, Hub
from musicsync.outbox import Frame
from musicsync.protocol import QueueAdd, SetTrack, Volume

from .conftest import connect, make_settings, open_server

STALLED_RCVBUF = 4096
SEND_TIMEOUT = 1.0


async def open_stalled_client(http_url: str, room: str = "main") -> trio.SocketStream:
    """Handshake by hand over a socket with a tiny receive buffer, then never read."""
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=f"/ws/{room}?name=stall")))
    response = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(1)  # byte by byte: leave frames unread
    assert b" 101 " in response.split(b"\r\n", 1)[0]
    return stream


async def test_stalled_client_never_delays_others_and_is_dropped(tmp_path: Path) -> None:
    # The stalled client never reads (a zero receive window). Hypercorn shields
    # its socket writes from cancellation, so the server sets TCP_USER_TIMEOUT
    # = send_timeout on its sockets and the kernel aborts the connection once
    # data has gone unacknowledged that long. The heartbeat is far away here.
    settings = make_settings(tmp_path, send_timeout=SEND_TIMEOUT, heartbeat_timeout=60.0)
    async with open_server(settings) as server, connect(server, name="H") as host:
        stalled = await open_stalled_client(server.http)
        try:
            async with connect(server, name="L") as listener:
                assert server.hub.connection_count == 3
                delays = []
                with trio.fail_after(20):
                    for version in range(1, 41):
                        url = f"https://example.com/{version}/" + "a" * 1900 + ".mp3"
                        sent = trio.current_time()
                        await host.send("set_track", url=url, title="t" * 200)
                        state = await listener.expect_state()
                        delays.append(trio.current_time() - sent)
                        # nothing skipped, nothing reordered for the honest listener
                        assert state["version"] == version
                        await host.send("ping", t0=version)
                        await listener.send("ping", t0=version)
                        await trio.sleep(0.07)  # inside the host's 10/s budget
                    while server.hub.connection_count > 2:
                        await host.send("ping", t0=0)  # the honest ones stay alive
                        await listener.send("ping", t0=0)
                        await trio.sleep(0.1)
                assert server.hub.stats.closes[CLOSE_HEARTBEAT] == 0
                assert max(delays) < SEND_TIMEOUT / 2, delays
                await host.send("play", position=1)
                assert (await listener.expect_state(paused=False))["position"] == 1
        finally:
            await stalled.aclose()


class BlockedTransport:
    """A socket whose peer stopped reading: every send blocks forever."""

    sink = None

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: list[int] = []

    async def receive(self) -> str | bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, frame: Frame) -> None:
        if self.sent:
            await trio.sleep_forever()
        self.sent.append(frame.text)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed.append(code)
        await trio.sleep_forever()  # the close frame cannot get out either


async def test_writer_drops_a_client_stuck_past_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub(Settings(send_timeout=10.0), ServerClock(trio.current_time))
    client = Client("127.0.0.1", outbox_max_frames=8)
    transport = BlockedTransport()
    client.deliver(Frame("first"))
    client.deliver(Frame("second"))
    start = trio.current_time()
    await _writer(hub, client, transport)
    assert transport.sent == ["first"]
    assert client.close_code == CLOSE_SLOW
    assert 10.0 <= trio.current_time() - start < 11.0


async def test_silent_client_is_dropped_after_heartbeat_timeout(tmp_path: Path) -> None:
    async with (
        open_server(make_settings(tmp_path, heartbeat_timeout=0.3)) as server,
        connect(server, name="quiet") as quiet,
        connect(server, name="chatty") as chatty,
    ):
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                await chatty.send("ping", t0=0)  # keeps chatty alive
                with trio.move_on_after(0.05):
                    await quiet.conn.get_message()
        assert info.value.reason.code == CLOSE_HEARTBEAT
        await chatty.send("ping", t0=-1)
        while (await chatty.expect("pong"))["t0"] != -1:
            pass


async def test_heartbeat_deadline_follows_last_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The hub's one heartbeat sweep, on trio's mock clock: no real waiting."""
    settings = Settings(heartbeat_timeout=30.0)
    hub = Hub(settings, ServerClock(trio.current_time))
    client = Client("127.0.0.1", outbox_max_frames=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        nursery.start_soon(hub.sweep_heartbeats)
        hub.join("main", client, "quiet")
        await trio.sleep(29.0)
        client.last_seen = trio.current_time()  # a frame arrived
        await trio.sleep(29.0)
        assert client.close_code is None
        await trio.sleep(1.0 + 1.0)  # one sweep period (1 s) past the deadline at most
        assert client.close_code == CLOSE_HEARTBEAT
        nursery.cancel_scope.cancel()


async def test_outbox_overflow_marks_client_slow(autojump_clock: trio.testing.MockClock) -> None:
    client = Client("127.0.0.1", outbox_max_frames=3)
    for i in range(3):
        client.deliver(Frame(f"frame {i}"))
    assert client.close_code is None
    client.deliver(Frame("one too many"))
    assert client.close_code == CLOSE_SLOW
    # state frames coalesce instead of overflowing
    other = Client("127.0.0.1", outbox_max_frames=3)
    for i in range(100):
        other.deliver_state(Frame(f"state {i}"))
    assert other.close_code is None
    assert len(other.outbox) == 1
    popped = other.outbox.pop()
    assert isinstance(popped, Frame) and popped.text == "state 99"


async def handshake_headers(http_url: str) -> dict[bytes, bytes]:
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        offer = [(b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")]
        await stream.send_all(ws.send(Request(host=host, target="/ws/main", extra_headers=offer)))
        response = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in response:
                response += await stream.receive_some()
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b" 101 " in head[0]
    return {k.strip().lower(): v.strip() for k, v in (h.split(b":", 1) for h in head[1:])}


async def test_permessage_deflate_is_declined_by_default(tmp_path: Path) -> None:
    async with open_server(make_settings(tmp_path)) as server:
        assert b"sec-websocket-extensions" not in await handshake_headers(server.http)
    async with open_server(make_settings(tmp_path, websocket_compression=True)) as server:
        headers = await handshake_headers(server.http)
        assert headers[b"sec-websocket-extensions"].startswith(b"permessage-deflate")
    async with open_server(make_settings(tmp_path)) as server:
        assert b"sec-websocket-extensions" not in await handshake_headers(server.http)


async def test_a_slow_client_never_misses_a_queue_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A full socket's outbox keeps only the newest state. States leave the queue
    out for clients already sent it, so the one that replaces a queued state
    that carried a queue change must carry it too."""
    hub = Hub(Settings(), ServerClock(trio.current_time))
    host, slow = Client("127.0.0.1", 8), Client("127.0.0.1", 8)  # no sockets: all queued
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        hub.join("main", host, "H")
        hub.join("main", slow, "S")
        track = "https://example.com/a.mp3"
        for msg in (
            SetTrack(url=track, title="Now", duration=200.0),
            QueueAdd(url="https://example.com/b.mp3", title="B"),
            Volume(volume=0.5),
        ):
            await hub.handle("main", host, msg)
        frames = []
        while (item := slow.outbox.pop()) is not None:
            assert isinstance(item, Frame)
            frames.append(json.loads(item.text))
        states = [f["room"] for f in frames if f["type"] == "state"]
        assert [s["version"] for s in states] == [3]  # newest wins
        assert [q["title"] for q in states[0]["queue"]] == ["B"]  # and it has the queue
        slow.saw(Frame("", queue_rev=hub.rooms["main"].room.queue_rev))  # it went out
        await hub.handle("main", host, Volume(volume=0.25))
        item = slow.outbox.pop()
        assert isinstance(item, Frame) and "queue" not in json.loads(item.text)["room"]
        nursery.cancel_scope.cancel()
