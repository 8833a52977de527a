"""The sender pool against the plain loop: one frame to N loopback sockets, paired trials.

What ``musicsync.fanpool.SenderPool`` buys a big room's broadcast, measured
so that a shared, noisy machine still gives a reading: N TCP connections on
127.0.0.1, their far ends drained by a separate reader process (one epoll
loop, as the load client of ``bench_fanout.py``), and per trial the same
frame written to all N sockets twice, once by the caller alone (the plain
loop, ``SenderPool(0)``) and once with the pool's threads, in random order
and ``PAUSE_S`` apart. The figure is the wall time of the whole write (the
moment the last socket has its frame), and the ratio pool / plain taken per
trial (both halves of a pair see nearly the same machine), then the median.
CPU is the process's CPU time over the same call (all threads).

    python benchmarks/bench_senders.py [--sizes 2000,5000,10000] [--trials 40] [--threads N]

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import select
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from musicsync.fanpool import SWITCH_INTERVAL_S, SenderPool, default_threads
from musicsync.wsframes import text_frame

HOST = "127.0.0.1"
FRAME_TEXT_BYTES = 355  # a state frame of the fan-out benchmark
PAUSE_S = 0.05  # between the two halves of a trial: the reader drains
READER_EVENTS = 512
READER_RECV = 256 * 1024
BACKLOG = 1024


def reader(port: int, n: int, ready: int) -> None:
    """The far ends: connect ``n`` sockets, say so on ``ready``, read forever."""
    socks = [socket.create_connection((HOST, port)) for _ in range(n)]
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = s
    os.write(ready, b"x")
    while True:
        for fd, _ in ep.poll(1.0, READER_EVENTS):
            with contextlib.suppress(BlockingIOError):
                by_fd[fd].recv(READER_RECV)


def own_send(sock: socket.socket) -> Callable[[bytes], int]:
    return sock.send


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def measure(n: int, trials: int, threads: int, intervals: list[float | None]) -> dict[str, Any]:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(BACKLOG)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader process
        os.close(r)
        try:
            reader(listener.getsockname()[1], n, w)
        finally:
            os._exit(0)
    os.close(w)
    ours = []
    try:
        for _ in range(n):
            sock, _ = listener.accept()
            sock.setblocking(False)
            ours.append(sock)
        os.read(r, 1)
        data = text_frame("x" * FRAME_TEXT_BYTES)
        pools = {"plain": SenderPool(0)}
        for interval in intervals:
            pools[pool_name(interval)] = SenderPool(threads, 1, interval)
        wall: dict[str, list[float]] = {name: [] for name in pools}
        cpu: dict[str, list[float]] = {name: [] for name in pools}
        ratios: dict[str, list[float]] = {name: [] for name in pools if name != "plain"}
        misses = 0
        for _ in range(trials):
            order = list(pools.items())
            random.shuffle(order)
            got = {}
            for name, senders in order:
                time.sleep(PAUSE_S)
                c0, t0 = time.process_time(), time.perf_counter()
                misses += len(senders.send(data, ours, own_send))
                got[name] = time.perf_counter() - t0
                cpu[name].append(time.process_time() - c0)
                wall[name].append(got[name])
            for name in ratios:
                ratios[name].append(got[name] / got["plain"])
        for senders in pools.values():
            senders.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for sock in ours:
            sock.close()
        listener.close()
        os.close(r)
    row: dict[str, Any] = {"n": n, "trials": trials, "threads": threads, "misses": misses}
    for name in wall:
        ms = [x * 1e3 for x in wall[name]]
        row[name] = {
            "median_ms": round(statistics.median(ms), 2),
            "p10_ms": round(percentile(ms, 10), 2),
            "p90_ms": round(percentile(ms, 90), 2),
            "cpu_us_per_send": round(statistics.median(cpu[name]) * 1e6 / n, 2),
        }
        if name in ratios:
            row[name]["ratio_median"] = round(statistics.median(ratios[name]), 3)
            row[name]["ratio_p10_p90"] = [
                round(percentile(ratios[name], 10), 3),
                round(percentile(ratios[name], 90), 3),
            ]
    return row


def pool_name(interval: float | None) -> str:
    """'pool' (the GIL switch interval left alone) or e.g. 'pool@100us'."""
    return "pool" if interval is None else f"pool@{interval * 1e6:g}us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000", help="socket counts, e.g. 2000,5000,10000")
    parser.add_argument("--trials", type=int, default=40, help="paired trials per size (40)")
    parser.add_argument(
        "--threads", type=int, default=max(1, default_threads()), help="sender threads"
    )
    parser.add_argument(
        "--switch-intervals",
        default="none" if SWITCH_INTERVAL_S is None else str(SWITCH_INTERVAL_S),
        help="pools to compare, by the GIL switch interval they set while sharing a broadcast:"
        " seconds, or 'none' (left alone); default: the pool's own setting. E.g. none,0.0001",
    )
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load_start = os.getloadavg()
    intervals: list[float | None] = [
        None if x == "none" else float(x) for x in args.switch_intervals.split(",")
    ]
    rows = [measure(int(n), args.trials, args.threads, intervals) for n in args.sizes.split(",")]
    size = len(text_frame("x" * FRAME_TEXT_BYTES))
    print(f"\nOne {size}-byte frame to N loopback sockets; {args.threads} sender thread(s)")
    print(f"{'N':>6} {'senders':>14} {'ms':>7} {'x plain':>7} {'p10-p90':>11} {'cpu us/send':>11}")
    for row in rows:
        for name in ["plain", *(pool_name(x) for x in intervals)]:
            fig = row[name]
            ratio = fig.get("ratio_median")
            spread = "-" if ratio is None else "{:.2f}-{:.2f}".format(*fig["ratio_p10_p90"])
            print(
                f"{row['n']:>6} {name:>14} {fig['median_ms']:>7.1f} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>7} {spread:>11} "
                f"{fig['cpu_us_per_send']:>11.2f}"
            )
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.2f} (start {load_start[0]:.2f}); ms = median wall time")
    summary = {
        "bench": "senders",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "rows": rows,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
