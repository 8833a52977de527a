"""Sync measured by ear: record what several real Chromium browsers play.

The scenario shared by ``test_audible.py`` and ``benchmarks/bench_audible.py``.
Each listener is a separate Chromium *process* whose sound goes to its own
channel of one PulseAudio null sink (see ``pulse.py``); one ``parec`` records
them all, sample-aligned. The pages join one room through the delaying proxy
with skewed clocks (as in ``sync_scenario``); the host plays, seeks, pauses and
resumes, the proxy drops every connection, and a listener reloads its page.
Each phase is cut out of the recording and the clicks of the coded click track
are matched across channels: the per-click spread between browsers is what a
listener would hear.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pulse
from .conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SKEW_SCRIPT,
    DelayProxy,
    percentile,
    probe,
    wait_for,
)
from .sync_scenario import find_host, room_url, seek, set_track_and_play, toggle_play, wait_clocks

TRACK_FILE = "coded-clicks.wav"
TRACK_SECONDS = 150
SKEWS_MS = (-2000.0, 0.0, 3500.0)
SEEK_TO_S = 60.0
# a margin of recording on each side of a window, so the clicks at its edges
# can still be told apart by their second's code
DECODE_MARGIN_S = 1.1
PAUSE_HOLD_S = 1.5
# after the pause takes effect: the fade (4 ms) and the output buffers
# (tens of ms) drain within this
PAUSE_DRAIN_S = 0.25
RESUME_LEAD_S = 0.25
SILENCE_RMS = 0.002  # the tone alone is 0.057 RMS
INTERVAL_JUMP_MS = 5.0  # a click interval this far from 250 ms (x rate): a jump
BOOST_INTERVAL_S = 0.5
PROBE_INTERVAL_S = 0.2  # the pages' own accounts, sampled while recording
MIN_SETTLING_S = 2.0  # the stretch after a change reported on its own, at least
JOIN_SETTLE_S = 5.0  # the play right after the join: the clocks are still converging


def page_engines(engine: str, n: int) -> list[str]:
    """Each page's engine: all the same, or for "mixed" every other page on Web Audio.

    (The rest on ``<audio>``: with three pages, two ``<audio>`` pages and a Web
    Audio one between them, so the spread holds both how the ``<audio>`` pages
    agree and where the engine is heard against Web Audio.)
    """
    if engine == "mixed":
        return ["webaudio" if i % 2 else "element" for i in range(n)]
    return [engine] * n


def launch_listener(playwright: Any, server: pulse.PulseServer, channel: int) -> Any:
    """A Chromium process whose audio goes to ``channel`` of the recording."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        # Playwright mutes headless Chromium; this test needs the real output
        ignore_default_args=["--mute-audio"],
        env=server.client_env(channel),
    )


