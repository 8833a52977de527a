"""Structured log lines: key=value text and JSON, extras as their own keys."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from musicsync.logs import HANDLER_NAME, configure_logging


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def emit(fmt: str, level: str = "info") -> str:
    out = io.StringIO()
    configure_logging(level, fmt, stream=out)
    log = logging.getLogger("musicsync.test")
    log.debug("hidden unless debug")
    log.info("room %s created", "main", extra={"room": "main", "clients": 3})
    log.warning('odd "quoted" value', extra={"path": "/a b/c"})
    return out.getvalue()


def test_text_lines_are_key_value(root_logging: None) -> None:
    lines = emit("text").splitlines()
    assert len(lines) == 2
    first = lines[0]
    assert first.startswith("ts=") and first.split()[0].endswith("Z")
    assert " level=info logger=musicsync.test " in first
    assert 'msg="room main created" room=main clients=3' in first
    assert 'msg="odd \\"quoted\\" value" path="/a b/c"' in lines[1]


def test_json_lines_parse_and_carry_extras(root_logging: None) -> None:
    lines = [json.loads(line) for line in emit("json").splitlines()]
    assert [r["level"] for r in lines] == ["info", "warning"]
    assert lines[0]["msg"] == "room main created"
    assert lines[0]["room"] == "main" and lines[0]["clients"] == 3
    assert lines[0]["logger"] == "musicsync.test"
    assert set(lines[0]) == {"ts", "level", "logger", "msg", "room", "clients"}


def test_level_controls_output_and_configuring_twice_keeps_one_handler(
    root_logging: None,
) -> None:
    assert "hidden unless debug" in emit("text", "debug")
    assert "hidden unless debug" not in emit("text", "info")
    assert emit("json", "error") == ""
    ours = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1


def test_exceptions_are_one_record(root_logging: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("musicsync.test").exception("failed")
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "ValueError: boom" in record["exc"]


def test_replace_false_leaves_someone_elses_logging_alone(root_logging: None) -> None:
    root = logging.getLogger()
    foreign = logging.StreamHandler(io.StringIO())
    root.addHandler(foreign)
    try:
        configure_logging("info", "json", replace=False)
        assert not [h for h in root.handlers if h.get_name() == HANDLER_NAME]
    finally:
        root.removeHandler(foreign)
