"""Cross-node fan-out (``just bench --redis``): two nodes sharing a room through Redis vs one.

A real ``redis-server`` (AOF, fsync every second) on a free port, and for each
listener count N (5 000 by default; ``--sizes``):

* one node alone (``musicsync serve``, SQLite: today's server) with N
  listeners, the host on it, nothing else running: the old baseline, kept
  for comparison ("lone node");
* two lone nodes side by side (two SQLite processes, N listeners each, each
  its own room and host, both hosts' changes sent at the same moments): the
  fair baseline ("side by side"), with the same CPU contention as the cluster
  run (two servers and two load processes fanning out 2N frames per change on
  the same cores);
* two nodes (``musicsync serve --redis``) with N listeners on each, the host
  on node A. Every change the host makes is committed to Redis by A, which
  then delivers it to its own listeners; B gets it through pub/sub and
  delivers it to its listeners.

The load is ``fanout_client.py`` (one process per node, CLOCK_MONOTONIC in
every process): the delay from the host's send to each listener's arrival of
that version. Prints p50 and p99 per node and what crossing nodes adds at p50
(B against the side-by-side pair); goal: < 5 ms. Then one JSON line.

    python benchmarks/bench_cluster.py [--sizes 5000] [--changes 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_fanout as bf  # a sibling script (benchmarks/ is on sys.path when run)

REDIS_START_TIMEOUT_S = 10.0
CROSS_NODE_GOAL_MS = 5.0  # crossing nodes adds less than this at p50
# Hosts in separate load processes start their changes this long after the
# driver asks (enough for both to have read the command), at the same moment.
SAME_MOMENT_LEAD_S = 0.2
ROOM = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((bf.HOST, 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (just setup installs it)")
    port = free_port()
    where = workdir / "redis"
    where.mkdir()
    cmd = [exe, "--port", str(port), "--bind", bf.HOST, "--dir", str(where), "--save", ""]
    cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = bf.clock() + REDIS_START_TIMEOUT_S
    while True:
        try:
            with socket.create_connection((bf.HOST, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://{bf.HOST}:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or bf.clock() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)


class Node(bf.Server):
    """``musicsync serve --redis``: one node of the cluster."""

    def __init__(self, source: Path, workdir: Path, tag: str, redis_url: str) -> None:
        super().__init__("musicsync", source, workdir, tag)
        self.redis_url = redis_url

    def command(self) -> list[str]:
        return [*super().command(), "--redis", self.redis_url]


def seat(loads: list[bf.Load], n: int, batch: int, budget: float) -> int:
    cmd = {"cmd": "seat", "n": n, "batch": batch, "budget": budget}
    for load in loads:
        load.send(0, cmd)
    seated = sum(load.recv(0)["seated"] for load in loads)
    for load in loads:
        load.send(0, {"cmd": "quiet", "ms": bf.QUIET_MS, "timeout": bf.QUIET_TIMEOUT_S})
    for load in loads:
        load.recv(0)
    return seated


def fan_out(
    loads: list[bf.Load], hosts: list[bf.Load], count: int, interval: float, v0: list[int]
) -> list[dict[str, Any]]:
    """``count`` changes from each host, every host's sent at the same moments;
    per load: its listeners' delays from the sends of its room's host (the
    only host, or the host in that load)."""
    if len(hosts) == 1:  # one room: every load counts from the one host
        v0 = v0 * len(loads)
    for load, v in zip(loads, v0, strict=True):
        load.call(0, {"cmd": "arm", "v0": v, "count": count})
    msgs = bf.change_msgs(count)
    at = bf.clock() + SAME_MOMENT_LEAD_S
    for host in hosts:
        host.send(0, {"cmd": "changes", "msgs": msgs, "interval": interval, "at": at})
    sends = [host.recv(0)["sends"] for host in hosts]
    if len(hosts) == 1:
        sends = sends * len(loads)
    for load, v in zip(loads, v0, strict=True):
        load.send(0, {"cmd": "wait", "version": v + count, "timeout": bf.DRAIN_TIMEOUT_S})
    waits = [load.recv(0) for load in loads]
    out = []
    for load, waited, mine in zip(loads, waits, sends, strict=True):
        rep = load.call(0, {"cmd": "report", "sends": mine})
        delays = rep["delays"]
        out.append(
            {
                "listeners": rep["listeners"],
                "complete": waited["ok"] and rep["missing"] == 0,
                "missing": rep["missing"],
                "p50_ms": bf.rnd(bf.percentile(delays, 50)),
                "p99_ms": bf.rnd(bf.percentile(delays, 99)),
                "max_ms": bf.rnd(max(delays, default=float("nan"))),
                "close_codes": rep["close_codes"],
            }
        )
    return out


def host_with_track(load: bf.Load) -> int:
    host = load.call(0, {"cmd": "host"})
    if not host["ok"]:
        raise RuntimeError(f"host not seated: {host}")
    track = load.call(0, {"cmd": "changes", "msgs": [bf.TRACK], "interval": 0, "echo": True})
    if not track["echoed"]:
        raise RuntimeError("the host never got the state of its set_track")
    load.call(0, {"cmd": "quiet", "ms": bf.QUIET_MS, "timeout": bf.QUIET_TIMEOUT_S})
    return int(track["host_version"])


def stop_all(loads: list[bf.Load], servers: list[bf.Server]) -> None:
    """End a set-up: its load clients first, then its servers."""
    for load in loads:
        load.close()
    for server in servers:
        server.stop()


def measure(args: argparse.Namespace, workdir: Path, redis_url: str, n: int) -> dict[str, Any]:
    row: dict[str, Any] = {"n_per_node": n}
    servers: list[bf.Server] = []
    loads: list[bf.Load] = []
    try:  # the baseline: one node, no Redis
        single = bf.Server("musicsync", args.source, workdir, f"single-{n}")
        servers.append(single)
        single.start()
        load = bf.Load(1, single.port, ROOM)
        loads.append(load)
        v0 = host_with_track(load)
        row["single_seated"] = seat([load], n, args.batch, args.seat_budget)
        row["single"] = fan_out([load], [load], args.changes, args.interval, [v0])[0]
    finally:
        stop_all(loads, servers)
    servers, loads = [], []
    try:  # the fair baseline: two lone nodes side by side, each with its room and host
        pair = [bf.Server("musicsync", args.source, workdir, f"pair-{x}-{n}") for x in "ab"]
        servers += pair
        for server in pair:
            server.start()
        loads += [bf.Load(1, server.port, ROOM) for server in pair]
        v0s = [host_with_track(load) for load in loads]
        row["pair_seated"] = seat(loads, n, args.batch, args.seat_budget)
        row["pair_a"], row["pair_b"] = fan_out(loads, loads, args.changes, args.interval, v0s)
    finally:
        stop_all(loads, servers)
    servers, loads = [], []
    try:  # two nodes through Redis, the host on A
        a = Node(args.source, workdir, f"node-a-{n}", redis_url)
        b = Node(args.source, workdir, f"node-b-{n}", redis_url)
        servers += [a, b]
        a.start()
        b.start()
        # A room of its own per size: the last size's room is still in Redis
        # (its host's seat held), and a host joining it would not be host.
        room = f"{ROOM}-{n}"
        la = bf.Load(1, a.port, room)
        lb = bf.Load(1, b.port, room)
        loads += [la, lb]
        v0 = host_with_track(la)
        row["cluster_seated"] = seat([la, lb], n, args.batch, args.seat_budget)
        row["node_a"], row["node_b"] = fan_out([la, lb], [la], args.changes, args.interval, [v0])
        row["server_log_errors"] = sum(s.log_count("Traceback") for s in servers)
        row["refused_changes"] = sum(s.log_count("refused after") for s in servers)
        row["redis_unavailable"] = sum(s.log_count("Redis unavailable") for s in servers)
    finally:
        stop_all(loads, servers)
    # The fair baseline: the mean of the pair's two p50s (N listeners a node, as A and B).
    fair = (row["pair_a"]["p50_ms"] + row["pair_b"]["p50_ms"]) / 2
    row["side_by_side_p50_ms"] = bf.rnd(fair)
    row["a_adds_p50_ms"] = bf.rnd(row["node_a"]["p50_ms"] - fair)
    row["b_adds_p50_ms"] = bf.rnd(row["node_b"]["p50_ms"] - fair)
    row["b_over_a_p50_ms"] = bf.rnd(row["node_b"]["p50_ms"] - row["node_a"]["p50_ms"])
    lone = row["single"]["p50_ms"]
    row["a_adds_over_lone_p50_ms"] = bf.rnd(row["node_a"]["p50_ms"] - lone)
    row["b_adds_over_lone_p50_ms"] = bf.rnd(row["node_b"]["p50_ms"] - lone)
    row["goal_cross_node_p50"] = row["b_adds_p50_ms"] < CROSS_NODE_GOAL_MS
    return row


ROWS = (
    ("lone node (alone on the box)", "single"),
    ("side by side: node 1", "pair_a"),
    ("side by side: node 2", "pair_b"),
    ("Redis: node A (host)", "node_a"),
    ("Redis: node B (crossed)", "node_b"),
)


def print_row(row: dict[str, Any]) -> None:
    print(f"\n{row['n_per_node']} listeners per node (p50 / p99 / max, ms from the host's send)")
    for label, key in ROWS:
        r = row[key]
        print(f"  {label:<30} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}")
    ok = "yes" if row["goal_cross_node_p50"] else "NO"
    print(
        f"  crossing nodes adds {row['b_adds_p50_ms']} ms at p50 over two lone nodes side by"
        f" side ({row['side_by_side_p50_ms']} ms; A: {row['a_adds_p50_ms']} ms);"
        f" goal < {CROSS_NODE_GOAL_MS:g} ms: {ok}"
    )
    print(
        f"  B over A: {row['b_over_a_p50_ms']} ms; over the lone node (no contention, not"
        f" fair): A {row['a_adds_over_lone_p50_ms']} ms, B {row['b_adds_over_lone_p50_ms']} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000", help="listeners per node, e.g. 1000,5000")
    parser.add_argument("--changes", type=int, default=20, help="host changes per size (20)")
    parser.add_argument("--interval", type=float, default=bf.CHANGE_INTERVAL_S)
    parser.add_argument("--batch", type=int, default=100, help="connections in flight (100)")
    parser.add_argument("--seat-budget", type=float, default=120.0, help="seconds to seat")
    parser.add_argument("--source", type=Path, default=bf.REPO, help="tree to import from")
    args = parser.parse_args(argv)
    bf.raise_fd_limit()
    load_start = os.getloadavg()
    t0 = bf.clock()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        redis, url = start_redis(Path(tmp))
        try:
            for n in (int(x) for x in args.sizes.split(",") if x.strip()):
                row = measure(args, Path(tmp), url, n)
                print_row(row)
                rows.append(row)
        finally:
            redis.kill()
            redis.wait()
    elapsed = bf.clock() - t0
    print(f"\nelapsed {elapsed:.1f} s; load average {os.getloadavg()[0]:.2f}")
    print(
        json.dumps(
            {
                "bench": "cluster",
                "elapsed_s": bf.rnd(elapsed, 1),
                "cpus": os.cpu_count(),
                "loadavg_start": [bf.rnd(x, 2) for x in load_start],
                "rows": rows,
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
