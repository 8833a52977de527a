"""Validation of track URLs and room names; cleaning of display names and titles (sans-IO)."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote, urlsplit

MAX_URL_LENGTH = 2048
MAX_DISPLAY_NAME = 40
MAX_TITLE_CHARS = 200  # the protocol's own cap on a title (protocol.MAX_TITLE_LENGTH)
AUDIO_EXTENSIONS = (".mp3", ".ogg", ".oga", ".opus", ".wav", ".m4a", ".flac", ".webm")
MEDIA_PREFIX = "/media/"
ROOM_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_DISPLAY_NAME = "guest"


class BadURL(ValueError):
    """A track URL the server refuses; the message says why."""


def is_valid_room_name(name: str) -> bool:
    return ROOM_NAME_RE.fullmatch(name) is not None


def validate_track_url(url: str) -> str:
    """Return ``url`` unchanged if it is an acceptable track URL, else raise BadURL."""
    if not url:
        raise BadURL("empty URL")
    if len(url) > MAX_URL_LENGTH:
        raise BadURL(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in url):
        raise BadURL(
            "URL contains whitespace or control characters (invisible formatting included)"
        )
    if url.startswith("/"):
        return _validate_media_path(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BadURL(f"unparseable URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise BadURL("only http(s) URLs and /media/ paths are allowed")
    if not parts.hostname:
        raise BadURL("URL has no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadURL("URLs with credentials are not allowed")
    _check_extension(parts.path)
    return url


def _validate_media_path(url: str) -> str:
    if url.startswith("//"):
        raise BadURL("protocol-relative URLs are not allowed")
    parts = urlsplit(url)
    if not parts.path.startswith(MEDIA_PREFIX):
        raise BadURL("same-origin tracks must live under /media/")
    decoded = unquote(parts.path)
    segments = decoded.split("/")
    if any(seg in ("..", ".") for seg in segments) or "\\" in decoded or "\x00" in decoded:
        raise BadURL("path traversal is not allowed")
    _check_extension(parts.path)
    return url


def _check_extension(path: str) -> None:
    if not unquote(path).lower().endswith(AUDIO_EXTENSIONS):
        allowed = " ".join(AUDIO_EXTENSIONS)
        raise BadURL(f"track must end in one of: {allowed}")


def printable_line(raw: str, limit: int) -> str:
    """NFC, no control, format (bidi, zero-width), surrogate or unassigned characters,
    whitespace runs (line breaks included) folded to one space, trimmed, at most ``limit``."""
    cleaned = "".join(
        ch for ch in unicodedata.normalize("NFC", raw) if unicodedata.category(ch)[0] != "C"
    )
    return " ".join(cleaned.split())[:limit].strip()


def sanitize_display_name(raw: str | None) -> str:
    """Printable, single-line, trimmed, at most MAX_DISPLAY_NAME characters."""
    if not raw:
        return DEFAULT_DISPLAY_NAME
    return printable_line(raw, MAX_DISPLAY_NAME) or DEFAULT_DISPLAY_NAME


def clean_title(raw: str | None) -> str | None:
    """A track title cleaned as display names are; None if nothing printable is left."""
    if not raw:
        return None
    return printable_line(raw, MAX_TITLE_CHARS) or None
