"""A page that joins mid-song, heard: how long from its join until it sounds with the room.

Used by ``benchmarks/bench_audible.py`` (its join figures). The room's
pages (every channel but the last, each its own Chromium process into its own
channel of the PulseAudio recording, clocks skewed as in ``audible``) play the
coded click track; then the last browser opens the room page (the "tap on
join": with autoplay allowed, the page plays as soon as it can). The recording
from that moment on gives, for every click the joiner plays, its onset minus
the mean onset of the same click on the room's channels: what a listener
between them would hear. Join-to-sync is the time from the tap to the first
click from which every later click is within the bound.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import pulse
from .audible import (
    BOOST_INTERVAL_S,
    SKEWS_MS,
    TRACE_DRAIN_JS,
    TRACE_SCRIPT,
    launch_listener,
    open_traced_page,
)
from .conftest import SKEW_SCRIPT, DelayProxy, percentile, probe, wait_for
from .sync_scenario import find_host, room_url, seek, set_track_and_play, wait_clocks

SYNC_BOUND_MS = 2.0  # "within 2 ms of the room, as heard"
RECORD_S = 5.0  # recorded after each tap
ROOM_SETTLE_S = 3.0  # the room's own pages play this long before the join
PLAY_FROM_S = 20.0  # mid-song
TRACK_SECONDS = 75  # the room plays from PLAY_FROM_S through every join
JOIN_SKEW_MS = 3500.0  # the joiner's clock: the furthest off of the skews
PROBE_INTERVAL_S = 0.05
MIN_HOLD_CLICKS = 4  # a sync claim needs this many clicks after it (1 s)
# The tap on join: the earliest a user can tap is when the page is shown. With
# autoplay allowed (the tests' Chromium) the page needs no tap, and its script
# starts right after; the true clock marks that moment.
SHOWN_SCRIPT = """
document.addEventListener("DOMContentLoaded", () => {
  globalThis.__joinShownAt = globalThis.__msTrueNow
    ? globalThis.__msTrueNow() : performance.timeOrigin + performance.now();
});
"""
SHOWN_JS = "() => globalThis.__joinShownAt || 0"


@dataclass
class JoinResult:
    engine: str
    tap: float  # wall time of the tap on join: the page was shown (its DOM loaded)
    load_s: float  # navigation to shown (a loaded machine takes seconds)
    first_heard_s: float  # tap to the joiner's first click
    sync_s: float  # tap to the first click from which all are within the bound (nan: never)
    errors: list[tuple[float, float]]  # (s after the tap, joiner - room, ms) per click
    room_spread_ms: list[float]  # the room's own channels meanwhile (latest - earliest)
    underruns: list[float]  # s after the tap
    probes: list[dict[str, Any]] = field(default_factory=list)  # the joiner's own account
    trace: list[list[Any]] = field(default_factory=list)  # its audio API calls
    bound_ms: float = SYNC_BOUND_MS

    def summary(self) -> dict[str, Any]:
        late = [abs(e) for t, e in self.errors if not math.isnan(self.sync_s) and t >= self.sync_s]
        return {
            "engine": self.engine,
            "load_s": _r(self.load_s),
            "first_heard_s": _r(self.first_heard_s),
            "join_to_sync_s": _r(self.sync_s),
            "after_sync_p95_ms": _r(percentile(late, 0.95)),
            "room_spread_p95_ms": _r(percentile(self.room_spread_ms, 0.95)),
            "clicks": len(self.errors),
            "underruns": len(self.underruns),
        }

    def table(self) -> str:
        s = self.summary()
        errs = " ".join(f"{t:.2f}:{e:+.1f}" for t, e in self.errors[:16])
        return (
            f"{self.engine} join (page shown {s['load_s']} s after navigating): "
            f"first heard {s['first_heard_s']} s, within {self.bound_ms:g} ms"
            f" of the room {s['join_to_sync_s']} s after the tap (p95 after: "
            f"{s['after_sync_p95_ms']} ms; room's own spread p95 {s['room_spread_p95_ms']} ms;"
            f" underruns {s['underruns']})\n  joiner - room per click (s: ms): {errs}"
        )


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def sync_time(errors: list[tuple[float, float]], bound_ms: float, hold: int) -> float:
    """The time of the first click from which every later one is within ``bound_ms``."""
    since = math.nan
    for t, e in errors:
        if abs(e) <= bound_ms:
            if math.isnan(since):
                since = t
        else:
            since = math.nan
    if math.isnan(since) or sum(1 for t, _ in errors if t >= since) < hold:
        return math.nan
    return since


def analyse(
    rec: pulse.Recorder, tap: float, end: float, margin_s: float = 1.1
) -> tuple[list[tuple[float, float]], list[float], float]:
    """Per joiner click: (s after tap, ms off the room); the room's spreads; first click."""
    n = rec.channels
    a, b = rec.time_frame(tap - margin_s), rec.time_frame(end + margin_s)
    lo, hi = rec.time_frame(tap), rec.time_frame(end)
    clicks = [pulse.channel_clicks(rec.channel(ch, a, b), a) for ch in range(n)]
    half = pulse.CODE_SECONDS / 2 * pulse.RATE
    joiner = clicks[-1]
    errors: list[tuple[float, float]] = []
    spreads: list[float] = []
    first = math.nan
    for f, lab in zip(joiner.frames, joiner.labels, strict=True):
        if not lo <= f < hi:
            continue
        if math.isnan(first):
            first = rec.frame_time(f) - tap
        if lab is None:
            continue
        refs = []
        for cc in clicks[:-1]:
            cands = [
                g
                for g, gl in zip(cc.frames, cc.labels, strict=True)
                if gl == lab and abs(g - f) < half
            ]
            if cands:
                refs.append(min(cands, key=lambda g: abs(g - f)))
        if len(refs) != n - 1:
            continue
        mean = sum(refs) / len(refs)
        errors.append((rec.frame_time(f) - tap, (f - mean) / pulse.RATE * 1000))
        spreads.append((max(refs) - min(refs)) / pulse.RATE * 1000)
    return errors, spreads, first


