"""The multi-client scenario shared by the browser tests and the benchmark.

Three pages (clock skews -2 s, 0, +3.5 s), each in its own browser context, join
one room through the delaying proxy. The host sets the track and plays; the
scenario samples every page's output position against the true clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .conftest import (
    TRACK_NAME,
    DelayProxy,
    Round,
    host_page,
    open_skewed_page,
    percentile,
    probe,
    sample_round,
    wait_for,
)

SKEWS_MS = (-2000.0, 0.0, 3500.0)
CLOCK_SAMPLES_BEFORE_PLAY = 90
SAMPLE_INTERVAL_S = 0.1


@dataclass
class Phase:
    name: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def spreads(self) -> list[float]:
        return [r.spread_ms for r in self.rounds]

    def summary(self) -> dict[str, float]:
        s = self.spreads
        absolute = [abs(a) for r in self.rounds for a in r.absolute_ms]
        return {
            "n": len(s),
            "p50": percentile(s, 0.5),
            "p95": percentile(s, 0.95),
            "max": max(s) if s else float("nan"),
            "abs_p50": percentile(absolute, 0.5),
        }


def room_url(proxy: DelayProxy, room: str, engine: str, name: str) -> str:
    return f"{proxy.url}/r/{room}?engine={engine}&debug=1&name={name}"


def open_room(
    browser: Any,
    proxy: DelayProxy,
    engine: str,
    skews: tuple[float, ...] = SKEWS_MS,
    ppms: tuple[float, ...] | None = None,
) -> tuple[str, list[Any]]:
    room = f"t{uuid.uuid4().hex[:10]}"
    rates = ppms or (0.0,) * len(skews)
    pages = [
        open_skewed_page(browser, room_url(proxy, room, engine, f"page{i}"), skew, ppm)
        for i, (skew, ppm) in enumerate(zip(skews, rates, strict=True))
    ]
    return room, pages


def wait_clocks(
    pages: list[Any], samples: int = CLOCK_SAMPLES_BEFORE_PLAY, timeout: float = 20
) -> None:
    def ready() -> bool:
        return all((p := probe(page)) and (p.get("clockSamples") or 0) >= samples for page in pages)

    wait_for(ready, timeout, 0.2, "clock sync")


def set_track_and_play(host: Any, url: str = f"/media/{TRACK_NAME}") -> None:
    host.fill("#track-url", url)
    host.click("#set-track")
    wait_for(lambda: host.locator("#play").is_enabled(), 10, what="track set")
    host.click("#play")


def seek(host: Any, position: float) -> None:
    host.evaluate(
        """(pos) => { const s = document.getElementById('seek');
        s.value = String(pos);
        s.dispatchEvent(new Event('input'));
        s.dispatchEvent(new Event('change')); }""",
        position,
    )


def toggle_play(host: Any) -> None:
    host.click("#play")


MIN_ROUNDS = 20  # a phase samples past its time until it holds this many rounds...
MAX_STRETCH = 3.0  # ...but for at most this many times its time (a starved test process)


def measure(pages: list[Any], seconds: float, phase: Phase, settle_s: float = 0.0) -> Phase:
    """Sample for ``seconds``; rounds in the first ``settle_s`` are dropped.

    On a loaded machine a probe round trip can take far longer than the sampling
    interval; the phase then runs on (up to ``MAX_STRETCH`` times) until it holds
    ``MIN_ROUNDS`` rounds, so its statistics never rest on a handful of readings.
    """
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds or (
        len(phase.rounds) < MIN_ROUNDS and elapsed < seconds * MAX_STRETCH
    ):
        r = sample_round(pages)
        if r is not None and elapsed >= settle_s:
            phase.rounds.append(r)
        time.sleep(SAMPLE_INTERVAL_S)
    return phase


def wait_all_valid(pages: list[Any], timeout: float = 20) -> None:
    wait_for(
        lambda: sample_round(pages) is not None,
        timeout,
        0.05,
        "all pages playing",
        detail=lambda: [probe(p) for p in pages],
    )


def convergence_time(
    pages: list[Any],
    bound_ms: float,
    hold_s: float,
    timeout: float,
    on_round: Callable[[Round], None] | None = None,
) -> float:
    """Seconds until the spread stays under ``bound_ms`` for ``hold_s``."""
    start = time.monotonic()
    good_since: float | None = None
    while time.monotonic() - start < timeout:
        r = sample_round(pages)
        t = time.monotonic()
        if r is not None and r.spread_ms < bound_ms:
            if good_since is None:
                good_since = t
            if t - good_since >= hold_s:
                return good_since - start
        else:
            good_since = None
        if r is not None and on_round:
            on_round(r)
        time.sleep(SAMPLE_INTERVAL_S / 2)
    return float("nan")


def find_host(pages: list[Any]) -> Any:
    return host_page(pages)
