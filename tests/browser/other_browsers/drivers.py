"""Firefox and WebKit pages with the small part of Playwright's page API the tests use.

Neither browser can come from ``playwright install`` here (it downloads builds),
so each is Debian's own:

* **Firefox**: ``firefox-esr``, driven over WebDriver BiDi by ``puppeteer-core``
  (npm) in ``firefox_driver.mjs``, a Node process answering one JSON request per
  line. Autoplay is allowed through Firefox preferences.
* **WebKit**: WebKitGTK's ``MiniBrowser`` through ``WebKitWebDriver``
  (``webkit2gtk-driver``) and Selenium, on a private ``Xvfb`` display (the GTK
  MiniBrowser has no headless mode). MiniBrowser takes WebKit settings as
  options: autoplay is allowed. This WebKitWebDriver speaks classic WebDriver
  only (no BiDi, no script before the page's own, and MiniBrowser prints no
  console messages in automation mode), so a WebKit page's uncaught errors and
  CSP violations are seen by listeners added as soon as the page has loaded.

Both browsers play into ``NullAudio``, a private PulseAudio null sink (Firefox
never starts an AudioContext without an output device).

Both page classes offer ``evaluate(fn_source, arg)``, ``click``, ``fill``,
``goto``, ``set_viewport``, ``screenshot`` and ``problems()``, so conftest's
``probe``/``sample_round`` work on them as on a Playwright page.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ..conftest import stop_process

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE
FIREFOX = "/usr/bin/firefox-esr"
WEBKIT_DRIVER = "/usr/bin/WebKitWebDriver"
MINIBROWSER_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser",
    "/usr/lib/aarch64-linux-gnu/webkit2gtk-4.1/MiniBrowser",
    "/usr/libexec/webkit2gtk-4.1/MiniBrowser",
)
XVFB = "/usr/bin/Xvfb"
PULSEAUDIO = "/usr/bin/pulseaudio"
REQUEST_TIMEOUT_S = 45.0  # puppeteer's own protocol timeout is 30 s
# Real-time priorities (when the process may: root), as tests/browser/pulse.py gives
# the as-heard tests' daemon and Chromium: on a loaded machine, at normal priority,
# Firefox's audio stalled for 40-600 ms every few seconds (its context's time stood
# still, then ran on that much behind) and the page, rightly, followed it.
DAEMON_RT_PRIORITY = 8  # the null sink's daemon: it serves every stream's data requests
FIREFOX_AUDIO_RT_PRIORITY = 7  # Firefox's AudioIPC threads, which carry its audio callbacks
# thread names (/proc comm, which Firefox cuts to 15 characters: "AudioIP~allback")
FIREFOX_AUDIO_THREADS = ("AudioIP", "threaded-ml")

# media.autoplay.default=0: allowed; blocking_policy=0: no user activation needed
FIREFOX_PREFS: dict[str, Any] = {
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "media.autoplay.block-webaudio": False,
    "media.block-autoplay-until-in-foreground": False,
}
WEBKIT_ARGS = (
    "--automation",
    "--autoplay-policy=allow",
    "--media-playback-requires-user-gesture=false",
    "--enable-webaudio=true",
)

# Deliberate faults to show that the problem detectors see what they should.
INJECT_CSP_VIOLATION_JS = """() => {
  const s = document.createElement("script");
  s.textContent = "globalThis.__obInlineRan = true;";
  document.head.append(s);
  return globalThis.__obInlineRan === true;
}"""
INJECT_UNCAUGHT_ERROR_JS = """() => {
  setTimeout(() => { throw new Error("ob-deliberate-uncaught"); }, 0);
}"""
# For WebKit (no script runs before the page's own): listeners added after load
WATCH_JS = """() => {
  if (globalThis.__obViolations) return;
  const seen = [];
  Object.defineProperty(globalThis, "__obViolations", { value: seen, enumerable: false });
  document.addEventListener("securitypolicyviolation", (e) => {
    seen.push(e.violatedDirective + " blocked " + (e.blockedURI || "inline"));
  });
  const errors = [];
  Object.defineProperty(globalThis, "__obErrors", { value: errors, enumerable: false });
  addEventListener("error", (e) => { errors.push(String(e.message)); });
  addEventListener("unhandledrejection", (e) => { errors.push("unhandled: " + String(e.reason)); });
}"""


def minibrowser() -> str | None:
    for path in MINIBROWSER_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def missing_firefox() -> list[str]:
    missing = [b for b in (FIREFOX, shutil.which("node") or "node") if not os.access(b, os.X_OK)]
    if not (NODE_DIR / "node_modules" / "puppeteer-core").is_dir():
        missing.append(f"{NODE_DIR}/node_modules (npm ci)")
    return missing


def missing_webkit() -> list[str]:
    missing = [b for b in (WEBKIT_DRIVER, XVFB) if not os.access(b, os.X_OK)]
    if minibrowser() is None:
        missing.append("MiniBrowser (webkit2gtk-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    return missing


# -- a sound card -------------------------------------------------------------


def make_realtime(tid: int, priority: int) -> bool:
    """SCHED_RR for one thread when allowed (best effort: False when not)."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    try:
        if os.sched_getscheduler(tid) != os.SCHED_RR:
            os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(priority))
    except OSError:
        return False
    return True


