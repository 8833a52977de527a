"""Audio types told from a file's first bytes, and a structural check of the whole file.

``sniff`` looks only at the head of a file (what an upload has sent so far) and
names one of the formats the player serves; anything else is None. ``verify``
then opens the complete file: tinytag must parse it and find a positive
duration, and a few cheap structural checks catch files cut short.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from tinytag import TinyTag

# Enough of a file to tell its type: an ID3v2 header plus the next frame header,
# the first Ogg page's packet start, an MP4 ftyp box, a WebM EBML header.
SNIFF_BYTES = 4096
MAX_ID3_SKIP = SNIFF_BYTES

MP4_AUDIO_BRANDS = frozenset(
    {b"M4A ", b"M4B ", b"M4P ", b"isom", b"iso2", b"iso5", b"mp41", b"mp42", b"dash"}
)
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
WEBM_DOCTYPE = b"\x42\x82\x84webm"  # EBML DocType element, length 4, "webm"
RIFF_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # written by streaming recorders
# tinytag reads a tag (an ID3 frame, a RIFF LIST chunk, an Ogg comment packet,
# an MP4 ilst item) into memory whole: a file whose tags are larger than this is
# refused rather than parsed. Cover art is the largest thing tags legitimately hold.
MAX_TAG_BYTES = 16 * 1024 * 1024
# The MP4 moov box holds the tags and the sample tables (a few MB for hours of audio).
MAX_MOOV_BYTES = 64 * 1024 * 1024
MAX_BOXES = 10_000


@dataclass(frozen=True)
class AudioType:
    name: str
    ext: str
    mime: str


MP3 = AudioType("mp3", ".mp3", "audio/mpeg")
OGG = AudioType("ogg", ".ogg", "audio/ogg")
OPUS = AudioType("opus", ".opus", "audio/ogg")
WAV = AudioType("wav", ".wav", "audio/wav")
FLAC = AudioType("flac", ".flac", "audio/flac")
M4A = AudioType("m4a", ".m4a", "audio/mp4")
WEBM = AudioType("webm", ".webm", "audio/webm")


class NotAudio(Exception):
    """The file is not audio of a supported type, or is damaged or cut short."""


def _mpeg_frame_header(b: bytes) -> bool:
    """An MPEG audio frame header (layers I-III, any version) at the start of ``b``."""
    if len(b) < 4 or b[0] != 0xFF or (b[1] & 0xE0) != 0xE0:
        return False
    version = (b[1] >> 3) & 0x3
    layer = (b[1] >> 1) & 0x3
    bitrate = b[2] >> 4
    rate = (b[2] >> 2) & 0x3
    # layer 0 is reserved (and is what AAC ADTS headers carry)
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 0x3


def _id3_end(head: bytes) -> int:
    """The offset just past an ID3v2 tag at the start of ``head``."""
    size = head[6:10]
    if len(size) < 4 or any(x & 0x80 for x in size):
        return -1
    n = (size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3]
    footer = 10 if head[5] & 0x10 else 0
    return 10 + n + footer


def sniff(head: bytes) -> AudioType | None:
    """The audio type whose signature ``head`` starts with, or None."""
    if head.startswith(b"ID3") and len(head) >= 10 and head[3] in (2, 3, 4):
        end = _id3_end(head)
        if end < 0:
            return None
        rest = head[end:]
        if rest.startswith(b"fLaC"):
            return FLAC
        # the tag may be longer than the head; then trust the tag
        return MP3 if end >= len(head) or _mpeg_frame_header(rest) or not rest else None
    if _mpeg_frame_header(head):
        return MP3
    if head.startswith(b"OggS") and len(head) >= 28:
        packet = head[27 + head[26] :]
        if packet.startswith(b"OpusHead"):
            return OPUS
        if packet.startswith((b"\x01vorbis", b"\x7fFLAC", b"Speex   ")):
            return OGG
        return None
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return WAV
    if head.startswith(b"fLaC"):
        return FLAC
    if head[4:8] == b"ftyp" and len(head) >= 12:
        size = struct.unpack(">I", head[:4])[0]
        brands = [head[8:12]] + [head[i : i + 4] for i in range(16, min(size, len(head)), 4)]
        return M4A if any(b in MP4_AUDIO_BRANDS for b in brands) else None
    if head.startswith(EBML_MAGIC) and WEBM_DOCTYPE in head[:64]:
        return WEBM
    return None


def _check_wav(path: Path, size: int) -> None:
    with path.open("rb") as f:
        header = f.read(12)
    declared = struct.unpack("<I", header[4:8])[0]
    if declared not in RIFF_UNKNOWN_SIZES and declared + 8 > size:
        raise NotAudio(f"WAV cut short: {size} of {declared + 8} bytes")


def _check_flac(path: Path, size: int) -> None:
    """Every metadata block is present in full, up to the one marked last."""
    with path.open("rb") as f:
        head = f.read(10)
        start = _id3_end(head) if head.startswith(b"ID3") else 0
        f.seek(start)
        if f.read(4) != b"fLaC":
            raise NotAudio("not a FLAC file")
        while True:
            header = f.read(4)
            if len(header) < 4:
                raise NotAudio("FLAC metadata cut short")
            length = int.from_bytes(header[1:4], "big")
            end = f.tell() + length
            if end > size:
                raise NotAudio("FLAC metadata cut short")
            if header[0] & 0x80:
                return
            f.seek(end)


def _check_id3(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(10)
    if head.startswith(b"ID3") and _id3_end(head) - 10 > MAX_TAG_BYTES:
        raise NotAudio("ID3 tag too large")


def _check_riff_chunks(path: Path, size: int) -> None:
    """No chunk but the audio itself is larger than MAX_TAG_BYTES."""
    with path.open("rb") as f:
        pos = 12
        for _ in range(MAX_BOXES):
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                return
            length = struct.unpack("<I", header[4:8])[0]
            if header[:4] != b"data" and length > MAX_TAG_BYTES:
                raise NotAudio(f"RIFF chunk {header[:4]!r} too large")
            pos += 8 + length + (length & 1)
    raise NotAudio("too many RIFF chunks")


def _check_mp4_boxes(path: Path, size: int) -> None:
    with path.open("rb") as f:
        pos = 0
        for _ in range(MAX_BOXES):
            f.seek(pos)
            header = f.read(16)
            if len(header) < 8:
                return
            length = struct.unpack(">I", header[:4])[0]
            if length == 1 and len(header) == 16:
                length = struct.unpack(">Q", header[8:16])[0]
            elif length == 0:
                length = size - pos
            if length < 8:
                raise NotAudio("bad MP4 box")
            if header[4:8] == b"moov" and length > MAX_MOOV_BYTES:
                raise NotAudio("MP4 moov box too large")
            pos += length
    raise NotAudio("too many MP4 boxes")


def _check_ogg_headers(path: Path) -> None:
    """The identification and comment packets (the first two) are of sane size."""
    packets, current = 0, 0
    with path.open("rb") as f:
        for _ in range(MAX_BOXES):
            header = f.read(27)
            if len(header) < 27 or not header.startswith(b"OggS"):
                return  # tinytag judges the rest
            lacing = f.read(header[26])
            for value in lacing:
                current += value
                if current > MAX_TAG_BYTES:
                    raise NotAudio("Ogg header packet too large")
                if value < 255:
                    packets, current = packets + 1, 0
                    if packets >= 2:
                        return
            f.seek(sum(lacing), 1)
    raise NotAudio("Ogg header packets never end")


def _check_webm(path: Path, size: int) -> None:
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    if sniff(head) is not WEBM or size < 64:
        raise NotAudio("not a WebM file")


def verify(path: Path, kind: AudioType) -> TinyTag | None:
    """Check the complete file at ``path``; its tags, or None for WebM (not parsed).

    Raises NotAudio if it does not parse as ``kind``, has no positive duration,
    or is visibly cut short.
    """
    size = path.stat().st_size
    _check_id3(path)
    if kind is WAV:
        _check_wav(path, size)
        _check_riff_chunks(path, size)
    elif kind is M4A:
        _check_mp4_boxes(path, size)
    elif kind in (OGG, OPUS):
        _check_ogg_headers(path)
    elif kind is FLAC:
        _check_flac(path, size)
    elif kind is WEBM:
        _check_webm(path, size)
        return None
    try:
        tag = TinyTag.get(path, image=False)
    except Exception as exc:  # tinytag wraps most failures in ParseError, but not all
        raise NotAudio(f"unreadable {kind.name}: {exc}") from exc
    duration = tag.duration
    if duration is None or not math.isfinite(duration) or duration <= 0:
        raise NotAudio(f"no audio in this {kind.name} file")
    return tag
