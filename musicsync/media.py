"""Mapping /media/ request paths to files safely, and their content types."""

from __future__ import annotations

from pathlib import Path

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
