"""The ``musicsync`` command line: ``serve`` under Hypercorn's trio worker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.middleware import ProxyFixMiddleware
from quart_trio import QuartTrio

from . import __version__
from .config import (
    CONFIG_ENV,
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    default_value,
    resolve_settings,
)
from .datalock import DataDirBusy, DataDirLock
from .gcpolicy import steward_gc
from .lan import Urls, startup_banner
from .logs import configure_logging
from .sockets import StuckPeerConfig

log = logging.getLogger(__name__)

SERVE_EPILOG = f"""\
Every option can also be set by an environment variable (shown in brackets)
and by a key of a TOML file given with --config or {CONFIG_ENV} (the option's
name with dashes as underscores, e.g. max_connections_per_ip = 16). A flag beats
the environment, which beats the file, which beats the default.

  musicsync serve --host 0.0.0.0 --certfile cert.pem --keyfile key.pem
  MUSICSYNC_PORT=9000 musicsync serve --config /etc/musicsync.toml
"""


def _help(option: Option) -> str:
    text = option.help
    if "default" not in text:
        default = default_value(option)
        if isinstance(default, bool):
            default = "on" if default else "off"
        text += f" (default: {'none' if default is None else default})"
    return f"{text} [{option.env}]".replace("%", "%%")


def _argparse_type(option: Option) -> Any:
    def convert(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    convert.__name__ = option.name  # argparse names it in "invalid <name> value"
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"musicsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the musicsync server.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML file of settings [{CONFIG_ENV}]",
    )
    for option in OPTIONS:
        if option.kind == "list":
            s.add_argument(
                option.flag,
                dest=option.field,
                type=_argparse_type(option),
                action="append",
                metavar=option.metavar,
                default=argparse.SUPPRESS,
                help=_help(option),
            )
        elif option.kind == "bool":
            s.add_argument(
                option.flag,
                dest=option.field,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_help(option),
            )
        else:
            s.add_argument(
                option.flag,
                dest=option.field,
                type=_argparse_type(option),
                choices=option.choices,
                metavar=option.metavar or (None if option.choices else option.kind.upper()),
                default=argparse.SUPPRESS,
                help=_help(option),
            )
    return parser


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings for parsed ``serve`` arguments: flag > environment > TOML file > default."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    for option in OPTIONS:
        if option.kind == "list" and option.field in flags:  # appended tuples: flatten
            flags[option.field] = tuple(x for group in flags[option.field] for x in group)
    config_file: Path | None = getattr(args, "config", None)
    return resolve_settings(flags, os.environ if environ is None else environ, config_file)


HTTP_READ_TIMEOUT = 60  # seconds (Hypercorn takes an int)
EXIT_DATA_DIR_BUSY = 2  # another server holds the data directory
EXIT_REDIS_UNUSABLE = 2  # --redis names a Redis that does not answer (or coredis is missing)
# Connections the kernel may hold before we accept them (capped by somaxconn):
# a room filling at festival pace must not see refused or retried handshakes.
LISTEN_BACKLOG = 4096


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = StuckPeerConfig()
    config.user_timeout = settings.send_timeout
    config.backlog = LISTEN_BACKLOG
    config.bind = [_bind(settings.host, settings.port)]
    config.websocket_max_message_size = settings.max_frame_bytes
    config.websocket_ping_interval = settings.ws_ping_interval
    config.graceful_timeout = settings.shutdown_grace
    # A backstop: any connection that sends nothing for this long is closed by
    # Hypercorn (a request whose body never comes is closed once it is answered:
    # uploads.FlowHTTPConnection). It covers WebSockets too, but clients ping
    # every 2-5 s and the app's heartbeat drops them after 30 s, well inside it.
    config.read_timeout = HTTP_READ_TIMEOUT
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    return config


def lock_data_dir(settings: Settings) -> DataDirLock:
    """The data directory's lock (raises DataDirBusy). With ``--redis`` the rooms
    live in Redis and the directory holds nothing of ours, so nodes on one
    machine may share it: nothing is locked then."""
    if settings.redis is not None:
        return DataDirLock(settings.data_dir, None)
    return DataDirLock.acquire(settings.data_dir)


async def run_server(
    settings: Settings,
    shutdown: trio.Event,
    *,
    data_lock: DataDirLock | None = None,
    task_status: trio.TaskStatus[tuple[list[str], QuartTrio]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; reports the bound URLs and the app.

    When ``shutdown`` is set, clients are first told to reconnect (close 1001)
    and given up to ``settings.shutdown_grace`` to receive it; then Hypercorn
    stops. Without ``data_lock`` (the caller's lock on ``settings.data_dir``)
    the data directory is locked here, for as long as this runs; raises
    DataDirBusy if another server has it.
    """
    if data_lock is not None:
        await _serve(settings, shutdown, data_lock, task_status)
        return
    lock = await trio.to_thread.run_sync(lock_data_dir, settings)
    try:
        await _serve(settings, shutdown, lock, task_status)
    finally:
        lock.release()


