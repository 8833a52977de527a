"""The wire vocabulary: one frozen class per message, strict decoding, encoding (sans-IO).

Decoding never raises anything but ``ProtocolError`` (code ``bad_message``); the
caller answers with an ``error`` frame and keeps the connection open.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal

MAX_FRAME_BYTES = 16 * 1024
MAX_TITLE_LENGTH = 200
MAX_ID_LENGTH = 64

Role = Literal["host", "listener"]


class ProtocolError(ValueError):
    """A frame the server could not accept; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- field kinds --------------------------------------------------------------


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("bad_message", f"field {name!r} must be a number")
    try:
        result = float(value)
    except OverflowError:
        raise ProtocolError("bad_message", f"field {name!r} is out of range") from None
    if not math.isfinite(result):
        raise ProtocolError("bad_message", f"field {name!r} must be finite")
    return result


def _nonneg(value: Any, name: str) -> float:
    result = _number(value, name)
    if result < 0:
        raise ProtocolError("bad_message", f"field {name!r} must be >= 0")
    return result


def _unit(value: Any, name: str) -> float:
    result = _number(value, name)
    if not 0.0 <= result <= 1.0:
        raise ProtocolError("bad_message", f"field {name!r} must be between 0 and 1")
    return result


def _string(limit: int) -> Any:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise ProtocolError("bad_message", f"field {name!r} must be a string")
        if len(value) > limit:
            raise ProtocolError("bad_message", f"field {name!r} is longer than {limit}")
        if _has_surrogate(value):
            raise ProtocolError("bad_message", f"field {name!r} is not valid Unicode")
        return value

    return check


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("bad_message", f"field {name!r} must be true or false")
    return value


def _optional(inner: Any) -> Any:
    def check(value: Any, name: str) -> Any:
        return None if value is None else inner(value, name)

    return check


