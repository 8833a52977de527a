"""Fixtures for the real-browser tests: the server, a delaying TCP proxy, Chromium.

* ``server`` runs ``python -m musicsync serve --port 0`` in a subprocess with a
  temporary media directory holding a generated test track.
* ``DelayProxy`` is a TCP proxy on trio (in a thread) that delays every chunk, in
  each direction, by a random 20-80 ms while keeping the byte order.
* ``skewed_page`` opens a page in its own browser context whose clocks
  (``performance.now``, ``performance.timeOrigin``, ``Date.now`` and the
  ``performanceTime`` of ``AudioContext.getOutputTimestamp``) are shifted by a
  fixed amount. The unshifted clock stays readable for the test only, through a
  non-enumerable ``__msTrueNow`` the init script defines.

The helpers here are shared with ``benchmarks/bench_sync.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import shlex
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SERVER_START_TIMEOUT = 20.0
TRACK_NAME = "test-clicks.wav"
TRACK_SECONDS = 90
TRACK_RATE = 44100
PROXY_DELAY_MS = (20.0, 80.0)
PROXY_CHUNK = 65536

# The init script: shift the page's clocks, keep the true one in a closure.
SKEW_SCRIPT = """
(() => {
  const SKEW = %(skew)r;
  const RATE = 1 + %(ppm)r * 1e-6;  // the page's clock may also run fast or slow
  const perf = globalThis.performance;
  const nativeNow = Performance.prototype.now;
  const nativeOrigin = perf.timeOrigin;
  const nativeDateNow = Date.now;
  const trueNow = () => nativeOrigin + nativeNow.call(perf);
  const base = nativeNow.call(perf);
  const warp = (t) => base + (t - base) * RATE + SKEW;
  Object.defineProperty(Performance.prototype, "now", {
    value: function now() { return warp(nativeNow.call(this)); },
    configurable: true, writable: true,
  });
  Object.defineProperty(Performance.prototype, "timeOrigin", {
    get() { return nativeOrigin + SKEW; }, configurable: true,
  });
  const dateBase = nativeDateNow.call(Date);
  Date.now = function now() {
    return dateBase + (nativeDateNow.call(Date) - dateBase) * RATE + SKEW;
  };
  if (globalThis.AudioContext && AudioContext.prototype.getOutputTimestamp) {
    const nativeTs = AudioContext.prototype.getOutputTimestamp;
    AudioContext.prototype.getOutputTimestamp = function getOutputTimestamp() {
      const ts = nativeTs.call(this);
      return { contextTime: ts.contextTime, performanceTime: warp(ts.performanceTime) };
    };
  }
  Object.defineProperty(globalThis, "__msTrueNow", { value: trueNow, enumerable: false });
})();
"""

# Read one probe sample, and the true clock at the same instant.
PROBE_JS = """
() => {
  let detail = null;
  const take = (e) => { detail = e.detail; };
  document.addEventListener("musicsync:probe", take, { once: true });
  document.dispatchEvent(new CustomEvent("musicsync:probe-request"));
  document.removeEventListener("musicsync:probe", take);
  const skewedNow = performance.now();
  const trueNow = globalThis.__msTrueNow
    ? globalThis.__msTrueNow() : performance.timeOrigin + skewedNow;
  if (!detail) return null;
  return { ...detail, trueAt: trueNow - (skewedNow - detail.at) };
}
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives real Chromium through Playwright")


# -- test media ---------------------------------------------------------------


def write_click_track(path: Path, seconds: int = TRACK_SECONDS, rate: int = TRACK_RATE) -> None:
    """A click every 250 ms over a quiet 220 Hz tone, with a stronger click every second.

    Easy to align by ear or by recording. Built from one-second blocks so long
    tracks are quick to write.
    """
    quarter = rate // 4
    click_len = rate // 500
    block = bytearray()
    for accent in (1.0, 0.6, 0.6, 0.6):
        for i in range(quarter):
            sample = 0.08 * math.sin(2 * math.pi * 220 * i / rate)
            if i < click_len:
                sample += 0.7 * accent * (1 - i / click_len)
            block += struct.pack("<h", int(max(-1.0, min(1.0, sample)) * 32767))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(block) * seconds)


# -- the server ----------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


