"""Room features in the page: library, queue, resume token, password and invites,
kick, upload and share, driven end to end against the real server."""

from __future__ import annotations

import os
import struct
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, TRACK_NAME, ServerProcess, probe, wait_for

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
OVERFLOW_JS = """() => {
  const w = document.documentElement.clientWidth;
  return [...document.querySelectorAll('body *')]
    .filter((e) => e.offsetParent !== null && e.getBoundingClientRect().right > w + 0.5)
    .map((e) => `${e.tagName}#${e.id}.${e.className}`).slice(0, 5);
}"""
# Page errors whose stack passes through these (the features this file tests)
# fail the test; others (the sync engine's, tested by test_sync.py) are printed.
FEATURE_FUNCTIONS = (
    "createRoomFeatures",
    "createAccess",
    "renderQueue",
    "renderLibrary",
    "renderRoomCard",
    "renderPeople",
    "renderRole",
    "runUpload",
    "uploadFile",
    "openShare",
    "copyText",
    "openPasswordDialog",
    "showNotice",
    "sendReport",
    "handleMessage",
    "shouldRetry",
    "onWelcome",
    "onError",
    "onMessage",
)
QUEUE_TITLES_JS = (
    "() => [...document.querySelectorAll('#queue li .main-line')].map((e) => e.textContent)"
)


class Pages:
    """Pages in their own browser contexts; each records page errors and CSP reports."""

    def __init__(self, browser: Any, server: ServerProcess) -> None:
        self.browser = browser
        self.server = server
        self.contexts: list[Any] = []
        self.problems: list[str] = []

    def open(
        self,
        path: str,
        name: str,
        viewport: dict[str, int] | None = None,
        session: dict[str, str] | None = None,
        wait_role: bool = True,
    ) -> Any:
        ctx = self.browser.new_context(viewport=viewport or DESKTOP)
        self.contexts.append(ctx)
        if session:
            items = "".join(f"sessionStorage.setItem({k!r}, {v!r});" for k, v in session.items())
            ctx.add_init_script(items)
        page = ctx.new_page()
        page.on("pageerror", lambda e: self._page_error(name, e))
        page.on(
            "console",
            lambda m: (
                self.problems.append(f"{name}: {m.text}")
                if "Content Security Policy" in m.text or "Refused to" in m.text
                else None
            ),
        )
        sep = "&" if "?" in path else "?"
        page.goto(f"{self.server.url}{path}{sep}name={name}&debug=1")
        if wait_role:
            wait_for(lambda: (probe(page) or {}).get("role"), 10, what=f"{name} joined")
        return page

    def _page_error(self, name: str, error: Any) -> None:
        stack = getattr(error, "stack", "") or ""
        if any(f in stack for f in FEATURE_FUNCTIONS):
            self.problems.append(f"{name}: {error}\n{stack}")
        else:
            print(f"page error (not from the features tested here) on {name}: {error}\n{stack}")

    def close(self) -> None:
        for ctx in self.contexts:
            ctx.close()


@pytest.fixture
def pages(browser: Any, server: ServerProcess) -> Iterator[Pages]:
    p = Pages(browser, server)
    try:
        yield p
    finally:
        p.close()
    assert not p.problems, p.problems


