"""A client's pending outgoing frames: pongs first, newest state wins (sans-IO)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .wsframes import text_frame

T = TypeVar("T")


class OutboxOverflow(Exception):
    """More frames are waiting than the client is allowed to fall behind by."""


@dataclass(frozen=True)
class PendingPong:
    t0: float
    t1: float


class Frame:
    """One outgoing text message, encoded once: its JSON text and, built on
    first use, its unmasked WebSocket frame (the same bytes for every client)."""

    __slots__ = ("_wire", "queue_rev", "text")

    def __init__(self, text: str, queue_rev: int | None = None) -> None:
        self.text = text
        self._wire: bytes | None = None
        # a state that carries the room's queue: which revision of it
        self.queue_rev = queue_rev

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = text_frame(self.text)
        return self._wire

    def __repr__(self) -> str:
        return f"Frame({self.text[:40]!r})"


_STATE = object()  # marks where in the order the (coalesced) state frame goes
_EMPTY: deque[Any] = deque(maxlen=0)  # shared stand-in for a queue never used yet


class Outbox(Generic[T]):
    """Frames waiting for one client's writer.

    * Pongs jump the queue: clock sync needs them answered at once.
    * At most one ``state`` frame waits at a time; a newer one replaces its
      text in place, so a slow client skips straight to the newest state.
    * Everything else (welcome, presence, errors) keeps its order and counts
      against ``max_frames``; past that, ``push`` raises OutboxOverflow.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        # Made on first use: most outboxes stay empty (frames go straight to the
        # socket), and an empty deque costs ~760 bytes a client.
        self._pongs: deque[PendingPong] = _EMPTY
        self._frames: deque[Any] = _EMPTY
        self._state: T | None = None
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._pongs) + len(self._frames)

    def push(self, frame: T) -> None:
        if len(self._frames) >= self.max_frames:
            raise OutboxOverflow(f"{len(self._frames)} frames waiting")
        if self._frames is _EMPTY:
            self._frames = deque()
        self._frames.append(frame)

    def push_state(self, frame: T) -> None:
        if self._state is not None:
            self._state = frame
            self.coalesced += 1
            return
        self.push(frame)
        self._frames[-1] = _STATE
        self._state = frame

    def push_pong(self, t0: float, t1: float) -> None:
        if len(self._pongs) >= self.max_frames:
            raise OutboxOverflow("too many pongs waiting")
        if self._pongs is _EMPTY:
            self._pongs = deque()
        self._pongs.append(PendingPong(t0, t1))

    def pop(self) -> T | PendingPong | None:
        if self._pongs:
            return self._pongs.popleft()
        if not self._frames:
            return None
        item = self._frames.popleft()
        if item is _STATE:
            frame, self._state = self._state, None
            assert frame is not None
            return frame
        return item  # type: ignore[no-any-return]
