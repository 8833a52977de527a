"""The reference broadcaster of `just bench`: `websockets` asyncio server, `websockets.broadcast`.

The baseline the fan-out benchmark compares musicsync with, in the same run:
what someone would write with the stack people pick instead. It speaks just
enough of the musicsync protocol for the benchmark's load client:

* ``/ws/<room>``: a ``welcome`` on connect; the first connection of a room is
  its host;
* a ``set_track``, ``play``, ``pause`` or ``seek`` from the host bumps the
  room's version and broadcasts ``{"room": {...}, "type": "state"}`` (the same
  fields as musicsync's state, so a frame of the same size) to everyone in the
  room with one ``websockets.broadcast`` call;
* ``{"type": "ping", "t0": x}`` is answered with a ``pong``.

No compression, no keepalive pings (the load client's listeners never write),
frames capped at 16 KiB as in musicsync.

    python benchmarks/reference_broadcaster.py [--host 127.0.0.1] [--port 0]

Prints ``reference listening on http://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

MAX_FRAME = 16 * 1024  # the same frame cap as musicsync
BACKLOG = 100  # Hypercorn's default, which `musicsync serve` uses
LEAD_MS = 150.0  # musicsync's shortest lead: a change takes effect this much later


def now_ms() -> float:
    return time.time() * 1000.0


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


class Room:
    """One room: its clients, its host and a state shaped like musicsync's."""

    def __init__(self) -> None:
        self.clients: set[ServerConnection] = set()
        self.host: ServerConnection | None = None
        self.track: dict[str, Any] | None = None
        self.paused = True
        self.position = 0.0
        self.start_at = now_ms()
        self.version = 0

    def state(self) -> dict[str, Any]:
        return {
            "track": self.track,
            "paused": self.paused,
            "position": self.position,
            "start_at": self.start_at,
            "volume": 1.0,
            "rate": 1.0,
            "version": self.version,
            "settings": {"listeners_may_upload": False, "protected": False},
            "queue": [],
            "repeat": "off",
            "shuffle": False,
        }

    def position_at(self, t_ms: float) -> float:
        if self.paused:
            return self.position
        return self.position + max(0.0, t_ms - self.start_at) / 1000.0

    def apply(self, msg: dict[str, Any]) -> bool:
        """Apply a host command; True when the state changed."""
        kind = msg.get("type")
        at = max(now_ms() + LEAD_MS, self.start_at)
        if kind == "set_track" and isinstance(msg.get("url"), str):
            self.track = {
                "url": msg["url"],
                "title": str(msg.get("title") or ""),
                "duration": msg.get("duration"),
            }
            self.paused, self.position = True, 0.0
        elif kind == "play" and self.paused:
            self.position, self.paused = self.position_at(at), False
        elif kind == "pause" and not self.paused:
            self.position, self.paused = self.position_at(at), True
        elif kind == "seek" and isinstance(msg.get("position"), int | float):
            self.position = max(0.0, float(msg["position"]))
        else:
            return False
        self.start_at = at
        self.version += 1
        return True


rooms: dict[str, Room] = {}
next_id = 0


async def handler(ws: ServerConnection) -> None:
    global next_id
    path = ws.request.path if ws.request is not None else "/"
    route, _, _query = path.partition("?")
    if not route.startswith("/ws/") or len(route) <= len("/ws/"):
        await ws.close(1008, "unknown path")
        return
    name = route[len("/ws/") :]
    room = rooms.setdefault(name, Room())
    next_id += 1
    me = f"p{next_id}"
    if room.host is None:
        room.host = ws
    role = "host" if room.host is ws else "listener"
    room.clients.add(ws)
    try:
        await ws.send(
            dumps(
                {
                    "you": {"id": me, "name": me, "role": role},
                    "room": room.state(),
                    "room_name": name,
                    "server_time": now_ms(),
                    "lead_ms": LEAD_MS,
                    "type": "welcome",
                }
            )
        )
        async for raw in ws:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "ping":
                t1 = now_ms()
                await ws.send(
                    dumps({"t0": msg.get("t0"), "t1": t1, "t2": now_ms(), "type": "pong"})
                )
            elif ws is room.host and room.apply(msg):
                broadcast(room.clients, dumps({"room": room.state(), "type": "state"}))
    except ConnectionClosed:
        pass
    finally:
        room.clients.discard(ws)
        if room.host is ws:
            room.host = None
        if not room.clients:
            rooms.pop(name, None)


async def main(host: str, port: int) -> None:
    async with serve(
        handler,
        host,
        port,
        compression=None,
        ping_interval=None,
        max_size=MAX_FRAME,
        backlog=BACKLOG,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"reference listening on http://{host}:{bound}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
