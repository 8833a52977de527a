"""Rooms survive restarts (SIGTERM, SIGKILL mid-song, a corrupt database); one server per data
directory."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from musicsync.cli import EXIT_DATA_DIR_BUSY
from musicsync.datalock import LOCK_FILENAME, DataDirBusy, DataDirLock
from musicsync.room import Room
from musicsync.store import DB_FILENAME, RoomStore

from .abuse.conftest import close_code_of
from .conftest import Server, connect, make_settings, open_server, open_ws

T0 = 1_800_000_000_000.0
START_TIMEOUT = 20.0


@asynccontextmanager
async def server_process(data: Path, media: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """A real ``musicsync serve`` process; yields it and its http URL."""
    cmd = [sys.executable, "-m", "musicsync", "serve", "--port", "0", "--no-demo"]
    cmd += ["--data", str(data), "--media", str(media), "--no-qr"]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        buffer = b""
        with trio.fail_after(START_TIMEOUT):
            while b"listening on http://" not in buffer:
                chunk = await proc.stdout.receive_some()
                assert chunk, "server exited before listening"
                buffer += chunk
        line = next(x for x in buffer.decode().splitlines() if "listening on http://" in x)
        yield proc, line.split("listening on ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def refused_start(data: Path, media: Path) -> tuple[int, str, float]:
    """Start ``musicsync serve`` expecting it to exit: (status, stderr, seconds)."""
    cmd = [sys.executable, "-m", "musicsync", "serve", "--port", "0", "--no-demo"]
    cmd += ["--data", str(data), "--media", str(media), "--no-qr"]
    start = trio.current_time()
    with trio.fail_after(START_TIMEOUT):
        done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stderr.decode(), trio.current_time() - start


def process_server(url: str, tmp: Path) -> Server:
    return Server(url, url.replace("http://", "ws://"), None, make_settings(tmp))  # type: ignore[arg-type]


async def test_snapshot_round_trip_keeps_timeline_queue_and_seats() -> None:
    from musicsync.protocol import Play, QueueAdd

    room = Room("main")
    room.join("h", "Host", T0, token="tok-h")
    room.join("l", "L", T0, token="tok-l")
    room.handle("h", QueueAdd(url="/media/a.mp3", duration=100), T0)
    room.handle("h", QueueAdd(url="/media/b.mp3", duration=100), T0)
    room.handle("h", Play(position=10), T0)
    again = Room.restore("main", room.snapshot(), T0 + 5_000)
    assert again.state() == room.state()
    assert again.position_at(T0 + 60_000) == room.position_at(T0 + 60_000)
    assert again.participants == {}
    effects = again.resume("tok-h", T0 + 6_000)
    assert effects is not None
    assert effects[0].payload["you"]["role"] == "host"  # type: ignore[union-attr]
    assert again.resume("tok-x", T0 + 6_000) is None


async def test_restart_brings_rooms_back_with_their_timeline(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with open_server(settings) as server, connect(server, "party", name="H") as host:
        token = host.welcome["you"]["token"]
        await host.send("set_track", url="/media/x.mp3", duration=600)
        await host.send("play", position=42)
        acknowledged = await host.expect_state(version=2)
    async with (
        open_server(settings) as server,
        connect(server, "party", name="someone", token=token) as back,
    ):
        assert back.welcome["room"] == acknowledged
        assert back.welcome["you"]["role"] == "host"
        assert back.welcome["you"]["name"] == "H"


async def test_sigkill_mid_song_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data, media = tmp_path / "data", tmp_path / "media"
    media.mkdir()
    async with server_process(data, media) as (proc, url):
        first = process_server(url, tmp_path)
        async with connect(first, "gig", name="H") as host, connect(first, "gig", name="L") as lis:
            token, listener_token = host.welcome["you"]["token"], lis.welcome["you"]["token"]
            await host.send("queue_add", url="/media/a.mp3", duration=300)
            await host.send("queue_add", url="/media/b.mp3", duration=300)
            await host.send("volume", volume=0.25)
            await host.send("play", position=30)
            acknowledged = await lis.expect_state(version=4)
            assert acknowledged["paused"] is False
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    async with server_process(data, media) as (proc, url):
        second = process_server(url, tmp_path)
        async with connect(second, "gig", name="x", token=listener_token) as lis:
            room = lis.welcome["room"]
            assert room == acknowledged  # same version, same start_at: no jump
            assert lis.welcome["you"]["role"] == "listener"
            async with connect(second, "gig", name="y", token=token) as host:
                assert host.welcome["you"]["role"] == "host"
                await host.send("pause")
                paused = await lis.expect_state(paused=True)
                # the position carried on from the old timeline, by the clock
                expect = room["position"] + (paused["start_at"] - room["start_at"]) / 1000
                assert abs(paused["position"] - expect) < 1e-6
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0


async def refused(server: Server, room: str, code: str, close: int, **query: str) -> None:
    async with open_ws(server.ws_url(room, "x", **query)) as conn:
        frame = json.loads(await conn.get_message())
        assert (frame["type"], frame["code"]) == ("error", code), frame
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await conn.get_message()
        assert info.value.reason.code == close


async def test_sigkill_keeps_invites_password_bans_and_settings(tmp_path: Path) -> None:
    """Issue 10, item 5: changes that are not broadcast as a state are durable too."""
    data, media = tmp_path / "data", tmp_path / "media"
    media.mkdir()
    async with server_process(data, media) as (proc, url):
        first = process_server(url, tmp_path)
        async with connect(first, "club", name="H") as host, connect(first, "club") as gone:
            banned_token = gone.welcome["you"]["token"]
            await host.send("set_password", password="pw")
            await host.expect_state(settings={"listeners_may_upload": False, "protected": True})
            await host.send("room_settings", listeners_may_upload=True)
            await host.expect_state(settings={"listeners_may_upload": True, "protected": True})
            await host.send("create_invite", role="listener", expires_in=3600)
            revoked = (await host.expect("invite"))["code"]
            await host.send("revoke_invite", code=revoked)
            await host.expect("invite_revoked")
            await host.send("create_invite", role="cohost", expires_in=3600)
            issued = (await host.expect("invite"))["code"]
            await host.send("kick", id=gone.id)  # acknowledged by the close
            await close_code_of(gone.conn)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    async with server_process(data, media) as (proc, url):
        second = process_server(url, tmp_path)
        await refused(second, "club", "password_required", 4401, invite=revoked)
        await refused(second, "club", "kicked", 4403, token=banned_token, password="pw")
        async with connect(second, "club", name="Co", invite=issued) as co:
            assert co.welcome["you"]["role"] == "cohost"
            assert co.welcome["room"]["settings"] == {
                "listeners_may_upload": True,
                "protected": True,
            }
        async with connect(second, "club", name="P", password="pw") as member:
            assert member.welcome["you"]["role"] == "listener"


async def test_corrupt_database_is_moved_aside_and_server_starts_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_FILENAME).write_bytes(b"this is not a database" * 1000)
    settings = make_settings(tmp_path)
    async with open_server(settings) as server, connect(server, name="H") as host:
        assert host.welcome["room"]["version"] == 0
    aside = [p.name for p in data.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1
    # the new database works
    store = RoomStore(data / DB_FILENAME)
    try:
        assert [name for name, _ in store.load_all()] == ["main"]
    finally:
        store.close()


async def test_unreadable_row_is_treated_as_corruption(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    RoomStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO rooms VALUES ('bad', 1, '{not json', 0)")
    store = RoomStore.open_or_reset(tmp_path)
    try:
        assert list(store.load_all()) == []
    finally:
        store.close()
    assert any(".corrupt-" in p.name for p in await trio.Path(tmp_path).iterdir())


async def test_schema_version_is_recorded(tmp_path: Path) -> None:
    from musicsync.store import SCHEMA_VERSION

    RoomStore(tmp_path / DB_FILENAME).close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def busy_message(data: Path, pid: int) -> str:
    return (
        f"musicsync: the data directory {data} is in use by another musicsync server "
        f"(PID {pid}); stop it or give this one another --data directory"
    )


async def test_second_server_on_a_data_directory_refuses_until_the_first_is_gone(
    tmp_path: Path,
) -> None:
    data, media = tmp_path / "data", tmp_path / "media"
    media.mkdir()
    async with server_process(data, media) as (first, url):
        code, err, took = await refused_start(data, media)
        assert code == EXIT_DATA_DIR_BUSY
        assert err.splitlines() == [busy_message(data, first.pid)]
        print(f"second server refused in {took:.2f} s (a whole Python start-up)")
        async with connect(process_server(url, tmp_path), "main") as peer:
            assert peer.welcome["type"] == "welcome"  # the first one is unharmed
        first.send_signal(signal.SIGKILL)  # the kernel drops a dead process's lock
        await first.wait()
    async with server_process(data, media) as (second, url):
        code, err, _ = await refused_start(data, media)
        assert (code, err.splitlines()) == (EXIT_DATA_DIR_BUSY, [busy_message(data, second.pid)])
        second.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await second.wait() == 0
    async with server_process(data, media) as (third, url):
        async with connect(process_server(url, tmp_path), "main") as peer:
            assert peer.welcome["type"] == "welcome"
        third.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await third.wait() == 0


async def test_a_server_in_this_process_takes_the_lock_and_gives_it_back(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with open_server(settings):
        assert (settings.data_dir / LOCK_FILENAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(DataDirBusy) as info:
            DataDirLock.acquire(settings.data_dir)
        assert info.value.pid == os.getpid()
        with pytest.RaisesGroup(DataDirBusy):  # a second server here is refused as well
            async with open_server(settings):
                pass
    lock = DataDirLock.acquire(settings.data_dir)  # released at shutdown
    try:
        with pytest.RaisesGroup(DataDirBusy):
            async with open_server(settings):
                pass
    finally:
        lock.release()
    assert (settings.data_dir / LOCK_FILENAME).read_text() == ""
    DataDirLock.acquire(settings.data_dir).release()


# -- issue 10: tokens are stored as hashes ----------------------------------------


def test_snapshot_holds_token_hashes_and_old_plain_snapshots_still_resume() -> None:
    import json

    from musicsync.access import hash_token
    from musicsync.protocol import Kick

    room = Room("main")
    room.join("h", "Host", T0, token="tok-h")
    room.join("l", "L", T0, token="tok-l")
    room.join("k", "K", T0, token="tok-k")
    room.handle("h", Kick(id="k"), T0)
    snap = room.snapshot()
    text = json.dumps(snap)
    assert "tok-" not in text  # not one token in plain form
    seats = snap["seats"]["seats"]
    assert {s["token_hash"] for s in seats} == {hash_token("tok-h"), hash_token("tok-l")}
    again = Room.restore("main", json.loads(text), T0 + 1_000)
    assert again.resume("tok-l", T0 + 2_000) is not None
    assert again.is_banned("tok-k", T0 + 2_000)
    # A database written before hashing (snapshot format 1, as tests/data holds one):
    # seats carry "token", bans are keyed by token.
    old = json.loads((Path(__file__).parent / "data" / "room_snapshot_v1.json").read_text())
    plain = {hash_token(t): t for t in ("tok-h", "tok-c", "tok-l", "tok-m", "tok-k")}
    for seat in old["seats"]:
        seat["token"] = plain[seat.pop("token_hash")]
    old["banned"] = {plain[k]: v for k, v in old.pop("banned_hashes").items()}
    restored = Room.restore("main", old, T0 + 1_000)
    assert "tok-" not in json.dumps(restored.snapshot())  # hashed on restore
    effects = restored.resume("tok-h", T0 + 2_000)
    assert effects is not None
    assert effects[0].payload["you"] == {  # type: ignore[union-attr]
        "id": "h",
        "name": "Host",
        "role": "host",
        "token": "tok-h",
    }
    assert restored.is_banned("tok-k", T0 + 2_000)
    assert not restored.holds_seat("tok-k")
    assert restored.resume("tok-x", T0 + 2_000) is None


async def test_the_database_file_holds_no_plain_token(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with open_server(settings) as server, connect(server, "vault", name="H") as host:
        token = host.welcome["you"]["token"]
        await host.send("volume", volume=0.5)
        await host.expect_state(volume=0.5)
        await server.hub.persist_all()
    raw = b"".join(p.read_bytes() for p in settings.data_dir.iterdir() if p.is_file())
    assert token.encode() not in raw
    async with open_server(settings) as server, connect(server, "vault", token=token) as back:
        assert back.welcome["you"]["role"] == "host"
        assert back.welcome["you"]["token"] == token
