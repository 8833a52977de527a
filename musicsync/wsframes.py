"""WebSocket bytes the server writes, and the checks of an upgrade request (sans-IO, RFC 6455).

Server-to-client frames are never masked, so a broadcast is framed once and the
same bytes go to every listener. Client frames are parsed by wsproto's frame
protocol (``wsproto.connection.Connection``); only the handshake and the few
frames the server sends are done by hand here.

Invariants:

* ``check_upgrade`` either returns a complete ``Upgrade`` or raises
  ``HandshakeRefused`` carrying the HTTP status to answer with; nothing in
  between (a refused request never reaches the room).
* Every function here is a pure function of its arguments.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
FIN = 0x80
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_VERSION = "13"
KEY_BYTES = 16  # Sec-WebSocket-Key is 16 random bytes, base64-encoded
MAX_CLOSE_REASON_BYTES = 123  # a control frame's payload is at most 125 bytes
WS_PATH_PREFIX = "/ws/"
SERVER_NAME = b"musicsync"


class HandshakeRefused(Exception):
    """The upgrade request cannot be accepted; answer ``status`` and close."""

    def __init__(self, status: HTTPStatus, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


@dataclass(frozen=True)
class Upgrade:
    """A valid WebSocket upgrade request for ``/ws/<room>``."""

    room: str
    key: str
    host: str | None
    origin: str | None
    args: dict[str, str] = field(default_factory=dict)
    offers_compression: bool = False
    # X-Forwarded-For / -Proto / -Host, trusted only behind --proxy-hops
    forwarded_for: str | None = None
    forwarded_proto: str | None = None
    forwarded_host: str | None = None


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame."""
    n = len(payload)
    if n < 126:
        head = bytes((FIN | opcode, n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", FIN | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", FIN | opcode, 127, n)
    return head + payload


def text_frame(text: str) -> bytes:
    return frame(OP_TEXT, text.encode())


def pong_frame(payload: bytes) -> bytes:
    return frame(OP_PONG, payload[:125])


def close_frame(code: int, reason: str = "") -> bytes:
    raw = reason.encode()[:MAX_CLOSE_REASON_BYTES]
    # never cut a multi-byte character in half (the reason must stay UTF-8)
    raw = raw.decode("utf-8", "ignore").encode()
    return frame(OP_CLOSE, struct.pack("!H", code) + raw)


def accept_key(key: str) -> str:
    digest = hashlib.sha1(key.encode("ascii") + WS_GUID).digest()  # RFC 6455 fixes SHA-1 here
    return base64.b64encode(digest).decode("ascii")


def accept_response(key: str) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n"
        b"Server: " + SERVER_NAME + b"\r\n\r\n"
    )


def error_response(
    status: HTTPStatus, reason: str, headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    body = f"{status.value} {status.phrase}: {reason}\n".encode()
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _header_tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def is_websocket_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request asks to become a WebSocket (``Upgrade: websocket``)."""
    return any(name == b"upgrade" and b"websocket" in value.lower() for name, value in headers)


def check_upgrade(
    method: bytes, target: bytes, http_version: bytes, headers: list[tuple[bytes, bytes]]
) -> Upgrade:
    """Validate an upgrade request (h11's lower-cased header names); raise if refused."""
    try:
        path_and_query = target.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "the request target is not ASCII") from None
    parts = urlsplit(path_and_query)
    if not parts.path.startswith(WS_PATH_PREFIX) or "/" in parts.path[len(WS_PATH_PREFIX) :]:
        raise HandshakeRefused(HTTPStatus.NOT_FOUND, "WebSockets live at /ws/<room>")
    if method != b"GET":
        raise HandshakeRefused(
            HTTPStatus.METHOD_NOT_ALLOWED, "a WebSocket upgrade is a GET", (("Allow", "GET"),)
        )
    if http_version != b"1.1":
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1")
    fields: dict[str, str] = {}
    for name, value in headers:
        text = value.decode("latin-1")
        key = name.decode("latin-1")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    if "content-length" in fields or "transfer-encoding" in fields:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "an upgrade request has no body")
    if "websocket" not in _header_tokens(fields.get("upgrade", "")):
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "missing Upgrade: websocket")
    if "upgrade" not in _header_tokens(fields.get("connection", "")):
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "missing Connection: Upgrade")
    if fields.get("sec-websocket-version", "").strip() != WS_VERSION:
        raise HandshakeRefused(
            HTTPStatus.UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken here",
            (("Sec-WebSocket-Version", WS_VERSION),),
        )
    key = fields.get("sec-websocket-key", "").strip()
    try:
        valid_key = len(base64.b64decode(key.encode("ascii"), validate=True)) == KEY_BYTES
    except (binascii.Error, UnicodeEncodeError):
        valid_key = False
    if not valid_key:
        raise HandshakeRefused(HTTPStatus.BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes")
    args: dict[str, str] = {}
    for arg, arg_value in parse_qsl(parts.query, keep_blank_values=True):
        args.setdefault(arg, arg_value)  # the first wins, as in Quart's request.args.get
    extensions = _header_tokens(fields.get("sec-websocket-extensions", ""))
    return Upgrade(
        room=unquote(parts.path[len(WS_PATH_PREFIX) :]),
        key=key,
        host=fields.get("host"),
        origin=fields.get("origin"),
        args=args,
        offers_compression=any(e.startswith("permessage-deflate") for e in extensions),
        forwarded_for=fields.get("x-forwarded-for"),
        forwarded_proto=fields.get("x-forwarded-proto"),
        forwarded_host=fields.get("x-forwarded-host"),
    )


def forwarded_value(header: str | None, hops: int) -> str | None:
    """The value the ``hops``-th trusted proxy from us added to a comma list, if any."""
    if not header or hops <= 0:
        return None
    values = [v.strip() for v in header.split(",")]
    return values[-hops] if len(values) >= hops and values[-hops] else None
