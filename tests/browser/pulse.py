"""A private PulseAudio server whose one recording holds every browser's output.

``PulseServer`` starts ``pulseaudio`` in a temporary directory of its own (its
socket, runtime, state and config live there; it never touches a user's or
another test's server) with:

* one null sink ``mix`` with one channel per browser, at 48 kHz;
* for each browser ``i`` a mono remap sink ``spk<i>`` that feeds channel ``i``
  of ``mix`` only.

A browser launched with ``env=server.client_env(i)`` plays into ``spk<i>``.
``server.record()`` runs ``parec`` on ``mix.monitor``: the channels of that one
stream are sample-aligned, so the offset between two browsers is read off the
recording exactly, whenever the recording started.

The daemon logs at debug level with timestamps, so ``underruns(a, b)`` can say
when the machine failed to feed a stream (a gap no page can prevent). To make
that rare on a busy machine, the null sink's thread, the daemon's main thread
and (``boost_clients``) Chromium's PulseAudio threads run real-time when the
process may (root); without the main thread's, three browsers underran 3-39
times in 15 s at a load of 6-9.

Also here: a click track whose quiet clicks encode the second number (so a
whole-second offset between browsers is visible too), and the onset analysis.
"""

from __future__ import annotations

import array
import contextlib
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import stop_process

RATE = 48000
LOG_TIME = re.compile(r"\(\s*([0-9.]+)\|")
UNDERRUN = re.compile(r"[Uu]nderrun (of|on) ")
CHANNEL_NAMES = ("front-left", "front-right", "front-center", "rear-left", "rear-right", "lfe")
START_TIMEOUT_S = 15.0
SINK_RT_PRIORITY = 9  # the null sink's thread: the clock every channel is recorded by
MAIN_RT_PRIORITY = 8  # the daemon's main thread: it serves the streams' data requests
CLIENT_RT_PRIORITY = 7  # Chromium's PulseAudio feeding threads, next to its renderer audio (8)


def available() -> bool:
    return all(shutil.which(b) for b in ("pulseaudio", "pactl", "parec"))


