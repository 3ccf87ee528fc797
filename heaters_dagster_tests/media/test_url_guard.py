"""The URL guard: only public addresses, checked at resolution and on every redirect hop.

Nothing here sends traffic anywhere but 127.0.0.1: names are resolved by a fake resolver to
(public-looking) addresses, and the connector that follows redirects records the address it was
asked for and connects to the local test server instead.
"""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from heaters_dagster.errors import InvalidSourceError, TransientError, classify
from heaters_dagster.media import url_guard
from heaters_dagster.media.url_guard import address_problem, check_url, follow_redirects

REFUSED = [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "cloud metadata"), ("169.254.1.1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.127.255.254", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"), ("255.255.255.255", "reserved"),
    ("192.0.2.7", "private"), ("198.18.0.1", "private"),
    ("::1", "loopback"), ("::", "unspecified"), ("fc00::1", "private"), ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"), ("ff02::1", "multicast"), ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1"),
    ("::ffff:169.254.169.254", "metadata"), ("::ffff:10.0.0.1", "private (IPv4"),
    ("2002:a00:1::", "private (IPv4 10.0.0.1"), ("64:ff9b::a9fe:a9fe", "metadata"), ("::7f00:1", "reserved"),
]


@pytest.mark.parametrize("address,words", REFUSED)
def test_non_public_addresses_are_refused(address: str, words: str) -> None:
    problem = address_problem(address)
    assert problem and words in problem


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "2a00:1450:4001:82b::200e"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(address) is None


def _no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"numeric host {host!r} must not be looked up")


@pytest.mark.parametrize("url,words", [
    ("http://127.0.0.1:8000/v.mp4", "loopback"),
    ("http://127.1/v.mp4", "loopback"),  # short and numeric forms the C library accepts
    ("http://2130706433/v.mp4", "loopback"),
    ("http://0x7f000001/v.mp4", "loopback"),
    ("http://[::1]:8080/v.mp4", "loopback"),
    ("http://[::ffff:127.0.0.1]/v.mp4", "loopback"),
    ("http://10.0.0.1/v.mp4", "private"),
    ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://100.64.1.2/v.mp4", "carrier-grade NAT"),
    ("http://[fe80::1]/v.mp4", "link-local"),
    ("http://0.0.0.0:3000/", "unspecified"),
])
def test_numeric_hosts_are_checked_without_a_lookup(url: str, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)
    with pytest.raises(InvalidSourceError) as err:
        check_url(url, resolver=_no_lookup)
    assert words in str(err.value) and "only public internet addresses" in str(err.value)
    assert "HEATERS_ALLOW_PRIVATE_URLS" in str(err.value)
    assert classify(err.value) == "permanent"


def test_names_are_checked_on_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)
    answers = {"cdn.example": ["8.8.8.8"], "sneaky.example": ["8.8.8.8", "10.1.2.3"],
               "localhost": ["127.0.0.1", "::1"]}
    resolve = lambda host, port: answers[host]  # noqa: E731
    assert check_url("https://cdn.example/v.mp4", resolver=resolve).addresses == ("8.8.8.8",)
    with pytest.raises(InvalidSourceError, match="sneaky.example resolves to 10.1.2.3, which is a private"):
        check_url("https://sneaky.example/v.mp4", resolver=resolve)
    with pytest.raises(InvalidSourceError, match="loopback"):
        check_url("http://localhost:5432/", resolver=resolve)


def test_resolution_failure_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)

    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    with pytest.raises(TransientError, match="cannot resolve"):
        check_url("https://video.example/v.mp4", resolver=fail)


def test_allow_private_turns_the_address_rules_off_but_not_the_scheme_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", "1")
    assert check_url("http://127.0.0.1:9/v.mp4", resolver=_no_lookup).addresses == ()
    assert follow_redirects("http://10.0.0.1/v.mp4", resolver=_no_lookup) == "http://10.0.0.1/v.mp4"
    for bad in ("ftp://10.0.0.1/v.mp4", "file:///etc/passwd", "http:///nohost", "http://a b/"):
        with pytest.raises(InvalidSourceError):
            check_url(bad)
    for off in ("0", "", "no", "false"):
        monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", off)
        with pytest.raises(InvalidSourceError, match="loopback"):
            check_url("http://127.0.0.1:9/v.mp4")


