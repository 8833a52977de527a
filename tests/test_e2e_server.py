"""End-to-end: a real Hypercorn server and real trio-websocket clients."""

from __future__ import annotations

import json
import resource
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from musicsync.protocol import MAX_FRAME_BYTES, Volume

from .conftest import Server, connect, make_settings, open_server, open_ws

TRACK = "/media/song.mp3"


def roles(msg: dict[str, object]) -> dict[str, str]:
    """Role updates in a presence delta: joined and changed are both upserts."""
    items = list(msg["joined"]) + list(msg["changed"])  # type: ignore[call-overload]
    return {x["id"]: x["role"] for x in items}


async def test_first_is_host_others_listen(server: Server) -> None:
    async with connect(server, name="Alice") as a, connect(server, name="Bob") as b:
        assert a.welcome["you"]["role"] == "host"
        assert b.welcome["you"]["role"] == "listener"
        assert b.welcome["you"]["name"] == "Bob"
        names = {p["name"]: p["role"] for p in b.welcome["participants"]}
        assert names == {"Alice": "host", "Bob": "listener"}
        await a.expect_presence(lambda m: m["count"] == 2)


async def test_listener_controls_are_refused_and_change_nothing(server: Server) -> None:
    async with connect(server, name="Host") as host, connect(server, name="L") as listener:
        for kind, fields in [
            ("play", {}),
            ("pause", {}),
            ("seek", {"position": 3}),
            ("volume", {"volume": 0.1}),
            ("set_track", {"url": TRACK}),
            ("transfer_host", {"to": listener.id}),
        ]:
            await listener.send(kind, **fields)
            await listener.expect_error("not_host")
        assert server.hub.rooms["main"].room.version == 0
        # the host still works
        await host.send("set_track", url=TRACK)
        state = await listener.expect_state(version=1)
        assert state["track"]["url"] == TRACK


@pytest.fixture
async def quick_grace_server(tmp_path: Path) -> AsyncIterator[Server]:
    """A server whose departed hosts' seats are held for only 0.2 s."""
    async with open_server(make_settings(tmp_path, resume_grace=0.2)) as srv:
        yield srv


async def test_transfer_and_host_disconnect_election(quick_grace_server: Server) -> None:
    server = quick_grace_server
    async with connect(server, name="A") as a:
        async with connect(server, name="B") as b, connect(server, name="C") as c:
            await a.send("transfer_host", to=b.id)
            msg = await c.expect_presence(lambda m: roles(m).get(b.id) == "host")
            assert roles(msg)[a.id] == "listener"
            await a.send("play")
            await a.expect_error("not_host")
            await b.send("set_track", url=TRACK)
            await c.expect_state(version=1)
            # C left; B (host) leaves next: A is the longest-connected remaining.
        msg = await a.expect_presence(lambda m: roles(m).get(a.id) == "host")
        assert msg["count"] == 1
        await a.send("play")
        state = await a.expect_state(paused=False)
        assert state["version"] == 2


async def test_host_disconnect_promotes_longest_connected(quick_grace_server: Server) -> None:
    server = quick_grace_server
    async with connect(server, name="B-first") as first, connect(server, name="Host2") as second:
        await first.send("transfer_host", to=second.id)
        await second.expect_presence(lambda m: roles(m).get(second.id) == "host")
        async with connect(server, name="Late") as late:
            await late.expect("presence")
            await second.conn.aclose()
            msg = await late.expect_presence(lambda m: second.id in m["left"])
            assert roles(msg) == {}  # the seat is held for the resume grace period
            msg = await late.expect_presence(lambda m: roles(m))
            assert roles(msg) == {first.id: "host"}


async def test_claim_host_refused_while_a_host_exists(server: Server) -> None:
    async with connect(server) as host, connect(server) as listener:
        await listener.send("claim_host")
        await listener.expect_error("host_exists")
        await host.send("transfer_host", to="nobody")
        await host.expect_error("no_such_participant")


