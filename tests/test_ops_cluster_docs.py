"""docs/deploy.md's several-node configs work: nginx, Caddy, HAProxy, and the Redis settings.

The proxies are not CI dependencies: each check runs where its tool is
installed and is skipped elsewhere (as tests/test_ops_docs.py does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
NODES = ("127.0.0.1:8001", "127.0.0.1:8002")


def the_block(lang: str) -> str:
    found = re.findall(rf"^```{lang}\n(.*?)^```", DEPLOY.read_text(encoding="utf-8"), re.M | re.S)
    assert len(found) == 1, f"expected one ```{lang} block in deploy.md"
    return str(found[0])


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def test_every_proxy_balances_over_both_nodes() -> None:
    for lang in ("nginx-cluster", "caddy-cluster", "haproxy"):
        conf = the_block(lang)
        for node in NODES:
            assert node in conf, (lang, node)


def test_redis_settings_keep_rooms_across_a_restart() -> None:
    conf = dict(
        line.split(None, 1)
        for line in the_block("redis-conf").splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction"


def certificate(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("music.example.com")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_nginx_cluster_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = tool("nginx")
    conf = the_block("nginx-cluster")
    assert "proxy_set_header Upgrade $http_upgrade" in conf
    cert, key = certificate(tmp_path)
    live = "/etc/letsencrypt/live/music.example.com/"
    conf = conf.replace(live + "fullchain.pem", str(cert)).replace(live + "privkey.pem", str(key))
    (tmp_path / "musicsync.conf").write_text(conf)
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/logs/error.log;\n"
        f"events {{}}\nhttp {{\n    access_log off;\n    include {tmp_path}/musicsync.conf;\n}}\n"
    )
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_haproxy_config_passes_haproxy_c(tmp_path: Path) -> None:
    haproxy = tool("haproxy")
    cert, key = certificate(tmp_path)
    pem = tmp_path / "both.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    conf = the_block("haproxy").replace("/etc/haproxy/certs/music.example.com.pem", str(pem))
    (tmp_path / "haproxy.cfg").write_text(conf)
    done = subprocess.run(
        [haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


def test_caddy_cluster_config_validates(tmp_path: Path) -> None:
    caddy = tool("caddy")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(the_block("caddy-cluster"))
    done = subprocess.run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(caddyfile)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