def _f(kind: Any, default: Any = ...) -> Any:
    """A dataclass field with a validator; ``default`` ... means required."""
    if default is ...:
        return field(metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


# -- client -> server ---------------------------------------------------------


@dataclass(frozen=True)
class SetTrack:
    TYPE: ClassVar[str] = "set_track"
    CONTROL: ClassVar[bool] = True
    url: str = _f(_string(4096))
    title: str | None = _f(_optional(_string(MAX_TITLE_LENGTH)), None)
    duration: float | None = _f(_optional(_nonneg), None)
    autoplay: bool = _f(_boolean, False)


@dataclass(frozen=True)
class Play:
    TYPE: ClassVar[str] = "play"
    CONTROL: ClassVar[bool] = True
    position: float | None = _f(_optional(_nonneg), None)


@dataclass(frozen=True)
class Pause:
    TYPE: ClassVar[str] = "pause"
    CONTROL: ClassVar[bool] = True


@dataclass(frozen=True)
class Seek:
    TYPE: ClassVar[str] = "seek"
    CONTROL: ClassVar[bool] = True
    position: float = _f(_nonneg)


@dataclass(frozen=True)
class Volume:
    TYPE: ClassVar[str] = "volume"
    CONTROL: ClassVar[bool] = True
    volume: float = _f(_unit)


@dataclass(frozen=True)
class ClaimHost:
    TYPE: ClassVar[str] = "claim_host"
    CONTROL: ClassVar[bool] = True


@dataclass(frozen=True)
class TransferHost:
    TYPE: ClassVar[str] = "transfer_host"
    CONTROL: ClassVar[bool] = True
    to: str = _f(_string(MAX_ID_LENGTH))


@dataclass(frozen=True)
class Kick:
    TYPE: ClassVar[str] = "kick"
    CONTROL: ClassVar[bool] = True
    id: str = _f(_string(MAX_ID_LENGTH))


@dataclass(frozen=True)
class RoomSettingsUpdate:
    TYPE: ClassVar[str] = "room_settings"
    CONTROL: ClassVar[bool] = True
    listeners_may_upload: bool | None = _f(_optional(_boolean), None)


def _choice(*options: str) -> Any:
    def check(value: Any, name: str) -> str:
        if value not in options:
            raise ProtocolError("bad_message", f"field {name!r} must be one of {list(options)}")
        return str(value)

    return check


def _index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1_000_000:
        raise ProtocolError("bad_message", f"field {name!r} must be a whole number >= 0")
    return value


@dataclass(frozen=True)
class QueueAdd:
    """Add a track by URL or by library id; ``next`` puts it at the front."""

    TYPE: ClassVar[str] = "queue_add"
    CONTROL: ClassVar[bool] = True
    url: str | None = _f(_optional(_string(4096)), None)
    track_id: str | None = _f(_optional(_string(MAX_ID_LENGTH)), None)
    title: str | None = _f(_optional(_string(MAX_TITLE_LENGTH)), None)
    duration: float | None = _f(_optional(_nonneg), None)
    next: bool = _f(_boolean, False)


@dataclass(frozen=True)
class QueueRemove:
    TYPE: ClassVar[str] = "queue_remove"
    CONTROL: ClassVar[bool] = True
    item: str = _f(_string(MAX_ID_LENGTH))


@dataclass(frozen=True)
class QueueMove:
    TYPE: ClassVar[str] = "queue_move"
    CONTROL: ClassVar[bool] = True
    item: str = _f(_string(MAX_ID_LENGTH))
    index: int = _f(_index)


@dataclass(frozen=True)
class QueueNext:
    TYPE: ClassVar[str] = "queue_next"
    CONTROL: ClassVar[bool] = True


@dataclass(frozen=True)
class QueueMode:
    TYPE: ClassVar[str] = "queue_mode"
    CONTROL: ClassVar[bool] = True
    repeat: str | None = _f(_optional(_choice("off", "one", "all")), None)
    shuffle: bool | None = _f(_optional(_boolean), None)


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    CONTROL: ClassVar[bool] = False
    t0: float = _f(_number)
    rtt: float | None = _f(_optional(_nonneg), None)


def _engine(value: Any, name: str) -> str:
    if value not in ("webaudio", "element"):
        raise ProtocolError("bad_message", f"field {name!r} must be 'webaudio' or 'element'")
    return str(value)


MAX_PASSWORD_LENGTH = 256
MIN_INVITE_SECONDS = 60.0
MAX_INVITE_SECONDS = 30 * 24 * 3600.0


def _expiry(value: Any, name: str) -> float:
    result = _number(value, name)
    if not MIN_INVITE_SECONDS <= result <= MAX_INVITE_SECONDS:
        raise ProtocolError(
            "bad_message",
            f"field {name!r} must be {MIN_INVITE_SECONDS:.0f}-{MAX_INVITE_SECONDS:.0f} seconds",
        )
    return result


@dataclass(frozen=True)
class SetPassword:
    """Protect the room (a string) or open it again (null)."""

    TYPE: ClassVar[str] = "set_password"
    CONTROL: ClassVar[bool] = True
    password: str | None = _f(_optional(_string(MAX_PASSWORD_LENGTH)))


@dataclass(frozen=True)
class CreateInvite:
    TYPE: ClassVar[str] = "create_invite"
    CONTROL: ClassVar[bool] = True
    role: str = _f(_choice("listener", "cohost"))
    expires_in: float = _f(_expiry, 24 * 3600.0)


@dataclass(frozen=True)
class RevokeInvite:
    TYPE: ClassVar[str] = "revoke_invite"
    CONTROL: ClassVar[bool] = True
    code: str = _f(_string(MAX_ID_LENGTH))


# A device's latency offset (ms; positive plays earlier), set on the device or
# by the host with set_latency_offset: -300 ms to +1 s (Bluetooth reaches 800 ms).
LATENCY_OFFSET_MIN_MS = -300.0
LATENCY_OFFSET_MAX_MS = 1000.0
# What a report may claim: the output's latency and the clock's rate error.
MAX_OUTPUT_LATENCY_MS = 10_000.0
MAX_DRIFT_PPM = 10_000.0
MAX_BROWSER_LENGTH = 24
_BROWSER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ._-")


def _within(low: float, high: float) -> Any:
    def check(value: Any, name: str) -> float:
        result = _number(value, name)
        if not low <= result <= high:
            raise ProtocolError("bad_message", f"field {name!r} must be {low:g} to {high:g}")
        return result

    return check


_latency_offset = _within(LATENCY_OFFSET_MIN_MS, LATENCY_OFFSET_MAX_MS)


def _browser(value: Any, name: str) -> str:
    """A short browser family name ("Chrome", "Firefox", "Safari"): shown, never trusted."""
    text = _string(MAX_BROWSER_LENGTH)(value, name)
    if not text or not set(text) <= _BROWSER_CHARS:
        raise ProtocolError(
            "bad_message", f"field {name!r} must be letters, digits, spaces or ._- only"
        )
    return str(text)


@dataclass(frozen=True)
class Report:
    """A client's sync figures every 2 s: /metrics histograms and the host's dashboard.

    Anyone may send it (no role needed); it shares the control rate limiter.
    ``drift_ms`` is null while the device is not playing.
    """

    TYPE: ClassVar[str] = "report"
    CONTROL: ClassVar[bool] = True
    drift_ms: float | None = _f(_optional(_number))
    rtt_ms: float = _f(_nonneg)
    offset_ms: float | None = _f(_optional(_number), None)
    engine: str | None = _f(_optional(_engine), None)
    output_latency_ms: float | None = _f(_optional(_within(0.0, MAX_OUTPUT_LATENCY_MS)), None)
    latency_offset_ms: float | None = _f(_optional(_latency_offset), None)
    drift_ppm: float | None = _f(_optional(_within(-MAX_DRIFT_PPM, MAX_DRIFT_PPM)), None)
    browser: str | None = _f(_optional(_browser), None)


@dataclass(frozen=True)
class SetLatencyOffset:
    """Host or co-host: set device ``id``'s latency offset (it gets ``latency_offset``)."""

    TYPE: ClassVar[str] = "set_latency_offset"
    CONTROL: ClassVar[bool] = True
    id: str = _f(_string(MAX_ID_LENGTH))
    offset_ms: float = _f(_latency_offset)


@dataclass(frozen=True)
class Resync:
    """Host or co-host: device ``id`` redoes its clock burst and reschedules (gets ``resync``)."""

    TYPE: ClassVar[str] = "resync"
    CONTROL: ClassVar[bool] = True
    id: str = _f(_string(MAX_ID_LENGTH))


# Calibration by microphone (musicsync/calibration.py schedules it): how many
# devices one calibration measures, how many rounds it repeats, and what a
# measuring device may say about each device.
MAX_CALIBRATION_DEVICES = 16
MIN_CALIBRATION_ROUNDS = 3
MAX_CALIBRATION_ROUNDS = 5
DEFAULT_CALIBRATION_ROUNDS = 3
MAX_CALIBRATION_DELAY_MS = 5000.0
MAX_CALIBRATION_REASON = 160


def _rounds(value: Any, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_CALIBRATION_ROUNDS <= value <= MAX_CALIBRATION_ROUNDS
    ):
        raise ProtocolError(
            "bad_message",
            f"field {name!r} must be a whole number "
            f"{MIN_CALIBRATION_ROUNDS}-{MAX_CALIBRATION_ROUNDS}",
        )
    return value


def _id_list(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CALIBRATION_DEVICES:
        raise ProtocolError(
            "bad_message", f"field {name!r} must list 1-{MAX_CALIBRATION_DEVICES} ids"
        )
    ids = tuple(_string(MAX_ID_LENGTH)(v, name) for v in value)
    if len(set(ids)) != len(ids):
        raise ProtocolError("bad_message", f"field {name!r} names a device twice")
    return ids


@dataclass(frozen=True)
class Calibrate:
    """Host or co-host: measure the devices through device ``mic``'s microphone.

    ``devices`` defaults to everyone but ``mic`` (at most MAX_CALIBRATION_DEVICES).
    """

    TYPE: ClassVar[str] = "calibrate"
    CONTROL: ClassVar[bool] = True
    mic: str = _f(_string(MAX_ID_LENGTH))
    devices: tuple[str, ...] | None = _f(_optional(_id_list), None)
    rounds: int = _f(_rounds, DEFAULT_CALIBRATION_ROUNDS)


@dataclass(frozen=True)
class TickMode:
    """Host or co-host: every device ticks together (``on``), to align offsets by ear."""

    TYPE: ClassVar[str] = "tick_mode"
    CONTROL: ClassVar[bool] = True
    on: bool = _f(_boolean)


@dataclass(frozen=True)
class Measurement:
    """What the measuring device heard of one device: its delay (ms, against its
    scheduled time; null when no round counted), rounds that counted, their
    spread, and why rounds were rejected."""

    id: str
    delay_ms: float | None
    rounds: int
    spread_ms: float | None
    reason: str | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "delay_ms": self.delay_ms,
            "rounds": self.rounds,
            "spread_ms": self.spread_ms,
            "reason": self.reason,
        }


_MEASUREMENT_KINDS: dict[str, Any] = {
    "id": _string(MAX_ID_LENGTH),
    "delay_ms": _optional(_within(-MAX_CALIBRATION_DELAY_MS, MAX_CALIBRATION_DELAY_MS)),
    "rounds": None,  # checked below: 0 to MAX_CALIBRATION_ROUNDS
    "spread_ms": _optional(_within(0.0, MAX_CALIBRATION_DELAY_MS)),
    "reason": _optional(_string(MAX_CALIBRATION_REASON)),
}


def _measurement(value: Any, name: str) -> Measurement:
    if not isinstance(value, dict) or set(value) != set(_MEASUREMENT_KINDS):
        keys = ", ".join(_MEASUREMENT_KINDS)
        raise ProtocolError("bad_message", f"each of {name!r} must be an object with {keys}")
    rounds = value["rounds"]
    if (
        isinstance(rounds, bool)
        or not isinstance(rounds, int)
        or not 0 <= rounds <= MAX_CALIBRATION_ROUNDS
    ):
        raise ProtocolError(
            "bad_message", f"{name}.rounds must be a whole number 0-{MAX_CALIBRATION_ROUNDS}"
        )
    checked = {k: kind(value[k], f"{name}.{k}") for k, kind in _MEASUREMENT_KINDS.items() if kind}
    return Measurement(rounds=rounds, **checked)


def _measurements(value: Any, name: str) -> tuple[Measurement, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CALIBRATION_DEVICES:
        raise ProtocolError(
            "bad_message", f"field {name!r} must list 1-{MAX_CALIBRATION_DEVICES} devices"
        )
    out = tuple(_measurement(v, name) for v in value)
    if len({m.id for m in out}) != len(out):
        raise ProtocolError("bad_message", f"field {name!r} names a device twice")
    return out


@dataclass(frozen=True)
class CalibrationResult:
    """The measuring device of calibration ``id``: what it heard of each device."""

    TYPE: ClassVar[str] = "calibration_result"
    CONTROL: ClassVar[bool] = True
    id: str = _f(_string(MAX_ID_LENGTH))
    devices: tuple[Measurement, ...] = _f(_measurements)


ClientMessage = (
    SetTrack
    | Play
    | Pause
    | Seek
    | Volume
    | ClaimHost
    | TransferHost
    | Kick
    | RoomSettingsUpdate
    | QueueAdd
    | QueueRemove
    | QueueMove
    | QueueNext
    | QueueMode
    | SetPassword
    | CreateInvite
    | RevokeInvite
    | Ping
    | Report
    | SetLatencyOffset
    | Resync
    | Calibrate
    | TickMode
    | CalibrationResult
)

CLIENT_MESSAGES: dict[str, type[ClientMessage]] = {
    cls.TYPE: cls
    for cls in (
        SetTrack,
        Play,
        Pause,
        Seek,
        Volume,
        ClaimHost,
        TransferHost,
        Kick,
        RoomSettingsUpdate,
        QueueAdd,
        QueueRemove,
        QueueMove,
        QueueNext,
        QueueMode,
        SetPassword,
        CreateInvite,
        RevokeInvite,
        Ping,
        Report,
        SetLatencyOffset,
        Resync,
        Calibrate,
        TickMode,
        CalibrationResult,
    )
}


def _reject_constant(name: str) -> Any:
    raise ProtocolError("bad_message", f"{name} is not a valid JSON number")


def decode_client(frame: str | bytes) -> ClientMessage:
    """Parse one text frame into a client message, or raise ProtocolError."""
    if isinstance(frame, bytes):
        raise ProtocolError("binary_not_supported", "binary frames are not supported")
    if (
        len(frame) > MAX_FRAME_BYTES
        or len(frame.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES
    ):
        raise ProtocolError("too_large", f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        obj = json.loads(frame, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_message", f"not valid JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a frame must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "missing string field 'type'")
    cls = CLIENT_MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError("bad_message", f"unknown message type {kind[:40]!r}")
    kwargs: dict[str, Any] = {}
    known = {"type"}
    for f in fields(cls):
        known.add(f.name)
        if f.name in obj:
            kwargs[f.name] = f.metadata["kind"](obj[f.name], f.name)
        elif f.default is MISSING:
            raise ProtocolError("bad_message", f"{kind}: missing field {f.name!r}")
    extra = set(obj) - known
    if extra:
        name = sorted(extra)[0][:40]
        raise ProtocolError("bad_message", f"{kind}: unknown field {name!r}")
    return cls(**kwargs)


# -- server -> client ---------------------------------------------------------


def encode(kind: str, **payload: Any) -> str:
    """Encode one server frame. Compact separators: these go out to every client."""
    payload["type"] = kind
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def error_frame(code: str, message: str) -> str:
    return encode("error", code=code, message=message)
