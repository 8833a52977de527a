"""The listening sockets: each connection's first request head decides who serves it.

``musicsync serve`` accepts connections here instead of in Hypercorn's own
loop. The first request head is read with h11 (bounded in size and time);

* a WebSocket upgrade goes to our lean connection (``wsconn``), checked here
  (handshake, Host) and in ``app.serve_websocket`` (Origin, limits, access);
* everything else, with the bytes read so far, goes to Hypercorn's own
  ``TCPServer`` for the Quart app, which serves the rest of that connection.

Whatever one connection raises ends that connection only: the per-connection
guard logs it and the serving loop goes on (a single hostile write used to
stop Hypercorn's, issue 10).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from http import HTTPStatus
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app
from quart_trio import QuartTrio

from .sockets import GuardedTCPServer
from .wsframes import (
    HandshakeRefused,
    Upgrade,
    check_upgrade,
    error_response,
    is_websocket_upgrade,
)

if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # a request head beyond this gets 431
HEAD_TIMEOUT = 5.0  # seconds for the whole first request head (trickling peers)
HEAD_RECEIVE_BYTES = 4096
H2_PREFACE = b"PRI * HTTP/2.0"
SEND_RESPONSE_TIMEOUT = 2.0  # seconds to hand an error response to a peer
LINGER_SECONDS = 1.0  # after an answer that ends a connection: drain the peer this long
LINGER_BYTES = 64 * 1024  # ...or until this much was drained


class PrefixedStream:
    """A stream whose first ``receive_some`` returns bytes already read from it."""

    def __init__(self, stream: Any, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


WebSocketHandler = Callable[[trio.abc.Stream, Upgrade, bytes, str], Awaitable[None]]


async def send_and_close(stream: trio.abc.Stream, data: bytes) -> None:
    """Answer, then a lingering close: stop sending, read (and drop) what the
    peer still sends for a moment, then close. Closing with unread bytes would
    reset the connection and could destroy the answer before it is read."""
    with trio.move_on_after(SEND_RESPONSE_TIMEOUT):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)
            await linger(stream)
    await trio.aclose_forcefully(stream)


async def linger(stream: trio.abc.Stream) -> None:
    """Half-close our side, then drain the peer's until it closes (bounded)."""
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES:
            data = await stream.receive_some(HEAD_RECEIVE_BYTES)
            if not data:
                return
            drained += len(data)


async def read_head(stream: trio.abc.Stream) -> tuple[h11.Request | None, bytes, bytes]:
    """(the request, every byte read, the bytes after its head) — or (None, ...)
    when the peer left, was too slow or too big (already answered and closed)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    with trio.move_on_after(HEAD_TIMEOUT):
        while True:
            try:
                data = await stream.receive_some(HEAD_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                await trio.aclose_forcefully(stream)
                return None, bytes(raw), b""
            raw += data
            if raw.startswith(H2_PREFACE[: len(raw)]):
                if len(raw) < len(H2_PREFACE):
                    continue
                return None, bytes(raw), b""  # HTTP/2 with prior knowledge: Hypercorn's
            conn.receive_data(bytes(data))
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = HTTPStatus(exc.error_status_hint)
                await send_and_close(stream, error_response(status, str(exc)))
                return None, b"", b""
            head_end = raw.find(b"\r\n\r\n")
            if (head_end + 4 if head_end >= 0 else len(raw)) > MAX_HEAD_BYTES:
                # h11 bounds only a head still incomplete; one that came whole is
                # held to the same limit here
                too_big = error_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "head too big")
                await send_and_close(stream, too_big)
                return None, b"", b""
            if event is h11.NEED_DATA:
                continue
            assert isinstance(event, h11.Request)
            trailing = _bytes_after_head(conn, event, bytes(raw))
            return event, bytes(raw), trailing
    await send_and_close(
        stream, error_response(HTTPStatus.REQUEST_TIMEOUT, "the request head took too long")
    )
    return None, b"", b""


def _bytes_after_head(conn: h11.Connection, request: h11.Request, raw: bytes) -> bytes:
    """What came after the request head (and its empty body) in the same reads."""
    if not is_websocket_upgrade(list(request.headers)):
        return b""
    try:
        while (event := conn.next_event()) is not h11.PAUSED:
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return b""
    except h11.RemoteProtocolError:
        return b""
    trailing, _closed = conn.trailing_data
    return bytes(trailing)


async def route(
    stream: trio.abc.Stream,
    hypercorn: Callable[[Any], Awaitable[None]],
    websocket: WebSocketHandler,
    *,
    compression: bool,
    ssl_handshake_timeout: float,
) -> None:
    """Serve one accepted connection to its end."""
    if isinstance(stream, trio.SSLStream):
        try:
            with trio.fail_after(ssl_handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError):
            await trio.aclose_forcefully(stream)
            return
        if stream.selected_alpn_protocol() == "h2":
            await hypercorn(stream)
            return
    request, raw, trailing = await read_head(stream)
    if request is None:
        if raw.startswith(H2_PREFACE):
            await hypercorn(PrefixedStream(stream, raw))
        return
    headers = list(request.headers)
    if not is_websocket_upgrade(headers):
        await hypercorn(PrefixedStream(stream, raw))
        return
    try:
        upgrade = check_upgrade(request.method, request.target, request.http_version, headers)
    except HandshakeRefused as refused:
        response = error_response(refused.status, refused.reason, refused.headers)
        await send_and_close(stream, response)
        return
    if compression and upgrade.offers_compression:
        # permessage-deflate was asked for and is allowed: Hypercorn's path has it.
        await hypercorn(PrefixedStream(stream, raw))
        return
    # This frame lives as long as the connection: keep none of the request's parse.
    del request, headers, raw
    await websocket(stream, upgrade, trailing, _peer_ip(stream))


def _peer_ip(stream: trio.abc.Stream) -> str:
    transport: Any = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        peer = transport.socket.getpeername()
    except (AttributeError, OSError):
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"


async def serve(
    app: QuartTrio | Any,
    config: HypercornConfig,
    websocket: WebSocketHandler,
    *,
    compression: bool,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio ``worker_serve``, with our accept loop in front of it.

    ``app`` is the ASGI app Hypercorn serves (the Quart app, or it wrapped in
    ProxyFixMiddleware); ``websocket`` serves the upgrades we take.
    """
    asgi = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            ssl_context = config.create_ssl_context()
            listeners: list[trio.abc.Listener[Any]] = []
            binds = []
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.listen(config.backlog)
                listener: trio.abc.Listener[Any] = trio.SocketListener(
                    trio.socket.from_stdlib_socket(sock)
                )
                secure = sock in sockets.secure_sockets
                if secure:
                    assert ssl_context is not None
                    listener = trio.SSLListener(listener, ssl_context, https_compatible=True)
                listeners.append(listener)
                scheme = "https" if secure else "http"
                binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")

            def hypercorn_handler(stream: Any) -> Awaitable[None]:
                state = ConnectionState(lifespan_state.copy())
                return GuardedTCPServer(asgi, config, context, state, stream).run()

            async def connection(stream: trio.abc.Stream) -> None:
                try:
                    await route(
                        stream,
                        hypercorn_handler,
                        websocket,
                        compression=compression,
                        ssl_handshake_timeout=config.ssl_handshake_timeout,
                    )
                except Exception:  # one connection's failure ends that connection only
                    log.warning("connection failed; closed it", exc_info=True)
                    await trio.aclose_forcefully(stream)

            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            connection,
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