async def test_late_joiner_snapshot(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L1"):
        await host.send("set_track", url=TRACK, title="Song", duration=200)
        await host.send("play", position=12.5)
        await host.send("volume", volume=0.5)
        state = await host.expect_state(version=3)
        async with connect(server, name="Late") as late:
            w = late.welcome
            assert w["room"] == state  # with the queue: a welcome always has it
            assert w["room_name"] == "main"
            assert w["you"]["role"] == "listener"
            assert len(w["participants"]) == 3
            assert abs(w["server_time"] - server.hub.clock.now_ms()) < 5_000
            assert 150 <= w["lead_ms"] <= 1000


async def test_changes_are_scheduled_in_the_future(server: Server) -> None:
    async with connect(server) as host:
        await host.send("set_track", url=TRACK, duration=100)
        await host.expect_state(version=1)
        before = server.hub.clock.now_ms()
        await host.send("play", position=10)
        state = await host.expect_state(version=2)
        assert state["start_at"] >= before + 150
        assert state["start_at"] <= server.hub.clock.now_ms() + 1000
        assert state["position"] == 10
        # a high reported RTT stretches the lead, bounded at 1 s
        await host.send("ping", t0=1.0, rtt=2_000)
        await host.expect("pong")
        before = server.hub.clock.now_ms()
        await host.send("seek", position=50)
        state = await host.expect_state(version=3)
        assert before + 990 <= state["start_at"] <= server.hub.clock.now_ms() + 1000


async def test_pong_timestamps(server: Server) -> None:
    async with connect(server) as peer:
        await peer.send("ping", t0=123.25)
        pong = await peer.expect("pong")
        assert pong["t0"] == 123.25
        assert pong["t1"] <= pong["t2"]
        assert abs(pong["t2"] - server.hub.clock.now_ms()) < 5_000


async def test_pings_are_not_rate_limited_below_20_per_second(server: Server) -> None:
    async with connect(server) as peer:
        for i in range(40):  # two seconds' worth at 20/s, sent at once
            await peer.send("ping", t0=float(i))
        seen = []
        for _ in range(40):
            msg = await peer.recv()
            assert msg["type"] == "pong", msg
            seen.append(msg["t0"])
        assert seen == [float(i) for i in range(40)]


BAD_FRAMES = [
    ("not json", "bad_message"),
    ("[1, 2]", "bad_message"),
    ('{"no": "type"}', "bad_message"),
    ('{"type": "explode"}', "bad_message"),
    ('{"type": "seek"}', "bad_message"),
    ('{"type": "seek", "position": "3"}', "bad_message"),
    ('{"type": "seek", "position": true}', "bad_message"),
    ('{"type": "seek", "position": NaN}', "bad_message"),
    ('{"type": "seek", "position": Infinity}', "bad_message"),
    ('{"type": "seek", "position": 1e999}', "bad_message"),
    ('{"type": "seek", "position": -1}', "bad_message"),
    ('{"type": "volume", "volume": 7}', "bad_message"),
    ('{"type": "play", "id": "forged-host-id"}', "bad_message"),
    ("[" * 5000 + "]" * 5000, "bad_message"),
    ('{"type": "seek", "position": 1' + "0" * 6000 + "}", "bad_message"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frames_get_typed_errors_and_keep_connection(
    server: Server, frame: str, code: str
) -> None:
    async with connect(server, name="H") as host, connect(server, name="Bystander") as other:
        await host.send_raw(frame)
        await host.expect_error(code)
        # nothing changed, and both connections carry on
        await host.send("set_track", url=TRACK)
        assert (await other.expect_state())["version"] == 1


async def test_binary_frame_is_refused(server: Server) -> None:
    async with connect(server) as host:
        await host.send_raw(b"\x00\xff\xfe")
        await host.expect_error("binary_not_supported")
        await host.send("pause")
        await host.send("ping", t0=1)
        await host.expect("pong")


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)//.mp3",
        "data:audio/mp3;base64,AAAA",
        "file:///etc/passwd.mp3",
        "ftp://example.com/a.mp3",
        "https://user:pw@example.com/a.mp3",
        "https://example.com/a.exe",
        "/static/a.mp3",
        "/media/../secret.mp3",
        "/media/%2e%2e/secret.mp3",
        "//evil.example/a.mp3",
        "https://example.com/" + "a" * 2100 + ".mp3",
        "https://example.com/a b.mp3",
    ],
)
async def test_hostile_urls_get_bad_url(server: Server, url: str) -> None:
    async with connect(server) as host:
        await host.send("set_track", url=url)
        await host.expect_error("bad_url")
        assert server.hub.rooms["main"].room.track is None