# What the page asks of the audio APIs, stamped with the true clock (the skew
# script's __msTrueNow): Web Audio source starts (and whether start() came
# after its own time, which Web Audio does not make up for), stops, playback
# rate changes, jumps in the getOutputTimestamp mapping; <audio> play, pause,
# seeks and rate changes. Read with TRACE_DRAIN_JS.
TRACE_SCRIPT = """
(() => {
  const log = [];
  Object.defineProperty(globalThis, "__audibleTrace", { value: log, enumerable: false });
  const now = () => globalThis.__msTrueNow ? globalThis.__msTrueNow()
    : performance.timeOrigin + performance.now();
  const push = (e) => { if (log.length < 20000) log.push(e); };
  const wrap = (proto, name, make) => {
    const orig = proto && proto[name];
    if (typeof orig === "function") proto[name] = make(orig);
  };
  const rates = new WeakSet();
  if (globalThis.AudioContext) {
    wrap(BaseAudioContext.prototype, "createBufferSource", (orig) => function () {
      const node = orig.apply(this, arguments);
      rates.add(node.playbackRate);
      return node;
    });
    wrap(AudioBufferSourceNode.prototype, "start", (orig) => function (when) {
      push(["start", now(), when || 0, this.context.currentTime]);
      return orig.apply(this, arguments);
    });
    wrap(AudioParam.prototype, "setValueAtTime", (orig) => function (value, at) {
      if (rates.has(this)) push(["rate", now(), value, at]);
      return orig.apply(this, arguments);
    });
    const last = new WeakMap();
    wrap(AudioContext.prototype, "getOutputTimestamp", (orig) => function () {
      const ts = orig.apply(this, arguments);
      if (ts && ts.contextTime > 0) {
        const off = ts.contextTime * 1000 - ts.performanceTime;
        const prev = last.get(this);
        if (prev !== undefined && Math.abs(off - prev) > 2) push(["jump", now(), off - prev]);
        last.set(this, off);
      }
      return ts;
    });
  }
  // <audio> events name their element (1, 2, ... in order of first use) and, for
  // play and pause, the page function that called (the page keeps a spare element)
  const media = HTMLMediaElement.prototype;
  const ids = new WeakMap();
  let lastId = 0;
  const idOf = (el) => { if (!ids.has(el)) ids.set(el, ++lastId); return ids.get(el); };
  const caller = () => {
    const line = (new Error().stack || "").split("\\n")[3] || "";
    const m = line.match(/at (?:async )?([\\w.$<>]+) /);
    return m ? m[1] : "?";
  };
  wrap(media, "play", (orig) => function () {
    push(["el-play", now(), this.currentTime, idOf(this), caller()]);
    return orig.apply(this, arguments);
  });
  wrap(media, "pause", (orig) => function () {
    push(["el-pause", now(), this.currentTime, idOf(this), caller()]);
    return orig.apply(this, arguments);
  });
  for (const [prop, tag] of [["currentTime", "el-seek"], ["playbackRate", "el-rate"]]) {
    const d = Object.getOwnPropertyDescriptor(media, prop);
    if (!d || !d.set) continue;
    const set = function (v) { push([tag, now(), v, idOf(this)]); d.set.call(this, v); };
    Object.defineProperty(media, prop, { ...d, set });
  }
})();
"""
TRACE_DRAIN_JS = "() => (globalThis.__audibleTrace || []).splice(0)"


