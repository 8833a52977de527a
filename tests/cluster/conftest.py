"""A real redis-server on a free port, and real ``musicsync serve --redis`` node processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
from trio_websocket import WebSocketConnection

from tests.conftest import Peer, open_ws

REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_START_TIMEOUT = 10.0
NODE_START_TIMEOUT = 30.0
# The nodes' resume grace in these tests (seconds): a dead node's seats free up soon.
TEST_RESUME_GRACE = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """redis-server with AOF on (fsync always), in a directory of its own."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--dir", str(self.dir), "--save", "", "--daemonize", "no"]
        cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not redis_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; AOF has every write (fsync always)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (just setup installs it)")
    where = tmp_path / "redis"
    where.mkdir()
    server = RedisServer(free_port(), where)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Node:
    """One ``musicsync serve --redis`` process."""

    name: str
    proc: trio.Process
    http: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def ws(self) -> str:
        return self.http.replace("http://", "ws://", 1)

    def ws_url(self, room: str = "main", name: str = "tester", **query: str) -> str:
        return f"{self.ws}/ws/{room}?{urlencode({'name': name, **query})}"

    def log(self) -> str:
        return "".join(self.output)

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients or to Redis."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICSYNC_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    return env


@dataclass
class Cluster:
    redis: RedisServer
    tmp_path: Path
    nursery: trio.Nursery
    nodes: list[Node] = field(default_factory=list)

    async def start_node(self, *extra: str) -> Node:
        name = f"node{len(self.nodes)}"
        media = self.tmp_path / "media"  # shared: a track URL plays from any node
        media.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "musicsync", "serve", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--no-demo", "--no-qr", "--media", str(media)]
        cmd += ["--data", str(self.tmp_path / name), "--redis", self.redis.url]
        cmd += ["--resume-grace", str(TEST_RESUME_GRACE), "--max-connections-per-ip", "1000"]
        cmd += list(extra)
        proc = await trio.lowlevel.open_process(
            cmd,
            cwd=REPO,
            env=clean_env(self.tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        node = Node(name, proc)
        self.nodes.append(node)
        listening = trio.Event()
        self.nursery.start_soon(self._pump, node, listening)
        with trio.fail_after(NODE_START_TIMEOUT):
            await listening.wait()
        if not node.http:
            raise RuntimeError(f"{name} did not start:\n{node.log()}")
        return node

    async def _pump(self, node: Node, listening: trio.Event) -> None:
        assert node.proc.stdout is not None
        buffer = b""
        marker = "musicsync listening on "
        try:
            while chunk := await node.proc.stdout.receive_some():
                buffer += chunk
                *lines, rest = buffer.split(b"\n")
                buffer = rest
                for raw in lines:
                    line = raw.decode(errors="replace") + "\n"
                    node.output.append(line)
                    if marker in line and not node.http:
                        node.http = line.split(marker, 1)[1].split()[0].rstrip("/")
                        listening.set()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            listening.set()

    async def stop(self) -> None:
        for node in self.nodes:
            if node.proc.returncode is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            with trio.move_on_after(10) as scope:
                await node.proc.wait()
            if scope.cancelled_caught:
                node.kill()
                await node.proc.wait()


@pytest.fixture
async def cluster(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        c = Cluster(redis_server, tmp_path, nursery)
        try:
            yield c
        finally:
            await c.stop()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(
    node: Node, room: str = "main", name: str = "tester", **query: str
) -> AsyncIterator[Peer]:
    async with open_ws(node.ws_url(room, name, **query)) as conn:
        peer = Peer(conn)
        peer.welcome = await peer.expect("welcome")
        yield peer


@asynccontextmanager
async def admitted(
    gate: trio.Semaphore, node: Node, name: str
) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    """``name`` connected to ``node`` (room main) with at most the gate's count of
    connections unanswered: the slot is given back once the node's first frame
    (a welcome or a refusal) is in; the connection stays open."""
    await gate.acquire()
    held = True
    try:
        async with open_ws(node.ws_url("main", name)) as conn:
            first = json.loads(await conn.get_message())
            gate.release()
            held = False
            yield conn, first
    finally:
        if held:
            gate.release()


class Bell:
    """Something changed: wakes whoever waits for a condition on shared test state."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def ring(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._event = trio.Event()
            await self._event.wait()


def state_of(msg: dict[str, Any]) -> dict[str, Any]:
    room: dict[str, Any] = msg["room"]
    return room