def new_room(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def role(page: Any) -> str | None:
    return (probe(page) or {}).get("role")


def library_row(page: Any, title: str) -> Any:
    return page.locator("#library li", has_text=title)


def queue_titles(page: Any) -> list[str]:
    titles: list[str] = page.evaluate(QUEUE_TITLES_JS)
    return titles


def add_to_queue(page: Any, title: str) -> None:
    library_row(page, title).locator("button", has_text="Add to queue").click()


def write_small_wav(path: Path, seconds: float = 1.0, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(
            b"".join(struct.pack("<h", (i % 40 - 20) * 500) for i in range(int(rate * seconds)))
        )


def screenshot_dir() -> Path:
    d = Path(os.environ.get("MUSICSYNC_SCREENSHOT_DIR", REPO / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# -- library and queue ----------------------------------------------------------


@pytest.mark.browser
def test_library_lists_tracks_and_add_to_queue_reaches_the_other_page(pages: Pages) -> None:
    room = new_room("q")
    host = pages.open(f"/r/{room}", "Ada")
    listener = pages.open(f"/r/{room}", "Bob")
    assert role(host) == "host" and role(listener) == "listener"
    wait_for(lambda: library_row(host, "Demo 1").count() == 1, 5, what="library listing")
    assert library_row(host, "test-clicks").count() == 1
    assert "0:40" in library_row(host, "Demo 1").inner_text()
    # the search box filters on the client
    host.fill("#library-search", "bells")
    wait_for(lambda: host.locator("#library li").count() == 1, 2, what="filtered")
    assert "Bells" in host.locator("#library").inner_text()
    host.fill("#library-search", "")
    # listeners may not queue (yet): no button, no upload box
    assert listener.locator("#library button", has_text="Add to queue").count() == 0
    assert not listener.locator("#upload-box").is_visible()
    assert not listener.locator("#queue-controls").is_visible()

    # the first track queued into an empty room becomes the current one
    add_to_queue(host, "Demo 1")
    wait_for(lambda: "Demo 1" in listener.locator("#track-title").inner_text(), 5, what="current")
    add_to_queue(host, "Demo 2")
    wait_for(lambda: queue_titles(listener) == ["Demo 2 — Pulse"], 5, what="queued on listener")
    assert "added by Ada" in listener.locator("#queue li").inner_text()
    assert "0:39" in listener.locator("#queue li").inner_text()

    # the host opens suggestions to listeners: their Add to queue appears and works
    host.locator("#listeners-upload").check()
    wait_for(
        lambda: listener.locator("#library button", has_text="Add to queue").count() >= 3,
        5,
        what="listener may queue",
    )
    assert listener.locator("#upload-box").is_visible()
    assert listener.locator("#library button", has_text="Play now").count() == 0
    add_to_queue(listener, "Demo 3")
    wait_for(
        lambda: queue_titles(host) == ["Demo 2 — Pulse", "Demo 3 — Bells"], 5, what="suggestion"
    )
    assert "added by Bob" in host.locator("#queue li").nth(1).inner_text()


@pytest.mark.browser
def test_queue_move_remove_next_and_modes_from_the_ui(pages: Pages) -> None:
    room = new_room("m")
    host = pages.open(f"/r/{room}", "Ada")
    listener = pages.open(f"/r/{room}", "Bob")
    wait_for(lambda: library_row(host, "Demo 3").count() == 1, 5, what="library listing")
    for title in ("Demo 1", "Demo 2", "Demo 3", TRACK_NAME.removesuffix(".wav")):
        add_to_queue(host, title)
    expected = ["Demo 2 — Pulse", "Demo 3 — Bells", "test-clicks"]
    wait_for(lambda: queue_titles(listener) == expected, 5, what="three queued")
    assert listener.locator("#queue button").count() == 0  # listeners only watch

    first = host.locator("#queue li").nth(0)
    assert first.locator("button", has_text="▲").is_disabled()
    first.locator("button", has_text="▼").click()
    expected = ["Demo 3 — Bells", "Demo 2 — Pulse", "test-clicks"]
    wait_for(lambda: queue_titles(listener) == expected, 5, what="moved down")
    host.locator("#queue li").nth(2).locator("button", has_text="▲").click()
    expected = ["Demo 3 — Bells", "test-clicks", "Demo 2 — Pulse"]
    wait_for(lambda: queue_titles(listener) == expected, 5, what="moved up")
    host.locator("#queue li", has_text="test-clicks").locator("button", has_text="✕").click()
    expected = ["Demo 3 — Bells", "Demo 2 — Pulse"]
    wait_for(lambda: queue_titles(listener) == expected, 5, what="removed")

    host.click("#queue-next")
    wait_for(
        lambda: (
            "Bells" in listener.locator("#track-title").inner_text()
            and queue_titles(listener) == ["Demo 2 — Pulse"]
        ),
        5,
        what="skipped to the next",
    )
    host.select_option("#queue-repeat", "all")
    host.click("#queue-shuffle")
    wait_for(
        lambda: listener.locator("#queue-mode").inner_text() == "1 queued · repeat all · shuffle",
        5,
        what="modes",
    )
    wait_for(
        lambda: host.locator("#queue-shuffle").get_attribute("aria-pressed") == "true",
        5,
        what="shuffle pressed",
    )
    assert host.locator("#queue-repeat").input_value() == "all"


# -- identity, access -----------------------------------------------------------


@pytest.mark.browser
def test_reload_keeps_the_host_role_and_a_second_tab_replaces_the_first(pages: Pages) -> None:
    room = new_room("t")
    host = pages.open(f"/r/{room}", "Ada")
    listener = pages.open(f"/r/{room}", "Bob")
    token = host.evaluate(f"sessionStorage.getItem('musicsync.token.{room}')")
    assert token and len(token) > 20
    host.reload()
    wait_for(lambda: role(host) == "host", 10, what="host again after reload")
    time.sleep(0.5)
    assert listener.locator(".people li").count() == 2  # the same participant, not a new one
    assert role(listener) == "listener"
    assert host.locator("#room-card").is_visible()

    # the same token in another tab takes the seat over: the first tab stops
    other = pages.open(f"/r/{room}", "Ada", session={f"musicsync.token.{room}": token})
    assert role(other) == "host"
    wait_for(lambda: host.locator("#notice").is_visible(), 5, what="replaced notice")
    assert "another tab" in host.locator("#notice-text").inner_text()
    assert host.locator("#mute").inner_text() == "Unmute"  # no double output on one device
    assert host.locator("#conn-text").inner_text() == "Disconnected"
    time.sleep(1.5)  # no reconnect loop fighting over the seat
    assert role(other) == "host"
    assert (probe(host) or {}).get("connection") == "closed"
    # "Use this tab" takes the seat back; the other tab stops in turn
    host.click("#notice-action")
    wait_for(lambda: (probe(host) or {}).get("connection") == "open", 10, what="back")
    wait_for(lambda: other.locator("#notice").is_visible(), 5, what="other replaced")
    assert role(host) == "host" and not host.locator("#notice").is_visible()
    assert host.locator("#mute").inner_text() == "Mute"


@pytest.mark.browser
def test_password_prompt_and_invites(pages: Pages) -> None:
    room = new_room("p")
    host = pages.open(f"/r/{room}", "Ada")
    host.fill("#room-password", "open sesame")
    host.locator("#password-set-form button", has_text="Set").click()
    wait_for(lambda: "Protected" in host.locator("#password-state").inner_text(), 5, what="set")

    guest = pages.open(f"/r/{room}", "Gus", wait_role=False)
    dialog = guest.locator("#password-dialog")
    wait_for(lambda: dialog.is_visible(), 10, what="password prompt")
    assert role(guest) is None
    guest.fill("#password-input", "wrong")
    guest.click("#password-dialog button[type=submit]")
    wait_for(
        lambda: (
            dialog.is_visible() and "Wrong password" in guest.locator("#password-msg").inner_text()
        ),
        10,
        what="wrong password said",
    )
    guest.fill("#password-input", "open sesame")
    guest.click("#password-dialog button[type=submit]")
    wait_for(lambda: role(guest) == "listener", 10, what="in with the password")
    assert not dialog.is_visible()
    assert guest.locator("#conn-text").inner_text() == "Connected"

    # a co-host invite opens the protected room without the password
    host.select_option("#invite-role", "cohost")
    host.click("#invite-create")
    link = host.locator("#invites input")
    wait_for(lambda: link.count() == 1, 5, what="invite link")
    url = link.input_value()
    assert url.startswith(pages.server.url + f"/r/{room}?invite=")
    cohost = pages.open(url.removeprefix(pages.server.url), "Cory")
    assert role(cohost) == "cohost"
    # the invite leaves the address bar (kept for this tab only) and survives a reload
    assert "invite=" not in cohost.url and "name=Cory" in cohost.url
    cohost.reload()
    wait_for(lambda: role(cohost) == "cohost", 10, what="co-host again after a reload")
    assert "invite=" not in cohost.url
    assert (
        cohost.locator("#host-card").is_visible() and cohost.locator("#queue-controls").is_visible()
    )
    assert not cohost.locator("#room-card").is_visible()
    assert cohost.locator("#people button").count() == 0  # no hand-over, no kick
    wait_for(
        lambda: "co-host" in host.locator("#people").inner_text().lower(),
        5,
        what="the host's list shows the co-host",
    )
    # revoking it removes the row
    host.locator("#invites button", has_text="Revoke").click()
    wait_for(lambda: host.locator("#invites li").count() == 0, 5, what="revoked")
    # clearing the password opens the room again
    host.click("#password-clear")
    wait_for(lambda: "Open" in host.locator("#password-state").inner_text(), 5, what="cleared")


@pytest.mark.browser
def test_host_removes_a_participant(pages: Pages) -> None:
    room = new_room("k")
    host = pages.open(f"/r/{room}", "Ada")
    victim = pages.open(f"/r/{room}", "Mal")
    wait_for(lambda: host.locator(".people li").count() == 2, 5, what="both listed")
    host.locator(".people li", has_text="Mal").locator("button", has_text="Remove").click()
    wait_for(lambda: victim.locator("#notice").is_visible(), 5, what="removed notice")
    assert "removed you" in victim.locator("#notice-text").inner_text()
    assert victim.locator("#mute").inner_text() == "Unmute"  # silenced, not saved
    assert victim.evaluate("localStorage.getItem('musicsync.muted')") in (None, "false")
    wait_for(lambda: host.locator(".people li").count() == 1, 5, what="gone from the list")
    time.sleep(1.5)  # and it does not come back on its own
    assert host.locator(".people li").count() == 1
    assert victim.locator("#conn-text").inner_text() == "Disconnected"


@pytest.mark.browser
def test_a_page_that_joins_in_tick_mode_ticks_too(pages: Pages) -> None:
    room = new_room("t")
    host = pages.open(f"/r/{room}", "Ada")
    toggle = host.locator("#tick-toggle")
    toggle.click()
    wait_for(lambda: toggle.get_attribute("aria-pressed") == "true", 5, what="tick mode on")
    late = pages.open(f"/r/{room}", "Lee")  # joins while every page ticks
    wait_for(
        lambda: "Tick mode" in late.locator("#calib-note").inner_text(), 5, what="late page ticks"
    )
    # the music is off while the ticks play, and the Mute button says why
    mute = late.locator("#mute")
    wait_for(lambda: mute.inner_text() == "Muted: calibrating", 5, what="the mute label")
    assert mute.is_disabled()
    late.set_viewport_size({"width": 390, "height": 844})
    late.screenshot(path=str(screenshot_dir() / "features-ticks-listener-phone.png"))
    toggle.click()
    wait_for(lambda: late.locator("#calib-note").is_hidden(), 5, what="tick mode off")
    # the host's page hears of it too (its own click is not the switch: the room's answer is)
    wait_for(lambda: toggle.get_attribute("aria-pressed") == "false", 5, what="host's toggle off")
    wait_for(lambda: mute.inner_text() == "Mute", 5, what="the music back")
    assert mute.is_enabled()
    assert late.evaluate("localStorage.getItem('musicsync.muted')") in (None, "false")


# -- upload and share ----------------------------------------------------------


@pytest.mark.browser
def test_upload_shows_progress_and_refusals(pages: Pages, tmp_path: Path) -> None:
    room = new_room("u")
    host = pages.open(f"/r/{room}", "Ada")
    tag = uuid.uuid4().hex[:6]
    wav = tmp_path / f"Upload test {tag}.wav"
    write_small_wav(wav)
    host.set_input_files("#upload-file", str(wav))
    status = host.locator("#upload-status")
    wait_for(lambda: "Added" in status.inner_text(), 10, what="upload done")
    progress = host.locator("#upload-progress")
    assert progress.is_visible()
    assert host.evaluate("document.getElementById('upload-progress').value") == 1
    wait_for(lambda: library_row(host, tag).count() == 1, 5, what="uploaded track listed")
    assert "0:01" in library_row(host, tag).inner_text()

    fake = tmp_path / "notes.mp3"
    fake.write_text("these are not the sounds you are looking for\n" * 20)
    host.set_input_files("#upload-file", str(fake))
    wait_for(lambda: "Upload failed" in status.inner_text(), 10, what="refusal shown")
    assert "not audio" in status.inner_text()
    assert "bad" in (status.get_attribute("class") or "")
    assert not progress.is_visible()


@pytest.mark.browser
def test_share_dialog_shows_the_link_and_its_qr_code(pages: Pages) -> None:
    room = new_room("s")
    page = pages.open(f"/r/{room}", "Ada")
    page.click("#share-open")
    dialog = page.locator("#share-dialog")
    wait_for(lambda: dialog.is_visible(), 5, what="share dialog")
    assert page.locator("#share-url").input_value() == f"{pages.server.url}/r/{room}"
    wait_for(
        lambda: page.evaluate(
            "(() => { const i = document.getElementById('share-qr');"
            " return i.complete && i.naturalWidth > 0; })()"
        ),
        5,
        what="QR code loaded",
    )
    page.click("#share-close")
    assert not dialog.is_visible()


# -- screenshots -----------------------------------------------------------------


@pytest.mark.browser
def test_feature_screenshots_at_desktop_and_phone_widths(pages: Pages) -> None:
    room = new_room("v")
    out = screenshot_dir()
    host = pages.open(f"/r/{room}", "Ada")
    listener = pages.open(f"/r/{room}", "Grace <b>Hopper</b> with a rather long display name")
    wait_for(lambda: library_row(host, "Demo 3").count() == 1, 5, what="library listing")
    for title in ("Demo 1", "Demo 2", "Demo 3"):
        add_to_queue(host, title)
    wait_for(lambda: len(queue_titles(listener)) == 2, 5, what="queued")
    host.click("#invite-create")
    wait_for(lambda: host.locator("#invites li").count() == 1, 5, what="invite")
    assert listener.locator(".people b").count() == 0
    time.sleep(0.5)
    for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        for who, page in (("host", host), ("listener", listener)):
            page.set_viewport_size(viewport)
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(0.3)
            page.screenshot(path=str(out / f"features-{who}-{width}.png"), full_page=True)
            overflow = page.evaluate(OVERFLOW_JS)
            assert not overflow, f"{who} at {width} overflows: {overflow}"
        host.click("#share-open")
        wait_for(lambda: host.evaluate("document.getElementById('share-qr').naturalWidth > 0"), 5)
        host.screenshot(path=str(out / f"features-share-{width}.png"))
        host.click("#share-close")
    host.fill("#room-password", "pw")
    host.locator("#password-set-form button", has_text="Set").click()
    wait_for(lambda: "Protected" in host.locator("#password-state").inner_text(), 5, what="set")
    guest = pages.open(f"/r/{room}", "Gus", viewport=PHONE, wait_role=False)
    wait_for(lambda: guest.locator("#password-dialog").is_visible(), 10, what="password prompt")
    guest.screenshot(path=str(out / "features-password-phone.png"))
    host.locator(".people li", has_text="Grace").locator("button", has_text="Remove").click()
    wait_for(lambda: listener.locator("#notice").is_visible(), 5, what="removed")
    listener.screenshot(path=str(out / "features-removed-phone.png"))
