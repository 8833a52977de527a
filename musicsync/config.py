"""Typed server settings and the named durations and limits they default to."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

SECOND = 1.0
MINUTE = 60 * SECOND
KiB = 1024
MiB = 1024 * KiB

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
# A dropped participant keeps id, name and role this long (resume by token).
RESUME_GRACE = 30 * SECOND
SHUTDOWN_GRACE = 3 * SECOND
# Largest file POST /api/upload accepts (413 beyond it).
UPLOAD_MAX_BYTES = 200 * MiB
GiB = 1024 * MiB
HOUR = 60 * MINUTE
# Who may upload: nobody, the hosts and co-hosts (and listeners where the room
# lets them), or any participant.
UPLOAD_POLICIES = ("off", "hosts", "everyone")
# Bytes one address may upload per hour (a token bucket refilled over the hour).
UPLOAD_BUDGET_BYTES_PER_HOUR = 2 * GiB
# The whole media library (demo tracks, uploads, the operator's files) may not
# grow past this by uploads.
LIBRARY_MAX_BYTES = 20 * GiB
# Below this much free disk under the media directory, uploads get 507.
MIN_FREE_DISK_BYTES = 1 * GiB
# Rooms that may be live (in memory) at once; one more is refused (4429).
MAX_ROOMS = 5000
# New rooms one address may open per hour (a token bucket: that many at once,
# refilled over the hour).
NEW_ROOMS_PER_IP_PER_HOUR = 60


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "musicsync"


@dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    media_dir: Path = field(default_factory=lambda: default_data_dir() / "media")
    # Where the room database lives (rooms.sqlite3).
    data_dir: Path = field(default_factory=default_data_dir)
    demo_tracks: bool = True
    max_frame_bytes: int = MAX_FRAME_BYTES
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    ws_ping_interval: float | None = WS_PING_INTERVAL
    send_timeout: float = SEND_TIMEOUT
    outbox_max_frames: int = OUTBOX_MAX_FRAMES
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP
    room_idle_ttl: float = ROOM_IDLE_TTL
    resume_grace: float = RESUME_GRACE
    log_level: str = "info"
    log_format: str = "text"
    certfile: Path | None = None
    keyfile: Path | None = None
    public_url: str | None = None
    print_qr: bool = True
    # Reverse proxies in front whose X-Forwarded-For/-Proto/-Host are trusted.
    proxy_hops: int = 0
    shutdown_grace: float = SHUTDOWN_GRACE
    upload_max_bytes: int = UPLOAD_MAX_BYTES
    # permessage-deflate: off, our frames are tiny (and it costs ~47 KiB a connection).
    websocket_compression: bool = False
    # Browser origins allowed to open the WebSocket besides the page's own.
    allowed_origins: tuple[str, ...] = ()
    # Origins (or "*") allowed to fetch /media/ cross-origin; none by default.
    cors_origins: tuple[str, ...] = ()
    # Bearer token for the operator's /api/admin/ endpoints; None disables them.
    admin_token: str | None = None
    # Who may upload (off | hosts | everyone), and the limits that keep the disk.
    uploads: str = "hosts"
    upload_budget_bytes_per_hour: int = UPLOAD_BUDGET_BYTES_PER_HOUR
    library_max_bytes: int = LIBRARY_MAX_BYTES
    min_free_disk_bytes: int = MIN_FREE_DISK_BYTES
    # Host names the server answers to besides its own addresses and localhost
    # (DNS-rebinding guard); --public-url and --allowed-origin hosts count too.
    allowed_hosts: tuple[str, ...] = ()
    max_rooms: int = MAX_ROOMS
    new_rooms_per_ip_per_hour: int = NEW_ROOMS_PER_IP_PER_HOUR
    # redis://HOST:PORT/DB: rooms live in Redis, shared by every node given it.
    redis: str | None = None

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from MUSICSYNC_* variables (and MUSICSYNC_CONFIG's TOML file).

        This is what ``hypercorn -k trio musicsync.app:app`` runs with.
        """
        return resolve_settings({}, os.environ if environ is None else environ)


# -- one table for flags, environment variables and the TOML file -------------
#
# Every option below is a command-line flag ``--name``, an environment variable
# ``MUSICSYNC_NAME`` and a TOML key ``name`` (dashes become underscores), with
# the precedence flag > environment > TOML file > default.

ENV_PREFIX = "MUSICSYNC_"
CONFIG_ENV = "MUSICSYNC_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting that could not be used; the message names where it came from."""


def _parse_str(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("must be one of true/false, yes/no, on/off, 1/0")


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text.strip())
    if not (value > 0 and value < float("inf")):
        raise ValueError("must be a positive number of seconds")
    return value


def _megabytes(text: str) -> int:
    value = int(text.strip())
    if not 1 <= value <= 1_000_000:
        raise ValueError("must be between 1 and 1000000 (MB)")
    return value * MiB


