"""The media library: the tracks under the media directory, with their tags, cached.

A scan is a stat walk of the directory tree: cheap, and it reuses the tags of
every file whose size and mtime have not changed, so only new or changed files
are opened and parsed (with tinytag). Scans run in a worker thread, at most one
at a time, and at most every ``refresh_interval`` seconds unless something
(an upload) invalidates the listing first. The same rules as ``/media/`` decide
what is listed: hidden files and directories are skipped, and so is anything
that resolves (through a symlink) to outside the media directory.

Uploads are recorded (name, size, time, room, address) in ``.uploads/uploads.json``,
so that the operator API can list them and delete them, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
from tinytag import TinyTag

from .demo import demo_title
from .media import AUDIO_CONTENT_TYPES, resolve_media_path

log = logging.getLogger(__name__)

REFRESH_INTERVAL = 3.0  # seconds between stat walks when nothing invalidated the listing
MAX_TRACKS = 20_000
MAX_DEPTH = 12
MAX_TAG_CHARS = 300
TRACK_ID_CHARS = 16
MAX_DURATION = 1e7  # seconds; anything longer is a misparse
UPLOADS_DIR = ".uploads"  # hidden: never listed, never served
TITLES_FILE = "titles.json"  # original names of uploads, for files without a title tag
UPLOADS_FILE = "uploads.json"  # every stored upload, for the operator API
# The names uploads are stored under (uploads.py): "<slug>-<8 hex>.<ext>", in the root.
UPLOAD_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{8}\.[a-z0-9]{2,5}")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(value: object, limit: int = MAX_TAG_CHARS) -> str | None:
    """A tag value fit for display: NFC, no control or bidi characters, trimmed."""
    if not isinstance(value, str):
        return None
    text = _CONTROL.sub(" ", unicodedata.normalize("NFC", value))
    text = " ".join(text.split())[:limit].strip()
    return text or None


def title_from_filename(name: str) -> str:
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return clean_text(stem.replace("_", " ")) or name


def track_id(relpath: str) -> str:
    """Stable per file: the same relative path always has the same id."""
    return hashlib.sha256(relpath.encode("utf-8", "surrogatepass")).hexdigest()[:TRACK_ID_CHARS]


@dataclass(frozen=True)
class LibraryTrack:
    id: str
    relpath: str
    title: str
    artist: str | None
    album: str | None
    duration: float | None
    size: int

    @property
    def url(self) -> str:
        return "/media/" + quote(self.relpath, safe="/")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "title": self.title,
            "artist": self.artist,
            "album": self.album,
            "duration": self.duration,
            "size": self.size,
        }


@dataclass(frozen=True)
class Listing:
    tracks: tuple[LibraryTrack, ...]
    generation: int

    @property
    def total_bytes(self) -> int:
        return sum(t.size for t in self.tracks)

    def to_json(self) -> dict[str, Any]:
        return {"tracks": [t.to_json() for t in self.tracks], "generation": self.generation}


@dataclass(frozen=True)
class Tags:
    """What a file's tags say, cleaned for display; all None when it has none."""

    title: str | None = None
    artist: str | None = None
    album: str | None = None
    duration: float | None = None

    @classmethod
    def from_tinytag(cls, tag: TinyTag | None) -> Tags:
        if tag is None:
            return cls()
        duration = tag.duration
        if duration is not None and not 0 < duration < MAX_DURATION:
            duration = None
        return cls(
            title=clean_text(tag.title),
            artist=clean_text(tag.artist),
            album=clean_text(tag.album),
            duration=round(duration, 3) if duration is not None else None,
        )


def read_tags(path: Path) -> Tags:
    try:
        return Tags.from_tinytag(TinyTag.get(path, image=False))
    except Exception as exc:  # a damaged file is still listed, titled from its name
        log.debug("no tags from %s: %s", path, exc)
        return Tags()


