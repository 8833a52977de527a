"""The Quart-Trio application: pages, media, health and the per-client WebSocket nursery."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import trio
from quart import Response, abort, jsonify, request, send_file, websocket
from quart_trio import QuartTrio
from quart_trio.wrappers.response import TrioFileBody

from . import __version__
from .access import (
    SECURITY_HEADERS,
    allowed_host_names,
    content_security_policy,
    host_allowed,
    origin_allowed,
    verify_password,
)
from .clock import ServerClock
from .config import Settings
from .datalock import DataDirLock
from .demo import ensure_demo_tracks
from .frontdoor import WebSocketHandler, send_and_close
from .hub import (
    CLOSE_BAD_ROOM,
    CLOSE_KICKED,
    CLOSE_POLICY,
    CLOSE_SLOW,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    Client,
    Hub,
    Sink,
)
from .lan import allowed_hosts_for
from .library import Library, UploadRecord, track_id
from .logs import configure_logging
from .media import RangeNotSatisfiable, byte_range, content_type_for, resolve_media_path
from .ops import register_ops_routes
from .outbox import Frame, PendingPong
from .protocol import Ping, ProtocolError, Report, decode_client, error_frame
from .ratelimit import RateLimiter, Verdict
from .room import Track
from .sockets import guard_hypercorn_connections, set_permessage_deflate
from .store import RoomStore
from .uploads import (
    FlowHTTPConnection,
    FlowRequest,
    UploadLimits,
    handle_upload,
    max_request_bytes,
)
from .urls import is_valid_room_name, sanitize_display_name
from .wsconn import FastTransport, WireViolation
from .wsframes import Upgrade, accept_response, error_response, forwarded_value

log = logging.getLogger(__name__)

MAX_HOST_ECHO = 100  # characters of a refused Host header repeated in the 421
CLOSE_WRITE_TIMEOUT = 2.0  # seconds to send a close frame before giving up on it
CLOSE_DRAIN_TIMEOUT = 5.0  # seconds to keep reading after our close frame
FALLBACK_PAGE = b"<!doctype html><title>musicsync</title><p>musicsync is running."


def load_index_html() -> bytes:
    """The client page: from the installed package, else from the source tree."""
    try:
        return resources.files("musicsync.static").joinpath("index.html").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, OSError):
        pass
    source = Path(__file__).resolve().parent.parent / "static" / "index.html"
    try:
        return source.read_bytes()
    except OSError:
        return FALLBACK_PAGE


def create_app(settings: Settings | None = None, data_lock: DataDirLock | None = None) -> QuartTrio:
    """The app; ``data_lock`` is the caller's lock on the data directory, else the
    app takes it at startup (``hypercorn musicsync.app:app``) and gives it back at
    the end."""
    settings = settings or Settings.from_env()
    set_permessage_deflate(settings.websocket_compression)
    guard_hypercorn_connections()
    app = QuartTrio(__name__, static_folder=None)
    app.config["MUSICSYNC"] = settings
    # Uploads stream their body (with back-pressure); nothing else takes a larger one.
    app.request_class = FlowRequest
    app.asgi_http_class = FlowHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes(settings.upload_max_bytes)
    library = app.extensions["musicsync_library"] = Library(settings.media_dir)
    index_html = load_index_html()
    state: dict[str, Any] = {}

    def hub() -> Hub:
        h = state.get("hub")
        if h is None:
            raise RuntimeError("hub used before startup")
        return h  # type: ignore[no-any-return]

    @app.before_serving
    async def startup() -> None:
        configure_logging(settings.log_level, settings.log_format, replace=False)
        # Raises DataDirBusy: Hypercorn reports it and exits. With --redis the rooms
        # live in Redis and the directory holds nothing of ours: nothing to lock.
        if data_lock is None and settings.redis is None:
            state["lock"] = await trio.to_thread.run_sync(DataDirLock.acquire, settings.data_dir)
        settings.media_dir.mkdir(parents=True, exist_ok=True)
        if settings.demo_tracks:
            await trio.to_thread.run_sync(ensure_demo_tracks, settings.media_dir)
        store, backend = None, None
        if settings.redis is not None:  # rooms live in Redis, shared with the other nodes
            from .cluster import RedisBackend

            backend = RedisBackend(settings, settings.redis)
        else:
            store = await trio.to_thread.run_sync(RoomStore.open_or_reset, settings.data_dir)
        hub = Hub(settings, ServerClock(trio.current_time), store, backend)
        await app.nursery.start(hub.run)
        restored = await hub.restore_rooms()
        if restored and store is not None:
            log.info("restored %d room(s) from %s", restored, store.path)
        hub.track_lookup = _library_lookup(library)
        state["hub"] = app.extensions["musicsync_hub"] = hub
        app.extensions[ALLOWED_HOSTS] = await trio.to_thread.run_sync(_allowed_hosts, settings)
        app.nursery.start_soon(library.refresh)  # library ids resolve before anyone lists

    @app.after_serving
    async def stop_timers() -> None:
        h = hub()
        await h.persist_all()  # seats of everyone just told to reconnect, too
        h.close()
        await h.close_store()
        lock = state.pop("lock", None)
        if lock is not None:
            lock.release()

    register_ops_routes(app, settings, hub)  # /metrics, /api/share, /api/qr.svg

    csp = content_security_policy(index_html)

    def page() -> Response:
        return Response(
            index_html,
            content_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": csp},
        )

    @app.after_request
    async def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.before_request
    async def check_host() -> Response | None:
        """DNS rebinding: serve only requests addressed to one of our own names."""
        if host_allowed(request.headers.get("Host"), _host_names(app, settings)):
            return None
        return _misdirected(request.headers.get("Host"))

    @app.before_websocket
    async def check_websocket_host() -> Response | None:
        """The same check before a WebSocket upgrade: refused, never accepted."""
        if host_allowed(websocket.headers.get("Host"), _host_names(app, settings)):
            return None
        return _misdirected(websocket.headers.get("Host"))

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(b"", status=204)

    @app.get("/")
    async def index() -> Response:
        return page()

    @app.get("/r/<name>")
    async def room_page(name: str) -> Response:
        if not is_valid_room_name(name):
            abort(404)
        return page()

    @app.get("/healthz")
    async def healthz() -> Any:
        h = hub()
        return jsonify(
            status="ok",
            version=__version__,
            rooms=len(h.rooms),
            connections=h.connection_count,
            server_time=h.clock.now_ms(),
        )

    @app.get("/api/library")
    async def library_index() -> Any:
        listing = await library.listing()
        return jsonify(
            **listing.to_json(),
            upload_max_bytes=settings.upload_max_bytes,
            uploads=settings.uploads,
        )

    upload_limits = UploadLimits.from_settings(settings)  # budgets per address live here

    @app.post("/api/upload")
    async def upload() -> Any:
        body, status = await handle_upload(request, hub(), library, upload_limits)
        if status == HTTPStatus.CREATED:
            hub().announce("library", track=body.get("track"))  # everyone re-lists
            return jsonify(body), status
        # A refused body may still be arriving (or trickling): end the connection.
        headers = {"Connection": "close"}
        if "retry_after" in body:
            headers["Retry-After"] = str(body["retry_after"])
        return jsonify(body), status, headers

    @app.get("/media/<path:subpath>")
    async def media(subpath: str) -> Response:
        path = resolve_media_path(settings.media_dir, subpath)
        if path is None:
            abort(404)
        try:
            # Not conditional=True: Quart-Trio's file body does not cap a range
            # at the file's end (issue 10). Ranges are media.byte_range's; the
            # 304s stay Quart's.
            response = await send_file(path, mimetype=content_type_for(path))
        except OSError:  # gone since it was resolved
            abort(404)
        await response.make_conditional(request)
        if response.status_code == HTTPStatus.OK:
            response = _apply_range(request, response)
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Cache-Control"] = "no-cache"
        allow = _cors_allow(request.headers.get("Origin"), settings.cors_origins)
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Expose-Headers"] = "Content-Range, Accept-Ranges"
            if allow != "*":
                response.headers["Vary"] = "Origin"
        return response

    @app.get("/api/admin/rooms")
    async def admin_rooms() -> Any:
        _require_admin(settings)
        h = hub()
        return jsonify(
            rooms=[
                {
                    "name": name,
                    "participants": len(entry.room.participants),
                    "connections": len(entry.clients),
                    "version": entry.room.version,
                    "playing": not entry.room.timeline.paused,
                    "track": entry.room.track.to_wire() if entry.room.track else None,
                    "protected": entry.room.password_hash is not None,
                }
                for name, entry in sorted(h.rooms.items())
            ]
        )

    @app.post("/api/admin/rooms/<name>/close")
    async def admin_close_room(name: str) -> Any:
        _require_admin(settings)
        closed = await hub().close_room(name)
        if closed is None:
            abort(404)
        return jsonify(closed=name, disconnected=closed)

    @app.get("/api/admin/uploads")
    async def admin_uploads() -> Any:
        _require_admin(settings)
        records = await trio.to_thread.run_sync(library.uploads)
        await library.listing()
        return jsonify(uploads=[_upload_entry(library, r) for r in records])

    @app.delete("/api/admin/uploads/<path:name_or_id>")
    async def admin_delete_upload(name_or_id: str) -> Any:
        _require_admin(settings)
        before = library.lookup(track_id(name_or_id)) or library.lookup(name_or_id)
        try:
            record = await trio.to_thread.run_sync(library.delete_upload, name_or_id)
        except OSError as exc:
            log.warning("could not delete the upload %s: %s", name_or_id, exc)
            return jsonify(error="storage_error", message="the file could not be deleted"), 500
        if record is None:
            message = "no upload with that file name or track id"
            return jsonify(error="no_such_upload", message=message), 404
        await library.refresh()
        removed = before.to_json() if before is not None else {"id": track_id(record.name)}
        hub().announce("library", track=None, removed=removed)  # everyone re-lists
        log.info("upload %s deleted by the operator", record.name)
        return jsonify(deleted=record.to_json())

    @app.websocket("/ws/<room_name>")
    async def ws(room_name: str) -> None:
        """Hypercorn's own WebSocket path (``hypercorn -k trio musicsync.app:app``, or
        compression asked for and allowed); ``musicsync serve`` uses the front door's."""
        knock = Knock(
            room=room_name,
            ip=websocket.remote_addr or "unknown",
            origin=websocket.headers.get("Origin"),
            scheme=websocket.scheme,
            host=websocket.host,
            args=dict(websocket.args.items()),
        )
        await serve_websocket(hub(), settings, knock, QuartDoor())

    return app


