"""A queue change is seamless as heard: no gap, together from its first click on.

Three Chromium processes (clocks skewed, 20-80 ms of jitter) play a coded click
track A to its end; the queue's B follows at A's end (see ``heard_change.py``).
The room is mixed: two pages on the ``<audio>`` engine (desktop Chromium plays
it through the page's AudioContext and places the next track's start by a
delay line, ``createRoutes`` in the page) with a Web Audio page between them,
so the spread holds the ``<audio>`` pages against each other and against Web
Audio. In the recording of the three outputs: no channel is silent for 2 ms or
more around the change; B's first click is heard on every channel, within
10 ms (a start placed early lost it under its gain); and from 250 ms after
the change B's clicks are heard on all three within Web Audio's steady bounds
as heard (``test_audible``: p95 under 5 ms, every click under 10 ms). A change
with a PulseAudio underrun near it (the machine starved an output: a gap no
page can prevent) is taken again, once; if that one is starved too and nothing
else was wrong, the test cannot judge (xfail). docs/sync.md, "The `<audio>`
engine through the page's AudioContext", has the figures.

    pytest tests/browser/test_heard_change.py -s     # prints what was heard
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from . import heard_change, pulse
from .conftest import DelayProxy, ServerProcess, percentile, serving

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not pulse.available(), reason="needs pulseaudio and pulseaudio-utils (just setup)"
    ),
]

BROWSERS = 3
AFTER_P95_MS = 5.0  # test_audible's Web Audio bounds, as heard
AFTER_MAX_MS = 10.0
FIRST_CLICK_MAX_MS = 10.0  # B's first click, heard on every channel this close
MIN_CLICKS = 9  # of the 12 clicks of B from 250 ms to 3 s
ATTEMPTS = 2


@pytest.fixture(scope="module")
def pulse_server() -> Iterator[pulse.PulseServer]:
    with pulse.PulseServer(BROWSERS) as server:
        yield server


@pytest.fixture(scope="module")
def change_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    media = tmp_path_factory.mktemp("change-media")
    heard_change.write_tracks(media)
    with serving(media) as srv:
        yield srv


@pytest.fixture
def change_proxy(change_server: ServerProcess) -> Iterator[DelayProxy]:
    with DelayProxy(change_server.port) as p:
        yield p


def _problems(r: heard_change.ChangeResult) -> list[str]:
    s = r.summary()
    out = []
    if any(r.gaps_ms):
        out.append(f"silent gaps {s['gaps']} (longest {s['longest_gap_ms']} ms)")
    if s["clicks"] < MIN_CLICKS:
        out.append(f"only {s['clicks']} clicks of B heard on every channel")
    elif percentile(r.after_ms, 0.95) >= AFTER_P95_MS or max(r.after_ms) >= AFTER_MAX_MS:
        p95 = percentile(r.after_ms, 0.95)
        out.append(f"from 250 ms on, spread p95 {p95:.2f} max {s['after_max_ms']} ms")
    if not r.glitch_ms or max(r.glitch_ms) >= FIRST_CLICK_MAX_MS:
        # ~250 ms: a page's first onset is B's second click, its first was not heard
        out.append(f"B's first click heard {s['glitch_max_ms']} ms apart")
    return out


@pytest.mark.parametrize("engine", ["mixed"])
def test_the_next_track_is_heard_together_without_a_gap(
    playwright: Any,
    pulse_server: pulse.PulseServer,
    change_server: ServerProcess,
    change_proxy: DelayProxy,
    engine: str,
) -> None:
    ws_base = change_server.url.replace("http://", "ws://")
    for _ in range(ATTEMPTS):
        r = heard_change.run_change(playwright, pulse_server, change_proxy, ws_base, engine)
        print("\n" + r.table())
        problems = _problems(r)
        if not r.underruns:
            break
    if problems and r.underruns:
        pytest.xfail(f"could not judge, the audio output was starved: {r.table()}")
    assert not problems, f"{engine}: {'; '.join(problems)}\n{r.table()}"
