"""Cost of the device-health bookkeeping (musicsync/health.py) per report and per frame.

Every device of a room reports every 2 s; the room makes at most one ``health``
frame a second. For rooms of 100 to 10 000 devices this replays 20 s of that
traffic against ``RoomHealth`` (sans-IO: no server, no sockets) and prints the
server CPU per report (``report`` and a ``poll`` with nothing due), per frame
(a ``poll`` that builds one: mean and median) and in all, amortised over the
reports, plus the frame's size in rows and bytes. Timings are wall-clock on a
shared machine: run it twice and take the lower figures.
A table, then one JSON line with every figure.

    python3 benchmarks/bench_health.py [--sizes 100,1000,10000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicsync.health import Device, RoomHealth
from musicsync.protocol import Report, encode

REPORT_PERIOD_MS = 2000.0
T0 = 1_700_000_000_000.0


def run(n: int, seconds: float, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    health = RoomHealth()
    reports = [
        Report(
            drift_ms=rng.gauss(0.0, 1.5),
            rtt_ms=rng.uniform(2, 80),
            offset_ms=rng.uniform(-5000, 5000),
            engine=rng.choice(("webaudio", "element")),
            output_latency_ms=rng.uniform(5, 200),
            latency_offset_ms=rng.choice((0.0, 0.0, 0.0, 180.0)),
            drift_ppm=rng.gauss(0, 20),
            browser=rng.choice(("Chrome", "Firefox", "Safari")),
        )
        for _ in range(256)
    ]
    step = REPORT_PERIOD_MS / n
    total = int(seconds * 1000 / step)
    report_s = 0.0
    frame_times: list[float] = []
    rows = frame_bytes = 0
    clock = time.perf_counter
    for k in range(total):
        now = T0 + k * step
        device = Device.from_report(f"d{k % n}", f"listener {k % n}", reports[k % 256], now)
        t = clock()
        health.report(device)
        t1 = clock()
        payload = health.poll(now, n)
        t2 = clock()
        report_s += t1 - t
        if payload is None:
            report_s += t2 - t1  # a poll that found nothing due is part of a report's cost
            continue
        frame_times.append(t2 - t1)
        rows = max(rows, len(payload["devices"]))
        frame_bytes = max(frame_bytes, len(encode("health", **payload)))
    frame_s = sum(frame_times)
    return {
        "devices": n,
        "reports": total,
        "frames": len(frame_times),
        "report_us": report_s / total * 1e6,
        "frame_ms": frame_s / max(len(frame_times), 1) * 1e3,
        "frame_median_ms": statistics.median(frame_times) * 1e3 if frame_times else 0.0,
        "amortised_us_per_report": (report_s + frame_s) / total * 1e6,
        "max_rows": rows,
        "max_frame_bytes": frame_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    results = [run(int(n), args.seconds) for n in args.sizes.split(",")]
    head = (
        f"{'devices':>8} {'reports':>8} {'frames':>6} {'µs/report':>10} "
        f"{'ms/frame':>9} {'(median)':>9} {'µs/report (all)':>16} {'rows':>5} {'bytes':>6}"
    )
    print(head)
    for r in results:
        print(
            f"{r['devices']:>8} {r['reports']:>8} {r['frames']:>6} {r['report_us']:>10.2f} "
            f"{r['frame_ms']:>9.2f} {r['frame_median_ms']:>9.2f} "
            f"{r['amortised_us_per_report']:>16.2f} "
            f"{r['max_rows']:>5} {r['max_frame_bytes']:>6}"
        )
    print(json.dumps({"bench": "health", "results": results}))


if __name__ == "__main__":
    main()
