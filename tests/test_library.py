"""The media library: tags read from real files, caching, refresh and what is left out."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from musicsync.demo import DEMO_ALBUM, DEMO_ARTIST, DEMO_TRACKS, ensure_demo_tracks
from musicsync.library import Library, clean_text, title_from_filename, track_id

from . import audio_samples as audio
from .conftest import make_settings, open_server


def by_path(tracks: Any) -> dict[str, Any]:
    return {t.relpath: t for t in tracks}


async def get_json(url: str) -> Any:
    def fetch() -> Any:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        return response.json()

    return await trio.to_thread.run_sync(fetch)


async def test_reads_titles_artists_albums_and_durations(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(audio.wav(2.0, title="Wave Song", artist="W", album="WA"))
    (tmp_path / "b.flac").write_bytes(audio.flac(3.0, title="Flac Song", artist="F", album="FA"))
    (tmp_path / "c.mp3").write_bytes(audio.mp3(80, title="Mp3 Song", artist="M", album="MA"))
    (tmp_path / "d.opus").write_bytes(audio.opus(1.5, title="Opus Song", artist="O", album="OA"))
    (tmp_path / "e.m4a").write_bytes(audio.m4a(2.5, title="M4a Song", artist="E", album="EA"))
    tracks = by_path((await Library(tmp_path).listing()).tracks)
    assert set(tracks) == {"a.wav", "b.flac", "c.mp3", "d.opus", "e.m4a"}
    for path, title, artist, album, duration in [
        ("a.wav", "Wave Song", "W", "WA", 2.0),
        ("b.flac", "Flac Song", "F", "FA", 3.0),
        ("c.mp3", "Mp3 Song", "M", "MA", 80 * audio.MP3_FRAME_SECONDS),
        ("d.opus", "Opus Song", "O", "OA", 1.5),
        ("e.m4a", "M4a Song", "E", "EA", 2.5),
    ]:
        t = tracks[path]
        assert (t.title, t.artist, t.album) == (title, artist, album)
        assert t.duration == pytest.approx(duration, abs=0.05)
        assert t.size == (tmp_path / path).stat().st_size
        assert t.url == f"/media/{path}"
        assert t.id == track_id(path)


async def test_untagged_and_damaged_files_are_titled_from_their_names(tmp_path: Path) -> None:
    (tmp_path / "My_Song Name.wav").write_bytes(audio.wav(1.0))
    (tmp_path / "broken.mp3").write_bytes(b"ID3\x03\x00\x00\x7f\x7f\x7f\x7f garbage")
    (tmp_path / "empty.flac").write_bytes(b"")
    tracks = by_path((await Library(tmp_path).listing()).tracks)
    assert tracks["My_Song Name.wav"].title == "My Song Name"
    assert tracks["My_Song Name.wav"].duration == pytest.approx(1.0)
    assert tracks["broken.mp3"].title == "broken"
    assert tracks["empty.flac"].title == "empty"
    assert tracks["empty.flac"].duration is None
    assert tracks["empty.flac"].artist is None


async def test_demo_tracks_get_their_titles(tmp_path: Path) -> None:
    await trio.to_thread.run_sync(ensure_demo_tracks, tmp_path)
    tracks = by_path((await Library(tmp_path).listing()).tracks)
    assert {t.filename: t.title for t in DEMO_TRACKS} == {p: t.title for p, t in tracks.items()}
    assert all(t.duration and t.duration > 5 for t in tracks.values())
    # generated with tags; files from before that are titled by demo_title()
    assert {(t.artist, t.album) for t in tracks.values()} == {(DEMO_ARTIST, DEMO_ALBUM)}
    for demo in DEMO_TRACKS:
        (tmp_path / demo.filename).write_bytes(audio.wav(1.0))
    lib = Library(tmp_path)
    assert {t.title for t in (await lib.listing()).tracks} == {d.title for d in DEMO_TRACKS}


async def test_skips_hidden_non_audio_and_links_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "media"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / ".uploads").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(audio.wav(0.5))
    wav = audio.wav(0.5)
    (root / "sub" / "deeper" / "nested song.wav").write_bytes(wav)
    (root / ".hidden" / "h.wav").write_bytes(wav)
    (root / ".uploads" / "x.part").write_bytes(wav)
    (root / ".dot.wav").write_bytes(wav)
    (root / "notes.txt").write_text("not audio")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "link-out.wav").symlink_to(outside / "secret.wav")
    (root / "dir-out").symlink_to(outside, target_is_directory=True)
    (root / "link-in.wav").symlink_to(root / "sub" / "deeper" / "nested song.wav")
    (root / "sub" / "loop").symlink_to(root / "sub", target_is_directory=True)
    tracks = by_path((await Library(root).listing()).tracks)
    assert set(tracks) == {"sub/deeper/nested song.wav", "link-in.wav"}
    assert tracks["sub/deeper/nested song.wav"].url == "/media/sub/deeper/nested%20song.wav"
    assert not any("secret" in p or "dir-out" in p for p in tracks)


async def test_cache_reuses_tags_and_refreshes_on_change(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(audio.wav(1.0, title="One"))
    (tmp_path / "b.wav").write_bytes(audio.wav(1.0, title="Two"))
    lib = Library(tmp_path, refresh_interval=3600)
    first = await lib.listing()
    assert lib.tags_read == 2
    assert await lib.listing() is first  # within the interval: no walk at all
    lib.invalidate()
    again = await lib.listing()
    assert lib.tags_read == 2  # walked, but nothing changed: no file reopened
    assert again.generation == first.generation
    (tmp_path / "c.wav").write_bytes(audio.wav(1.0, title="Three"))
    (tmp_path / "a.wav").write_bytes(audio.wav(2.0, title="One, longer"))
    os.utime(tmp_path / "a.wav", ns=(time.time_ns(), time.time_ns() + 10**9))
    lib.invalidate()
    changed = await lib.listing()
    assert lib.tags_read == 4
    assert changed.generation == first.generation + 1
    assert [t.title for t in changed.tracks] == ["One, longer", "Two", "Three"]
    (tmp_path / "b.wav").unlink()
    lib.invalidate()
    assert [t.title for t in (await lib.listing()).tracks] == ["One, longer", "Three"]


async def test_refreshes_by_itself_after_the_interval(tmp_path: Path) -> None:
    lib = Library(tmp_path, refresh_interval=0.05)
    assert (await lib.listing()).tracks == ()
    (tmp_path / "new.wav").write_bytes(audio.wav(0.5))
    await trio.sleep(0.06)
    assert [t.relpath for t in (await lib.listing()).tracks] == ["new.wav"]


async def test_ids_are_stable_and_distinct(tmp_path: Path) -> None:
    assert track_id("a.wav") == track_id("a.wav")
    assert track_id("a.wav") != track_id("b.wav")
    assert len(track_id("x")) == 16


def test_clean_text_strips_controls_and_bidi() -> None:
    assert clean_text("  a\x00b\u202ec\n d  ") == "a b c d"
    assert clean_text("") is None
    assert clean_text(None) is None
    assert clean_text("x" * 1000, limit=10) == "x" * 10
    assert title_from_filename("Some_Track.mp3") == "Some Track"


async def test_api_library_over_http(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, demo_tracks=True)
    (settings.media_dir / "tagged.flac").write_bytes(audio.flac(2.0, title="T", artist="A"))
    async with open_server(settings) as server:
        body = await get_json(f"{server.http}/api/library")
        assert body["upload_max_bytes"] == settings.upload_max_bytes
        assert isinstance(body["generation"], int)
        tracks = {t["url"]: t for t in body["tracks"]}
        assert tracks["/media/tagged.flac"]["title"] == "T"
        assert tracks["/media/tagged.flac"]["artist"] == "A"
        assert tracks["/media/tagged.flac"]["duration"] == pytest.approx(2.0)
        for demo in DEMO_TRACKS:
            entry = tracks[f"/media/{demo.filename}"]
            assert entry["title"] == demo.title
            assert set(entry) == {"id", "url", "title", "artist", "album", "duration", "size"}
        # every listed URL is served
        for url in tracks:

            def fetch(u: str = url) -> int:
                return httpx.get(f"{server.http}{u}", timeout=10).status_code

            assert await trio.to_thread.run_sync(fetch) == 200


async def test_scan_of_many_files_is_quick(tmp_path: Path) -> None:
    """1000 tagged files: a cold scan reads every tag, a warm one only stats."""
    data = audio.wav(0.1, title="x", artist="y")
    for i in range(1000):
        (tmp_path / f"t{i:04}.wav").write_bytes(data)
    lib = Library(tmp_path)
    await lib.listing()
    cold = lib.last_scan_seconds
    lib.invalidate()
    listing = await lib.listing()
    warm = lib.last_scan_seconds
    assert len(listing.tracks) == 1000
    print(f"library scan of 1000 files: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms")
    assert lib.tags_read == 1000  # the warm scan opened no file
    assert cold < 10
    assert warm < 5


async def test_lookup_by_id_after_a_listing(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(audio.wav(1.0, title="A"))
    lib = Library(tmp_path)
    assert lib.lookup(track_id("a.wav")) is None  # nothing scanned yet
    await lib.refresh()
    found = lib.lookup(track_id("a.wav"))
    assert found is not None
    assert (found.url, found.title, found.duration) == ("/media/a.wav", "A", 1.0)
    assert lib.lookup("nope") is None
