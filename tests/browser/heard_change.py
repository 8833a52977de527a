"""A queue change, heard: the next track starts on every page together, with no gap.

Shared by ``test_heard_change.py`` and ``benchmarks/bench_audible.py``. A host
(a plain WebSocket, first in the room) queues two coded click tracks, A (8 s)
and B; each page (its own Chromium process, into its own channel of the
PulseAudio recording, clocks skewed) plays A from 4.5 s before its end, and the
server starts B at A's end. Around B's ``start_at`` the recording gives, per
channel, the silent gaps (the tone runs through both tracks, so any gap is the
change's), and, per click of B heard on every channel, the spread between the
pages: in the first 250 ms after the change (the glitch) and from then on.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import audible, pulse
from .audible import SKEWS_MS, TRACE_DRAIN_JS, launch_listener, open_traced_page
from .conftest import DelayProxy, percentile, probe, wait_for
from .heard_join import boosted
from .sync_scenario import room_url, wait_clocks
from .test_queue_sync import HostSocket, queue_a_then_b

TRACK_A = "heard-a.wav"
TRACK_B = "heard-b.wav"
A_SECONDS = 8
B_SECONDS = 20
PLAY_FROM_END_S = 4.5  # A is played from here before its end: B is announced at once
GLITCH_S = 0.25  # "the first 250 ms" after the change
FIRST_CLICK_BY_S = 0.3  # the change's first click heard on every channel: this soon
AFTER_S = 3.0  # measured after the change, in all
BEFORE_S = 0.5  # gaps are looked for from this long before the change
GAP_MIN_MS = 2.0  # a silent stretch this long is a gap
PROBE_INTERVAL_S = 0.05


@dataclass
class ChangeResult:
    engine: str
    start_at: float  # B's, wall seconds
    glitch_ms: list[float]  # the first click of B heard on every channel (0 or 0.25 s in)
    after_ms: list[float]  # per click of B heard on every channel from 250 ms on
    gaps_ms: list[list[tuple[float, float]]]  # per channel: (s after start_at, length ms)
    missing: list[int]  # per channel: B's clicks the others played and it did not
    heard_late_ms: list[float | None]  # per channel: median onset minus B's timeline
    underruns: list[float]  # s after start_at
    trace: list[list[list[Any]]] = field(default_factory=list)
    # the pages' probes: (s after start_at, position - B's timeline ms, rate, own drift ms)
    said: list[list[tuple[float, float, float, float]]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "glitch_max_ms": _r(max(self.glitch_ms) if self.glitch_ms else None),
            "after_max_ms": _r(max(self.after_ms) if self.after_ms else None),
            "after_p50_ms": _r(percentile(self.after_ms, 0.5)),
            "clicks": len(self.after_ms),
            "gaps": [len(g) for g in self.gaps_ms],
            "longest_gap_ms": _r(max((n for g in self.gaps_ms for _, n in g), default=0.0)),
            "missing": self.missing,
            "heard_late_ms": [_r(x) for x in self.heard_late_ms],
            "underruns": len(self.underruns),
            # each page's own account from GLITCH_S on: its position against the true timeline
            # (its clock's error and its own), and its own drift (the engine's error as it sees it);
            # heard late far from -said_off_ms: the page's output clock was off, not its clock
            "said_off_ms": [_said(ch, 1) for ch in self.said],
            "said_drift_ms": [_said(ch, 3) for ch in self.said],
        }

    def table(self) -> str:
        s = self.summary()
        gaps = "; ".join(
            f"ch{ch} " + ", ".join(f"{t:+.3f}s {n:.0f} ms" for t, n in g)
            for ch, g in enumerate(self.gaps_ms)
            if g
        )
        return (
            f"{self.engine} queue change, as heard: first click's spread {s['glitch_max_ms']} ms;"
            f" from {GLITCH_S * 1000:.0f} ms on p50 {s['after_p50_ms']} max {s['after_max_ms']}"
            f" ms ({s['clicks']} clicks); gaps {s['gaps']} (longest {s['longest_gap_ms']} ms"
            f"{': ' + gaps if gaps else ''}); missing {s['missing']}; heard late vs B's"
            f" timeline {s['heard_late_ms']} ms; underruns {s['underruns']}; the pages said: off"
            f" the timeline {s['said_off_ms']} ms, own drift {s['said_drift_ms']} ms"
        )


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


def _said(readings: list[tuple[float, float, float, float]], field_index: int) -> float | None:
    """The median of one field of a page's probe readings from GLITCH_S after the change on."""
    values = [r[field_index] for r in readings if r[0] > GLITCH_S]
    values = [v for v in values if not math.isnan(v)]
    return _r(percentile(values, 0.5), 2) if values else None


def write_tracks(media: Any) -> None:
    pulse.write_coded_click_track(media / TRACK_A, A_SECONDS)
    pulse.write_coded_click_track(media / TRACK_B, B_SECONDS)


