"""Server fan-out benchmark: musicsync against a reference broadcaster, at festival scale.

For each listener count N (500, 2 000, 5 000, 10 000; ``--sizes``) and each
server, a fresh server subprocess on 127.0.0.1:

* ``musicsync serve`` (the real CLI, limits raised for one address), and
* ``reference_broadcaster.py`` (the ``websockets`` asyncio server with
  ``websockets.broadcast``), started and measured the same way in the same run.

The load lives in separate client processes (``fanout_client.py``: raw
non-blocking sockets and one epoll loop each; one process by default, as the
server takes the other core). The host connects and sets a track; N listeners
are seated (a listener is seated when its welcome arrives); then the host sends
20 play/pause changes 500 ms apart. For every listener and change: the delay
from the host's send to the arrival of the state with that version (one
monotonic clock, CLOCK_MONOTONIC, for every process). Server CPU per delivered
state frame is the server's utime+stime (``/proc/<pid>/stat``) over the change
phase divided by the state frames delivered; memory per idle connection is the
server's VmRSS after the N are seated and quiet, minus before, over N.

Scenario 4 (stalled listeners) runs on musicsync only, as before: 100
listeners of which 5 never read (tiny ``SO_RCVBUF``, never read after the 101
response), their pipes filled first; the p95 of the others is compared with a
round without stalled listeners, and the server must drop the stalled ones.

Median of 3 runs (``--runs``); each run measures both servers at every size
(in alternating order). Prints a table, then one JSON line with every figure.

    python benchmarks/bench_fanout.py [--quick] [--runs 3] [--sizes 500,2000,5000,10000]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
KINDS = ("musicsync", "reference")
clock = time.monotonic  # CLOCK_MONOTONIC, as in the client processes

SERVER_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLIENT_REPLY_TIMEOUT_S = 180.0  # one command of a client process
READ_BYTES = 1 << 20
QUIET_MS = 300  # "settled": no listener received anything for this long
QUIET_TIMEOUT_S = 60.0
RSS_SETTLE_S = 0.3  # after the room is quiet, before VmRSS is read
DRAIN_TIMEOUT_S = 10.0  # after the last change, for everyone to get it
CHANGE_INTERVAL_S = 0.5
TRACK = {
    "type": "set_track",
    "url": "/media/festival-main-stage-opening-set-2025.mp3",
    "title": "Main stage, opening set (live)",
    "duration": 3600.0,
}
# Scenario 4: stalled listeners
STALL_LISTENERS = 100
STALLED = 5
PRIME_FRAMES = 20  # big states to fill a stalled listener's pipe (~2.3 KB each)
PRIME_INTERVAL_S = 0.05  # 20/s: the control bucket (10/s, burst 20) allows 20 in 1 s
STALL_SEEK_INTERVAL_S = 0.2
DROP_WATCH_S = 12.0  # more than the server's 10 s send timeout
# The issue's goals
GOAL_CPU_US = 15.0
GOAL_P99_5000_MS = 60.0
GOAL_SEAT_10000_S = 20.0
GOAL_P99_10000_MS = 150.0
GOAL_IDLE_KIB = 30.0
GOAL_RATIO, GOAL_RATIO_NEXT = 1.0, 0.5


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rnd(x: float | None, digits: int = 2) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


def median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far, every core (/proc/stat:
    all but idle and iowait; steal counts as busy: a vCPU we did not get)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def threads_cpu_s(pid: int) -> tuple[float, float, int]:
    """(CPU seconds of the main thread, of all other threads, involuntary
    context switches of all threads) of process ``pid``."""
    main = others = 0.0
    preempted = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
                if int(tid) == pid:
                    main += cpu
                else:
                    others += cpu
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                m = re.search(r"nonvoluntary_ctxt_switches:\s*(\d+)", status)
                preempted += int(m.group(1)) if m else 0
    return main, others, preempted


def raise_fd_limit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class LineReader:
    """Lines of a child's stdout, each within a timeout (TimeoutError / EOFError)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def line(self, timeout: float) -> str:
        deadline = clock() + timeout
        chunks = [self.buf]
        while b"\n" not in chunks[-1]:
            left = deadline - clock()
            if left <= 0:
                self.buf = b"".join(chunks)
                raise TimeoutError(f"no reply within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, READ_BYTES)
                if not chunk:
                    raise EOFError(f"process {self.proc.pid} exited ({self.proc.poll()})")
                chunks.append(chunk)
        line, _, self.buf = b"".join(chunks).partition(b"\n")
        return line.decode(errors="replace")


# -- servers ---------------------------------------------------------------------


class Server:
    """One server subprocess: musicsync or the reference broadcaster."""

    def __init__(self, kind: str, source: Path, workdir: Path, tag: str) -> None:
        self.kind = kind
        self.source = source
        self.dir = workdir / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def command(self) -> list[str]:
        if self.kind == "reference":
            return [sys.executable, str(HERE / "reference_broadcaster.py"), "--port", "0"]
        (self.dir / "media").mkdir(exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        return [
            *(sys.executable, "-m", "musicsync", "serve", "--host", HOST, "--port", "0"),
            *("--no-demo", "--data", str(self.dir / "data"), "--media", str(self.dir / "media")),
            *("--max-connections-per-ip", "100000", "--new-rooms-per-ip", "100000"),
            *("--heartbeat-timeout", "600"),
        ]

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.source) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command(), cwd=str(self.dir), env=env, stdout=subprocess.PIPE, stderr=log
            )
        deadline = clock() + SERVER_START_TIMEOUT_S
        reader = LineReader(self.proc)
        while True:
            line = reader.line(max(0.1, deadline - clock()))
            m = LISTENING.search(line)
            if m:
                self.port = int(m.group(1))
                return

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime+stime

    def status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def stop(self) -> float:
        """SIGTERM, wait (SIGKILL after a timeout); returns how long it took."""
        if self.proc is None:
            return 0.0
        t0 = clock()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return clock() - t0

    def log_count(self, needle: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(needle)
        except OSError:
            return 0

    def healthz(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
        finally:
            conn.close()


# -- load client processes ---------------------------------------------------------


class Load:
    """The client processes (fanout_client.py); process 0 also runs the host."""

    def __init__(self, procs: int, port: int, room: str) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "fanout_client.py"), str(port), room, f"c{i}l"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for i in range(procs)
        ]
        self.pids = [p.pid for p in self.procs]
        self.readers = [LineReader(p) for p in self.procs]

    def send(self, i: int, cmd: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write((json.dumps(cmd) + "\n").encode())
        stdin.flush()

    def recv(self, i: int, timeout: float = CLIENT_REPLY_TIMEOUT_S) -> dict[str, Any]:
        return json.loads(self.readers[i].line(timeout))  # type: ignore[no-any-return]

    def call(self, i: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self.send(i, cmd)
        return self.recv(i)

    def all(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One command to each process at once; their replies in order."""
        for i, cmd in enumerate(cmds):
            self.send(i, cmd)
        return [self.recv(i) for i in range(len(cmds))]

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def close(self) -> None:
        for i, p in enumerate(self.procs):
            with contextlib.suppress(OSError, ValueError, TimeoutError, EOFError):
                self.call(i, {"cmd": "close"})
            with contextlib.suppress(OSError, ValueError):
                if p.stdin is not None:
                    p.stdin.close()
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def change_msgs(count: int) -> list[dict[str, Any]]:
    """Alternating play and pause: each one is a new version of the room."""
    return [{"type": "play" if i % 2 == 0 else "pause"} for i in range(count)]


def measure_changes(
    load: Load, server: Server, msgs: list[dict[str, Any]], interval: float, v0: int
) -> dict[str, Any]:
    """The host sends ``msgs``; every listener's delay per change, server CPU per frame."""
    count = len(msgs)
    load.all([{"cmd": "arm", "v0": v0, "count": count}] * len(load.procs))
    cpu0, load0 = server.cpu_s(), load.cpu_s()
    threads0, busy0, wall0 = threads_cpu_s(server.pid), machine_busy_s(), clock()
    sends = load.call(0, {"cmd": "changes", "msgs": msgs, "interval": interval})["sends"]
    waits = load.all(
        [{"cmd": "wait", "version": v0 + count, "timeout": DRAIN_TIMEOUT_S}] * len(load.procs)
    )
    cpu, load_cpu = server.cpu_s() - cpu0, load.cpu_s() - load0
    threads1, busy, wall = threads_cpu_s(server.pid), machine_busy_s() - busy0, clock() - wall0
    # What the rest of the machine (other users' work, the driver, steal) took
    # of its capacity meanwhile: the noise this run was measured in.
    others_share = max(0.0, busy - cpu - load_cpu) / (wall * (os.cpu_count() or 1))
    reps = load.all([{"cmd": "report", "sends": sends}] * len(load.procs))
    delays = [d for r in reps for d in r["delays"]]
    frames = sum(r["state_frames"] for r in reps)
    per_change = [max(r["per_change_max"][k] for r in reps) for k in range(count)]
    listeners = sum(r["listeners"] for r in reps)
    codes: dict[str, int] = {}
    for r in reps:
        for k, v in r["close_codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "changes": count,
        "listeners": listeners,
        "open_listeners": sum(r["open"] for r in reps),
        "samples": len(delays),
        "missing": sum(r["missing"] for r in reps),
        "complete": all(w["ok"] for w in waits) and sum(r["missing"] for r in reps) == 0,
        "superseded": sum(r["superseded"] for r in reps),
        "p50_ms": rnd(percentile(delays, 50)),
        "p95_ms": rnd(percentile(delays, 95)),
        "p99_ms": rnd(percentile(delays, 99)),
        "max_ms": rnd(max(delays, default=math.nan)),
        "last_listener_median_ms": rnd(median(per_change)),
        "per_change_max_ms": [rnd(x, 1) for x in per_change],
        "state_frames": frames,
        "server_cpu_s": rnd(cpu, 3),
        "server_cpu_us_per_frame": rnd(cpu * 1e6 / frames, 2) if frames else None,
        "server_cpu_main_thread_s": rnd(threads1[0] - threads0[0], 3),
        "server_cpu_other_threads_s": rnd(threads1[1] - threads0[1], 3),
        "server_preempted": threads1[2] - threads0[2],
        "others_cpu_share": rnd(others_share, 3),
        "client_cpu_s": rnd(load_cpu, 3),
        "client_cpu_us_per_frame": rnd(load_cpu * 1e6 / frames, 2) if frames else None,
        "close_codes": codes,
    }


@dataclass
class Config:
    quick: bool
    source: Path
    workdir: Path
    sizes: list[int]
    runs: int
    changes: int
    interval: float
    batch: int
    procs: int
    seat_budget: float
    stall_rounds: int
    stall_seeks: int
    drop_watch: float
    total_budget: float
    started: float = field(default_factory=clock)
    stop_seconds: list[float] = field(default_factory=list)


def measure_size(cfg: Config, kind: str, n: int, tag: str) -> dict[str, Any]:
    """A fresh server of ``kind``: seat ``n`` listeners, then the host's changes."""
    server = Server(kind, cfg.source, cfg.workdir, tag)
    server.start()
    load: Load | None = None
    out: dict[str, Any] = {"server": kind, "n": n}
    try:
        load = Load(cfg.procs, server.port, "bench")
        host = load.call(0, {"cmd": "host"})
        if not host["ok"]:
            raise RuntimeError(f"host not seated: {host}")
        # A track, so states are full-sized; its state also warms the send path.
        track = load.call(0, {"cmd": "changes", "msgs": [TRACK], "interval": 0, "echo": True})
        if not track["echoed"]:
            raise RuntimeError("the host never got the state of its set_track")
        v0 = int(track["host_version"])
        load.call(0, {"cmd": "quiet", "ms": QUIET_MS, "timeout": QUIET_TIMEOUT_S})
        time.sleep(RSS_SETTLE_S)
        rss0 = server.status_kib("VmRSS")
        cpu0 = server.cpu_s()
        seats = load.all(
            [
                {"cmd": "seat", "n": k, "batch": max(1, cfg.batch // cfg.procs), "budget": b}
                for k, b in zip(split(n, cfg.procs), [cfg.seat_budget] * cfg.procs, strict=True)
            ]
        )
        seated = sum(s["seated"] for s in seats)
        seat_s = max(s["end"] for s in seats) - min(s["start"] for s in seats)
        seat_cpu = server.cpu_s() - cpu0
        quiet_all = load.all(
            [{"cmd": "quiet", "ms": QUIET_MS, "timeout": QUIET_TIMEOUT_S}] * cfg.procs
        )
        time.sleep(RSS_SETTLE_S)
        rss1 = server.status_kib("VmRSS")
        out.update(
            seated=seated,
            seat_complete=seated == n,
            seat_s=rnd(seat_s, 3),
            seats_per_s=rnd(seated / seat_s, 1) if seat_s > 0 else None,
            seat_server_cpu_s=rnd(seat_cpu, 2),
            settled=all(q["ok"] for q in quiet_all),
            rss_before_kib=rss0,
            rss_after_kib=rss1,
            kib_per_conn=rnd((rss1 - rss0) / seated, 2) if seated else None,
            seat_errors={k: v for s in seats for k, v in s["errors"].items()},
        )
        msgs = change_msgs(cfg.changes)
        out["fanout"] = measure_changes(load, server, msgs, cfg.interval, v0)
    finally:
        if load is not None:
            load.close()
        cfg.stop_seconds.append(server.stop())
        if kind == "musicsync":
            out["slow_client_log_lines"] = server.log_count("dropping slow client")
            out["server_log_errors"] = server.log_count("Traceback")
    return out


# -- scenario 4: stalled listeners -----------------------------------------------------


def tcp_queues(server_port: int, client_ports: set[int]) -> tuple[int, int]:
    """Bytes queued on the server's send side and in the clients' receive queues."""
    send_q = recv_q = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, queues = parts[1], parts[2], parts[4]
        lport, rport = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        tx, rx = (int(x, 16) for x in queues.split(":"))
        if lport == server_port and rport in client_ports:
            send_q += tx
        elif lport in client_ports and rport == server_port:
            recv_q += rx
    return send_q, recv_q


def stall_round(cfg: Config, stalled: int, watch: bool, tag: str) -> dict[str, Any]:
    server = Server("musicsync", cfg.source, cfg.workdir, tag)
    server.start()
    load: Load | None = None
    out: dict[str, Any] = {"stalled": stalled}
    try:
        load = Load(1, server.port, "bench")
        if not load.call(0, {"cmd": "host"})["ok"]:
            raise RuntimeError("host not seated")
        seat = load.call(
            0, {"cmd": "seat", "n": STALL_LISTENERS - stalled, "batch": 100, "stalled": stalled}
        )
        out["stalled_open"] = seat["stalled_open"]
        load.call(0, {"cmd": "quiet", "ms": QUIET_MS, "timeout": QUIET_TIMEOUT_S})
        # Fill the stalled pipes: big states (long URL and title).
        url = "/media/" + "p" * 2000 + ".mp3"
        prime = [
            {"type": "set_track", "url": url, "title": f"{i:03d}" + "t" * 190}
            for i in range(PRIME_FRAMES)
        ]
        primed = load.call(
            0, {"cmd": "changes", "msgs": prime, "interval": PRIME_INTERVAL_S, "echo": True}
        )
        if not primed["echoed"]:
            raise RuntimeError("the host never got the state of its last set_track")
        v0 = int(primed["host_version"])
        load.call(0, {"cmd": "quiet", "ms": QUIET_MS, "timeout": QUIET_TIMEOUT_S})
        info = load.call(0, {"cmd": "stalled_info"})
        ports = set(info["ports"])
        send_q, recv_q = tcp_queues(server.port, ports) if ports else (0, 0)
        start = clock()
        seeks = [{"type": "seek", "position": float(i + 1)} for i in range(cfg.stall_seeks)]
        fan = measure_changes(load, server, seeks, STALL_SEEK_INTERVAL_S, v0)
        out.update(
            fanout=fan,
            stalled_server_send_queue_bytes=send_q,
            stalled_client_recv_queue_bytes=max(recv_q, int(info["unread"])),
            connections_after=server.healthz().get("connections"),
        )
        if watch and stalled:
            want = 1 + fan["open_listeners"]
            dropped_at = None
            while clock() < start + cfg.drop_watch:
                if server.healthz().get("connections") == want:
                    dropped_at = clock() - start
                    break
                time.sleep(0.25)
            out["dropped_after_s"] = rnd(dropped_at, 2)
            out["watched_s"] = rnd(clock() - start, 1)
            out["send_queue_at_end_bytes"] = tcp_queues(server.port, ports)[0]
    finally:
        if load is not None:
            load.close()
        cfg.stop_seconds.append(server.stop())
        out["stop_s"] = rnd(cfg.stop_seconds[-1], 2)
        out["slow_client_log_lines"] = server.log_count("dropping slow client")
    return out


def run_stall(cfg: Config, errors: list[dict[str, Any]]) -> dict[str, Any]:
    rounds: dict[int, list[dict[str, Any]]] = {0: [], STALLED: []}
    for i in range(cfg.stall_rounds):
        for stalled in (0, STALLED):
            print(f"# stall round {i} stalled={stalled} ...", file=sys.stderr, flush=True)
            watch = i == cfg.stall_rounds - 1 and cfg.drop_watch > 0
            try:
                rounds[stalled].append(stall_round(cfg, stalled, watch, f"stall{stalled}-{i}"))
            except (OSError, RuntimeError, TimeoutError, EOFError, KeyError) as exc:
                errors.append({"phase": f"stall{stalled}-{i}", "error": repr(exc)})
    clean = [r["fanout"]["p95_ms"] for r in rounds[0]]
    stalled_p95 = [r["fanout"]["p95_ms"] for r in rounds[STALLED]]
    if not (clean and stalled_p95):
        return {}
    c, s = statistics.median(clean), statistics.median(stalled_p95)
    return {
        "listeners": STALL_LISTENERS,
        "stalled": STALLED,
        "rounds": cfg.stall_rounds,
        "seeks_per_round": cfg.stall_seeks,
        "p95_clean_ms": rnd(c),
        "p95_stalled_ms": rnd(s),
        "ratio": rnd(s / c, 2) if c else None,
        "p95_clean_rounds_ms": clean,
        "p95_stalled_rounds_ms": stalled_p95,
        "missing_stalled_rounds": [r["fanout"]["missing"] for r in rounds[STALLED]],
        "stalled_rounds": [
            {k: v for k, v in r.items() if k != "fanout"} | {"fanout_n": r["fanout"]["listeners"]}
            for r in rounds[STALLED]
        ],
    }


# -- aggregation -------------------------------------------------------------------


def summarize(
    cfg: Config, runs: list[dict[tuple[str, int], dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Median over runs per (server, N), and musicsync / reference ratios per run."""
    rows = []
    for n in cfg.sizes:
        for kind in KINDS:
            got = [r[(kind, n)] for r in runs if (kind, n) in r and "fanout" in r[(kind, n)]]
            if not got:
                continue
            fan = [g["fanout"] for g in got]
            row: dict[str, Any] = {
                "server": kind,
                "n": n,
                "runs": len(got),
                "seat_s": rnd(median([g["seat_s"] for g in got]), 2),
                "seat_complete": all(g["seat_complete"] for g in got),
                "p50_ms": rnd(median([f["p50_ms"] for f in fan])),
                "p99_ms": rnd(median([f["p99_ms"] for f in fan])),
                "max_ms": rnd(median([f["max_ms"] for f in fan])),
                "last_listener_median_ms": rnd(median([f["last_listener_median_ms"] for f in fan])),
                "every_change_to_everyone": all(
                    g["seat_complete"] and f["complete"] for g, f in zip(got, fan, strict=True)
                ),
                "missing": [f["missing"] for f in fan],
                "server_cpu_us_per_frame": rnd(median([f["server_cpu_us_per_frame"] for f in fan])),
                "client_cpu_us_per_frame": rnd(median([f["client_cpu_us_per_frame"] for f in fan])),
                "kib_per_conn": rnd(median([g["kib_per_conn"] for g in got])),
                "others_cpu_share": rnd(median([f.get("others_cpu_share") for f in fan]), 3),
                "server_other_threads_share": rnd(
                    median(
                        [
                            f["server_cpu_other_threads_s"] / f["server_cpu_s"]
                            for f in fan
                            if f.get("server_cpu_s")
                        ]
                    ),
                    3,
                ),
            }
            if kind == "musicsync":
                ratios: dict[str, list[float | None]] = {"p50": [], "p99": [], "cpu": []}
                for r in runs:
                    a, b = r.get(("musicsync", n)), r.get(("reference", n))
                    if not (a and b and "fanout" in a and "fanout" in b):
                        continue
                    for key, field_ in (
                        ("p50", "p50_ms"),
                        ("p99", "p99_ms"),
                        ("cpu", "server_cpu_us_per_frame"),
                    ):
                        x, y = a["fanout"][field_], b["fanout"][field_]
                        ratios[key].append(rnd(x / y, 3) if x is not None and y else None)
                row["ratio_runs"] = ratios
                for key in ratios:
                    row[f"ratio_{key}"] = rnd(median(ratios[key]), 3)
                row["goals"] = row_goals(row)
            rows.append(row)
    return rows


def row_goals(row: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's goals that apply to this musicsync row."""
    n = row["n"]
    g: dict[str, bool | None] = {}
    cpu = row["server_cpu_us_per_frame"]
    g["cpu_per_frame_le_15us"] = cpu is not None and cpu <= GOAL_CPU_US
    kib = row["kib_per_conn"]
    g["idle_conn_lt_30kib"] = kib is not None and kib < GOAL_IDLE_KIB
    p99 = row["p99_ms"]
    if n == 5000:
        g["p99_le_60ms_every_change"] = (
            p99 is not None and p99 <= GOAL_P99_5000_MS and row["every_change_to_everyone"]
        )
        ratios = [row.get("ratio_p50"), row.get("ratio_p99"), row.get("ratio_cpu")]
        known = [r for r in ratios if r is not None]
        g["ratio_le_1"] = len(known) == 3 and max(known) <= GOAL_RATIO
        g["ratio_le_0.5"] = len(known) == 3 and max(known) <= GOAL_RATIO_NEXT
    if n == 10000:
        seat = row["seat_s"]
        g["seated_lt_20s_p99_lt_150ms"] = (
            row["seat_complete"]
            and seat is not None
            and seat < GOAL_SEAT_10000_S
            and p99 is not None
            and p99 < GOAL_P99_10000_MS
        )
    return g


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}"


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def print_tables(res: dict[str, Any]) -> None:
    print(
        f"\nFan-out: {res['changes']} host changes {res['interval_s'] * 1000:.0f} ms apart, "
        f"one room; median of {res['runs']} run(s); delays in ms, host send -> state arrival"
    )
    head = (
        f"{'server':>10} {'N':>6} {'seat s':>7} {'p50':>7} {'p99':>7} {'max':>7} "
        f"{'all got all':>11} {'srv us/fr':>9} {'cli us/fr':>9} {'KiB/conn':>8} "
        f"{'x p50':>6} {'x p99':>6} {'x cpu':>6} {'thr%':>4} {'oth%':>4}  goals"
    )
    print(head)
    for r in res["rows"]:
        goals = r.get("goals", {})
        gtxt = " ".join(f"{k}={mark(v)}" for k, v in goals.items())
        print(
            f"{r['server']:>10} {r['n']:>6} {fmt(r['seat_s'], '.2f'):>7} "
            f"{fmt(r['p50_ms'], '.1f'):>7} {fmt(r['p99_ms'], '.1f'):>7} "
            f"{fmt(r['max_ms'], '.1f'):>7} {yes_no(r['every_change_to_everyone']):>11} "
            f"{fmt(r['server_cpu_us_per_frame'], '.1f'):>9} "
            f"{fmt(r['client_cpu_us_per_frame'], '.1f'):>9} {fmt(r['kib_per_conn'], '.1f'):>8} "
            f"{fmt(r.get('ratio_p50'), '.2f'):>6} {fmt(r.get('ratio_p99'), '.2f'):>6} "
            f"{fmt(r.get('ratio_cpu'), '.2f'):>6} {pct(r.get('server_other_threads_share')):>4} "
            f"{pct(r.get('others_cpu_share')):>4}  {gtxt}"
        )
    print(
        "  seat s = seconds to seat N listeners (welcome received); all got all = every listener"
        " got every change in every run;\n  srv us/fr = server CPU per delivered state frame;"
        " cli us/fr = the load client's CPU per frame (it must stay below the server's);"
        "\n  KiB/conn = server VmRSS per idle connection; x = musicsync / reference, same run;"
        "\n  thr% = the server's CPU spent outside its main thread (musicsync: sender threads);"
        "\n  oth% = the share of the machine everything else (other users, steal) took: noise"
    )
    print("\nGoals (issue 11), musicsync:")
    for name, ok in res["goals"].items():
        print(f"  {mark(ok):>4}  {name}")
    s = res["stall"]
    if s:
        print(
            f"\nStalled listeners ({s['stalled']} of {s['listeners']} never read; "
            f"{s['rounds']} round(s) each, {s['seeks_per_round']} seeks, median p95)"
        )
        print(f"  p95 without stalled: {s['p95_clean_ms']:.1f} ms  {s['p95_clean_rounds_ms']}")
        print(f"  p95 with stalled:    {s['p95_stalled_ms']:.1f} ms  {s['p95_stalled_rounds_ms']}")
        print(f"  ratio:               {s['ratio']}")
        for d in s["stalled_rounds"]:
            watched = (
                f", dropped after {d['dropped_after_s']} s (watched {d['watched_s']} s)"
                if "watched_s" in d
                else ""
            )
            print(
                f"  stalled round: bytes stuck in server send queues "
                f"{d['stalled_server_send_queue_bytes']}, in client receive queues "
                f"{d['stalled_client_recv_queue_bytes']}{watched}; server stop {d['stop_s']} s"
            )
    for e in res["errors"]:
        print(f"NOTE {e['phase']}: {e['error']}")


def overall_goals(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    ms = {r["n"]: r for r in rows if r["server"] == "musicsync"}
    out: dict[str, bool | None] = {}
    cpu = [r["goals"]["cpu_per_frame_le_15us"] for r in ms.values()]
    out[f"server CPU per delivered frame <= {GOAL_CPU_US:.0f} us (every N)"] = (
        all(cpu) if cpu else None
    )
    r5 = ms.get(5000, {}).get("goals", {})
    out[f"5000: p99 <= {GOAL_P99_5000_MS:.0f} ms, every change to everyone"] = r5.get(
        "p99_le_60ms_every_change"
    )
    r10 = ms.get(10000, {}).get("goals", {})
    out[f"10000: seated < {GOAL_SEAT_10000_S:.0f} s, p99 < {GOAL_P99_10000_MS:.0f} ms"] = r10.get(
        "seated_lt_20s_p99_lt_150ms"
    )
    kib = [r["goals"]["idle_conn_lt_30kib"] for n, r in ms.items() if n >= 2000]
    out[f"idle connection < {GOAL_IDLE_KIB:.0f} KiB (N >= 2000)"] = all(kib) if kib else None
    out["5000: ratio <= 1 (p50, p99, CPU/frame)"] = r5.get("ratio_le_1")
    out["5000: ratio <= 0.5 (p50, p99, CPU/frame)"] = r5.get("ratio_le_0.5")
    return out


# -- main ------------------------------------------------------------------------


def make_config(args: argparse.Namespace, workdir: Path) -> Config:
    quick = bool(args.quick)
    cfg = Config(
        quick=quick,
        source=args.source.resolve(),
        workdir=workdir,
        sizes=[500, 2000] if quick else [500, 2000, 5000, 10000],
        runs=1 if quick else 3,
        changes=10 if quick else 20,
        interval=CHANGE_INTERVAL_S,
        batch=args.batch,
        procs=args.procs,
        seat_budget=15.0 if quick else 40.0,
        stall_rounds=1 if quick else 2,
        stall_seeks=8 if quick else 20,
        drop_watch=0.0 if quick else DROP_WATCH_S,
        total_budget=55.0 if quick else 570.0,
    )
    if args.sizes:
        cfg.sizes = [int(x) for x in args.sizes.split(",")]
    if args.runs:
        cfg.runs = args.runs
    if args.changes:
        cfg.changes = args.changes
    if args.stall_rounds is not None:
        cfg.stall_rounds = args.stall_rounds
    return cfg


def run(cfg: Config) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    runs: list[dict[tuple[str, int], dict[str, Any]]] = []
    durations: list[float] = []
    stall_reserve = 0.0 if cfg.stall_rounds == 0 else (12.0 * cfg.stall_rounds + cfg.drop_watch)
    for i in range(cfg.runs):
        left = cfg.total_budget - (clock() - cfg.started) - stall_reserve
        if durations and left < max(durations):
            errors.append({"phase": f"run {i}", "error": f"time budget: {i} run(s) done"})
            break
        t0 = clock()
        got: dict[tuple[str, int], dict[str, Any]] = {}
        for n in cfg.sizes:
            order = KINDS if i % 2 == 0 else KINDS[::-1]
            for kind in order:
                print(f"# run {i}: {kind} with {n} listeners ...", file=sys.stderr, flush=True)
                try:
                    got[(kind, n)] = measure_size(cfg, kind, n, f"{kind}-{n}-{i}")
                except (OSError, RuntimeError, TimeoutError, EOFError, KeyError) as exc:
                    errors.append({"phase": f"run {i} {kind} {n}", "error": repr(exc)})
        runs.append(got)
        durations.append(clock() - t0)
    stall = run_stall(cfg, errors) if cfg.stall_rounds else {}
    rows = summarize(cfg, runs)
    return {
        "changes": cfg.changes,
        "interval_s": cfg.interval,
        "runs": len(runs),
        "rows": rows,
        "goals": overall_goals(rows),
        "per_run": [list(r.values()) for r in runs],
        "stall": stall,
        "errors": errors,
    }


def main() -> int:
    if "--redis" in sys.argv[1:]:  # just bench --redis: two nodes through Redis (bench_cluster.py)
        import bench_cluster

        return bench_cluster.main([a for a in sys.argv[1:] if a != "--redis"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 and 2000, one run: ~1 min")
    parser.add_argument("--runs", type=int, default=0, help="runs to take the median of (3)")
    parser.add_argument("--sizes", default="", help="listener counts, e.g. 500,2000,5000,10000")
    parser.add_argument("--changes", type=int, default=0, help="host changes per size (20)")
    parser.add_argument("--batch", type=int, default=100, help="connections in flight (100)")
    parser.add_argument("--procs", type=int, default=1, help="load client processes (1)")
    parser.add_argument("--stall-rounds", type=int, default=None, help="scenario 4 rounds (2)")
    parser.add_argument(
        "--source", type=Path, default=REPO, help="tree to import musicsync from (default: repo)"
    )
    args = parser.parse_args()

    soft, hard = raise_fd_limit()
    load_start = os.getloadavg()
    t0 = clock()
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        cfg = make_config(args, Path(tmp))
        need = max(cfg.sizes) + 64
        if soft < need:
            print(f"warning: RLIMIT_NOFILE {soft} < {need}", file=sys.stderr)
        res = run(cfg)
    elapsed = clock() - t0
    print_tables(res)
    load_end = os.getloadavg()
    print(f"\nelapsed {elapsed:.1f} s; load average {load_end[0]:.2f} (start {load_start[0]:.2f})")
    summary = {
        "bench": "fanout",
        "quick": cfg.quick,
        "elapsed_s": rnd(elapsed, 1),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": [rnd(x, 2) for x in load_start],
        "loadavg_end": [rnd(x, 2) for x in load_end],
        "nofile": [soft, hard],
        "batch": cfg.batch,
        "client_procs": cfg.procs,
        "sizes": cfg.sizes,
        **res,
        "server_stop_s": [rnd(s, 2) for s in cfg.stop_seconds],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
