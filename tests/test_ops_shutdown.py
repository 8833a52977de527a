"""Shutdown: clients are told to reconnect (1001) and the process exits 0, promptly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from musicsync.hub import CLOSE_GOING_AWAY

from .conftest import Peer, connect, make_settings, open_server, open_ws

TRACK = "/media/song.mp3"


async def close_code_of(peer: Peer, limit: float = 5) -> tuple[int | None, str | None]:
    with pytest.raises(ConnectionClosed) as info, trio.fail_after(limit):
        while True:
            await peer.conn.get_message()
    reason = info.value.reason
    return (reason.code, reason.reason) if reason else (None, None)


async def test_hub_shutdown_tells_every_client_to_reconnect(tmp_path: Path) -> None:
    async with (
        open_server(make_settings(tmp_path)) as server,
        connect(server, "a", name="H") as host,
        connect(server, "b") as other,
    ):
        await host.send("set_track", url=TRACK)
        await host.expect_state(version=1)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.hub.shutdown)
            assert await close_code_of(host) == (CLOSE_GOING_AWAY, "server restarting")
            assert await close_code_of(other) == (CLOSE_GOING_AWAY, "server restarting")
        # returned as soon as the clients were gone, not after the grace period
        assert trio.current_time() - start < server.settings.shutdown_grace
        assert server.hub.connection_count == 0
        assert server.hub.stats.closes[CLOSE_GOING_AWAY] == 2
        # a client arriving during shutdown is told the same, without a welcome
        async with open_ws(server.ws_url("a")) as conn:
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                await conn.get_message()
            assert info.value.reason.code == CLOSE_GOING_AWAY


async def test_shutdown_gives_up_after_the_grace_period(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, shutdown_grace=0.2)
    async with open_server(settings) as server, connect(server):
        # a connection that never leaves (as if its writer were stuck)
        server.hub.per_ip["203.0.113.9"] += 1
        start = trio.current_time()
        await server.hub.shutdown()
        assert 0.2 <= trio.current_time() - start < 1.0
        server.hub.per_ip["203.0.113.9"] -= 1


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICSYNC_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    return env


async def read_until(
    stream: trio.abc.ReceiveStream, marker: bytes, limit: float = 20, *, last_line: bool = False
) -> bytes:
    """Read until ``marker`` has been seen (as the start of the last line if ``last_line``)."""
    seen = b""

    def done() -> bool:
        if not seen.endswith(b"\n"):
            return False
        if last_line:
            return seen.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(marker)
        return marker in seen

    with trio.fail_after(limit):
        while not done():
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"server exited before printing {marker!r}: {seen!r}")
            seen += chunk
    return seen


async def test_sigterm_subprocess_closes_1001_and_exits_0(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "musicsync", "serve", "--port", "0", "--no-demo"]
    cmd += ["--media", str(tmp_path / "media"), "--log-format", "json"]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(tmp_path)
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out = await read_until(proc.stdout, b"musicsync listening on ")
        line = next(x for x in out.decode().splitlines() if x.startswith("musicsync listening"))
        base = line.split(" on ", 1)[1].strip()
        assert base.startswith("http://127.0.0.1:")
        ws = base.replace("http://", "ws://", 1)
        async with (
            open_ws(ws + "/ws/main?name=a") as a,
            open_ws(ws + "/ws/other?name=b") as b,
        ):
            for conn in (a, b):
                with trio.fail_after(5):
                    assert json.loads(await conn.get_message())["type"] == "welcome"
            proc.send_signal(signal.SIGTERM)
            sent = trio.current_time()
            for conn in (a, b):
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                    while True:
                        await conn.get_message()
                assert info.value.reason.code == CLOSE_GOING_AWAY
        with trio.fail_after(5):
            code = await proc.wait()
        assert code == 0
        assert trio.current_time() - sent < 3.0
        err = b""
        while chunk := await proc.stderr.receive_some():
            err += chunk
        records = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
        messages = [r["msg"] for r in records]
        assert "listening" in messages
        assert any(m.startswith("shutting down") for m in messages)
        assert messages[-1] == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_startup_prints_local_and_lan_urls_and_qr(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "musicsync", "serve", "--host", "0.0.0.0", "--port", "0"]
    cmd += ["--no-demo", "--media", str(tmp_path / "media")]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=clean_env(tmp_path)
    )
    try:
        assert proc.stdout is not None
        from musicsync.lan import lan_address

        lan = lan_address()
        if lan:  # the QR code ends with a line of upper half blocks
            out = (await read_until(proc.stdout, ("\u2580" * 8).encode(), last_line=True)).decode()
        else:
            out = (await read_until(proc.stdout, b"--host")).decode()
        port = out.split("musicsync listening on http://0.0.0.0:", 1)[1].split()[0]
        assert f"http://127.0.0.1:{port}" in out
        if lan:
            assert f"on your LAN:  http://{lan}:{port}" in out
            assert "\u2588" in out  # the QR code's blocks
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
