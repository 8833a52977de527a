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

Several nodes (``--redis``): each node knows only the devices connected to it.
Once a second, and only when its own devices reported since, a node shares a
*digest* of its part of the room (``poll_cluster``): its worst ``MAX_ROWS``
rows, its counts, and ``DRIFT_SAMPLE`` evenly spaced values of its sorted
|drift| for the percentiles: bounded whatever the room's size. A node with
hosts or co-hosts merges the digests it holds (``note_remote``; one per node,
dropped after ``STALE_MS``) with its own (``merge``): the worst rows of all,
summed counts, percentiles over the weighted samples (exact while a node has
at most ``DRIFT_SAMPLE`` playing devices).
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
# A node's digest carries this many values of its sorted |drift| (all of them
# if it has fewer playing devices): the merged percentiles' resolution.
DRIFT_SAMPLE = 100


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
        # Other nodes' digests of this room, by node (several nodes only).
        self._remote: dict[str, dict[str, Any]] = {}
        self._remote_pending = False  # a digest came in since the last frame

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
        if self._pending or self._remote_pending:
            return self._last_frame + HEALTH_PERIOD_MS
        return None

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

    # -- several nodes -----------------------------------------------------------------

    def poll_cluster(
        self, now: float, participants: int, seated: int
    ) -> tuple[dict[str, Any] | None, dict[str, Any]] | None:
        """Like ``poll``, with other nodes: (this node's digest, if its own
        devices reported since the last one, else None; the merged frame's payload).

        ``seated`` is how many clients are connected to this node.
        """
        due = self.next_due()
        if due is None or now < due:
            return None
        news = self._pending
        self._pending = self._remote_pending = False
        self._last_frame = now
        self._age(now)
        mine = self._digest(now, seated)
        for node in [n for n, d in self._remote.items() if now - d["at"] > STALE_MS]:
            del self._remote[node]
        return (mine if news else None), merge([mine, *self._remote.values()], now, participants)

    def note_remote(self, node: str, digest: dict[str, Any]) -> bool:
        """Another node's digest of this room (the newest replaces its last); False
        if it cannot be read."""
        if not _readable(digest):
            return False
        self._remote[node] = digest
        self._remote_pending = True
        return True

    def _digest(self, now: float, seated: int) -> dict[str, Any]:
        drifts = sorted(d.abs_drift for d in self._fresh.values() if d.abs_drift >= 0)
        return {
            "at": now,
            "rows": [d.row(now) for d in self._worst(MAX_ROWS)],
            "known": len(self),
            "seated": seated,
            "reporting": len(self._fresh),
            "playing": len(drifts),
            "sample": [round(x, DRIFT_DECIMALS) for x in _sample(drifts, DRIFT_SAMPLE)],
            "worst": _round(drifts[-1] if drifts else None, DRIFT_DECIMALS),
        }

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


def _sample(ordered: list[float], k: int) -> list[float]:
    """``k`` evenly spaced values of an ascending list (all of it if shorter)."""
    n = len(ordered)
    if n <= k:
        return ordered
    return [ordered[int((i + 0.5) * n / k)] for i in range(k)]


_DIGEST_NUMBERS = ("at", "known", "seated", "reporting", "playing")


def _readable(digest: Any) -> bool:
    if not isinstance(digest, dict):
        return False
    if not all(isinstance(digest.get(k), (int, float)) for k in _DIGEST_NUMBERS):
        return False
    rows, sample = digest.get("rows"), digest.get("sample")
    if not isinstance(rows, list) or not isinstance(sample, list):
        return False
    numbers_ok = all(isinstance(x, (int, float)) for x in sample)
    rows_ok = all(isinstance(r, dict) and isinstance(r.get("age_ms"), (int, float)) for r in rows)
    worst = digest.get("worst")
    return numbers_ok and rows_ok and (worst is None or isinstance(worst, (int, float)))


def _row_order(row: dict[str, Any]) -> tuple[int, float]:
    """Stale rows first (longest silent first), then the largest |drift|."""
    if row["age_ms"] > STALE_MS:
        return (1, row["age_ms"])
    drift = row.get("drift_ms")
    return (0, -1.0 if drift is None else abs(drift))


def _weighted_percentile(samples: list[tuple[float, float]], q: float) -> float | None:
    """Nearest-rank percentile of (value, weight) pairs."""
    total = sum(w for _, w in samples)
    if total <= 0:
        return None
    rank = max(q * total, min(w for _, w in samples))
    seen = 0.0
    for value, weight in sorted(samples):
        seen += weight
        if seen >= rank - 1e-9:
            return value
    return samples[-1][0]


def merge(digests: list[dict[str, Any]], now: float, participants: int) -> dict[str, Any]:
    """One ``health`` payload from the nodes' digests (the first is this node's own).

    Rows age by the time since their digest was made; the frame keeps the
    ``MAX_ROWS`` worst of all. O(nodes x (MAX_ROWS + DRIFT_SAMPLE)).
    """
    rows: list[dict[str, Any]] = []
    samples: list[tuple[float, float]] = []
    worst: float | None = None
    for digest in digests:
        lag = max(0.0, now - digest["at"])
        rows += [{**row, "age_ms": round(row["age_ms"] + lag)} for row in digest["rows"]]
        sample = digest["sample"]
        if sample:
            weight = digest["playing"] / len(sample)
            samples += [(float(x), weight) for x in sample]
        if digest["worst"] is not None and (worst is None or digest["worst"] > worst):
            worst = digest["worst"]
    rows = heapq.nlargest(MAX_ROWS, rows, key=_row_order)
    p50, p95 = (_weighted_percentile(samples, q) for q in PERCENTILES)
    known = sum(d["known"] for d in digests)
    summary = {
        "devices": max(participants, known, sum(d["seated"] for d in digests)),
        "reporting": sum(d["reporting"] for d in digests),
        "playing": sum(d["playing"] for d in digests),
        "p50_abs_drift_ms": _round(p50, DRIFT_DECIMALS),
        "p95_abs_drift_ms": _round(p95, DRIFT_DECIMALS),
        "worst_abs_drift_ms": _round(worst, DRIFT_DECIMALS),
    }
    return {"devices": rows, "summary": summary}
