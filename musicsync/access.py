"""Who may get in: password and token hashes, Host and Origin checks, security headers (sans-IO)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

# scrypt cost: ~30 ms and 16 MiB per hash here; run it in a worker thread.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
SCHEME = "scrypt"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """A salted scrypt hash as ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES
    )
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def origin_allowed(origin: str | None, scheme: str, host: str, allowed: tuple[str, ...]) -> bool:
    """May a browser page from ``origin`` open our WebSocket?

    No Origin header means no browser is involved (a script or a native app),
    and a cross-site page cannot make a browser omit it, so that passes. The
    page's own origin always passes; so does any listed in ``allowed``.
    """
    if origin is None:
        return True
    origin = origin.strip().lower()
    http_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if origin == f"{http_scheme}://{host}".lower():
        return True
    return "*" in allowed or origin in allowed


def hash_token(token: str) -> str:
    """What the server keeps of a resume token: its SHA-256, hex.

    Tokens are 128 random bits, so a plain fast hash is enough: nobody can
    search that space, and a stolen database no longer holds live secrets.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# -- the Host header (DNS rebinding) ------------------------------------------

# Names the server always answers to, whatever it is bound to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BIND_HOSTS = frozenset({"", "0.0.0.0", "::"})
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{0,5}")


def normalize_host_name(name: str) -> str | None:
    """A host name or IP address as ``host_allowed`` compares it, else None.

    Lower-case, one trailing dot dropped, IPv6 without brackets, compressed.
    """
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
        if ":" not in name:
            return None  # brackets are for IPv6 literals only
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    name = name.removesuffix(".")
    return name if _HOST_NAME.fullmatch(name) else None


def host_of_header(host_header: str) -> str | None:
    """The host name of a ``Host`` header (port dropped, normalized), or None if malformed."""
    value = host_header.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not _PORT.fullmatch(port):
            return None  # a second colon (unbracketed IPv6) or a non-numeric port
    return normalize_host_name(name) if name else None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, names: frozenset[str]) -> bool:
    """May a request carrying this ``Host`` header be served? (DNS-rebinding guard)

    Only the host name counts, not the port; case and one trailing dot do not
    matter. ``names`` are normalized names (``allowed_host_names``). An IP
    address always passes: DNS rebinding needs a name the attacker controls
    (the browser sends that name as ``Host``), and a page whose origin is an IP
    address can only be that address's own. No ``Host`` header at all means no
    browser sent the request (every browser sends one), so that passes too.
    """
    if host_header is None:
        return True
    name = host_of_header(host_header)
    if name is None:
        return False
    return name in names or _is_ip_literal(name)


def allowed_host_names(
    *,
    bind_host: str,
    public_url: str | None,
    allowed_origins: Iterable[str],
    allowed_hosts: Iterable[str],
    machine: Iterable[str],
) -> frozenset[str]:
    """The host names this server answers to.

    The bind address (unless a wildcard), ``machine`` (its addresses and host
    names, found by the caller), the loopback names, the hosts of the public
    URL and of every allowed origin, and the operator's ``--allowed-host``s.
    """
    candidates: list[str] = [*LOOPBACK_NAMES, *machine, *allowed_hosts]
    if bind_host not in WILDCARD_BIND_HOSTS:
        candidates.append(bind_host)
    for url in (public_url, *allowed_origins):
        if not url or url == "*":
            continue
        try:
            hostname = urlsplit(url).hostname
        except ValueError:
            continue
        if hostname:
            candidates.append(hostname)
    return frozenset(n for c in candidates if (n := normalize_host_name(c)) is not None)


_INLINE = re.compile(rb"<(script|style)\b[^>]*>(.*?)</\1>", re.S | re.I)


def content_security_policy(page: bytes) -> str:
    """A CSP for ``page`` that admits exactly its inline script and style blocks."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        hashes[kind.lower()].append(f"'sha256-{digest}'")
    script = " ".join(hashes[b"script"]) or "'none'"
    style = " ".join(hashes[b"style"]) or "'none'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {script}",
            f"style-src {style}",
            "img-src 'self' data:",
            "connect-src 'self'",
            # tracks may be any http(s) URL the host picks; the element plays them
            "media-src 'self' data: http: https:",
            "manifest-src 'self'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
