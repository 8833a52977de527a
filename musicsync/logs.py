"""Structured log lines on stderr: ``key=value`` text or JSON, one record a line.

Extra fields passed as ``log.info("...", extra={"room": "main"})`` become keys
of their own, so the lines can be filtered by machines as well as read.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

HANDLER_NAME = "musicsync"
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record as ordered key/value pairs: ts, level, logger, msg, extras, exc."""
    out: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text)  # quoted, with escapes for quotes and newlines


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=musicsync.hub msg="room main created" room=main``"""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_text_value(v)}" for k, v in record_fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same keys as the text format."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), default=str, ensure_ascii=False)


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": KeyValueFormatter, "json": JsonFormatter}


def configure_logging(
    level: str, fmt: str = "text", *, stream: TextIO | None = None, replace: bool = True
) -> None:
    """Send the root logger's records to stderr in ``fmt`` at ``level``.

    Idempotent: replaces a handler this function installed before. With
    ``replace=False`` it does nothing when the root logger already has handlers
    (someone else, e.g. a test runner or an embedding program, owns logging).
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == HANDLER_NAME]
    if not replace and root.handlers and not ours:
        return
    for h in ours:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(FORMATTERS[fmt]())
    root.addHandler(handler)
    root.setLevel(level.upper())
