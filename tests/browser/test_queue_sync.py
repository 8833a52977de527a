"""A queued track follows the current one on three skewed pages at the same instant.

The host (a plain WebSocket connection, first in the room so it holds the host
seat) queues two short generated tracks with known durations: A (8 s) becomes the
current track, B (20 s) waits in the queue. It plays A from 4.5 s before its
end; 4 s before the end the server announces B with ``start_at`` = A's end, and
every page must switch to B at that server time. Right after B's scheduled
start the test samples each page's output position (through the debug probe,
against the unskewed clock) and checks that every page plays B, that the pages
agree with each other, and that B started at its ``start_at``.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import threading
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from .audible import TRACE_DRAIN_JS, open_traced_page
from .conftest import (
    TRACK_RATE,
    DelayProxy,
    ServerProcess,
    expected_position,
    percentile,
    probe,
    serving,
    wait_for,
    write_click_track,
)
from .sync_scenario import SKEWS_MS, room_url, wait_clocks

TRACK_A = "queue-a.wav"
TRACK_B = "queue-b.wav"
A_SECONDS = 8
B_SECONDS = 20
PLAY_FROM_END_S = 4.5  # play A from here before its end: B is announced at once
WINDOW_S = 2.0  # "right after the change": this long after B's start_at
FIRST_S = 1.0  # the first second after the change gets a looser max
STEADY_S = (4.0, 6.0)  # and later, once the engine had test_sync's settling time
SAMPLE_INTERVAL_S = 0.03

# Inter-page spread bounds (ms) right after the change, without any settling:
# test_sync's steady bounds (webaudio p95 5 / max 10, element p95 30 / max 60,
# there after 0.5 s / 4 s of settling), the p95 taken as the p50 here and the
# first second allowed a looser max.
BOUNDS = {
    "webaudio": {
        "after_p50": 5.0,
        "after_max_first": 20.0,
        "after_max_rest": 10.0,
    },
    "element": {
        "after_p50": 30.0,
        # An <audio> element's play() lands 0.1-0.3 s late now and then on a
        # loaded machine (seen in a CI run at load 10: one page 178 ms off for
        # under a second, until its first correction seek); the coarse hard
        # bound holds for the first second, the tight ones after it.
        "after_max_first": 250.0,
        "after_max_rest": 60.0,
    },
}
# Later on B every engine stays within test_sync's element max (Web Audio's
# own steady bounds are test_sync's business: a loaded machine trips them here).
STEADY_MAX_MS = 60.0
# test_sync's bound on the median |position - room timeline|.
ABSOLUTE_MEDIAN_BOUND_MS = 30.0
# Hard limits: every page plays B this long after start_at, and right after the
# change no page strays further than a correction seek's threshold.
JOIN_BY_S = {"webaudio": 1.0, "element": 3.5}
AFTER_HARD_MAX_MS = 250.0
# A gapless change: no page is seen without a valid reading of B later than
# this after start_at (the probe is invalid while the output fades in or a
# play/seek lands, ~0.1 s).
GAPLESS_BY_S = 0.3


def write_tone_track(path: Path, seconds: int, hz: float, rate: int = TRACK_RATE) -> None:
    """A plain tone with a click every 500 ms: different content from the click track."""
    half = rate // 2
    click_len = rate // 400
    block = bytearray()
    for i in range(half):
        sample = 0.15 * math.sin(2 * math.pi * hz * i / rate)
        if i < click_len:
            sample += 0.5 * (1 - i / click_len)
        block += struct.pack("<h", int(max(-1.0, min(1.0, sample)) * 32767))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(block) * (seconds * 2))


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of our own whose media holds the two queue tracks."""
    media = tmp_path_factory.mktemp("queue-media")
    write_click_track(media / TRACK_A, seconds=A_SECONDS)
    write_tone_track(media / TRACK_B, seconds=B_SECONDS, hz=440.0)
    with serving(media) as srv:
        yield srv


@pytest.fixture
def queue_proxy(queue_server: ServerProcess) -> Iterator[DelayProxy]:
    with DelayProxy(queue_server.port) as p:
        yield p


