"""Settings from flags, MUSICSYNC_* variables and a TOML file, from one table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from musicsync.cli import build_parser, settings_from_args
from musicsync.config import (
    OPTIONS,
    ConfigError,
    Settings,
    resolve_settings,
)


def settings_for(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return settings_from_args(args, env or {})


def test_every_option_sets_a_settings_field_and_names_are_unique() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert all(o.field in fields for o in OPTIONS)
    for attr in ("name", "field", "env", "key"):
        values = [getattr(o, attr) for o in OPTIONS]
        assert len(values) == len(set(values)), attr
    assert all(o.env == "MUSICSYNC_" + o.key.upper() for o in OPTIONS)


def test_help_documents_every_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in OPTIONS:
        assert option.flag in text, option.flag
        assert option.env in text, option.env
    assert "--config" in text and "MUSICSYNC_CONFIG" in text


def test_defaults_without_any_source() -> None:
    s = settings_for([])
    assert s == Settings(media_dir=s.media_dir)
    assert (s.host, s.port, s.log_level, s.log_format, s.demo_tracks) == (
        "127.0.0.1",
        8000,
        "info",
        "text",
        True,
    )


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = tmp_path / "musicsync.toml"
    toml.write_text(
        'host = "0.0.0.0"\nport = 7000\nlog_level = "debug"\nmax_connections_per_ip = 5\n'
    )
    env = {"MUSICSYNC_CONFIG": str(toml), "MUSICSYNC_PORT": "7100", "MUSICSYNC_LOG_LEVEL": "error"}
    s = settings_for(["--port", "7200"], env)
    assert s.port == 7200  # flag beats env and file
    assert s.log_level == "error"  # env beats file
    assert s.host == "0.0.0.0"  # file beats default
    assert s.max_connections_per_ip == 5
    assert s.heartbeat_timeout == Settings().heartbeat_timeout  # default

    # --config beats MUSICSYNC_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("port = 7300\n")
    assert settings_for(["--config", str(other)], {"MUSICSYNC_CONFIG": str(toml)}).port == 7300


def test_every_option_from_each_source(tmp_path: Path) -> None:
    """Each option reaches its field from a flag, a variable and the file."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    samples: dict[str, tuple[str, object, object]] = {
        # name: (text for flag/env, TOML value, expected field value)
        "host": ("0.0.0.0", "0.0.0.0", "0.0.0.0"),
        "port": ("9123", 9123, 9123),
        "media": (str(tmp_path / "m"), str(tmp_path / "m"), tmp_path / "m"),
        "demo": ("false", False, False),
        "public-url": ("https://music.example/", "https://music.example", "https://music.example"),
        "certfile": (str(cert), str(cert), cert),
        "keyfile": (str(key), str(key), key),
        "log-level": ("warning", "warning", "warning"),
        "log-format": ("json", "json", "json"),
        "qr": ("no", False, False),
        "proxy-hops": ("1", 1, 1),
        "max-connections-per-ip": ("3", 3, 3),
        "heartbeat-timeout": ("12.5", 12.5, 12.5),
        "send-timeout": ("4", 4, 4.0),
        "outbox-max-frames": ("17", 17, 17),
        "room-idle-ttl": ("60", 60, 60.0),
        "resume-grace": ("9", 9.0, 9.0),
        "shutdown-grace": ("1.5", 1.5, 1.5),
    }
    known = {o.name: o for o in OPTIONS}
    assert set(samples) <= set(known)
    pair = {"certfile": "keyfile", "keyfile": "certfile"}
    for name, (text, toml_value, expected) in samples.items():
        option = known[name]
        extra_flags: list[str] = []
        extra_env: dict[str, str] = {}
        extra_toml = ""
        if name in pair:  # TLS needs both files
            extra_flags = [f"--{pair[name]}", str(tmp_path / "x.pem")]
            extra_env = {known[pair[name]].env: str(tmp_path / "x.pem")}
            extra_toml = f'{pair[name]} = "{tmp_path / "x.pem"}"\n'
        if option.kind == "bool":
            flag_args = [option.flag if text in ("true", "yes") else f"--no-{name}"]
        else:
            flag_args = [option.flag, text]
        by_flag = settings_for([*flag_args, *extra_flags])
        by_env = settings_for([], {option.env: text, **extra_env})
        toml = tmp_path / f"{name}.toml"
        value = toml_value if not isinstance(toml_value, str) else f'"{toml_value}"'
        value = str(value).lower() if isinstance(toml_value, bool) else value
        toml.write_text(f"{option.key} = {value}\n{extra_toml}")
        by_file = settings_for(["--config", str(toml)])
        for source, s in (("flag", by_flag), ("env", by_env), ("toml", by_file)):
            assert getattr(s, option.field) == expected, (name, source)


def test_old_no_demo_flag_and_env_booleans_still_work() -> None:
    assert settings_for(["--no-demo"]).demo_tracks is False
    assert settings_for([], {"MUSICSYNC_DEMO": "0"}).demo_tracks is False
    assert settings_for([], {"MUSICSYNC_QR": "off"}).print_qr is False
    assert settings_for(["--demo"], {"MUSICSYNC_DEMO": "0"}).demo_tracks is True


def test_relative_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    toml = tmp_path / "etc" / "musicsync.toml"
    toml.write_text('media = "tracks"\n')
    assert settings_for(["--config", str(toml)]).media_dir == tmp_path / "etc" / "tracks"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MUSICSYNC_PORT": "eighty"}, "MUSICSYNC_PORT"),
        ({"MUSICSYNC_PORT": "70000"}, "between 0 and 65535"),
        ({"MUSICSYNC_DEMO": "maybe"}, "MUSICSYNC_DEMO"),
        ({"MUSICSYNC_LOG_LEVEL": "chatty"}, "must be one of"),
        ({"MUSICSYNC_HEARTBEAT_TIMEOUT": "-1"}, "positive"),
        ({"MUSICSYNC_PUBLIC_URL": "ftp://x"}, "http"),
        ({"MUSICSYNC_CERTFILE": "/tmp/c.pem"}, "--certfile and --keyfile"),
    ],
)
def test_bad_environment_values_are_named(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve_settings({}, env)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("port = 'x'\n", "port must be a TOML int"),
        ("port = true\n", "port must be a TOML int"),
        ("demo = 'yes'\n", "demo must be a TOML bool"),
        ("porrt = 1\n", "unknown setting 'porrt'"),
        ("port = \n", "not valid TOML"),
        ("log_level = 'loud'\n", "must be one of"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, body: str, fragment: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(body)
    with pytest.raises(ConfigError, match=fragment):
        resolve_settings({}, {}, toml)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_settings({}, {"MUSICSYNC_CONFIG": str(tmp_path / "nope.toml")})


def test_bad_flag_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--port", "http"])
    assert info.value.code == 2
    assert "port" in capsys.readouterr().err


def test_from_env_is_what_hypercorn_app_uses(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text("room_idle_ttl = 42\n")
    s = Settings.from_env({"MUSICSYNC_CONFIG": str(toml), "MUSICSYNC_MEDIA": str(tmp_path)})
    assert (s.room_idle_ttl, s.media_dir) == (42.0, tmp_path)
