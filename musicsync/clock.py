"""The server clock: epoch milliseconds from a monotonic source anchored once."""

from __future__ import annotations

import time
from collections.abc import Callable

MS_PER_SECOND = 1000.0


class ServerClock:
    """Milliseconds since the Unix epoch that never jump.

    The wall clock is read exactly once, at construction. After that the time
    advances with ``monotonic`` (seconds, any origin), so an NTP step or a manual
    date change on the host never moves a timeline.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: float | None = None,
    ) -> None:
        self._monotonic = monotonic
        self._anchor_mono = monotonic()
        self._anchor_wall_ms = time.time() * MS_PER_SECOND if wall_ms is None else wall_ms

    def now_ms(self) -> float:
        """The current server time, in epoch milliseconds (fractional)."""
        return self._anchor_wall_ms + (self._monotonic() - self._anchor_mono) * MS_PER_SECOND

    def from_monotonic(self, mono: float) -> float:
        """Convert a reading of the monotonic source to server milliseconds."""
        return self._anchor_wall_ms + (mono - self._anchor_mono) * MS_PER_SECOND
