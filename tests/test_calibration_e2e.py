"""End-to-end: calibrate, calibration_result and tick_mode through a real server and clients."""

from __future__ import annotations

from typing import Any

from musicsync.calibration import CALIBRATION_PREPARE_MS, CALIBRATION_SLOT_MS, TICK_PERIOD_MS
from musicsync.room import MIN_LEAD_MS

from .conftest import Peer, Server, connect
from .test_health_e2e import cohost_of, frames_until_pong


def heard(peer_a: str, delay: float | None, rounds: int = 3) -> dict[str, Any]:
    reason = None if delay is not None else "round 1: no clear peak (peak/noise 2.1 < 6)"
    spread = 0.4 if delay is not None else None
    return {
        "id": peer_a,
        "delay_ms": delay,
        "rounds": rounds,
        "spread_ms": spread,
        "reason": reason,
    }


async def no_frame_of(peer: Peer, kind: str) -> bool:
    return all(m["type"] != kind for m in await frames_until_pong(peer))


async def test_a_calibration_reaches_mic_devices_and_hosts_and_the_result_the_hosts(
    server: Server,
) -> None:
    async with (
        connect(server, name="Host") as host,
        cohost_of(server, host) as cohost,
        connect(server, name="Ann") as ann,
        connect(server, name="Phone") as phone,
    ):
        before = server.hub.clock.now_ms()
        await host.send("calibrate", mic=phone.id, devices=[ann.id, host.id])
        frames = [await peer.expect("calibration") for peer in (phone, ann, host, cohost)]
        assert all(f == frames[0] for f in frames)
        cal = frames[0]
        assert cal["mic"] == phone.id and cal["by"] == host.id
        assert cal["slots"] == {ann.id: 0, host.id: 1}
        assert cal["rounds"] == 3 and cal["slot_ms"] == CALIBRATION_SLOT_MS
        assert cal["start_at"] >= before + MIN_LEAD_MS + CALIBRATION_PREPARE_MS
        # only the measuring device's answer counts
        result = [heard(ann.id, 40.25), heard(host.id, None, 0)]
        await ann.send("calibration_result", id=cal["id"], devices=result)
        await ann.expect_error("no_such_calibration")
        await phone.send("calibration_result", id=cal["id"], devices=result)
        for lead in (host, cohost):
            got = await lead.expect("calibration_result")
            assert got == {
                "type": "calibration_result",
                "id": cal["id"],
                "from": phone.id,
                "devices": result,
            }
        assert await no_frame_of(ann, "calibration_result")
        # once
        await phone.send("calibration_result", id=cal["id"], devices=result)
        await phone.expect_error("no_such_calibration")


async def test_default_devices_are_everyone_but_the_microphone(server: Server) -> None:
    async with (
        connect(server, name="Host") as host,
        connect(server, name="Ann") as ann,
        connect(server, name="Phone") as phone,
    ):
        await host.send("calibrate", mic=phone.id, rounds=4)
        cal = await phone.expect("calibration")
        assert cal["slots"] == {host.id: 0, ann.id: 1} and cal["rounds"] == 4
        await ann.expect("calibration")


async def test_tick_mode_reaches_everyone(server: Server) -> None:
    async with (
        connect(server, name="Host") as host,
        cohost_of(server, host) as cohost,
        connect(server, name="Ann") as ann,
    ):
        await cohost.send("tick_mode", on=True)
        want = {"type": "ticks", "on": True, "by": cohost.id, "period_ms": TICK_PERIOD_MS}
        for peer in (host, cohost, ann):
            assert await peer.expect("ticks") == want
        async with connect(server, name="Late") as late:  # joins while they tick
            assert {"type": "ticks", **late.welcome["ticks"]} == want
        await host.send("tick_mode", on=False)
        for peer in (host, cohost, ann):
            assert (await peer.expect("ticks"))["on"] is False
        async with connect(server, name="Later") as later:
            assert later.welcome["ticks"] is None


async def test_bad_calibration_messages_are_refused_and_the_room_carries_on(
    server: Server,
) -> None:
    async with (
        connect(server, name="Host") as host,
        connect(server, name="Lou") as lou,
        connect(server, name="Phone") as phone,
    ):
        room = server.hub.rooms["main"].room
        await lou.send("calibrate", mic=phone.id)
        await lou.expect_error("not_host")
        await lou.send("tick_mode", on=True)
        await lou.expect_error("not_host")
        await host.send("calibrate", mic="nobody")
        await host.expect_error("no_such_participant")
        await host.send("calibrate", mic=phone.id, devices=[lou.id, "nobody"])
        await host.expect_error("no_such_participant")
        for bad in (
            {"mic": phone.id, "rounds": 9},
            {"mic": phone.id, "devices": []},
            {"mic": phone.id, "devices": [lou.id, lou.id]},
            {"mic": phone.id, "devices": [f"x{i}" for i in range(17)]},
            {"mic": None},
            {},
        ):
            await host.send("calibrate", **bad)
            await host.expect_error("bad_message")
        await host.send("tick_mode", on="yes")
        await host.expect_error("bad_message")
        await phone.send("calibration_result", id="cal-nothing", devices=[heard(lou.id, 1.0)])
        await phone.expect_error("no_such_calibration")
        await phone.send("calibration_result", id="c", devices=[{"id": lou.id}])
        await phone.expect_error("bad_message")
        assert room.calibration is None
        assert await no_frame_of(lou, "calibration")
        # everyone carries on: a good calibration and its result go through
        await host.send("calibrate", mic=phone.id)
        cal = await lou.expect("calibration")
        await phone.expect("calibration")
        await phone.send("calibration_result", id=cal["id"], devices=[heard(lou.id, 3.0)])
        got = await host.expect("calibration_result")
        assert got["devices"][0]["delay_ms"] == 3.0
