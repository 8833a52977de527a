"""Build ``musicsync.pyz``: one file that runs on any Python >= 3.10, and smoke-test it.

    python -m musicsync.zipapp dist/musicsync.pyz          # build
    python -m musicsync.zipapp --smoke dist/musicsync.pyz  # start it, fetch /, open a
                                                           # WebSocket, SIGTERM it

The archive holds the package, the client page (as ``musicsync/static``) and
every runtime dependency, installed by pip for the oldest supported Python so
that nothing newer sneaks in. Dependencies must be pure Python or have a pure
fallback: extension modules cannot load from a zip, so they are left out
(markupsafe falls back to its Python implementation). The demo tracks are not
stored: the server synthesises them into the media directory at first start.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipapp
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import IO, Any

OLDEST_PYTHON = "3.10"
INTERPRETER = "/usr/bin/env python3"
MAIN = "musicsync.cli:main"
# What the dependencies need on 3.10 only. pip evaluates environment markers
# against the interpreter running it, so these are named explicitly (they are
# harmless on newer Pythons); ``check_backports`` fails the build if a
# dependency asks for one that is missing here.
BACKPORTS = ("exceptiongroup", "taskgroup", "tomli", "typing_extensions")
BINARY_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
STATIC_SUFFIXES = (".html", ".svg", ".ico", ".css", ".js", ".png", ".webmanifest")
SOURCE_ROOT = Path(__file__).resolve().parent.parent
_OLD_PYTHON_MARKER = re.compile(r"""python_version\s*<=?\s*["']3\.(?:1[01]|[0-9])["']""")


def runtime_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml (or of the installed package)."""
    pyproject = SOURCE_ROOT / "pyproject.toml"
    if pyproject.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        return [str(r) for r in project["dependencies"]]
    return [r for r in metadata.requires("musicsync") or [] if "extra ==" not in r]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def check_backports(stage: Path) -> None:
    """Fail if a bundled distribution needs, on old Pythons, a package not bundled."""
    present = {_normalize(p.name.split("-")[0]) for p in stage.glob("*.dist-info")}
    missing = set()
    for meta in stage.glob("*.dist-info/METADATA"):
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Requires-Dist:") and _OLD_PYTHON_MARKER.search(line):
                if "python_version < '3.10'" in line or 'python_version < "3.10"' in line:
                    continue  # older than we support
                name = _normalize(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                if name not in present:
                    missing.add(name)
    if missing:
        raise SystemExit(f"add to BACKPORTS (needed on Python {OLDEST_PYTHON}): {sorted(missing)}")


def _copy_package(stage: Path) -> None:
    package = stage / "musicsync"
    for src in Path(__file__).resolve().parent.rglob("*.py"):
        if "__pycache__" in src.parts:
            continue
        dest = package / src.relative_to(Path(__file__).resolve().parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    static = package / "static"
    static.mkdir(exist_ok=True)
    # A regular package, so importlib.resources finds the page inside the zip.
    (static / "__init__.py").write_text('"""The client page."""\n', encoding="utf-8")
    source_static = SOURCE_ROOT / "static"
    if source_static.is_dir():
        files = [p for p in source_static.iterdir() if p.suffix in STATIC_SUFFIXES]
        for f in files:
            shutil.copy2(f, static / f.name)
    else:  # building from an installed package
        for entry in resources.files("musicsync.static").iterdir():
            if entry.name.endswith(STATIC_SUFFIXES):
                (static / entry.name).write_bytes(entry.read_bytes())
    if not (static / "index.html").is_file():
        raise SystemExit("static/index.html not found: cannot build the zipapp without it")


def _strip(stage: Path) -> None:
    for path in sorted(stage.rglob("*"), reverse=True):
        if path.is_dir() and (
            path.name == "__pycache__" or (path.parent == stage and path.name in ("bin", "share"))
        ):
            shutil.rmtree(path)
        elif path.is_file() and (path.suffix in BINARY_SUFFIXES or path.suffix == ".pyc"):
            path.unlink()


def _precompile(stage: Path) -> None:
    """Bytecode for this interpreter beside each source (zipimport reads ``x.pyc``
    next to ``x.py``; other Python versions ignore it and compile the source)."""
    ok = compileall.compile_dir(
        str(stage),
        quiet=2,
        legacy=True,
        ddir="",  # the archive's final path is unknown; keep names relative
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        workers=0,
    )
    if not ok:
        raise SystemExit("some modules did not compile")


def build(out: Path, *, pip_args: tuple[str, ...] = (), precompile: bool = False) -> Path:
    """Build the archive at ``out`` and return its path.

    ``precompile`` adds bytecode for the running Python: it starts about 2x faster
    on that version, the archive is about 2.5x larger, and tracebacks from it
    show relative file names without source lines.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="musicsync-zipapp-") as tmp:
        stage = Path(tmp) / "app"
        requirements = [*runtime_requirements(), *BACKPORTS]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--no-warn-script-location",
            "--root-user-action=ignore",
            "--target",
            str(stage),
            "--python-version",
            OLDEST_PYTHON,
            "--only-binary=:all:",
            *pip_args,
            *requirements,
        ]
        subprocess.run(cmd, check=True)
        check_backports(stage)
        _copy_package(stage)
        _strip(stage)
        if precompile:
            _precompile(stage)
        partial = out.with_name(f".{out.name}.part")
        zipapp.create_archive(stage, partial, interpreter=INTERPRETER, main=MAIN, compressed=True)
        partial.chmod(0o755)
        os.replace(partial, out)
    return out


