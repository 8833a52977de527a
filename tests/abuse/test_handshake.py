"""The front door's own WebSocket handshake and frame budget, attacked (issues 10 and 11).

Hypercorn used to check the upgrade request; the front door does now. Each
case sends the exact bytes, asserts what the attacker gets and, through the
arena, that the two honest clients kept playing with nothing lost.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import h11
import httpx
import trio
import trio.lowlevel
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from musicsync.app import create_app

from ..conftest import make_settings
from .conftest import OP_CONT, OP_TEXT, Arena, RawWS, ws_frame

OP_PONG = 0xA

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(
    path: str = "/ws/main?name=x",
    *,
    host: str = "127.0.0.1",
    version: str = "13",
    key: str = KEY,
    http: str = "1.1",
    origin: str | None = None,
    extra: str = "",
    upgrade_header: bool = True,
) -> bytes:
    lines = [
        f"GET {path} HTTP/{http}",
        f"Host: {host}",
        *(["Upgrade: websocket"] if upgrade_header else []),
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {version}",
        *([f"Origin: {origin}"] if origin else []),
    ]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def host_port(arena: Arena) -> tuple[str, int]:
    host, port = arena.server.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def answer(arena: Arena, data: bytes, limit: float = 10.0) -> bytes:
    """Send ``data`` in ONE write; everything the server says until it closes."""
    stream = await trio.open_tcp_stream(*host_port(arena))
    got = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(limit):
            while True:
                try:
                    chunk = await stream.receive_some()
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                got += chunk
                if b"\r\n\r\n" in got and not got.startswith(b"HTTP/1.1 101"):
                    head, _, body = got.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
                if got.startswith(b"HTTP/1.1 101"):
                    break
    return got


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def healthy(arena: Arena) -> bool:
    url = arena.server.http + "/healthz"
    response = await trio.to_thread.run_sync(lambda: httpx.get(url, timeout=5))
    return response.status_code == 200


async def test_one_write_of_upgrade_and_more_bytes_cannot_stop_the_server(arena: Arena) -> None:
    """Issue 10, bug 1: an upgrade request plus one more byte in one write ended the
    process (Hypercorn #225). Refused origin, unknown path, and an accepted room."""
    async with arena.attack():
        refused = await answer(arena, upgrade(origin="http://evil.example") + b"x")
        assert status_of(refused) == 403
        missing = await answer(arena, upgrade("/nope") + b"x")
        assert status_of(missing) == 404
        accepted = await answer(arena, upgrade() + b"x")
        assert status_of(accepted) == 101
        for _ in range(20):  # and again, as fast as it goes
            await answer(arena, upgrade(origin="http://evil.example") + b"x")
        assert await healthy(arena)
        arena.note("upgrade+'x' in one write: 403 / 404 / 101, 23 times; server up")


async def test_bad_handshakes_get_clear_statuses(arena: Arena) -> None:
    cases = {
        "bad key": (upgrade(key="short"), 400),
        "key not base64": (upgrade(key="!!!!!!!!!!!!!!!!!!!!!!!!"), 400),
        "wrong version": (upgrade(version="8"), 426),
        "HTTP/1.0 upgrade": (upgrade(http="1.0"), 400),
        "upgrade on another path": (upgrade("/api/library"), 404),
        "upgrade under /ws/ too deep": (upgrade("/ws/main/x"), 404),
        "POST upgrade": (upgrade().replace(b"GET ", b"POST ", 1), 405),
        "upgrade with a body": (upgrade(extra="Content-Length: 3\r\n") + b"abc", 400),
        "not HTTP at all": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), 400),
    }
    async with arena.attack():
        seen = {}
        for name, (request, want) in cases.items():
            response = await answer(arena, request)
            seen[name] = status_of(response) if response else None
            assert seen[name] == want, (name, response[:200])
        version = await answer(arena, upgrade(version="8"))
        assert b"Sec-WebSocket-Version: 13" in version
        # without the Upgrade header it is plain HTTP: Hypercorn's, and no WebSocket
        plain = await answer(arena, upgrade(upgrade_header=False))
        assert 400 <= status_of(plain) < 500
        arena.note(", ".join(f"{name}: {code}" for name, code in seen.items()))


async def test_oversized_and_trickled_request_heads(arena: Arena) -> None:
    async with arena.attack():
        big = await answer(arena, upgrade(extra="X-Pad: " + "a" * 17_000 + "\r\n"))
        assert status_of(big) == 431

        async def trickle() -> float:
            stream = await trio.open_tcp_stream(*host_port(arena))
            start = trio.current_time()
            async with stream:
                with trio.fail_after(10):
                    for byte in upgrade():
                        try:
                            await stream.send_all(bytes([byte]))
                        except trio.BrokenResourceError:
                            break
                        with trio.move_on_after(0.2):
                            if not await stream.receive_some():
                                break
                    else:
                        raise AssertionError("the whole head got in at a byte per 0.2 s")
            return trio.current_time() - start

        closed_after = []
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(lambda: _append(closed_after, trickle))
        assert len(closed_after) == 10 and max(closed_after) < 7.0, closed_after
        arena.note(
            f"17 KB head: 431; 10 heads at 5 bytes/s: closed after {max(closed_after):.1f} s"
        )


