"""Load client for `just bench`: thousands of WebSocket listeners on raw sockets and one epoll loop.

One process, no framework: non-blocking sockets, ``select.epoll``, the
WebSocket handshake written by hand, masked client frames, unmasked server
frames parsed just enough to find a text frame's end and, for ``state``
frames, the room ``version`` (a byte search, no JSON parsing). Listeners send
nothing after their handshake. Every event is stamped with ``time.monotonic()``
(CLOCK_MONOTONIC: the same clock in every process of the machine) when
``epoll.poll`` returns it, so a delay does not include the time the loop
spent on the sockets reported before it.

Driven by ``bench_fanout.py`` over stdin/stdout, one JSON object a line:
each command gets one reply. Commands:

* ``host``: connect the host; reply its role and the room version.
* ``seat n batch stalled``: open ``n`` listeners, ``batch`` in flight at a
  time; a listener is seated when its first frame (the welcome) arrives. Then
  ``stalled`` raw sockets with a tiny ``SO_RCVBUF`` that read the 101 response
  and never read again.
* ``quiet ms timeout``: wait until no listener received anything for ``ms``.
* ``arm v0 count``: record, per listener, when each version v0+1..v0+count
  arrives (a newer version also settles the older ones: superseded).
* ``changes msgs interval echo``: the host sends these messages, one every
  ``interval`` seconds; reply the send times (with ``echo``, once the host has
  the state of the last one, and its version).
* ``wait version timeout``: until every open listener has that version.
* ``report sends``: delays per change and listener, counts, client CPU.
* ``stalled_info``: the stalled sockets' local ports and unread bytes.
* ``close``: reset every connection and exit.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import resource
import select
import socket
import struct
import sys
import termios
import time
from typing import Any

HOST = "127.0.0.1"
RECV_BYTES = 256 * 1024
MAX_EVENTS = 512  # events per poll: smaller batches stamp arrivals more tightly
BIG_FRAME = 16 * 1024  # incomplete frames larger than this are skipped, not buffered
STALL_RCVBUF = 1024
STALL_READ = 64  # the stalled sockets read the 101 response in small pieces
HEAD_LIMIT = 16 * 1024
CONNECT_STALL_S = 30.0  # seating gives up when no listener was seated for this long
STATE_TAIL = b'"type":"state"}'
VERSION_RE = re.compile(rb'"version":(\d+)')
NAN = math.nan

clock = time.monotonic

CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def mask_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One client frame: FIN, ``opcode``, masked with a random key."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    if n:
        k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")
    return head + key + payload


class Conn:
    __slots__ = (
        "buf",
        "close_code",
        "frames",
        "idx",
        "kind",
        "last_rx",
        "name",
        "next_v",
        "opened",
        "seated",
        "skip",
        "skip_first",
        "sock",
        "state",
        "version",
    )

    def __init__(self, sock: socket.socket, idx: int, kind: str, name: str) -> None:
        self.sock = sock
        self.idx = idx  # position in the arrival table (listeners only)
        self.kind = kind  # "host", "listener" or "stalled"
        self.name = name
        self.state = CONNECTING
        self.buf = b""
        self.skip = 0  # payload bytes of a big frame still to discard
        self.skip_first = False  # the skipped frame is the welcome
        self.seated = NAN
        self.opened = clock()
        self.version = -1
        self.next_v = 0  # next armed change index this listener waits for
        self.frames = 0  # text frames received
        self.close_code: int | None = None
        self.last_rx = 0.0


class Client:
    def __init__(self, port: int, room: str, prefix: str) -> None:
        self.port = port
        self.room = room
        self.prefix = prefix
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.listeners: list[Conn] = []
        self.stalled: list[Conn] = []
        self.host: Conn | None = None
        self.last_rx = 0.0  # last time any listener received bytes
        self.states = 0  # state frames received by anyone since arm
        self.rx_bytes = 0
        # arrival table: arrivals[i * count + k] is when listener i saw change k
        self.v0 = 0
        self.count = 0
        self.arrivals: list[float] = []
        self.superseded = 0
        self.pending = 0  # listeners not seated yet (connecting, handshaking, no welcome)
        self.n_seated = 0
        self.want = 0  # listeners to open in the current seat command
        self.batch = 1
        self.inbuf = b""
        self.commands: list[dict[str, Any]] = []
        self.errors: dict[str, int] = {}
        self.rbuf = bytearray(RECV_BYTES)
        self.rview = memoryview(self.rbuf)

    # -- sockets -----------------------------------------------------------------

    def _request(self, name: str) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET /ws/{self.room}?name={name} HTTP/1.1\r\n"
            f"Host: {HOST}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def open(self, kind: str, name: str) -> Conn | None:
        """Start a non-blocking connect; None (and an error counted) if that failed."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE: out of descriptors
            self._error(f"socket {errno.errorcode.get(exc.errno or 0, exc.errno)}")
            return None
        if kind == "stalled":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        idx = len(self.listeners) if kind == "listener" else -1
        c = Conn(sock, idx, kind, name)
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._error(f"connect {errno.errorcode.get(err, err)}")
            return None
        self.conns[sock.fileno()] = c
        self.ep.register(sock.fileno(), select.EPOLLOUT)
        if kind == "listener":
            self.listeners.append(c)
            self.pending += 1
        elif kind == "stalled":
            self.stalled.append(c)
        else:
            self.host = c
        return c

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def drop(self, c: Conn, code: int | None = None) -> None:
        if c.state == CLOSED:
            return
        if c.kind == "listener" and math.isnan(c.seated):
            self.pending -= 1
        c.state = CLOSED
        c.close_code = code if code is not None else -1
        fd = c.sock.fileno()
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        self.conns.pop(fd, None)
        c.sock.close()

    def on_writable(self, c: Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._error(f"connect {errno.errorcode.get(err, err)}")
            self.drop(c)
            return
        try:
            c.sock.send(self._request(c.name))  # ~200 bytes: fits any fresh socket
        except OSError as exc:
            self._error(f"send {type(exc).__name__}")
            self.drop(c)
            return
        c.state = HANDSHAKE
        self.ep.modify(c.sock.fileno(), select.EPOLLIN)

    def send_text(self, c: Conn, text: str) -> None:
        data = mask_frame(text.encode())
        c.sock.setblocking(True)  # the host's few small frames: just send them
        try:
            c.sock.sendall(data)
        finally:
            c.sock.setblocking(False)

    def on_readable(self, c: Conn, t: float) -> None:
        if c.kind == "stalled":
            self._stalled_read(c)
            return
        try:
            got = c.sock.recv_into(self.rbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._error(f"recv {type(exc).__name__}")
            self.drop(c)
            return
        if not got:
            if c.state != OPEN:
                self._error("closed during handshake")
            self.drop(c, c.close_code)
            return
        if c.kind == "listener":
            self.last_rx = t
            self.rx_bytes += got
        # Parse in place in the one reused buffer (no allocation per call); only
        # an incomplete frame is copied out, and joined with the next bytes.
        data: bytes | bytearray = self.rbuf
        n = got
        if c.buf:
            data = c.buf + self.rview[:got]
            n = len(data)
            c.buf = b""
        i = 0
        if c.skip:
            if n < c.skip:
                c.skip -= n
                return
            i = c.skip
            c.skip = 0
            self._text(c, data, i, i, t, c.skip_first)
        if c.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n", 0, n)
            if end < 0:
                if n > HEAD_LIMIT:
                    self._error("response head too long")
                    self.drop(c)
                else:
                    c.buf = bytes(data[:n])
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self._error("refused " + bytes(data[:12]).decode(errors="replace"))
                self.drop(c)
                return
            c.state = OPEN
            i = end + 4
        while i + 2 <= n:
            b0 = data[i]
            ln = data[i + 1] & 0x7F
            h = i + 2
            if ln == 126:
                if h + 2 > n:
                    break
                ln = (data[h] << 8) | data[h + 1]
                h += 2
            elif ln == 127:
                if h + 8 > n:
                    break
                ln = int.from_bytes(data[h : h + 8], "big")
                h += 8
            end = h + ln
            op = b0 & 0x0F
            if end > n:
                if ln > BIG_FRAME and op in (0, 1, 2):
                    c.skip = end - n  # discard the rest as it comes
                    c.skip_first = c.frames == 0
                    return
                c.buf = bytes(data[i:n])
                return
            if op == 1 or op == 0:
                self._text(c, data, h, end, t, c.frames == 0)
            elif op == 8:
                code = (data[h] << 8) | data[h + 1] if ln >= 2 else 1005
                self.drop(c, code)
                return
            elif op == 9:  # ping: answer with a pong
                with contextlib.suppress(OSError):
                    c.sock.send(mask_frame(bytes(data[h:end]), 0xA))
            i = end
        if i < n:
            c.buf = bytes(data[i:n])

    def _text(
        self, c: Conn, data: bytes | bytearray, start: int, end: int, t: float, first: bool
    ) -> None:
        c.frames += 1
        if first:
            c.seated = t
            if c.kind == "listener":
                self.pending -= 1
                self.n_seated += 1
            m = VERSION_RE.search(data, start, end)
            if m is not None:
                c.version = int(m.group(1))
            return
        if not data.endswith(STATE_TAIL, start, end):
            return
        m = VERSION_RE.search(data, start, end)
        if m is None:
            return
        v = int(m.group(1))
        self.states += 1
        if v <= c.version:
            return
        c.version = v
        if c.idx < 0 or not self.count:
            return
        k = v - self.v0  # this state settles changes next_v+1 .. k
        if k > self.count:
            k = self.count
        base = c.idx * self.count
        arr = self.arrivals
        j = c.next_v
        while j < k:
            arr[base + j] = t
            j += 1
        if k - c.next_v > 1:
            self.superseded += k - c.next_v - 1
        if k > c.next_v:
            c.next_v = k

    def _stalled_read(self, c: Conn) -> None:
        """Read the 101 response a little at a time, then never again."""
        try:
            data = c.sock.recv(STALL_READ)
        except BlockingIOError:
            return
        except OSError:
            self._error("stalled recv")
            self.drop(c)
            return
        if not data:
            self._error("stalled closed during handshake")
            self.drop(c)
            return
        c.buf += data
        if b"\r\n\r\n" in c.buf:
            if not c.buf.startswith(b"HTTP/1.1 101"):
                self._error("stalled refused")
                self.drop(c)
                return
            c.state = OPEN
            c.seated = clock()
            c.buf = b""
            self.ep.unregister(c.sock.fileno())  # from now on: never read

    # -- the loop ----------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """One epoll round: stdin commands are queued, sockets served."""
        events = self.ep.poll(timeout, MAX_EVENTS)
        t = clock()
        conns = self.conns
        for fd, ev in events:
            if fd == 0:
                self._read_stdin()
                continue
            c = conns.get(fd)
            if c is None:
                continue
            if c.state == CONNECTING:
                if ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                    self.on_writable(c)
            else:
                self.on_readable(c, t)

    def _read_stdin(self) -> None:
        try:
            chunk = os.read(0, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self.commands.append({"cmd": "close"})
            with contextlib.suppress(OSError):
                self.ep.unregister(0)
            return
        self.inbuf += chunk
        *lines, self.inbuf = self.inbuf.split(b"\n")
        self.commands.extend(json.loads(line) for line in lines if line.strip())

    def run_until(self, done: Any, timeout: float, step: float = 0.02) -> bool:
        """Serve sockets until ``done()`` (checked at most every ``step`` s) or timeout."""
        now = clock()
        deadline = now + timeout
        check = now
        while True:
            if now >= check:
                if done():
                    return True
                check = now + step
            if now >= deadline:
                return False
            self.poll(min(step, deadline - now))
            now = clock()

    # -- commands ----------------------------------------------------------------

    def cmd_host(self, _: dict[str, Any]) -> dict[str, Any]:
        c = self.open("host", "host")
        if c is None:
            return {"ok": False, "version": None, "errors": self.errors}
        ok = self.run_until(lambda: c.state == CLOSED or c.frames > 0, 30.0)
        return {"ok": ok and c.state == OPEN, "version": c.version, "errors": self.errors}

    def cmd_seat(self, cmd: dict[str, Any]) -> dict[str, Any]:
        n, batch, stalled = int(cmd["n"]), int(cmd["batch"]), int(cmd.get("stalled", 0))
        start = clock()
        stop_opening = start + float(cmd.get("budget", math.inf))
        target = len(self.listeners) + n
        last_progress = start
        seated_before = self.seated_count()
        seated = seated_before
        while True:
            if clock() > stop_opening:
                target = len(self.listeners)  # budget spent: no new ones
            while len(self.listeners) < target and self.pending < batch:
                if self.open("listener", f"{self.prefix}{len(self.listeners)}") is None:
                    target = len(self.listeners)  # cannot open more
            if self.pending <= 0 and len(self.listeners) >= target:
                break
            self.poll(0.05)
            now_seated = self.seated_count()
            if now_seated != seated:
                seated, last_progress = now_seated, clock()
            elif clock() - last_progress > CONNECT_STALL_S:
                break
        end = max((c.seated for c in self.listeners if not math.isnan(c.seated)), default=start)
        for i in range(stalled):
            self.open("stalled", f"{self.prefix}stalled{i}")
        self.run_until(lambda: all(s.state in (OPEN, CLOSED) for s in self.stalled), 30.0)
        return {
            "start": start,
            "end": end,
            "seated": self.seated_count() - seated_before,
            "open": sum(1 for c in self.listeners if c.state == OPEN),
            "stalled_open": sum(1 for s in self.stalled if s.state == OPEN),
            "errors": self.errors,
        }

    def seated_count(self) -> int:
        return self.n_seated

    def cmd_quiet(self, cmd: dict[str, Any]) -> dict[str, Any]:
        quiet, start = float(cmd["ms"]) / 1000.0, clock()
        ok = self.run_until(
            lambda: clock() - max(self.last_rx, start) >= quiet, float(cmd["timeout"])
        )
        return {"ok": ok, "seconds": clock() - start, "host_version": self.host_version()}

    def host_version(self) -> int | None:
        return self.host.version if self.host is not None else None

    def cmd_arm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.v0, self.count = int(cmd["v0"]), int(cmd["count"])
        self.arrivals = [NAN] * (len(self.listeners) * self.count)
        for c in self.listeners:
            c.next_v = max(0, min(self.count, c.version - self.v0))
        self.states = 0
        self.superseded = 0
        return {"ok": True, "cpu": cpu_s()}

    def cmd_changes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.host is not None
        msgs: list[dict[str, Any]] = cmd["msgs"]
        interval = float(cmd["interval"])
        host = self.host
        sends: list[float] = []
        before = host.version
        # "at": a CLOCK_MONOTONIC start shared with other load processes (the
        # same moments for hosts in separate processes); else now.
        start = max(float(cmd.get("at", 0.0)), clock())
        for i, msg in enumerate(msgs):
            at = start + i * interval
            while (left := at - clock()) > 0:
                self.poll(min(left, 0.05))
            text = json.dumps(msg, separators=(",", ":"))
            sends.append(clock())
            self.send_text(host, text)
        echoed = True
        if cmd.get("echo"):  # set-up changes: wait for the host's own copy of the last one
            want = before + len(msgs)
            echoed = self.run_until(lambda: host.version >= want or host.state == CLOSED, 30.0)
        return {"sends": sends, "echoed": echoed, "host_version": host.version}

    def cmd_wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        v = int(cmd["version"])
        live = [c for c in self.listeners if c.state == OPEN]
        ok = self.run_until(
            lambda: all(c.version >= v or c.state == CLOSED for c in live), float(cmd["timeout"])
        )
        return {"ok": ok, "t": clock(), "host_version": self.host_version()}

    def cmd_report(self, cmd: dict[str, Any]) -> dict[str, Any]:
        sends: list[float] = cmd["sends"]
        count = self.count
        delays: list[float] = []
        per_change_max = [0.0] * count
        missing = 0
        complete_listeners = 0
        arr = self.arrivals
        for c in self.listeners:
            base = c.idx * count
            got = 0
            for k in range(min(count, len(sends))):
                a = arr[base + k]
                if a != a:  # NaN: never arrived
                    missing += 1
                    continue
                d = (a - sends[k]) * 1000.0
                delays.append(round(d, 3))
                got += 1
                if d > per_change_max[k]:
                    per_change_max[k] = d
            complete_listeners += got == count
        codes: dict[str, int] = {}
        for c in [*self.listeners, *self.stalled]:
            if c.close_code is not None:
                codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        return {
            "listeners": len(self.listeners),
            "open": sum(1 for c in self.listeners if c.state == OPEN),
            "delays": delays,
            "per_change_max": per_change_max,
            "missing": missing,
            "complete_listeners": complete_listeners,
            "superseded": self.superseded,
            "state_frames": self.states,
            "close_codes": codes,
            "rx_bytes": self.rx_bytes,
            "cpu": cpu_s(),
            "errors": self.errors,
        }

    def cmd_stalled_info(self, _: dict[str, Any]) -> dict[str, Any]:
        ports, unread = [], 0
        for s in self.stalled:
            if s.state == CLOSED:
                continue
            ports.append(s.sock.getsockname()[1])
            buf = bytearray(4)
            with contextlib.suppress(OSError):
                fcntl.ioctl(s.sock.fileno(), termios.FIONREAD, buf)
                unread += int.from_bytes(buf, sys.byteorder)
        return {"ports": ports, "unread": unread}

    def close_all(self) -> None:
        linger = struct.pack("ii", 1, 0)  # reset: no TIME_WAIT left behind
        for c in list(self.conns.values()) + [s for s in self.stalled if s.state != CLOSED]:
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            c.sock.close()
        self.conns.clear()

    def serve(self) -> None:
        os.set_blocking(0, False)
        self.ep.register(0, select.EPOLLIN)
        handlers = {
            "host": self.cmd_host,
            "seat": self.cmd_seat,
            "quiet": self.cmd_quiet,
            "arm": self.cmd_arm,
            "changes": self.cmd_changes,
            "wait": self.cmd_wait,
            "report": self.cmd_report,
            "stalled_info": self.cmd_stalled_info,
        }
        while True:
            while not self.commands:
                self.poll(1.0)
            cmd = self.commands.pop(0)
            if cmd["cmd"] == "close":
                self.close_all()
                reply(cmd, {"ok": True})
                return
            reply(cmd, handlers[cmd["cmd"]](cmd))


def reply(cmd: dict[str, Any], out: dict[str, Any]) -> None:
    out["cmd"] = cmd["cmd"]
    sys.stdout.write(json.dumps(out, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main() -> int:
    port, room, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import gc

    gc.disable()  # no collector pauses while stamping arrivals; the process is short-lived
    Client(port, room, prefix).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