@contextlib.contextmanager
def boosted(server: pulse.PulseServer) -> Iterator[None]:
    """Real-time priority for the browsers' PulseAudio threads as they open (as ``audible.run``)."""
    stop = threading.Event()

    def boost() -> None:
        while not stop.wait(BOOST_INTERVAL_S):
            server.boost_clients()

    thread = threading.Thread(target=boost, name="audio-boost", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def run_joins(
    playwright: Any,
    server: pulse.PulseServer,
    proxy: DelayProxy,
    engine: str,
    track_url: str,
    joins: int = 1,
    wait_s: float = 30.0,
    bound_ms: float = SYNC_BOUND_MS,
) -> list[JoinResult]:
    """The room's pages play; the last browser joins mid-song ``joins`` times, a fresh page each."""
    n = server.channels
    browsers: list[Any] = []
    results: list[JoinResult] = []
    try:
        browsers = [launch_listener(playwright, server, ch) for ch in range(n)]
        with boosted(server), server.record() as rec:
            room = f"j{uuid.uuid4().hex[:10]}"
            pages = [
                open_traced_page(b, room_url(proxy, room, engine, f"room{i}"), SKEWS_MS[i])
                for i, b in enumerate(browsers[:-1])
            ]
            wait_clocks(pages, timeout=wait_s)
            host = find_host(pages)
            set_track_and_play(host, track_url)
            wait_for(
                lambda: all((probe(p) or {}).get("valid") for p in pages),
                wait_s,
                0.05,
                "the room playing",
            )
            seek(host, PLAY_FROM_S)
            wait_for(
                lambda: all(
                    (p := probe(pg)) and p.get("valid") and p["position"] > PLAY_FROM_S
                    for pg in pages
                ),
                wait_s,
                0.05,
                "the room playing mid-song",
            )
            time.sleep(ROOM_SETTLE_S)
            for k in range(joins):
                got = _join_once(
                    browsers[-1], rec, server, proxy, room, engine, k, wait_s, bound_ms
                )
                results.append(got)
    finally:
        for b in browsers:
            b.close()
    return results


def _join_once(
    browser: Any,
    rec: pulse.Recorder,
    server: pulse.PulseServer,
    proxy: DelayProxy,
    room: str,
    engine: str,
    k: int,
    wait_s: float,
    bound_ms: float,
) -> JoinResult:
    """A fresh page (its own context: nothing cached, no clock) joins; recorded, then closed."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        context.add_init_script(SKEW_SCRIPT % {"skew": JOIN_SKEW_MS, "ppm": 0.0})
        context.add_init_script(TRACE_SCRIPT)
        context.add_init_script(SHOWN_SCRIPT)
        page = context.new_page()
        navigated = time.time()
        page.goto(room_url(proxy, room, engine, f"joiner{k}"), wait_until="domcontentloaded")
        tap = wait_for(lambda: page.evaluate(SHOWN_JS), wait_s, 0.01, "the page shown") / 1000
        probes: list[dict[str, Any]] = []
        end = tap + RECORD_S
        while time.time() < end:
            got = probe(page)
            if got:
                got.pop("room", None)
                got["t"] = time.time() - tap
                probes.append(got)
            time.sleep(PROBE_INTERVAL_S)
        trace = page.evaluate(TRACE_DRAIN_JS)
    finally:
        context.close()
    rec.wait_until(end + 1.2, timeout=wait_s)
    errors, spreads, first = analyse(rec, tap, end)
    return JoinResult(
        engine,
        tap,
        tap - navigated,
        first,
        sync_time(errors, bound_ms, MIN_HOLD_CLICKS),
        errors,
        spreads,
        [t - tap for t in server.underruns(tap, end)],
        probes,
        trace,
        bound_ms,
    )
