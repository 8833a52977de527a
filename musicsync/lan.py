"""Where people can reach this server: local and LAN URLs, QR codes of them."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import segno

from .access import allowed_host_names

MAX_QR_URL_LENGTH = 2048
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
# Any routable address: connect() on a UDP socket sends nothing, it only picks
# the interface (and so the source address) the kernel would route through.
_PROBE_ADDRESSES = ("192.0.2.1", "10.255.255.255")
_PROBE_ADDRESSES_V6 = ("2001:db8::1",)
# Linux lists every local IPv4 address in the routing trie, every IPv6 one here.
_FIB_TRIE = "/proc/net/fib_trie"
_IF_INET6 = "/proc/net/if_inet6"
MDNS_SUFFIX = ".local"


def lan_address() -> str | None:
    """This machine's address on the local network, or None if it has none."""
    for probe in _PROBE_ADDRESSES:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            address = str(s.getsockname()[0])
            if not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
                return address
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = str(info[4][0])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def _probe(family: socket.AddressFamily, probes: tuple[str, ...]) -> set[str]:
    found = set()
    for probe in probes:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            found.add(str(s.getsockname()[0]))
    return found


def _linux_addresses() -> set[str]:
    """Every address of every interface, from /proc (empty elsewhere)."""
    found = set()
    with contextlib.suppress(OSError, UnicodeDecodeError), open(_FIB_TRIE, encoding="ascii") as f:
        previous = ""
        for line in f:
            if "/32 host LOCAL" in line:
                found.add(previous.strip().removeprefix("|-- "))
            previous = line
    with contextlib.suppress(OSError, UnicodeDecodeError), open(_IF_INET6, encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if fields and len(fields[0]) == 32:
                with contextlib.suppress(ValueError):
                    found.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
    return found


def machine_names() -> set[str]:
    """This machine's addresses and names: interfaces, host name, ``<host name>.local``.

    Blocking (it may ask the resolver): call it in a worker thread.
    """
    names = _linux_addresses() | _probe(socket.AF_INET, _PROBE_ADDRESSES)
    names |= _probe(socket.AF_INET6, _PROBE_ADDRESSES_V6)
    hostname = socket.gethostname()
    if hostname:
        short = hostname.split(".", 1)[0]
        names |= {hostname, short + MDNS_SUFFIX, hostname + MDNS_SUFFIX}
        with contextlib.suppress(OSError, UnicodeError):
            names.add(socket.getfqdn(hostname))
            for info in socket.getaddrinfo(hostname, None):
                names.add(str(info[4][0]))
    lan = lan_address()
    if lan:
        names.add(lan)
    return {n for n in names if n and n != "0.0.0.0"}


def allowed_hosts_for(
    bind_host: str,
    public_url: str | None,
    allowed_origins: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
) -> frozenset[str]:
    """The Host names this server answers to (blocking: it looks up this machine's names)."""
    return allowed_host_names(
        bind_host=bind_host,
        public_url=public_url,
        allowed_origins=allowed_origins,
        allowed_hosts=allowed_hosts,
        machine=machine_names(),
    )


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Urls:
    """The URLs to print and share for a server bound to ``host:port``."""

    local: str
    lan: str | None  # None when bound to loopback only, or no LAN address

    @classmethod
    def for_bind(
        cls, host: str, port: int, *, tls: bool = False, lan_ip: str | None = None
    ) -> Urls:
        scheme = "https" if tls else "http"
        lan_host: str | None
        if host in WILDCARD_HOSTS:
            local = f"{scheme}://{'127.0.0.1' if host != '::' else '[::1]'}:{port}"
            lan_host = lan_ip if lan_ip is not None else lan_address()
        elif _is_loopback(host):
            local, lan_host = f"{scheme}://{_host_in_url(host)}:{port}", None
        else:
            local = f"{scheme}://{_host_in_url(host)}:{port}"
            return cls(local, local)
        lan = f"{scheme}://{_host_in_url(lan_host)}:{port}" if lan_host else None
        return cls(local, lan)


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL (lower-cased, default port dropped)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    default = 443 if parts.scheme == "https" else 80
    host = _host_in_url(parts.hostname.lower())
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def qr_svg(url: str) -> bytes:
    """A QR code of ``url`` as a standalone SVG document (no text of the URL in it)."""
    qr = segno.make(url, error="m", micro=False)
    out = io.BytesIO()
    qr.save(
        out,
        kind="svg",
        scale=6,
        border=2,
        dark="#000",
        light="#fff",
        xmldecl=False,
        svgclass=None,
        lineclass=None,
    )
    return out.getvalue()


def qr_terminal(url: str) -> str:
    """A QR code of ``url`` drawn with Unicode half blocks, for a terminal."""
    qr = segno.make(url, error="l", micro=False)
    out = io.StringIO()
    qr.terminal(out=out, compact=True, border=2)
    return out.getvalue()


def startup_banner(urls: Urls, *, public_url: str | None = None, qr: bool = True) -> str:
    """What ``musicsync serve`` prints once it listens."""
    lines = [f"musicsync is running: {urls.local}"]
    if public_url:
        lines.append(f"  public URL:   {public_url}")
    if urls.lan:
        lines.append(f"  on your LAN:  {urls.lan}")
    else:
        lines.append("  LAN devices cannot reach it: add --host 0.0.0.0 to let them in")
    share = public_url or urls.lan
    text = "\n".join(lines) + "\n"
    if qr and share:
        text += f"\nScan to open {share}\n" + qr_terminal(share)
    return text
