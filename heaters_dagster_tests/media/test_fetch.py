"""Source classification and yt-dlp downloads against a local HTTP server (no internet needed)."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from heaters_dagster.errors import InvalidSourceError, PermanentError, TransientError, classify
from heaters_dagster.media.fetch import classify_source, download_url
from heaters_dagster.media.probe import probe
from heaters_dagster.media.synthetic import make_video


# -- classify_source ----------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["http://example.com/v.mp4", "https://www.youtube.com/watch?v=abc"])
def test_http_urls_are_urls(uri: str) -> None:
    assert classify_source(uri) == ("url", uri)


def test_local_file_becomes_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "movie.mp4"
    f.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    kind, path = classify_source("movie.mp4")
    assert kind == "file" and path == str(f.resolve()) and Path(path).is_absolute()
    assert classify_source(f"  {f}  ") == ("file", str(f.resolve()))


@pytest.mark.parametrize(
    "uri", ["ftp://host/v.mp4", "file:///etc/passwd", "s3://bucket/key.mp4", "rtmp://live/stream"]
)
def test_other_schemes_are_refused(uri: str) -> None:
    with pytest.raises(InvalidSourceError) as err:
        classify_source(uri)
    assert "only http and https URLs or local" in str(err.value)
    assert uri.split("://")[0] in str(err.value)
    assert classify(err.value) == "permanent"


def test_missing_directory_and_empty_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="not found"):
        classify_source(str(tmp_path / "nope.mp4"))
    with pytest.raises(InvalidSourceError, match="directory"):
        classify_source(str(tmp_path))
    with pytest.raises(InvalidSourceError, match="empty"):
        classify_source("   ")
    with pytest.raises(InvalidSourceError, match="no host"):
        classify_source("https://")


def test_special_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(InvalidSourceError, match=r"named pipe \(FIFO\), not a regular file"):
        classify_source(str(fifo))
    with pytest.raises(InvalidSourceError, match="character device"):
        classify_source("/dev/zero")
    link = tmp_path / "zero.mp4"
    link.symlink_to("/dev/zero")  # what counts is what would be read
    with pytest.raises(InvalidSourceError, match="character device"):
        classify_source(str(link))


# -- download_url ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local test server is on 127.0.0.1, which the URL guard refuses unless told otherwise
    (test_url_guard.py checks the refusals)."""
    monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", "1")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/busy"):
            self.send_error(503, "try later")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("www")
    make_video(root / "video.mp4", (0.5, 0.5))
    (root / "page.html").write_text("<html><head><title>Hi</title></head><body>no video</body></html>")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()
    srv.server_close()


def test_download_direct_mp4_under_our_name(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    dest = tmp_path / "dl"
    res = download_url(f"{base}/video.mp4", dest, basename="source_42")
    assert res.path == (dest / "source_42.mp4").resolve()
    assert res.path.read_bytes() == (root / "video.mp4").read_bytes()
    assert res.size_bytes == (root / "video.mp4").stat().st_size
    assert res.source_url == f"{base}/video.mp4"
    assert res.title == "video"
    assert sorted(p.name for p in dest.iterdir()) == ["source_42.mp4"]
    assert probe(res.path).frame_count == 24


@pytest.mark.parametrize(
    "path,error,words",
    [
        ("/missing.mp4", InvalidSourceError, "HTTP 404"),
        ("/page.html", InvalidSourceError, "unsupported URL"),
        ("/busy.mp4", TransientError, "503"),
    ],
)
def test_download_errors_are_classified(
    server: tuple[str, Path], tmp_path: Path, path: str, error: type[Exception], words: str
) -> None:
    base, _ = server
    dest = tmp_path / "dl"
    with pytest.raises(error) as err:
        download_url(base + path, dest)
    assert words in str(err.value)
    assert base + path in str(err.value)
    assert classify(err.value) == ("transient" if error is TransientError else "permanent")
    assert list(dest.iterdir()) == []  # no partial files left behind


def test_unreachable_host_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientError) as err:
        download_url(f"http://127.0.0.1:{port}/v.mp4", tmp_path)
    assert "network error" in str(err.value)
    assert classify(err.value) == "transient"


def test_download_refuses_non_urls_and_unsafe_names(server: tuple[str, Path], tmp_path: Path) -> None:
    base, root = server
    with pytest.raises(InvalidSourceError):
        download_url("ftp://example.com/v.mp4", tmp_path)
    with pytest.raises(PermanentError):
        download_url(str(root / "video.mp4"), tmp_path)
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            download_url(f"{base}/video.mp4", tmp_path, basename=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "message,expected",
    [
        ("ERROR: [youtube] abc: Private video. Sign in if you've been granted access", "permanent"),
        ("ERROR: [youtube] abc: Video unavailable", "permanent"),
        ("ERROR: Unable to download webpage: HTTP Error 503: Service Unavailable", "transient"),
        ("ERROR: Unable to download webpage: The read operation timed out", "transient"),
        ("ERROR: [generic] x: HTTP Error 410: Gone", "permanent"),
    ],
)
def test_yt_dlp_messages_are_classified(message: str, expected: str) -> None:
    from yt_dlp.utils import DownloadError

    from heaters_dagster.media.fetch import _map_error

    mapped = _map_error("https://example.com/v", DownloadError(message))
    assert classify(mapped) == expected
    assert "https://example.com/v" in str(mapped)
