"""Shared fixtures: a real Hypercorn server in the test's trio run, and WebSocket helpers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from quart_trio import QuartTrio
from trio_websocket import WebSocketConnection, open_websocket_url

from musicsync.cli import run_server
from musicsync.config import Settings
from musicsync.hub import Hub

RECEIVE_TIMEOUT = 5.0


@dataclass
class Server:
    http: str
    ws: str
    app: QuartTrio
    settings: Settings

    @property
    def hub(self) -> Hub:
        hub = self.app.extensions["musicsync_hub"]
        assert isinstance(hub, Hub)
        return hub

    def ws_url(self, room: str = "main", name: str = "tester", **query: str) -> str:
        from urllib.parse import urlencode

        return f"{self.ws}/ws/{room}?{urlencode({'name': name, **query})}"


@asynccontextmanager
async def open_server(settings: Settings) -> AsyncIterator[Server]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds, app = await nursery.start(run_server, settings, shutdown)
        http = binds[0]
        yield Server(http, http.replace("http://", "ws://", 1), app, settings)
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + 5


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    base = Settings(
        host="127.0.0.1", port=0, media_dir=media, data_dir=tmp_path / "data", demo_tracks=False
    )
    return replace(base, **overrides)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with open_server(make_settings(tmp_path)) as srv:
        yield srv


class Peer:
    """A test client: a trio-websocket connection plus JSON helpers."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.welcome: dict[str, Any] = {}

    @property
    def id(self) -> str:
        return str(self.welcome["you"]["id"])

    async def send(self, kind: str, **fields: Any) -> None:
        await self.conn.send_message(json.dumps({"type": kind, **fields}))

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send_message(data)

    async def recv(self, limit: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(limit):
            msg = json.loads(await self.conn.get_message())
        assert isinstance(msg, dict)
        return msg

    async def expect(self, kind: str, limit: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
        """Skip frames of other types until one of ``kind`` arrives."""
        with trio.fail_after(limit):
            while True:
                msg = await self.recv(limit=limit)
                if msg["type"] == kind:
                    return msg

    async def expect_error(self, code: str) -> dict[str, Any]:
        msg = await self.expect("error")
        assert msg["code"] == code, msg
        return msg

    async def expect_state(self, **want: Any) -> dict[str, Any]:
        """Wait for a state whose fields include ``want``.

        Like the page, it fills in the queue a state leaves out (this client was
        sent that queue already): the last one seen, else the welcome's.
        """
        while True:
            room = (await self.expect("state"))["room"]
            known = self.welcome.get("room", {}).get("queue", [])
            self.queue = room.setdefault("queue", getattr(self, "queue", known))
            if all(room.get(k) == v for k, v in want.items()):
                return room  # type: ignore[no-any-return]

    async def expect_presence(self, predicate: Any) -> dict[str, Any]:
        while True:
            msg = await self.expect("presence")
            if predicate(msg):
                return msg


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """open_websocket_url that also closes the TCP stream after a server-side close.

    trio-websocket's client reader stops on the server's TCP close without
    closing its own socket (the server initiated the close handshake), which
    leaves a ResourceWarning behind; close it here.
    """
    async with open_websocket_url(url, **kwargs) as conn:
        try:
            yield conn
        finally:
            stream = conn._stream
    await stream.aclose()


@asynccontextmanager
async def connect(
    server: Server, room: str = "main", name: str = "tester", **query: str
) -> AsyncIterator[Peer]:
    async with open_ws(server.ws_url(room, name, **query)) as conn:
        peer = Peer(conn)
        peer.welcome = await peer.expect("welcome")
        yield peer