class HostSocket:
    """The room's host as a trio-websocket connection in its own thread.

    Keeps every ``state`` it receives; ``send`` queues a protocol message.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.welcome: dict[str, Any] | None = None
        self.states: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._send: trio.MemorySendChannel[str] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="queue-host", daemon=True)

    def __enter__(self) -> HostSocket:
        self._thread.start()
        self._ready.wait(10)
        if self._error or self.welcome is None:
            raise RuntimeError(f"host connection failed: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[str](100)
        self._send = send
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with open_websocket_url(self.url) as ws:
                self.welcome = json.loads(await ws.get_message())
                self._ready.set()

                async def writer() -> None:
                    async for text in recv:
                        await ws.send_message(text)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer)
                    while True:
                        msg = json.loads(await ws.get_message())
                        with self._lock:
                            if msg.get("type") == "state":
                                self.states.append(msg["room"])
                            elif msg.get("type") == "error":
                                self.errors.append(msg)

    def send(self, kind: str, **fields: Any) -> None:
        assert self._send is not None and self._token is not None
        text = json.dumps({"type": kind, **fields})
        trio.from_thread.run(self._send.send, text, trio_token=self._token)

    def state_with_track(self, url: str) -> dict[str, Any] | None:
        with self._lock:
            for room in self.states:
                if room.get("track") and room["track"]["url"] == url and not room["paused"]:
                    return room
        return None


def queue_a_then_b(
    host: HostSocket,
    pages: list[Any],
    a: tuple[str, float],
    b: tuple[str, float],
    timeout: float,
) -> None:
    """The host queues A (into the empty room: it becomes current) then B; wait
    until every page has A current and B queued."""
    (a_url, a_seconds), (b_url, b_seconds) = a, b
    host.send("queue_add", url=a_url, title="A", duration=float(a_seconds))
    host.send("queue_add", url=b_url, title="B", duration=float(b_seconds))

    def queued() -> bool:
        for page in pages:
            room_state = (probe(page) or {}).get("room") or {}
            track = room_state.get("track") or {}
            q = room_state.get("queue") or []
            if track.get("url") != a_url or [x["url"] for x in q] != [b_url]:
                return False
        return True

    wait_for(queued, timeout, what="A current and B queued on every page")


@dataclass
class Change:
    """Readings after B's start_at: per round, each page's (position - true time)."""

    start_at: float
    rounds: list[tuple[float, list[float], list[float]]] = field(default_factory=list)
    first_valid: list[float | None] = field(default_factory=list)
    # the latest reading (s after start_at) that showed a page not yet on B
    last_missing: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    # every page's probe readings: (s after start_at, valid, clock offset, drift, correction)
    series: list[list[tuple[float, bool, float, float, str]]] = field(default_factory=list)

    def spreads(self, lo_s: float, hi_s: float) -> list[float]:
        out = []
        for t, errs, _ in self.rounds:
            if lo_s <= (t - self.start_at) / 1000 < hi_s:
                out.append(max(errs) - min(errs))
        return out

    def absolute(self, lo_s: float, hi_s: float) -> list[float]:
        out = []
        for t, _, absolute in self.rounds:
            if lo_s <= (t - self.start_at) / 1000 < hi_s:
                out.extend(abs(a) for a in absolute)
        return out


def measure_change(pages: list[Any], b_url: str, b_state: dict[str, Any], grace_s: float) -> Change:
    """Sample every page from B's start_at until the end of STEADY_S.

    A page not (yet) on B counts as wrong only after ``grace_s``; before that
    its round is just left out.
    """
    start_at = float(b_state["start_at"])
    change = Change(
        start_at,
        first_valid=[None] * len(pages),
        last_missing=[0.0] * len(pages),
        series=[[] for _ in pages],
    )
    while True:
        samples = [probe(p) for p in pages]
        true_now = max((s or {}).get("trueAt", 0.0) for s in samples)
        since = (true_now - start_at) / 1000
        if since >= STEADY_S[1]:
            return change
        if since < 0:
            time.sleep(0.01)
            continue
        for i, s in enumerate(samples):
            got = s or {}
            change.series[i].append(
                (
                    (got.get("trueAt", true_now) - start_at) / 1000,
                    bool(got.get("valid")),
                    float(got.get("clockOffset") or math.nan),
                    float(got.get("drift") or math.nan),
                    str((got.get("why") or {}).get("correction", "")),
                )
            )
        ok = True
        errs: list[float] = []
        absolute: list[float] = []
        for i, s in enumerate(samples):
            if not s or not s.get("valid"):
                if change.first_valid[i] is None:
                    change.last_missing[i] = since
                if since > grace_s:
                    got = s or {}
                    change.wrong.append(
                        f"page{i} at +{since:.2f}s: no valid output reading"
                        f" (version {got.get('version')}, position {got.get('position')},"
                        f" why {got.get('why')})"
                    )
                ok = False
                continue
            room = s["room"]
            pos_b = (s["trueAt"] - start_at) / 1000
            if pos_b < 0.01:  # this page's reading is from (just) before the change
                ok = False
                continue
            on_b = room["track"]["url"] == b_url and room["version"] >= b_state["version"]
            # on A the position would read >= A_SECONDS - PLAY_FROM_END_S
            if not on_b or abs(s["position"] - pos_b) > 1.0:
                if change.first_valid[i] is None:
                    change.last_missing[i] = since
                if since > grace_s:
                    change.wrong.append(
                        f"page{i} at +{since:.2f}s: {room['track']['url']} {s['position']:.3f}s"
                    )
                ok = False
                continue
            if change.first_valid[i] is None:
                change.first_valid[i] = (s["trueAt"] - start_at) / 1000
            errs.append(s["position"] * 1000 - s["trueAt"])
            absolute.append((s["position"] - expected_position(room, s["trueAt"])) * 1000)
        if ok:
            change.rounds.append((max(s["trueAt"] for s in samples if s), errs, absolute))
        time.sleep(SAMPLE_INTERVAL_S)


def explain(
    change: Change, traces: list[list[list[Any]]], consoles: list[list[str]], pages: list[int]
) -> str:
    """What the named pages asked of the audio APIs around the change, and what they logged."""
    out = []
    for i in sorted(set(pages)):
        events = [
            f"{e[0]}@{(e[1] - change.start_at) / 1000:+.3f}s {e[2:]}"
            for e in traces[i]
            if -5000 < e[1] - change.start_at < STEADY_S[1] * 1000
        ]
        out.append(f"\n  page{i} audio API trace (s after start_at): {events[-40:]}")
        out.append(f"\n  page{i} console: {consoles[i][-10:]}")
        first_wrong = min(
            float(w.split("+", 1)[1].split("s", 1)[0])
            for w in change.wrong
            if w.startswith(f"page{i} ")
        )
        readings = [
            f"{t:+.2f} {'ok' if ok else '--'} off={off:.2f} drift={d:.1f} {why}".rstrip()
            for t, ok, off, d, why in change.series[i]
            if first_wrong - 0.6 <= t <= first_wrong + 1.0
        ]
        out.append(f"\n  page{i} readings (s, valid, clock offset ms, drift ms, why): {readings}")
    return "".join(out)


def summary(values: list[float]) -> str:
    if not values:
        return "n=0"
    return f"n={len(values)} p50={percentile(values, 0.5):.2f} max={max(values):.2f}"


@pytest.mark.browser
@pytest.mark.parametrize("engine", ["webaudio", "element"])
def test_next_track_starts_together_on_three_pages(
    browser: Any, queue_server: ServerProcess, queue_proxy: DelayProxy, engine: str
) -> None:
    bounds = BOUNDS[engine]
    room = f"q{uuid.uuid4().hex[:10]}"
    a_url, b_url = f"/media/{TRACK_A}", f"/media/{TRACK_B}"
    ws_url = queue_server.url.replace("http://", "ws://") + f"/ws/{room}?name=host"
    t_begin = time.monotonic()
    pages: list[Any] = []
    consoles: list[list[str]] = [[] for _ in SKEWS_MS]
    traces: list[list[list[Any]]] = [[] for _ in SKEWS_MS]
    with HostSocket(ws_url) as host:
        assert host.welcome and host.welcome["you"]["role"] == "host", host.welcome
        try:
            pages = [
                open_traced_page(browser, room_url(queue_proxy, room, engine, f"page{i}"), skew)
                for i, skew in enumerate(SKEWS_MS)
            ]
            for i, page in enumerate(pages):
                page.on("console", lambda m, i=i: consoles[i].append(f"{m.type}: {m.text}"))
            wait_clocks(pages)
            for page in pages:
                assert probe(page)["engine"] == engine

            queue_a_then_b(host, pages, (a_url, A_SECONDS), (b_url, B_SECONDS), 10)
            time.sleep(1.0)  # let the pages fetch and decode A and B

            host.send("play", position=A_SECONDS - PLAY_FROM_END_S)
            b_state = wait_for(
                lambda: host.state_with_track(b_url), PLAY_FROM_END_S + 3, what="B announced"
            )
            assert b_state["position"] == 0
            assert not host.errors, host.errors
            change = measure_change(pages, b_url, b_state, JOIN_BY_S[engine])
            traces = [page.evaluate(TRACE_DRAIN_JS) for page in pages]
        finally:
            for page in pages:
                page.context.close()
    elapsed = time.monotonic() - t_begin

    first = change.spreads(0.0, FIRST_S)
    rest = change.spreads(FIRST_S, WINDOW_S)
    after = first + rest
    after_abs = change.absolute(0.0, WINDOW_S)
    steady = change.spreads(*STEADY_S)
    steady_abs = change.absolute(*STEADY_S)
    joined = ", ".join("never" if t is None else f"{t * 1000:.0f}" for t in change.first_valid)
    missing = ", ".join(f"{t * 1000:.0f}" for t in change.last_missing)
    print(
        f"\n{engine} right after the change (0-{WINDOW_S:g}s): spread {summary(after)}"
        f" | first {FIRST_S:g}s {summary(first)} | rest {summary(rest)}"
        f" | |pos - (now - start_at)| {summary(after_abs)} ms"
        f"\n{engine} steady on B ({STEADY_S[0]:g}-{STEADY_S[1]:g}s): spread {summary(steady)}"
        f" | |abs| {summary(steady_abs)} ms"
        f"\n{engine} per page: last reading without B {missing}, first valid B reading"
        f" {joined} ms after start_at"
        f" | case {elapsed:.1f}s"
    )

    # (a) every page plays B, from soon after its start_at on
    assert not change.wrong, f"{engine}: pages not playing B: {change.wrong[:5]}" + explain(
        change, traces, consoles, [int(w.split(" ", 1)[0][4:]) for w in change.wrong]
    )
    late = [t for t in change.first_valid if t is None or t > JOIN_BY_S[engine]]
    assert not late, f"{engine}: pages joined B late: {joined} ms"
    assert len(steady) >= 8, f"{engine}: too few valid rounds on B later ({len(steady)})"
    # (b), (c) coarse right after the change, and together on B's timeline later
    if after:
        assert max(after) < AFTER_HARD_MAX_MS, f"{engine}: spread after the change {summary(after)}"
        assert percentile(after_abs, 0.5) < AFTER_HARD_MAX_MS, (
            f"{engine}: B not at its start_at: |position - (now - start_at)| {summary(after_abs)}"
        )
    assert max(steady) < STEADY_MAX_MS, f"{engine}: on B {summary(steady)}"
    assert percentile(steady_abs, 0.5) < ABSOLUTE_MEDIAN_BOUND_MS, (
        f"{engine}: off B's timeline {summary(steady_abs)}"
    )

    # (b), (c) tight, right after the change: a gapless switch at start_at
    problems = []
    if max(change.last_missing) > GAPLESS_BY_S:
        problems.append(f"pages seen without B until {missing} ms after start_at")
    if len(after) < 4 or not rest:
        problems.append(f"too few valid rounds in the first {WINDOW_S:g} s ({len(after)})")
    elif percentile(after, 0.5) >= bounds["after_p50"]:
        problems.append(f"p50 spread {percentile(after, 0.5):.1f} ms")
    if first and max(first) >= bounds["after_max_first"]:
        problems.append(f"first second max spread {max(first):.1f} ms")
    if rest and max(rest) >= bounds["after_max_rest"]:
        problems.append(f"second second max spread {max(rest):.1f} ms")
    if after_abs and percentile(after_abs, 0.5) >= ABSOLUTE_MEDIAN_BOUND_MS:
        problems.append(f"median |pos - (now - start_at)| {percentile(after_abs, 0.5):.1f} ms")
    assert not problems, f"{engine}: right after the change: {'; '.join(problems)}"
