"""Calibration by microphone and by ear: signal slots, the open calibration (sans-IO).

A host or co-host names a measuring device (a page with a microphone). The room
gives every other device a time slot and sends one ``calibration`` message (the
same payload to the measuring device, the devices and the room's hosts): in
round ``r`` the device in slot ``k`` plays its signal at server time
``start_at + (r * len(slots) + k) * slot_ms``, as heard (its latency offset
applied, like music). The measuring device records them all, and only it may
answer with ``calibration_result`` for that calibration, once, until a while
after the last slot. The page does the signal processing; docs/sync.md says why
the microphone's unknown input latency cancels.

Tick mode ("by ear") needs no schedule: every device ticks at server times that
are multiples of ``TICK_PERIOD_MS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# One slot per device and round: the signal (80 ms) plus what a device's sound
# may be late or early by and still land in its own slot (see docs/sync.md).
CALIBRATION_SLOT_MS = 1200.0
# Slot 0 starts this long after the lead (which covers the largest device
# offset): time for the measuring page to open its microphone.
CALIBRATION_PREPARE_MS = 2500.0
# The measuring device may send its result until this long after the last slot
# (it analyses the recording first; a phone may take a few seconds).
CALIBRATION_RESULT_GRACE_MS = 60_000.0
# Tick mode: every device ticks at each multiple of this period of server time.
TICK_PERIOD_MS = 1000.0
# Tick mode ends by itself this long after it was turned on (the page's
# TICK_MODE_MAX_MS): a page that joins later ticks only until then.
TICK_MODE_MAX_MS = 10 * 60_000.0


@dataclass(frozen=True, slots=True)
class Calibration:
    """The room's open calibration: who measures, which devices, until when a result counts."""

    id: str
    mic: str
    devices: tuple[str, ...]
    until: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "mic": self.mic, "devices": list(self.devices), "until": self.until}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            str(d["id"]), str(d["mic"]), tuple(str(x) for x in d["devices"]), float(d["until"])
        )


def schedule(
    cal_id: str, mic: str, by: str, devices: list[str], start_at: float, rounds: int
) -> tuple[Calibration, dict[str, Any]]:
    """The open record and the ``calibration`` payload for ``devices`` in slot order."""
    end = start_at + rounds * len(devices) * CALIBRATION_SLOT_MS
    record = Calibration(cal_id, mic, tuple(devices), end + CALIBRATION_RESULT_GRACE_MS)
    payload = {
        "id": cal_id,
        "mic": mic,
        "by": by,
        "slots": {pid: k for k, pid in enumerate(devices)},
        "start_at": start_at,
        "slot_ms": CALIBRATION_SLOT_MS,
        "rounds": rounds,
    }
    return record, payload