@dataclass(frozen=True)
class Knock:
    """A WebSocket upgrade request as admission sees it, whichever path it came by."""

    room: str
    ip: str
    origin: str | None
    scheme: str  # "ws" or "wss"
    host: str
    args: dict[str, str]


@dataclass(frozen=True)
class Refusal:
    """Accept only to say why (a typed error frame, unless ``code`` is None), then close."""

    code: str | None
    message: str
    close_code: int


@dataclass(frozen=True)
class Seat:
    """Admitted: join with this role floor (an invite's), or None."""

    role: str | None


class Door(Protocol):
    """How a path answers an upgrade request: refuse it over HTTP, or accept it."""

    async def refuse(self, status: HTTPStatus, reason: str) -> None: ...
    async def accept(self) -> Transport: ...


class QuartDoor:
    """Hypercorn's WebSocket path, through Quart's ``websocket`` context."""

    async def refuse(self, status: HTTPStatus, reason: str) -> None:
        abort(status)

    async def accept(self) -> Transport:
        await websocket.accept()
        return QuartTransport()


class QuartTransport:
    """Quart's ``websocket`` as a Transport: frames go as text, Hypercorn frames them."""

    sink = None

    async def receive(self) -> str | bytes | None:
        return await websocket.receive()

    async def send(self, frame: Frame) -> None:
        await websocket.send(frame.text)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def close(self, code: int, reason: str = "") -> None:
        await websocket.close(code, reason)

    async def wait_closed(self) -> None:
        await trio.lowlevel.checkpoint()  # Hypercorn completes the close handshake


