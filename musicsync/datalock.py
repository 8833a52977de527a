"""One server per data directory: an advisory ``flock`` on ``musicsync.lock``, held for life.

Two servers on one room database would both restore the rooms and both write
their own seats and timelines over each other's. The first server to start
takes an exclusive ``flock`` on ``<data dir>/musicsync.lock`` and keeps it open
for as long as it runs; a second one fails to get it and refuses to start,
naming the PID written in the file. The kernel drops the lock when the holder's
last descriptor closes, which includes the process dying by SIGKILL or a crash,
so a stale lock file never blocks a restart: only a live holder does. The file
itself is left in place (removing it would race with a starting server).

On a system without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

if sys.platform != "win32":
    import fcntl

LOCK_FILENAME = "musicsync.lock"
PID_BYTES = 32  # more than enough for a PID and a newline


class DataDirBusy(Exception):
    """Another live process holds the data directory's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f"PID {pid}" if pid is not None else "PID unknown"
        super().__init__(
            f"the data directory {data_dir} is in use by another musicsync server ({holder}); "
            "stop it or give this one another --data directory"
        )


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, PID_BYTES, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class DataDirLock:
    """The held lock of one data directory; ``release`` (or process exit) gives it back."""

    def __init__(self, data_dir: Path, fd: int | None) -> None:
        self.data_dir = data_dir
        self._fd = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Take the lock without waiting (blocking I/O); raises DataDirBusy, or OSError
        if the directory or the lock file cannot be created."""
        data_dir = data_dir.absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        if sys.platform == "win32":
            return cls(data_dir, None)
        # Not inheritable (PEP 446): a child process never keeps the lock alive.
        fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirBusy(data_dir, pid) from None
        except OSError:
            os.close(fd)
            raise
        # Only the holder writes: a refused server never touches the file.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return cls(data_dir, fd)

    def release(self) -> None:
        """Give the lock back; idempotent. (A dying process releases it anyway.)"""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale PID for the next reader
        os.close(fd)  # closing the only descriptor drops the flock
