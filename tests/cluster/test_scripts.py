"""The cluster's Lua scripts against a real redis-server: compare-and-set, leases, reseed."""

from __future__ import annotations

from typing import Any

import trio

from musicsync.cluster import open_client
from musicsync.clusterproto import COMMIT_LUA, LEASE_LUA, RELEASE_LUA, RESEED_LUA, Keys
from tests.cluster.conftest import RedisServer

KEYS = Keys("t")


async def test_commit_compares_the_revision_and_publishes(redis_server: RedisServer) -> None:
    async with open_client(redis_server.url) as r:
        commit = r.register_script(COMMIT_LUA)
        keys = [KEYS.room("a"), KEYS.lease("a"), KEYS.turn("a")]
        async with r.pubsub(channels=[KEYS.channel], ignore_subscribe_messages=True) as sub:

            async def go(expected: int, value: str, token: str = "") -> Any:
                args = [expected, value, f"m{value}", token, 60_000, KEYS.channel, "n1", 60_000]
                return await commit(keys=keys, args=args)

            assert await go(0, "v1") == [1, 1]
            assert await go(1, "v2") == [1, 2]
            assert await go(1, "v3") == [0, 2, "v2"]  # lost the race: the winner's value
            got = []
            with trio.fail_after(5):
                async for message in sub:
                    got.append(message["data"])
                    if len(got) == 2:
                        break
            assert got == ["mv1", "mv2"]  # published once each; the lost race published nothing
            assert await r.hget(KEYS.room("a"), "value") == "v2"
            assert 0 < await r.pttl(KEYS.room("a")) <= 60_000
            # a timed change needs the lease token the room has now
            lease = r.register_script(LEASE_LUA)
            token = await lease(keys=[KEYS.lease("a"), KEYS.epoch("a")], args=["n1", 5000, ""])
            assert token == "n1:1"
            assert await go(2, "v3", "n1:0") == [-1, 2]
            assert await go(2, "v3", token) == [1, 3]


async def test_one_lease_holder_renewal_and_a_higher_epoch_after_it(
    redis_server: RedisServer,
) -> None:
    async with open_client(redis_server.url) as r:
        lease = r.register_script(LEASE_LUA)
        release = r.register_script(RELEASE_LUA)
        keys = [KEYS.lease("b"), KEYS.epoch("b")]
        first = await lease(keys=keys, args=["n1", 5000, ""])
        assert first == "n1:1"
        assert await lease(keys=keys, args=["n2", 5000, ""]) is None  # held
        assert await lease(keys=keys, args=["n1", 5000, first]) == first  # renewed
        assert await release(keys=keys[:1], args=["n2:9"]) == 0  # not its lease
        assert await release(keys=keys[:1], args=[first]) == 1
        assert await lease(keys=keys, args=["n2", 5000, ""]) == "n2:2"
        assert await lease(keys=keys, args=["n1", 5000, first]) is None  # stale holder


async def test_reseed_puts_back_a_lost_room_once(redis_server: RedisServer) -> None:
    async with open_client(redis_server.url) as r:
        reseed = r.register_script(RESEED_LUA)
        key = [KEYS.room("c")]
        assert await reseed(keys=key, args=[41, "mine", 60_000]) == [1, 41]
        assert await reseed(keys=key, args=[40, "theirs", 60_000]) == [0, 41, "mine"]


async def test_the_loser_of_a_race_has_the_next_turn(redis_server: RedisServer) -> None:
    async with open_client(redis_server.url) as r:
        commit = r.register_script(COMMIT_LUA)
        keys = [KEYS.room("t"), KEYS.lease("t"), KEYS.turn("t")]

        async def go(node: str, expected: int, value: str) -> Any:
            args = [expected, value, "m", "", 60_000, KEYS.channel, node, 60_000]
            return await commit(keys=keys, args=args)

        assert await go("fast", 0, "f1") == [1, 1]
        assert await go("slow", 0, "s1") == [0, 1, "f1"]  # lost: slow has the turn now
        assert await go("fast", 1, "f2") == [-2, 1]  # fast waits for slow's commit
        assert await go("fast", 1, "f2") == [-2, 1]
        assert await go("slow", 1, "s1") == [1, 2]  # slow's retry cannot be overtaken
        assert await go("fast", 1, "f2") == [0, 2, "s1"]  # now fast lost: its turn
        assert await r.get(KEYS.turn("t")) == "fast"
        assert 0 < await r.pttl(KEYS.turn("t")) <= 60_000
        release = r.register_script(RELEASE_LUA)
        assert await release(keys=[KEYS.turn("t")], args=["slow"]) == 0  # not slow's
        assert await release(keys=[KEYS.turn("t")], args=["fast"]) == 1
        assert await go("slow", 2, "s2") == [1, 3]
