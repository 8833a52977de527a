"""Several real nodes sharing rooms through a real redis-server."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed

from musicsync.app import create_app
from musicsync.datalock import LOCK_FILENAME
from tests.cluster.conftest import Cluster, RedisServer, connect
from tests.conftest import Peer, make_settings, open_ws

TRACK = "https://example.com/a.mp3"


async def test_two_nodes_share_one_room(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="lis") as lis:
        assert host.welcome["you"]["role"] == "host"
        assert lis.welcome["you"]["role"] == "listener"
        assert {p["name"] for p in lis.welcome["participants"]} == {"host", "lis"}
        await host.expect_presence(lambda m: any(p["name"] == "lis" for p in m["joined"]))
        await host.send("set_track", url=TRACK, title="A", duration=120)
        mine = await host.expect_state(paused=True)
        theirs = await lis.expect_state(paused=True)
        assert mine["version"] == theirs["version"] == lis.welcome["room"]["version"] + 1
        assert theirs["track"]["url"] == TRACK
        await host.send("play")
        v = (await lis.expect_state(paused=False))["version"]
        assert v == mine["version"] + 1
        with trio.fail_after(5):
            assert (await host.expect_state(paused=False))["version"] == v


async def test_three_nodes_same_state_versions_and_presence(cluster: Cluster) -> None:
    nodes = [await cluster.start_node() for _ in range(3)]
    async with (
        connect(nodes[0], name="host") as host,
        connect(nodes[1], name="b") as b,
        connect(nodes[2], name="c") as c,
    ):
        assert c.welcome["participant_count"] == 3
        assert {p["name"] for p in c.welcome["participants"]} == {"host", "b", "c"}
        await b.expect_presence(lambda m: any(p["name"] == "c" for p in m["joined"]))
        await host.send("set_track", url=TRACK, title="A", duration=120)
        await host.send("volume", volume=0.5)
        seen = [await peer.expect_state(volume=0.5) for peer in (host, b, c)]
        assert len({s["version"] for s in seen}) == 1
        assert seen[0]["version"] == c.welcome["room"]["version"] + 2


async def test_a_late_node_serves_the_room_as_it_is(cluster: Cluster) -> None:
    a = await cluster.start_node()
    async with connect(a, name="host") as host:
        await host.send("set_track", url=TRACK, title="A", duration=120, autoplay=True)
        playing = await host.expect_state(paused=False)
        late = await cluster.start_node()
        async with connect(late, name="late") as lis:
            room = lis.welcome["room"]
            assert room["version"] == playing["version"]
            assert room["track"]["url"] == TRACK and room["start_at"] == playing["start_at"]
            assert lis.welcome["you"]["role"] == "listener"
            await host.send("pause")
            assert (await lis.expect_state(paused=True))["version"] == playing["version"] + 1


async def test_concurrent_changes_from_two_nodes_never_fork(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    per_sender = 10
    async with connect(a, name="host") as host:
        await host.send("create_invite", role="cohost", expires_in=600)
        code = (await host.expect("invite"))["code"]
        async with (
            connect(b, name="co", invite=code) as co,
            connect(a, name="la") as la,
            connect(b, name="lb") as lb,
        ):
            assert co.welcome["you"]["role"] == "cohost"
            start = lb.welcome["room"]["version"]

            async def send_all(peer: object, base: float) -> None:
                for i in range(per_sender):
                    await peer.send("volume", volume=round(base + i / 100, 2))  # type: ignore[attr-defined]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all, host, 0.1)
                nursery.start_soon(send_all, co, 0.5)
            final = start + 2 * per_sender
            histories = []
            for listener in (la, lb):
                versions = []
                with trio.fail_after(10):
                    while not versions or versions[-1] < final:
                        versions.append((await listener.expect("state"))["room"]["version"])
                histories.append(versions)
            for versions in histories:  # one line of history, one step at a time
                assert versions == list(range(start + 1, final + 1)), versions


async def test_a_kick_on_one_node_closes_the_guest_on_another_and_bans_it_everywhere(
    cluster: Cluster,
) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="pest") as pest:
        token = pest.welcome["you"]["token"]
        await host.expect_presence(lambda m: any(p["name"] == "pest" for p in m["joined"]))
        await host.send("kick", id=pest.id)
        await pest.expect_error("kicked")
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await pest.conn.get_message()
        assert info.value.reason.code == 4403
        await host.expect_presence(lambda m: pest.id in m["left"])
        for node in (a, b):  # the ban is in the shared room: no node lets the token back
            async with open_ws(node.ws_url("main", "pest", token=token)) as again:
                assert json.loads(await again.get_message())["code"] == "kicked"
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                    await again.get_message()
                assert info.value.reason.code == 4403


async def test_two_nodes_on_one_machine_may_share_the_data_directory(
    cluster: Cluster, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-data"  # with --redis it holds nothing of theirs: no lock
    a = await cluster.start_node("--data", str(shared))
    b = await cluster.start_node("--data", str(shared))
    async with connect(a, name="host") as host, connect(b, name="lis") as lis:
        await host.send("volume", volume=0.3)
        assert (await lis.expect_state(volume=0.3))["volume"] == 0.3
    assert not (shared / "rooms.sqlite3").exists()


async def test_apps_under_hypercorn_with_redis_may_share_the_data_directory(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """``hypercorn -k trio musicsync.app:app`` takes the lock in the app: not with --redis."""
    settings = make_settings(tmp_path, redis=redis_server.url)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bases = [
            await nursery.start(
                partial(
                    hypercorn_serve, create_app(settings), config, shutdown_trigger=shutdown.wait
                )
            )
            for _ in range(2)
        ]
        assert not (settings.data_dir / LOCK_FILENAME).exists()
        a, b = (base[0].replace("http://", "ws://", 1) for base in bases)
        async with open_ws(f"{a}/ws/main?name=host") as h:
            host = Peer(h)
            # seated first: two joins racing on two nodes may seat either as the host
            assert (await host.expect("welcome"))["you"]["role"] == "host"
            async with open_ws(f"{b}/ws/main?name=lis") as li:
                lis = Peer(li)
                await lis.expect("welcome")
                await host.send("volume", volume=0.3)
                assert (await lis.expect_state(volume=0.3))["volume"] == 0.3
        shutdown.set()
