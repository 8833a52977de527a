"""A lean WebSocket server connection on a trio stream: wsproto parses, we frame and write.

Reading goes through wsproto's frame-level ``Connection`` (after our own
handshake). Every frame the peer sends, control and continuation frames
included, is counted against a budget; a flood is closed (1008) at once.
Writing is ours: frames are built once (``outbox.Frame``) and, on a plain TCP
socket, written with a non-blocking ``send`` straight from the fan-out loop
(``offer``); only the tail a full kernel buffer refused waits for the
client's writer task (``flush``). Over TLS every write goes through the
``SSLStream`` from the writer task.
"""

from __future__ import annotations

import contextlib
import socket as stdlib_socket
import struct
from collections.abc import Callable

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from .outbox import Frame
from .ratelimit import TokenBucket
from .wsframes import close_frame, pong_frame

RECEIVE_BYTES = 16 * 1024
# Frames (of any kind) a client may send: an honest page sends at most ~20 a
# second while it syncs its clock, then one every few seconds.
FRAME_RATE_PER_SECOND = 60.0
FRAME_BURST = 240.0
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
PROTOCOL_ERROR_CODES = (1002, 1007)  # broken framing, invalid UTF-8


class WireViolation(Exception):
    """The peer broke the rules of the wire; close with ``code``.

    ``error`` names the typed error a still-listening peer is told first, or
    None when the connection is too broken to say anything more.
    """

    def __init__(self, code: int, reason: str, error: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error


def stdlib_socket_of(stream: trio.abc.Stream) -> stdlib_socket.socket | None:
    """The plain socket under a trio ``SocketStream`` (None for TLS and others).

    trio keeps it as ``_sock``; we write to it directly, never through its fd,
    so a closed socket raises instead of writing to a reused descriptor.
    """
    if not isinstance(stream, trio.SocketStream):
        return None
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, stdlib_socket.socket) else None