def open_traced_page(browser: Any, url: str, skew_ms: float) -> Any:
    """``conftest.open_skewed_page`` plus the audio API trace."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.add_init_script(SKEW_SCRIPT % {"skew": float(skew_ms), "ppm": 0.0})
    context.add_init_script(TRACE_SCRIPT)
    page = context.new_page()
    page.goto(url)
    return page


@dataclass
class Window:
    """A stretch of the recording (wall-clock seconds) to analyse as one phase."""

    name: str
    start: float
    end: float
    discarded: int = 0  # earlier windows of this phase dropped for underruns
    underruns: int = 0  # PulseAudio underruns inside this one (the machine, not the page)
    settling: bool = False  # the seconds right after a change, before the settle time


@dataclass
class PhaseResult:
    name: str
    seconds: float
    spreads_ms: list[float]  # per click heard on every channel: latest - earliest
    offsets_ms: list[list[float]]  # per channel: its onset minus channel 0's
    heard_late_ms: list[list[float]]  # per channel: onset minus the room timeline
    missing: list[int]  # per channel: clicks the other channels played and it did not
    jumps: list[int]  # per channel: intervals between its clicks off by > 5 ms
    dropouts_ms: list[list[float]]  # per channel: silent gaps (>= 2 ms) while playing
    underruns: int = 0  # logged by PulseAudio in the window (the machine starved a stream)
    discarded: int = 0  # earlier windows dropped for underruns
    settling: bool = False  # right after a change: reported, not held to the bounds
    # what the pages said meanwhile (their debug probe: the position at the output now)
    reported_spreads_ms: list[float] = field(default_factory=list)
    reported_late_ms: list[list[float]] = field(default_factory=list)
    # from the audio API trace, per channel
    restarts: list[int] = field(default_factory=list)  # Web Audio starts / <audio> seeks in it
    late_start_ms: list[float] = field(default_factory=list)  # start() after its own time
    clock_jumps: list[int] = field(default_factory=list)  # getOutputTimestamp mapping jumps

    def summary(self) -> dict[str, Any]:
        s = self.spreads_ms
        return {
            "phase": self.name,
            "seconds": _r(self.seconds),
            "clicks": len(s),
            "p50": _r(percentile(s, 0.5), 3),
            "p95": _r(percentile(s, 0.95), 3),
            "max": _r(max(s), 3) if s else None,
            "mean_offset_vs_ch0": [_r(sum(o) / len(o), 3) if o else None for o in self.offsets_ms],
            "heard_late_p50": [_r(percentile(h, 0.5)) for h in self.heard_late_ms],
            "missing": self.missing,
            "jumps": self.jumps,
            "dropouts": [len(d) for d in self.dropouts_ms],
            "dropout_ms": [_r(sum(d), 1) for d in self.dropouts_ms],
            "underruns": self.underruns,
            "discarded": self.discarded,
            "settling": self.settling,
            "reported_p95": _r(percentile(self.reported_spreads_ms, 0.95), 3),
            "reported_late_p50": [_r(percentile(r, 0.5)) for r in self.reported_late_ms],
            "restarts": self.restarts,
            "late_start_ms": [_r(x, 1) for x in self.late_start_ms],
            "clock_jumps": self.clock_jumps,
        }


def _r(x: float, digits: int = 2) -> float | None:
    """Rounded for the report; None (JSON null) when there is no figure."""
    return round(x, digits) if math.isfinite(x) else None


def _spread(values: list[float]) -> float:
    finite = [x for x in values if math.isfinite(x)]
    return max(finite) - min(finite) if finite else math.nan


@dataclass
class SilenceResult:
    """The pause: when each channel stopped, its silence, and when it started again.

    Stop and restart times are read off the recording (the tone stops and
    starts with the sound) against the pause's and the resume's ``start_at``,
    through the recorder's clock: good to a few ms in absolute terms, exact
    between channels.
    """

    rms: list[float]  # per channel, over the middle of the pause
    clicks: list[int]  # per channel: clicks heard in it (should be none)
    stop_ms: list[float]  # per channel: when its sound stopped, minus the pause's start_at
    restart_ms: list[float]  # per channel: when its sound came back, minus the resume's start_at
    seconds: float
    underruns: int = 0  # PulseAudio underruns within a second of the stop or the restart

    @property
    def stop_spread_ms(self) -> float:
        return _spread(self.stop_ms)

    @property
    def restart_spread_ms(self) -> float:
        return _spread(self.restart_ms)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": _r(self.seconds),
            "rms": [_r(x, 5) for x in self.rms],
            "clicks": self.clicks,
            "stop_vs_start_at_ms": [_r(x, 1) for x in self.stop_ms],
            "stop_spread_ms": _r(self.stop_spread_ms),
            "restart_vs_start_at_ms": [_r(x, 1) for x in self.restart_ms],
            "restart_spread_ms": _r(self.restart_spread_ms),
            "underruns": self.underruns,
        }


@dataclass
class ProbeRound:
    """Every page's own account, one probe each: (true time s, position s) or None."""

    true_s: float
    readings: list[tuple[float, float] | None]


def probe_round(pages: list[Any]) -> ProbeRound:
    readings: list[tuple[float, float] | None] = []
    for page in pages:
        s = probe(page)
        if s and s.get("valid"):
            readings.append((s["trueAt"] / 1000, float(s["position"])))
        else:
            readings.append(None)
    return ProbeRound(time.time(), readings)


