"""How we bend Hypercorn: kernel aborts for stuck peers, and no permessage-deflate."""

from __future__ import annotations

import socket
from typing import Any

from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol import ws_stream

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
