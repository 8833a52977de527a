"""End-to-end: health, set_latency_offset and resync through a real server and real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from musicsync.health import HEALTH_PERIOD_MS
from musicsync.room import MIN_LEAD_MS

from .conftest import Peer, Server, connect

REPORT = {"drift_ms": 0.8, "rtt_ms": 12.0, "engine": "webaudio"}


async def frames_until_pong(peer: Peer) -> list[dict[str, Any]]:
    """Everything ``peer`` is sent up to the answer to a ping sent now."""
    await peer.send("ping", t0=1.0)
    seen = []
    while (msg := await peer.recv())["type"] != "pong":
        seen.append(msg)
    return seen


@asynccontextmanager
async def cohost_of(server: Server, host: Peer, name: str = "Cy") -> AsyncIterator[Peer]:
    await host.send("create_invite", role="cohost")
    invite = await host.expect("invite")
    async with connect(server, name=name, invite=invite["code"]) as cohost:
        assert cohost.welcome["you"]["role"] == "cohost"
        yield cohost


async def test_health_reaches_host_and_cohost_but_never_a_listener(server: Server) -> None:
    async with (
        connect(server, name="Host") as host,
        cohost_of(server, host) as cohost,
        connect(server, name="Lou") as lou,
    ):
        await lou.send(
            "report",
            **REPORT,
            offset_ms=-1500.5,
            output_latency_ms=21.3,
            latency_offset_ms=120,
            drift_ppm=2.5,
            browser="Chrome",
        )
        for lead in (host, cohost):
            health = await lead.expect("health")
            assert health["devices"] == [
                {
                    "id": lou.id,
                    "name": "Lou",
                    "engine": "webaudio",
                    "browser": "Chrome",
                    "drift_ms": 0.8,
                    "rtt_ms": 12.0,
                    "offset_ms": -1500.5,
                    "output_latency_ms": 21.3,
                    "latency_offset_ms": 120.0,
                    "drift_ppm": 2.5,
                    "age_ms": health["devices"][0]["age_ms"],
                }
            ]
            assert 0 <= health["devices"][0]["age_ms"] < 1000
            assert health["summary"] == {
                "devices": 3,
                "reporting": 1,
                "playing": 1,
                "p50_abs_drift_ms": 0.8,
                "p95_abs_drift_ms": 0.8,
                "worst_abs_drift_ms": 0.8,
            }
        # the listener's own report made a frame; it went to the leads only
        assert all(msg["type"] != "health" for msg in await frames_until_pong(lou))
        # a lead's report counts too; the frame follows within a period
        await host.send("report", drift_ms=None, rtt_ms=3.0)
        health = await host.expect("health", limit=HEALTH_PERIOD_MS / 1000 + 3)
        assert {d["id"] for d in health["devices"]} == {lou.id, host.id}
        assert health["summary"]["reporting"] == 2 and health["summary"]["playing"] == 1
        assert all(msg["type"] != "health" for msg in await frames_until_pong(lou))


async def test_reports_within_a_second_make_one_frame_and_the_timer_sends_the_rest(
    server: Server,
) -> None:
    async with connect(server, name="Host") as host:
        async with connect(server, name="Lou") as lou:
            await lou.send("report", **REPORT)
            first = await host.expect("health")
            started = trio.current_time()
            await lou.send("report", **{**REPORT, "drift_ms": 5.0})
            await lou.send("report", **{**REPORT, "drift_ms": 7.0})
            # no report follows: the hub's timer sends the newest one after the period
            second = await host.expect("health", limit=HEALTH_PERIOD_MS / 1000 + 3)
            assert trio.current_time() - started >= HEALTH_PERIOD_MS / 1000 * 0.9
            assert first["devices"][0]["drift_ms"] == 0.8
            assert second["devices"][0]["drift_ms"] == 7.0
            lou_id = lou.id
        # a device that left is gone from the next frame
        await host.send("report", **REPORT)
        third = await host.expect("health", limit=HEALTH_PERIOD_MS / 1000 + 3)
        assert [d["id"] for d in third["devices"]] == [host.id] != [lou_id]
        assert third["summary"]["devices"] == 1


async def test_set_latency_offset_reaches_the_target_and_stretches_the_lead(
    server: Server,
) -> None:
    async with (
        connect(server, name="Host") as host,
        cohost_of(server, host) as cohost,
        connect(server, name="Lou") as lou,
        connect(server, name="Max") as bystander,
    ):
        room = server.hub.rooms["main"].room
        assert room.lead_ms() == MIN_LEAD_MS
        await host.send("set_latency_offset", id=lou.id, offset_ms=800)
        assert (await lou.expect("latency_offset"))["offset_ms"] == 800.0
        assert room.lead_ms() == MIN_LEAD_MS + 800.0
        # play is scheduled far enough ahead for a device that plays 800 ms early
        await host.send("set_track", url="/media/a.mp3", duration=100)
        await host.expect_state(version=1)
        before = server.hub.clock.now_ms()
        await host.send("play")
        state = await lou.expect_state(version=2)
        assert state["start_at"] >= before + MIN_LEAD_MS + 800.0
        # a co-host may too; the device's own report then carries the value
        await cohost.send("set_latency_offset", id=lou.id, offset_ms=-300)
        assert (await lou.expect("latency_offset"))["offset_ms"] == -300.0
        await lou.send("report", **REPORT, latency_offset_ms=-300)
        health = await host.expect("health")
        assert health["devices"][0]["latency_offset_ms"] == -300.0
        assert room.lead_ms() == MIN_LEAD_MS
        # nobody else heard of it
        assert all(m["type"] != "latency_offset" for m in await frames_until_pong(bystander))
        assert all(m["type"] != "latency_offset" for m in await frames_until_pong(host))


async def test_resync_reaches_only_its_target(server: Server) -> None:
    async with (
        connect(server, name="Host") as host,
        connect(server, name="Lou") as lou,
        connect(server, name="Max") as bystander,
    ):
        await host.send("resync", id=lou.id)
        assert (await lou.expect("resync")) == {"type": "resync"}
        assert all(m["type"] != "resync" for m in await frames_until_pong(bystander))
        await host.send("resync", id=host.id)  # the host's own device too
        await host.expect("resync")


async def test_bad_tuning_is_refused_and_the_room_carries_on(server: Server) -> None:
    async with (
        connect(server, name="Host") as host,
        connect(server, name="Lou") as lou,
        connect(server, name="Max") as max_,
    ):
        room = server.hub.rooms["main"].room
        version = room.version
        await lou.send("set_latency_offset", id=max_.id, offset_ms=100)
        await lou.expect_error("not_host")
        await lou.send("resync", id=host.id)
        await lou.expect_error("not_host")
        await host.send("set_latency_offset", id="nobody", offset_ms=100)
        await host.expect_error("no_such_participant")
        await host.send("resync", id="nobody")
        await host.expect_error("no_such_participant")
        for offset in (-301, 1000.5, "100", None, float("1e308")):
            await host.send("set_latency_offset", id=lou.id, offset_ms=offset)
            await host.expect_error("bad_message")
        await host.send("set_latency_offset", id=lou.id)
        await host.expect_error("bad_message")
        await host.send("resync")
        await host.expect_error("bad_message")
        for bad in ({"latency_offset_ms": 2000}, {"browser": "x" * 25}, {"drift_ppm": "1"}):
            await lou.send("report", **REPORT, **bad)
            await lou.expect_error("bad_message")
        assert room.version == version and room.lead_ms() == MIN_LEAD_MS
        assert all(
            m["type"] not in ("latency_offset", "resync") for m in await frames_until_pong(max_)
        )
        # everyone carries on
        await host.send("set_latency_offset", id=max_.id, offset_ms=40)
        assert (await max_.expect("latency_offset"))["offset_ms"] == 40.0
        await lou.send("report", **REPORT)
        assert (await host.expect("health"))["devices"][0]["id"] == lou.id