def analyse(rec: pulse.Recorder, start_at: float) -> tuple[Any, ...]:
    """Spreads of B's clicks (first 250 ms, then), gaps and misses per channel, lateness."""
    n = rec.channels
    # B's first click is often not heard whole (Web Audio fades a start in over 4 ms,
    # an element may start a few ms in), and without it the next one cannot be told
    # by its code: the glitch is the spread of each channel's first onset after the change
    a, b = rec.time_frame(start_at - 0.01), rec.time_frame(start_at + FIRST_CLICK_BY_S)
    firsts = [pulse.onsets(rec.channel(ch, a, b), a) for ch in range(n)]
    glitch = []
    if all(firsts):
        heads = [o[0].frame for o in firsts]
        glitch.append((max(heads) - min(heads)) / pulse.RATE * 1000)
    after = audible.Window("after", start_at + GLITCH_S - 0.01, start_at + AFTER_S)
    matched, _ = audible._match(audible._clicks(rec, after))
    spreads = [glitch, [(max(fs) - min(fs)) / pulse.RATE * 1000 for fs in matched]]
    whole = audible.Window("b", start_at - 0.01, start_at + AFTER_S)
    clicks = audible._clicks(rec, whole)
    _, missing = audible._match(clicks)
    late: list[float | None] = []
    for cc in clicks:
        offs = []
        for f, lab in zip(cc.frames, cc.labels, strict=True):
            if lab is None:
                continue
            want = start_at + lab / 4  # B's click `lab` (its quarter second) is due then
            got = rec.frame_time(f)
            d = got - want
            offs.append((d - round(d / pulse.CODE_SECONDS) * pulse.CODE_SECONDS) * 1000)
        late.append(percentile(offs, 0.5) if offs else None)
    a, b = rec.time_frame(start_at - BEFORE_S), rec.time_frame(start_at + AFTER_S)
    gaps = [
        [
            (rec.frame_time(a + f) - start_at, k / pulse.RATE * 1000)
            for f, k in pulse.dropouts(rec.channel(ch, a, b), GAP_MIN_MS)
        ]
        for ch in range(n)
    ]
    return spreads[0], spreads[1], gaps, missing, late


def run_change(
    playwright: Any,
    server: pulse.PulseServer,
    proxy: DelayProxy,
    ws_base: str,
    engine: str,
    wait_s: float = 30.0,
) -> ChangeResult:
    """Three browsers play A to its end; B follows; what they played around the change.

    ``engine`` is each page's, or "mixed" (``audible.page_engines``).
    """
    n = server.channels
    room = f"c{uuid.uuid4().hex[:10]}"
    a_url, b_url = f"/media/{TRACK_A}", f"/media/{TRACK_B}"
    browsers: list[Any] = []
    pages: list[Any] = []
    said: list[list[tuple[float, float, float, float]]] = [[] for _ in range(n)]
    with HostSocket(f"{ws_base}/ws/{room}?name=host") as host:
        try:
            browsers = [launch_listener(playwright, server, ch) for ch in range(n)]
            with boosted(server), server.record() as rec:
                engines = audible.page_engines(engine, n)
                pages = [
                    open_traced_page(b, room_url(proxy, room, engines[i], f"ear{i}"), SKEWS_MS[i])
                    for i, b in enumerate(browsers)
                ]
                wait_clocks(pages, timeout=wait_s)
                queue_a_then_b(host, pages, (a_url, A_SECONDS), (b_url, B_SECONDS), wait_s)
                time.sleep(1.0)  # the pages fetch A (and B, once announced)
                host.send("play", position=A_SECONDS - PLAY_FROM_END_S)
                b_state = wait_for(
                    lambda: host.state_with_track(b_url), PLAY_FROM_END_S + 3, what="B announced"
                )
                assert not host.errors, host.errors
                start_at = b_state["start_at"] / 1000
                while time.time() < start_at + AFTER_S:
                    for i, page in enumerate(pages):
                        got = probe(page) or {}
                        if got.get("valid") and got["room"]["track"]["url"] == b_url:
                            t = got["trueAt"] / 1000 - start_at
                            rate, drift = float(got.get("rate") or 1), got.get("drift")
                            off = (got["position"] - t) * 1000
                            said[i].append((t, off, rate, math.nan if drift is None else drift))
                    time.sleep(PROBE_INTERVAL_S)
                rec.wait_until(start_at + AFTER_S + audible.DECODE_MARGIN_S, timeout=wait_s)
                traces = [page.evaluate(TRACE_DRAIN_JS) for page in pages]
                glitch, after, gaps, missing, late = analyse(rec, start_at)
                underruns = [t - start_at for t in server.underruns(start_at - 1, start_at + 3)]
        finally:
            for b in browsers:
                b.close()
    return ChangeResult(
        engine, start_at, glitch, after, gaps, missing, late, underruns, traces, said
    )
