"""Device health of one room: each device's latest report and the host's ``health`` frame (sans-IO).

Callers pass the server time ``now`` (epoch ms) and get plain data back; nothing
here touches a socket, a clock or trio.

Cost, so that a room of 10 000 listeners reporting every 2 s stays cheap:

* ``report`` is O(1): the device's entry is replaced and moved to the end of
  the "fresh" ordering (dicts keep insertion order; a pop and a set).
* ``poll`` makes at most one frame a second, and only after a report came in
  since the last one. It moves the devices that fell silent to "stale" (each
  move is paid for by that device's last report), sorts the fresh devices'
  |drift| for the percentiles and picks the worst ``MAX_ROWS`` with a bounded
  heap. Every fresh device reported within ``STALE_MS``, so a frame's
  O(f log f) is spread over the f reports of the last few seconds: O(log f)
  per report, amortised. The frame itself holds at most ``MAX_ROWS`` rows.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from .protocol import Report

# At most one health frame this often (ms), while anyone reports.
HEALTH_PERIOD_MS = 1000.0
# A device whose last report is older than this is stale (red on the dashboard).
STALE_MS = 5000.0
# A stale device still seated is forgotten after this long without a report.
FORGET_MS = 60_000.0
# Rows in a frame: every device in a small room, the worst ones in a big one.
MAX_ROWS = 50
# Figures on the wire are rounded to this many decimals (ms).
DRIFT_DECIMALS = 2
MS_DECIMALS = 1
PERCENTILES = (0.50, 0.95)


@dataclass(slots=True)
class Device:
    """One device's latest report, as received at server time ``at`` (ms)."""

    id: str
    name: str
    at: float
    drift_ms: float | None
    rtt_ms: float
    offset_ms: float | None
    engine: str | None
    output_latency_ms: float | None
    latency_offset_ms: float | None
    drift_ppm: float | None
    browser: str | None
    # |drift| in ms; -1 while not playing (it then ranks below any playing device).
    abs_drift: float = field(init=False)

    def __post_init__(self) -> None:
        self.abs_drift = -1.0 if self.drift_ms is None else abs(self.drift_ms)

    @classmethod
    def from_report(cls, pid: str, name: str, report: Report, now: float) -> Device:
        return cls(
            pid,
            name,
            now,
            report.drift_ms,
            report.rtt_ms,
            report.offset_ms,
            report.engine,
            report.output_latency_ms,
            report.latency_offset_ms,
            report.drift_ppm,
            report.browser,
        )

    def row(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "engine": self.engine,
            "browser": self.browser,
            "drift_ms": _round(self.drift_ms, DRIFT_DECIMALS),
            "rtt_ms": _round(self.rtt_ms, MS_DECIMALS),
            "offset_ms": _round(self.offset_ms, MS_DECIMALS),
            "output_latency_ms": _round(self.output_latency_ms, MS_DECIMALS),
            "latency_offset_ms": _round(self.latency_offset_ms, MS_DECIMALS),
            "drift_ppm": _round(self.drift_ppm, MS_DECIMALS),
            "age_ms": round(max(0.0, now - self.at)),
        }


_BY_ABS_DRIFT = attrgetter("abs_drift")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None for an empty one."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RoomHealth:
    """The latest report of every device in one room, and when to tell the hosts."""

    def __init__(self) -> None:
        # Both in order of their last report, oldest first: ageing pops from the front.
        self._fresh: dict[str, Device] = {}
        self._stale: dict[str, Device] = {}
        self._last_frame = -math.inf
        self._pending = False  # a report came in since the last frame

    def __len__(self) -> int:
        return len(self._fresh) + len(self._stale)

    def report(self, device: Device) -> None:
        """Keep ``device`` as its device's latest report. O(1)."""
        self._stale.pop(device.id, None)
        self._fresh.pop(device.id, None)  # re-inserted last: the ordering stays by time
        self._fresh[device.id] = device
        self._pending = True

    def forget(self, pid: str) -> None:
        """The device left the room."""
        self._fresh.pop(pid, None)
        self._stale.pop(pid, None)

    def latest(self, pid: str) -> Device | None:
        return self._fresh.get(pid) or self._stale.get(pid)

    def next_due(self) -> float | None:
        """Server time of the next frame, or None until someone reports."""
        return self._last_frame + HEALTH_PERIOD_MS if self._pending else None

    def poll(self, now: float, participants: int) -> dict[str, Any] | None:
        """The ``health`` frame's payload if one is due at ``now``, else None.

        ``participants`` is how many are seated in the room (the summary's
        ``devices``); ``reporting`` counts those heard from within ``STALE_MS``.
        """
        due = self.next_due()
        if due is None or now < due:
            return None
        self._pending = False
        self._last_frame = now
        self._age(now)
        return self._frame(now, participants)

    def _age(self, now: float) -> None:
        fresh, stale = self._fresh, self._stale
        while fresh:
            pid, device = next(iter(fresh.items()))
            if now - device.at <= STALE_MS:
                break
            del fresh[pid]
            stale[pid] = device
        while stale:
            pid, device = next(iter(stale.items()))
            if now - device.at <= FORGET_MS:
                break
            del stale[pid]

    def _frame(self, now: float, participants: int) -> dict[str, Any]:
        drifts = [d.abs_drift for d in self._fresh.values() if d.abs_drift >= 0]
        drifts.sort()
        p50, p95 = (_percentile(drifts, q) for q in PERCENTILES)
        summary = {
            "devices": max(participants, len(self)),
            "reporting": len(self._fresh),
            "playing": len(drifts),
            "p50_abs_drift_ms": _round(p50, DRIFT_DECIMALS),
            "p95_abs_drift_ms": _round(p95, DRIFT_DECIMALS),
            "worst_abs_drift_ms": _round(drifts[-1] if drifts else None, DRIFT_DECIMALS),
        }
        return {"devices": [d.row(now) for d in self._worst(MAX_ROWS)], "summary": summary}

    def _worst(self, limit: int) -> list[Device]:
        """Stale devices first (longest silent first), then the largest |drift|."""
        rows = [d for d, _ in zip(self._stale.values(), range(limit), strict=False)]
        room = limit - len(rows)
        if room > 0:
            rows += heapq.nlargest(room, self._fresh.values(), key=_BY_ABS_DRIFT)
        return rows
