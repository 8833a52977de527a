"""dist/musicsync.pyz: built once per session, run by a Python with no packages at all."""

from __future__ import annotations

import glob
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from musicsync.cli import EXIT_DATA_DIR_BUSY
from musicsync.zipapp import INTERPRETER, build, smoke


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("zipapp") / "musicsync.pyz"
    yield build(out)


def python310() -> str | None:
    """A working Python 3.10, if this machine has one (pyenv shims may not run)."""
    candidates = [shutil.which("python3.10"), *glob.glob("/root/.pyenv/versions/3.10*/bin/python3")]
    candidates += glob.glob(str(Path.home() / ".pyenv/versions/3.10*/bin/python3"))
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return candidate
    return None


def test_archive_layout(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as z:
        names = set(z.namelist())
        main = z.read("__main__.py").decode()
    assert pyz.read_bytes().startswith(f"#!{INTERPRETER}\n".encode())
    assert "musicsync.cli" in main
    assert {
        "musicsync/cli.py",
        "musicsync/static/index.html",
        "musicsync/static/__init__.py",
    } <= names
    for dep in ("trio/__init__.py", "hypercorn/__init__.py", "quart_trio/__init__.py"):
        assert dep in names
    for dep in ("segno/__init__.py", "prometheus_client/__init__.py"):
        assert dep in names
    # what Python 3.10 needs: backports that 3.11 does not install
    for dep in ("tomli/__init__.py", "exceptiongroup/__init__.py", "taskgroup/__init__.py"):
        assert dep in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]
    assert any(n.endswith(".dist-info/METADATA") for n in names)
    assert pyz.stat().st_size < 10_000_000


def test_runs_on_a_bare_python(pyz: Path) -> None:
    """Start it, fetch / and a demo track, open a WebSocket, SIGTERM: 1001 and exit 0."""
    result = smoke(pyz)
    assert result.close_code == 1001
    assert result.exit_code == 0
    assert result.second_server_exit_code == EXIT_DATA_DIR_BUSY  # same data directory
    assert result.index_bytes > 10_000  # the real client, not the fallback page
    assert result.exit_seconds < 3.0
    assert result.startup_seconds < 20


def test_runs_on_python_310(pyz: Path) -> None:
    base = python310()
    if base is None:
        pytest.skip("no Python 3.10 on this machine")
    result = smoke(pyz, base_python=base)
    assert result.python.startswith("3.10.")
    assert (result.close_code, result.exit_code) == (1001, 0)


def test_precompiled_archive_starts_on_this_python_and_others(tmp_path: Path) -> None:
    pyz = build(tmp_path / "musicsync.pyz", precompile=True)
    with zipfile.ZipFile(pyz) as z:
        names = set(z.namelist())
    assert {"musicsync/cli.pyc", "musicsync/cli.py", "trio/__init__.pyc"} <= names
    assert not [n for n in names if "__pycache__" in n]
    result = smoke(pyz)
    assert (result.close_code, result.exit_code) == (1001, 0)
    base = python310()
    if base is not None:  # bytecode of another version is ignored, the source used
        result = smoke(pyz, base_python=base)
        assert (result.close_code, result.exit_code) == (1001, 0)
