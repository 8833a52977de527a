"""docs/deploy.md's configs work: TOML, the systemd unit's command line, nginx, Caddy.

nginx, Caddy and systemd-analyze are not CI dependencies: those checks run
where the tools are installed and are skipped elsewhere.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from musicsync.cli import build_parser
from musicsync.config import resolve_settings

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DEPLOY.read_text(encoding="utf-8"), re.M | re.S)


def the_block(lang: str) -> str:
    found = blocks(lang)
    assert len(found) == 1, f"expected one ```{lang} block in deploy.md"
    return found[0]


def test_toml_example_resolves(tmp_path: Path) -> None:
    toml = tmp_path / "musicsync.toml"
    toml.write_text(the_block("toml"))
    s = resolve_settings({}, {}, toml)
    assert s.public_url == "https://music.example.com"
    assert (s.proxy_hops, s.log_format, s.print_qr) == (1, "json", False)


def test_systemd_unit_command_line_parses() -> None:
    unit = the_block("ini")
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[1].endswith("musicsync.pyz")
    args = build_parser().parse_args(argv[2:])
    assert args.command == "serve" and str(args.config) == "/etc/musicsync/musicsync.toml"
    assert "KillSignal=SIGTERM" in unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "musicsync.service"
    unit.write_text(the_block("ini"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # it may grumble that /opt/musicsync/musicsync.pyz is not here; nothing else
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "musicsync.pyz" not in line and "/usr/bin/python3" not in line
    ]
    assert not problems, problems


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed")
    conf = the_block("nginx")
    for needed in (
        "proxy_set_header Upgrade $http_upgrade",
        "proxy_set_header Connection $connection_upgrade",
        "proxy_read_timeout",
        "proxy_send_timeout",
        "X-Forwarded-For",
    ):
        assert needed in conf
    leaf = trustme.CA().issue_cert("music.example.com")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
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
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr


def test_caddyfile_validates(tmp_path: Path) -> None:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy is not installed")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(the_block("caddy"))
    done = subprocess.run(
        [caddy, "validate", "--adapter", "caddyfile", "--config", str(caddyfile)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stdout + done.stderr