class FastTransport:
    """One accepted WebSocket: ``receive`` whole text messages, ``offer``/``send`` frames."""

    def __init__(self, stream: trio.abc.Stream, trailing: bytes, max_message_bytes: int) -> None:
        self.stream = stream
        self._raw = stdlib_socket_of(stream)
        self._trio_socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._ws = Connection(ConnectionType.SERVER)
        self._pending_in = trailing
        self._max = max_message_bytes
        self._parts: list[str] = []
        self._size = 0
        self._binary = False
        self._budget = TokenBucket(FRAME_RATE_PER_SECOND, FRAME_BURST)
        self._tail: memoryview | None = None
        self.broken = False
        self.sent_close = False
        self.received_close = False
        self.close_code: int | None = None
        self._draining = False

    # -- the Sink the fan-out writes through --------------------------------

    @property
    def sink(self) -> FastTransport | None:
        return self if self._raw is not None else None

    @property
    def idle(self) -> bool:
        return self._tail is None and not self.broken

    def offer(self, data: bytes) -> bool:
        assert self._raw is not None and self._tail is None
        try:
            n = self._raw.send(data)
        except OSError as exc:
            return self.settle(data, exc)
        if n < len(data):
            self._tail = memoryview(data)[n:]
        return True

    @property
    def raw_send(self) -> Callable[[bytes], int] | None:
        return self._raw.send if self._raw is not None else None

    def settle(self, data: bytes, outcome: int | OSError) -> bool:
        """What a ``send(data)`` on our socket did, made by someone else (the
        hub's sender pool) while nothing else wrote here: as ``offer``."""
        assert self._tail is None
        if isinstance(outcome, BlockingIOError):
            return False
        if isinstance(outcome, OSError):
            self.broken = True  # the writer's next flush ends the connection
        elif outcome < len(data):
            self._tail = memoryview(data)[outcome:]
        return True

    async def flush(self) -> None:
        """Write the tail an ``offer`` left behind; raises if the peer is gone."""
        if self.broken:
            raise trio.BrokenResourceError("the socket failed during a direct write")
        while self._tail is not None:
            assert self._raw is not None and self._trio_socket is not None
            await trio.lowlevel.wait_writable(self._trio_socket)
            try:
                n = self._raw.send(self._tail)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.broken = True
                raise trio.BrokenResourceError(str(exc)) from exc
            self._tail = self._tail[n:] if n < len(self._tail) else None

    async def _write(self, data: bytes) -> None:
        await self.flush()
        if self._raw is None:
            await self.stream.send_all(data)
            return
        if not self.offer(data):
            self._tail = memoryview(data)  # the socket took nothing: all of it waits
        await self.flush()

    async def send(self, frame: Frame) -> None:
        await self._write(frame.wire)

    async def close(self, code: int, reason: str = "") -> None:
        """Send our close frame; the reader then waits for the peer's answer."""
        if self.sent_close:
            return
        self.sent_close = True
        self.close_code = self.close_code or code
        self._draining = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._write(close_frame(code, reason))

    async def wait_closed(self) -> None:
        """Read (and drop) until the peer answers our close frame or goes."""
        with contextlib.suppress(WireViolation):
            while await self.receive() is not None:
                pass

    def reset_on_close(self) -> None:
        """Make the coming close a reset (SO_LINGER 0): a peer that stopped
        reading would otherwise keep our unsent bytes in the kernel."""
        if self._raw is not None:
            with contextlib.suppress(OSError):
                self._raw.setsockopt(
                    stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
                )

    def abort(self, code: int, reason: str) -> None:
        """Best effort: a close frame if the socket takes it now, nothing more."""
        self.close_code = self.close_code or code
        if not self.sent_close and self._raw is not None and self.idle:
            self.sent_close = True
            self.offer(close_frame(code, reason))

    # -- reading -------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        """The next whole message; None once the peer has closed (or gone).

        Raises WireViolation for a flood, an oversized message or broken framing.
        """
        while True:
            message = self._next_message()
            if message is not None:
                return message
            if self.received_close:
                return None
            data: bytes | bytearray
            if self._pending_in:
                data, self._pending_in = self._pending_in, b""
            else:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.received_close = True
                    return None
            self._ws.receive_data(bytes(data))

    def _next_message(self) -> str | bytes | None:
        now = trio.current_time()
        for event in self._ws.events():
            if not self._budget.try_take(now):
                raise WireViolation(CLOSE_POLICY, "too many frames")
            if isinstance(event, TextMessage | BytesMessage):
                if self._draining:
                    continue
                message = self._collect(event)
                if message is not None:
                    return message
            elif isinstance(event, Ping):
                if not self.sent_close and self._raw is not None and self.idle:
                    self.offer(pong_frame(bytes(event.payload)))
            elif isinstance(event, Pong):
                continue
            elif isinstance(event, CloseConnection):
                self.received_close = True
                if event.code in PROTOCOL_ERROR_CODES and not self.sent_close:
                    # wsproto reports broken framing or UTF-8 as a close with
                    # 1002/1007: answer with that code and hang up.
                    raise WireViolation(event.code, event.reason or "protocol error")
                if not self.sent_close:
                    self.abort(event.code if 1000 <= event.code < 5000 else CLOSE_NORMAL, "")
                return None
        return None

    def _collect(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        data = event.data
        if isinstance(data, str):
            self._size += len(data) if data.isascii() else len(data.encode())
        else:
            self._binary = True
            self._size += len(data)
        if self._size > self._max:
            self._draining = True  # the rest of this message is dropped unread
            self._parts.clear()
            raise WireViolation(CLOSE_TOO_BIG, "frame too large", "too_large")
        if not self._binary:
            assert isinstance(data, str)
            self._parts.append(data)
        if not event.message_finished:
            return None
        binary = self._binary
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._binary = False
        return b"" if binary else text  # binary is refused whatever it holds: not kept
