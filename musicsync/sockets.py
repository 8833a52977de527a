"""How we bend Hypercorn: kernel aborts for stuck peers, no permessage-deflate, and a
connection's failure that cannot end the serving loop."""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol import ws_stream
from hypercorn.trio import run as hypercorn_trio_run
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger(__name__)

MS_PER_SECOND = 1000
EXTENSIONS_HEADER = b"sec-websocket-extensions"


class StuckPeerConfig(HypercornConfig):
    """Hypercorn config whose TCP sockets carry ``TCP_USER_TIMEOUT``.

    Hypercorn shields its ``send_all`` from cancellation, so an app-level
    timeout cannot free a writer whose peer has stopped reading (a zero
    window). With ``TCP_USER_TIMEOUT`` (inherited by accepted sockets on Linux)
    the kernel aborts such a connection once data has gone unacknowledged for
    ``user_timeout`` seconds; the blocked send then fails and the client's
    nursery unwinds. On systems without the option this is a no-op, and the
    heartbeat still drops a peer that also stops sending.
    """

    user_timeout: float | None = None

    def _create_sockets(self, binds: list[str], type_: int = socket.SOCK_STREAM) -> Any:
        sockets = super()._create_sockets(binds, type_)
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if self.user_timeout is not None and option is not None and type_ == socket.SOCK_STREAM:
            for sock in sockets:
                sock.setsockopt(socket.IPPROTO_TCP, option, int(self.user_timeout * MS_PER_SECOND))
        return sockets


_HYPERCORN_HANDSHAKE = ws_stream.Handshake


class _NoExtensionsHandshake(_HYPERCORN_HANDSHAKE):
    """Hypercorn's handshake, blind to the client's ``Sec-WebSocket-Extensions``."""

    def __init__(self, headers: list[tuple[bytes, bytes]], http_version: str) -> None:
        kept = [(name, value) for name, value in headers if name.lower() != EXTENSIONS_HEADER]
        super().__init__(kept, http_version)


def set_permessage_deflate(enabled: bool) -> None:
    """Whether Hypercorn may accept permessage-deflate (it does whenever offered).

    Our frames are tiny JSON; compression buys nothing and costs a zlib context
    per connection (on the seed's stack: 33 -> 80 KiB per idle connection).
    Hypercorn has no setting for this, so its handshake class is swapped for
    one that ignores the offer. Process-wide: the last server started decides.
    """
    ws_stream.Handshake = _HYPERCORN_HANDSHAKE if enabled else _NoExtensionsHandshake  # type: ignore[misc]


class GuardedTCPServer(TCPServer):
    """Hypercorn's connection handler, which can no longer end the serving loop.

    Hypercorn (0.18, issue #225) raises h11's LocalProtocolError out of a
    connection whose upgrade request came with more bytes in the same write;
    the exception ended ``serve_listeners`` and with it the process.
    """

    async def run(self) -> None:
        try:
            await super().run()
        except Exception:  # the serving loop's guard: logged, and only this connection ends
            log.warning("connection failed inside Hypercorn; closed it", exc_info=True)
            await trio.aclose_forcefully(self.stream)


def guard_hypercorn_connections() -> None:
    """Make Hypercorn's own trio worker (``hypercorn -k trio musicsync.app:app``)
    serve connections through ``GuardedTCPServer`` too. Idempotent."""
    hypercorn_trio_run.TCPServer = GuardedTCPServer  # type: ignore[attr-defined]