def descendants(root: int) -> list[int]:
    """The processes under ``root`` (not ``root`` itself), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class NullAudio:
    """A private PulseAudio daemon with one null sink: an output device for the browsers.

    Without any output device Firefox never starts an AudioContext (``resume()``
    stays pending): a machine with speakers is the case worth testing. Its
    socket, state and config live in a temporary directory; ``env`` points a
    browser at it. Its main thread runs at real-time priority when allowed (root),
    as ``tests/browser/pulse.py``'s does.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="musicsync-ob-pulse-"))
        self.socket = self.dir / "native"
        for d in ("runtime", "state", "config"):
            (self.dir / d).mkdir(mode=0o700)
        (self.dir / "client.conf").write_text("autospawn = no\n")
        script = self.dir / "default.pa"
        script.write_text(
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n"
            "load-module module-null-sink sink_name=speakers rate=48000\n"
            "set-default-sink speakers\n"
        )
        self.env = {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_CLIENTCONFIG": str(self.dir / "client.conf"),
        }
        daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("PULSE_")}
        daemon_env.update(
            HOME=str(self.dir),
            XDG_RUNTIME_DIR=str(self.dir / "runtime"),
            XDG_CONFIG_HOME=str(self.dir / "config"),
            PULSE_RUNTIME_PATH=str(self.dir / "runtime"),
            PULSE_STATE_PATH=str(self.dir / "state"),
            PULSE_CLIENTCONFIG=str(self.dir / "client.conf"),
        )
        self.proc = subprocess.Popen(
            [
                *(PULSEAUDIO, "--daemonize=no", "--system=false", "-n", f"--file={script}"),
                *("--exit-idle-time=-1", "--use-pid-file=no", "--log-target=stderr"),
            ],
            env=daemon_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.05)
        make_realtime(self.proc.pid, DAEMON_RT_PRIORITY)  # its main thread

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- Firefox ------------------------------------------------------------------


class FirefoxHung(RuntimeError):
    """Firefox stopped answering a request: a test failure, never retried.

    The one cause found so far was the page's: its first getOutputTimestamp()
    (or outputLatency) made Firefox ask PulseAudio for the stream latency on the
    page's main thread while holding the audio graph's lock (MediaTrackGraph's
    monitor). Stacks taken with gdb from the hung processes: the content main
    thread waiting for that AudioIPC reply, its GraphRunner waiting for the lock,
    its AudioIPC callback thread waiting for the GraphRunner; in the parent the
    PulseAudio "threaded-ml" thread inside the stream's write callback waiting
    for that callback, and the "AudioIPC Server RPC" thread waiting for the
    PulseAudio mainloop lock to answer the latency request: a deadlock. The page
    no longer asks Firefox for its output latency (LATENCY_QUERY_MAY_HANG).
    """


class FirefoxBrowser:
    """A ``firefox_driver.mjs`` process and the Firefox it launched."""

    name = "firefox"

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self._stderr = open(log_dir / "firefox-driver.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["node", str(HERE / "firefox_driver.mjs")],
            cwd=NODE_DIR,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        self._lock = threading.Lock()
        self.hung: str | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.version = self.request(
                "launch", executablePath=FIREFOX, prefs=FIREFOX_PREFS, headless=True
            )
        except BaseException:
            self.close()
            raise

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._answers.put(json.loads(line))
        self._answers.put(None)

    def request(self, op: str, **args: Any) -> Any:
        if self.hung:
            raise FirefoxHung(f"firefox {op}: Firefox hung earlier ({self.hung})")
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, "args": args}) + "\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + REQUEST_TIMEOUT_S
            while True:
                try:
                    answer = self._answers.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self.hung = f"no answer to {op} in {REQUEST_TIMEOUT_S:.0f} s"
                    raise FirefoxHung(f"firefox {op}: {self.hung}") from None
                if answer is None:
                    raise RuntimeError(f"firefox driver exited during {op}")
                if answer.get("id") == rid:
                    break
        if not answer["ok"]:
            error = str(answer["error"])
            if "timed out" in error.lower() or "TimeoutError" in error:
                self.hung = error.splitlines()[0]
                raise FirefoxHung(f"firefox {op}: {error}")
            raise RuntimeError(f"firefox {op}: {error}")
        return answer["value"]

    def new_page(self, width: int, height: int) -> FirefoxPage:
        return FirefoxPage(self, self.request("newPage", width=width, height=height))

    def boost_audio(self) -> int:
        """Real-time priority for this Firefox's audio threads; how many there are.

        They start with its first audio stream: call it once a page plays.
        """
        boosted = 0
        for pid in descendants(self.proc.pid):
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                except OSError:
                    continue
                if comm.startswith(FIREFOX_AUDIO_THREADS):
                    boosted += make_realtime(int(tid), FIREFOX_AUDIO_RT_PRIORITY)
        return boosted

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.hung:
                self.proc.terminate()  # puppeteer's SIGTERM handler kills Firefox first
            else:
                with contextlib.suppress(Exception):
                    self.request("close")
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                with contextlib.suppress(OSError):
                    f.close()
        self._stderr.close()