async def _append(into: list[float], coro_fn: object) -> None:
    into.append(await coro_fn())  # type: ignore[operator]


async def test_frames_pipelined_after_the_upgrade_are_read(arena: Arena) -> None:
    ping = ws_frame(OP_TEXT, json.dumps({"type": "ping", "t0": 42}).encode())
    async with arena.attack():
        host, port = host_port(arena)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(upgrade() + ping)  # the frame rides with the request
            conn = h11.Connection(h11.CLIENT)
            got = b""
            with trio.fail_after(5):
                while b'"pong"' not in got:
                    chunk = await stream.receive_some()
                    assert chunk, got
                    got += chunk
        assert got.startswith(b"HTTP/1.1 101 ")
        assert b'"t0":42' in got
        del conn
        arena.note("a ping frame in the same write as the upgrade: 101, welcome, pong")


async def flood_until_closed(
    arena: Arena, frame: bytes, prefix: bytes = b""
) -> tuple[int | None, float, int]:
    """(close code, seconds until closed, frames sent) for ``prefix`` and then a
    flood of ``frame``."""
    async with RawWS.open(arena.server) as raw:
        await raw.send(prefix)
        batch = frame * 2000
        sent = 0
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def keep_sending() -> None:
                nonlocal sent
                try:
                    while True:
                        await raw.stream.send_all(batch)
                        sent += 2000
                        await trio.lowlevel.checkpoint()
                except (trio.BrokenResourceError, trio.BusyResourceError):
                    pass

            nursery.start_soon(keep_sending)
            out = await raw.outcome(limit=10)
            nursery.cancel_scope.cancel()
        return out.close_code, trio.current_time() - start, sent


async def test_floods_of_empty_frames_are_closed(arena: Arena) -> None:
    """Issue 10, bug 3: empty continuation frames (in an unfinished message) and
    empty pongs never reached the app; now every frame counts against the budget."""
    started = ws_frame(OP_TEXT, b'{"type":', fin=False)
    async with arena.attack():
        results = {}
        for name, first, frame in (
            ("empty continuation", started, ws_frame(OP_CONT, b"", fin=False)),
            ("empty pong", b"", ws_frame(OP_PONG, b"")),
        ):
            code, seconds, sent = await flood_until_closed(arena, frame, prefix=first)
            assert code == 1008, (name, code)
            assert seconds < 3.0, (name, seconds)
            results[name] = (seconds, sent)
        rtts = arena.seen["listener"].rtts + arena.seen["host"].rtts
        assert statistics.median(rtts) < 0.05, sorted(rtts)[-10:]
        arena.note(
            "; ".join(
                f"{name}: 1008 after {s:.2f} s ({n} frames sent)"
                for name, (s, n) in results.items()
            )
            + f"; honest pong median {statistics.median(rtts) * 1000:.1f} ms"
        )


async def test_frame_cap_counts_bytes_not_characters(arena: Arena) -> None:
    """16 KiB of characters in 3-byte UTF-8 is 48 KiB of bytes: 1009."""
    text = json.dumps({"type": "ping", "t0": 1, "pad": "€" * 6000}, ensure_ascii=False)
    assert len(text) < 16 * 1024 < len(text.encode())
    async with arena.attack(), RawWS.open(arena.server) as raw:
        await raw.send(ws_frame(OP_TEXT, text.encode()))
        out = await raw.outcome()
        assert out.close_code == 1009
        assert [m.get("code") for m in out.messages if m["type"] == "error"] == ["too_large"]
        arena.note(f"{len(text)} characters, {len(text.encode())} bytes: too_large, 1009")


@asynccontextmanager
async def hypercorn_only(tmp_path: Path) -> AsyncIterator[str]:
    """The app under Hypercorn's own trio worker, as ``hypercorn -k trio`` runs it."""
    settings = make_settings(tmp_path)
    app = create_app(settings)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn_serve, app, config, shutdown_trigger=shutdown.wait)
        )
        yield binds[0]
        shutdown.set()


async def test_hypercorn_path_survives_the_one_write_crash(tmp_path: Path) -> None:
    """``hypercorn -k trio musicsync.app:app`` keeps Hypercorn's loop: the guard holds there."""
    async with hypercorn_only(tmp_path) as base:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        for origin in ("http://evil.example", None):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(upgrade(origin=origin) + b"x")
                with trio.fail_after(5):
                    assert (await stream.receive_some()).startswith(b"HTTP/1.1 ")
        await trio.sleep(0.2)
        response = await trio.to_thread.run_sync(lambda: httpx.get(base + "/healthz", timeout=5))
        assert response.status_code == 200


def test_key_helper_is_a_real_key() -> None:
    assert len(base64.b64decode(KEY)) == 16