async def _serve(
    settings: Settings,
    shutdown: trio.Event,
    data_lock: DataDirLock,
    task_status: trio.TaskStatus[tuple[list[str], QuartTrio]],
) -> None:
    from .app import create_app, websocket_handler
    from .frontdoor import serve as serve_front_door

    app = create_app(settings, data_lock=data_lock)
    config = hypercorn_config(settings)

    async def wait_for_shutdown() -> None:
        await shutdown.wait()
        hub = app.extensions.get("musicsync_hub")
        if hub is not None:
            await hub.shutdown()

    asgi: Any = app
    if settings.proxy_hops:
        asgi = ProxyFixMiddleware(app, mode="legacy", trusted_hops=settings.proxy_hops)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve_front_door,
                asgi,
                config,
                websocket_handler(app),
                compression=settings.websocket_compression,
                shutdown_trigger=wait_for_shutdown,
            )
        )
        task_status.started((binds, app))


async def serve_until_signalled(settings: Settings, data_lock: DataDirLock) -> None:
    """Serve, print where, and shut down cleanly on SIGINT or SIGTERM."""
    shutdown = trio.Event()
    gc_scope = trio.CancelScope()

    async def steward() -> None:
        with gc_scope:
            await steward_gc()

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            binds, _app = await nursery.start(
                partial(run_server, settings, shutdown, data_lock=data_lock)
            )
            nursery.start_soon(steward)
            for bind in binds:
                print(f"musicsync listening on {bind}", flush=True)
            port = urlsplit(binds[0]).port or settings.port
            urls = Urls.for_bind(settings.host, port, tls=settings.tls)
            banner = startup_banner(urls, public_url=settings.public_url, qr=settings.print_qr)
            print(banner, end="", flush=True)
            log.info(
                "listening",
                extra={"url": urls.local, "lan_url": urls.lan, "version": __version__},
            )
            async for signum in signals:
                log.info(
                    "shutting down: telling clients to reconnect",
                    extra={"signal": signal.Signals(signum).name},
                )
                shutdown.set()
                gc_scope.cancel()
                break
    log.info("stopped")


def redis_problem(url: str) -> str | None:
    """None if the Redis at ``url`` answers; else why not, in one line."""
    try:
        from .cluster import probe
    except ImportError as exc:
        return f"--redis needs the coredis package ({exc}): pip install 'musicsync[redis]'"
    return trio.run(probe, url)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    for path in (settings.certfile, settings.keyfile):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    if settings.redis is not None:  # one clear line now rather than a failed startup later
        problem = redis_problem(settings.redis)
        if problem is not None:
            parser.exit(EXIT_REDIS_UNUSABLE, f"musicsync: {problem}\n")
    # Before anything else starts: a second server on the same data directory
    # stops here, with one line, and never touches the room database.
    try:
        data_lock = lock_data_dir(settings)
    except DataDirBusy as exc:  # SystemExit: the zipapp's __main__ ignores main()'s return
        parser.exit(EXIT_DATA_DIR_BUSY, f"musicsync: {exc}\n")
    except OSError as exc:
        parser.error(f"cannot use the data directory {settings.data_dir}: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    try:
        trio.run(serve_until_signalled, settings, data_lock)
    finally:
        data_lock.release()  # held for the process's life; exiting would drop it too
    return 0


if __name__ == "__main__":
    sys.exit(main())
