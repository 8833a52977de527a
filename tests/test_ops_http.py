"""/metrics, /api/share and /api/qr.svg against a real server; LAN URL rules."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from musicsync.lan import Urls, origin_of, qr_svg, startup_banner

from .conftest import Server, connect, make_settings, open_server, open_ws

TRACK = "/media/song.mp3"


async def get(address: str, **params: str) -> httpx.Response:
    # (httpx replaces a query already in the URL with params, even empty ones)
    query = params or None
    return await trio.to_thread.run_sync(lambda: httpx.get(address, params=query, timeout=10))


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (fails if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{want}}} not in /metrics"
    return float(match.group(1))


async def scrape(server: Server) -> str:
    response = await get(server.http + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


# -- /metrics ------------------------------------------------------------------


async def test_metrics_count_connections_rooms_messages_and_errors(server: Server) -> None:
    async with connect(server, "r1", name="H") as host, connect(server, "r2"):
        await host.send("seek", position=-1)  # bad_message
        await host.expect_error("bad_message")
        await host.send("ping", t0=1)
        await host.expect("pong")
        text = await scrape(server)
        assert sample(text, "musicsync_connections") == 2
        assert sample(text, "musicsync_rooms") == 2
        assert sample(text, "musicsync_connections_accepted_total") == 2
        assert sample(text, "musicsync_messages_in_total") >= 2
        assert sample(text, "musicsync_messages_out_total") >= 3  # 2 welcomes, error, pong
        assert sample(text, "musicsync_errors_total", code="bad_message") == 1
    with trio.fail_after(5):
        while server.hub.connection_count:  # noqa: ASYNC110 - the server's bookkeeping
            await trio.sleep(0.01)
    text = await scrape(server)
    assert sample(text, "musicsync_connections") == 0
    assert sample(text, "musicsync_connections_accepted_total") == 2


async def test_metrics_show_the_sender_pool_and_the_room_writer(server: Server) -> None:
    hub = server.hub
    hub.senders.min_sockets = 2  # every broadcast to 2 sockets or more is shared
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        before = await scrape(server)
        assert sample(before, "musicsync_sender_threads") == hub.senders.threads
        await host.send("set_track", url=TRACK)
        await listener.expect_state(version=1)
        text = await scrape(server)
        shared = sample(text, "musicsync_shared_broadcasts_total") - sample(
            before, "musicsync_shared_broadcasts_total"
        )
        # the state (and any presence news) went to both through the threads;
        # with one core there are none, and the loop sends alone
        assert shared >= 1 if hub.senders.threads else shared == 0
        assert sample(text, "musicsync_shared_broadcast_misses_total") >= 0
        assert sample(text, "musicsync_states_coalesced_total") == 0  # every socket took it
        # the change was durable before it was broadcast: its row is counted
        assert sample(text, "musicsync_db_rows_total") > sample(before, "musicsync_db_rows_total")
        assert sample(text, "musicsync_db_batches_total") >= 1
        assert sample(text, "musicsync_db_failures_total") == 0


async def test_broadcast_latency_is_observed_per_state_frame_sent(server: Server) -> None:
    async with connect(server, name="H") as host, connect(server, name="L") as listener:
        before = sample(await scrape(server), "musicsync_broadcast_latency_seconds_count")
        await host.send("set_track", url=TRACK)
        await listener.expect_state(version=1)
        await host.expect_state(version=1)
        text = await scrape(server)
        # one state, two recipients whose sockets took it at once: one sample for
        # the broadcast (until the last socket had it); pongs and presence are not states
        assert sample(text, "musicsync_broadcast_latency_seconds_count") == before + 1
        total = sample(text, "musicsync_broadcast_latency_seconds_sum")
        assert 0 <= total < 1.0
        assert sample(text, "musicsync_broadcast_latency_seconds_bucket", le="+Inf") == before + 1


async def test_reports_feed_drift_and_rtt_histograms(server: Server) -> None:
    async with connect(server, name="L") as peer:
        await peer.send("report", drift_ms=-12.0, rtt_ms=40, offset_ms=3.5, engine="webaudio")
        await peer.send("report", drift_ms=3, rtt_ms=300, engine="element")
        await peer.send("report", drift_ms=0.5, rtt_ms=4)
        # no reply to a report (this host gets the room's health frame, not an answer)
        await peer.send("ping", t0=5)
        assert (await peer.recv())["type"] in ("pong", "presence", "health")
        text = await scrape(server)
    drift, rtt = "musicsync_client_drift_seconds", "musicsync_client_rtt_seconds"
    assert sample(text, drift + "_count", engine="webaudio") == 1
    assert sample(text, drift + "_sum", engine="webaudio") == pytest.approx(0.012)
    assert sample(text, drift + "_bucket", engine="webaudio", le="0.01") == 0
    assert sample(text, drift + "_bucket", engine="webaudio", le="0.02") == 1
    assert sample(text, rtt + "_sum", engine="element") == pytest.approx(0.3)
    assert sample(text, rtt + "_count", engine="unknown") == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"rtt_ms": 10},
        {"drift_ms": "1", "rtt_ms": 10},
        {"drift_ms": 1, "rtt_ms": -1},
        {"drift_ms": 1, "rtt_ms": 1, "engine": "flash"},
        {"drift_ms": 1, "rtt_ms": 1, "extra": 1},
    ],
)
async def test_bad_reports_are_bad_messages(server: Server, fields: dict[str, object]) -> None:
    async with connect(server) as peer:
        await peer.send("report", **fields)
        await peer.expect_error("bad_message")
    text = await scrape(server)
    assert sample(text, "musicsync_client_rtt_seconds_count", engine="unknown") == 0


async def test_reports_share_the_control_rate_limit(server: Server) -> None:
    async with connect(server) as peer:
        for _ in range(25):  # burst is 20
            await peer.send("report", drift_ms=1, rtt_ms=1)
        await peer.expect_error("rate_limited")


async def test_each_server_has_its_own_registry(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        open_server(make_settings(tmp_path / "a")) as a,
        open_server(make_settings(tmp_path / "b")) as b,
        connect(a),
        connect(a),
    ):
        assert sample(await scrape(a), "musicsync_connections") == 2
        assert sample(await scrape(b), "musicsync_connections") == 0


# -- /api/share and /api/qr.svg --------------------------------------------------


async def test_share_gives_room_link_lan_link_and_qr_url(server: Server) -> None:
    body = (await get(server.http + "/api/share", room="kitchen")).json()
    assert body["room"] == "kitchen"
    assert body["url"] == server.http + "/r/kitchen"
    assert body["lan_url"] is None  # bound to 127.0.0.1: no LAN device can reach it
    qr = body["qr_svg_url"]
    assert qr.startswith("/api/qr.svg?url=")
    assert parse_qs(urlsplit(qr).query)["url"] == [body["url"]]
    svg = await get(server.http + qr)
    assert svg.status_code == 200
    assert svg.headers["content-type"] == "image/svg+xml"
    assert svg.headers["x-content-type-options"] == "nosniff"
    assert svg.text.startswith("<svg") and svg.text.rstrip().endswith("</svg>")
    assert "kitchen" not in svg.text  # the URL is only in the code, never as markup

    main = (await get(server.http + "/api/share")).json()
    assert main["url"] == server.http + "/"


async def test_share_on_a_lan_bind_and_behind_a_proxy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, host="0.0.0.0", public_url="https://music.example")
    async with open_server(settings) as srv:
        port = urlsplit(srv.http).port
        local = f"http://127.0.0.1:{port}"
        body = (await get(local + "/api/share", room="den")).json()
        assert body["url"] == "https://music.example/r/den"
        lan = Urls.for_bind("0.0.0.0", port or 0).lan
        assert body["lan_url"] == (lan + "/r/den" if lan else None)
        target = parse_qs(urlsplit(body["qr_svg_url"]).query)["url"][0]
        assert target == "https://music.example/r/den"
        assert (await get(local + "/api/qr.svg", url=target)).status_code == 200
        if lan:
            assert (await get(local + "/api/qr.svg", url=lan + "/r/x")).status_code == 200


async def test_behind_a_trusted_proxy_forwarded_headers_count(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, proxy_hops=1, max_connections_per_ip=1, allowed_hosts=("music.example",)
    )
    async with open_server(settings) as srv:
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "music.example"}
        body = await trio.to_thread.run_sync(
            lambda: httpx.get(srv.http + "/api/share?room=x", headers=forwarded).json()
        )
        assert body["url"] == "https://music.example/r/x"

        def via(chain: str) -> list[tuple[bytes, bytes]]:
            return [(b"X-Forwarded-For", chain.encode())]

        # One connection per address: the proxy's own address does not count, and
        # only the hop the proxy appended is believed (not what the client claims).
        async with (
            open_ws(srv.ws_url(), extra_headers=via("10.0.0.1")) as a,
            open_ws(srv.ws_url(), extra_headers=via("10.0.0.2")) as b,
        ):
            for conn in (a, b):
                with trio.fail_after(5):
                    assert json.loads(await conn.get_message())["type"] == "welcome"
            async with open_ws(srv.ws_url(), extra_headers=via("6.6.6.6, 10.0.0.1")) as c:
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                    await c.get_message()
                assert info.value.reason.code == 4429


async def test_share_refuses_bad_room_names(server: Server) -> None:
    for room in ("", "a b", "x" * 65, "../etc"):
        response = await get(server.http + "/api/share", room=room)
        assert response.status_code == 400, room


@pytest.mark.parametrize(
    "url",
    [
        "",
        "https://evil.example/r/main",
        "http://127.0.0.1:1/r/main",  # right host, another port
        "javascript:alert(1)",
        "http://user:pw@127.0.0.1:{port}/",
        "http://127.0.0.1:{port}/a b",
        "http://127.0.0.1:{port}/" + "a" * 2100,
        "//127.0.0.1:{port}/",
    ],
    ids=["empty", "other", "port", "js", "creds", "space", "long", "relative"],
)
async def test_qr_only_for_this_servers_own_urls(server: Server, url: str) -> None:
    port = str(urlsplit(server.http).port)
    response = await get(server.http + "/api/qr.svg", url=url.replace("{port}", port))
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


async def test_qr_for_own_origin_and_localhost_alias(server: Server) -> None:
    port = urlsplit(server.http).port
    ok = await get(server.http + "/api/qr.svg?url=" + quote(server.http + "/r/a?x=1", safe=""))
    assert ok.status_code == 200
    # the Host header decides the origin a browser sees: localhost works via localhost
    via_localhost = f"http://localhost:{port}"
    response = await get(via_localhost + "/api/qr.svg", url=via_localhost + "/")
    assert response.status_code == 200


# -- units ---------------------------------------------------------------------


def test_urls_for_each_kind_of_bind() -> None:
    assert Urls.for_bind("127.0.0.1", 8000) == Urls("http://127.0.0.1:8000", None)
    assert Urls.for_bind("localhost", 80, tls=True) == Urls("https://localhost:80", None)
    assert Urls.for_bind("0.0.0.0", 8000, lan_ip="192.168.1.20") == Urls(
        "http://127.0.0.1:8000", "http://192.168.1.20:8000"
    )
    assert Urls.for_bind("::", 8443, tls=True, lan_ip="fd00::5") == Urls(
        "https://[::1]:8443", "https://[fd00::5]:8443"
    )
    assert Urls.for_bind("10.0.0.7", 9000) == Urls("http://10.0.0.7:9000", "http://10.0.0.7:9000")


def test_origin_of() -> None:
    assert origin_of("HTTP://Example.COM:80/x?y") == "http://example.com"
    assert origin_of("https://example.com:8443/") == "https://example.com:8443"
    assert origin_of("http://[::1]:8000/") == "http://[::1]:8000"
    for bad in ("ftp://x/", "http://", "http://u@x/", "http://x:99999/", "/relative"):
        assert origin_of(bad) is None, bad


def test_banner_prints_urls_and_a_qr_of_the_lan_url() -> None:
    lan = Urls("http://127.0.0.1:8000", "http://192.168.1.20:8000")
    text = startup_banner(lan)
    assert "http://127.0.0.1:8000" in text and "http://192.168.1.20:8000" in text
    assert "\u2588" in text or "\u2580" in text  # block characters of the code
    assert "\u2580" not in startup_banner(lan, qr=False)
    local_only = startup_banner(Urls("http://127.0.0.1:8000", None))
    assert "--host 0.0.0.0" in local_only
    assert "\u2580" not in local_only and "\u2584" not in local_only


def test_qr_svg_encodes_and_decodes_to_the_url() -> None:
    svg = qr_svg("http://192.168.1.20:8000/r/main").decode()
    assert svg.startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in svg
    assert "<script" not in svg
