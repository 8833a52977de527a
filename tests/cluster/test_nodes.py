"""Several real nodes sharing rooms through a real redis-server."""

from __future__ import annotations

import trio

from tests.cluster.conftest import Cluster, connect

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