def _megabytes_or_zero(text: str) -> int:
    value = int(text.strip())
    if not 0 <= value <= 1_000_000_000:
        raise ValueError("must be between 0 and 1000000000 (MB)")
    return value * MiB


def _host_names(text: str) -> tuple[str, ...]:
    """Comma-separated host names (no scheme, no port), lower-cased."""
    result = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        if "/" in item or "@" in item or " " in item or item.startswith(("[", ":")):
            raise ValueError(f"{item!r} is not a host name like music.example.org")
        result.append(item.rstrip("."))
    return tuple(result)


def _path(text: str) -> Path:
    return Path(_parse_str(text)).expanduser()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return word

    return parse


def _public_url(text: str) -> str:
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    return url


REDIS_SCHEMES = ("redis", "rediss")
MAX_REDIS_DB = 15  # Redis's default number of logical databases, 0..15


def parse_redis_url(text: str) -> str:
    """``redis://[user:password@]host[:port][/db]`` (or ``rediss://``), checked."""
    url = text.strip()
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a Redis URL ({exc})") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("must start with redis:// or rediss://, like redis://127.0.0.1:6379/0")
    if not parts.hostname:
        raise ValueError("names no host, like redis://127.0.0.1:6379/0")
    if port == 0:
        raise ValueError("port 0 is not a Redis port")
    db = parts.path.strip("/")
    if db and (not db.isdigit() or int(db) > MAX_REDIS_DB):
        raise ValueError(f"the database (path) must be a number from 0 to {MAX_REDIS_DB}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or a fragment")
    return url


def redis_url_for_humans(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


@dataclass(frozen=True)
class Option:
    """One setting, as a flag, an environment variable and a TOML key."""

    name: str  # the flag without its dashes
    field: str  # the Settings attribute it sets
    parse: Callable[[str], Any]
    help: str
    kind: str = "str"  # str | int | float | bool: the TOML type it accepts
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def from_text(self, text: str, source: str) -> Any:
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {text!r} is not a valid {self.name}: {exc}") from None

    def from_toml(self, value: Any, source: str, base: Path) -> Any:
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }.get(self.kind, isinstance(value, str))
        if not ok:
            raise ConfigError(f"{source}: {self.key} must be a TOML {self.kind}, not {value!r}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, list):
            value = ",".join(value)
        result = self.from_text(str(value), source)
        if isinstance(result, Path) and not result.is_absolute():
            result = base / result  # relative to the file that names it
        return result


def _origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins like https://example.com (or "*")."""
    result = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item != "*":
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"{item!r} is not an origin like https://example.com")
            item = f"{parts.scheme}://{parts.netloc}".lower()
        result.append(item)
    return tuple(result)


def _secret(text: str) -> str:
    if len(text) < 16:
        raise ValueError("use at least 16 characters")
    return text


