"""Desktop Chromium's ``<audio>`` engine plays a same-origin track through the page's AudioContext.

Through the context (``createMediaElementSource``, ``createRoutes`` in the page)
the engine can tell what is heard when, to the render quantum, so its starts,
seeks and queue changes are placed rather than trimmed in (docs/sync.md). A
cross-origin track without CORS would play through the context as silence, so
that one keeps the element's own output. The page is served from 127.0.0.1;
the same server under ``localhost`` is another origin.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import TRACK_NAME, DelayProxy, ServerProcess, host_page, probe, wait_for
from .sync_scenario import open_room, wait_clocks

pytestmark = pytest.mark.browser

CLOCK_SAMPLES = 8
ADVANCE_S = 0.6


def _track_url(p: dict[str, Any]) -> str:
    return str(((p.get("room") or {}).get("track") or {}).get("url") or "")


def _src(p: dict[str, Any]) -> str:
    return str(p.get("src") or "")


def _playing(page: Any, url_end: str) -> dict[str, Any]:
    """The page's probe once its heard element plays the track whose URL ends so.

    The room's state names a new track as soon as it is set, but the old one is
    heard until the change's ``start_at``: the probe's ``src`` is the heard
    element's own track.
    """
    got: dict[str, Any] = wait_for(
        lambda: (p := probe(page)) and p.get("valid") and _src(p).endswith(url_end) and p,
        15,
        what=f"playing {url_end}",
        detail=lambda: probe(page),
    )
    return got


def _advances(page: Any) -> float:
    a = probe(page) or {}
    time.sleep(ADVANCE_S)
    b = probe(page) or {}
    return float(b["position"]) - float(a["position"])


def test_same_origin_tracks_play_through_the_context_and_cross_origin_ones_do_not(
    browser: Any, proxy: DelayProxy, server: ServerProcess
) -> None:
    _, pages = open_room(browser, proxy, "element", skews=(0.0,))
    page = pages[0]
    wait_clocks(pages, samples=CLOCK_SAMPLES)
    host = host_page(pages)

    host.fill("#track-url", f"/media/{TRACK_NAME}")
    host.click("#set-track")
    wait_for(lambda: host.locator("#play").is_enabled(), 10, what="track set")
    host.click("#play")
    got = _playing(page, f"/media/{TRACK_NAME}")
    assert got.get("routed") is True, got
    assert abs(_advances(page) - ADVANCE_S) < 0.1

    cross = f"http://localhost:{server.port}/media/{TRACK_NAME}"
    host.fill("#track-url", cross)
    host.click("#set-track")
    got = wait_for(
        lambda: (p := probe(page)) and _track_url(p) == cross and p,
        10,
        what="the cross-origin track set",
    )
    if got["room"].get("paused"):
        host.click("#play")
    got = _playing(page, cross)
    assert got.get("routed") is False, got
    assert abs(_advances(page) - ADVANCE_S) < 0.1
