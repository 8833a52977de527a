"""``POST /api/upload``: a multipart audio upload streamed to disk, checked, then published.

The request body is read chunk by chunk and parsed incrementally (Werkzeug's
sans-IO multipart decoder); the file part goes straight into a temporary file
in the media directory's hidden ``.uploads/`` folder, so an upload is never held
whole in memory. Its type comes from its first bytes (``magic.sniff``), and the
upload is refused with 415 as soon as they show it is not audio. A complete file
is then parsed (``magic.verify``); only if that passes is it moved into the
library under a generated name, with one atomic link or rename. Any failure,
including the client going away, deletes the temporary file.

What keeps the disk (``UploadLimits``, from the settings): who may upload at
all (``--uploads off|hosts|everyone``), a byte budget per address and hour
(429), a cap on the whole library (507 ``library_full``) and a free-disk floor
(507 ``disk_full``). Each is checked before the first byte of the body is read,
against ``Content-Length`` when there is one, and again while the body streams,
so that neither a chunked body nor a lying length gets past them.

Quart collects a request body in memory for as long as the handler does not
read it, and its reader never waits. ``FlowHTTPConnection`` and ``FlowBody``
add back-pressure: once a handler starts iterating over the body, at most
``BODY_HIGH_WATER`` bytes wait in memory, and the socket is not read beyond that.
``FlowHTTPConnection`` also lets Hypercorn finish every response, so that a
connection whose request body was left unread is closed as soon as the answer
is out (see its docstring).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent
from quart import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import HTTPException
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from . import magic
from .config import Settings
from .hub import Hub
from .library import UPLOADS_DIR, Library, LibraryTrack, Tags, UploadRecord, clean_text, describe
from .ratelimit import TokenBucket
from .urls import is_valid_room_name

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

UPLOAD_FIELD = "file"
TOKEN_HEADER = "X-Musicsync-Token"
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_SLACK = 64 * KiB
# Most bytes the multipart decoder may hold while it looks for a boundary or
# the end of a part's headers.
DECODER_BUFFER_MAX = MiB
FEED_BYTES = 256 * KiB
BODY_HIGH_WATER = MiB
# An upload that sends nothing for this long is dropped (408).
UPLOAD_IDLE_TIMEOUT = 30.0
# After its first UPLOAD_IDLE_TIMEOUT, an upload must average at least this
# rate, so a trickle of a few bytes a second cannot hold a socket and a part
# file forever (408). 8 KiB/s is far below any real phone connection.
UPLOAD_MIN_BYTES_PER_SECOND = 8 * KiB
# After a refusal, read and discard at most this much of the rest of the body,
# so that the client, which is still sending, gets to read the answer.
DRAIN_MAX_BYTES = 16 * MiB
DRAIN_SECONDS = 5.0
MAX_SLUG_CHARS = 48
MAX_ORIGINAL_NAME_CHARS = 200
PUBLISH_ATTEMPTS = 8
# Part files this old are left over from a crash (a live upload writes at least
# every UPLOAD_IDLE_TIMEOUT): the next upload removes them.
STALE_PART_SECONDS = 3600.0
HOUR_SECONDS = 3600.0
# While a body streams, free disk space is measured again after every this many bytes.
FREE_SPACE_CHECK_BYTES = MiB
# Per-address upload budgets kept at most; beyond it the fullest (least used) go.
MAX_BUDGET_ADDRESSES = 10_000


def max_request_bytes(upload_max_bytes: int) -> int:
    """Quart's MAX_CONTENT_LENGTH for a given upload cap: the cap plus multipart framing."""
    return upload_max_bytes + MULTIPART_SLACK


# -- back-pressure ------------------------------------------------------------


