"""Typed server settings and the named durations and limits they default to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SECOND = 1.0
MINUTE = 60 * SECOND
KiB = 1024

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_FRAME_BYTES = 16 * KiB
# The server drops a client it has heard nothing from for this long. Clients
# ping every 2-5 s, so silence this long means a dead or hostile peer.
HEARTBEAT_TIMEOUT = 30 * SECOND
# Hypercorn's own protocol pings are off by default: the clients' pings keep
# NATs open, and Hypercorn's ping task outlives a closed socket by up to one
# interval, which holds up a graceful shutdown.
WS_PING_INTERVAL: float | None = None
# A client whose socket accepts no frame for this long is disconnected (4008).
SEND_TIMEOUT = 10 * SECOND
# A client with more than this many frames waiting is too slow (4008).
OUTBOX_MAX_FRAMES = 256
MAX_CONNECTIONS_PER_IP = 64
ROOM_IDLE_TTL = 5 * MINUTE
SHUTDOWN_GRACE = 3 * SECOND


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "musicsync"


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    media_dir: Path = field(default_factory=lambda: default_data_dir() / "media")
    demo_tracks: bool = True
    max_frame_bytes: int = MAX_FRAME_BYTES
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    ws_ping_interval: float | None = WS_PING_INTERVAL
    send_timeout: float = SEND_TIMEOUT
    outbox_max_frames: int = OUTBOX_MAX_FRAMES
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    room_idle_ttl: float = ROOM_IDLE_TTL
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Settings from MUSICSYNC_* variables, for ``hypercorn musicsync.app:app``."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, object] = {}
        if "MUSICSYNC_HOST" in env:
            kwargs["host"] = env["MUSICSYNC_HOST"]
        if "MUSICSYNC_PORT" in env:
            kwargs["port"] = int(env["MUSICSYNC_PORT"])
        if "MUSICSYNC_MEDIA" in env:
            kwargs["media_dir"] = Path(env["MUSICSYNC_MEDIA"])
        if "MUSICSYNC_MAX_CONNECTIONS_PER_IP" in env:
            kwargs["max_connections_per_ip"] = int(env["MUSICSYNC_MAX_CONNECTIONS_PER_IP"])
        if "MUSICSYNC_LOG_LEVEL" in env:
            kwargs["log_level"] = env["MUSICSYNC_LOG_LEVEL"]
        return cls(**kwargs)  # type: ignore[arg-type]
