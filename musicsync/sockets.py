"""Listening sockets whose connections the kernel aborts when a peer stops reading."""

from __future__ import annotations

import socket
from typing import Any

from hypercorn.config import Config as HypercornConfig

MS_PER_SECOND = 1000


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
