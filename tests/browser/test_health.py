"""The host's device dashboard in real Chromium: rows for every page, a remote offset that
the listener's page applies and keeps, Resync, screenshots; and one tap unlocking audio."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TRACK_NAME,
    ServerProcess,
    probe,
    wait_for,
    wait_playing,
)
from .sync_scenario import set_track_and_play

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
OFFSET_KEY = "musicsync.latencyOffsetMs"
ROWS_JS = """() => [...document.querySelectorAll('#health-devices li')].map((li) => ({
  id: li.dataset.id, name: li.querySelector('.name').textContent, quality: li.className,
  offset: li.querySelector('input.offset').value,
  meta: li.querySelector('.dev-meta').textContent }))"""
OVERFLOW_JS = """() => {
  const w = document.documentElement.clientWidth;
  return [...document.querySelectorAll('body *')]
    .filter((e) => e.offsetParent !== null && e.getBoundingClientRect().right > w + 0.5)
    .map((e) => `${e.tagName}#${e.id}.${e.className}`).slice(0, 5);
}"""
LONG_NAME = "Grace <b>Hopper</b> in the kitchen"  # the page keeps 40 characters


class Traffic:
    """What one page sent and received over its WebSocket (JSON frames).

    Playwright's sync API hands over events only while it is called, so every
    read first makes one call on the page (a ``time.sleep`` alone delivers none).
    """

    def __init__(self, page: Any) -> None:
        self.page = page
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        page.on("websocket", self._attach)

    def _attach(self, ws: Any) -> None:
        ws.on("framesent", lambda payload: self._note(self.sent, payload))
        ws.on("framereceived", lambda payload: self._note(self.received, payload))

    @staticmethod
    def _note(into: list[dict[str, Any]], payload: Any) -> None:
        if isinstance(payload, str):
            into.append(json.loads(payload))

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        self.page.evaluate("0")
        return [m for m in self.sent if m.get("type") == kind]

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        self.page.evaluate("0")
        return [m for m in self.received if m.get("type") == kind]


def open_page(browser: Any, url: str, viewport: dict[str, int]) -> tuple[Any, Traffic]:
    ctx = browser.new_context(viewport=viewport)
    page = ctx.new_page()
    traffic = Traffic(page)
    page.on("pageerror", lambda e: print(f"page error: {e}"))
    page.goto(url)
    wait_for(lambda: (probe(page) or {}).get("role"), 10, what="joined")
    return page, traffic


def dashboard_rows(page: Any) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = page.evaluate(ROWS_JS)
    return rows


def row_of(page: Any, name: str) -> Any:
    return page.locator("#health-devices li", has_text=name)


def screenshot_dir() -> Path:
    d = Path(os.environ.get("MUSICSYNC_SCREENSHOT_DIR", REPO / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.mark.browser
def test_dashboard_sees_the_listeners_and_sets_one_offset_remotely(
    browser: Any, server: ServerProcess
) -> None:
    room = f"h{uuid.uuid4().hex[:8]}"
    base = f"{server.url}/r/{room}?debug=1&engine=webaudio"
    host, host_traffic = open_page(browser, f"{base}&name=Ada", DESKTOP)
    ann, ann_traffic = open_page(browser, f"{base}&name={LONG_NAME}", DESKTOP)
    bob, bob_traffic = open_page(browser, f"{base}&name=Bob", PHONE)
    pages = [host, ann, bob]
    try:
        assert (probe(host) or {}).get("role") == "host"
        assert ann.locator("#health-card").is_hidden()  # listeners have no dashboard
        set_track_and_play(host)
        for page in pages:
            wait_playing(page, 20)
        # one row per page, names as text, green once everyone has settled
        wait_for(
            lambda: len(dashboard_rows(host)) == 3,
            15,
            what="three rows",
            detail=lambda: dashboard_rows(host),
        )
        names = {r["name"] for r in dashboard_rows(host)}
        assert names == {"Ada", LONG_NAME, "Bob"}
        assert host.locator("#health-devices b").count() == 0
        wait_for(
            lambda: all(r["quality"] == "q-good" for r in dashboard_rows(host)),
            30,
            0.5,
            what="every device in sync (green)",
            detail=lambda: dashboard_rows(host),
        )
        assert "Web Audio" in row_of(host, "Bob").locator(".dev-meta").inner_text()
        assert "Chrome" in row_of(host, "Bob").locator(".dev-meta").inner_text()
        assert re.search(
            r"\d+ in the room · 3 reporting", host.locator("#health-summary").inner_text()
        )

        # the host sets Bob's offset from the dashboard, to a tenth of a ms
        ann_id = next(r["id"] for r in dashboard_rows(host) if r["name"] == LONG_NAME)
        offset_field = row_of(host, "Bob").locator("input.offset")
        offset_field.fill("170.4")
        offset_field.press("Enter")
        row_of(host, "Bob").get_by_role("button", name="Increase this device's offset").click()
        wait_for(
            lambda: bob.evaluate(f"localStorage.getItem('{OFFSET_KEY}')") == "180.4",
            10,
            what="Bob's page applied and stored 180.4 ms",
        )
        assert bob.locator("#lat-value").inner_text() == "180.4 ms"
        wait_for(
            lambda: any(m.get("latency_offset_ms") == 180.4 for m in bob_traffic.sent_of("report")),
            10,
            what="Bob's report carries the offset",
        )
        wait_for(
            lambda: row_of(host, "Bob").locator("input.offset").input_value() == "180.4",
            10,
            what="the dashboard shows the reported offset",
        )
        # Bob plays 180.4 ms earlier than the room, and settles there
        wait_for(
            lambda: abs((probe(bob) or {}).get("drift", 99.0)) < 2.0,
            15,
            0.2,
            what="Bob settled on the shifted timeline",
            detail=lambda: probe(bob),
        )
        assert ann.evaluate(f"localStorage.getItem('{OFFSET_KEY}')") in (None, "0")

        # resync: Bob's page sends a fresh burst of pings
        pings_before = len(bob_traffic.sent_of("ping"))
        row_of(host, "Bob").get_by_role("button", name="Resync this device").click()
        wait_for(lambda: bob_traffic.received_of("resync"), 5, what="Bob got resync")
        wait_for(
            lambda: len(bob_traffic.sent_of("ping")) - pings_before >= 10,
            5,
            what="a ping burst after resync",
            detail=lambda: (len(bob_traffic.sent_of("ping")), pings_before, bob_traffic.sent[-5:]),
        )
        wait_playing(bob, 10)

        # listeners never get a health frame; the host does
        assert host_traffic.received_of("health")
        assert not ann_traffic.received_of("health") and not bob_traffic.received_of("health")
        assert not ann_traffic.received_of("latency_offset")

        # the offset stays on Bob's device across a reload, and its reports carry it
        bob_traffic.sent.clear()
        bob.reload()
        wait_for(lambda: (probe(bob) or {}).get("role"), 10, what="Bob rejoined")
        assert bob.locator("#lat-value").inner_text() == "180.4 ms"
        wait_for(
            lambda: any(m.get("latency_offset_ms") == 180.4 for m in bob_traffic.sent_of("report")),
            10,
            what="the reloaded page reports the stored offset",
        )

        # screenshots of the dashboard at desktop and phone widths
        out = screenshot_dir()
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            host.set_viewport_size(viewport)
            time.sleep(1.2)  # a frame and a redraw at the new width
            card = host.locator("#health-card")
            card.scroll_into_view_if_needed()
            card.screenshot(path=str(out / f"health-dashboard-{width}.png"))
            host.screenshot(path=str(out / f"health-host-{width}.png"), full_page=True)
            assert not host.evaluate(OVERFLOW_JS), host.evaluate(OVERFLOW_JS)
            box = card.bounding_box()
            assert box is not None and box["width"] <= viewport["width"]
        assert ann_id
    finally:
        for page in pages:
            page.context.close()


@pytest.mark.browser
def test_one_tap_on_play_now_also_unlocks_the_hosts_audio(
    playwright: Any, server: ServerProcess
) -> None:
    """Autoplay blocked: the host's tap on Play now starts the room and its own audio."""
    args = [a for a in CHROMIUM_ARGS if not a.startswith("--autoplay-policy")]
    args.append("--autoplay-policy=document-user-activation-required")
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
    try:
        page = b.new_page()
        page.goto(f"{server.url}/r/t{uuid.uuid4().hex[:8]}?debug=1&engine=webaudio&name=Ada")
        wait_for(lambda: (probe(page) or {}).get("role") == "host", 10, what="host")
        button = page.locator("#join-audio")
        wait_for(lambda: button.is_visible(), 5, what="the join button (autoplay is blocked)")
        track = TRACK_NAME.rsplit(".", 1)[0]
        row = page.locator("#library li", has_text=re.compile(track.replace("-", "."), re.I))
        wait_for(lambda: row.count() == 1, 10, what="the track in the library")
        row.get_by_role("button", name=re.compile("Play .* now")).click()
        wait_playing(page, 15)
        assert not button.is_visible()
        time.sleep(0.5)  # a few UI ticks: it does not come back
        assert not button.is_visible()
    finally:
        b.close()
