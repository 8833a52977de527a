"""What a room asks its edge to do (typed effects), and the refusal its parts raise (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The close code of a kicked participant's connection (docs/protocol.md lists
# them all; the hub's CLOSE_KICKED is the same number, for refusals at the door).
CLOSE_KICKED = 4403


class Refusal(Exception):
    """A *remote* error: the sender asked for something it may not have.

    A room's parts raise it before they change anything; the room turns it into
    one ``Error`` effect addressed to the sender and carries on. (A *local*
    error, the caller breaking a part's contract, raises ValueError, KeyError
    or TypeError instead.)
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``kind`` with ``payload`` to one participant."""

    to: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """Send an ``error`` frame to one participant; its connection stays open."""

    to: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Send ``to`` an ``error`` frame (``code``, ``reason``), then close its
    connection with ``close_code``; it is no longer in the room."""

    to: str
    code: str
    reason: str
    close_code: int


@dataclass(frozen=True, slots=True)
class BroadcastState:
    """The room state changed; send it to everyone (the newest one wins).

    ``queue_rev`` grows when the queue changed: a client that already has this
    revision of the queue may get the state without it (a 500-item queue is
    1 MB; a volume change need not resend it).
    """

    state: dict[str, Any]
    queue_rev: int = 0


@dataclass(frozen=True, slots=True)
class BroadcastPresence:
    """Who joined, left or changed role since the last one; send it to everyone."""

    delta: dict[str, Any]


Effect = Reply | Error | Disconnect | BroadcastState | BroadcastPresence