OPTIONS: tuple[Option, ...] = (
    Option(
        "host",
        "host",
        _parse_str,
        "address to bind; 0.0.0.0 (or ::) lets the LAN in",
        "str",
        "ADDR",
    ),
    Option("port", "port", _int_between(0, 65535), "TCP port; 0 picks a free one", "int", "PORT"),
    Option("media", "media_dir", _path, "directory of tracks served under /media/", "str", "DIR"),
    Option(
        "data",
        "data_dir",
        _path,
        "directory for the room database (rooms, queues, settings survive restarts)",
        "str",
        "DIR",
    ),
    Option("demo", "demo_tracks", _parse_bool, "generate the demo tracks at start", "bool"),
    Option(
        "public-url",
        "public_url",
        _public_url,
        "the URL people open when a reverse proxy is in front (share links, QR codes)",
        metavar="URL",
    ),
    Option(
        "certfile", "certfile", _path, "TLS certificate (PEM): serve HTTPS and WSS", "str", "PEM"
    ),
    Option("keyfile", "keyfile", _path, "TLS private key (PEM) for --certfile", "str", "PEM"),
    Option("log-level", "log_level", _choice(*LOG_LEVELS), "log threshold", choices=LOG_LEVELS),
    Option(
        "log-format",
        "log_format",
        _choice(*LOG_FORMATS),
        "stderr log lines: key=value text or JSON",
        choices=LOG_FORMATS,
    ),
    Option("qr", "print_qr", _parse_bool, "print a QR code of the LAN URL at start", "bool"),
    Option(
        "proxy-hops",
        "proxy_hops",
        _int_between(0, 10),
        "reverse proxies in front whose X-Forwarded-For/-Proto/-Host to trust (1 behind"
        " Caddy or nginx, so per-address limits see the real client)",
        "int",
        "N",
    ),
    Option(
        "max-connections-per-ip",
        "max_connections_per_ip",
        _int_between(1, 1_000_000),
        "WebSocket connections allowed from one address",
        "int",
    ),
    Option(
        "heartbeat-timeout",
        "heartbeat_timeout",
        _seconds,
        "drop a client silent this many seconds",
        "float",
        "SECONDS",
    ),
    Option(
        "send-timeout",
        "send_timeout",
        _seconds,
        "drop a client whose socket takes no frame for this many seconds",
        "float",
        "SECONDS",
    ),
    Option(
        "outbox-max-frames",
        "outbox_max_frames",
        _int_between(1, 1_000_000),
        "frames a client may fall behind before it is dropped",
        "int",
    ),
    Option(
        "room-idle-ttl",
        "room_idle_ttl",
        _seconds,
        "forget an empty room after this many seconds",
        "float",
        "SECONDS",
    ),
    Option(
        "resume-grace",
        "resume_grace",
        _seconds,
        "a dropped participant may resume its seat for this many seconds",
        "float",
        "SECONDS",
    ),
    Option(
        "shutdown-grace",
        "shutdown_grace",
        _seconds,
        "on SIGTERM, wait this long for clients to be told to reconnect",
        "float",
        "SECONDS",
    ),
    Option(
        "websocket-compression",
        "websocket_compression",
        _parse_bool,
        "accept permessage-deflate when a client offers it (default off)",
        "bool",
    ),
    Option(
        "allowed-origin",
        "allowed_origins",
        _origins,
        "another origin allowed to open the WebSocket (repeatable; the page's own always is)",
        "list",
        "ORIGIN",
    ),
    Option(
        "cors-origin",
        "cors_origins",
        _origins,
        "origin allowed to fetch /media/ cross-origin, or * (repeatable; default none)",
        "list",
        "ORIGIN",
    ),
    Option(
        "admin-token",
        "admin_token",
        _secret,
        "bearer token that enables the operator API under /api/admin/",
        "str",
        "TOKEN",
    ),
    Option(
        "upload-max-mb",
        "upload_max_bytes",
        _megabytes,
        f"largest upload accepted, in MB (default {UPLOAD_MAX_BYTES // MiB})",
        "int",
        "MB",
    ),
    Option(
        "uploads",
        "uploads",
        _choice(*UPLOAD_POLICIES),
        "who may upload: off, hosts (and co-hosts; listeners where the room allows) or everyone",
        choices=UPLOAD_POLICIES,
    ),
    Option(
        "upload-budget-mb",
        "upload_budget_bytes_per_hour",
        _megabytes,
        f"MB one address may upload per hour (default {UPLOAD_BUDGET_BYTES_PER_HOUR // MiB})",
        "int",
        "MB",
    ),
    Option(
        "library-max-mb",
        "library_max_bytes",
        _megabytes,
        f"uploads stop once the media library holds this many MB"
        f" (default {LIBRARY_MAX_BYTES // MiB})",
        "int",
        "MB",
    ),
    Option(
        "min-free-disk-mb",
        "min_free_disk_bytes",
        _megabytes_or_zero,
        f"refuse uploads (507) while less than this many MB are free"
        f" (default {MIN_FREE_DISK_BYTES // MiB})",
        "int",
        "MB",
    ),
    Option(
        "allowed-host",
        "allowed_hosts",
        _host_names,
        "another host name the server answers to (repeatable; its own addresses,"
        " localhost and the --public-url / --allowed-origin hosts always are)",
        "list",
        "NAME",
    ),
    Option(
        "max-rooms",
        "max_rooms",
        _int_between(1, 10_000_000),
        "rooms that may be live at once",
        "int",
    ),
    Option(
        "new-rooms-per-ip",
        "new_rooms_per_ip_per_hour",
        _int_between(1, 10_000_000),
        "new rooms one address may open per hour",
        "int",
    ),
    Option(
        "redis",
        "redis",
        parse_redis_url,
        "redis://HOST:PORT/DB: share rooms with every server given the same Redis"
        " (several processes or machines); without it rooms live in --data's SQLite",
        "str",
        "URL",
    ),
)

OPTIONS_BY_KEY = {o.key: o for o in OPTIONS}


def default_value(option: Option) -> Any:
    return getattr(Settings(), option.field)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(OPTIONS_BY_KEY))
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(OPTIONS_BY_KEY)})"
        )
    return data


def resolve_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    """Settings from flags (Settings field -> value, only those given), the
    environment and a TOML file: flag > environment > file > default.

    ``config_file`` None means ``MUSICSYNC_CONFIG``, if set.
    """
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV]).expanduser()
    table = load_toml(config_file) if config_file is not None else {}
    base = config_file.parent if config_file is not None else Path.cwd()
    kwargs: dict[str, Any] = {}
    for option in OPTIONS:
        if option.field in flags:
            kwargs[option.field] = flags[option.field]
        elif option.env in environ:
            kwargs[option.field] = option.from_text(environ[option.env], option.env)
        elif option.key in table:
            kwargs[option.field] = option.from_toml(table[option.key], str(config_file), base)
    settings = Settings(**kwargs)
    if (settings.certfile is None) != (settings.keyfile is None):
        raise ConfigError("--certfile and --keyfile go together: give both or neither")
    return settings
