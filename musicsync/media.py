"""Mapping /media/ request paths to files safely, their content types, and byte ranges (sans-IO)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Digits beyond this many are a number larger than any file: compared, never parsed.
MAX_RANGE_DIGITS = 18
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_BYTES_UNIT = re.compile(r"bytes", re.I)

AUDIO_CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".wav": "audio/wav",
    ".m4a": "audio/mp4",
    ".flac": "audio/flac",
    ".webm": "audio/webm",
}


def content_type_for(path: Path) -> str:
    return AUDIO_CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def resolve_media_path(root: Path, subpath: str) -> Path | None:
    """The file under ``root`` that ``subpath`` names, or None.

    None for anything that is not a regular file inside the root after every
    symlink is resolved: ``..`` segments, absolute paths, NUL bytes, backslashes,
    hidden files, and links pointing out of the directory all come back None.
    """
    if not subpath or "\x00" in subpath or "\\" in subpath or subpath.startswith("/"):
        return None
    parts = subpath.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    base = root.resolve()
    try:
        candidate = (base / subpath).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


@dataclass(frozen=True)
class ByteRange:
    """The bytes ``first`` to ``last`` (inclusive) of a file of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


class RangeNotSatisfiable(ValueError):
    """A valid byte range that names no byte of the file: 416, ``Content-Range: bytes */size``."""

    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the range is within the file's {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def _number(digits: str) -> int:
    # Past MAX_RANGE_DIGITS digits the value only needs to be "beyond any file"
    # (and int() of thousands of digits is slow, past 4300 an error).
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= MAX_RANGE_DIGITS else 10**MAX_RANGE_DIGITS


def byte_range(header: str | None, size: int) -> ByteRange | None:
    """The part of a ``size``-byte file a ``Range`` header asks for (RFC 9110, 14.1-14.2).

    None means "send the whole file" (200): no header, another unit, a header
    that does not parse, a range whose end is before its start, or several
    ranges (a server may ignore any Range header; multipart answers are not
    worth their cost here). The end is capped at the file's last byte, and a
    suffix longer than the file means the whole file. A valid range that
    starts past the end, a zero-length suffix, or any range of an empty file
    raises RangeNotSatisfiable (416).
    """
    if header is None:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or not _BYTES_UNIT.fullmatch(unit.strip()):
        return None
    if "," in spec:
        return None
    match = _RANGE_SPEC.fullmatch(spec.strip())
    if match is None or match.group(0) == "-":
        return None
    first_text, last_text = match.groups()
    if not first_text:  # bytes=-N: the last N bytes
        suffix = _number(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = _number(first_text)
    last = _number(last_text) if last_text else None
    if last is not None and last < first:
        return None  # invalid: ignored
    if first >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(first, size - 1 if last is None else min(last, size - 1), size)