@dataclass
class Timeline:
    """The room states the host saw, to say where the track should be at a wall time.

    The server clock is epoch ms read once and advanced by the monotonic clock,
    the same machine's clock as ``time.time()`` here.
    """

    states: list[dict[str, Any]] = field(default_factory=list)

    def add(self, room: dict[str, Any]) -> None:
        if not any(s["version"] == room["version"] for s in self.states):
            self.states.append(room)
            self.states.sort(key=lambda s: (s["start_at"], s["version"]))

    def position(self, wall_s: float) -> float | None:
        ms = wall_s * 1000
        cur = None
        for s in self.states:
            if s["start_at"] <= ms:
                cur = s
        if cur is None or cur["paused"]:
            return None
        return float(cur["position"] + (ms - cur["start_at"]) / 1000 * (cur.get("rate") or 1))


@dataclass
class Report:
    engine: str
    channels: int
    phases: list[PhaseResult] = field(default_factory=list)
    pause: SilenceResult | None = None
    events: dict[str, float] = field(default_factory=dict)  # seconds each step took

    def phase(self, name: str) -> PhaseResult:
        return next(p for p in self.phases if p.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "channels": self.channels,
            "phases": [p.summary() for p in self.phases],
            "pause": self.pause.summary() if self.pause else None,
            "events_s": {k: round(v, 2) for k, v in self.events.items()},
        }

    def table(self) -> str:
        def f(x: float | None, spec: str = "6.2f") -> str:
            return format(x, spec) if x is not None else format("-", spec[: spec.index(".")])

        def ms(values: list[float | None]) -> str:
            return " ".join(f(x, "+.1f") if x is not None else "-" for x in values)

        lines = [
            f"{self.engine}: spread between {self.channels} browsers as heard, ms "
            "(self: what the pages reported meanwhile)",
            f"{'phase':<9} {'s':>4} {'clicks':>6} {'p50':>6} {'p95':>6} {'max':>6} {'self95':>6}"
            f"  {'offset vs ch0':<17} {'heard late':<17} {'self late':<17}"
            " missing jumps dropouts underruns(discarded) restarts late-start",
        ]
        for p in self.phases:
            s = p.summary()
            lines.append(
                f"{p.name:<9} {f(s['seconds'], '4.1f')} {s['clicks']:>6} {f(s['p50'])} "
                f"{f(s['p95'])} {f(s['max'])} {f(s['reported_p95'])}  "
                f"{ms(s['mean_offset_vs_ch0']):<17} {ms(s['heard_late_p50']):<17} "
                f"{ms(s['reported_late_p50']):<17} "
                f"{s['missing']} {s['jumps']} {s['dropouts']} {s['underruns']}({s['discarded']}) "
                f"{s['restarts']} {s['late_start_ms']}"
            )
        if self.pause:
            ps = self.pause.summary()
            lines.append(
                f"pause: {f(ps['seconds'], '.1f')} s silent: rms {ps['rms']} "
                f"clicks {ps['clicks']}; "
                f"stopped {ps['stop_vs_start_at_ms']} ms after start_at "
                f"(spread {ps['stop_spread_ms']}); "
                f"restarted {ps['restart_vs_start_at_ms']} (spread {ps['restart_spread_ms']}); "
                f"underruns {ps['underruns']}"
            )
        lines.append("steps (s): " + " ".join(f"{k}={v:.1f}" for k, v in self.events.items()))
        return "\n".join(lines)


# -- analysis -----------------------------------------------------------------


def _clicks(rec: pulse.Recorder, window: Window) -> list[pulse.ChannelClicks]:
    """Labelled clicks per channel, decoded with a margin, kept inside the window."""
    a = rec.time_frame(window.start - DECODE_MARGIN_S)
    b = rec.time_frame(window.end + DECODE_MARGIN_S)
    lo, hi = rec.time_frame(window.start), rec.time_frame(window.end)
    out = []
    for ch in range(rec.channels):
        found = pulse.channel_clicks(rec.channel(ch, a, b), a)
        keep = [k for k, f in enumerate(found.frames) if lo <= f < hi]
        out.append(
            pulse.ChannelClicks([found.frames[k] for k in keep], [found.labels[k] for k in keep])
        )
    return out