async def serve_websocket(hub: Hub, settings: Settings, knock: Knock, door: Door) -> None:
    """Limits, Origin, ban, password and invite checks; then seat the client and serve it."""
    if not is_valid_room_name(knock.room):
        await _refuse(await door.accept(), Refusal(None, "bad room name", CLOSE_BAD_ROOM))
        return
    if not hub.admits(knock.ip):
        refusal = Refusal(None, "too many connections from this address", CLOSE_TOO_MANY)
        await _refuse(await door.accept(), refusal)
        return
    # Count the connection before the first await, so a burst of handshakes
    # cannot all pass the check above; leave() gives the slot back.
    client = hub.new_client(knock.ip)
    refused: HTTPStatus | None = None
    try:
        outcome = await _admission(hub, settings, knock, client)
        if isinstance(outcome, HTTPStatus):
            refused = outcome
        else:
            ws = await door.accept()
            if isinstance(outcome, Refusal):
                await _refuse(ws, outcome)
            else:
                name = sanitize_display_name(knock.args.get("name"))
                token = knock.args.get("token") or None
                client.sink = ws.sink  # the welcome, too, goes straight to the socket
                seated = hub.join(knock.room, client, name, resume_token=token, role=outcome.role)
                if seated is not None:  # shared rooms: once the seat is committed
                    await seated.wait()
                await serve_client(hub, knock.room, client, ws)
    finally:
        hub.leave(knock.room, client)
    if refused is not None:  # the slot is free already: answering may linger
        await door.refuse(refused, refused.phrase.lower())