async def test_oversized_frame_closes_with_1009_others_unaffected(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="Big") as big:
        await big.send_raw('{"type":"ping","t0":1,"pad":"' + "x" * MAX_FRAME_BYTES + '"}')
        with pytest.raises(ConnectionClosed) as info:
            with trio.fail_after(5):
                while True:
                    await big.conn.get_message()
        assert info.value.reason.code == 1009
        await host.send("set_track", url=TRACK)
        await host.expect_state(version=1)


async def test_flood_is_rate_limited_then_closed_with_1008(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="Flood") as flood:
        codes: list[str] = []
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(80):  # burst 20, then 40 refusals in a row is abuse
                await flood.send("claim_host")
            with trio.fail_after(5):
                while True:
                    codes.append(json.loads(await flood.conn.get_message()).get("code"))
        # Hypercorn drops the TCP connection right after the close frame, so a
        # client still writing may see a reset (1006) instead of the 1008 frame.
        assert info.value.reason.code in (1008, 1006)
        with trio.fail_after(10):  # the server drains the peer's frames after its close
            while server.hub.stats.closes[1008] != 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert server.hub.stats.errors["rate_limited"] >= 40
        # the burst of 20 passes (plus what refills while the flood is read)
        assert server.hub.stats.errors["host_exists"] <= 30
        await host.send("set_track", url=TRACK)
        await host.expect_state(version=1)


async def test_flood_client_that_stops_reading_gets_1008_frame(server: Server) -> None:
    async with connect(server, name="Flood") as flood:
        await flood.send("ping", t0=0)
        await flood.expect("pong")
        # exactly enough to be judged abusive: 20 in the burst, then 40 refusals
        for _ in range(60):
            await flood.send("transfer_host", to="nobody")
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            while True:
                await flood.conn.get_message()
        assert info.value.reason.code == 1008


async def test_bad_room_name_is_closed_4400(server: Server) -> None:
    async with open_ws(server.ws + "/ws/" + "x" * 65) as conn:
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await conn.get_message()
        assert info.value.reason.code == 4400


async def test_connections_per_ip_are_capped(tmp_path: trio.Path) -> None:
    async with open_server(make_settings(tmp_path, max_connections_per_ip=2)) as srv:
        async with connect(srv), connect(srv), open_ws(srv.ws_url()) as conn:
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                await conn.get_message()
            assert info.value.reason.code == 4429
        async with connect(srv) as again:  # slots come back when clients leave
            assert again.welcome["type"] == "welcome"


async def test_rooms_are_separate(server: Server) -> None:
    async with connect(server, "room-a") as a, connect(server, "room-b") as b:
        assert a.welcome["you"]["role"] == "host"
        assert b.welcome["you"]["role"] == "host"
        await a.send("set_track", url=TRACK)
        await a.expect_state(version=1)
        assert server.hub.rooms["room-b"].room.version == 0


async def test_healthz_counts(server: Server) -> None:
    async with connect(server, "r1"), connect(server, "r2"), connect(server, "r2"):
        body = await trio.to_thread.run_sync(lambda: httpx.get(server.http + "/healthz").json())
        assert body["status"] == "ok"
        assert body["connections"] == 3
        assert body["rooms"] == 2