class PulseServer:
    """A private PulseAudio daemon with one null sink and a remap sink per browser."""

    def __init__(self, channels: int = 2, log_level: str = "debug") -> None:
        if not 1 <= channels <= len(CHANNEL_NAMES):
            raise ValueError(f"1-{len(CHANNEL_NAMES)} channels")
        self.channels = channels
        self.dir = Path(tempfile.mkdtemp(prefix="musicsync-pulse-"))
        self.socket = self.dir / "native"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "pulseaudio.log"
        self.log_level = log_level  # "debug" logs each underrun (a few lines a second at worst)
        self._log_origin = math.nan  # wall time of the log's relative time 0

    # -- lifecycle
    def __enter__(self) -> PulseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sinks(self) -> list[str]:
        return [f"spk{i}" for i in range(self.channels)]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
        env.update(
            HOME=str(self.dir),
            XDG_RUNTIME_DIR=str(self.dir),
            XDG_CONFIG_HOME=str(self.dir / "config"),
            PULSE_RUNTIME_PATH=str(self.dir / "runtime"),
            PULSE_STATE_PATH=str(self.dir / "state"),
            PULSE_CONFIG=str(self.dir / "config" / "pulse" / "daemon.conf"),
            PULSE_SERVER=f"unix:{self.socket}",
            PULSE_CLIENTCONFIG=str(self.dir / "client.conf"),
        )
        return env

    def start(self) -> None:
        conf = self.dir / "config" / "pulse"
        conf.mkdir(parents=True)
        for d in ("runtime", "state"):
            (self.dir / d).mkdir(mode=0o700)
        (conf / "daemon.conf").write_text(
            f"default-sample-rate = {RATE}\n"
            f"alternate-sample-rate = {RATE}\n"
            "default-sample-channels = 2\n"
            "exit-idle-time = -1\n"
            "flat-volumes = no\n"
            # the sink's thread above Chromium's real-time audio threads (8)
            "realtime-scheduling = yes\n"
            f"realtime-priority = {SINK_RT_PRIORITY}\n"
        )
        (self.dir / "client.conf").write_text("autospawn = no\n")
        names = CHANNEL_NAMES[: self.channels]
        lines = [
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
            f"load-module module-null-sink sink_name=mix rate={RATE} channels={self.channels}"
            f" channel_map={','.join(names)}",
        ]
        for sink, channel in zip(self.sinks, names, strict=True):
            lines.append(
                f"load-module module-remap-sink sink_name={sink} master=mix channels=1"
                f" master_channel_map={channel} channel_map=mono remix=no"
            )
        lines.append("set-default-sink mix")
        script = self.dir / "default.pa"
        script.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [
                "pulseaudio",
                "--daemonize=no",
                "--system=false",
                "-n",
                f"--file={script}",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disallow-exit",
                f"--log-target=file:{self.log}",
                f"--log-level={self.log_level}",
                "--log-time=1",
            ],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pulseaudio exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            if self.socket.exists() and len(self.sink_names()) >= 1 + self.channels:
                self._anchor_log()
                self._realtime_main_thread()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pulseaudio did not come up:\n{self.log_tail()}")
            time.sleep(0.1)

    def _realtime_main_thread(self) -> None:
        """Real-time priority for the daemon's main thread, when allowed (root).

        It answers every stream's requests for more data; at normal priority,
        other processes on a busy machine delay it and every stream underruns
        at once (seen here: 3-39 underruns in 15 s of three browsers at a load
        of 6-9; none in six runs with this).
        """
        if self.proc is None or not hasattr(os, "sched_setscheduler"):
            return
        with contextlib.suppress(OSError):
            os.sched_setscheduler(self.proc.pid, os.SCHED_RR, os.sched_param(MAIN_RT_PRIORITY))

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _anchor_log(self) -> None:
        """Map the log's relative times to wall time, through one pactl connection."""
        before = time.time()
        self.pactl("stat")
        after = time.time()
        rel = [t for t, line in self._log_lines() if '"pactl"' in line]
        if rel:
            self._log_origin = (before + after) / 2 - rel[-1]

    def _log_lines(self) -> list[tuple[float, str]]:
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            m = LOG_TIME.match(line)
            if m:
                out.append((float(m.group(1)), line))
        return out

    def underruns(self, start: float, end: float) -> list[float]:
        """Wall times of the playback underruns PulseAudio logged between two wall times.

        An underrun is the machine failing to feed a stream in time (a starved
        browser process), not the page: it is heard as a gap, after which that
        stream is late until the page notices.
        """
        return [
            self._log_origin + t
            for t, line in self._log_lines()
            if UNDERRUN.search(line) and start <= self._log_origin + t <= end
        ]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients
    def pactl(self, *args: str) -> str:
        out = subprocess.run(
            ["pactl", *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout

    def sink_names(self) -> list[str]:
        return [line.split("\t")[1] for line in self.pactl("list", "short", "sinks").splitlines()]

    def client_env(self, channel: int) -> dict[str, str]:
        """Environment for a browser whose output goes to ``channel`` of the mix."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
        env.update(
            PULSE_SERVER=f"unix:{self.socket}",
            PULSE_SINK=self.sinks[channel],
            PULSE_CLIENTCONFIG=str(self.dir / "client.conf"),
        )
        return env

    # -- calibration: delays the page cannot see, and a microphone

    def add_delayed_sink(self, channel: int, latency_ms: float) -> str:
        """A sink whose sound reaches ``channel`` of the mix ``latency_ms`` later.

        A mono null sink ``dly<channel>`` and a loopback from its monitor into
        ``spk<channel>``: the delay comes after the browser, like a Bluetooth
        speaker's, and no API of the page reports it. The loopback's rate
        control is off (``adjust_time=0``: both sinks run on this machine's
        clock), so the delay, whatever it settles to near ``latency_ms``, stays
        put. Returns the sink's name for ``client_env_for``.
        """
        sink = f"dly{channel}"
        self.pactl(
            "load-module", "module-null-sink", f"sink_name={sink}", f"rate={RATE}",
            "channels=1", "channel_map=mono",
        )  # fmt: skip
        self.pactl(
            "load-module", "module-loopback", f"source={sink}.monitor",
            f"sink={self.sinks[channel]}", f"latency_msec={latency_ms:g}", "adjust_time=0",
            "source_dont_move=true", "sink_dont_move=true", "remix=no",
        )  # fmt: skip
        self._wait_for(lambda: sink in self.sink_names(), f"sink {sink}")
        return sink

    def add_microphone(self, name: str = "mic") -> str:
        """A capture source ``name`` that hears the whole mix (every channel, mono),
        and a sink ``<name>out`` nobody records for the measuring page's own output.

        Chromium lists no monitor sources, so the mix's monitor is remapped into
        a real source (see shared notes, headless-audio).
        """
        self.pactl(
            "load-module", "module-remap-source", "master=mix.monitor", f"source_name={name}",
            "channels=1", "channel_map=mono",
        )  # fmt: skip
        self.pactl(
            "load-module", "module-null-sink", f"sink_name={name}out", f"rate={RATE}",
            "channels=1", "channel_map=mono",
        )  # fmt: skip
        self._wait_for(lambda: f"{name}out" in self.sink_names(), f"sink {name}out")
        return name

    def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio has no {what}:\n{self.log_tail()}")
            time.sleep(0.05)

    def client_env_for(self, sink: str, source: str | None = None) -> dict[str, str]:
        """Environment for a browser that plays into ``sink`` (and captures ``source``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
        env.update(
            PULSE_SERVER=f"unix:{self.socket}",
            PULSE_SINK=sink,
            PULSE_CLIENTCONFIG=str(self.dir / "client.conf"),
        )
        if source is not None:
            env["PULSE_SOURCE"] = source
        return env

    def sink_inputs(self) -> dict[str, int]:
        """How many playback streams each sink has (a browser that opened its output)."""
        ids = {
            line.split("\t")[0]: line.split("\t")[1]
            for line in self.pactl("list", "short", "sinks").splitlines()
        }
        counts = {name: 0 for name in ids.values()}
        for line in self.pactl("list", "short", "sink-inputs").splitlines():
            sink = ids.get(line.split("\t")[1])
            if sink:
                counts[sink] += 1
        return counts

    def boost_clients(self) -> int:
        """Real-time priority for the PulseAudio threads of this server's Chromium processes.

        Chromium feeds PulseAudio from a ``threaded-ml`` thread at normal
        priority; on a loaded machine it misses its deadlines and the stream
        underruns (a gap, then late audio), whatever the page does. The
        renderer's audio thread is already real-time. As root, this gives the
        feeding thread SCHED_RR too (best effort; returns how many threads were
        changed). New streams start new threads: call it again after a page
        opens its output.
        """
        if not hasattr(os, "sched_setscheduler"):
            return 0
        mark = f"PULSE_SERVER=unix:{self.socket}".encode()
        parents: dict[int, int] = {}
        roots: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
                if mark in Path(f"/proc/{pid}/environ").read_bytes():
                    roots.add(pid)
            except (OSError, ValueError, IndexError):
                continue
        changed = 0
        for pid in parents:
            q, seen = pid, 0
            while q > 1 and q not in roots and seen < 64:
                q, seen = parents.get(q, 0), seen + 1
            if q not in roots:
                continue
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() != "threaded-ml":
                        continue
                    if os.sched_getscheduler(int(tid)) == os.SCHED_RR:
                        continue
                    os.sched_setscheduler(int(tid), os.SCHED_RR, os.sched_param(CLIENT_RT_PRIORITY))
                    changed += 1
                except (OSError, ValueError):
                    continue
        return changed

    @contextlib.contextmanager
    def record(self) -> Iterator[Recorder]:
        rec = Recorder(self)
        rec.start()
        try:
            yield rec
        finally:
            rec.stop()


@dataclass
class Recorder:
    """``parec`` on ``mix.monitor``: interleaved s16le, one channel per browser.

    ``frame_time(n)`` maps a frame index to ``time.time()``: an upper bound
    taken from when the bytes arrived (a few ms late at most, with 5 ms
    fragments), good enough to cut the recording into the test's phases.
    """

    server: PulseServer
    data: bytearray = field(default_factory=bytearray)
    proc: subprocess.Popen[bytes] | None = None
    _t0: float = math.inf
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    @property
    def channels(self) -> int:
        return self.server.channels

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "parec",
                "--device=mix.monitor",
                "--raw",
                "--format=s16le",
                f"--rate={RATE}",
                f"--channels={self.channels}",
                "--latency-msec=5",
            ],
            env=self.server.client_env(0),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._pump, name="parec", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.frames() < RATE // 10:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("parec delivered no audio")
            time.sleep(0.02)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        frame_bytes = 2 * self.channels
        stream = self.proc.stdout
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                return
            now = time.time()
            with self._lock:
                self.data += chunk
                frames = len(self.data) // frame_bytes
                # the frames received so far ended no later than now
                self._t0 = min(self._t0, now - frames / RATE)

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        if self._thread is not None:
            self._thread.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def frames(self) -> int:
        with self._lock:
            return len(self.data) // (2 * self.channels)

    def frame_time(self, frame: float) -> float:
        return self._t0 + frame / RATE

    def time_frame(self, t: float) -> int:
        return max(0, round((t - self._t0) * RATE))

    def wait_until(self, t: float, timeout: float = 10.0) -> None:
        """Block until the recording holds audio up to wall time ``t``."""
        deadline = time.monotonic() + timeout
        while self.frames() < self.time_frame(t):
            if time.monotonic() > deadline:
                raise AssertionError("the recording stalled")
            time.sleep(0.02)

    def channel(self, index: int, start: int = 0, stop: int | None = None) -> array.array[int]:
        """Samples of one channel between two frame indices."""
        with self._lock:
            total = len(self.data) // (2 * self.channels)
            stop = total if stop is None else min(stop, total)
            start = max(0, min(start, stop))
            raw = bytes(self.data[start * 2 * self.channels : stop * 2 * self.channels])
        samples = array.array("h")
        samples.frombytes(raw)
        if sys.byteorder != "little":
            samples.byteswap()
        return samples[index :: self.channels]

    def save_wav(self, path: Path) -> None:
        with self._lock:
            raw = bytes(self.data)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(self.channels)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(raw)


# -- the coded click track ----------------------------------------------------

CODE_SECONDS = 8  # the quiet clicks of each second spell its number modulo this
CLICK_LEVELS = {"accent": 1.0, 1: 0.6, 0: 0.3}
TONE = 0.08


def write_coded_click_track(path: Path, seconds: int, rate: int = 44100) -> None:
    """``conftest.write_click_track`` with the second's number in its quiet clicks.

    Same 220 Hz tone (0.08), same click every 250 ms (a 2 ms ramp), an accented
    click (0.7) on each second; the other three clicks of second ``s`` are loud
    (0.42) or soft (0.21) for the bits of ``s % 8``. A browser that plays a
    whole second (or 250 ms) away from the others is then caught by the
    recording, which a periodic track could not show.
    """
    quarter = rate // 4
    click_len = rate // 500
    blocks = []
    for s in range(CODE_SECONDS):
        block = bytearray()
        levels = [CLICK_LEVELS["accent"]] + [CLICK_LEVELS[(s >> b) & 1] for b in (2, 1, 0)]
        for level in levels:
            for i in range(quarter):
                sample = TONE * math.sin(2 * math.pi * 220 * i / rate)
                if i < click_len:
                    sample += 0.7 * level * (1 - i / click_len)
                block += struct.pack("<h", int(max(-1.0, min(1.0, sample)) * 32767))
        blocks.append(bytes(block))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        for s in range(seconds):
            w.writeframes(blocks[s % CODE_SECONDS])


# -- analysis -----------------------------------------------------------------


@dataclass
class Onset:
    frame: float  # sub-sample frame index in the recording
    peak: float  # click height above the tone, full scale 1.0


# The click's step is 0.7 * level (0.21-0.7) over a 0.08 tone: a rise of more
# than DETECT within a few samples is a click; nothing else in the track rises
# that fast.
DETECT = 0.12
RISE_FRAMES = 6
REFRACTORY_S = 0.1
SCAN_BLOCK = 16
FULL = 32768.0


def onsets(samples: array.array[int], offset: int = 0) -> list[Onset]:
    """Click onsets in one channel: where the signal jumps by DETECT within a few samples.

    The onset is the half-height crossing of the jump, interpolated between two
    samples; the same click through the same resampler gives the same
    crossing, so offsets between channels are good to a small fraction of a
    sample. Blocks whose whole range is below the jump are skipped at C speed.
    """
    out: list[Onset] = []
    n = len(samples)
    step = int(DETECT * FULL)
    refractory = int(REFRACTORY_S * RATE)
    k = RISE_FRAMES + 2
    limit = n - 2 * RISE_FRAMES
    while k < limit:
        end = min(k + SCAN_BLOCK, limit)
        seg = samples[k - RISE_FRAMES : end]
        if max(seg) - min(seg) <= step:
            k = end
            continue
        hit = next((i for i in range(k, end) if samples[i] - samples[i - RISE_FRAMES] > step), None)
        if hit is None:
            k = end
            continue
        lo = hit - RISE_FRAMES - 2
        base = min(samples[lo : hit + 1])
        top_at = max(range(hit, hit + 2 * RISE_FRAMES), key=samples.__getitem__)
        top = samples[top_at]
        half = (base + top) / 2
        j = lo
        while j < top_at - 1 and samples[j + 1] < half:
            j += 1
        # the crossing lies between j and j + 1
        a, b = samples[j], samples[j + 1]
        frac = min(1.0, max(0.0, (half - a) / (b - a))) if b != a else 0.0
        out.append(Onset(offset + j + frac, (top - base) / FULL))
        k = top_at + refractory
    return out


QUIET = int(0.004 * FULL)  # the tone never stays this low for a block
QUIET_BLOCK = 48  # 1 ms


def dropouts(samples: array.array[int], min_ms: float = 2.0) -> list[tuple[int, int]]:
    """Stretches (start, length in frames) where a playing channel went silent.

    While the track plays, its 220 Hz tone keeps every 1 ms block above QUIET;
    a run of quiet blocks is a gap in the output (an underrun, or a stop).
    """
    out: list[tuple[int, int]] = []
    need = max(1, round(min_ms / 1000 * RATE / QUIET_BLOCK))
    run_start, run = 0, 0
    for k in range(0, len(samples) - QUIET_BLOCK + 1, QUIET_BLOCK):
        seg = samples[k : k + QUIET_BLOCK]
        if max(seg) < QUIET and min(seg) > -QUIET:
            if run == 0:
                run_start = k
            run += 1
            continue
        if run >= need:
            out.append((run_start, run * QUIET_BLOCK))
        run = 0
    if run >= need:
        out.append((run_start, run * QUIET_BLOCK))
    return out


def first_sound(samples: array.array[int]) -> int | None:
    """The first frame of the first 1 ms block that is not quiet, or None."""
    for k in range(0, len(samples) - QUIET_BLOCK + 1, QUIET_BLOCK):
        seg = samples[k : k + QUIET_BLOCK]
        if max(seg) >= QUIET or min(seg) <= -QUIET:
            return k + next(i for i, v in enumerate(seg) if abs(v) >= QUIET)
    return None


def rms(samples: array.array[int]) -> float:
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples)) / FULL