def _match(clicks: list[pulse.ChannelClicks]) -> tuple[list[list[float]], list[int]]:
    """Frames of the clicks every channel played, and per channel how many it lacks.

    Onsets are grouped by click number, in time order; two onsets with the same
    number further apart than half the code period (4 s) are different clicks.
    """
    half = pulse.CODE_SECONDS / 2 * pulse.RATE
    items = sorted(
        (f, ch, lab)
        for ch, cc in enumerate(clicks)
        for f, lab in zip(cc.frames, cc.labels, strict=True)
        if lab is not None
    )
    groups: list[dict[int, float]] = []  # channel -> frame, one click each
    labels: list[int] = []
    for f, ch, lab in items:
        for g, glab in zip(groups, labels, strict=True):
            if glab == lab and ch not in g and abs(min(g.values()) - f) < half:
                g[ch] = f
                break
        else:
            groups.append({ch: f})
            labels.append(lab)
    n = len(clicks)
    full = [[g[ch] for ch in range(n)] for g in groups if len(g) == n]
    missing = [sum(1 for g in groups if ch not in g) for ch in range(n)]
    return full, missing


def _jumps(cc: pulse.ChannelClicks) -> int:
    n = 0
    for k in range(len(cc.frames) - 1):
        a, b = cc.labels[k], cc.labels[k + 1]
        if a is None or b is None:
            continue
        steps = (b - a) % (4 * pulse.CODE_SECONDS)
        gap_ms = (cc.frames[k + 1] - cc.frames[k]) / pulse.RATE * 1000
        if steps == 0 or abs(gap_ms - steps * 250) > INTERVAL_JUMP_MS * steps:
            n += 1
    return n


def _heard_late_ms(rec: pulse.Recorder, cc: pulse.ChannelClicks, timeline: Timeline) -> list[float]:
    """How late each click is heard against the room timeline (recorder clock: a few ms)."""
    period = float(pulse.CODE_SECONDS)
    out = []
    for f, lab in zip(cc.frames, cc.labels, strict=True):
        pos = timeline.position(rec.frame_time(f))
        if lab is None or pos is None:
            continue
        q = lab / 4
        q += round((pos - q) / period) * period
        out.append((pos - q) * 1000)
    return out


def _trace_figures(window: Window, trace: list[list[Any]]) -> tuple[int, float, int]:
    """Restarts and mapping jumps inside the window; the latest late start() still playing."""
    a, b = window.start * 1000, window.end * 1000
    restarts = sum(1 for e in trace if e[0] in ("start", "el-seek") and a <= e[1] < b)
    jumps = sum(1 for e in trace if e[0] == "jump" and a <= e[1] < b)
    starts = [e for e in trace if e[0] == "start" and e[1] < b]
    playing = [e for e in starts if e[1] >= a] + [e for e in starts if e[1] < a][-1:]
    late = max((max(0.0, (e[3] - e[2]) * 1000) for e in playing), default=0.0)
    return restarts, late, jumps