async def test_token_resume_keeps_id_name_and_host_role(server: Server) -> None:
    async with connect(server, name="Host") as host, connect(server, name="L") as listener:
        token = host.welcome["you"]["token"]
        assert len(token) >= 22  # 128 bits, url-safe base64
        assert "token" not in json.dumps(host.welcome["participants"])
        host_id = host.id
        await host.conn.aclose()
        await listener.expect_presence(lambda m: host_id in m["left"])
        # nobody may grab the role while the host's seat is held
        await listener.send("claim_host")
        await listener.expect_error("host_exists")
        await listener.send("play")
        await listener.expect_error("not_host")
        async with connect(server, name="ignored", token=token) as back:
            assert back.welcome["you"] == {
                "id": host_id,
                "name": "Host",
                "role": "host",
                "token": token,
            }
            await back.send("set_track", url=TRACK)
            await listener.expect_state(version=1)


async def test_unknown_token_joins_as_someone_new(server: Server) -> None:
    async with connect(server, name="H"), connect(server, name="X", token="guessed") as x:
        assert x.welcome["you"]["role"] == "listener"
        assert x.welcome["you"]["token"] != "guessed"


async def test_second_tab_with_same_token_replaces_the_first(server: Server) -> None:
    async with connect(server, name="H") as first:
        token = first.welcome["you"]["token"]
        async with connect(server, name="H2", token=token) as second:
            assert second.id == first.id
            assert second.welcome["you"]["role"] == "host"
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                while True:
                    await first.conn.get_message()
            assert info.value.reason.code == 4409
            await second.send("play")
            await second.expect_state(paused=False)


async def test_kick_closes_4403_and_bans_the_token(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="Pest") as pest:
        token = pest.welcome["you"]["token"]
        await pest.send("kick", id=host.id)
        await pest.expect_error("not_host")
        await host.send("kick", id=pest.id)
        await pest.expect_error("kicked")
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await pest.conn.get_message()
        assert info.value.reason.code == 4403
        await host.expect_presence(lambda m: pest.id in m["left"])
        async with open_ws(server.ws_url(token=token)) as again:
            frame = json.loads(await again.get_message())
            assert frame["code"] == "kicked"
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                await again.get_message()
            assert info.value.reason.code == 4403