async def _admission(
    hub: Hub, settings: Settings, knock: Knock, client: Client
) -> HTTPStatus | Refusal | Seat:
    if not origin_allowed(knock.origin, knock.scheme, knock.host, settings.allowed_origins):
        hub.stats.errors["bad_origin"] += 1
        return HTTPStatus.FORBIDDEN  # before the upgrade: another site cannot drive a visitor in
    token = knock.args.get("token") or None
    unavailable = await hub.load_room(knock.room)  # a shared room: its newest state first
    if unavailable is not None:
        return Refusal(*unavailable)
    entry = hub.rooms.get(knock.room)
    now = hub.clock.now_ms()
    if token and entry is not None and entry.room.is_banned(token, now):
        return Refusal("kicked", "you were removed from this room", CLOSE_KICKED)
    role = None
    if entry is not None:
        admitted, role = entry.room.admission(now, token, knock.args.get("invite"))
        if not admitted:
            password = knock.args.get("password")
            refusal = await _check_password(hub, entry.room, client.ip, password)
            if refusal is not None:
                return Refusal(*refusal)
    refusal = hub.room_refusal(knock.room, client.ip)  # opens the room if it may
    if refusal is not None:
        return Refusal(*refusal)
    return Seat(role)


async def _refuse(ws: Transport, refusal: Refusal) -> None:
    if refusal.code is not None:
        await ws.send(Frame(error_frame(refusal.code, refusal.message)))
    await ws.close(refusal.close_code, refusal.code or refusal.message)
    with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
        await ws.wait_closed()


async def _check_password(
    hub: Hub, room: Any, ip: str, password: str | None
) -> tuple[str, str, int] | None:
    """None if ``password`` opens ``room``; else the refusal (code, message, close code)."""
    if not password:
        return "password_required", "this room needs a password", CLOSE_UNAUTHORIZED
    if not hub.password_attempt_allowed(ip):
        return "rate_limited", "too many password attempts; wait a minute", CLOSE_TOO_MANY
    stored = room.password_hash
    ok = stored is not None and await trio.to_thread.run_sync(verify_password, password, stored)
    if not ok:
        hub.stats.errors["bad_password"] += 1
        return "bad_password", "wrong password", CLOSE_UNAUTHORIZED
    return None