def describe(relpath: str, size: int, tags: Tags, fallback_title: str | None) -> LibraryTrack:
    """A library entry from a file's tags, else an upload's original name, else its name."""
    name = relpath.rsplit("/", 1)[-1]
    return LibraryTrack(
        id=track_id(relpath),
        relpath=relpath,
        title=tags.title or fallback_title or demo_title(name) or title_from_filename(name),
        artist=tags.artist,
        album=tags.album,
        duration=tags.duration,
        size=size,
    )


@dataclass(frozen=True)
class UploadRecord:
    """One stored upload: its file name in the library root, and where it came from."""

    name: str
    size: int
    uploaded_at: float  # epoch seconds
    room: str
    address: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "uploaded_at": self.uploaded_at,
            "room": self.room,
            "address": self.address,
        }

    @classmethod
    def from_json(cls, name: str, data: object) -> UploadRecord | None:
        if not isinstance(data, dict) or not UPLOAD_NAME.fullmatch(name):
            return None
        try:
            return cls(
                name,
                int(data["size"]),
                float(data["uploaded_at"]),
                str(data["room"]),
                str(data["address"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


class Library:
    """The tracks under ``root``, refreshed when files change."""

    def __init__(self, root: Path, refresh_interval: float = REFRESH_INTERVAL) -> None:
        self.root = root
        self.refresh_interval = refresh_interval
        self._lock = trio.Lock()
        self._listing = Listing((), 0)
        self._by_id: dict[str, LibraryTrack] = {}
        self._scanned_at: float | None = None
        # relpath -> ((mtime_ns, size), tags): lets a rescan skip unchanged files
        self._tags: dict[str, tuple[tuple[int, int], Tags]] = {}
        self._titles_lock = threading.Lock()
        self.last_scan_seconds = 0.0
        self.tags_read = 0

    @property
    def titles_path(self) -> Path:
        return self.root / UPLOADS_DIR / TITLES_FILE

    @property
    def uploads_path(self) -> Path:
        return self.root / UPLOADS_DIR / UPLOADS_FILE

    def invalidate(self) -> None:
        """Make the next ``listing`` rescan, whenever it comes."""
        self._scanned_at = None

    async def listing(self) -> Listing:
        async with self._lock:
            now = trio.current_time()
            if self._scanned_at is None or now - self._scanned_at >= self.refresh_interval:
                self._listing = await trio.to_thread.run_sync(self.scan)
                self._by_id = {t.id: t for t in self._listing.tracks}
                self._scanned_at = trio.current_time()
            return self._listing

    async def refresh(self) -> None:
        """Rescan now (after an upload, at start-up), so that ``lookup`` knows every file."""
        self.invalidate()
        await self.listing()

    def lookup(self, track_id: str) -> LibraryTrack | None:
        """The track with that id in the latest listing (no I/O: safe on the event loop)."""
        return self._by_id.get(track_id)

    # -- in a worker thread --------------------------------------------------

    def scan(self) -> Listing:
        """Walk the tree and build a fresh listing (blocking: call it in a thread)."""
        started = time.perf_counter()
        titles = self._load_titles()
        known: dict[str, tuple[tuple[int, int], Tags]] = {}
        tracks: list[LibraryTrack] = []
        for relpath, st in self._walk():
            key = (st.st_mtime_ns, st.st_size)
            cached = self._tags.get(relpath)
            if cached is not None and cached[0] == key:
                tags = cached[1]
            else:
                self.tags_read += 1
                tags = read_tags(self.root / relpath)
            known[relpath] = (key, tags)
            tracks.append(describe(relpath, st.st_size, tags, titles.get(relpath)))
            if len(tracks) >= MAX_TRACKS:
                log.warning("media library truncated at %d tracks", MAX_TRACKS)
                break
        self._tags = known
        tracks.sort(key=lambda t: (t.relpath.casefold(), t.relpath))
        previous = self._listing
        changed = tuple(tracks) != previous.tracks
        self.last_scan_seconds = time.perf_counter() - started
        return Listing(tuple(tracks), previous.generation + (1 if changed else 0))

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        base = self.root.resolve()
        seen_dirs: set[tuple[int, int]] = set()

        def walk(
            directory: Path, prefix: str, depth: int, via_link: bool
        ) -> Iterator[tuple[str, os.stat_result]]:
            try:
                st = directory.stat()
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                return
            if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
                return
            seen_dirs.add((st.st_dev, st.st_ino))
            for e in entries:
                if e.name.startswith("."):
                    continue
                relpath = prefix + e.name
                try:
                    linked = via_link or e.is_symlink()
                    if e.is_dir():
                        if depth < MAX_DEPTH and (not linked or _inside(Path(e.path), base)):
                            yield from walk(Path(e.path), relpath + "/", depth + 1, linked)
                        continue
                    if os.path.splitext(e.name)[1].lower() not in AUDIO_CONTENT_TYPES:
                        continue
                    if linked:
                        # the /media/ rules decide: a link out of the root is skipped
                        if resolve_media_path(base, relpath) is None:
                            continue
                    elif not e.is_file(follow_symlinks=False):
                        continue
                    yield relpath, e.stat()
                except OSError:
                    continue

        yield from walk(base, "", 0, False)

    def _load_titles(self) -> dict[str, str]:
        data = _read_json_dict(self.titles_path)
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def remember_title(self, relpath: str, title: str) -> None:
        """Keep an upload's original name as its fallback title (blocking)."""
        with self._titles_lock:
            titles = {k: v for k, v in self._load_titles().items() if (self.root / k).exists()}
            titles[relpath] = title
            _write_json(self.titles_path, titles)

    # -- the uploads record (blocking: in a worker thread) --------------------

    def uploads(self) -> list[UploadRecord]:
        """Every recorded upload whose file is still there, oldest first."""
        records = [r for r in self._load_uploads().values() if (self.root / r.name).is_file()]
        return sorted(records, key=lambda r: (r.uploaded_at, r.name))

    def _load_uploads(self) -> dict[str, UploadRecord]:
        data = _read_json_dict(self.uploads_path)
        found = (UploadRecord.from_json(k, v) for k, v in data.items() if isinstance(k, str))
        return {r.name: r for r in found if r is not None}

    def _save_uploads(self, records: dict[str, UploadRecord]) -> None:
        _write_json(self.uploads_path, {name: r.to_json() for name, r in records.items()})

    def remember_upload(self, record: UploadRecord) -> None:
        with self._titles_lock:
            records = {k: r for k, r in self._load_uploads().items() if (self.root / k).exists()}
            records[record.name] = record
            self._save_uploads(records)

    def delete_upload(self, name_or_id: str) -> UploadRecord | None:
        """Delete a recorded upload, named by file name or track id; None if there is none.

        Only names in the uploads record can be deleted, and only as a file
        directly in the root: never an operator's file, never a path.
        """
        with self._titles_lock:
            records = self._load_uploads()
            record = records.get(name_or_id) or next(
                (r for r in records.values() if track_id(r.name) == name_or_id), None
            )
            if record is None:
                return None
            path = resolve_media_path(self.root, record.name)
            if path is not None and path.parent == self.root.resolve():
                path.unlink(missing_ok=True)
            del records[record.name]
            self._save_uploads(records)
            titles = self._load_titles()
            if titles.pop(record.name, None) is not None:
                _write_json(self.titles_path, titles)
        self.invalidate()
        return record


def _read_json_dict(path: Path) -> dict[Any, Any]:
    """A small JSON object from ``path``; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a small JSON file atomically."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True), "utf-8")
    os.replace(tmp, path)


def _inside(path: Path, base: Path) -> bool:
    try:
        return path.resolve(strict=True).is_relative_to(base)
    except (OSError, RuntimeError):
        return False
