"""Path traversal in media and uploads, slowloris, oversized headers, a WebSocket that never reads,
and connection exhaustion."""

from __future__ import annotations

import json
import re
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from musicsync import uploads
from musicsync.uploads import TOKEN_HEADER

from .. import audio_samples as audio
from ..conftest import connect
from .conftest import Arena, MiB, RawWS, open_arena

SECRET = b"TOP-SECRET-NOT-MEDIA"
WAV = audio.wav(0.1)
BOUNDARY = "abuse-boundary"
KEEP_ALIVE_TIMEOUT = 5.0  # Hypercorn's default; the server does not change it


def host_port(arena: Arena) -> tuple[str, int]:
    host, port = arena.server.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def raw_http(arena: Arena, request: bytes, limit: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read one response: (status, body). Nothing normalises the path."""
    stream = await trio.open_tcp_stream(*host_port(arena))
    async with stream:
        await stream.send_all(request)
        conn = h11.Connection(h11.CLIENT)
        status, body = 0, b""
        with trio.fail_after(limit):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, body


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


TRAVERSALS = [
    "/media/../secret.mp3",
    "/media/%2e%2e/secret.mp3",
    "/media/%2E%2E%2Fsecret.mp3",
    "/media/..%2fsecret.mp3",
    "/media/..%5csecret.mp3",
    "/media/..\\secret.mp3",
    "/media/sub/../../secret.mp3",
    "/media/sub/%2e%2e/%2e%2e/secret.mp3",
    "/media/%252e%252e/secret.mp3",
    "/media/....//secret.mp3",
    "/media/link.mp3",  # a symlink in the media directory pointing out of it
    "/media/linkdir/secret.mp3",  # a symlinked directory pointing out
    "/media//etc/passwd",
    "/media/%2fetc%2fpasswd",
    "/media/.hidden.mp3",
    "/media/.uploads/part.wav",
    "/media/ok.wav%00.mp3",
    "/media/%c0%ae%c0%ae/secret.mp3",
]


async def test_path_traversal_in_media(tmp_path: Path) -> None:
    (tmp_path / "secret.mp3").write_bytes(SECRET)
    async with open_arena(tmp_path) as arena:
        media = arena.server.settings.media_dir
        (media / "ok.wav").write_bytes(audio.wav(0.1))
        (media / "sub").mkdir()
        (media / ".hidden.mp3").write_bytes(SECRET)
        (media / ".uploads").mkdir()
        (media / ".uploads" / "part.wav").write_bytes(SECRET)
        (media / "link.mp3").symlink_to(tmp_path / "secret.mp3")
        (media / "linkdir").symlink_to(tmp_path)
        statuses = []
        async with arena.attack():
            for target in TRAVERSALS:
                status, body = await raw_http(arena, get(target))
                # 308: Werkzeug merges the double slash and redirects within /media/
                assert status in (308, 400, 404), (target, status)
                assert SECRET not in body, target
                statuses.append(status)
            assert (await raw_http(arena, get("/media/ok.wav")))[0] == 200
            arena.note(
                f"{len(TRAVERSALS)} paths: HTTP 404 x{statuses.count(404)}, "
                f"400 x{statuses.count(400)}, 308 to /media/etc/passwd (then 404) "
                f"x{statuses.count(308)}; never a byte of the secret"
            )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if "data" not in p.relative_to(root).parts)


def multipart(filename: str, data: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def post_upload(arena: Arena, room: str, token: str | None, body: bytes) -> Any:
    """POST /api/upload over a raw socket: (status, JSON body)."""
    head = (
        f"POST /api/upload?room={room} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if token is not None:
        head += f"{TOKEN_HEADER}: {token}\r\n"
    status, reply = await raw_http(arena, (head + "\r\n").encode() + body)
    return status, json.loads(reply)


HOSTILE_NAMES = [
    "../../../evil.wav",
    "..\\..\\evil.wav",
    "/etc/cron.d/evil.wav",
    "C:\\Windows\\evil.wav",
    ".hidden.wav",
    "..",
    "a/../../b.wav",
    "%2e%2e%2fevil.wav",
    "evil.wav\x00.txt",
    "evil\r\nX-Injected: 1.wav",
]


async def test_path_traversal_in_uploads(tmp_path: Path) -> None:
    async with open_arena(tmp_path) as arena:
        invite = await arena.host_command("create_invite", reply="invite", role="cohost")
        before = await trio.to_thread.run_sync(files_under, tmp_path)
        async with (
            arena.attack(retained_budget=2 * MiB),
            connect(arena.server, name="co", invite=invite["code"]) as co,
        ):
            token = co.welcome["you"]["token"]
            stored, malformed = [], []
            for name in HOSTILE_NAMES:
                status, reply = await post_upload(arena, "main", token, multipart(name, WAV))
                if status == 400:  # a CR/LF breaks the multipart part head
                    assert reply["error"] == "bad_request", name
                    malformed.append(name)
                    continue
                assert status == 201, (name, reply)
                stored.append(reply["track"]["url"].removeprefix("/media/"))
            assert len(malformed) <= 1
            for name in stored:
                assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{8}\.wav", name), name
            rooms = ["../main", "..%2fmain", "main/../x", "", "a" * 65]
            for room in rooms:
                status, reply = await post_upload(arena, room, token, multipart("a.wav", b"RIFF"))
                assert (status, reply["error"]) == (400, "bad_room")
            arena.note(
                f"{len(HOSTILE_NAMES)} hostile file names: 201 x{len(stored)}, stored as "
                f"<slug>-<hex>.wav inside the media directory, 400 bad_request x{len(malformed)} "
                f"(CR/LF in the name); {len(rooms)} hostile rooms: 400 bad_room"
            )
        after = await trio.to_thread.run_sync(files_under, tmp_path)
        media = arena.server.settings.media_dir.resolve()
        created = [p for p in after if p not in before]
        assert created and all(p.resolve().is_relative_to(media) for p in created), created


async def test_guessed_and_foreign_upload_tokens(arena: Arena) -> None:
    body = multipart("a.wav", WAV)
    async with arena.attack(), connect(arena.server, "elsewhere", name="other") as other:
        results = []
        tokens = [None, "", "x" * 22, "A" * 4000, other.welcome["you"]["token"]]
        # last, a listener's own, real token: the room lets only its host upload
        for token in [*tokens, arena.listener.welcome["you"]["token"]]:
            status, reply = await post_upload(arena, "main", token, body)
            results.append((status, reply["error"]))
        assert results == [(401, "unauthorized")] * 5 + [(403, "forbidden")]
        arena.note("no/guessed/other room's token: 401 unauthorized x5; a listener's: 403")


async def test_oversized_request_headers(arena: Arena) -> None:
    async with arena.attack():
        # h11 limits only what it holds *incomplete* to 16 KiB; the front door
        # holds a head that arrives whole in one read to the same 16 KiB.
        pad = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: "
        assert (await raw_http(arena, pad + b"a" * 15_000 + b"\r\n\r\n"))[0] == 200
        assert (await raw_http(arena, pad + b"a" * 20_000 + b"\r\n\r\n"))[0] == 431
        for size in (100_000,):
            assert (await raw_http(arena, pad + b"a" * size + b"\r\n\r\n"))[0] == 431
            line = get("/media/" + "a" * size + ".mp3")
            assert (await raw_http(arena, line))[0] == 431
        arena.note("20 KB or 100 KB header, 100 KB request line: HTTP 431 (15 KB: 200)")


async def receive_or_reset(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some()
    except trio.BrokenResourceError:  # reset: unread bytes were still in the server's buffer
        return b""


async def test_slowloris_headers(arena: Arena) -> None:
    """Many connections that send a request a byte at a time, or nothing at all."""
    closed_after: list[float] = []

    async def slow(i: int) -> None:
        stream = await trio.open_tcp_stream(*host_port(arena))
        start = trio.current_time()
        request = b"GET /ws/main?name=slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
        async with stream:
            with trio.fail_after(KEEP_ALIVE_TIMEOUT + 3):
                for byte in request if i % 2 else b"":
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.25):
                        if await receive_or_reset(stream) == b"":
                            break
                else:
                    answer = await receive_or_reset(stream)
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
            closed_after.append(trio.current_time() - start)

    async with arena.attack():
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(slow, i)
        assert len(closed_after) == 40
        # Hypercorn's keep-alive timer runs from the accept until a whole request
        # head has arrived; trickling bytes does not reset it.
        assert min(closed_after) > KEEP_ALIVE_TIMEOUT - 0.5
        assert max(closed_after) < KEEP_ALIVE_TIMEOUT + 1.5
        arena.note(
            f"40 connections (20 silent, 20 sending 4 bytes/s): all closed by the server "
            f"after {min(closed_after):.1f}-{max(closed_after):.1f} s, no response"
        )


UNSENT_BODIES = {
    "upload, no token": b"POST /api/upload?room=main HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n",
    "GET with a body": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
    b"Content-Length: 1000\r\n\r\nab",
    "POST to a page": b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nab",
    "chunked body": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nab",
}
BODY_WAIT = 8.0  # longer than every timeout the server has for HTTP (5 s keep-alive, 5 s drain)
# The socket must close this soon after the response: at once, plus a loaded machine.
CLOSE_AFTER_RESPONSE = 2.0


@dataclass
class Answer:
    """When a raw HTTP client saw the response start and the server close."""

    status: int = 0
    responded: float | None = None
    closed: float | None = None

    @property
    def close_delay(self) -> float:
        assert self.responded is not None and self.closed is not None
        return self.closed - self.responded


async def read_answer(stream: trio.SocketStream, answer: Answer, limit: float) -> None:
    """Read until the server closes (or ``limit``), noting when the response came."""
    received = b""
    with trio.move_on_after(limit):
        while chunk := await receive_or_reset(stream):
            if answer.responded is None:
                answer.responded = trio.current_time()
            received += chunk
        answer.closed = trio.current_time()
    if received.startswith(b"HTTP/1.1 "):
        answer.status = int(received.split(b" ", 2)[1])


def spread(delays: list[float]) -> str:
    return f"{min(delays) * 1000:.0f}-{max(delays) * 1000:.0f} ms"


async def test_slowloris_request_body(arena: Arena) -> None:
    answers: dict[str, list[Answer]] = {name: [] for name in UNSENT_BODIES}

    async def unsent_body(name: str, request: bytes) -> None:
        stream = await trio.open_tcp_stream(*host_port(arena))
        async with stream:
            await stream.send_all(request)
            answer = Answer()
            answers[name].append(answer)
            await read_answer(stream, answer, BODY_WAIT)

    async with arena.attack():
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(20):
                name, request = list(UNSENT_BODIES.items())[i % len(UNSENT_BODIES)]
                nursery.start_soon(unsent_body, name, request)
        every = [a for group in answers.values() for a in group]
        held = [a for a in every if a.closed is None]
        assert held == [], f"{len(held)} of 20 still open after {BODY_WAIT:g} s"
        assert all(a.responded is not None for a in every)
        # Each is answered (the upload only after its 5 s drain of the missing
        # body), then closed at once, the body still owed.
        assert max(a.close_delay for a in every) < CLOSE_AFTER_RESPONSE
        statuses = {name: sorted({a.status for a in group}) for name, group in answers.items()}
        assert statuses == {
            "upload, no token": [401],
            "GET with a body": [200],
            "POST to a page": [405],
            "chunked body": [200],
        }
        upload = answers["upload, no token"]
        others = [a for name, group in answers.items() if name != "upload, no token" for a in group]
        arena.note(
            f"20 requests whose body never comes ({', '.join(UNSENT_BODIES)}): answered "
            f"({statuses}), then closed by the server {spread([a.close_delay for a in every])} "
            f"after the response: {spread([a.closed - start for a in others])} after the "
            f"request (GET, POST, chunked), {spread([a.closed - start for a in upload])} for the "
            f"upload without a token (its {uploads.DRAIN_SECONDS:g} s drain first)"
        )


async def test_idle_keep_alive_after_a_response(arena: Arena) -> None:
    """Connections that make one request, keep the connection and then say nothing."""
    answers: list[Answer] = []

    async def idle_after_one_request() -> None:
        stream = await trio.open_tcp_stream(*host_port(arena))
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = Answer()
            answers.append(answer)
            await read_answer(stream, answer, KEEP_ALIVE_TIMEOUT + 3)

    async with arena.attack():
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(idle_after_one_request)
        assert [a.status for a in answers] == [200] * 20
        held = [a for a in answers if a.closed is None]
        assert held == [], f"{len(held)} of 20 still open after {KEEP_ALIVE_TIMEOUT + 3:g} s"
        delays = [a.close_delay for a in answers]
        # Hypercorn's keep-alive timer restarts once the response is out.
        assert min(delays) > KEEP_ALIVE_TIMEOUT - 0.5
        assert max(delays) < KEEP_ALIVE_TIMEOUT + 1.5
        arena.note(
            f"20 keep-alive connections idle after one 200: closed by the server "
            f"{min(delays):.1f}-{max(delays):.1f} s after the response"
        )


async def test_slowloris_upload_with_a_token(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    idle = 1.0  # scaled down from 30 s; the trickle beats it the same way
    monkeypatch.setattr(uploads, "UPLOAD_IDLE_TIMEOUT", idle)
    token = arena.host.welcome["you"]["token"]
    body = multipart("slow.wav", audio.wav(5.0))
    answers: list[Answer] = []
    still_sending: list[bool] = []

    async def trickle() -> None:
        stream = await trio.open_tcp_stream(*host_port(arena))
        answer = Answer()
        answers.append(answer)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(read_answer, stream, answer, 8.0)
            head = (
                "POST /api/upload?room=main HTTP/1.1\r\nHost: localhost\r\n"
                f"{TOKEN_HEADER}: {token}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(head.encode() + body[:200])
            for i in range(200, 200 + 4 * 4):  # 4 bytes/s for 4 s: 4 idle timeouts
                await trio.sleep(0.25)
                try:
                    await stream.send_all(body[i : i + 1])
                except trio.BrokenResourceError:
                    return
            still_sending.append(True)

    async with arena.attack():
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(trickle)
        staged = list((arena.server.settings.media_dir / ".uploads").glob("*.part"))
        assert staged == []
        assert [a.status for a in answers] == [408] * 5
        assert all(a.closed is not None for a in answers), "a trickled upload is still open"
        assert max(a.close_delay for a in answers) < CLOSE_AFTER_RESPONSE
        assert still_sending == []  # the server closed; the trickle's writes failed
        refused = [a.responded - start for a in answers if a.responded is not None]
        arena.note(
            f"5 uploads trickled at 4 bytes/s (idle timeout {idle:g} s): 408 after "
            f"{min(refused):.1f}-{max(refused):.1f} s, part files removed, sockets closed "
            f"{spread([a.close_delay for a in answers])} after the 408"
        )


async def test_websocket_client_that_never_reads(tmp_path: Path) -> None:
    send_timeout = 1.0
    async with open_arena(tmp_path, send_timeout=send_timeout) as arena:
        arena.pad = True  # tracks with long URLs: ~2.5 KB per state, the buffers fill fast
        host, port = host_port(arena)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with arena.attack():
            await sock.connect((host, port))
            stream = trio.SocketStream(sock)
            async with stream:
                request = (
                    f"GET /ws/main?name=stall HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await stream.send_all(request.encode())
                response = b""
                with trio.fail_after(5):
                    while b"\r\n\r\n" not in response:
                        response += await stream.receive_some(1)  # leave the frames unread
                assert b" 101 " in response.split(b"\r\n", 1)[0]
                start = trio.current_time()
                await arena.wait_for_connections(3)
                await arena.wait_for_connections(2, limit=20)
                took = trio.current_time() - start
            stats = arena.server.hub.stats
            arena.note(
                f"never reads: dropped after {took:.1f} s (send_timeout {send_timeout:g} s "
                f"as TCP_USER_TIMEOUT; server-side close {dict(stats.closes) or 'none'})"
            )


CAP = 16  # max_connections_per_ip, down from 64 to keep the test short


async def test_connection_exhaustion_from_one_address(tmp_path: Path) -> None:
    codes: list[int | None] = []
    cap = CAP
    async with (
        open_arena(tmp_path, max_connections_per_ip=CAP) as arena,
        arena.attack(peak_budget=16 * MiB, retained_budget=2 * MiB),
    ):
        async with AsyncExitStack() as stack:
            for i in range(cap + 8):  # one after another, each seated before the next
                raw = await stack.enter_async_context(
                    RawWS.open(arena.server, f"/ws/main?name=x{i}")
                )
                codes.append(await raw.first())
        assert codes.count(None) == cap - 2  # the honest two hold their own slots
        assert codes[cap - 2 :] == [4429] * 10
        arena.note(f"{cap + 8} sockets one by one: {cap - 2} admitted, then close 4429 x10")


async def test_connection_cap_holds_under_a_concurrent_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_arena(tmp_path, max_connections_per_ip=CAP) as arena:
        await burst(arena, monkeypatch)


async def burst(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = arena.server.hub
    cap = CAP
    most = [0]
    new_client = hub.new_client

    def counting(ip: str) -> Any:  # observe only: the count right after each admission
        client = new_client(ip)
        most[0] = max(most[0], hub.per_ip[ip])
        return client

    monkeypatch.setattr(hub, "new_client", counting)
    async with arena.attack(peak_budget=16 * MiB, retained_budget=2 * MiB):
        release = trio.Event()

        async def hold(i: int) -> None:
            async with RawWS.open(arena.server, f"/ws/main?name=burst{i}") as raw:
                if await raw.first() is None:
                    await release.wait()

        async with trio.open_nursery() as nursery:
            for i in range(cap + 24):
                nursery.start_soon(hold, i)
            await trio.sleep(1.5)
            release.set()
        arena.note(f"{cap + 24} sockets at once: up to {most[0]} connections seated (cap {cap})")
        assert most[0] <= cap