ALLOWED_HOSTS = "musicsync_allowed_hosts"  # app.extensions key: frozenset of host names


def _allowed_hosts(settings: Settings) -> frozenset[str]:
    """The names the server answers to (blocking: it asks for this machine's names)."""
    return allowed_hosts_for(
        settings.host, settings.public_url, settings.allowed_origins, settings.allowed_hosts
    )


def _host_names(app: QuartTrio, settings: Settings) -> frozenset[str]:
    names: frozenset[str] | None = app.extensions.get(ALLOWED_HOSTS)
    if names is None:  # before startup finished: the configured names, no lookups
        names = allowed_host_names(
            bind_host=settings.host,
            public_url=settings.public_url,
            allowed_origins=settings.allowed_origins,
            allowed_hosts=settings.allowed_hosts,
            machine=(),
        )
    return names


def _misdirected(host: str | None) -> Response:
    """421: this server does not answer to that name (a DNS-rebinding page, or a missing
    --allowed-host / --public-url)."""
    shown = (host or "")[:MAX_HOST_ECHO]
    response = jsonify(
        error="misdirected",
        message=f"this server does not answer to the host {shown!r};"
        " its operator can add it with --allowed-host",
    )
    response.status_code = HTTPStatus.MISDIRECTED_REQUEST
    response.headers["Connection"] = "close"
    return response


def _apply_range(req: Any, response: Response) -> Response:
    """206 for a satisfiable ``Range``, 416 for an unsatisfiable one, else ``response``."""
    body = response.response
    if not isinstance(body, TrioFileBody) or not _if_range_holds(req, response):
        return response
    try:
        wanted = byte_range(req.headers.get("Range"), body.size)
    except RangeNotSatisfiable as exc:
        refused = jsonify(error="range_not_satisfiable", message=str(exc))
        refused.status_code = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
        refused.headers["Content-Range"] = exc.content_range
        return refused
    if wanted is None:
        return response
    body.begin, body.end = wanted.first, wanted.last + 1
    response.status_code = HTTPStatus.PARTIAL_CONTENT
    response.content_length = wanted.length
    response.headers["Content-Range"] = wanted.content_range
    return response


