"""Server fan-out benchmark: join cost, fan-out latency, memory per connection, stalls.

Starts the real server as a subprocess on 127.0.0.1 (a fresh one per scenario)
and drives it from WebSocket clients that all live in this process, so every
delay is measured on one monotonic clock (``time.perf_counter``).

1. Join cost: seat N listeners in one room (trio-websocket clients opened
   concurrently in batches; seated = got its ``welcome``). Reports seconds,
   joins/s, the ``welcome`` and ``presence`` traffic of the fill, and what
   re-sending the full participant list on every join would have cost.
2. Fan-out latency: with N listeners seated, the host sends ``seek`` commands
   (within the 10/s control limit); for every listener, the delay from the
   host's send to the first ``state`` carrying that version (or a newer one).
3. Memory per idle connection: server VmRSS before the clients connect and
   after N are seated, divided by N.
4. Stalled listeners: 100 listeners of which 5 never read (raw sockets with a
   tiny SO_RCVBUF, WebSocket handshake by hand with wsproto, then silence).
   Their pipes are filled first with large ``state`` frames; the p95 fan-out
   delay of the others is compared with a round without stalled listeners.

Prints a table, then one JSON line with all figures.

    python benchmarks/bench_fanout.py [--quick] [--source DIR] [--batch 100]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, Request

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
LISTEN_PREFIX = "musicsync listening on http://127.0.0.1:"
clock = time.perf_counter  # the one clock every delay is measured on

PING_EVERY_S = 15.0  # the server drops clients silent for 30 s
SEEK_RATE = 5.0  # per second; the control bucket allows 10/s with a burst of 20
PRIME_RATE = 20.0  # the bucket refills 10/s: 20 frames in 1 s stay within it
PRIME_FRAMES = 20  # big states to fill a stalled listener's pipe (~2.3 KB each)
STALL_LISTENERS = 100
STALLED = 5
STALL_RCVBUF = 1024
MAX_MESSAGE = 64 * 1024 * 1024
RECEIVE_BUFFER = 64 * 1024
PHASE_TIMEOUT_S = 60.0  # one batch of connections
SETTLE_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 15.0  # after the last seek
SERVER_START_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
# How long to watch for the server dropping the stalled clients: their writers
# block during the priming, so this is more than the server's 10 s send timeout.
DROP_WATCH_S = 12.0
STALL_PAIR_S = 20.0  # a clean and a stalled round, roughly


# -- measurement helpers ---------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rnd(x: float | None, digits: int = 2) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(x, digits)


def raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def bench_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Tally:
    """Frames received by all clients of one scenario, by type."""

    frames: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, size: int) -> None:
        self.frames[kind] = self.frames.get(kind, 0) + 1
        self.chars[kind] = self.chars.get(kind, 0) + size

    def reset(self) -> None:
        self.frames.clear()
        self.chars.clear()


# -- the server subprocess -------------------------------------------------------


class ServerProcess:
    def __init__(self, source: Path, workdir: Path, tag: str) -> None:
        self.source = source
        self.media = workdir / f"media-{tag}"
        self.media.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"server-{tag}.log"
        self.proc: trio.Process | None = None
        self.port = 0
        self._log: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.source) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            sys.executable,
            "-m",
            "musicsync",
            "serve",
            "--host",
            HOST,
            "--port",
            "0",
            "--media",
            str(self.media),
            "--data",
            str(self.media.parent / "data"),
            "--no-demo",
            "--max-connections-per-ip",
            "100000",
        ]
        self._log = self.log_path.open("wb")  # closed in stop()
        # The server inherits this process's raised RLIMIT_NOFILE.
        self.proc = await trio.lowlevel.open_process(
            cmd, cwd=str(self.source), env=env, stdout=subprocess.PIPE, stderr=self._log
        )
        assert self.proc.stdout is not None
        buf = b""
        with trio.fail_after(SERVER_START_TIMEOUT_S):
            while True:
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"server exited before listening; see {self.log_path}")
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(LISTEN_PREFIX):
                        self.port = int(line[len(LISTEN_PREFIX) :].strip().rstrip("/"))
                        return

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def hwm_kib(self) -> int:
        return self._status_kib("VmHWM")

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> float:
        """SIGTERM and wait; returns how long the exit took (killed after a timeout)."""
        if self.proc is None:
            return 0.0
        t0 = clock()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if self.proc.stdout is not None:
            await self.proc.stdout.aclose()
        self._log.close()
        return clock() - t0

    def log_lines(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0


async def healthz(port: int) -> dict[str, Any]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
                _head, sep, body = data.partition(b"\r\n\r\n")
                if sep and body.rstrip().endswith(b"}"):
                    break
    return json.loads(data.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def tcp_queues(server_port: int, client_ports: set[int]) -> tuple[int, int]:
    """Bytes queued on the server's send side and in the clients' receive queues."""
    send_q = recv_q = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, queues = parts[1], parts[2], parts[4]
        lport, rport = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        tx, rx = (int(x, 16) for x in queues.split(":"))
        if lport == server_port and rport in client_ports:
            send_q += tx
        elif lport in client_ports and rport == server_port:
            recv_q += rx
    return send_q, recv_q


# -- clients ---------------------------------------------------------------------


class Client:
    """One trio-websocket client whose reader only parses and timestamps."""

    __slots__ = (
        "close_code",
        "conn",
        "count",
        "last_sent",
        "role",
        "states",
        "version",
        "welcome_entry",
    )

    def __init__(self) -> None:
        self.conn: WebSocketConnection | None = None
        self.states: list[tuple[int, float]] = []  # (version, receive time)
        self.version = -1
        self.count = 0
        self.role = ""
        self.last_sent = clock()
        self.welcome_entry = 0
        self.close_code: int | None = None

    async def send(self, kind: str, **fields: Any) -> None:
        assert self.conn is not None
        self.last_sent = clock()
        await self.conn.send_message(json.dumps({"type": kind, **fields}))

    async def run(
        self, nursery: trio.Nursery, url: str, tally: Tally, seated: Callable[[], None]
    ) -> None:
        conn = await connect_websocket_url(
            nursery, url, max_message_size=MAX_MESSAGE, receive_buffer_size=RECEIVE_BUFFER
        )
        self.conn = conn
        self.last_sent = clock()
        states = self.states
        try:
            while True:
                raw = await conn.get_message()
                t = clock()
                msg = json.loads(raw)
                kind = msg["type"]
                if kind == "state":
                    v = msg["room"]["version"]
                    states.append((v, t))
                    self.version = max(self.version, v)
                elif kind == "presence":
                    self.count = msg["count"]
                elif kind == "welcome":
                    parts = msg["participants"]
                    self.count = len(parts)
                    self.version = msg["room"]["version"]
                    self.role = msg["you"]["role"]
                    self.welcome_entry = len(json.dumps(parts[-1], separators=(",", ":")))
                    seated()
                tally.add(kind, len(raw))  # the server sends ASCII JSON: chars == bytes
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else -1

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.aclose()


@dataclass
class Stalled:
    stream: trio.SocketStream
    port: int


async def open_stalled(port: int, path: str) -> Stalled:
    """Handshake by hand on a socket with a tiny receive buffer, then never read again."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
    await sock.connect((HOST, port))
    stream = trio.SocketStream(sock)
    ws = wsproto.WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"{HOST}:{port}", target=path)))
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(256)  # small reads: leave the welcome queued
            if not data:
                raise RuntimeError("stalled client: connection closed during handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return Stalled(stream, sock.getsockname()[1])
                if isinstance(event, RejectConnection):
                    raise RuntimeError(f"stalled client refused: {event.status_code}")


def unread_bytes(stalled: list[Stalled]) -> int:
    total = 0
    for s in stalled:
        buf = bytearray(4)
        with contextlib.suppress(OSError):
            fcntl.ioctl(s.stream.socket.fileno(), termios.FIONREAD, buf)
            total += int.from_bytes(buf, sys.byteorder)
    return total


class Room:
    """A server subprocess, a host and its listeners, in one room."""

    def __init__(self, nursery: trio.Nursery, server: ServerProcess, name: str) -> None:
        self.nursery = nursery
        self.server = server
        self.name = name
        self.tally = Tally()
        self.host = Client()
        self.listeners: list[Client] = []
        self.stalled: list[Stalled] = []
        self.base_version = 0  # the room's version in the host's welcome
        self.changes = 0  # state changes the host has asked for since
        self.stuck = False  # a batch was not seated in time
        self._seated = 0
        self._want = 0
        self._batch_done = trio.Event()

    def url(self, name: str) -> str:
        return f"ws://{HOST}:{self.server.port}{self.path(name)}"

    def path(self, name: str) -> str:
        return f"/ws/{self.name}?{urlencode({'name': name})}"

    @property
    def open_listeners(self) -> list[Client]:
        return [c for c in self.listeners if c.close_code is None]

    @property
    def seated(self) -> int:
        """Listeners that have their welcome (the host is not counted)."""
        return self._seated - 1

    def _on_seated(self) -> None:
        self._seated += 1
        if self._seated >= self._want:
            self._batch_done.set()

    async def _seat(self, clients: list[Client], first_name: int) -> bool:
        """Open ``clients`` at once; False if not all were seated within PHASE_TIMEOUT_S."""
        self._want = self._seated + len(clients)
        self._batch_done = trio.Event()
        for i, c in enumerate(clients):
            self.nursery.start_soon(
                c.run, self.nursery, self.url(f"l{first_name + i}"), self.tally, self._on_seated
            )
        with trio.move_on_after(PHASE_TIMEOUT_S):
            await self._batch_done.wait()
        return self._batch_done.is_set()

    async def open_host(self) -> None:
        if not await self._seat([self.host], 0):
            raise RuntimeError("the host was not seated")
        self.base_version = self.host.version
        if self.host.role != "host":
            await self.host.send("claim_host")

    async def fill(self, n: int, batch: int, deadline: float = math.inf) -> None:
        """Seat listeners up to ``n`` in batches of ``batch`` connections in flight.

        Starts no new batch after ``deadline`` (a ``clock()`` value).
        """
        while len(self.listeners) < n and clock() < deadline:
            group = [Client() for _ in range(min(batch, n - len(self.listeners)))]
            start = len(self.listeners) + 1
            self.listeners.extend(group)
            if not await self._seat(group, start):
                self.stuck = True
                return

    async def add_stalled(self, n: int) -> None:
        for i in range(n):
            self.stalled.append(await open_stalled(self.server.port, self.path(f"stalled{i}")))

    @property
    def expected_version(self) -> int:
        """Every ``set_track`` and ``seek`` the host sends is one new version."""
        return self.base_version + self.changes

    async def change(self, kind: str, **fields: Any) -> None:
        self.changes += 1
        await self.host.send(kind, **fields)

    async def settle(self, limit: float = SETTLE_TIMEOUT_S) -> float:
        """Wait until every open client has seen the full count and the newest version."""
        t0 = clock()
        with trio.fail_after(limit):
            while True:
                clients = [self.host, *self.open_listeners]
                want = len(clients) + len(self.stalled)
                v = self.expected_version
                if all(c.count == want and c.version >= v for c in clients):
                    return clock() - t0
                await trio.sleep(0.02)

    async def keepalive(self) -> None:
        """Ping every client that has been silent for PING_EVERY_S."""
        while True:
            await trio.sleep(1.0)
            now = clock()
            for c in [self.host, *self.listeners]:
                if c.conn is not None and c.close_code is None and now - c.last_sent > PING_EVERY_S:
                    with contextlib.suppress(Exception):
                        await c.send("ping", t0=time.time() * 1000)

    async def close(self) -> None:
        for s in self.stalled:
            with contextlib.suppress(Exception):
                await s.stream.aclose()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            async with trio.open_nursery() as n:
                for c in [*self.listeners, self.host]:
                    n.start_soon(c.close)


# -- fan-out ---------------------------------------------------------------------


async def prime(room: Room, frames: int) -> None:
    """Big ``state`` frames (long URL and title) to fill slow readers' pipes."""
    url = "/media/" + "p" * 2000 + ".mp3"
    for i in range(frames):
        await room.change("set_track", url=url, title=f"{i:03d}" + "t" * 190)
        await trio.sleep(1.0 / PRIME_RATE)


async def fanout(room: Room, seeks: int, rate: float = SEEK_RATE) -> dict[str, Any]:
    """Seeks from the host; per listener, the delay to the first state >= that version."""
    await room.settle()
    listeners = room.open_listeners
    for c in listeners:
        c.states.clear()
    v0 = room.expected_version
    sends: list[tuple[int, float]] = []
    server = room.server
    gc.collect()
    gc.disable()  # no collector pauses in this process while timing
    try:
        cpu_srv0, cpu_me0 = server.cpu_s(), bench_cpu_s()
        start = clock()
        for i in range(seeks):
            await trio.sleep(max(0.0, start + i / rate - clock()))
            sends.append((v0 + i + 1, clock()))
            await room.change("seek", position=float(i + 1))
        last = sends[-1][0]
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            while True:
                if all(c.version >= last or c.close_code is not None for c in listeners):
                    break
                await trio.sleep(0.02)
        cpu_srv, cpu_me = server.cpu_s() - cpu_srv0, bench_cpu_s() - cpu_me0
    finally:
        gc.enable()
    delays: list[float] = []
    per_seek_max = [0.0] * len(sends)
    superseded = missing = 0
    for c in listeners:
        states = c.states
        j = 0
        for k, (v, sent) in enumerate(sends):
            while j < len(states) and states[j][0] < v:
                j += 1
            if j == len(states):
                missing += 1
                continue
            d = (states[j][1] - sent) * 1000.0
            delays.append(d)
            per_seek_max[k] = max(per_seek_max[k], d)
            if states[j][0] != v:
                superseded += 1
    return {
        "n": len(listeners),
        "seeks": seeks,
        "samples": len(delays),
        "superseded": superseded,
        "missing": missing,
        "p50_ms": rnd(percentile(delays, 50)),
        "p95_ms": rnd(percentile(delays, 95)),
        "p99_ms": rnd(percentile(delays, 99)),
        "max_ms": rnd(max(delays, default=math.nan)),
        "last_listener_median_ms": rnd(statistics.median(per_seek_max)),
        "server_cpu_ms_per_seek": rnd(cpu_srv * 1000 / seeks, 1),
        "bench_cpu_ms_per_seek": rnd(cpu_me * 1000 / seeks, 1),
    }


# -- scenarios -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def scenario(cfg: Config, tag: str) -> AsyncIterator[Room]:
    """A fresh server with room ``bench``; clients closed, then the server stopped."""
    server = ServerProcess(cfg.source, cfg.workdir, tag)
    await server.start()
    try:
        async with trio.open_nursery() as nursery:
            room = Room(nursery, server, "bench")
            nursery.start_soon(room.keepalive)
            try:
                yield room
            finally:
                with trio.CancelScope(shield=True):
                    await room.close()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            cfg.stop_seconds.append(await server.stop())


async def warm_up(server: ServerProcess) -> None:
    """One connection in another room and a health check, so lazy set-up is paid."""
    done = trio.Event()
    async with trio.open_nursery() as n:
        c = Client()
        url = f"ws://{HOST}:{server.port}/ws/warmup?name=w"
        n.start_soon(c.run, n, url, Tally(), done.set)
        with trio.fail_after(10):
            await done.wait()
        await c.close()
    await healthz(server.port)
    await trio.sleep(0.3)


def hypothetical_presence(n: int, entry: int) -> dict[str, int]:
    """What the fill's presence traffic would cost without coalescing.

    The host is seated first; the k-th listener's join makes m = k + 1
    participants, every one of whom would get a frame: either a one-entry delta
    or (the naive design) the whole participant list of m entries.
    """
    overhead = len('{"joined":[],"left":[],"changed":[],"count":0000,"type":"presence"}')
    frames = sum(k + 1 for k in range(1, n + 1))
    delta_bytes = frames * (overhead + entry)
    full_bytes = sum((k + 1) * (overhead + (k + 1) * (entry + 1) - 1) for k in range(1, n + 1))
    return {"frames": frames, "delta_bytes": delta_bytes, "full_list_bytes": full_bytes}


async def run_growth(cfg: Config, results: dict[str, Any]) -> None:
    """One room filled continuously; at each checkpoint N: join cost, memory, fan-out.

    The fill pauses at a checkpoint (presence settles, RSS is read, seeks run);
    paused time is not counted as join time.
    """
    checkpoints = sorted(set(cfg.join_sizes) | set(cfg.fanout_sizes) | set(cfg.memory_sizes))
    async with scenario(cfg, "growth") as room:
        server = room.server
        await warm_up(server)
        rss0 = server.rss_kib()
        await room.open_host()
        await room.settle()
        room.tally.reset()
        active = cpu_srv = cpu_me = 0.0
        measured_at = -1
        for target in checkpoints:
            print(f"# fill to {target} ...", file=sys.stderr, flush=True)
            t0, s0, b0 = clock(), server.cpu_s(), bench_cpu_s()
            await room.fill(target, cfg.batch, t0 + cfg.fill_budget - active)
            active += clock() - t0
            n = min(len(room.listeners), room.seated)
            fresh = n > measured_at  # not yet measured at this size
            measured_at = n
            settle_s: float | None = None
            with contextlib.suppress(trio.TooSlowError):
                settle_s = await room.settle()
            cpu_srv += server.cpu_s() - s0
            cpu_me += bench_cpu_s() - b0
            complete = n >= target and settle_s is not None and not room.stuck
            if settle_s is None or room.stuck:
                fresh = False  # not a steady room: report the join figures only
            health = await healthz(server.port)
            frames = dict(room.tally.frames)
            chars = dict(room.tally.chars)
            p_frames, p_bytes = frames.get("presence", 0), chars.get("presence", 0)
            delivered = frames.get("presence", 0) + frames.get("welcome", 0)
            entry = int(statistics.median(c.welcome_entry or 60 for c in room.listeners))
            hyp = hypothetical_presence(n, entry)
            if target in cfg.join_sizes or not complete:
                results["join"].append(
                    {
                        "n": n,
                        "target": target,
                        "complete": complete,
                        "seconds": rnd(active, 3),
                        "joins_per_s": rnd(n / active, 1),
                        "presence_settle_s": rnd(settle_s, 3) if settle_s is not None else None,
                        "welcome_bytes": chars.get("welcome", 0),
                        "presence_frames": p_frames,
                        "presence_bytes": p_bytes,
                        "uncoalesced_delta_frames": hyp["frames"],
                        "uncoalesced_delta_bytes": hyp["delta_bytes"],
                        "full_list_resend_frames": hyp["frames"],
                        "full_list_resend_bytes": hyp["full_list_bytes"],
                        "full_list_bytes_ratio": rnd(hyp["full_list_bytes"] / max(1, p_bytes), 1),
                        "full_list_frames_ratio": rnd(hyp["frames"] / max(1, p_frames), 1),
                        "server_cpu_s": rnd(cpu_srv, 2),
                        "bench_cpu_s": rnd(cpu_me, 2),
                        "server_cpu_us_per_frame": rnd(cpu_srv * 1e6 / max(1, delivered), 1),
                        "stuck_batch": room.stuck,
                        "settled": settle_s is not None,
                        "dropped_clients": len(room.listeners) - len(room.open_listeners),
                        "close_codes": dict(
                            Counter(c.close_code for c in room.listeners if c.close_code)
                        ),
                        "server_connections": health.get("connections"),
                    }
                )
            due_memory = target in cfg.memory_sizes or cfg.memory_sizes[-1] > n
            due_fanout = target in cfg.fanout_sizes or cfg.fanout_sizes[-1] > n
            if fresh and (target in cfg.memory_sizes or (not complete and due_memory)):
                await trio.sleep(0.5)
                rss1 = server.rss_kib()
                results["memory"].append(
                    {
                        "n": n,
                        "complete": complete,
                        "rss_before_kib": rss0,
                        "rss_after_kib": rss1,
                        "hwm_kib": server.hwm_kib(),
                        "kib_per_conn": rnd((rss1 - rss0) / n, 2),
                    }
                )
            if fresh and (target in cfg.fanout_sizes or (not complete and due_fanout)):
                print(f"# fan-out at {n} ...", file=sys.stderr, flush=True)
                fan = await fanout(room, cfg.seeks)
                fan["complete"] = complete
                results["fanout"].append(fan)
            if not complete:
                why = (
                    f"a batch was not seated within {PHASE_TIMEOUT_S:.0f} s"
                    if room.stuck
                    else "presence did not settle"
                    if settle_s is None
                    else f"fill budget {cfg.fill_budget:.0f} s spent"
                )
                results["errors"].append(
                    {"phase": "fill", "error": f"stopped at {n} of {target}: {why}"}
                )
                break
    results["server_log_slow_client_lines"] = server.log_lines("dropping slow client")


async def run_stall_round(cfg: Config, stalled: int, seeks: int, watch: bool) -> dict[str, Any]:
    tag = f"stall{stalled}-{len(cfg.stop_seconds)}"
    async with scenario(cfg, tag) as room:
        server = room.server
        await room.open_host()
        await room.fill(STALL_LISTENERS - stalled, cfg.batch)
        await room.add_stalled(stalled)
        await room.settle()
        await prime(room, PRIME_FRAMES)
        ports = {s.port for s in room.stalled}
        send_q, recv_q = tcp_queues(server.port, ports) if ports else (0, 0)
        unread = unread_bytes(room.stalled)
        stall_start = clock()
        fan = await fanout(room, seeks)
        health = await healthz(server.port)
        out: dict[str, Any] = {
            "stalled": stalled,
            "fanout": fan,
            "stalled_server_send_queue_bytes": send_q,
            "stalled_client_recv_queue_bytes": max(recv_q, unread),
            "connections_after": health.get("connections"),
        }
        if watch and stalled:
            # Does the server drop the stalled clients (4008 after its send timeout)?
            want = 1 + len(room.listeners)
            dropped_at = None
            while clock() < stall_start + cfg.drop_watch:
                if (await healthz(server.port)).get("connections") == want:
                    dropped_at = clock() - stall_start
                    break
                await trio.sleep(0.25)
            out["dropped_after_s"] = rnd(dropped_at, 2)
            out["watched_s"] = rnd(clock() - stall_start, 1)
            out["send_queue_at_end_bytes"] = tcp_queues(server.port, ports)[0]
        out["slow_client_log_lines"] = server.log_lines("dropping slow client")
    out["stop_s"] = rnd(cfg.stop_seconds[-1], 2)
    return out


# -- main ------------------------------------------------------------------------


@dataclass
class Config:
    quick: bool
    source: Path
    workdir: Path
    batch: int
    join_sizes: list[int]
    fanout_sizes: list[int]
    memory_sizes: list[int]
    seeks: int
    fill_budget: float
    stall_rounds: int
    stall_seeks: int
    drop_watch: float
    total_budget: float
    started: float = field(default_factory=clock)
    stop_seconds: list[float] = field(default_factory=list)


def make_config(args: argparse.Namespace, workdir: Path) -> Config:
    if args.quick:
        cfg = Config(
            quick=True,
            source=args.source.resolve(),
            workdir=workdir,
            batch=args.batch,
            join_sizes=[300],
            fanout_sizes=[100, 300],
            memory_sizes=[300],
            seeks=10,
            fill_budget=10.0,
            stall_rounds=1,
            stall_seeks=8,
            drop_watch=0.0,
            total_budget=28.0,
        )
    else:
        cfg = Config(
            quick=False,
            source=args.source.resolve(),
            workdir=workdir,
            batch=args.batch,
            join_sizes=[500, 2000, 5000],
            fanout_sizes=[100, 1000, 5000],
            memory_sizes=[1000, 5000],
            seeks=30,
            fill_budget=55.0,
            stall_rounds=2,
            stall_seeks=20,
            drop_watch=DROP_WATCH_S,
            total_budget=170.0,
        )
    if args.fill_budget:
        cfg.fill_budget = args.fill_budget
    if args.seeks:
        cfg.seeks = args.seeks
    if args.stall_rounds:
        cfg.stall_rounds = args.stall_rounds
    return cfg


async def run(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {"join": [], "fanout": [], "memory": [], "stall": {}, "errors": []}
    try:
        await run_growth(cfg, results)
    except Exception as exc:  # keep going: report what failed
        results["errors"].append({"phase": "growth", "error": repr(exc)})
    rounds: dict[int, list[dict[str, Any]]] = {0: [], STALLED: []}
    for i in range(cfg.stall_rounds):
        left = cfg.total_budget - (clock() - cfg.started)
        if i > 0 and left < STALL_PAIR_S + (cfg.drop_watch if i == cfg.stall_rounds - 1 else 0):
            results["errors"].append({"phase": "stall", "error": f"time budget: {i} round(s)"})
            break
        for stalled in (0, STALLED):
            print(f"# stall round {i} stalled={stalled} ...", file=sys.stderr, flush=True)
            watch = i == cfg.stall_rounds - 1 and cfg.drop_watch > 0
            try:
                rounds[stalled].append(await run_stall_round(cfg, stalled, cfg.stall_seeks, watch))
            except Exception as exc:
                results["errors"].append({"phase": f"stall{stalled}-{i}", "error": repr(exc)})
    clean = [r["fanout"]["p95_ms"] for r in rounds[0]]
    stalled_p95 = [r["fanout"]["p95_ms"] for r in rounds[STALLED]]
    if clean and stalled_p95:
        c, s = statistics.median(clean), statistics.median(stalled_p95)
        results["stall"] = {
            "listeners": STALL_LISTENERS,
            "stalled": STALLED,
            "rounds": cfg.stall_rounds,
            "seeks_per_round": cfg.stall_seeks,
            "p95_clean_ms": rnd(c),
            "p95_stalled_ms": rnd(s),
            "ratio": rnd(s / c, 2) if c else None,
            "p95_clean_rounds_ms": clean,
            "p95_stalled_rounds_ms": stalled_p95,
            "stalled_rounds": [
                {k: v for k, v in r.items() if k != "fanout"} | {"fanout_n": r["fanout"]["n"]}
                for r in rounds[STALLED]
            ],
        }
    return results


def print_tables(res: dict[str, Any]) -> None:
    print("\nJoin cost (one room filled from empty; seated = welcome; pauses at checkpoints)")
    print(
        f"{'N':>6} {'seconds':>8} {'joins/s':>8} {'welcome MB':>10} {'presence':>9} "
        f"{'pres. MB':>9} {'full-list':>10} {'full-list MB':>12} {'bytes x':>8} "
        f"{'srv cpu s':>9} {'bench cpu s':>11} {'srv us/frame':>12}"
    )
    for j in res["join"]:
        mark = "" if j["complete"] else f"  (target {j['target']}: budget spent)"
        print(
            f"{j['n']:>6} {j['seconds']:>8.2f} {j['joins_per_s']:>8.1f} "
            f"{j['welcome_bytes'] / 1e6:>10.1f} {j['presence_frames']:>9} "
            f"{j['presence_bytes'] / 1e6:>9.1f} {j['full_list_resend_frames']:>10} "
            f"{j['full_list_resend_bytes'] / 1e6:>12.0f} {j['full_list_bytes_ratio']:>8.0f} "
            f"{j['server_cpu_s']:>9.2f} {j['bench_cpu_s']:>11.2f} "
            f"{j['server_cpu_us_per_frame']:>12.1f}{mark}"
        )
    print(
        "  presence = presence frames received by all clients (coalesced deltas);"
        "\n  full-list = frames/bytes if every join re-sent the whole participant list"
        " to everyone;\n  bytes x = full-list bytes / measured presence bytes;"
        " srv us/frame = server CPU per welcome+presence frame delivered"
    )
    print("\nFan-out latency (host seek -> each listener's state, ms; pooled over seeks)")
    print(
        f"{'N':>6} {'seeks':>6} {'samples':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} "
        f"{'last/seek':>10} {'superseded':>10} {'missing':>8} {'srv ms/seek':>11} "
        f"{'bench ms/seek':>13}"
    )
    for f in res["fanout"]:
        print(
            f"{f['n']:>6} {f['seeks']:>6} {f['samples']:>8} {f['p50_ms']:>8.1f} "
            f"{f['p95_ms']:>8.1f} {f['p99_ms']:>8.1f} {f['max_ms']:>8.1f} "
            f"{f['last_listener_median_ms']:>10.1f} {f['superseded']:>10} {f['missing']:>8} "
            f"{f['server_cpu_ms_per_seek']:>11.1f} {f['bench_cpu_ms_per_seek']:>13.1f}"
        )
    print(
        "  last/seek = median over seeks of the slowest listener's delay;"
        " superseded = got a newer state first"
    )
    print("\nMemory per idle connection (server VmRSS)")
    print(f"{'N':>6} {'before MiB':>10} {'after MiB':>10} {'peak MiB':>9} {'KiB/conn':>9}")
    for m in res["memory"]:
        print(
            f"{m['n']:>6} {m['rss_before_kib'] / 1024:>10.1f} {m['rss_after_kib'] / 1024:>10.1f} "
            f"{m['hwm_kib'] / 1024:>9.1f} {m['kib_per_conn']:>9.1f}"
        )
    s = res["stall"]
    if s:
        print(
            f"\nStalled listeners ({s['stalled']} of {s['listeners']} never read; "
            f"{s['rounds']} round(s) each, {s['seeks_per_round']} seeks, median p95)"
        )
        print(f"  p95 without stalled: {s['p95_clean_ms']:.1f} ms  {s['p95_clean_rounds_ms']}")
        print(f"  p95 with stalled:    {s['p95_stalled_ms']:.1f} ms  {s['p95_stalled_rounds_ms']}")
        print(f"  ratio:               {s['ratio']}")
        for d in s["stalled_rounds"]:
            watched = (
                f", dropped after {d['dropped_after_s']} s (watched {d['watched_s']} s)"
                if "watched_s" in d
                else ""
            )
            print(
                f"  stalled round: bytes stuck in server send queues "
                f"{d['stalled_server_send_queue_bytes']}, in client receive queues "
                f"{d['stalled_client_recv_queue_bytes']}{watched}; server stop {d['stop_s']} s"
            )
    for e in res["errors"]:
        print(f"NOTE {e['phase']}: {e['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under ~30 s")
    parser.add_argument(
        "--source", type=Path, default=REPO, help="tree to import musicsync from (default: repo)"
    )
    parser.add_argument("--batch", type=int, default=100, help="connections in flight at once")
    parser.add_argument("--seeks", type=int, default=0, help="seeks per fan-out size")
    parser.add_argument("--fill-budget", type=float, default=0.0, help="seconds of filling")
    parser.add_argument("--stall-rounds", type=int, default=0)
    args = parser.parse_args()

    soft, hard = raise_fd_limit()
    load_start = os.getloadavg()[0]
    t0 = clock()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        cfg = make_config(args, Path(tmp))
        need = max(cfg.join_sizes + cfg.fanout_sizes) + 64
        if soft < need:
            print(f"warning: RLIMIT_NOFILE {soft} < {need}", file=sys.stderr)
        res = trio.run(run, cfg)
    elapsed = clock() - t0
    print_tables(res)
    print(f"\nelapsed {elapsed:.1f} s; server stops took {[round(s, 2) for s in cfg.stop_seconds]}")
    summary = {
        "bench": "fanout",
        "quick": cfg.quick,
        "elapsed_s": rnd(elapsed, 1),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_start": rnd(load_start, 2),
        "loadavg_1m_end": rnd(os.getloadavg()[0], 2),
        "nofile": [soft, hard],
        "batch": cfg.batch,
        "seek_rate_per_s": SEEK_RATE,
        "fill_budget_s": cfg.fill_budget,
        **res,
        "server_stop_s": [rnd(s, 2) for s in cfg.stop_seconds],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
