"""Strict decoding of client frames and compact encoding of server frames."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musicsync.protocol import (
    CLIENT_MESSAGES,
    MAX_FRAME_BYTES,
    MAX_ID_LENGTH,
    MAX_TITLE_LENGTH,
    ClaimHost,
    Pause,
    Ping,
    Play,
    ProtocolError,
    Seek,
    SetTrack,
    TransferHost,
    Volume,
    decode_client,
    encode,
    error_frame,
)


def frame(**obj: Any) -> str:
    return json.dumps(obj)


def rejects(raw: str | bytes, code: str = "bad_message") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client(raw)
    assert info.value.code == code, info.value.message
    assert info.value.message
    return info.value


# -- every message type decodes ----------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '{"type":"set_track","url":"/media/a.mp3","title":"A","duration":12.5,"autoplay":true}',
            SetTrack(url="/media/a.mp3", title="A", duration=12.5, autoplay=True),
        ),
        (
            '{"type":"set_track","url":"/media/a.mp3"}',
            SetTrack(url="/media/a.mp3", title=None, duration=None, autoplay=False),
        ),
        (
            '{"type":"set_track","url":"x","title":null,"duration":null}',
            SetTrack(url="x", title=None, duration=None, autoplay=False),
        ),
        ('{"type":"set_track","url":"x","duration":3}', SetTrack(url="x", duration=3.0)),
        ('{"type":"play"}', Play(position=None)),
        ('{"type":"play","position":null}', Play(position=None)),
        ('{"type":"play","position":4.25}', Play(position=4.25)),
        ('{"type":"play","position":0}', Play(position=0.0)),
        ('{"type":"pause"}', Pause()),
        ('{"type":"seek","position":61}', Seek(position=61.0)),
        ('{"type":"volume","volume":0}', Volume(volume=0.0)),
        ('{"type":"volume","volume":1}', Volume(volume=1.0)),
        ('{"type":"volume","volume":0.75}', Volume(volume=0.75)),
        ('{"type":"claim_host"}', ClaimHost()),
        ('{"type":"transfer_host","to":"abc_DEF-12"}', TransferHost(to="abc_DEF-12")),
        ('{"type":"ping","t0":-12345.5}', Ping(t0=-12345.5, rtt=None)),
        ('{"type":"ping","t0":1,"rtt":35.5}', Ping(t0=1.0, rtt=35.5)),
        ('{"type":"ping","t0":1,"rtt":null}', Ping(t0=1.0, rtt=None)),
        (' \n{ "type" : "pause" }\t', Pause()),
    ],
)
def test_every_client_message_decodes(raw: str, expected: object) -> None:
    msg = decode_client(raw)
    assert msg == expected
    assert type(msg) is type(expected)


def test_decoded_numbers_are_floats() -> None:
    msg = decode_client('{"type":"seek","position":7}')
    assert isinstance(msg, Seek)
    assert type(msg.position) is float


def test_the_type_table_covers_the_core_vocabulary() -> None:
    assert set(CLIENT_MESSAGES) >= {
        "set_track",
        "play",
        "pause",
        "seek",
        "volume",
        "claim_host",
        "transfer_host",
        "ping",
    }
    assert CLIENT_MESSAGES["ping"].CONTROL is False


def test_every_client_message_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    missing = [name for name in CLIENT_MESSAGES if f"`{name}`" not in doc]
    assert missing == []


def test_protocol_error_is_a_value_error() -> None:
    err = rejects("nope")
    assert isinstance(err, ValueError)


# -- refused frames -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "{",
        "not json",
        "{'type': 'pause'}",
        '{"type":"pause"} trailing',
        '{"type":"pause"}{"type":"pause"}',
        '{"type":"pause",}',
    ],
)
def test_invalid_json_is_refused(raw: str) -> None:
    rejects(raw)


@pytest.mark.parametrize("raw", ["[]", '["pause"]', '"pause"', "1", "null", "true", "1.5"])
def test_non_object_is_refused(raw: str) -> None:
    rejects(raw)


@pytest.mark.parametrize(
    "raw",
    ["{}", '{"type":null}', '{"type":1}', '{"type":["pause"]}', '{"type":{"x":1}}', '{"Type":"x"}'],
)
def test_missing_or_non_string_type_is_refused(raw: str) -> None:
    rejects(raw)


@pytest.mark.parametrize(
    "kind", ["join", "PAUSE", "Pause", "pause ", "", "welcome", "state", "pong", "x" * 1000]
)
def test_unknown_type_is_refused(kind: str) -> None:
    err = rejects(frame(type=kind))
    assert len(err.message) < 100  # the echoed name is truncated


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"type":"set_track"}', "url"),
        ('{"type":"set_track","title":"x"}', "url"),
        ('{"type":"seek"}', "position"),
        ('{"type":"volume"}', "volume"),
        ('{"type":"transfer_host"}', "to"),
        ('{"type":"ping"}', "t0"),
        ('{"type":"ping","rtt":3}', "t0"),
    ],
)
def test_missing_field_is_refused(raw: str, field: str) -> None:
    err = rejects(raw)
    assert field in err.message


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "set_track", "url": 5},
        {"type": "set_track", "url": None},
        {"type": "set_track", "url": ["/media/a.mp3"]},
        {"type": "set_track", "url": "x", "title": 5},
        {"type": "set_track", "url": "x", "duration": "3"},
        {"type": "set_track", "url": "x", "autoplay": 1},
        {"type": "set_track", "url": "x", "autoplay": "true"},
        {"type": "set_track", "url": "x", "autoplay": None},
        {"type": "play", "position": "1"},
        {"type": "play", "position": [1]},
        {"type": "seek", "position": None},
        {"type": "seek", "position": {"s": 1}},
        {"type": "volume", "volume": "0.5"},
        {"type": "transfer_host", "to": 5},
        {"type": "transfer_host", "to": None},
        {"type": "ping", "t0": None},
        {"type": "ping", "t0": "1"},
        {"type": "ping", "t0": 1, "rtt": "2"},
    ],
)
def test_wrong_field_type_is_refused(obj: dict[str, Any]) -> None:
    rejects(json.dumps(obj))


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "play", "position": True},
        {"type": "seek", "position": False},
        {"type": "volume", "volume": True},
        {"type": "volume", "volume": False},
        {"type": "set_track", "url": "x", "duration": True},
        {"type": "ping", "t0": True},
        {"type": "ping", "t0": 1, "rtt": False},
    ],
)
def test_bool_is_not_a_number(obj: dict[str, Any]) -> None:
    rejects(json.dumps(obj))


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"seek","position":-1}',
        '{"type":"seek","position":-0.001}',
        '{"type":"play","position":-5}',
        '{"type":"volume","volume":1.0001}',
        '{"type":"volume","volume":-0.1}',
        '{"type":"volume","volume":2}',
        '{"type":"set_track","url":"x","duration":-1}',
        '{"type":"ping","t0":1,"rtt":-1}',
    ],
)
def test_out_of_range_numbers_are_refused(raw: str) -> None:
    rejects(raw)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"])
@pytest.mark.parametrize(
    "template",
    [
        '{{"type":"seek","position":{}}}',
        '{{"type":"play","position":{}}}',
        '{{"type":"volume","volume":{}}}',
        '{{"type":"ping","t0":{}}}',
        '{{"type":"ping","t0":1,"rtt":{}}}',
        '{{"type":"set_track","url":"x","duration":{}}}',
    ],
)
def test_non_finite_numbers_are_refused(template: str, value: str) -> None:
    rejects(template.format(value))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constants_are_refused_even_in_unknown_places(value: str) -> None:
    rejects(f'{{"type":"pause","junk":{value}}}')
    rejects(f"[{value}]")


def test_large_but_finite_numbers_are_accepted() -> None:
    msg = decode_client('{"type":"seek","position":1' + "0" * 300 + "}")
    assert isinstance(msg, Seek)
    assert msg.position == 1e300


def test_integers_beyond_the_digit_limit_are_refused() -> None:
    rejects('{"type":"seek","position":1' + "0" * 5000 + "}")


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"seek","position":1' + "0" * 400 + "}",
        '{"type":"ping","t0":-1' + "0" * 400 + "}",
        '{"type":"volume","volume":1' + "0" * 400 + "}",
    ],
    ids=["seek", "ping", "volume"],
)
def test_huge_integers_are_refused(raw: str) -> None:
    rejects(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 8000 + "]" * 8000,
        '{"type":"pause","x":' + "[" * 5000 + "]" * 5000 + "}",
        '{"type":"play","position":' + "[" * 5000 + "]" * 5000 + "}",
        '{"a":' * 2000 + "1" + "}" * 2000,
    ],
    ids=["arrays", "in-unknown-field", "in-known-field", "objects"],
)
def test_deeply_nested_json_is_refused_cleanly(raw: str) -> None:
    assert len(raw.encode()) <= MAX_FRAME_BYTES
    rejects(raw)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"type":"pause","id":"forged"}', "id"),
        ('{"type":"play","from":"someone-else"}', "from"),
        ('{"type":"seek","position":1,"role":"host"}', "role"),
        ('{"type":"claim_host","force":true}', "force"),
        ('{"type":"ping","t0":1,"t1":2}', "t1"),
        ('{"type":"set_track","url":"x","TITLE":"y"}', "TITLE"),
    ],
)
def test_unknown_extra_field_is_refused(raw: str, field: str) -> None:
    err = rejects(raw)
    assert repr(field) in err.message


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "set_track", "url": "x", "title": "t" * (MAX_TITLE_LENGTH + 1)},
        {"type": "set_track", "url": "/media/" + "a" * 4096 + ".mp3"},
        {"type": "transfer_host", "to": "i" * (MAX_ID_LENGTH + 1)},
    ],
)
def test_over_long_strings_are_refused(obj: dict[str, Any]) -> None:
    rejects(json.dumps(obj))


def test_strings_at_their_limits_are_accepted() -> None:
    msg = decode_client(json.dumps({"type": "transfer_host", "to": "i" * MAX_ID_LENGTH}))
    assert msg == TransferHost(to="i" * MAX_ID_LENGTH)
    msg = decode_client(json.dumps({"type": "set_track", "url": "u", "title": "t" * 200}))
    assert isinstance(msg, SetTrack)
    assert msg.title == "t" * MAX_TITLE_LENGTH


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"transfer_host","to":"\\ud800"}',
        '{"type":"set_track","url":"/media/a.mp3","title":"x\\udfffy"}',
        '{"type":"transfer_host","to":"\ud800"}',
    ],
    ids=["escaped-high", "escaped-low", "raw-str"],
)
def test_lone_surrogates_are_refused(raw: str) -> None:
    rejects(raw)


def test_escaped_surrogate_pairs_are_fine() -> None:
    msg = decode_client('{"type":"set_track","url":"x","title":"\\ud83c\\udfb5"}')
    assert isinstance(msg, SetTrack)
    assert msg.title == "\U0001f3b5"


@pytest.mark.parametrize("raw", [b'{"type":"pause"}', b"", b"\xff\xfe"])
def test_binary_frames_are_refused(raw: bytes) -> None:
    rejects(raw, "binary_not_supported")


def _padded(size_bytes: int) -> str:
    base = '{"type":"pause"}'
    return base + " " * (size_bytes - len(base))


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    raw = _padded(MAX_FRAME_BYTES)
    assert len(raw.encode()) == MAX_FRAME_BYTES == 16 * 1024
    assert decode_client(raw) == Pause()


@pytest.mark.parametrize("size", [MAX_FRAME_BYTES + 1, 2 * MAX_FRAME_BYTES, 1_000_000])
def test_frames_over_16_kib_are_too_large(size: int) -> None:
    rejects(_padded(size), "too_large")


def test_frame_size_is_counted_in_utf8_bytes() -> None:
    # 9000 characters, but 18000 bytes on the wire.
    raw = json.dumps({"type": "set_track", "url": "x", "title": "é" * 9000}, ensure_ascii=False)
    assert len(raw) < MAX_FRAME_BYTES < len(raw.encode())
    rejects(raw, "too_large")


def test_size_check_comes_before_parsing() -> None:
    rejects("[" * (MAX_FRAME_BYTES + 1), "too_large")


# -- fuzzing ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["url", "title", "duration", "autoplay", "position", "volume", "to", "t0", "rtt", "id"]
)


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([*CLIENT_MESSAGES, "bogus"]),
    body=st.dictionaries(field_names, json_values, max_size=5),
)
def test_decode_only_ever_raises_protocol_error(kind: str, body: dict[str, Any]) -> None:
    raw = json.dumps({"type": kind, **body})
    try:
        msg = decode_client(raw)
    except ProtocolError as exc:
        assert exc.code in ("bad_message", "too_large")
        return
    assert kind == msg.TYPE
    for name, value in body.items():
        decoded = getattr(msg, name)
        if isinstance(value, bool) or value is None:
            assert decoded is value
        elif isinstance(value, (int, float)):
            assert isinstance(decoded, float)
            assert math.isfinite(decoded)
            assert decoded == float(value)
        else:
            assert decoded == value


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_decode_of_arbitrary_text_only_raises_protocol_error(raw: str) -> None:
    try:
        decode_client(raw)
    except ProtocolError as exc:
        assert exc.code == "bad_message"


# -- encoding -------------------------------------------------------------------


def test_encode_is_compact_json_with_type() -> None:
    text = encode("state", room={"paused": True, "position": 1.5, "track": None})
    assert " " not in text
    assert "\n" not in text
    assert json.loads(text) == {
        "type": "state",
        "room": {"paused": True, "position": 1.5, "track": None},
    }
    assert text == '{"room":{"paused":true,"position":1.5,"track":null},"type":"state"}'


def test_encode_without_payload() -> None:
    assert encode("ready") == '{"type":"ready"}'


def test_encode_refuses_non_finite_numbers() -> None:
    with pytest.raises(ValueError):
        encode("pong", t0=math.nan, t1=1.0, t2=2.0)
    with pytest.raises(ValueError):
        encode("pong", t0=math.inf, t1=1.0, t2=2.0)


def test_encode_escapes_non_ascii_safely() -> None:
    text = encode("presence", joined=[{"id": "a", "name": "Zoë \u2028 🎵"}])
    assert text.isascii()
    assert json.loads(text)["joined"][0]["name"] == "Zoë \u2028 🎵"


def test_error_frame() -> None:
    text = error_frame("not_host", "only the host may send play")
    assert json.loads(text) == {
        "type": "error",
        "code": "not_host",
        "message": "only the host may send play",
    }
    assert ", " not in text
    assert ": " not in text