def classify(peaks: list[float]) -> list[str]:
    """'A' (accent), '1' (loud) or '0' (soft) for each click, by height.

    Relative to the loudest clicks of the stretch, so a volume change scales
    all three levels together.
    """
    if not peaks:
        return []
    top = sorted(peaks)[int(len(peaks) * 0.9)] if len(peaks) >= 8 else max(peaks)
    out = []
    for p in peaks:
        r = p / top
        out.append("A" if r > 0.8 else "1" if r > 0.45 else "0")
    return out


def click_index(seq: list[str], times_s: list[float]) -> list[int | None]:
    """The track's click number (4 per second, modulo 4 * CODE_SECONDS) of each onset.

    Decodes the second number from each run of an accent and the three clicks
    that follow it 250, 500, 750 ms later; clicks in a run that cannot be
    decoded (cut by a start or a stop) get None.
    """
    period = 4 * CODE_SECONDS
    out: list[int | None] = [None] * len(seq)
    for k, c in enumerate(seq):
        if c != "A" or k + 3 >= len(seq):
            continue
        run = seq[k + 1 : k + 4]
        gaps = [times_s[k + m] - times_s[k + m - 1] for m in (1, 2, 3)]
        if "A" in run or any(abs(g - 0.25) > 0.03 for g in gaps):
            continue
        second = int("".join(run), 2)
        for m in range(4):
            out[k + m] = (4 * second + m) % period
        # the clicks before the accent belong to the previous second
        m = 1
        while k - m >= 0 and out[k - m] is None and m <= 3:
            gap = times_s[k - m + 1] - times_s[k - m]
            if abs(gap - 0.25) > 0.03:
                break
            out[k - m] = (4 * second - m) % period
            m += 1
    return out


