"""A page that joins mid-song is heard with the room within 1.5 s of the tap.

Two Chromium processes play the coded click track into their own channels of
one PulseAudio recording; a third opens the room page mid-song (clock 3.5 s
off, 20-80 ms of jitter each way), five times, a fresh page each time. Its
clicks, against the mean of the room's, must be within 2 ms from no later than
1.5 s after the tap on, to the end of the recording (see ``heard_join.py``):
the median join meets that, and none takes longer than ``WORST_S``.

Why a median: in the first second and a half the page's clock rests on a few
dozen pings through 20-80 ms of jitter, and the least-delayed of them bound
its offset within about 1 ms in half the joins, 2.5 ms in nine of ten
(``tests/client/test_join_clock.py``). The tail is the clock's; it is bounded
here too.

A join with a PulseAudio underrun in its recording is not judged: the machine
starved an output (no page can prevent the gap; the room's own pages move by
5-30 ms then), and the page's own process with it (at a load of 7-9 on this
2-core machine a page is first heard 1.3-2.1 s after the tap, not 1.2-1.4 s).
With fewer than two joins judged the test cannot judge (xfail); what was heard
is printed either way.

    pytest tests/browser/test_heard_join.py -s      # prints what was heard
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import audible, heard_join, pulse
from .conftest import DelayProxy, ServerProcess, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not pulse.available(), reason="needs pulseaudio and pulseaudio-utils (just setup)"
    ),
]

BROWSERS = 3
JOINS = 5
JOIN_TO_SYNC_S = 1.5  # the median join
WORST_S = 3.0  # every join
AFTER_SYNC_P95_MS = 2.0
MIN_JUDGED = 2  # joins not starved of audio output


@pytest.fixture(scope="module")
def pulse_server() -> Iterator[pulse.PulseServer]:
    with pulse.PulseServer(BROWSERS) as server:
        yield server


@pytest.fixture(scope="module")
def coded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    media: Path = tmp_path_factory.mktemp("join-media")
    pulse.write_coded_click_track(media / audible.TRACK_FILE, heard_join.TRACK_SECONDS)
    with serving(media) as srv:
        yield srv


@pytest.fixture
def coded_proxy(coded_server: ServerProcess) -> Iterator[DelayProxy]:
    with DelayProxy(coded_server.port) as p:
        yield p


def _why(result: heard_join.JoinResult) -> str:
    """The joiner's own account and audio API calls, for a failure message."""
    probes = [
        f"{p['t']:.2f}s n={p.get('clockSamples')} valid={p.get('valid')}"
        f" drift={p.get('drift')} {(p.get('why') or {}).get('correction', '')}"
        for p in result.probes[::4]
    ]
    calls = [f"{e[0]}@{e[1] / 1000 - result.tap:.3f}s" for e in result.trace[:20]]
    return f"\n  joiner probes: {probes}\n  joiner audio calls: {calls}"


@pytest.mark.parametrize("engine", ["webaudio"])
def test_a_joining_page_is_heard_with_the_room_within_1_5_s(
    playwright: Any, pulse_server: pulse.PulseServer, coded_proxy: DelayProxy, engine: str
) -> None:
    results = heard_join.run_joins(
        playwright, pulse_server, coded_proxy, engine, f"/media/{audible.TRACK_FILE}", JOINS
    )
    for r in results:
        print("\n" + r.table())
    problems, starved, judged = [], [], []
    for r in results:
        s = r.summary()
        wrong = []
        if math.isnan(r.sync_s) or r.sync_s > WORST_S:
            wrong.append(f"not within {r.bound_ms:g} ms of the room by {WORST_S} s")
        elif s["after_sync_p95_ms"] is not None and s["after_sync_p95_ms"] > AFTER_SYNC_P95_MS:
            wrong.append(f"after sync, p95 {s['after_sync_p95_ms']} ms off the room")
        if s["clicks"] < 12:
            wrong.append(f"only {s['clicks']} clicks matched")
        if r.underruns:
            # the machine starved an output (and the pages' processes) in this join: its
            # timing says nothing of the page, either way
            starved.append(f"{len(r.underruns)} underruns: {'; '.join(wrong) or 'in time'}")
            continue
        judged.append(r)
        problems += wrong
    detail = "".join(r.table() + _why(r) + "\n" for r in results)
    assert not problems, f"{engine}: {'; '.join(problems)}\n{detail}"
    if len(judged) < MIN_JUDGED:
        pytest.xfail(f"could not judge, the audio output was starved: {'; '.join(starved)}")
    median = statistics.median(r.sync_s for r in judged)
    assert median <= JOIN_TO_SYNC_S, f"{engine}: median join-to-sync {median:.2f} s\n{detail}"