def analyse_phase(
    rec: pulse.Recorder,
    window: Window,
    timeline: Timeline,
    rounds: list[ProbeRound],
    traces: list[list[list[Any]]],
) -> PhaseResult:
    clicks = _clicks(rec, window)
    figures = [_trace_figures(window, t) for t in traces]
    inside = [r for r in rounds if window.start <= r.true_s < window.end]
    reported_late: list[list[float]] = [[] for _ in clicks]
    reported_spreads = []
    for r in inside:
        late: list[float] = []
        for ch, reading in enumerate(r.readings):
            want = timeline.position(reading[0]) if reading else None
            if reading is None or want is None:
                continue
            late.append((want - reading[1]) * 1000)
            reported_late[ch].append(late[-1])
        if len(late) == len(r.readings):
            reported_spreads.append(max(late) - min(late))
    matched, missing = _match(clicks)
    spreads = [(max(fs) - min(fs)) / pulse.RATE * 1000 for fs in matched]
    offsets = [
        [(fs[ch] - fs[0]) / pulse.RATE * 1000 for fs in matched] for ch in range(len(clicks))
    ]
    return PhaseResult(
        name=window.name,
        seconds=window.end - window.start,
        spreads_ms=spreads,
        offsets_ms=offsets,
        heard_late_ms=[_heard_late_ms(rec, cc, timeline) for cc in clicks],
        missing=missing,
        jumps=[_jumps(cc) for cc in clicks],
        dropouts_ms=[
            [
                n / pulse.RATE * 1000
                for _, n in pulse.dropouts(
                    rec.channel(ch, rec.time_frame(window.start), rec.time_frame(window.end))
                )
            ]
            for ch in range(rec.channels)
        ],
        underruns=window.underruns,
        discarded=window.discarded,
        settling=window.settling,
        reported_spreads_ms=reported_spreads,
        reported_late_ms=reported_late,
        restarts=[f[0] for f in figures],
        late_start_ms=[f[1] for f in figures],
        clock_jumps=[f[2] for f in figures],
    )


def analyse_pause(rec: pulse.Recorder, pause_at: float, resume_at: float) -> SilenceResult:
    """Silence in the middle of the pause; when each channel stopped and restarted.

    The silent stretch runs from the pause's start_at plus the drain time to a
    quarter second before the resume's start_at (an engine may start early to
    land on time; how early shows in the restart figures).
    """
    quiet_from = pause_at + PAUSE_DRAIN_S
    quiet_to = resume_at - RESUME_LEAD_S
    rms, clicks, stops, restarts = [], [], [], []
    a = rec.time_frame(pause_at - 0.3)
    lo, hi = rec.time_frame(quiet_from), rec.time_frame(quiet_to)
    for ch in range(rec.channels):
        quiet = rec.channel(ch, lo, hi)
        rms.append(pulse.rms(quiet))
        clicks.append(len(pulse.onsets(quiet)))
        gaps = pulse.dropouts(rec.channel(ch, a, hi), min_ms=50)
        stops.append((rec.frame_time(a + gaps[0][0]) - pause_at) * 1000 if gaps else math.nan)
        # the first sound after the middle of the pause
        b = rec.time_frame((quiet_from + quiet_to) / 2)
        back = pulse.first_sound(rec.channel(ch, b, rec.time_frame(resume_at + 1.5)))
        restarts.append(
            (rec.frame_time(b + back) - resume_at) * 1000 if back is not None else math.nan
        )
    return SilenceResult(rms, clicks, stops, restarts, quiet_to - quiet_from)


# -- the scenario ---------------------------------------------------------------


@dataclass
class Settings:
    engine: str
    settle_s: float  # after a change, before measuring
    measure_s: float  # measured per phase
    wait_s: float = 30.0  # generous: other browsers may share the two cores
    clean_timeout_s: float = 12.0  # per phase: how long to look for a window without underruns
    clean_budget_s: float = 25.0  # per run: the most time spent looking, all phases together
    boost: bool = True  # real-time priority for the browsers' PulseAudio threads


def _wait_playing(pages: list[Any], timeout: float, what: str, min_pos: float = 0.0) -> None:
    def playing() -> bool:
        for page in pages:
            p = probe(page)
            if not (p and p.get("valid") and (p.get("position") or 0) >= min_pos):
                return False
        return True

    wait_for(playing, timeout, 0.05, what)


def _wait_silent(pages: list[Any], timeout: float) -> None:
    wait_for(lambda: not any((probe(p) or {}).get("valid") for p in pages), timeout, 0.05, "paused")


