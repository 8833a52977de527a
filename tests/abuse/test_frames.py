"""Hostile frames: floods, oversized and binary frames, invalid UTF-8, malformed framing."""

from __future__ import annotations

import json
import math
import os

import pytest
import trio

from musicsync.ratelimit import PING_BURST, PING_RATE_PER_SECOND

from ..conftest import connect, open_ws
from .conftest import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    Arena,
    RawWS,
    close_code_of,
    ws_frame,
)

PING = b'{"type":"ping","t0":1}'
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007  # text that is not UTF-8


def text(obj: dict[str, object]) -> bytes:
    return ws_frame(OP_TEXT, json.dumps(obj).encode())


def error_codes(messages: list[dict[str, object]]) -> list[object]:
    return [m["code"] for m in messages if m["type"] == "error"]


async def test_flood_of_control_messages(arena: Arena) -> None:
    async with arena.attack(), RawWS.open(arena.server) as raw:
        # a listener: what gets through the bucket is refused not_host
        out = await raw.flood(text({"type": "seek", "position": 1}))
        codes = error_codes(out.messages)
        assert out.close_code == 1008
        assert codes[:20] == ["not_host"] * 20
        assert codes[-40:] == ["rate_limited"] * 40
        n = codes.count("not_host")
        arena.note(f"200 seeks at once: not_host x{n}, rate_limited x{len(codes) - n}, close 1008")


async def test_flood_of_invalid_json(arena: Arena) -> None:
    async with arena.attack(), RawWS.open(arena.server) as raw:
        out = await raw.flood(ws_frame(OP_TEXT, b"not json {"))
        codes = error_codes(out.messages)
        assert out.close_code == 1008
        assert codes[:20] == ["bad_message"] * 20
        assert codes[-40:] == ["rate_limited"] * 40  # 40 refusals in a row: abuse
        n = codes.count("bad_message")
        arena.note(f"200 at once: bad_message x{n}, rate_limited x{len(codes) - n}, close 1008")


async def test_flood_of_pings(arena: Arena) -> None:
    """JSON pings past their budget, on and on: closed like any other flood."""
    async with arena.attack(), RawWS.open(arena.server) as raw:
        started = trio.current_time()
        out = await raw.flood(text({"type": "ping", "t0": 1}), batch=100)
        elapsed = trio.current_time() - started
        pongs = [m for m in out.messages if m["type"] == "pong"]
        codes = error_codes(out.messages)
        assert out.close_code == 1008
        # the burst, then 30/s until the close (later on a starved machine)
        allowed = int(PING_BURST) + math.ceil(PING_RATE_PER_SECOND * elapsed)
        assert PING_BURST <= len(pongs) <= allowed, (len(pongs), allowed, codes[-3:])
        assert codes[-1:] == ["rate_limited"], codes[-3:]
        arena.note(f"100 pings every 0.5 s: {len(pongs)} pongs in {elapsed:.1f} s, 1008")


async def test_flood_of_frames_in_one_write(arena: Arena) -> None:
    """1000 pings in one write: past the frame budget (240) at once: 1008, nothing else."""
    async with arena.attack(), RawWS.open(arena.server) as raw:
        sent_at = trio.current_time()
        await raw.send(b"".join(text({"type": "ping", "t0": i}) for i in range(1000)))
        out = await raw.outcome()
        elapsed = trio.current_time() - sent_at
        pongs = [m for m in out.messages if m["type"] == "pong"]
        assert out.close_code == 1008
        # The ping bucket's burst, plus what it refilled while the server read
        # the 240 frames its frame budget lets through (a loaded machine may
        # take tens of ms over them, so a 61st pong can be honest).
        allowed = int(PING_BURST) + math.ceil(PING_RATE_PER_SECOND * elapsed)
        assert len(pongs) <= allowed
        ms = elapsed * 1000
        arena.note(f"1000 pings in one write: {len(pongs)} pongs (≤ {allowed}, {ms:.0f} ms), 1008")


async def test_flood_of_binary_frames(arena: Arena) -> None:
    async with arena.attack(), RawWS.open(arena.server) as raw:
        out = await raw.flood(ws_frame(OP_BINARY, b"\x00" * 100))
        codes = error_codes(out.messages)
        assert out.close_code == 1008
        assert codes[:20] == ["binary_not_supported"] * 20
        assert codes[-40:] == ["rate_limited"] * 40
        n = codes.count("binary_not_supported")
        arena.note(f"200 at once: binary_not_supported x{n}, rate_limited x{len(codes) - n}, 1008")


