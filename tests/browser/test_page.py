"""The page itself: roles, layout at desktop and phone widths, autoplay, reconnect."""

from __future__ import annotations

import contextlib
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from .conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TRACK_NAME,
    DelayProxy,
    ServerProcess,
    open_skewed_page,
    probe,
    sample_round,
    wait_for,
    wait_playing,
)
from .sync_scenario import (
    Phase,
    find_host,
    measure,
    room_url,
    set_track_and_play,
    wait_all_valid,
    wait_clocks,
)

OVERFLOW_JS = """() => {
  const w = document.documentElement.clientWidth;
  return [...document.querySelectorAll('body *')]
    .filter((e) => e.getBoundingClientRect().right > w + 0.5)
    .map((e) => `${e.tagName}#${e.id}.${e.className}`).slice(0, 5);
}"""
VIEWPORTS = {"desktop": {"width": 1280, "height": 860}, "phone": {"width": 390, "height": 844}}


def screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("MUSICSYNC_SCREENSHOT_DIR", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.mark.browser
def test_host_and_listener_views_at_desktop_and_phone_widths(
    browser: Any, server: ServerProcess, tmp_path: Path
) -> None:
    room = f"s{uuid.uuid4().hex[:8]}"
    out = screenshot_dir(tmp_path)
    contexts = []
    try:
        pages = {}
        for role, name in (("host", "Ada"), ("listener", "Grace <b>Hopper</b>")):
            ctx = browser.new_context(viewport=VIEWPORTS["desktop"])
            contexts.append(ctx)
            page = ctx.new_page()
            page.goto(f"{server.url}/r/{room}?name={name}&debug=1")
            wait_for(lambda p=page: (probe(p) or {}).get("role"), 10, what=f"{role} joined")
            pages[role] = page
        host, listener = pages["host"], pages["listener"]
        assert probe(host)["role"] == "host"
        set_track_and_play(host, f"/media/{TRACK_NAME}")
        wait_for(
            lambda: listener.locator("#track-title").inner_text() != "Nothing playing",
            5,
            what="title",
        )
        wait_for(
            lambda: (
                listener.locator(".people li").count() == 2
                and host.locator(".people li").count() == 2
            ),
            5,
            what="participants",
        )
        # a name is text, never markup
        assert listener.locator(".people b").count() == 0
        assert "Grace <b>Hopper</b>" in host.locator("#people").inner_text()
        # host controls are for the host only
        assert host.locator("#host-card").is_visible() and host.locator("#play").is_enabled()
        assert not listener.locator("#host-card").is_visible()
        assert listener.locator("#play").is_disabled() and listener.locator("#seek").is_disabled()
        assert host.locator("text=Make host").count() == 1
        assert listener.locator("#conn-text").inner_text() == "Connected"
        wait_for(
            lambda: host.evaluate("navigator.mediaSession.metadata?.title") == "test clicks",
            5,
            what="media session title",
        )
        time.sleep(1.0)
        for width_name, viewport in VIEWPORTS.items():
            for role, page in pages.items():
                page.set_viewport_size(viewport)
                time.sleep(0.3)
                page.screenshot(path=str(out / f"{role}-{width_name}.png"), full_page=True)
                overflow = page.evaluate(OVERFLOW_JS)
                assert not overflow, f"{role} at {width_name} width overflows: {overflow}"
        # hand over the host role from the list
        host.locator("text=Make host").click()
        wait_for(
            lambda: probe(listener)["role"] == "host" and probe(host)["role"] == "listener",
            5,
            what="handover",
        )
        wait_for(lambda: listener.locator("#host-card").is_visible(), 5, what="new host controls")
    finally:
        for ctx in contexts:
            ctx.close()


@pytest.mark.browser
def test_listener_can_claim_an_empty_host_seat(browser: Any, server: ServerProcess) -> None:
    room = f"c{uuid.uuid4().hex[:8]}"
    ctx_a, ctx_b = browser.new_context(), browser.new_context()
    try:
        a, b = ctx_a.new_page(), ctx_b.new_page()
        a.goto(f"{server.url}/r/{room}?name=a&debug=1")
        wait_for(lambda: (probe(a) or {}).get("role") == "host", 10, what="a is host")
        b.goto(f"{server.url}/r/{room}?name=b&debug=1")
        wait_for(lambda: (probe(b) or {}).get("role") == "listener", 10, what="b joined")
        assert not b.locator("#claim").is_visible()
        ctx_a.close()
        # The host left. The server may hold the seat for a resume grace and
        # then elect someone; meanwhile a listener sees "I am the host".
        wait_for(lambda: b.locator(".people li").count() == 1, 10, what="a left")

        def b_is_host() -> bool:
            if probe(b)["role"] == "host":
                return True
            claim = b.locator("#claim")
            if claim.is_visible():
                # the server may elect b meanwhile and hide the button: do not wait on it
                with contextlib.suppress(PlaywrightTimeoutError):
                    claim.click(timeout=1000)
            return False

        wait_for(b_is_host, 15, 0.5, what="b is host")
        assert b.locator("#host-card").is_visible()
    finally:
        ctx_b.close()


@pytest.mark.browser
def test_join_audio_button_when_autoplay_is_blocked(playwright: Any, server: ServerProcess) -> None:
    """Without the autoplay flag the page shows one clear button; a tap starts the audio."""
    args = [a for a in CHROMIUM_ARGS if not a.startswith("--autoplay-policy")]
    args.append("--autoplay-policy=document-user-activation-required")
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
    try:
        page = b.new_page()
        page.goto(f"{server.url}/r/a{uuid.uuid4().hex[:8]}?debug=1&engine=webaudio")
        button = page.locator("#join-audio")
        wait_for(lambda: button.is_visible(), 5, what="join button")
        assert "join the audio" in button.inner_text().lower()
        button.click()
        wait_for(lambda: not button.is_visible(), 5, what="button gone after the tap")
        set_track_and_play(page, f"/media/{TRACK_NAME}")
        wait_playing(page, 10)
    finally:
        b.close()


@pytest.mark.browser
def test_reconnect_and_reload_keep_the_room_together(browser: Any, proxy: DelayProxy) -> None:
    """Cut every connection mid-play: pages keep playing, show it, reconnect, stay in sync.
    Then reload one page: it rejoins in sync."""
    room = f"r{uuid.uuid4().hex[:8]}"
    pages = [
        open_skewed_page(browser, room_url(proxy, room, "webaudio", f"p{i}"), skew)
        for i, skew in enumerate((-1500.0, 2500.0))
    ]
    try:
        wait_clocks(pages)
        host = find_host(pages)
        set_track_and_play(host)
        wait_all_valid(pages)
        before = measure(pages, 2.0, Phase("before"), 0.5)
        proxy.drop_all()
        wait_for(
            lambda: all((probe(p) or {}).get("connection") != "open" for p in pages),
            5,
            what="disconnect seen",
        )
        assert (
            "Offline" in pages[0].locator("#conn-text").inner_text()
            or "Reconnecting" in pages[0].locator("#conn-text").inner_text()
        )
        offline = measure(pages, 1.0, Phase("offline"))
        assert offline.rounds, "pages stopped playing while disconnected"
        wait_for(
            lambda: all((probe(p) or {}).get("connection") == "open" for p in pages),
            20,
            what="reconnected",
        )
        after = measure(pages, 3.0, Phase("after"), 0.5)
        pages[1].reload()
        wait_for(
            lambda: (probe(pages[1]) or {}).get("clockSamples", 0) >= 40,
            20,
            what="reloaded page synced",
        )
        wait_all_valid(pages)
        reloaded = measure(pages, 3.0, Phase("reload"), 1.0)
    finally:
        for p in pages:
            p.context.close()
    for phase in (before, offline, after, reloaded):
        s = phase.summary()
        print(f"\n{phase.name}: {s}")
        assert s["n"] >= 5 and s["p95"] < 5.0, f"{phase.name}: {s}"


@pytest.mark.browser
@pytest.mark.parametrize("engine", ["webaudio", "element"])
def test_device_latency_offset_plays_that_much_earlier(
    browser: Any, server: ServerProcess, engine: str
) -> None:
    """A page with a +80 ms device offset outputs 80 ms ahead of one without."""
    room = f"l{uuid.uuid4().hex[:8]}"
    url = f"{server.url}/r/{room}?debug=1&engine={engine}"
    plain = open_skewed_page(browser, url + "&name=plain", 0.0)
    ctx = browser.new_context()
    ctx.add_init_script("localStorage.setItem('musicsync.latencyOffsetMs', '75')")
    shifted = ctx.new_page()
    shifted.goto(url + "&name=shifted")
    pages = [plain, shifted]
    try:
        assert shifted.locator("#lat-value").inner_text() == "75 ms"
        shifted.click("#lat-plus")
        assert shifted.locator("#lat-value").inner_text() == "80 ms"
        assert shifted.evaluate("localStorage.getItem('musicsync.latencyOffsetMs')") == "80"
        wait_clocks(pages, 20)
        set_track_and_play(find_host(pages))
        wait_all_valid(pages)
        # until both engines report they are on their timelines (slower on a loaded machine)
        wait_for(
            lambda: all(abs((probe(p) or {}).get("drift", math.nan)) < 2.0 for p in pages),
            20,
            0.2,
            what="both pages settled",
        )
        time.sleep(0.5)
        rounds = []
        for _ in range(10):
            if (r := sample_round(pages)) is not None:
                rounds.append(r)
            time.sleep(0.1)
    finally:
        for page in pages:
            page.context.close()
    leads = sorted(r.errors_ms[1] - r.errors_ms[0] for r in rounds)
    assert len(leads) >= 5
    median = leads[len(leads) // 2]
    assert abs(median - 80.0) < (3.0 if engine == "webaudio" else 10.0), leads