class FirefoxPage:
    def __init__(self, browser: FirefoxBrowser, page_id: int) -> None:
        self.browser = browser
        self.id = page_id

    def goto(self, url: str) -> None:
        self.browser.request("goto", page=self.id, url=url)

    def evaluate(self, fn: str, arg: Any = None) -> Any:
        return self.browser.request("evaluate", page=self.id, fn=fn, arg=arg)

    def click(self, selector: str) -> None:
        self.browser.request("click", page=self.id, selector=selector)

    def fill(self, selector: str, value: str) -> None:
        self.browser.request("fill", page=self.id, selector=selector, value=value)

    def set_viewport(self, width: int, height: int) -> None:
        self.browser.request("viewport", page=self.id, width=width, height=height)

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        self.browser.request("screenshot", page=self.id, path=str(path), fullPage=full_page)

    def close(self) -> None:
        self.browser.request("closePage", page=self.id)

    def problems(self) -> list[str]:
        """Uncaught errors, console errors and CSP violations since the page opened."""
        logs = self.browser.request("logs", page=self.id)
        out = [f"uncaught: {e}" for e in logs["errors"]]
        out += [f"csp: {v}" for v in logs["violations"]]
        out += [
            f"console.{m['type']}: {m['text']}"
            for m in logs["console"]
            if m["type"] == "error"
            or "Content-Security-Policy" in m["text"]
            or "Content Security Policy" in m["text"]
        ]
        return out


# -- WebKit -------------------------------------------------------------------

# What MiniBrowser writes to the driver's log when the page's WebProcess dies.
WEBPROCESS_CRASHED = "WebProcess CRASHED"
CRASH_LOG_WAIT_S = 3.0  # after a failed WebDriver call: how long the crash line may take to arrive


class WebKitCrashed(RuntimeError):
    """WebKit's WebProcess crashed under the page: the browser failed, and the test cannot judge.

    Raised only when a WebDriver call fails and the driver's log carries
    WEBPROCESS_CRASHED (seen once in ~28 runs, just as Web Audio started, in
    WebKitGTK 2.50: the call answers "Could not parse script result", and the
    session is gone after it). The message carries the log's crash lines.
    """


