"""Three browsers are *heard* together: their real audio output, recorded and compared.

The other browser tests read each page's own account of its output clock.
This one records what three separate Chromium processes actually play, each
into one channel of a private PulseAudio null sink (one sample-aligned
recording; see ``pulse.py``), and matches the clicks of a coded click track
across the channels (see ``audible.py``): through play, a seek, a pause (every
channel silent) and resume, every connection dropped, and a listener's page
reload, in a Web Audio room and in a mixed one (two ``<audio>`` pages with a
Web Audio page between them). Each phase is judged after the room's settle time
(Web Audio 1 s, mixed 4 s) against the target for the spread between browsers
(p95 < 5 ms, max < 10 ms). And each page must be heard where it says it is, as
the others are (within ``SAID_AGREEMENT_MS``): its lateness heard, less the
lateness it reports, is its engine's own error, whatever its clock's, so an
engine heard a few ms off its own account shows even when every page is on it
(a routed ``<audio>`` page was heard 4.7 ms after Web Audio pages that way).

A window in which PulseAudio logged an underrun (another process starved a
browser's audio output; no page can prevent the gap) says nothing about the
pages, so the next window is measured instead; if the machine keeps starving
the output, and nothing wrong was heard otherwise, the test ends as xfail
("could not judge"). Anything wrong heard in a clean window fails it, with
what the audio API trace says the page did.

    pytest tests/browser/test_audible.py -s          # prints the tables
    MUSICSYNC_AUDIBLE_WAV=DIR pytest ...              # keeps each recording (WAV + JSON)

Needs ``pulseaudio`` and ``pulseaudio-utils`` (``just setup`` installs them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import audible, pulse
from .conftest import DelayProxy, ServerProcess, percentile, probe, serving, wait_for
from .sync_scenario import room_url, wait_clocks

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not pulse.available(), reason="needs pulseaudio and pulseaudio-utils (just setup)"
    ),
]

BROWSERS = 3
MEASURE_S = 3.0
SETTLE_S = {"webaudio": 1.0, "mixed": 4.0}
# The engines' targets for the spread between browsers, as heard.
BOUNDS_MS = {
    "webaudio": {"p95": 5.0, "max": 10.0, "heard_late": 30.0},
    "mixed": {"p95": 5.0, "max": 10.0, "heard_late": 30.0},
}
# Each page's lateness as heard less the lateness it reports (its engine's own error, not its
# clock's) is within this of every other page's: same-engine pages agree within ~1.5 ms.
SAID_AGREEMENT_MS = 3.0
# "heard_late": each browser's median lateness against the room timeline, through
# the recorder's clock (which reads Web Audio's on-time output about 7 ms early).
# It catches what the spread cannot: every browser off by the same amount.
# Measured: Web Audio -15..+2 ms; <audio> +2..+45 ms (about 18 ms behind Web
# Audio on a quiet machine, more under load).
MIN_CLICKS = 8  # of 12 in a 3 s window: most clicks must be heard on every channel
LATE_START_HINT_MS = 1.0
HEARD_VS_REPORTED_HINT_MS = 10.0


@pytest.fixture(scope="module")
def pulse_server() -> Iterator[pulse.PulseServer]:
    with pulse.PulseServer(BROWSERS) as server:
        yield server


@pytest.fixture(scope="module")
def coded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    media: Path = tmp_path_factory.mktemp("audible-media")
    pulse.write_coded_click_track(media / audible.TRACK_FILE, audible.TRACK_SECONDS)
    with serving(media) as srv:
        yield srv


@pytest.fixture
def coded_proxy(coded_server: ServerProcess) -> Iterator[DelayProxy]:
    with DelayProxy(coded_server.port) as p:
        yield p


def _hints(phase: audible.PhaseResult) -> str:
    """What the audio API trace says the pages did, for a failure message."""
    out = []
    for ch, late in enumerate(phase.late_start_ms):
        if late > LATE_START_HINT_MS:
            out.append(
                f"browser {ch}'s source started {late:.1f} ms after the time it was given "
                "(start() called late: Web Audio starts it now, at the same offset)"
            )
    for ch, n in enumerate(phase.restarts):
        if n > 1:
            out.append(f"browser {ch} restarted its source {n} times")
    # heard minus reported, per browser: the same for all (the recorder's clock) unless
    # one browser's output reported a wrong delay, which its page cannot see
    s = phase.summary()
    gaps = [
        h - r if h is not None and r is not None else None
        for h, r in zip(s["heard_late_p50"], s["reported_late_p50"], strict=True)
    ]
    known = [g for g in gaps if g is not None]
    if known:
        mid = percentile(known, 0.5)
        for ch, g in enumerate(gaps):
            if g is not None and abs(g - mid) > HEARD_VS_REPORTED_HINT_MS:
                out.append(
                    f"browser {ch} was heard {g - mid:+.1f} ms from where its currentTime "
                    "said (its output's reported delay was off: docs/sync.md, "
                    "'The <audio> engine's output')"
                )
    return " (" + "; ".join(out) + ")" if out else ""


def test_the_element_engine_opens_its_output_before_the_music(
    playwright: Any, pulse_server: pulse.PulseServer, coded_proxy: DelayProxy
) -> None:
    """Chromium's <audio> output is running before anything plays (docs/sync.md).

    Chromium mixes a page's media elements into one PulseAudio stream, opened by
    the first play(). A stream's first seconds are unsettled (underruns, and a
    reported delay that is off by tens of ms and takes ~20 s to converge), and
    currentTime is computed from that delay: a page whose first start opened the
    stream could be heard 40 ms off while its own currentTime said on time. The
    engine opens the stream when it starts, with a silent looping element.
    """
    browser = audible.launch_listener(playwright, pulse_server, 0)
    try:
        page = browser.new_page()
        page.goto(room_url(coded_proxy, f"early{int(time.time() * 1000)}", "element", "early"))
        wait_clocks([page])
        state = probe(page)
        assert state is not None and state["engine"] == "element"
        assert not (state.get("room") or {}).get("track"), "nothing is to play yet"
        sink = pulse_server.sinks[0]
        wait_for(
            lambda: pulse_server.sink_inputs().get(sink, 0) >= 1,
            10,
            0.1,
            "the page's output stream, before any track",
            detail=lambda: pulse_server.sink_inputs(),
        )
        # silent: nothing but zeros goes out
        with pulse_server.record() as rec:
            rec.wait_until(time.time() + 0.5)
            last = rec.channel(0, rec.time_frame(time.time() - 0.4))
            assert pulse.rms(last) < audible.SILENCE_RMS
    finally:
        browser.close()


@pytest.mark.parametrize("engine", ["webaudio", "mixed"])
def test_three_browsers_are_heard_together(
    playwright: Any, pulse_server: pulse.PulseServer, coded_proxy: DelayProxy, engine: str
) -> None:
    settings = audible.Settings(engine, SETTLE_S[engine], MEASURE_S)
    keep = os.environ.get("MUSICSYNC_AUDIBLE_WAV")  # a directory: keep the recordings
    wav = Path(keep) / f"audible-{engine}-{int(time.time())}.wav" if keep else None
    if wav:
        wav.parent.mkdir(parents=True, exist_ok=True)
    report = audible.run(playwright, pulse_server, coded_proxy, settings, say=print, keep_wav=wav)
    table = report.table()
    print("\n" + table)

    bounds = BOUNDS_MS[engine]
    problems: list[str] = []
    starved: list[str] = []
    for phase in report.phases:
        if phase.settling:
            continue  # the seconds right after a change: reported only
        s = phase.summary()
        where = f"{engine} {phase.name}"
        if s["underruns"]:
            # the output itself broke up: a gap, then that browser is late until
            # its page notices; no page can prevent it, so it says nothing of sync
            starved.append(f"{where}: {s['underruns']} underruns in every window")
            continue
        if s["clicks"] < MIN_CLICKS:
            problems.append(f"{where}: only {s['clicks']} clicks heard on every channel")
            continue
        why = _hints(phase)
        if s["p95"] >= bounds["p95"]:
            problems.append(f"{where}: p95 spread {s['p95']:.2f} ms{why}")
        if s["max"] >= bounds["max"]:
            problems.append(f"{where}: max spread {s['max']:.2f} ms{why}")
        for ch, late in enumerate(s["heard_late_p50"]):
            if late is None or not abs(late) < bounds["heard_late"]:
                problems.append(f"{where}: browser {ch} heard {late} ms off the timeline")
        own = [
            h - r
            for h, r in zip(s["heard_late_p50"], s["reported_late_p50"], strict=True)
            if h is not None and r is not None
        ]
        if len(own) < BROWSERS:
            problems.append(f"{where}: not every browser both heard and reporting")
        elif max(own) - min(own) >= SAID_AGREEMENT_MS:
            problems.append(
                f"{where}: heard less reported lateness {[round(x, 2) for x in own]} ms:"
                " a page is not heard where it says it is"
            )

    pause = report.pause
    assert pause is not None
    for ch, (rms, clicks) in enumerate(zip(pause.rms, pause.clicks, strict=True)):
        if rms >= audible.SILENCE_RMS or clicks:
            problems.append(f"{engine} pause: browser {ch} not silent (rms {rms}, {clicks} clicks)")
    if engine in ("webaudio", "mixed"):
        # scheduled on the output clock (a routed <audio> page's cut too): every
        # browser stops and restarts together
        for what, spread in (
            ("stopped", pause.stop_spread_ms),
            ("restarted", pause.restart_spread_ms),
        ):
            if spread < bounds["p95"]:
                continue
            if pause.underruns:
                starved.append(f"{engine} pause: {what} {spread:.1f} ms apart, with underruns")
            else:
                problems.append(f"{engine} pause: {what} {spread:.1f} ms apart")

    assert not problems, "\n".join(problems + starved) + "\n" + table
    if starved:
        # Nothing wrong was heard, but the machine (other processes on the same
        # cores) kept starving the audio output, so part of the claim went unchecked.
        pytest.xfail("could not judge, the audio output was starved: " + "; ".join(starved))