def _state_after(host: Any, version: int, paused: bool, timeout: float) -> dict[str, Any]:
    """The host's first room state after ``version`` that is (not) paused."""

    def newer() -> dict[str, Any] | None:
        p = probe(host)
        room = p and p["room"]
        if room and room["version"] > version and room["paused"] == paused:
            result: dict[str, Any] = room
            return result
        return None

    room: dict[str, Any] = wait_for(newer, timeout, 0.05, "the new room state")
    return room


def run(
    playwright: Any,
    server: pulse.PulseServer,
    proxy: DelayProxy,
    settings: Settings,
    track_url: str = f"/media/{TRACK_FILE}",
    say: Callable[[str], None] = lambda _: None,
    keep_wav: Path | None = None,
) -> Report:
    """Play, seek, pause/resume, drop every connection, reload a listener; analyse each."""
    engine, settle, meas = settings.engine, settings.settle_s, settings.measure_s
    n = server.channels
    report = Report(engine, n)
    timeline = Timeline()
    windows: list[Window] = []
    rounds: list[ProbeRound] = []
    pages: list[Any] = []
    traces: list[list[list[Any]]] = [[] for _ in range(n)]
    browsers: list[Any] = []
    clock = time.monotonic()
    budget = settings.clean_budget_s

    def step(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        report.events[name] = now - clock
        clock = now
        say(f"{engine}: {name} ({report.events[name]:.1f} s)")

    def sample_until(end: float) -> None:
        """Take the pages' own accounts until ``end``, then wait for the recording."""
        while time.time() < end:
            rounds.append(probe_round(pages))
            time.sleep(max(0.0, min(PROBE_INTERVAL_S, end - time.time())))
        rec.wait_until(end + 0.05, timeout=settings.wait_s)

    def settling(name: str, changed_at: float) -> None:
        """The stretch from a change to the measured window: how the pages get together."""
        end = changed_at + max(settle, MIN_SETTLING_S)
        sample_until(end)
        windows.append(
            Window(f"{name}:0", changed_at, end, underruns=len(server.underruns(changed_at, end)))
        )
        windows[-1].settling = True

    def measure(name: str, since: float, start: float, min_end: float = 0.0) -> None:
        """Record a window of the phase that began at ``since``, free of underruns.

        A window (with the settle time before it, back to ``since``) in which
        PulseAudio logged an underrun measures the machine, not the pages: the
        next window starts a settle time after the last underrun, until
        ``clean_timeout_s``; then the last one is kept, marked.
        """
        nonlocal budget
        began = time.time()
        deadline = began + min(settings.clean_timeout_s, budget)
        discarded = 0
        while True:
            end = max(start + meas, min_end)
            sample_until(end)
            bad = server.underruns(max(since, start - settle), end)
            if not bad or time.time() + settle + meas > deadline:
                break
            discarded += 1
            start = max(bad) + settle + 0.01  # the next window starts after them
            min_end = 0.0
        if discarded:
            budget -= time.time() - began
        windows.append(Window(name, start, end, discarded, len(bad)))
        step(name)

    stop_boost = threading.Event()

    def boost() -> None:
        while not stop_boost.wait(BOOST_INTERVAL_S):
            server.boost_clients()

    booster = threading.Thread(target=boost, name="audio-boost", daemon=True)
    if settings.boost:
        booster.start()
    try:
        browsers = [launch_listener(playwright, server, ch) for ch in range(n)]
        with server.record() as rec:
            room = f"a{uuid.uuid4().hex[:10]}"
            engines = page_engines(engine, n)
            pages = [
                open_traced_page(
                    b, room_url(proxy, room, engines[i], f"ear{i}"), SKEWS_MS[i % len(SKEWS_MS)]
                )
                for i, b in enumerate(browsers)
            ]
            wait_clocks(pages, timeout=settings.wait_s)
            for page, want in zip(pages, engines, strict=True):
                assert probe(page)["engine"] == want
            host = find_host(pages)
            listener = pages[-1] if pages[-1] is not host else pages[0]
            step("join")

            # play
            version = probe(host)["room"]["version"]
            set_track_and_play(host, track_url)
            playing = _state_after(host, version, False, settings.wait_s)
            timeline.add(playing)
            _wait_playing(pages, settings.wait_s, "all pages playing")
            step("start")
            now = time.time()
            # The first change after a join also waits out the join's convergence
            # (bench-sync: 2-6 s): a CI run measured one fresh page 8.5 ms apart
            # at 1 s, its own reading 3.4 ms; by the seek it was 4.7, later 1.2.
            measure("play", now, now + max(settle, JOIN_SETTLE_S))
            settling("play", playing["start_at"] / 1000)

            # seek
            version = probe(host)["room"]["version"]
            seek(host, SEEK_TO_S)
            sought = _state_after(host, version, False, settings.wait_s)
            timeline.add(sought)
            _wait_playing(pages, settings.wait_s, "playing after the seek", SEEK_TO_S)
            step("seek-landed")
            now = time.time()
            measure("seek", now, now + settle)
            settling("seek", sought["start_at"] / 1000)

            # pause, hold, resume
            version = probe(host)["room"]["version"]
            toggle_play(host)
            paused = _state_after(host, version, True, settings.wait_s)
            timeline.add(paused)
            _wait_silent(pages, settings.wait_s)
            pause_at = paused["start_at"] / 1000
            rec.wait_until(pause_at + PAUSE_DRAIN_S + PAUSE_HOLD_S, timeout=settings.wait_s)
            version = paused["version"]
            toggle_play(host)
            resumed = _state_after(host, version, False, settings.wait_s)
            timeline.add(resumed)
            resume_at = resumed["start_at"] / 1000
            _wait_playing(pages, settings.wait_s, "playing after the resume")
            step("pause-resume")
            now = max(time.time(), resume_at)
            measure("resume", now, now + settle)
            settling("resume", resume_at)

            # every connection dropped: the pages reconnect and keep playing
            before = proxy.connections
            dropped_at = time.time()
            proxy.drop_all()
            wait_for(
                lambda: (
                    proxy.connections >= before + n
                    and all((probe(p) or {}).get("connection") == "open" for p in pages)
                ),
                settings.wait_s,
                0.05,
                "every page reconnected",
            )
            step("reconnect")
            # measured from the drop on, through the reconnect: playback must not notice
            measure("drop", dropped_at, dropped_at, min_end=time.time())

            # a listener reloads its page
            traces[pages.index(listener)] += listener.evaluate(TRACE_DRAIN_JS)
            listener.reload()
            _wait_playing([listener], settings.wait_s, "the reloaded page playing")
            back_at = time.time()
            _wait_playing(pages, settings.wait_s, "all pages playing after the reload")
            step("reload")
            now = time.time()
            measure("reload", now, now + settle)
            settling("reload", back_at)

            rec.wait_until(time.time(), timeout=settings.wait_s)
            for ch, page in enumerate(pages):
                traces[ch] += page.evaluate(TRACE_DRAIN_JS)
            if keep_wav is not None:
                rec.save_wav(keep_wav)
                keep_wav.with_suffix(".json").write_text(
                    json.dumps(
                        {
                            "t0": rec.frame_time(0),
                            "windows": [(w.name, w.start, w.end) for w in windows],
                            "underruns": server.underruns(0, math.inf),
                            "states": timeline.states,
                            "pause_at": pause_at,
                            "resume_at": resume_at,
                            "rounds": [(r.true_s, r.readings) for r in rounds],
                            "traces": traces,
                        }
                    )
                )
            for w in windows:
                report.phases.append(analyse_phase(rec, w, timeline, rounds, traces))
            report.pause = analyse_pause(rec, pause_at, resume_at)
            report.pause.underruns = len(server.underruns(pause_at - 1, pause_at + 1)) + len(
                server.underruns(resume_at - 1, resume_at + 1)
            )
            step("analysis")
    finally:
        stop_boost.set()
        for b in browsers:
            b.close()
        if booster.is_alive():
            booster.join(5)
    return report