# -- smoke test -----------------------------------------------------------------


@dataclass
class SmokeResult:
    size_bytes: int
    python: str
    startup_seconds: float
    index_bytes: int
    close_code: int | None
    exit_code: int
    exit_seconds: float
    second_server_exit_code: int  # a second server on the same data directory: refused

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def bare_python(where: Path, base: str | None = None) -> Path:
    """A venv with no packages at all (not even pip), from ``base`` or this Python."""
    subprocess.run([base or sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    return where / "bin" / "python"


def _read_listen_url(stdout: IO[str], deadline: float) -> str:
    marker = "musicsync listening on "
    while time.monotonic() < deadline:
        line = stdout.readline()
        if not line:
            break
        if line.startswith(marker):
            return line[len(marker) :].strip()
    raise RuntimeError("the server did not report where it listens")


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(response.status), bytes(response.read())


async def _ws_welcome_then_close_code(ws_url: str, proc: subprocess.Popen[str]) -> int | None:
    """Open a WebSocket, await ``welcome``, SIGTERM the server: the close code seen."""
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    code: int | None = None
    with trio.fail_after(20):
        async with open_websocket_url(ws_url) as conn:
            welcome = json.loads(await conn.get_message())
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"expected welcome, got {welcome!r}")
            proc.send_signal(signal.SIGTERM)
            try:
                while True:
                    await conn.get_message()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
            stream = conn._stream
        await stream.aclose()
    return code


def smoke(pyz: Path, *, base_python: str | None = None, timeout: float = 60) -> SmokeResult:
    """Run ``pyz serve`` under a Python with no packages: fetch /, demo media and
    /metrics, check that a second one on the same data directory is refused, open a
    WebSocket, SIGTERM it; raise unless all of it worked."""
    import trio

    from .cli import EXIT_DATA_DIR_BUSY

    pyz = pyz.resolve()
    with tempfile.TemporaryDirectory(prefix="musicsync-smoke-") as tmp:
        root = Path(tmp)
        python = bare_python(root / "venv", base_python)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MUSICSYNC_"))}
        env.update(HOME=str(root), XDG_DATA_HOME=str(root / "data"), PYTHONNOUSERSITE="1")
        version = subprocess.run(
            [str(python), "-c", "import sys; print(sys.version.split()[0])"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        started = time.monotonic()
        with (
            (root / "stderr.log").open("w") as errlog,
            subprocess.Popen(
                [str(python), str(pyz), "serve", "--port", "0", "--no-qr"],
                stdout=subprocess.PIPE,
                stderr=errlog,
                text=True,
                env=env,
                cwd=root,
            ) as proc,
        ):
            try:
                assert proc.stdout is not None
                base = _read_listen_url(proc.stdout, started + timeout)
                startup = time.monotonic() - started
                status, index = _get(base + "/")
                if status != 200 or b"<html" not in index.lower() or len(index) < 2000:
                    raise RuntimeError(f"GET / gave {status}, {len(index)} bytes: not the client")
                status, wav = _get(base + "/media/demo-1-arpeggio.wav")
                if status != 200 or not wav.startswith(b"RIFF"):
                    raise RuntimeError("the demo track is missing")
                status, metrics = _get(base + "/metrics")
                if b"musicsync_connections " not in metrics:
                    raise RuntimeError("/metrics lacks musicsync_connections")
                second = subprocess.run(
                    [str(python), str(pyz), "serve", "--port", "0", "--no-qr"],
                    env=env,
                    cwd=root,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                if second.returncode != EXIT_DATA_DIR_BUSY or "in use" not in second.stderr:
                    raise RuntimeError(
                        f"a second server on the data directory was not refused: "
                        f"exit {second.returncode}, {second.stderr!r}"
                    )
                ws_url = base.replace("http://", "ws://", 1) + "/ws/main?name=smoke"
                code = trio.run(_ws_welcome_then_close_code, ws_url, proc)
                t0 = time.monotonic()
                rc = proc.wait(timeout=timeout)
                exit_seconds = time.monotonic() - t0
            except BaseException:
                proc.kill()
                proc.wait()
                sys.stderr.write((root / "stderr.log").read_text())
                raise
        result = SmokeResult(
            pyz.stat().st_size,
            version,
            startup,
            len(index),
            code,
            rc,
            exit_seconds,
            second.returncode,
        )
    if result.close_code != 1001 or result.exit_code != 0:
        raise RuntimeError(f"bad shutdown: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m musicsync.zipapp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="the .pyz to build (or to test with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="smoke-test OUT instead of building")
    parser.add_argument("--python", help="base Python for the smoke test (default: this one)")
    parser.add_argument(
        "--precompile",
        action="store_true",
        help="also store bytecode for this Python (faster start on it, bigger file)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        result = smoke(args.out, base_python=args.python)
        print(json.dumps(result.as_dict()))
        return 0
    started = time.monotonic()
    out = build(args.out, precompile=args.precompile)
    print(f"built {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
