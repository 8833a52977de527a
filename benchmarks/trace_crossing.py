"""Where a change's time goes on its way across Redis: timestamps in two traced nodes.

A debug run, not a benchmark of record: a real ``redis-server``, two
``musicsync serve --redis`` nodes started through this script (``--node``
mode wraps a few functions of ``musicsync.cluster`` and ``musicsync.hub``
and appends a CLOCK_MONOTONIC stamp per event to a file; the server is
otherwise unchanged), N listeners on each, the host on node A, and the host's
changes. Per change, the median over changes of each stage's time from the
host's send:

* A: the change reaches the backend, the compare-and-set starts and returns
  (the script also publishes), A's fan-out starts and ends;
* B: the message reaches ``on_message`` (coredis has read it), is decoded and
  queued, the pipe adopts it, B's fan-out starts and ends, the replica is
  rebuilt;

and the listeners' p50 per node from the load client.

    python3 benchmarks/trace_crossing.py [--size 300] [--changes 20]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_cluster as bc  # siblings (benchmarks/ is on sys.path when run)
import bench_fanout as bf

_VERSION = re.compile(r'"version":(\d+)')


def install(trace_path: str) -> None:
    """Wrap the crossing path's functions so each appends ``event version t``."""
    from musicsync import cluster, hub

    out = open(trace_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    clock = time.monotonic

    def mark(event: str, version: Any) -> None:
        out.write(f"{event} {version} {clock():.6f}\n")

    def state_version(effects: list[Any]) -> Any:
        for e in effects:
            if isinstance(e, cluster.BroadcastState):
                return e.state.get("version")
        return None

    change = cluster.RedisBackend.change

    async def traced_change(self: Any, entry: Any, client: Any, op: Any) -> None:
        mark("change_in", "-")
        await change(self, entry, client, op)

    commit = cluster.RoomPipe._commit

    async def traced_commit(self: Any, effects: list[Any], token: str) -> Any:
        v = state_version(effects)
        mark("cas_start", v)
        try:
            return await commit(self, effects, token)
        finally:
            mark("cas_end", v)

    on_message = cluster.RedisBackend.on_message

    def traced_on_message(self: Any, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        found = _VERSION.search(text)
        v = found.group(1) if found else None
        mark("msg_in", v)
        on_message(self, data)
        mark("msg_out", v)

    adopt = cluster.RoomPipe.adopt

    def traced_adopt(self: Any, rev: int, value: Any, effects: Any, *, resync: bool) -> None:
        v = state_version(effects)
        mark("adopt", v)
        adopt(self, rev, value, effects, resync=resync)
        mark("adopt_end", v)

    fan_out_state = hub.Hub._fan_out_state

    def traced_fan_out_state(self: Any, entry: Any, effect: Any) -> None:
        v = effect.state.get("version")
        mark("fan_start", v)
        lacking = sum(c.queue_rev < effect.queue_rev for c in entry.clients.values())
        out.write(f"# fan {v} clients {len(entry.clients)} lacking {lacking}\n")
        fan_out_state(self, entry, effect)
        mark("fan_end", v)

    cluster.RedisBackend.change = traced_change  # type: ignore[method-assign]
    cluster.RoomPipe._commit = traced_commit  # type: ignore[method-assign]
    cluster.RedisBackend.on_message = traced_on_message  # type: ignore[method-assign]
    cluster.RoomPipe.adopt = traced_adopt  # type: ignore[method-assign]
    hub.Hub._fan_out_state = traced_fan_out_state  # type: ignore[method-assign]


class TracedNode(bc.Node):
    """A ``--redis`` node started through this script's ``--node`` mode."""

    @property
    def trace(self) -> Path:
        return self.dir / "trace.txt"

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("-m")  # [python, -m, musicsync, serve, ...]
        return [cmd[0], str(Path(__file__).resolve()), "--node", str(self.trace), *cmd[at + 2 :]]


def read_trace(path: Path, changes: int) -> dict[tuple[str, str], float]:
    """(event, version) -> first time; the last ``changes`` change_in events
    (the measured changes, after the set-up) as ``#0``, ``#1``, ..."""
    out: dict[tuple[str, str], float] = {}
    lines = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    arrivals = [float(t) for event, _v, t in lines if event == "change_in"][-changes:]
    for i, t in enumerate(arrivals):
        out[("change_in", f"#{i}")] = t
    for event, version, t in lines:
        if event != "change_in":
            out.setdefault((event, version), float(t))
    return out


STAGES_A = ("change_in", "cas_start", "msg_in", "msg_out", "cas_end", "fan_start", "fan_end")
STAGES_B = ("msg_in", "msg_out", "adopt", "fan_start", "fan_end", "adopt_end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=300, help="listeners per node (300)")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=bf.CHANGE_INTERVAL_S)
    parser.add_argument("--source", type=Path, default=bf.REPO, help="tree to import from")
    args = parser.parse_args(argv)
    bf.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="trace-crossing-") as tmp:
        work = Path(tmp)
        redis, url = bc.start_redis(work)
        nodes: list[bf.Server] = []
        loads: list[bf.Load] = []
        try:
            a = TracedNode(args.source, work, "a", url)
            b = TracedNode(args.source, work, "b", url)
            nodes += [a, b]
            for node in nodes:
                node.start()
            la, lb = bf.Load(1, a.port, bc.ROOM), bf.Load(1, b.port, bc.ROOM)
            loads += [la, lb]
            v0 = bc.host_with_track(la)
            bc.seat([la, lb], args.size, 100, 120.0)
            for load in loads:
                load.call(0, {"cmd": "arm", "v0": v0, "count": args.changes})
            msgs = bf.change_msgs(args.changes)
            sends = la.call(0, {"cmd": "changes", "msgs": msgs, "interval": args.interval})
            for load in loads:
                load.call(0, {"cmd": "wait", "version": v0 + args.changes, "timeout": 10})
            reports = [load.call(0, {"cmd": "report", "sends": sends["sends"]}) for load in loads]
            p50 = [bf.percentile(rep["delays"], 50) for rep in reports]
        finally:
            for load in loads:
                load.close()
            for node in nodes:
                node.stop()
            redis.kill()
            redis.wait()
        ta, tb = read_trace(a.trace, args.changes), read_trace(b.trace, args.changes)
        for tag, node in (("A", a), ("B", b)):
            fans = [ln.split() for ln in node.trace.read_text().splitlines() if ln.startswith("#")]
            lacking = [int(f[-1]) for f in fans[-args.changes :]]
            print(f"{tag}: states sent with the queue (client lacking it) per change: {lacking}")
    rows: dict[str, list[float]] = {}
    for i, sent in enumerate(sends["sends"]):
        v = str(v0 + 1 + i)
        for node, trace, stages in (("A", ta, STAGES_A), ("B", tb, STAGES_B)):
            for stage in stages:
                t = trace.get((stage, f"#{i}" if stage == "change_in" else v))
                if t is not None:
                    rows.setdefault(f"{node} {stage}", []).append((t - sent) * 1000)
    print(f"{args.size} listeners per node, {args.changes} changes: ms from the host's send")
    print(f"  {'stage':<14} {'median':>8} {'min':>8} {'max':>8}  (changes seen)")
    for key, values in rows.items():
        print(
            f"  {key:<14} {statistics.median(values):>8.2f} {min(values):>8.2f}"
            f" {max(values):>8.2f}  ({len(values)})"
        )
    print(f"  listeners p50: A {p50[0]:.2f}, B {p50[1]:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--node":
        install(sys.argv[2])
        from musicsync.cli import main as serve

        sys.exit(serve(sys.argv[3:]))
    sys.exit(main())
