"""Hostile JSON: deep nesting, huge numbers, NaN and Infinity. Each gets bad_message, stays open."""

from __future__ import annotations

import pytest

from ..conftest import connect
from .conftest import Arena

NESTED_ARRAYS = "[" * 8000 + "]" * 8000  # 16,000 bytes: just under the frame cap
NESTED_OBJECTS = '{"a":' * 2700 + "1" + "}" * 2700
NESTED_IN_FIELD = '{"type":"report","rtt_ms":1,"drift_ms":' + "[" * 7000 + "]" * 7000 + "}"

NESTED = {
    "16 KB of nested arrays": NESTED_ARRAYS,
    "objects 2700 deep": NESTED_OBJECTS,
    "a nested value in a field": NESTED_IN_FIELD,
}
HUGE = {
    "an int of 6000 digits": '{"type":"ping","t0":1' + "0" * 6000 + "}",
    "an int past float range": '{"type":"ping","t0":1' + "0" * 400 + "}",
    "1e999": '{"type":"ping","t0":1e999}',
    "-1e400": '{"type":"report","drift_ms":-1e400,"rtt_ms":1}',
}
NON_FINITE = {
    "NaN": '{"type":"ping","t0":NaN}',
    "Infinity": '{"type":"ping","t0":Infinity}',
    "-Infinity": '{"type":"report","drift_ms":-Infinity,"rtt_ms":1}',
    "NaN rtt": '{"type":"ping","t0":1,"rtt":NaN}',
}


@pytest.mark.parametrize("frames", [NESTED, HUGE, NON_FINITE], ids=["nested", "huge", "nan_inf"])
async def test_hostile_json_gets_bad_message(arena: Arena, frames: dict[str, str]) -> None:
    async with arena.attack(), connect(arena.server, name="json") as attacker:
        for frame in frames.values():
            assert len(frame.encode()) <= 16 * 1024
            for _ in range(4):  # repeated, inside the rate limit's burst
                await attacker.send_raw(frame)
                await attacker.expect_error("bad_message")
        await attacker.send("ping", t0=7)
        assert (await attacker.expect("pong"))["t0"] == 7  # the connection stays open
        arena.note(f"{', '.join(frames)}; 4x each: bad_message each, connection stays open")


async def test_huge_but_finite_numbers_are_bounded(arena: Arena) -> None:
    """A listener's largest legal numbers: echoed or capped, never an overflow."""
    async with arena.attack(), connect(arena.server, name="big") as attacker:
        await attacker.send("ping", t0=1.7e308, rtt=1.7e308)
        assert (await attacker.expect("pong"))["t0"] == 1.7e308
        await attacker.send("report", drift_ms=-1.7e308, rtt_ms=1.7e308, offset_ms=1.7e308)
        await attacker.send("ping", t0=1)
        await attacker.expect("pong")
        room = arena.server.hub.rooms["main"].room
        assert room.lead_ms() == 1000.0  # the scheduling lead is capped at 1 s
        arena.note("ping t0/rtt 1.7e308 echoed; lead capped at 1000 ms; report accepted")
    # the attacker's RTT left with it
    assert arena.server.hub.rooms["main"].room.lead_ms() < 1000.0
