"""Nodes killed with -9, Redis killed and restarted, and a --redis that cannot be used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed

from tests.cluster.conftest import (
    REPO,
    TEST_RESUME_GRACE,
    Cluster,
    RedisServer,
    clean_env,
    connect,
    free_port,
)
from tests.conftest import Peer

TRACK = "https://example.com/a.mp3"
# A killed node is known dead within its presence TTL (5 s) and a heartbeat
# (1 s); its clients' seats are then held for the resume grace; the issue's
# bound is 15 s past that.
DEATH_NOTICED_WITHIN = 15.0


async def test_the_hosts_node_dies_and_the_host_resumes_on_another(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="lis") as lis:
        you = host.welcome["you"]
        await host.send("set_track", url=TRACK, title="A", duration=600, autoplay=True)
        playing = await lis.expect_state(paused=False)
        a.kill()
        await a.proc.wait()
        async with connect(b, name="ignored", token=you["token"]) as back:
            me = back.welcome["you"]
            assert (me["id"], me["name"], me["role"]) == (you["id"], "host", "host")
            assert back.welcome["room"]["version"] == playing["version"]
            await back.send("pause")
            paused = await lis.expect_state(paused=True)
            assert paused["version"] == playing["version"] + 1


async def test_a_dead_nodes_host_leaves_and_a_new_host_is_elected(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, room="r2", name="host") as host, connect(b, room="r2", name="lis") as lis:
        host_id = host.welcome["you"]["id"]
        await host.expect_presence(lambda m: any(p["name"] == "lis" for p in m["joined"]))
        a.kill()
        killed = trio.current_time()
        promoted = {"id": lis.id, "role": "host"}
        left = False
        with trio.fail_after(DEATH_NOTICED_WITHIN + TEST_RESUME_GRACE):
            while True:
                msg = await lis.recv(limit=DEATH_NOTICED_WITHIN + TEST_RESUME_GRACE)
                if msg["type"] != "presence":
                    continue
                left = left or host_id in msg["left"]
                if promoted in msg["changed"]:
                    break
        assert left
        assert trio.current_time() - killed >= TEST_RESUME_GRACE
        await lis.send("volume", volume=0.3)  # the new host drives the room
        assert (await lis.expect_state(volume=0.3))["volume"] == 0.3


async def still_open(peer: Peer) -> bool:
    with trio.move_on_after(0.2):
        try:
            await peer.conn.get_message()
        except ConnectionClosed:
            return False
    return True


async def test_redis_killed_and_restarted_mid_song(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="lis") as lis:
        await host.send("set_track", url=TRACK, title="A", duration=600, autoplay=True)
        playing = await lis.expect_state(paused=False)
        await host.expect_state(paused=False)
        cluster.redis.kill()
        await host.send("pause")
        await host.expect_error("unavailable")
        assert await still_open(lis)  # still playing from the last timeline it has
        cluster.redis.start()  # the same directory: its AOF brings the rooms back
        with trio.fail_after(20):
            while True:
                await host.send("pause")
                msg = await host.recv()
                if msg["type"] == "state" and msg["room"]["paused"]:
                    break
                assert msg["type"] in ("error", "presence"), msg
                if msg["type"] == "error":
                    assert msg["code"] == "unavailable"
                    await trio.sleep(0.25)
        paused = await lis.expect_state(paused=True)
        assert paused["version"] == playing["version"] + 1  # no change lost, none doubled


def serve_with_redis(tmp_path: Path, url: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "musicsync", "serve", "--port", "0", "--no-demo"]
    cmd += ["--media", str(tmp_path / "media"), "--data", str(tmp_path / "data"), "--redis", url]
    return subprocess.run(
        cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60
    )


def test_unreachable_redis_is_a_clear_error_at_start(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = serve_with_redis(tmp_path, url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"musicsync: cannot reach Redis at {url}: "
        f"Unable to establish a connection to 127.0.0.1:{url.split(':')[2].split('/')[0]}"
    ]


def test_malformed_redis_url_is_a_clear_error_at_start(tmp_path: Path) -> None:
    for url, why in (
        ("http://127.0.0.1:6379", "must start with redis:// or rediss://"),
        ("redis://127.0.0.1:6379/99", "the database (path) must be a number from 0 to 15"),
        ("redis://", "names no host"),
    ):
        done = serve_with_redis(tmp_path, url)
        assert done.returncode == 2, done.stderr
        assert f"argument --redis: '{url}': {why}" in done.stderr.splitlines()[-1]


def test_the_redis_fixture_restarts_with_its_data(redis_server: RedisServer) -> None:
    redis_server.kill()
    redis_server.start()