class Xvfb:
    """A private X display (``Xvfb -displayfd`` picks a free number)."""

    def __init__(self, width: int = 1600, height: int = 1200) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [
                *(XVFB, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24"),
                *("-nolisten", "tcp", "-noreset"),
            ],
            pass_fds=[write_fd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_fd)
        try:
            number = b""
            deadline = time.monotonic() + 30
            while not number.endswith(b"\n") and time.monotonic() < deadline:
                chunk = os.read(read_fd, 16)
                if not chunk:
                    break
                number += chunk
        finally:
            os.close(read_fd)
        if not number.strip():
            self.stop()
            raise RuntimeError("Xvfb did not start")
        self.display = f":{number.decode().strip()}"

    def stop(self) -> None:
        stop_process(self.proc)


class WebKitBrowser:
    """MiniBrowser under WebKitWebDriver on a private Xvfb display: one page."""

    name = "webkit"

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        from selenium import webdriver
        from selenium.webdriver.webkitgtk.service import Service

        self.log_path = log_dir / "webkit-driver.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.xvfb = Xvfb()
        self.driver: Any = None
        try:
            opts = webdriver.WebKitGTKOptions()
            binary = minibrowser()
            assert binary is not None
            opts.binary_location = binary
            for arg in WEBKIT_ARGS:
                opts.add_argument(arg)
            env = {**os.environ, **(env or {}), "DISPLAY": self.xvfb.display}
            env.pop("WAYLAND_DISPLAY", None)
            # a private runtime/cache dir: no D-Bus session, nothing of the user's
            runtime = tempfile.mkdtemp(prefix="musicsync-webkit-")
            env.update(XDG_RUNTIME_DIR=runtime, XDG_CACHE_HOME=runtime, XDG_DATA_HOME=runtime)
            service = Service(executable_path=WEBKIT_DRIVER, log_output=self._log, env=env)
            with warnings.catch_warnings():
                # Selenium's own WebKitGTK driver still uses its deprecated connection setup
                warnings.filterwarnings("ignore", category=DeprecationWarning, module="selenium")
                self.driver = webdriver.WebKitGTK(options=opts, service=service)
            self.driver.set_script_timeout(60)
            self.driver.set_page_load_timeout(60)
            self.version = self.driver.capabilities.get("browserVersion", "?")
        except BaseException:
            self.close()
            raise

    def new_page(self, width: int, height: int) -> WebKitPage:
        page = WebKitPage(self)
        page.set_viewport(width, height)
        return page

    def web_processes(self) -> list[int]:
        """Pids of the WebKitWebProcess processes under this browser's driver."""
        root = self.driver.service.process.pid
        parents: dict[int, int] = {}
        names: dict[int, str] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
                pid = int(text.split(" ", 1)[0])
                names[pid] = text[text.index("(") + 1 : text.rindex(")")]
                parents[pid] = int(text[text.rindex(")") + 2 :].split()[1])

        def under(pid: int) -> bool:
            while pid > 1:
                if pid == root:
                    return True
                pid = parents.get(pid, 0)
            return False

        # comm is cut to 15 characters
        return [p for p, name in names.items() if name.startswith("WebKitWebProces") and under(p)]

    def crash_evidence(self, wait: float = 0.0) -> str | None:
        """The driver log's WebProcess crash lines, if it has any (waiting up to ``wait`` s)."""
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(OSError):
                self._log.flush()
            lines = self.log_path.read_text(errors="replace").splitlines()
            found = [line.strip() for line in lines if WEBPROCESS_CRASHED in line]
            if found or time.monotonic() >= deadline:
                return "; ".join(found[:3]) if found else None
            time.sleep(0.1)

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, a WebDriver call: its failure is WebKitCrashed if the log says so."""
        from selenium.common.exceptions import WebDriverException

        try:
            return fn(*args)
        except WebDriverException as exc:
            evidence = self.crash_evidence(wait=CRASH_LOG_WAIT_S)
            if evidence is None:
                raise
            raise WebKitCrashed(
                f"{evidence} (driver log {self.log_path}); the call failed with: "
                f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            ) from exc

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.quit()
            self.driver = None
        self.xvfb.stop()
        self._log.close()


class WebKitPage:
    def __init__(self, browser: WebKitBrowser) -> None:
        self.browser = browser
        self.driver = browser.driver

    def goto(self, url: str) -> None:
        self.browser.call(self.driver.get, url)
        self.evaluate(WATCH_JS)

    def close(self) -> None:
        """The one window stays; its page goes (and with it, its audio)."""
        self.browser.call(self.driver.get, "about:blank")

    def evaluate(self, fn: str, arg: Any = None) -> Any:
        # execute_script is not subject to the page's CSP (no eval in the page)
        return self.browser.call(self.driver.execute_script, f"return ({fn})(arguments[0]);", arg)

    def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        self.browser.call(lambda: self.driver.find_element(By.CSS_SELECTOR, selector).click())

    def fill(self, selector: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        def fill() -> None:
            el = self.driver.find_element(By.CSS_SELECTOR, selector)
            el.clear()
            el.send_keys(value)

        self.browser.call(fill)

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the window until the page's viewport is ``width`` x ``height``."""
        w, h = width, height
        for _ in range(4):
            self.browser.call(self.driver.set_window_size, w, h)
            inner = self.evaluate("() => [innerWidth, innerHeight]")
            if inner == [width, height]:
                return
            w += width - inner[0]
            h += height - inner[1]

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        del full_page  # WebDriver screenshots are of the viewport
        self.browser.call(self.driver.save_screenshot, str(path))

    def problems(self) -> list[str]:
        """Uncaught errors and CSP violations seen by listeners added right after load."""
        seen = self.evaluate("() => [globalThis.__obErrors ?? [], globalThis.__obViolations ?? []]")
        return [f"uncaught: {e}" for e in seen[0]] + [f"csp: {v}" for v in seen[1]]
