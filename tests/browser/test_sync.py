"""Three real Chromium pages with skewed clocks behind a jittery proxy play together."""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import DelayProxy, probe, wait_for
from .sync_scenario import (
    Phase,
    find_host,
    measure,
    open_room,
    seek,
    set_track_and_play,
    toggle_play,
    wait_all_valid,
    wait_clocks,
)

# Spread bounds (ms) asserted per engine: p95 and max over each steady phase.
BOUNDS = {
    "webaudio": {"p95": 5.0, "max": 10.0, "settle": 1.0},
    "element": {"p95": 30.0, "max": 60.0, "settle": 4.0},
}
# Each page follows the room timeline, not only its peers (same machine: the
# true clock stands in for the server clock).
ABSOLUTE_MEDIAN_BOUND_MS = 30.0
MEASURE_S = 4.0
SEEK_TO_S = 40.0


def wait_version_change(pages: list[Any], old: int, timeout: float = 5) -> None:
    wait_for(
        lambda: all((probe(p) or {}).get("version", old) > old for p in pages),
        timeout,
        what="new state",
    )


def close_all(pages: list[Any]) -> None:
    for page in pages:
        page.context.close()


def playing_past(pages: list[Any], position_s: float) -> bool:
    """Every page plays, with a valid reading at or past ``position_s``.

    One probe per page, judged as read: probing again after a valid round could
    catch a page between two readings (a Web Audio line restarting after a
    join has no position for a moment).
    """
    samples = [probe(p) for p in pages]
    return all(s and s.get("valid") and s["position"] >= position_s for s in samples)


@pytest.mark.browser
@pytest.mark.parametrize("engine", ["webaudio", "element"])
def test_three_skewed_clients_stay_together(browser: Any, proxy: DelayProxy, engine: str) -> None:
    bounds = BOUNDS[engine]
    _, pages = open_room(browser, proxy, engine)
    phases: list[Phase] = []
    try:
        wait_clocks(pages)
        for page in pages:
            assert probe(page)["engine"] == engine
        host = find_host(pages)

        set_track_and_play(host)
        wait_all_valid(pages)
        phases.append(measure(pages, MEASURE_S + bounds["settle"], Phase("play"), bounds["settle"]))

        version = probe(host)["version"]
        seek(host, SEEK_TO_S)
        wait_version_change(pages, version)
        wait_for(lambda: playing_past(pages, SEEK_TO_S), 10, what="playing after the seek")
        phases.append(measure(pages, MEASURE_S + bounds["settle"], Phase("seek"), bounds["settle"]))

        version = probe(host)["version"]
        toggle_play(host)  # pause
        wait_version_change(pages, version)
        wait_for(
            lambda: not any((probe(p) or {}).get("valid") for p in pages), 5, what="all paused"
        )
        held = [probe(p)["room"]["position"] for p in pages]
        assert len(set(held)) == 1
        time.sleep(0.8)

        toggle_play(host)  # resume
        wait_all_valid(pages)
        phases.append(
            measure(pages, MEASURE_S + bounds["settle"], Phase("resume"), bounds["settle"])
        )
    finally:
        close_all(pages)

    report = {p.name: p.summary() for p in phases}
    for name, s in report.items():
        print(f"\n{engine} {name}: " + " ".join(f"{k}={v:.2f}" for k, v in s.items()))
    for name, s in report.items():
        assert s["n"] >= 15, f"{name}: too few valid rounds ({s['n']})"
        assert s["p95"] < bounds["p95"], f"{engine} {name}: p95 spread {s['p95']:.2f} ms"
        assert s["max"] < bounds["max"], f"{engine} {name}: max spread {s['max']:.2f} ms"
        assert s["abs_p50"] < ABSOLUTE_MEDIAN_BOUND_MS, (
            f"{engine} {name}: off the timeline by {s['abs_p50']:.1f} ms"
        )