# -- redirects ---------------------------------------------------------------------------------
class _Redirects(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str | None]] = {}
    head_refused: set[str] = set()
    seen: list[tuple[str, str]] = []

    def _answer(self, method: str) -> None:
        self.seen.append((method, self.path))
        if method == "HEAD" and self.path in self.head_refused:
            status, location = 405, None
        else:
            status, location = self.routes.get(self.path, (404, None))
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_GET(self) -> None:
        self._answer("GET")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def redirects(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)
    _Redirects.routes, _Redirects.head_refused, _Redirects.seen = {}, set(), []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]
    connects: list[tuple[str, int]] = []

    def connect(address: tuple[str, int], timeout: float) -> socket.socket:
        connects.append(address)  # what would have been contacted; we go to the test server
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    names = {"start.example": ["8.8.8.8"], "cdn.example": ["1.1.1.1"], "internal.example": ["10.9.8.7"]}
    kw = {"resolver": lambda host, p: names[host], "connect": connect}
    yield {"port": port, "kw": kw, "connects": connects, "routes": _Redirects.routes,
           "head_refused": _Redirects.head_refused, "seen": _Redirects.seen}
    srv.shutdown()
    srv.server_close()


def test_redirect_chain_is_followed_and_each_hop_checked(redirects: dict) -> None:
    p = redirects["port"]
    redirects["routes"].update({
        "/a": (302, "/b"),  # relative
        "/b": (301, f"http://cdn.example:{p}/c?x=1"),
        "/c?x=1": (200, None),
    })
    final = follow_redirects(f"http://start.example:{p}/a", **redirects["kw"])
    assert final == f"http://cdn.example:{p}/c?x=1"
    assert redirects["connects"] == [("8.8.8.8", p), ("8.8.8.8", p), ("1.1.1.1", p)]
    assert [m for m, _ in redirects["seen"]] == ["HEAD", "HEAD", "HEAD"]


@pytest.mark.parametrize("location,words", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://internal.example/admin", "internal.example resolves to 10.9.8.7"),
    ("http://[::1]/", "loopback"),
    ("file:///etc/passwd", "unsupported URL scheme file://"),
    ("ftp://cdn.example/v.mp4", "unsupported URL scheme ftp://"),
])
def test_a_redirect_to_a_refused_url_is_refused_before_connecting(redirects: dict, location: str, words: str) -> None:
    p = redirects["port"]
    redirects["routes"].update({"/a": (302, f"http://cdn.example:{p}/b"), "/b": (307, location)})
    with pytest.raises(InvalidSourceError) as err:
        follow_redirects(f"http://start.example:{p}/a", **redirects["kw"])
    assert words in str(err.value) and f"redirected to from http://cdn.example:{p}/b" in str(err.value)
    assert all(ip in ("8.8.8.8", "1.1.1.1") for ip, _ in redirects["connects"])


def test_head_refused_falls_back_to_a_one_byte_get(redirects: dict) -> None:
    p = redirects["port"]
    redirects["routes"].update({"/a": (302, "http://10.0.0.1/")})
    redirects["head_refused"].add("/a")
    with pytest.raises(InvalidSourceError, match="private"):
        follow_redirects(f"http://start.example:{p}/a", **redirects["kw"])
    assert redirects["seen"] == [("HEAD", "/a"), ("GET", "/a")]


def test_redirect_loops_hit_the_hop_limit(redirects: dict) -> None:
    p = redirects["port"]
    redirects["routes"].update({"/a": (302, "/b"), "/b": (302, "/a")})
    with pytest.raises(InvalidSourceError, match="too many redirects"):
        follow_redirects(f"http://start.example:{p}/a", max_redirects=5, **redirects["kw"])
    assert len(redirects["seen"]) == 6


def test_an_error_status_ends_the_walk_for_yt_dlp_to_report(redirects: dict) -> None:
    p = redirects["port"]
    assert follow_redirects(f"http://start.example:{p}/missing", **redirects["kw"]) == \
        f"http://start.example:{p}/missing"


def test_download_url_refuses_private_hosts_before_connecting(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from heaters_dagster.media.fetch import download_url

    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)

    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be contacted")

    monkeypatch.setattr(url_guard, "_default_connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    for url, words in (("http://127.0.0.1:9/v.mp4", "loopback"), ("http://169.254.169.254/", "metadata"),
                       ("http://[::1]:9/v.mp4", "loopback"), ("http://10.0.0.1/v.mp4", "private")):
        with pytest.raises(InvalidSourceError, match=words):
            download_url(url, tmp_path / "dl")