def _if_range_holds(req: Any, response: Response) -> bool:
    """False when ``If-Range`` names another version of the file: then the whole file."""
    if_range: str | None = req.headers.get("If-Range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        etag = response.headers.get("ETag")
        return etag is not None and not if_range.startswith("W/") and if_range == etag
    return if_range == response.headers.get("Last-Modified")


def _upload_entry(library: Library, record: UploadRecord) -> dict[str, Any]:
    entry = record.to_json()
    entry["id"] = track_id(record.name)
    track = library.lookup(entry["id"])
    entry["url"] = track.url if track is not None else None
    entry["title"] = track.title if track is not None else None
    return entry


def _cors_allow(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    if "*" in allowed:
        return "*"
    if origin is not None and origin.lower() in allowed:
        return origin
    return None


def _require_admin(settings: Settings) -> None:
    expected = settings.admin_token
    given = request.headers.get("Authorization", "")
    if expected is None:
        abort(404)  # the operator API is off
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        abort(401)


def _library_lookup(library: Library) -> Callable[[str], Track | None]:
    def lookup(track_id: str) -> Track | None:
        found = library.lookup(track_id)
        return Track(found.url, found.title, found.duration) if found is not None else None

    return lookup


class Transport(Protocol):
    """What the per-client tasks need of a WebSocket, on either path."""

    @property
    def sink(self) -> Sink | None: ...

    async def receive(self) -> str | bytes | None:
        """The next message; None once the peer has closed."""
        ...

    async def send(self, frame: Frame) -> None: ...

    async def flush(self) -> None:
        """Finish what a direct write (``sink``) left half-written."""
        ...

    async def close(self, code: int, reason: str = "") -> None: ...

    async def wait_closed(self) -> None:
        """After ``close``: until the peer answers it (or goes)."""
        ...


async def serve_client(hub: Hub, room_name: str, client: Client, ws: Transport) -> None:
    """One nursery per client: reader (the body) and writer; either's exit ends both.

    Heartbeats are swept hub-wide (``Hub.sweep_heartbeats``), not by a task here.
    """
    client.sink = ws.sink
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_then_cancel, nursery, _writer(hub, client, ws))
            try:  # the reader runs in the nursery's own body: one task fewer a client
                await _reader(hub, room_name, client, ws)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        client.sink = None  # nothing writes to a socket that is about to close


async def _run_then_cancel(nursery: trio.Nursery, coro: Any) -> None:
    try:
        await coro
    finally:
        nursery.cancel_scope.cancel()


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


async def _reader(hub: Hub, room_name: str, client: Client, ws: Transport) -> None:
    control = RateLimiter.for_control()
    pings = RateLimiter.for_ping()
    max_frame = hub.settings.max_frame_bytes
    while True:
        try:
            raw = await ws.receive()
        except WireViolation as violation:
            hub.stats.errors[violation.error or "wire"] += 1
            if violation.error is not None and client.close_code is None:
                hub.error(client, violation.error, f"{violation.reason} (limit {max_frame} bytes)")
                client.fail(violation.code, violation.reason)
                continue  # the writer says why and closes; keep draining meanwhile
            client.fail(violation.code, violation.reason)
            if isinstance(ws, FastTransport):
                ws.abort(violation.code, violation.reason)
            return
        if raw is None:
            return
        if client.close_code is not None:
            # The writer is flushing and will send the close frame, then end the
            # nursery. Keep draining (and discarding) so the close handshake
            # completes instead of a reset dropping the close frame.
            continue
        t1 = hub.clock.now_ms()
        now = trio.current_time()
        client.last_seen = now
        hub.stats.messages_in += 1
        if isinstance(raw, str) and _utf8_length(raw) > max_frame:
            hub.error(client, "too_large", f"frame larger than {max_frame} bytes")
            client.fail(CLOSE_TOO_BIG, "frame too large")
            continue
        try:
            msg = decode_client(raw)
        except ProtocolError as exc:
            if _limited(hub, client, control.check(now)):
                continue
            hub.error(client, exc.code, exc.message)
            continue
        if isinstance(msg, Ping):
            verdict = pings.check(now)
            if verdict is Verdict.ALLOW:
                if msg.rtt is not None:
                    hub.note_rtt(room_name, client, msg.rtt)
                if client.send_now(hub.encode_pong(PendingPong(msg.t0, t1))):
                    hub.stats.messages_out += 1
                else:
                    client.deliver_pong(msg.t0, t1)
            elif verdict is Verdict.ABUSIVE:
                _limited(hub, client, verdict)  # pings past their budget, on and on
            continue
        if _limited(hub, client, control.check(now)):
            continue
        if isinstance(msg, Report):
            hub.note_report(room_name, client, msg)
            continue
        await hub.handle(room_name, client, msg)


def _limited(hub: Hub, client: Client, verdict: Verdict) -> bool:
    if verdict is Verdict.ALLOW:
        return False
    if verdict is Verdict.ABUSIVE:
        hub.error(client, "rate_limited", "sustained flooding; disconnecting")
        client.fail(CLOSE_POLICY, "flooding")
    else:
        hub.error(client, "rate_limited", "too many messages; slow down")
    return True


async def _writer(hub: Hub, client: Client, ws: Transport) -> None:
    send_timeout = hub.settings.send_timeout
    while True:
        with trio.move_on_after(send_timeout) as scope:
            await ws.flush()  # a direct write's tail goes before anything queued
        if scope.cancelled_caught:
            _drop_slow(client, ws)
            return
        item = client.outbox.pop()
        if item is None:
            if client.close_code is not None:
                with trio.move_on_after(CLOSE_WRITE_TIMEOUT):
                    await ws.close(client.close_code, client.close_reason)
                # The reader keeps draining what the peer had in flight until it
                # answers the close (then the reader ends the nursery); if nobody
                # read, frames would fill Hypercorn's app queue and its
                # connection task would block, never closing the socket.
                await trio.sleep(CLOSE_DRAIN_TIMEOUT)
                return
            await client.wait_for_frames()
            continue
        frame = hub.encode_pong(item) if isinstance(item, PendingPong) else item
        with trio.move_on_after(send_timeout) as scope:
            await ws.send(frame)
        if scope.cancelled_caught:
            _drop_slow(client, ws)
            return
        hub.stats.messages_out += 1
        if isinstance(item, Frame):
            client.saw(item)
        if item is client.state_frame:
            hub.metrics.broadcast_latency.observe(trio.current_time() - client.state_queued_at)
            client.state_frame = None
        # An idle writer must not keep its last frame alive (a welcome is ~10 KB,
        # and 10 000 idle writers would hold 10 000 of them).
        del item, frame


def _drop_slow(client: Client, ws: Transport) -> None:
    """A peer that takes nothing for ``send_timeout``: give up on it. Its close
    resets the connection, so the kernel drops what it still holds for it."""
    client.fail(CLOSE_SLOW, "slow consumer")
    log.info("dropping slow client %s", client.id)
    if isinstance(ws, FastTransport):
        ws.reset_on_close()


def websocket_handler(app: QuartTrio) -> WebSocketHandler:
    """The front door's WebSocket path for ``app``: our handshake, then ``serve_websocket``."""
    settings: Settings = app.config["MUSICSYNC"]

    async def handle(stream: trio.abc.Stream, upgrade: Upgrade, trailing: bytes, ip: str) -> None:
        hub: Hub = app.extensions["musicsync_hub"]
        hops = settings.proxy_hops
        host = forwarded_value(upgrade.forwarded_host, hops) or upgrade.host
        if not host_allowed(host, _host_names(app, settings)):
            hub.stats.errors["bad_host"] += 1
            await _answer_and_close(stream, HTTPStatus.MISDIRECTED_REQUEST, "unknown Host")
            return
        scheme = "wss" if isinstance(stream, trio.SSLStream) else "ws"
        proto = forwarded_value(upgrade.forwarded_proto, hops)
        if proto is not None:
            scheme = {"https": "wss", "http": "ws"}.get(proto.lower(), proto.lower())
        knock = Knock(
            room=upgrade.room,
            ip=forwarded_value(upgrade.forwarded_for, hops) or ip,
            origin=upgrade.origin,
            scheme=scheme,
            host=host or "",
            args=upgrade.args,
        )
        door = FastDoor(stream, upgrade, trailing, settings.max_frame_bytes)
        try:
            await serve_websocket(hub, settings, knock, door)
        finally:
            await trio.aclose_forcefully(stream)

    return handle


async def _answer_and_close(stream: trio.abc.Stream, status: HTTPStatus, reason: str) -> None:
    await send_and_close(stream, error_response(status, reason))


class FastDoor:
    """The front door's WebSocket path: answers the upgrade itself."""

    def __init__(
        self, stream: trio.abc.Stream, upgrade: Upgrade, trailing: bytes, max_bytes: int
    ) -> None:
        self.stream = stream
        self.upgrade = upgrade
        self.trailing = trailing
        self.max_bytes = max_bytes

    async def refuse(self, status: HTTPStatus, reason: str) -> None:
        await _answer_and_close(self.stream, status, reason)

    async def accept(self) -> Transport:
        await self.stream.send_all(accept_response(self.upgrade.key))
        return FastTransport(self.stream, self.trailing, self.max_bytes)


app = create_app()
