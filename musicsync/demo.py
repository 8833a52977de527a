"""Royalty-free demo tracks, synthesised by the program into the media directory."""

from __future__ import annotations

import array
import logging
import math
import os
import struct
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLE_RATE = 44_100
AMPLITUDE = 0.28
DEMO_ARTIST = "musicsync"
DEMO_ALBUM = "Demo tracks"
NOTE_FADE_SECONDS = 0.01


@dataclass(frozen=True)
class DemoTrack:
    filename: str
    title: str
    bpm: float
    # Semitone offsets from A3 (220 Hz); None is a rest. One entry per beat.
    pattern: tuple[int | None, ...]
    bars: int


DEMO_TRACKS = (
    DemoTrack("demo-1-arpeggio.wav", "Demo 1 — Arpeggio", 120, (0, 4, 7, 12, 7, 4, 0, None), 20),
    DemoTrack("demo-2-pulse.wav", "Demo 2 — Pulse", 96, (0, None, 0, 3, None, 5, 7, None), 16),
    DemoTrack("demo-3-bells.wav", "Demo 3 — Bells", 140, (12, 7, 4, 0, 5, 9, 12, 16), 24),
)


def _note(freq: float | None, seconds: float) -> array.array[int]:
    n = int(seconds * SAMPLE_RATE)
    out = array.array("h", bytes(2 * n))
    if freq is None:
        return out
    fade = int(NOTE_FADE_SECONDS * SAMPLE_RATE)
    step = 2 * math.pi * freq / SAMPLE_RATE
    for i in range(n):
        env = min(1.0, i / fade, (n - i) / fade) * math.exp(-2.5 * i / n)
        s = math.sin(step * i) + 0.35 * math.sin(2 * step * i) + 0.15 * math.sin(3 * step * i)
        out[i] = int(32767 * AMPLITUDE * env * s / 1.5)
    return out


def render(track: DemoTrack) -> bytes:
    beat = 60.0 / track.bpm
    cache: dict[int | None, bytes] = {}
    chunks = []
    for _ in range(track.bars):
        for semitone in track.pattern:
            if semitone not in cache:
                freq = None if semitone is None else 220.0 * 2 ** (semitone / 12)
                note = _note(freq, beat / 2)
                if sys.byteorder == "big":
                    note.byteswap()
                cache[semitone] = note.tobytes()
            chunks.append(cache[semitone])
    return b"".join(chunks)


def info_chunk(tags: dict[bytes, str]) -> bytes:
    """A RIFF ``LIST/INFO`` chunk (INAM title, IART artist, IPRD album), as players read it."""
    body = b"INFO"
    for key, value in tags.items():
        data = value.encode("utf-8") + b"\x00"
        data += b"\x00" * (len(data) % 2)
        body += key + struct.pack("<I", len(data)) + data
    return b"LIST" + struct.pack("<I", len(body)) + body


def write_wav(path: Path, pcm: bytes, tags: dict[bytes, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    if tags:
        with tmp.open("r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(info_chunk(tags))
            riff_size = f.tell() - 8
            f.seek(4)
            f.write(struct.pack("<I", riff_size))
    os.replace(tmp, path)


def ensure_demo_tracks(media_dir: Path) -> list[Path]:
    """Create any missing demo track; returns the demo files present."""
    media_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for track in DEMO_TRACKS:
        path = media_dir / track.filename
        if not path.exists():
            tags = {b"INAM": track.title, b"IART": DEMO_ARTIST, b"IPRD": DEMO_ALBUM}
            write_wav(path, render(track), tags)
            log.info("generated demo track %s", path)
        paths.append(path)
    return paths


def demo_title(filename: str) -> str | None:
    return next((t.title for t in DEMO_TRACKS if t.filename == filename), None)
