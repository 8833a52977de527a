"""Issue 10, HTTP side: ranges past the end of a file, filling the disk with uploads,
DNS rebinding, hostile track titles and stolen resume tokens, each while two honest
clients keep playing."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from musicsync.access import hash_token

from .. import audio_samples as audio
from ..conftest import connect
from .conftest import Arena, MiB, open_arena
from .test_http import host_port, multipart, post_upload, raw_http

ISSUE_FILE = audio.wav(2.0)  # 32 044 bytes: the file of the issue
assert len(ISSUE_FILE) == 32_044


def ranged(target: str, spec: str, host: str = "localhost") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nRange: {spec}\r\nConnection: close\r\n\r\n"
    ).encode()


async def raw_head(arena: Arena, request: bytes) -> bytes:
    """The whole raw answer (head and body) to ``request``, read until the server closes."""
    stream = await trio.open_tcp_stream(*host_port(arena))
    async with stream:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                answer += chunk
    return answer


def header(answer: bytes, name: str) -> str | None:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def test_range_past_the_end_of_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_arena(tmp_path) as arena:
        (arena.server.settings.media_dir / "issue.wav").write_bytes(ISSUE_FILE)
        async with arena.attack():
            # The exact requests of the issue, on the raw socket: Content-Length must
            # match the bytes that follow, and the connection must end cleanly.
            answer = await raw_head(arena, ranged("/media/issue.wav", "bytes=30000-35000"))
            assert answer.startswith(b"HTTP/1.1 206")
            assert header(answer, "Content-Range") == "bytes 30000-32043/32044"
            assert header(answer, "Content-Length") == "2044"
            assert answer.split(b"\r\n\r\n", 1)[1] == ISSUE_FILE[30000:]
            answer = await raw_head(arena, ranged("/media/issue.wav", "bytes=0-40000"))
            assert header(answer, "Content-Range") == "bytes 0-32043/32044"
            assert answer.split(b"\r\n\r\n", 1)[1] == ISSUE_FILE
            huge = "bytes=0-" + str(10**24)
            statuses = []
            for _ in range(200):  # the 200 requests that wrote 510 KB of tracebacks
                status, body = await raw_http(arena, ranged("/media/issue.wav", huge))
                assert body == ISSUE_FILE
                statuses.append(status)
            assert statuses == [206] * 200
            answer = await raw_head(arena, ranged("/media/issue.wav", "bytes=40000-"))
            assert answer.startswith(b"HTTP/1.1 416")
            assert header(answer, "Content-Range") == "bytes */32044"
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body["error"] == "range_not_satisfiable"
            start_huge = "bytes=" + str(10**24) + "-"
            odd = [start_huge, "bytes=-0", "bytes=5-1", "bytes=0-1,5-9", "bytes=x-y", "lines=1-2"]
            seen = [(await raw_http(arena, ranged("/media/issue.wav", s)))[0] for s in odd]
            assert seen == [416, 416, 200, 200, 200, 200]
            arena.note(
                "bytes=30000-35000: 206, 2044 bytes (bytes 30000-32043/32044); "
                "bytes=0-40000: 206 capped at the last byte; 200 x bytes=0-10^24: 206 each, "
                "no traceback; bytes=40000-, a 10^24 start, bytes=-0: 416 bytes */32044; "
                "end before start, several ranges, junk, another unit: 200, the whole file"
            )
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_anyone_can_fill_the_disk_no_more(tmp_path: Path) -> None:
    """A client opens its own room (so it is host there) and uploads as much as it can."""
    wav = audio.wav(20.0)  # 320 KB
    async with open_arena(tmp_path, upload_budget_bytes_per_hour=MiB) as arena:
        async with (
            arena.attack(retained_budget=2 * MiB),
            connect(arena.server, "attackers-own-room", name="filler") as filler,
        ):
            token = filler.welcome["you"]["token"]
            assert filler.welcome["you"]["role"] == "host"
            results = []
            for i in range(6):
                status, reply = await post_upload(
                    arena, "attackers-own-room", token, multipart(f"fill{i}.wav", wav)
                )
                results.append((status, reply.get("error")))
            assert results == [(201, None)] * 3 + [(429, "upload_budget")] * 3, results
            arena.note("1 MB/hour budget: 201 x3 (320 KB each), then 429 upload_budget x3")
        stored = [p for p in arena.server.settings.media_dir.iterdir() if p.is_file()]
        assert len(stored) == 3


async def test_library_cap_and_free_disk_floor(tmp_path: Path) -> None:
    import os

    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    async with (
        open_arena(tmp_path, library_max_bytes=MiB) as arena,
        arena.attack(retained_budget=2 * MiB),
        connect(arena.server, "own", name="filler") as filler,
    ):
        token = filler.welcome["you"]["token"]
        wav = audio.wav(20.0)
        results = []
        for i in range(5):
            status, reply = await post_upload(arena, "own", token, multipart(f"{i}.wav", wav))
            results.append((status, reply.get("error")))
        assert results == [(201, None)] * 3 + [(507, "library_full")] * 2, results
        arena.note("1 MB library cap: 201 x3, then 507 library_full")
    more = tmp_path / "floor"
    more.mkdir()
    async with (
        open_arena(more, min_free_disk_bytes=free + 1024 * MiB) as arena,
        arena.attack(),
        connect(arena.server, "own", name="filler") as filler,
    ):
        token = filler.welcome["you"]["token"]
        status, reply = await post_upload(arena, "own", token, multipart("a.wav", ISSUE_FILE))
        assert (status, reply["error"]) == (507, "disk_full")
        assert not (arena.server.settings.media_dir / ".uploads").exists()
        arena.note("below the free-disk floor: 507 disk_full, no part file written")


async def test_uploads_off(tmp_path: Path) -> None:
    async with open_arena(tmp_path, uploads="off") as arena, arena.attack():
        host_token = arena.host.welcome["you"]["token"]
        status, reply = await post_upload(arena, "main", host_token, multipart("a.wav", ISSUE_FILE))
        assert (status, reply["error"]) == (403, "uploads_off")
        arena.note("--uploads off: even the host's upload is 403 uploads_off")


async def test_dns_rebinding(arena: Arena) -> None:
    """A page on rebind.evil.example whose name now points at this server."""
    evil = "rebind.evil.example"
    async with arena.attack():
        statuses = []
        for target in ("/", "/r/main", "/api/library", "/healthz", "/api/share", "/media/x.wav"):
            request = f"GET {target} HTTP/1.1\r\nHost: {evil}:8000\r\nConnection: close\r\n\r\n"
            status, body = await raw_http(arena, request.encode())
            assert json.loads(body)["error"] == "misdirected"
            statuses.append(status)
        assert statuses == [421] * 6
        host, port = host_port(arena)
        ws = WSConnection(ConnectionType.CLIENT)
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            upgrade = Request(
                host=f"{evil}:{port}",
                target="/ws/main?name=rebound",
                extra_headers=[(b"origin", f"http://{evil}:{port}".encode())],
            )
            await stream.send_all(ws.send(upgrade))
            with trio.fail_after(5):
                answer = await stream.receive_some()
        assert answer.split(b" ", 2)[1] in (b"403", b"421"), answer[:40]
        assert arena.server.hub.connection_count == 2
        ok, _ = await raw_http(
            arena, f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        assert ok == 200
        arena.note(
            f"Host {evil}: 421 misdirected on 6 routes; its WebSocket upgrade refused "
            f"({answer.split(b' ', 2)[1].decode()}) before it is accepted; own address: 200"
        )


HOSTILE_TITLES = [
    "Evil\u202egnp.exe",  # renders as "Evilexe.png"
    "zero\u200bwidth\u200d\ufeff",
    "line\nbreak\r\x1b[2J\x07",
    "\u2066\u2067isolates\u2069\u2069",
]


async def test_hostile_track_titles(arena: Arena) -> None:
    await arena.host_command("room_settings", listeners_may_upload=True)
    async with arena.attack(), connect(arena.server, name="titler") as titler:
        for title in HOSTILE_TITLES:
            await titler.send("queue_add", url="/media/x.mp3", title=title)
        room = arena.server.hub.rooms["main"].room

        def titles_now() -> list[str]:  # the first one queued into an empty room plays
            return [t.title for t in [room.track, *(q.track for q in room.queue)] if t]

        with trio.fail_after(5):
            while len(titles_now()) < len(HOSTILE_TITLES):  # noqa: ASYNC110 - polling
                await trio.sleep(0.02)
        titles = titles_now()
        assert titles == ["Evilgnp.exe", "zerowidth", "linebreak[2J", "isolates"]
        # what the honest listener holds is the same, cleaned: wait for the
        # version that holds all four (the host's own commands, which the
        # arena counts, may be older than the titler's last queue_add)
        holding_all = room.version
        listener = arena.seen["listener"]
        with trio.fail_after(5):
            while not listener.versions or listener.versions[-1] < holding_all:  # noqa: ASYNC110
                await trio.sleep(0.02)
        _, _, last = listener.states[-1]
        assert [last["track"]["title"], *(q["title"] for q in last["queue"])] == titles
        arena.note("4 titles with bidi, zero-width and control characters: queued cleaned")


async def test_a_stolen_database_holds_no_token(arena: Arena) -> None:
    hub = arena.server.hub
    async with arena.attack():
        await hub.persist_all()
        data = arena.server.settings.data_dir
        raw = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file())
        host_token = arena.host.welcome["you"]["token"]
        listener_token = arena.listener.welcome["you"]["token"]
        assert host_token.encode() not in raw and listener_token.encode() not in raw
        assert hash_token(host_token).encode() in raw
        # the hash, replayed as a token, is nobody
        async with connect(arena.server, name="thief", token=hash_token(host_token)) as thief:
            assert thief.welcome["you"]["role"] == "listener"
            assert thief.id != arena.host.id
            assert thief.welcome["you"]["token"] not in (host_token, hash_token(host_token))
        guess = secrets.token_urlsafe(16)
        async with connect(arena.server, name="guess", token=guess) as guesser:
            assert guesser.welcome["you"]["role"] == "listener"
        arena.note(
            "database files: no plain token, only SHA-256 hashes; a hash replayed as a "
            "token joins as a new listener"
        )
