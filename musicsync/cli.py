"""The ``musicsync`` command line: ``serve`` under Hypercorn's trio worker."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

from . import __version__
from .config import DEFAULT_HOST, DEFAULT_PORT, Settings, default_data_dir

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musicsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"musicsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server", description="Run the musicsync server.")
    s.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 picks a free one)")
    s.add_argument(
        "--media",
        type=Path,
        default=default_data_dir() / "media",
        help="directory of tracks served under /media/ (default %(default)s)",
    )
    s.add_argument("--no-demo", action="store_true", help="do not generate the demo tracks")
    s.add_argument("--max-connections-per-ip", type=int, default=Settings.max_connections_per_ip)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.websocket_max_message_size = settings.max_frame_bytes
    config.websocket_ping_interval = settings.ws_ping_interval
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    return config


async def run_server(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[tuple[list[str], QuartTrio]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set; reports the bound URLs and the app."""
    from .app import create_app

    app = create_app(settings)
    config = hypercorn_config(settings)

    async def wait_for_shutdown() -> None:
        await shutdown.wait()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=wait_for_shutdown))
        task_status.started((binds, app))


async def serve_until_signalled(settings: Settings) -> None:
    """Serve, print where, and shut down cleanly on SIGINT or SIGTERM."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            binds, _app = await nursery.start(run_server, settings, shutdown)
            for bind in binds:
                print(f"musicsync listening on {bind}", flush=True)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                shutdown.set()
                break


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        host=args.host,
        port=args.port,
        media_dir=args.media,
        demo_tracks=not args.no_demo,
        max_connections_per_ip=args.max_connections_per_ip,
        log_level=args.log_level,
    )

    trio.run(serve_until_signalled, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