@dataclass
class ChannelClicks:
    frames: list[float]
    labels: list[int | None]


def channel_clicks(samples: array.array[int], offset: int = 0) -> ChannelClicks:
    found = onsets(samples, offset)
    seq = classify([o.peak for o in found])
    times = [o.frame / RATE for o in found]
    return ChannelClicks([o.frame for o in found], click_index(seq, times))


def paired_offsets_ms(a: ChannelClicks, b: ChannelClicks) -> tuple[list[float], int]:
    """Offsets (b - a, ms) of the clicks both channels played, and how many did not pair.

    Two onsets pair when they carry the same click number and lie within half
    the code period (4 s) of each other: the nearest such onset in ``b`` for
    each labelled onset in ``a``. An onset of ``a`` whose click ``b`` played
    under another number, or not at all, counts as unpaired.
    """
    half_period = CODE_SECONDS / 2 * RATE
    by_label: dict[int, list[float]] = {}
    for f, lab in zip(b.frames, b.labels, strict=True):
        if lab is not None:
            by_label.setdefault(lab, []).append(f)
    offsets: list[float] = []
    unpaired = 0
    for f, lab in zip(a.frames, a.labels, strict=True):
        if lab is None:
            continue
        cands = [g for g in by_label.get(lab, []) if abs(g - f) < half_period]
        if not cands:
            unpaired += 1
            continue
        g = min(cands, key=lambda x: abs(x - f))
        offsets.append((g - f) / RATE * 1000)
    return offsets, unpaired
