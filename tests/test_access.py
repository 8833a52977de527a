"""Access control end to end: passwords, invites, co-hosts, origins, headers, CORS, admin API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from musicsync.protocol import CreateInvite
from musicsync.room import COHOST, Room

from .conftest import Server, connect, make_settings, open_server, open_ws

ADMIN = "s3cret-admin-token-0123"
T0 = 1_800_000_000_000.0


async def refused(server: Server, code: str, close: int, **query: str) -> None:
    async with open_ws(server.ws_url(**query)) as conn:
        frame = json.loads(await conn.get_message())
        assert frame["type"] == "error" and frame["code"] == code, frame
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await conn.get_message()
        assert info.value.reason.code == close


async def http_get(url: str, **headers: str) -> httpx.Response:
    return await trio.to_thread.run_sync(lambda: httpx.get(url, headers=headers))


async def test_password_protects_the_room(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        await listener.send("set_password", password="pw")
        await listener.expect_error("not_host")
        await host.send("set_password", password="correct horse")
        state = await listener.expect_state(version=1)
        assert state["settings"]["protected"] is True
        assert "correct horse" not in json.dumps(state)
        await refused(server, "password_required", 4401)
        await refused(server, "bad_password", 4401, password="wrong")
        async with connect(server, name="N", password="correct horse") as newcomer:
            assert newcomer.welcome["you"]["role"] == "listener"
        # a seated participant's token gets back in without the password
        token = listener.welcome["you"]["token"]
        await listener.conn.aclose()
        async with connect(server, name="again", token=token) as back:
            assert back.id == listener.id
        await host.send("set_password", password=None)
        await host.expect_state(version=2)
        async with connect(server, name="free") as free:
            assert free.welcome["room"]["settings"]["protected"] is False


async def test_wrong_password_storm_is_rate_limited_per_address(server: Server) -> None:
    async with connect(server, name="H") as host:
        await host.send("set_password", password="pw")
        await host.expect_state(version=1)
        for _ in range(5):
            await refused(server, "bad_password", 4401, password="guess")
        await refused(server, "rate_limited", 4429, password="guess")
        await refused(server, "rate_limited", 4429, password="pw")  # even the right one, for now
        assert server.hub.stats.errors["bad_password"] == 5
        await host.send("ping", t0=1)
        assert (await host.expect("pong"))["t0"] == 1  # the room carries on


async def test_invites_bypass_the_password_and_grant_cohost(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        await host.send("set_password", password="pw")
        await listener.send("create_invite", role="cohost")
        await listener.expect_error("not_host")
        await host.send("create_invite", role="cohost", expires_in=3600)
        invite = await host.expect("invite")
        assert invite["role"] == "cohost"
        assert invite["url"] == f"/r/main?invite={invite['code']}"
        assert len(invite["code"]) >= 22
        async with connect(server, name="Co", invite=invite["code"]) as co:
            assert co.welcome["you"]["role"] == COHOST
            await co.send("set_track", url="/media/a.mp3")
            await listener.expect_state(
                track={"url": "/media/a.mp3", "title": "a", "duration": None}
            )
            for kind, fields in [
                ("set_password", {"password": "mine"}),
                ("kick", {"id": host.id}),
                ("transfer_host", {"to": co.id}),
                ("create_invite", {"role": "listener"}),
            ]:
                await co.send(kind, **fields)
                await co.expect_error("not_host")
        await host.send("revoke_invite", code=invite["code"])
        assert (await host.expect("invite_revoked"))["code"] == invite["code"]
        await refused(server, "password_required", 4401, invite=invite["code"])


async def test_invites_expire() -> None:
    room = Room("r", new_code=lambda: "code-1")
    room.join("h", "H", T0, token="t")
    (reply,) = room.handle("h", CreateInvite(role="listener", expires_in=60), T0)
    assert reply.payload["expires_at"] == T0 + 60_000  # type: ignore[union-attr]
    room.password_hash = "x"
    assert room.admission(T0 + 59_999, invite="code-1") == (True, "listener")
    assert room.admission(T0 + 60_000, invite="code-1") == (False, None)
    assert room.admission(T0, invite="guessed") == (False, None)


async def handshake_status(server: Server, origin: str) -> int:
    """The HTTP status a WebSocket upgrade from ``origin`` gets (by hand, with wsproto)."""
    host, port = server.http.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(
            host=f"{host}:{port}", target="/ws/main?name=x", extra_headers=[(b"origin", origin)]
        )
        await stream.send_all(ws.send(request))
        response = b""
        with trio.fail_after(5):
            while b"\r\n" not in response:
                response += await stream.receive_some()
    return int(response.split(b" ", 2)[1])


async def test_cross_origin_websocket_gets_403_before_upgrade(server: Server) -> None:
    assert await handshake_status(server, "https://evil.example") == 403
    assert await handshake_status(server, "null") == 403
    assert server.hub.connection_count == 0
    assert server.hub.stats.errors["bad_origin"] == 2
    same = server.http  # the page's own origin is fine
    async with open_ws(server.ws_url(), extra_headers=[("Origin", same)]) as conn:
        assert json.loads(await conn.get_message())["type"] == "welcome"


async def test_allowed_origin_setting(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_origins=("https://party.example",))
    async with open_server(settings) as server:
        headers = [("Origin", "https://party.example")]
        async with open_ws(server.ws_url(), extra_headers=headers) as conn:
            assert json.loads(await conn.get_message())["type"] == "welcome"


async def test_page_security_headers(server: Server) -> None:
    page = await http_get(server.http + "/r/test")
    csp = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    health = await http_get(server.http + "/healthz")
    assert health.headers["x-content-type-options"] == "nosniff"


async def test_cors_on_media_is_off_by_default_and_configurable(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.wav").write_bytes(b"RIFF0000WAVE")
    async with open_server(make_settings(tmp_path)) as server:
        r = await http_get(server.http + "/media/a.wav", Origin="https://other.example")
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    settings = make_settings(tmp_path, cors_origins=("https://other.example",))
    async with open_server(settings) as server:
        r = await http_get(server.http + "/media/a.wav", Origin="https://other.example")
        assert r.headers["access-control-allow-origin"] == "https://other.example"
        r = await http_get(server.http + "/media/a.wav", Origin="https://third.example")
        assert "access-control-allow-origin" not in r.headers


async def test_admin_api(tmp_path: Path) -> None:
    async with open_server(make_settings(tmp_path)) as server:
        assert (await http_get(server.http + "/api/admin/rooms")).status_code == 404
    async with open_server(make_settings(tmp_path, admin_token=ADMIN)) as server:
        url = server.http + "/api/admin/rooms"
        assert (await http_get(url)).status_code == 401
        assert (await http_get(url, Authorization="Bearer nope")).status_code == 401
        async with connect(server, "party", name="H") as host:
            body = (await http_get(url, Authorization=f"Bearer {ADMIN}")).json()
            assert [r["name"] for r in body["rooms"]] == ["party"]
            assert body["rooms"][0]["connections"] == 1
            close = server.http + "/api/admin/rooms/party/close"
            r = await trio.to_thread.run_sync(
                lambda: httpx.post(close, headers={"Authorization": f"Bearer {ADMIN}"})
            )
            assert r.json() == {"closed": "party", "disconnected": 1}
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                while True:
                    await host.conn.get_message()
            assert info.value.reason.code == 4410
        assert "party" not in server.hub.rooms


# -- issue 10: the Host header (DNS rebinding) ---------------------------------------

NAMES = frozenset({"localhost", "127.0.0.1", "::1", "music.example.org", "box.local"})


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8000",
        "LOCALHOST:8000",
        "localhost.:8000",  # one trailing dot
        "Music.Example.Org",
        "music.example.org.",
        "music.example.org:443",
        "box.local:8000",
        "[::1]:8000",
        "[::1]",
        "[0:0:0:0:0:0:0:1]:8000",  # the same address, written out
        "127.0.0.1:8000",
        "192.168.1.20:8000",  # any IP literal: rebinding needs a name
        "[fe80::1]:8000",
        "localhost:",  # an empty port is allowed by RFC 3986
        None,  # no Host header: no browser sent it
    ],
)
def test_host_allowed(host: str | None) -> None:
    from musicsync.access import host_allowed

    assert host_allowed(host, NAMES)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "music.example.org.evil.example",
        "127.0.0.1.nip.io",
        "music.example.org..",
        "",
        "   ",
        ":8000",
        "[::1",  # unclosed bracket
        "[::1]x",
        "[::1]:80a",
        "::1",  # IPv6 without brackets
        "localhost:8000:9000",
        "localhost:80a",
        "[localhost]:80",
        "local host",
        "music.example.org/x",
        "user@localhost",
        "localhost\x00",
        "xn--bcher-kva.example",
    ],
)
def test_host_refused(host: str) -> None:
    from musicsync.access import host_allowed

    assert not host_allowed(host, NAMES)


def test_allowed_host_names_collects_every_source() -> None:
    from musicsync.access import allowed_host_names

    names = allowed_host_names(
        bind_host="192.168.1.5",
        public_url="https://Music.Example.org./r/x",
        allowed_origins=("http://other.example:8080", "*", "not a url"),
        allowed_hosts=("extra.example.",),
        machine=("10.0.0.7", "fe80:0::1", "box", "box.local"),
    )
    assert names == {
        "localhost",
        "127.0.0.1",
        "::1",
        "192.168.1.5",
        "music.example.org",
        "other.example",
        "extra.example",
        "10.0.0.7",
        "fe80::1",
        "box",
        "box.local",
    }
    wildcard = allowed_host_names(
        bind_host="0.0.0.0", public_url=None, allowed_origins=(), allowed_hosts=(), machine=()
    )
    assert wildcard == {"localhost", "127.0.0.1", "::1"}


def test_the_running_server_knows_its_own_names(tmp_path: Path) -> None:
    import socket

    from musicsync.lan import allowed_hosts_for

    names = allowed_hosts_for("0.0.0.0", "https://music.example", (), ("extra.example",))
    hostname = socket.gethostname().lower()
    assert {"localhost", "127.0.0.1", "::1", "music.example", "extra.example"} <= names
    assert hostname in names and hostname.split(".")[0] + ".local" in names
    assert "0.0.0.0" not in names


async def test_a_foreign_host_gets_421_and_the_websocket_403_or_421(
    server: Server,
) -> None:
    names = server.app.extensions["musicsync_allowed_hosts"]
    assert isinstance(names, frozenset) and "localhost" in names
    page = await http_get(server.http + "/", Host="rebound.evil.example")
    assert page.status_code == 421
    assert page.json()["error"] == "misdirected"
    assert "Content-Security-Policy" not in page.headers  # not the page
    for path in ("/media/x.mp3", "/api/library", "/healthz", "/api/upload"):
        assert (await http_get(server.http + path, Host="evil.example:80")).status_code == 421
    assert (await http_get(server.http + "/", Host="localhost:1234")).status_code == 200
    host, port = server.http.removeprefix("http://").rsplit(":", 1)
    ws = WSConnection(ConnectionType.CLIENT)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(ws.send(Request(host="evil.example", target="/ws/main?name=x")))
        with trio.fail_after(5):
            answer = await stream.receive_some()
    assert answer.split(b" ", 2)[1] in (b"403", b"421"), answer[:40]


async def test_allowed_host_setting(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_hosts=("music.lan",))
    async with open_server(settings) as srv:
        assert (await http_get(srv.http + "/", Host="music.lan:8000")).status_code == 200
        assert (await http_get(srv.http + "/", Host="MUSIC.LAN.")).status_code == 200
        assert (await http_get(srv.http + "/", Host="other.lan")).status_code == 421