async def test_room_settings_are_host_only_and_broadcast(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        await listener.send("room_settings", listeners_may_upload=True)
        await listener.expect_error("not_host")
        await host.send("room_settings", listeners_may_upload=True)
        state = await listener.expect_state(version=1)
        assert state["settings"] == {"listeners_may_upload": True, "protected": False}
        hub = server.hub
        participant = hub.participant_for_token("main", listener.welcome["you"]["token"])
        assert participant is not None and hub.may_upload("main", participant)
        assert hub.participant_for_token("main", "nope") is None


async def test_queue_is_live_for_everyone_and_advances_on_schedule(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        await host.send("queue_add", url="/media/a.wav", duration=0.5)
        await host.send("queue_add", url="/media/b.wav", duration=30)
        await host.send("queue_add", url="/media/c.wav", duration=30)
        state = await listener.expect_state(version=3)
        assert state["track"]["url"] == "/media/a.wav"
        assert [i["url"] for i in state["queue"]] == ["/media/b.wav", "/media/c.wav"]
        await listener.send("queue_next")
        await listener.expect_error("not_host")
        await host.send("queue_move", item=state["queue"][1]["id"], index=0)
        state = await listener.expect_state(version=4)
        assert [i["url"] for i in state["queue"]] == ["/media/c.wav", "/media/b.wav"]
        before = server.hub.clock.now_ms()
        await host.send("play")
        # a lasts 0.5 s, less than the advance notice, so the state that starts
        # c at a's end follows at once (and may replace the play state in a
        # listener's outbox: the newest state wins)
        nxt = await listener.expect_state(
            track={"url": "/media/c.wav", "title": "c", "duration": 30}
        )
        a_started = nxt["start_at"] - 500
        assert before + 150 <= a_started <= server.hub.clock.now_ms() + 150
        assert nxt["paused"] is False and nxt["position"] == 0
        assert [i["url"] for i in nxt["queue"]] == ["/media/b.wav"]


async def test_queue_add_by_library_id(server: Server) -> None:
    from musicsync.room import Track

    known = {"t-1": Track("/media/lib.ogg", "From the library", 12.0)}
    server.hub.track_lookup = known.get
    async with connect(server, name="H") as host:
        await host.send("queue_add", track_id="t-1")
        state = await host.expect_state(version=1)
        assert state["track"] == {
            "url": "/media/lib.ogg",
            "title": "From the library",
            "duration": 12.0,
        }
        await host.send("queue_add", track_id="nope")
        await host.expect_error("no_such_track")


async def test_a_playing_room_leaves_the_server_idle(server: Server) -> None:
    """A room playing a track of known length has a timer deadline (its end); the
    room timer must sleep until then, not spin. It once woke itself through its
    own poll, forever, and took a whole core for as long as anything played."""

    def cpu_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # client and server: one process
        return usage.ru_utime + usage.ru_stime

    async with connect(server, name="Host") as host:
        await host.send("set_track", url=TRACK, duration=600.0)
        await host.expect_state(version=1)
        await host.send("play")
        await host.expect_state(version=2)
        assert server.hub.rooms["main"].room.next_deadline() is not None
        wall_start, cpu_start = trio.current_time(), cpu_s()
        await trio.sleep(1.0)
        busy = (cpu_s() - cpu_start) / (trio.current_time() - wall_start)
        assert busy < 0.3, f"the server used {busy:.0%} of a core while one room just played"


async def test_states_carry_the_queue_only_to_clients_that_lack_it(server: Server) -> None:
    """A 1 MB queue is not resent with every volume change; a newcomer gets it once."""
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        await host.send("set_track", url=TRACK, title="Now", duration=200)
        await listener.expect_state(version=1)
        await host.send("queue_add", url="/media/b.wav", title="B")
        queued = await listener.expect_state(version=2)
        assert [item["title"] for item in queued["queue"]] == ["B"]
        await host.send("volume", volume=0.5)
        light = (await listener.expect("state"))["room"]
        assert "queue" not in light and light["volume"] == 0.5
        async with connect(server, name="Late") as late:
            assert [item["title"] for item in late.welcome["room"]["queue"]] == ["B"]
            await host.send("volume", volume=0.25)
            assert "queue" not in (await late.expect("state"))["room"]
            await host.send("queue_add", url="/media/c.wav", title="C")
            for peer in (listener, late):
                full = await peer.expect_state(version=5)
                assert [item["title"] for item in full["queue"]] == ["B", "C"]


async def test_a_broadcast_wakes_no_task_per_listener(server: Server) -> None:
    """Sockets that take the frame at once get it from the fan-out loop itself:
    no writer is woken. Only a client whose frames must queue wakes its writer."""
    async with AsyncExitStack() as stack:
        host = await stack.enter_async_context(connect(server, name="H"))
        peers = [await stack.enter_async_context(connect(server, name=f"L{i}")) for i in range(20)]
        await trio.sleep(0.2)  # presence settled; every writer asleep
        hub = server.hub
        entry = hub.rooms["main"]

        def change(volume: float) -> None:  # the hub's fan-out, synchronously
            hub._apply(entry, entry.room.handle(host.id, Volume(volume=volume), hub.clock.now_ms()))

        before = trio.lowlevel.current_statistics().tasks_runnable
        sent = hub.stats.messages_out
        change(0.5)
        woken = trio.lowlevel.current_statistics().tasks_runnable - before
        assert hub.stats.messages_out - sent == 21  # all written directly...
        assert woken == 0  # ...and nobody woken for it
        entry.clients[peers[0].id].sink = None  # as if its socket were full
        change(0.25)
        assert trio.lowlevel.current_statistics().tasks_runnable - before == 1  # its writer only
        for peer in peers:
            assert (await peer.expect_state(version=2))["volume"] == 0.25
