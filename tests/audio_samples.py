"""Small, real audio files built in memory for the library and upload tests.

No encoder is needed: WAV comes from the ``wave`` module (tags in a RIFF
``LIST/INFO`` chunk), FLAC is a ``STREAMINFO`` plus a ``VORBIS_COMMENT`` block,
MP3 is an ID3v2.3 tag followed by silent MPEG-1 Layer III frames, and Ogg Opus
is an ``OpusHead``/``OpusTags`` pair of pages plus one audio page, with real
page checksums. Every one of them parses with tinytag.
"""

from __future__ import annotations

import io
import struct
import wave

SAMPLE_RATE = 8000


def _info_chunk(tags: dict[bytes, str]) -> bytes:
    body = b"INFO"
    for key, value in tags.items():
        data = value.encode("utf-8") + b"\x00"
        if len(data) % 2:
            data += b"\x00"
        body += key + struct.pack("<I", len(data)) + data
    return b"LIST" + struct.pack("<I", len(body)) + body


def wav(
    seconds: float = 1.0,
    *,
    title: str | None = None,
    artist: str | None = None,
    album: str | None = None,
) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(b"\x00\x00" * int(seconds * SAMPLE_RATE))
    data = out.getvalue()
    tags = {
        key: value
        for key, value in ((b"INAM", title), (b"IART", artist), (b"IPRD", album))
        if value is not None
    }
    if not tags:
        return data
    data += _info_chunk(tags)
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


def wav_header_only_size(seconds: float) -> int:
    """Bytes of a tagless ``wav(seconds)``."""
    return 44 + 2 * int(seconds * SAMPLE_RATE)


def _vorbis_comments(tags: dict[str, str]) -> bytes:
    vendor = b"musicsync tests"
    out = struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", len(tags))
    for key, value in tags.items():
        entry = f"{key}={value}".encode()
        out += struct.pack("<I", len(entry)) + entry
    return out


def flac(seconds: float = 2.0, **tags: str) -> bytes:
    rate, channels, bps = 44_100, 2, 16
    total = int(seconds * rate)
    packed = (rate << 44) | ((channels - 1) << 41) | ((bps - 1) << 36) | total
    streaminfo = struct.pack(">HH", 4096, 4096) + b"\x00" * 6 + packed.to_bytes(8, "big")
    streaminfo += b"\x00" * 16  # MD5 of the audio: unknown
    comment = _vorbis_comments({k.upper(): v for k, v in tags.items()})
    return (
        b"fLaC"
        + bytes([0]) + len(streaminfo).to_bytes(3, "big") + streaminfo
        + bytes([0x80 | 4]) + len(comment).to_bytes(3, "big") + comment
    )  # fmt: skip


def _id3_frame(frame_id: bytes, text: str) -> bytes:
    data = b"\x03" + text.encode("utf-8")  # encoding 3: UTF-8
    return frame_id + struct.pack(">I", len(data)) + b"\x00\x00" + data


def _synchsafe(n: int) -> bytes:
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


MP3_FRAME = b"\xff\xfb\x90\x00" + b"\x00" * 413  # MPEG-1 Layer III, 128 kbit/s, 44.1 kHz
MP3_FRAME_SECONDS = 1152 / 44_100


def mp3(frames: int = 80, **tags: str) -> bytes:
    ids = {"title": b"TIT2", "artist": b"TPE1", "album": b"TALB"}
    body = b"".join(_id3_frame(ids[k], v) for k, v in tags.items())
    head = b"ID3\x03\x00\x00" + _synchsafe(len(body)) + body if body else b""
    return head + MP3_FRAME * frames


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(packet: bytes, seq: int, granule: int, flags: int) -> bytes:
    assert len(packet) < 255 * 255
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    header = (
        b"OggS\x00"
        + bytes([flags])
        + struct.pack("<qII", granule, 0x6D5E, seq)
        + b"\x00\x00\x00\x00"
        + bytes([len(lacing)])
        + lacing
    )
    crc = _ogg_crc(header + packet)
    return header[:22] + struct.pack("<I", crc) + header[26:] + packet


def opus(seconds: float = 1.5, **tags: str) -> bytes:
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 2, 312, 48_000, 0, 0)
    comments = b"OpusTags" + _vorbis_comments({k.upper(): v for k, v in tags.items()})
    granule = 312 + int(seconds * 48_000)
    audio = b"\xfc\xff\xfe"  # one silent CELT frame is plenty for a parser
    return (
        _ogg_page(head, 0, 0, 0x02)
        + _ogg_page(comments, 1, 0, 0x00)
        + _ogg_page(audio, 2, granule, 0x04)
    )


def elf_executable() -> bytes:
    """The first bytes of an x86-64 ELF executable, then padding."""
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x02\x00\x3e\x00" + b"\x00" * 4000


def _atom(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def m4a(seconds: float = 2.5, **tags: str) -> bytes:
    """An MP4 audio file's boxes: ftyp, moov/mvhd (duration), moov/udta/meta/ilst (tags).

    No sample data: enough for a tag reader, not for a decoder.
    """
    ids = {"title": b"\xa9nam", "artist": b"\xa9ART", "album": b"\xa9alb"}
    timescale = 1000
    mvhd = struct.pack(">B3xIIII", 0, 0, 0, timescale, int(seconds * timescale)) + b"\x00" * 80
    items = b"".join(
        _atom(ids[k], _atom(b"data", struct.pack(">II", 1, 0) + v.encode()))
        for k, v in tags.items()
    )
    meta = _atom(b"meta", b"\x00\x00\x00\x00" + _atom(b"ilst", items))
    return _atom(b"ftyp", b"M4A \x00\x00\x02\x00M4A isommp42") + _atom(
        b"moov", _atom(b"mvhd", mvhd) + _atom(b"udta", meta)
    )