async def test_churn_of_joins_and_leaves(arena: Arena) -> None:
    async with arena.attack():
        for i in range(50):
            async with RawWS.open(arena.server, f"/ws/main?name=churn{i}") as raw:
                assert (await raw.message())["you"]["role"] == "listener"
                await raw.send(ws_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
                assert (await raw.outcome()).close_code == 1000
        held = len(arena.server.hub.rooms["main"].room._reserved)
        arena.note(f"50 joins and leaves: each welcomed as a listener; {held} seats held 30 s")


async def test_oversized_frames(arena: Arena) -> None:
    codes = []
    async with arena.attack():
        for _ in range(20):
            async with connect(arena.server, name="big") as big:
                await big.send_raw('{"type":"ping","t0":1,"pad":"' + "x" * 17_000 + '"}')
                codes.append((await close_code_of(big.conn))[0])
        assert set(codes) == {1009}
        arena.note("20 connections, one 17 KB frame each: close 1009 each")


async def test_oversized_message_in_fragments(arena: Arena) -> None:
    async with arena.attack(), RawWS.open(arena.server) as raw:
        await raw.send(ws_frame(OP_TEXT, b'{"type":"ping","t0":1,"x":"' + b"a" * 8000, fin=False))
        await raw.send(ws_frame(OP_CONT, b"a" * 8000, fin=False))
        await raw.send(ws_frame(OP_CONT, b"a" * 8000 + b'"}'))
        out = await raw.outcome()
        assert out.close_code == 1009
        arena.note("three 8 KB fragments of one message: close 1009")


async def test_frame_declaring_a_huge_length(arena: Arena) -> None:
    async with arena.attack(), RawWS.open(arena.server) as raw:
        await raw.send(ws_frame(OP_TEXT, b"a" * 20_000, declared=1 << 40)[: 14 + 20_000])
        out = await raw.outcome()
        assert out.close_code == 1009
        arena.note("header says 1 TiB, 20 KB follow: close 1009 (nothing buffered beyond 16 KB)")


async def test_binary_frame(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="bin") as binary:
        await binary.send_raw(b"\x00\xff\xfe" * 100)
        await binary.expect_error("binary_not_supported")
        await binary.send("ping", t0=5)
        assert (await binary.expect("pong"))["t0"] == 5  # still open
        arena.note("binary frame: error binary_not_supported, stays open")


INVALID_UTF8 = {
    "lone_continuation_byte": [ws_frame(OP_TEXT, b'{"type":"ping","t0":1}\x80')],
    "overlong_encoding": [ws_frame(OP_TEXT, b'{"type":"ping","t0":1,"x":"\xc0\xaf"}')],
    "surrogate_code_point": [ws_frame(OP_TEXT, b'{"type":"ping","x":"\xed\xa0\x80"}')],
    "split_across_fragments": [
        ws_frame(OP_TEXT, b'{"type":"ping","t0":1,"x":"\xe2\x82', fin=False),
        ws_frame(OP_CONT, b'("}'),  # \xe2\x82 must be followed by a continuation byte
    ],
}


async def test_invalid_utf8_text_frames(arena: Arena) -> None:
    async with arena.attack():
        for frames in INVALID_UTF8.values():
            async with RawWS.open(arena.server) as raw:
                for frame in frames:
                    await raw.send(frame)
                out = await raw.outcome()
                # wsproto finds the bad UTF-8; the server says so (1007) and hangs up.
                assert out.close_code == INVALID_PAYLOAD
        arena.note(
            f"{len(INVALID_UTF8)} variants ({', '.join(INVALID_UTF8)}): close 1007, TCP closed"
        )


MALFORMED = {
    # wsproto's close reason would be 1002 (protocol error) for each
    "unmasked_client_frame": ws_frame(OP_TEXT, PING, masked=False),
    "reserved_bits_set": ws_frame(OP_TEXT, PING, rsv=0b100),
    "reserved_opcode": ws_frame(0x3, PING),
    "fragmented_control_frame": ws_frame(OP_PING, b"x", fin=False),
    "control_frame_over_125_bytes": ws_frame(OP_PING, b"x" * 200),
    "continuation_without_start": ws_frame(OP_CONT, PING),
}


async def test_malformed_framing(arena: Arena) -> None:
    async with arena.attack():
        for frame in MALFORMED.values():
            async with RawWS.open(arena.server) as raw:
                await raw.send(frame)
                out = await raw.outcome()
                assert out.close_code == PROTOCOL_ERROR, frame
        arena.note(f"{len(MALFORMED)} variants ({', '.join(MALFORMED)}): close 1002, TCP closed")


async def test_raw_client_is_a_real_websocket(arena: Arena) -> None:
    """The raw client itself is sound: a well-formed ping gets a pong."""
    async with RawWS.open(arena.server) as raw:
        await raw.send(ws_frame(OP_TEXT, PING))
        await raw.send(ws_frame(OP_BINARY, b"\x00"))
        async with open_ws(arena.server.ws_url(name="control")) as conn:
            assert json.loads(await conn.get_message())["type"] == "welcome"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))  # client and server share this process


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_flooders_that_leave_leave_nothing_behind(arena: Arena) -> None:
    async with arena.attack():
        before = open_fds()
        for _ in range(10):
            async with RawWS.open(arena.server) as raw:
                assert (await raw.flood(ws_frame(OP_TEXT, b"not json {"))).close_code == 1008
        # past the writer's close drain (5 s), so only a socket never closed counts
        with trio.move_on_after(8):
            while open_fds() > before:  # noqa: ASYNC110 - the kernel's bookkeeping
                await trio.sleep(0.05)
        leaked = open_fds() - before
        arena.note(f"10 flood-and-leave: close 1008 each; {leaked} server sockets left open")
        assert leaked <= 0
