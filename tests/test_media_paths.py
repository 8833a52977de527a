"""Mapping /media/ sub-paths to files inside the media root, safely."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from musicsync.media import content_type_for, resolve_media_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "song.mp3").write_bytes(b"ID3")
    (media / "album").mkdir()
    (media / "album" / "track 1.flac").write_bytes(b"fLaC")
    (media / ".hidden.mp3").write_bytes(b"x")
    (media / ".secret").mkdir()
    (media / ".secret" / "a.mp3").write_bytes(b"x")
    (tmp_path / "outside.mp3").write_bytes(b"outside")
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "b.mp3").write_bytes(b"outside")
    return media


def test_a_normal_file_resolves(root: Path) -> None:
    assert resolve_media_path(root, "song.mp3") == (root / "song.mp3").resolve()


def test_a_file_in_a_subdirectory_resolves(root: Path) -> None:
    assert resolve_media_path(root, "album/track 1.flac") == (root / "album/track 1.flac").resolve()


def test_root_given_as_a_relative_path(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root.parent)
    assert resolve_media_path(Path("media"), "song.mp3") == (root / "song.mp3").resolve()


@pytest.mark.parametrize(
    "subpath",
    [
        "",
        "missing.mp3",
        "../outside.mp3",
        "album/../../outside.mp3",
        "album/../song.mp3",  # even when it would stay inside
        "./song.mp3",
        "album/./track 1.flac",
        "..",
        "/etc/passwd",
        str(Path("/") / "etc" / "hostname"),
        "song.mp3\x00",
        "song.mp3\x00.txt",
        "album\\track 1.flac",
        "..\\outside.mp3",
        ".hidden.mp3",
        ".secret/a.mp3",
        "album/.hidden.mp3",
        "album//track 1.flac",
        "album/",
        "album",
        ".",
    ],
)
def test_refused_subpaths(root: Path, subpath: str) -> None:
    assert resolve_media_path(root, subpath) is None


def test_the_root_itself_is_not_a_file(root: Path) -> None:
    assert resolve_media_path(root, "album") is None


needs_symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges")


@needs_symlinks
def test_symlink_to_a_file_outside_the_root_is_refused(root: Path) -> None:
    (root / "escape.mp3").symlink_to(root.parent / "outside.mp3")
    assert resolve_media_path(root, "escape.mp3") is None


@needs_symlinks
def test_symlinked_directory_pointing_outside_is_refused(root: Path) -> None:
    (root / "linked").symlink_to(root.parent / "outside_dir", target_is_directory=True)
    assert resolve_media_path(root, "linked/b.mp3") is None


@needs_symlinks
def test_symlink_to_an_absolute_system_file_is_refused(root: Path) -> None:
    (root / "passwd.mp3").symlink_to("/etc/passwd")
    assert resolve_media_path(root, "passwd.mp3") is None


@needs_symlinks
def test_symlink_inside_the_root_is_followed(root: Path) -> None:
    (root / "alias.mp3").symlink_to(root / "album" / "track 1.flac")
    assert resolve_media_path(root, "alias.mp3") == (root / "album" / "track 1.flac").resolve()


@needs_symlinks
def test_dangling_and_looping_symlinks_are_refused(root: Path) -> None:
    (root / "dangling.mp3").symlink_to(root / "nowhere.mp3")
    (root / "loop1.mp3").symlink_to(root / "loop2.mp3")
    (root / "loop2.mp3").symlink_to(root / "loop1.mp3")
    assert resolve_media_path(root, "dangling.mp3") is None
    assert resolve_media_path(root, "loop1.mp3") is None


@needs_symlinks
def test_a_symlinked_root_still_works(root: Path) -> None:
    link = root.parent / "media_link"
    link.symlink_to(root, target_is_directory=True)
    assert resolve_media_path(link, "song.mp3") == (root / "song.mp3").resolve()
    assert resolve_media_path(link, "../outside.mp3") is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_not_a_regular_file(root: Path) -> None:
    os.mkfifo(root / "pipe.mp3")
    assert resolve_media_path(root, "pipe.mp3") is None


def test_a_missing_root_resolves_nothing(tmp_path: Path) -> None:
    assert resolve_media_path(tmp_path / "nope", "song.mp3") is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.mp3", "audio/mpeg"),
        ("a.MP3", "audio/mpeg"),
        ("a.ogg", "audio/ogg"),
        ("a.oga", "audio/ogg"),
        ("a.opus", "audio/ogg"),
        ("a.wav", "audio/wav"),
        ("a.m4a", "audio/mp4"),
        ("a.flac", "audio/flac"),
        ("a.webm", "audio/webm"),
        ("a.txt", "application/octet-stream"),
        ("noext", "application/octet-stream"),
    ],
)
def test_content_types(name: str, expected: str) -> None:
    assert content_type_for(Path(name)) == expected


# -- byte ranges (RFC 9110 14.1-14.2; issue 10) --------------------------------------

SIZE = 32_044  # the file of the issue


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, SIZE - 1),
        ("bytes=30000-35000", 30000, SIZE - 1),  # the end is capped at the last byte
        ("bytes=0-40000", 0, SIZE - 1),
        ("bytes=0-" + "1" + "0" * 24, 0, SIZE - 1),  # an end of 10^24
        ("bytes=0-" + "9" * 5000, 0, SIZE - 1),  # past int()'s digit limit
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),
        ("bytes=-500", SIZE - 500, SIZE - 1),
        ("bytes=-40000", 0, SIZE - 1),  # a suffix longer than the file: all of it
        ("BYTES=5-9", 5, 9),  # the unit is case-insensitive
        (" bytes=5-9 ", 5, 9),
        ("bytes=007-008", 7, 8),
    ],
)
def test_satisfiable_ranges(header: str, first: int, last: int) -> None:
    from musicsync.media import byte_range

    got = byte_range(header, SIZE)
    assert got is not None
    assert (got.first, got.last, got.size) == (first, last, SIZE)
    assert got.length == last - first + 1
    assert got.content_range == f"bytes {first}-{last}/{SIZE}"


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={SIZE}-",
        f"bytes={SIZE}-{SIZE + 10}",
        "bytes=40000-50000",
        "bytes=" + "1" + "0" * 24 + "-",  # a start of 10^24
        "bytes=-0",
    ],
)
def test_unsatisfiable_ranges_are_416(header: str) -> None:
    from musicsync.media import RangeNotSatisfiable, byte_range

    with pytest.raises(RangeNotSatisfiable) as info:
        byte_range(header, SIZE)
    assert info.value.content_range == f"bytes */{SIZE}"


def test_any_range_of_an_empty_file_is_416() -> None:
    from musicsync.media import RangeNotSatisfiable, byte_range

    for header in ("bytes=0-", "bytes=0-0", "bytes=-1"):
        with pytest.raises(RangeNotSatisfiable):
            byte_range(header, 0)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=-",
        "bytes=abc",
        "bytes=5-1",  # the end before the start: invalid, ignored
        "bytes=1-2-3",
        "bytes=0x10-20",
        "bytes=-1-2",
        "bytes=0-1,5-6",  # several ranges: the whole file (no multipart answers)
        "bytes=0-1, 40000-",
        "items=0-9",
        "bytes 0-9",
        "bytes=\u0661-\u0662",  # Arabic-Indic digits are digits to str.isdigit, not here
    ],
)
def test_ignored_range_headers_mean_the_whole_file(header: str | None) -> None:
    from musicsync.media import byte_range

    assert byte_range(header, SIZE) is None
