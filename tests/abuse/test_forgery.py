"""Forged host messages, forged ``id`` fields, server-only message types, cross-origin sockets."""

from __future__ import annotations

import json
from typing import Any

from ..conftest import connect, open_ws
from .conftest import Arena, RawWS

FORGED_CONTROLS: list[tuple[str, dict[str, Any], str]] = [
    ("set_track", {"url": "/media/evil.mp3", "autoplay": True}, "not_host"),
    ("play", {"position": 0}, "not_host"),
    ("pause", {}, "not_host"),
    ("seek", {"position": 99}, "not_host"),
    ("volume", {"volume": 0}, "not_host"),
    ("set_password", {"password": "locked-out"}, "not_host"),
    ("create_invite", {"role": "cohost"}, "not_host"),
    ("revoke_invite", {"code": "x"}, "not_host"),
    ("room_settings", {"listeners_may_upload": True}, "not_host"),
    ("queue_add", {"url": "/media/evil.mp3"}, "not_host"),
    ("queue_remove", {"item": "q1"}, "not_host"),
    ("queue_move", {"item": "q1", "index": 0}, "not_host"),
    ("queue_next", {}, "not_host"),
    ("queue_mode", {"repeat": "one"}, "not_host"),
    ("claim_host", {}, "host_exists"),
]


async def test_forged_host_controls(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="forger") as forger:
        for kind, fields, code in FORGED_CONTROLS:
            await forger.send(kind, **fields)
            await forger.expect_error(code)
        arena.note(
            f"{len(FORGED_CONTROLS)} host-only messages: not_host each (claim_host: host_exists)"
        )


async def test_forged_kick_and_transfer_aimed_at_the_host(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="forger") as forger:
        await forger.send("kick", id=arena.host.id)
        await forger.expect_error("not_host")
        await forger.send("kick", id=arena.listener.id)
        await forger.expect_error("not_host")
        await forger.send("transfer_host", to=forger.id)
        await forger.expect_error("not_host")
        arena.note("kick host, kick listener, transfer_host to self: not_host each")


FORGED_IDS: list[dict[str, Any]] = [
    {"type": "seek", "position": 1, "id": "HOST"},
    {"type": "seek", "position": 1, "from": "HOST"},
    {"type": "play", "sender": "HOST"},
    {"type": "volume", "volume": 0, "you": {"id": "HOST", "role": "host"}},
    {"type": "pause", "role": "host"},
    {"type": "set_password", "password": "x", "as": "HOST"},
]


async def test_forged_id_fields(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="forger") as forger:
        for msg in FORGED_IDS:
            frame = json.dumps(msg).replace('"HOST"', json.dumps(arena.host.id))
            await forger.send_raw(frame)
            await forger.expect_error("bad_message")  # unknown field: nothing is read from it
        arena.note(f"{len(FORGED_IDS)} messages carrying the host's id: bad_message each")


SERVER_TYPES = ["welcome", "state", "presence", "pong", "error", "invite", "kicked"]


async def test_server_only_message_types(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="forger") as forger:
        for kind in SERVER_TYPES:
            await forger.send(kind, room={"version": 10**6, "paused": False})
            await forger.expect_error("bad_message")
        arena.note(f"{len(SERVER_TYPES)} server-to-client types sent upstream: bad_message each")


CROSS_ORIGINS = [
    "https://evil.example",
    "null",
    "http://127.0.0.1.evil.example",
    "http://localhost",
    "file://",
]


async def test_cross_origin_websocket(arena: Arena) -> None:
    statuses = []
    async with arena.attack():
        for origin in CROSS_ORIGINS:
            async with RawWS.open(arena.server, headers=[(b"origin", origin.encode())]) as raw:
                statuses.append(raw.status)
        # the same host on another port is another origin
        other_port = arena.server.http.rsplit(":", 1)[0] + ":1"
        async with RawWS.open(arena.server, headers=[(b"origin", other_port.encode())]) as raw:
            statuses.append(raw.status)
        assert set(statuses) == {403}
        assert arena.server.hub.stats.errors["bad_origin"] == len(statuses)
        # the page's own origin passes
        async with open_ws(arena.server.ws_url(), extra_headers=[("Origin", arena.server.http)]):
            pass
        arena.note(f"{len(statuses)} foreign origins: HTTP 403 before the upgrade")