class FlowBody(TrioBody):
    """A request body whose reader waits while too much is buffered, once it is streamed."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        super().__init__(expected_content_length, max_content_length)
        self._streaming = False
        self._abandoned = False
        self._room = trio.Event()

    async def __anext__(self) -> bytes:
        self._streaming = True
        try:
            return await super().__anext__()
        finally:
            self._room.set()

    def append(self, data: bytes) -> None:
        if not self._abandoned:
            super().append(data)

    def abandon(self) -> None:
        """The response is complete: stop holding the reader back, drop what still arrives."""
        self._abandoned = True
        self._room.set()

    async def wait_for_room(self) -> None:
        """Wait while a streaming reader has ``BODY_HIGH_WATER`` bytes still to read."""
        while self._streaming and not self._abandoned and len(self._data) >= BODY_HIGH_WATER:
            self._room = trio.Event()
            await self._room.wait()


class FlowRequest(TrioRequest):
    body_class = FlowBody


class FlowHTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, with back-pressure, and responses that always finish.

    Hypercorn ends a response from inside the app's last ``send``: it hands the
    app ``http.disconnect``, then either readies the connection for the next
    request (restarting its keep-alive timer) or, when the request body was not
    read to its end (or the response says ``Connection: close``), closes the
    socket. Quart-Trio cancels the handler on that disconnect, and the
    cancellation landed in the middle of Hypercorn's own cleanup: a socket whose
    body never came stayed open until Hypercorn's ``read_timeout``, and so did
    an idle keep-alive connection. Here a disconnect that arrives while the last
    message is being sent does not cancel: the handler is finishing anyway.
    """

    _body: FlowBody | None = None
    _finishing = False

    def _create_request_from_scope(self, send: ASGISendCallable) -> Request:
        request = super()._create_request_from_scope(send)
        if isinstance(request.body, FlowBody):
            self._body = request.body
        return request

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def send_then_finish(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finishing = True
                if self._body is not None:
                    # The handler reads no more: the body reader must not wait
                    # for room, or Hypercorn's disconnect could never be queued.
                    self._body.abandon()
            await send(message)

        await super().__call__(receive, send_then_finish)

    async def handle_messages(  # type: ignore[override]  # as Quart-Trio's own
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        body = request.body
        while True:
            message = await receive()
            if message["type"] == "http.request":
                if isinstance(body, FlowBody):
                    await body.wait_for_room()
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        if not self._finishing:  # else handle_request ends the nursery when its send returns
            nursery.cancel_scope.cancel()


# -- names --------------------------------------------------------------------


def slugify(name: str) -> str:
    """An ASCII slug of a file name's stem: ``[a-z0-9-]``, never empty, never hidden."""
    base = re.split(r"[/\\]", name)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    ascii_text = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:MAX_SLUG_CHARS].strip("-") or "track"


def original_title(filename: str | None) -> str | None:
    """The uploaded file's own name, without directories or extension, fit for display."""
    if not filename:
        return None
    base = re.split(r"[/\\]", filename)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.strip(".") else base
    return clean_text(stem.replace("_", " "), MAX_ORIGINAL_NAME_CHARS)


# -- errors -------------------------------------------------------------------


class UploadError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _too_large(max_bytes: int) -> UploadError:
    return UploadError(413, "too_large", f"the file is larger than {max_bytes} bytes")


class OverBudget(UploadError):
    def __init__(self, per_hour: int, retry_after: float) -> None:
        super().__init__(
            429,
            "upload_budget",
            f"this address may upload {per_hour // MiB} MB per hour; try again later",
        )
        self.retry_after = max(1, int(retry_after + 0.999))


def _library_full(cap: int) -> UploadError:
    return UploadError(507, "library_full", f"the media library is full ({cap // MiB} MB)")


def _disk_full(floor: int) -> UploadError:
    return UploadError(
        507, "disk_full", f"the server keeps {floor // MiB} MB of disk free; no room for this file"
    )


# -- limits -------------------------------------------------------------------


class UploadBudgets:
    """Bytes each address may still upload: a token bucket per address, refilled over the hour."""

    def __init__(self, per_hour: int) -> None:
        self.per_hour = per_hour
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, address: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= MAX_BUDGET_ADDRESSES:
                self._evict(now)
            bucket = TokenBucket(self.per_hour / HOUR_SECONDS, self.per_hour)
            self._buckets[address] = bucket
        return bucket

    def _evict(self, now: float) -> None:
        """Forget the buckets that are (nearly) full: the least used; half the table at most."""
        for bucket in self._buckets.values():
            bucket.try_take(now, 0.0)  # refill
        by_fullness = sorted(self._buckets, key=lambda a: -self._buckets[a].tokens)
        for address in by_fullness[: max(1, len(by_fullness) // 2)]:
            del self._buckets[address]

    def available(self, address: str, now: float) -> float:
        bucket = self._bucket(address, now)
        bucket.try_take(now, 0.0)
        return bucket.tokens

    def take(self, address: str, size: int, now: float) -> None:
        """Spend ``size`` bytes of the address's budget, or raise OverBudget."""
        bucket = self._bucket(address, now)
        if not bucket.try_take(now, size):
            raise OverBudget(self.per_hour, (size - bucket.tokens) / bucket.rate)


@dataclass
class UploadLimits:
    """What keeps uploads from filling the disk; one per server (``from_settings``)."""

    max_bytes: int
    policy: str  # off | hosts | everyone
    budgets: UploadBudgets
    library_max_bytes: int
    min_free_disk_bytes: int
    in_flight: int = 0  # bytes of every upload under way, not yet listed by the library

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(
            max_bytes=settings.upload_max_bytes,
            policy=settings.uploads,
            budgets=UploadBudgets(settings.upload_budget_bytes_per_hour),
            library_max_bytes=settings.library_max_bytes,
            min_free_disk_bytes=settings.min_free_disk_bytes,
        )


@dataclass
class _Quota:
    """One upload's account against the limits, charged as its bytes arrive."""

    limits: UploadLimits
    address: str
    media_dir: Path
    library_bytes: int
    free_at_start: float
    received: int = 0
    next_free_check: int = FREE_SPACE_CHECK_BYTES

    async def charge(self, size: int) -> None:
        limits = self.limits
        limits.budgets.take(self.address, size, trio.current_time())
        self.received += size
        limits.in_flight += size
        if self.library_bytes + limits.in_flight > limits.library_max_bytes:
            raise _library_full(limits.library_max_bytes)
        floor = limits.min_free_disk_bytes
        if self.free_at_start - self.received < floor:
            raise _disk_full(floor)
        if floor and self.received >= self.next_free_check:
            self.next_free_check = self.received + FREE_SPACE_CHECK_BYTES
            if await _free_bytes(self.media_dir) < floor:
                raise _disk_full(floor)

    def release(self) -> None:
        self.limits.in_flight -= self.received
        self.received = 0


# -- the upload ---------------------------------------------------------------


@dataclass
class _Upload:
    """The one file part of a multipart body, as it streams in."""

    staging: Path
    max_bytes: int
    quota: _Quota | None = None
    part: Path | None = None
    file: Any = None  # trio's async file wrapper
    filename: str | None = None
    kind: magic.AudioType | None = None
    head: bytearray | None = None
    size: int = 0
    complete: bool = False

    async def start(self, filename: str) -> None:
        if self.part is not None:
            raise UploadError(400, "bad_request", "send exactly one file per upload")
        self.filename = filename
        self.part = self.staging / f"{secrets.token_hex(12)}.part"
        self.file = await trio.open_file(self.part, "xb")
        self.head = bytearray()

    async def feed(self, data: bytes, more: bool) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise _too_large(self.max_bytes)
        if self.quota is not None:  # before a byte of it is written
            await self.quota.charge(len(data))
        if self.head is not None:  # still sniffing
            self.head += data
            if len(self.head) < magic.SNIFF_BYTES and more:
                return
            head, self.head = bytes(self.head), None
            self.kind = magic.sniff(head)
            if self.kind is None:
                raise UploadError(415, "not_audio", "the file is not audio of a supported type")
            data = head
        if data:
            await self.file.write(data)
        if not more:
            self.complete = True

    async def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            with trio.CancelScope(shield=True):
                await file.aclose()

    def discard(self) -> None:
        if self.part is not None:
            with contextlib.suppress(OSError):
                self.part.unlink()
            self.part = None


async def _next_chunk(body: Any) -> bytes | None:
    with trio.move_on_after(UPLOAD_IDLE_TIMEOUT) as scope:
        try:
            return await body.__anext__()  # type: ignore[no-any-return]
        except StopAsyncIteration:
            return None
    assert scope.cancelled_caught
    raise UploadError(408, "timeout", f"nothing received for {UPLOAD_IDLE_TIMEOUT:g} s")


async def _receive(request: Request, upload: _Upload, boundary: bytes) -> None:
    decoder = MultipartDecoder(boundary, DECODER_BUFFER_MAX, max_parts=16)
    in_file = False
    body = request.body.__aiter__()
    started, received = trio.current_time(), 0
    while True:
        chunk = await _next_chunk(body)
        received += len(chunk or b"")
        elapsed = trio.current_time() - started
        if elapsed > UPLOAD_IDLE_TIMEOUT and received < UPLOAD_MIN_BYTES_PER_SECOND * elapsed:
            raise UploadError(408, "timeout", "upload too slow: under 8 KiB/s on average")
        slices = (
            [None]
            if chunk is None
            else [chunk[i : i + FEED_BYTES] for i in range(0, len(chunk), FEED_BYTES)]
        )
        for piece in slices:
            decoder.receive_data(piece)
            while True:
                event = decoder.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, Epilogue):
                    return
                if isinstance(event, File) and event.name == UPLOAD_FIELD:
                    await upload.start(event.filename)
                    in_file = True
                elif isinstance(event, (File, Field)):
                    in_file = False  # another field: its data is skipped
                elif isinstance(event, Data) and in_file:
                    await upload.feed(event.data, event.more_data)
        if chunk is None:
            return


def sweep_stale_parts(staging: Path, now: float | None = None) -> int:
    """Delete part files a crashed server left behind; how many (blocking)."""
    now = time.time() if now is None else now
    removed = 0
    with contextlib.suppress(OSError), os.scandir(staging) as entries:
        for e in entries:
            if not e.name.endswith(".part") or not e.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if now - e.stat(follow_symlinks=False).st_mtime > STALE_PART_SECONDS:
                    os.unlink(e.path)
                    removed += 1
    return removed


async def _free_bytes(path: Path) -> float:
    try:
        usage = await trio.to_thread.run_sync(shutil.disk_usage, path)
    except OSError:
        return float("inf")  # unknown: let the write itself fail if it must
    return float(usage.free)


def _publish(part: Path, media_dir: Path, slug: str, ext: str) -> str:
    """Move ``part`` into ``media_dir`` under a new generated name; the name (blocking)."""
    with part.open("rb") as f:
        os.fsync(f.fileno())
    for _ in range(PUBLISH_ATTEMPTS):
        name = f"{slug}-{secrets.token_hex(4)}{ext}"
        final = media_dir / name
        try:
            os.link(part, final)  # fails if the name is taken: never overwrites
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if final.exists():
                continue
            os.replace(part, final)
            return name
        part.unlink()
        return name
    raise OSError("no free file name")


async def _drain(request: Request, remaining_hint: int | None) -> None:
    """Read and drop what is left of the body, within limits, so the client sees the answer."""
    if remaining_hint is not None and remaining_hint > DRAIN_MAX_BYTES:
        return
    drained = 0
    with trio.move_on_after(DRAIN_SECONDS), contextlib.suppress(HTTPException):
        async for chunk in request.body:
            drained += len(chunk)
            if drained > DRAIN_MAX_BYTES:
                return


def _authorize(request: Request, hub: Hub, policy: str) -> str:
    if policy == "off":
        raise UploadError(403, "uploads_off", "uploads are turned off on this server")
    room = request.args.get("room", "")
    if not is_valid_room_name(room):
        raise UploadError(400, "bad_room", "give the room as ?room=<name>")
    token = request.headers.get(TOKEN_HEADER, "")
    participant = hub.participant_for_token(room, token) if token else None
    if participant is None:
        raise UploadError(401, "unauthorized", f"send your participant token in {TOKEN_HEADER}")
    # "everyone": any participant seated in the room (participant_for_token finds no other)
    if policy != "everyone" and not hub.may_upload(room, participant):
        raise UploadError(403, "forbidden", "only the host may upload in this room")
    return room


async def _open_quota(
    request: Request, limits: UploadLimits, library: Library, length: int | None
) -> _Quota:
    """The up-front checks (nothing of the body read yet), and the upload's account."""
    address = request.remote_addr or "unknown"
    now = trio.current_time()
    budgets = limits.budgets
    if length is not None and length > budgets.per_hour:
        raise OverBudget(budgets.per_hour, HOUR_SECONDS)
    available = budgets.available(address, now)
    wanted = length if length is not None else 1
    if available < wanted:
        raise OverBudget(budgets.per_hour, (wanted - available) * HOUR_SECONDS / budgets.per_hour)
    library_bytes = (await library.listing()).total_bytes
    if library_bytes + limits.in_flight + (length or 0) > limits.library_max_bytes:
        raise _library_full(limits.library_max_bytes)
    free = await _free_bytes(library.root)
    floor = limits.min_free_disk_bytes
    if free < floor or free - (length or 0) < floor:
        raise _disk_full(floor)
    return _Quota(limits, address, library.root, library_bytes, free)


async def store_upload(
    request: Request, hub: Hub, library: Library, limits: UploadLimits
) -> LibraryTrack:
    """Authorize, receive, check and publish one upload; raises UploadError."""
    max_bytes = limits.max_bytes
    room = _authorize(request, hub, limits.policy)
    length = request.content_length
    if length is not None and length > max_request_bytes(max_bytes):
        raise _too_large(max_bytes)
    boundary = request.mimetype_params.get("boundary", "")
    if request.mimetype != "multipart/form-data" or not boundary:
        raise UploadError(400, "bad_request", "send multipart/form-data with a 'file' field")
    quota = await _open_quota(request, limits, library, length)
    try:
        return await _receive_and_publish(request, library, boundary, room, quota)
    finally:
        # Published and listed by the library (refreshed) by now, or gone.
        quota.release()


async def _receive_and_publish(
    request: Request, library: Library, boundary: str, room: str, quota: _Quota
) -> LibraryTrack:
    max_bytes = quota.limits.max_bytes
    media_dir = library.root
    staging = media_dir / UPLOADS_DIR
    upload = _Upload(staging, max_bytes, quota)
    try:
        await trio.Path(staging).mkdir(parents=True, exist_ok=True)
        await trio.to_thread.run_sync(sweep_stale_parts, staging)
        try:
            await _receive(request, upload, boundary.encode("latin-1"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UploadError(400, "bad_request", f"malformed multipart body: {exc}") from exc
        except HTTPException as exc:  # the decoder's own buffer limit, Quart's length limit
            if exc.code == 413:
                raise _too_large(max_bytes) from exc
            raise UploadError(400, "bad_request", "malformed multipart body") from exc
        finally:
            await upload.close()
        if upload.part is None:
            raise UploadError(400, "bad_request", f"no '{UPLOAD_FIELD}' file in the upload")
        if not upload.complete:
            raise UploadError(400, "bad_request", "the file part ended early")
        kind = upload.kind
        if kind is None:  # shorter than SNIFF_BYTES and never sniffed: feed() ends sniffing
            raise UploadError(415, "not_audio", "the file is empty")
        try:
            tag = await trio.to_thread.run_sync(magic.verify, upload.part, kind)
        except magic.NotAudio as exc:
            raise UploadError(415, "unreadable_audio", str(exc)) from exc
        title = original_title(upload.filename)
        slug = slugify(upload.filename or "")
        name = await trio.to_thread.run_sync(_publish, upload.part, media_dir, slug, kind.ext)
        upload.part = None
    except OSError as exc:  # a full disk, a read-only or vanished media directory
        log.warning("upload to room %s not stored: %s", room, exc)
        status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
        raise UploadError(status, "storage_error", "the server could not store the file") from exc
    finally:
        upload.discard()
    if title:
        try:
            await trio.to_thread.run_sync(library.remember_title, name, title)
        except OSError as exc:  # the file is in; only its fallback title is lost
            log.warning("could not record the title of %s: %s", name, exc)
    record = UploadRecord(name, upload.size, time.time(), room, quota.address)
    try:
        await trio.to_thread.run_sync(library.remember_upload, record)
    except OSError as exc:  # the file is in; only the admin API will not list it
        log.warning("could not record the upload %s: %s", name, exc)
    await library.refresh()  # so that the new track's id can be queued at once
    log.info("upload to room %s stored as %s (%d bytes)", room, name, upload.size)
    return describe(name, upload.size, Tags.from_tinytag(tag), title)


async def handle_upload(
    request: Request, hub: Hub, library: Library, limits: UploadLimits
) -> tuple[dict[str, Any], int]:
    """The whole endpoint: a JSON body and a status."""
    try:
        track = await store_upload(request, hub, library, limits)
    except UploadError as exc:
        if exc.status != 408:  # a stalled client would stall the drain too
            await _drain(request, request.content_length)
        body: dict[str, Any] = {"error": exc.code, "message": exc.message}
        if isinstance(exc, OverBudget):
            body["retry_after"] = exc.retry_after
        return body, exc.status
    return {"track": track.to_json()}, 201
