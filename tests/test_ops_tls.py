"""--certfile/--keyfile: HTTPS and WSS straight from Hypercorn, with a throwaway CA."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from musicsync.cli import main

from .conftest import make_settings, open_server, open_ws


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return cert, key


async def test_https_and_wss(ca: trustme.CA, cert_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = cert_files
    settings = make_settings(tmp_path, certfile=cert, keyfile=key)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with open_server(settings) as server:
        assert server.http.startswith("https://127.0.0.1:")
        page = await trio.to_thread.run_sync(
            lambda: httpx.get(server.http + "/", verify=client_ctx, timeout=10)
        )
        assert page.status_code == 200 and "<html" in page.text.lower()
        # plain HTTP on the TLS port is not served
        plain = server.http.replace("https://", "http://", 1)
        with pytest.raises(httpx.HTTPError):
            await trio.to_thread.run_sync(lambda: httpx.get(plain + "/healthz", timeout=5))
        wss = server.http.replace("https://", "wss://", 1) + "/ws/main?name=secure"
        async with open_ws(wss, ssl_context=client_ctx) as conn:
            with trio.fail_after(5):
                welcome = json.loads(await conn.get_message())
            assert welcome["type"] == "welcome"
            assert welcome["you"]["name"] == "secure"
        # the share link is https too
        share = await trio.to_thread.run_sync(
            lambda: httpx.get(server.http + "/api/share?room=x", verify=client_ctx, timeout=10)
        )
        assert share.json()["url"] == server.http + "/r/x"


async def test_untrusted_certificate_is_refused(
    cert_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = cert_files
    async with open_server(make_settings(tmp_path, certfile=cert, keyfile=key)) as server:
        with pytest.raises(httpx.ConnectError):
            await trio.to_thread.run_sync(lambda: httpx.get(server.http + "/", timeout=5))


def test_cli_refuses_half_a_tls_pair_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--certfile", str(tmp_path / "c.pem")])
    assert info.value.code == 2
    assert "--certfile and --keyfile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--certfile", str(tmp_path / "c.pem"), "--keyfile", str(tmp_path / "k")])
    assert info.value.code == 2
    assert "no such file" in capsys.readouterr().err
