"""Operations routes: /metrics, and the share link and QR code of a room."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from urllib.parse import quote

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from .config import Settings
from .hub import Hub
from .lan import MAX_QR_URL_LENGTH, Urls, origin_of, qr_svg
from .metrics import CONTENT_TYPE
from .urls import is_valid_room_name

DEFAULT_ROOM = "main"
SVG_HEADERS = {
    "Cache-Control": "public, max-age=86400",
    # an SVG opened on its own is a document: give it nothing to run
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


def room_path(room: str) -> str:
    return "/" if room == DEFAULT_ROOM else f"/r/{room}"


def _bad_request(message: str) -> Response:
    response = jsonify(error="bad_request", message=message)
    response.status_code = 400
    return response


def register_ops_routes(app: QuartTrio, settings: Settings, hub: Callable[[], Hub]) -> None:
    @lru_cache(maxsize=8)
    def urls_for_port(port: int) -> Urls:
        return Urls.for_bind(settings.host, port, tls=settings.tls)

    def server_urls() -> Urls:
        server = request.scope.get("server")
        port = int(server[1]) if server and server[1] is not None else settings.port
        return urls_for_port(port)

    def own_origins() -> set[str]:
        urls = server_urls()
        here = f"{request.scheme}://{request.host}"
        candidates = [here, urls.local, urls.lan, settings.public_url]
        return {o for c in candidates if c and (o := origin_of(c)) is not None}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(hub().metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/api/qr.svg")
    async def qr() -> Response:
        url = request.args.get("url", "")
        if not url or len(url) > MAX_QR_URL_LENGTH or not url.isprintable() or " " in url:
            return _bad_request("url must be a URL of this server")
        origin = origin_of(url)
        if origin is None or origin not in own_origins():
            return _bad_request("url must be a URL of this server")
        return Response(qr_svg(url), content_type="image/svg+xml", headers=SVG_HEADERS)

    @app.get("/api/share")
    async def share() -> Response:
        room = request.args.get("room", DEFAULT_ROOM)
        if not is_valid_room_name(room):
            return _bad_request("room must be 1-64 characters of A-Z a-z 0-9 _ -")
        path = room_path(room)
        urls = server_urls()
        here = f"{request.scheme}://{request.host}"
        url = (settings.public_url or here) + path
        lan_url = urls.lan + path if urls.lan else None
        # The code to scan: the address other devices can open.
        target = settings.public_url + path if settings.public_url else lan_url or url
        return jsonify(
            room=room,
            url=url,
            lan_url=lan_url,
            qr_svg_url="/api/qr.svg?url=" + quote(target, safe=""),
        )
