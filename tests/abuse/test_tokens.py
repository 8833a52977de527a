"""Guessed, replayed and expired tokens and invites; wrong-password storms."""

from __future__ import annotations

import secrets
from collections import Counter
from urllib.parse import urlencode

import pytest
import trio

from musicsync import protocol
from musicsync.access import hash_token

from ..conftest import connect
from .conftest import Arena, RawWS, close_code_of


async def refused(arena: Arena, **query: str) -> tuple[str, int | None]:
    """Connect with ``query``; the error code and close code the server answers with."""
    target = f"/ws/main?{urlencode({'name': 'attacker', **query})}"
    async with RawWS.open(arena.server, target) as raw:  # cheap: the attacker shares our CPU
        out = await raw.outcome()
    assert [m["type"] for m in out.messages] == ["error"], out
    return out.messages[0]["code"], out.close_code


async def protect(arena: Arena) -> None:
    await arena.host_command("set_password", password="correct horse battery")


async def test_guessed_tokens_join_as_nobody_special(arena: Arena) -> None:
    async with arena.attack():
        for _ in range(20):
            guess = secrets.token_urlsafe(16)
            async with connect(arena.server, name="guesser", token=guess) as guesser:
                assert guesser.welcome["you"]["role"] == "listener"
                assert guesser.id not in (arena.host.id, arena.listener.id)
                assert guesser.welcome["you"]["token"] != guess  # a fresh secret, not the guess
                await guesser.send("pause")
                await guesser.expect_error("not_host")
        arena.note("20 random tokens: each joins as a new listener with a new token; no privilege")


async def test_guessed_token_in_a_protected_room(arena: Arena) -> None:
    await protect(arena)
    async with arena.attack():
        for _ in range(5):
            assert await refused(arena, token=secrets.token_urlsafe(16)) == (
                "password_required",
                4401,
            )
        arena.note("5 random tokens: password_required, close 4401")


async def test_replayed_token_of_a_live_participant_takes_the_seat(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="victim") as victim:
        token = victim.welcome["you"]["token"]
        async with connect(arena.server, name="replayer", token=token) as replayer:
            # documented: a second tab takes the seat over, the older one is closed 4409
            assert replayer.id == victim.id
            assert replayer.welcome["you"]["role"] == "listener"
            assert replayer.welcome["you"]["name"] == "victim"
            code, _ = await close_code_of(victim.conn)
            assert code == 4409
            await replayer.send("seek", position=1)
            await replayer.expect_error("not_host")  # the seat's role, nothing more
        arena.note("welcome as the victim (same id, role listener); victim closed 4409")


async def test_replayed_token_after_its_seat_expired(arena: Arena) -> None:
    async with arena.attack():
        async with connect(arena.server, name="victim") as victim:
            token = victim.welcome["you"]["token"]
            victim_id = victim.id
        room = arena.server.hub.rooms["main"].room
        # the seat is held for the resume grace; end it now, as 30 s would
        room._reserved[hash_token(token)].until = 0
        arena.server.hub.rooms["main"].wake()
        with trio.fail_after(2):
            while hash_token(token) in room._reserved:  # noqa: ASYNC110 - the room timer's work
                await trio.sleep(0.01)
        async with connect(arena.server, name="replayer", token=token) as replayer:
            assert replayer.id != victim_id
            assert replayer.welcome["you"]["token"] != token
        arena.note("after the 30 s grace: joins as someone new, with a new token")


async def test_kicked_token_is_refused(arena: Arena) -> None:
    async with arena.attack(), connect(arena.server, name="victim") as victim:
        token = victim.welcome["you"]["token"]
        await arena.host_command("kick", reply=None, id=victim.id)
        code, frames = await close_code_of(victim.conn)
        assert (frames[-1]["code"], code) == ("kicked", 4403)
        results = Counter([await refused(arena, token=token) for _ in range(10)])
        assert results == {("kicked", 4403): 10}
        arena.note("10 reconnects with a kicked token: error kicked, close 4403 each")


async def test_guessed_invites(arena: Arena) -> None:
    await protect(arena)
    async with arena.attack():
        for _ in range(10):
            result = await refused(arena, invite=secrets.token_urlsafe(16))
            assert result == ("password_required", 4401)
        arena.note("10 random invite codes in a protected room: password_required, close 4401")


async def test_replayed_invite_is_reusable_until_revoked(arena: Arena) -> None:
    await protect(arena)
    invite = await arena.host_command("create_invite", reply="invite", role="listener")
    async with arena.attack():
        for _ in range(3):  # documented: an invite admits until it expires or is revoked
            async with connect(arena.server, name="replay", invite=invite["code"]) as guest:
                assert guest.welcome["you"]["role"] == "listener"
        await arena.host_command("revoke_invite", reply="invite_revoked", code=invite["code"])
        for _ in range(3):
            assert await refused(arena, invite=invite["code"]) == ("password_required", 4401)
        arena.note("live invite replayed 3x: admitted as listener; once revoked: 4401")


async def test_expired_invite(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    await protect(arena)
    monkeypatch.setattr(protocol, "MIN_INVITE_SECONDS", 0.5)  # no minute-long wait
    invite = await arena.host_command("create_invite", reply="invite", role="cohost", expires_in=1)
    async with arena.attack():
        async with connect(arena.server, name="early", invite=invite["code"]) as guest:
            assert guest.welcome["you"]["role"] == "cohost"
        await trio.sleep(max(0.0, (invite["expires_at"] - arena.server.hub.clock.now_ms()) / 1000))
        for _ in range(5):
            assert await refused(arena, invite=invite["code"]) == ("password_required", 4401)
        arena.note("expired co-host invite, 5 tries: password_required, close 4401")


async def test_wrong_password_storm(arena: Arena) -> None:
    await protect(arena)
    async with arena.attack(peak_budget=8 * 1024 * 1024):
        results = Counter([await refused(arena, password=f"guess{i}") for i in range(15)])
        assert results == {("bad_password", 4401): 5, ("rate_limited", 4429): 10}
        # the right password is refused too, for now: it is the address that is limited
        assert await refused(arena, password="correct horse battery") == ("rate_limited", 4429)
        arena.note("15 guesses: bad_password/4401 x5, then rate_limited/4429 x10")


async def test_parallel_wrong_password_storm(arena: Arena) -> None:
    await protect(arena)
    results: list[tuple[str, int]] = []

    async def guess(i: int) -> None:
        results.append(await refused(arena, password=f"parallel{i}"))

    async with arena.attack():
        async with trio.open_nursery() as nursery:
            for i in range(25):
                nursery.start_soon(guess, i)
        counts = Counter(results)
        # at most the burst of 5 is ever hashed; the rest are refused before scrypt runs
        assert counts[("bad_password", 4401)] == 5
        assert counts[("rate_limited", 4429)] == 20
        arena.note("25 guesses at once: bad_password/4401 x5, rate_limited/4429 x20")