def start_server(media: Path) -> ServerProcess:
    """Start the server on a free port; MUSICSYNC_SERVER_CMD overrides the command."""
    override = os.environ.get("MUSICSYNC_SERVER_CMD")
    cmd = shlex.split(override) if override else [sys.executable, "-m", "musicsync", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--media", str(media)]
    # a room database of its own: never the user's, never another test server's
    cmd += ["--data", tempfile.mkdtemp(prefix="musicsync-data-")]
    # every page connects from 127.0.0.1: one session's tests would otherwise
    # reach the per-address cap (64) and later pages be refused with 4429
    cmd += ["--max-connections-per-ip", "10000"]
    # a short resume grace: a departed host's seat frees up quickly in the tests
    env = {"MUSICSYNC_RESUME_GRACE": "2", **os.environ}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            ServerProcess("", 0, proc, output).stop()
            raise RuntimeError("server did not start:\n" + "".join(output))
        marker = "musicsync listening on "
        if marker in line:
            url = line.split(marker, 1)[1].split()[0].rstrip("/")
            return ServerProcess(url, int(url.rsplit(":", 1)[1]), proc, output)


# -- the delaying proxy ------------------------------------------------------


class DelayProxy:
    """TCP proxy adding a random one-way delay to every chunk, order preserved.

    Runs its own trio loop in a thread. ``drop_all()`` cuts every open
    connection (to test reconnects); ``stop()`` ends it.
    """

    def __init__(
        self,
        target_port: int,
        delay_ms: tuple[float, float] = PROXY_DELAY_MS,
        seed: int = 1,
    ) -> None:
        self.target_port = target_port
        self.delay_ms = delay_ms
        self.random = random.Random(seed)
        self.port = 0
        self.connections = 0
        self.broken = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._conn_scopes: set[trio.CancelScope] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        self._ready.wait(10)
        if self._error or not self.port:
            raise RuntimeError(f"proxy failed to start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # surfaced through __enter__ / stop
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as scope:
            self._cancel = scope
            self._ready.set()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as scope:
            self._conn_scopes.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with client, upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)
            except Exception:  # a peer went away mid-transfer (often wrapped in a group)
                self.broken += 1
            finally:
                self._conn_scopes.discard(scope)

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        lo, hi = self.delay_ms

        async def deliver() -> None:
            async with recv:
                async for due, data in recv:
                    await trio.sleep_until(due)
                    await dst.send_all(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver)
                last_due = 0.0
                async with send:
                    while True:
                        data = await src.receive_some(PROXY_CHUNK)
                        if not data:
                            break
                        due = max(
                            trio.current_time() + self.random.uniform(lo, hi) / 1000, last_due
                        )
                        last_due = due
                        await send.send((due, data))
                await trio.sleep_until(last_due + 0.001)
            await dst.send_eof()
        except Exception:  # the other side closed: end this connection
            self.broken += 1
        finally:
            scope.cancel()

    def drop_all(self) -> None:
        """Cut every open connection at once (the server sees the clients vanish)."""
        assert self._token is not None

        def cancel() -> None:
            for s in list(self._conn_scopes):
                s.cancel()

        trio.from_thread.run_sync(cancel, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._cancel is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)


# -- pages ------------------------------------------------------------------


def open_skewed_page(browser: Any, url: str, skew_ms: float, ppm: float = 0.0) -> Any:
    """A page in its own context whose clocks read ``skew_ms`` ahead (and run ``ppm`` fast)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.add_init_script(SKEW_SCRIPT % {"skew": float(skew_ms), "ppm": float(ppm)})
    page = context.new_page()
    page.goto(url)
    return page


def probe(page: Any) -> dict[str, Any] | None:
    result: dict[str, Any] | None = page.evaluate(PROBE_JS)
    return result


def wait_for(
    predicate: Any,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    detail: Any = None,
) -> Any:
    """Poll ``predicate`` until truthy; on timeout the message adds ``detail()`` if given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ""
            if detail is not None:
                try:
                    extra = f"\n  state: {detail()}"
                except Exception as exc:  # diagnostics must not hide the timeout
                    extra = f"\n  (no state: {exc!r})"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def wait_playing(page: Any, timeout: float = 10) -> dict[str, Any]:
    """Wait until the page outputs a valid position; on timeout, say why it does not."""
    result: dict[str, Any] = wait_for(
        lambda: (p := probe(page)) and p.get("valid") and p,
        timeout,
        what="playing",
        detail=lambda: probe(page),
    )
    return result


def host_page(pages: list[Any]) -> Any:
    """The page whose participant is the host (claiming it if nobody is)."""
    for _ in range(2):
        for page in pages:
            p = probe(page)
            if p and p.get("role") == "host":
                return page
        claim = pages[0].locator("#claim")
        if claim.is_visible():
            claim.click()
        time.sleep(0.5)
    raise AssertionError("no page became host")


@dataclass
class Round:
    """One sampling round: each page's (position - true time) in ms."""

    true_ms: float
    errors_ms: list[float]
    absolute_ms: list[float]

    @property
    def spread_ms(self) -> float:
        return max(self.errors_ms) - min(self.errors_ms)


def expected_position(room: dict[str, Any], server_ms: float) -> float:
    if room["paused"] or server_ms < room["start_at"]:
        return float(room["position"])
    return float(room["position"] + (server_ms - room["start_at"]) / 1000 * room["rate"])


def sample_round(pages: list[Any]) -> Round | None:
    """Probe every page once. None unless all are playing with a valid reading.

    Each page's reading is normalised to ``position - true_time`` so readings
    taken a few ms apart compare directly. ``absolute_ms`` compares with the
    room timeline using the true clock as the server clock (same machine).
    """
    samples = [probe(p) for p in pages]
    if not all(s and s.get("valid") for s in samples):
        return None
    errors, absolute = [], []
    for s in samples:
        assert s is not None
        errors.append(s["position"] * 1000 - s["trueAt"])
        absolute.append((s["position"] - expected_position(s["room"], s["trueAt"])) * 1000)
    versions = {s["room"]["version"] for s in samples if s}
    if len(versions) != 1:
        return None
    ref = samples[0]
    assert ref is not None
    return Round(ref["trueAt"], errors, absolute)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    write_click_track(d / TRACK_NAME)
    return d


@contextlib.contextmanager
def serving(media: Path) -> Iterator[ServerProcess]:
    """A server on ``media`` for the length of the block."""
    srv = start_server(media)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(media_dir: Path) -> Iterator[ServerProcess]:
    with serving(media_dir) as srv:
        yield srv


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[DelayProxy]:
    with DelayProxy(server.port) as p:
        yield p


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def browser(playwright: Any) -> Iterator[Any]:
    # one Chromium per test: a shared one accumulated the earlier tests' audio
    # contexts, and Web Audio pages of later tests failed to start in full runs
    b = launch_chromium(playwright)
    try:
        yield b
    finally:
        b.close()
