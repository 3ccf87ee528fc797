"""Which URLs Heaters may fetch: http(s) to public internet addresses only.

A submitted URL is fetched by the server, so without a guard anyone who can submit could make it
request ``http://169.254.169.254/`` (cloud metadata), ``http://127.0.0.1:5432/`` or a host on the
private network. The rules:

* only ``http`` and ``https``, with a host and no control characters or spaces;
* every address the host resolves to must be a public unicast address: loopback, private
  (RFC 1918, ``fc00::/7``), link-local (``169.254.0.0/16`` with the metadata address,
  ``fe80::/10``), CGNAT (``100.64.0.0/10``), multicast, reserved, unspecified, documentation and
  benchmarking ranges are refused, and so are IPv6 forms that embed such an IPv4 address
  (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64 ``64:ff9b::/96``);
* the check happens at *resolution*: nothing is connected to before the addresses are known good;
* redirects: :func:`follow_redirects` walks the redirect chain itself before yt-dlp sees the URL
  (``HEAD`` with redirects not followed, falling back to a ``GET`` of one byte when a server does
  not answer ``HEAD``), resolving and checking every ``Location`` (up to ``MAX_REDIRECTS`` hops).
  Each hop connects to the address that was checked (no second lookup), with TLS verified
  against the host name.

``HEATERS_ALLOW_PRIVATE_URLS=1`` turns the address rules off (a private deployment that fetches
from its own network; the tests' loopback servers). Scheme rules always apply.

Limits of this guard (see README): yt-dlp resolves the host again when it downloads, so a DNS
name that changes its answer between our check and yt-dlp's request (DNS rebinding), a proxy
configured in the environment, or media URLs that an extractor discovers *inside* a fetched page
are not covered by it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urljoin, urlsplit

from heaters_dagster.errors import InvalidSourceError, TransientError

ALLOW_ENV = "HEATERS_ALLOW_PRIVATE_URLS"
MAX_REDIRECTS = 10
CHECK_TIMEOUT_S = 20.0
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "Mozilla/5.0 (compatible; heaters-url-check)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses (as text) a connection to that host could go to
Resolver = Callable[[str, int], Sequence[str]]
# (address, port), timeout -> a connected socket (tests replace it to reach a loopback server)
Connector = Callable[[tuple[str, int], float], socket.socket]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_METADATA = ipaddress.IPv4Address("169.254.169.254")


def private_urls_allowed() -> bool:
    """True when HEATERS_ALLOW_PRIVATE_URLS (or heaters.toml's allow_private_urls) is on (1, true, yes, on)."""
    from heaters_dagster.settings import get_settings

    return get_settings().allow_private_urls


def address_problem(address: str | IPAddress) -> str | None:
    """Why ``address`` may not be fetched from (e.g. ``"loopback"``), or None for a public address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (link-local)"
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded)
            if inner:
                return f"{inner} (IPv4 {embedded} inside IPv6)"
            if ip.ipv4_mapped:
                return None  # ::ffff:a.b.c.d is a.b.c.d
    if ip == _METADATA:
        return "link-local (cloud metadata service)"
    checks = (
        ("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("carrier-grade NAT", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("reserved", ip.is_reserved), ("private", ip.is_private),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:
        return "non-public"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _numeric(host: str) -> list[str] | None:
    """The address of a numeric host (``10.0.0.1``, ``[::1]``, also ``0x7f.1``/``2130706433``
    which the C library reads as IPv4) without any lookup, or None for a name."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]  # empty when private URLs are allowed (nothing was resolved)


def _allow_hint() -> str:
    return f"only public internet addresses are fetched (set {ALLOW_ENV}=1 to allow private networks)"


def check_url(url: str, *, resolver: Resolver | None = None, allow_private: bool | None = None) -> CheckedUrl:
    """Check ``url``'s scheme and host, and that every address the host resolves to is public.

    Raises InvalidSourceError for a URL that must not be fetched, TransientError when the host
    cannot be resolved right now (no name server, a lookup that failed).
    """
    text = url.strip()
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in text):
        raise InvalidSourceError(f"URL contains spaces or control characters: {text!r}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidSourceError(f"malformed URL {text!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidSourceError(
            f"unsupported URL scheme {scheme}:// in {text!r}: only http and https URLs are fetched")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InvalidSourceError(f"URL has no host: {text!r}")
    port = port or (443 if scheme == "https" else 80)
    if allow_private if allow_private is not None else private_urls_allowed():
        return CheckedUrl(text, scheme, host, port, ())
    addresses = _numeric(host)
    literal = _is_ip(host)
    if addresses is None:
        try:
            addresses = [str(a) for a in (resolver or system_resolver)(host, port)]
        except (socket.gaierror, socket.herror, UnicodeError, OSError) as exc:
            raise TransientError(f"cannot resolve the host of {text}: {exc}") from exc
        if not addresses:
            raise TransientError(f"cannot resolve the host of {text}: no addresses")
    for address in addresses:
        try:
            problem = address_problem(address)
        except ValueError:
            problem = "unparseable"
        if problem:
            shown = host if literal else f"{host} resolves to {address}, which"
            raise InvalidSourceError(f"refused URL {text}: {shown} is a {problem} address; {_allow_hint()}")
    return CheckedUrl(text, scheme, host, port, tuple(addresses))


def _default_connect(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def _request(checked: CheckedUrl, method: str, *, timeout: float, connect: Connector) -> tuple[int, str | None]:
    """One request to the checked address (redirects not followed): (status, Location)."""
    parts = urlsplit(checked.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last: Exception | None = None
    for address in checked.addresses:
        if checked.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                checked.host, checked.port, timeout=timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(checked.host, checked.port, timeout=timeout)
        # Connect to the address we checked, not to a second lookup of the name (TLS still
        # verifies the certificate against the host name).
        conn._create_connection = (  # type: ignore[attr-defined]
            lambda _addr, _timeout=None, _source=None, _ip=address: connect((_ip, checked.port), timeout))
        try:
            headers = {"User-Agent": _USER_AGENT, "Accept": "*/*"}
            if method == "GET":
                headers["Range"] = "bytes=0-0"
            conn.request(method, target, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Location")
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        finally:
            conn.close()
    raise TransientError(f"network error while checking {checked.url}: {last}")


def follow_redirects(url: str, *, resolver: Resolver | None = None, allow_private: bool | None = None,
                     max_redirects: int = MAX_REDIRECTS, timeout: float = CHECK_TIMEOUT_S,
                     connect: Connector | None = None) -> str:
    """Check ``url`` and every redirect it leads to; return the last URL of the chain.

    With private URLs allowed this only checks the URL's form (no request is made). Raises
    InvalidSourceError when a hop is refused or there are more than ``max_redirects`` hops.
    """
    allowed = allow_private if allow_private is not None else private_urls_allowed()
    checked = check_url(url, resolver=resolver, allow_private=allowed)
    if allowed:
        return checked.url
    chain = [checked.url]
    for _ in range(max_redirects + 1):
        status, location = _request(checked, "HEAD", timeout=timeout, connect=connect or _default_connect)
        if status >= 400 or (status not in _REDIRECTS and status >= 300):
            # Some servers refuse HEAD (405/501, or 403/404 for HEAD only): ask for one byte.
            status, location = _request(checked, "GET", timeout=timeout, connect=connect or _default_connect)
        if status not in _REDIRECTS or not location:
            return checked.url  # not a redirect: yt-dlp reports any HTTP error itself
        nxt = urljoin(checked.url, location.strip())
        try:
            checked = check_url(nxt, resolver=resolver, allow_private=False)
        except InvalidSourceError as exc:
            raise InvalidSourceError(f"{exc} (redirected to from {chain[-1]})") from exc
        chain.append(checked.url)
    raise InvalidSourceError(
        f"too many redirects (more than {max_redirects}) starting at {url}; submit the final URL instead")
