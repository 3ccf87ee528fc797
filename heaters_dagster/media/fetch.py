"""Deciding what a submitted source is, and downloading URLs with yt-dlp.

Only ``http``/``https`` URLs and existing local files are accepted. Downloads always land in a
folder we choose under a name we choose (never one derived from the remote title), and failures
are mapped onto the error taxonomy: network trouble is transient, a URL that names nothing
downloadable is permanent.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from heaters_dagster.errors import InvalidSourceError, PermanentError, TransientError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin

_ACCEPTED = "only http and https URLs or local file paths are accepted"
_BASENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# HTTP statuses worth retrying: timeouts, rate limits and server-side failures.
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_HINTS = (
    "timed out", "timeout", "connection refused", "connection reset", "connection aborted",
    "temporary failure in name resolution", "network is unreachable", "remote end closed",
    "incomplete read", "incompleteread", "broken pipe", "eof occurred", "no route to host",
    "try again later", "service unavailable", "too many requests", "http error 429", "http error 5",
)
_PERMANENT_HINTS = (
    "unsupported url", "http error 404", "http error 410", "private video", "video unavailable",
    "this video is unavailable", "has been removed",
)


log = logging.getLogger(__name__)


class _YtdlpLogger:
    """Routes yt-dlp's console output to logging (errors surface as exceptions anyway)."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def info(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    def warning(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    title: str | None
    size_bytes: int
    source_url: str


def classify_source(uri: str) -> tuple[str, str]:
    """Return ``("url", uri)`` for http(s) URLs or ``("file", absolute_path)`` for a local file."""
    text = (uri or "").strip()
    if not text:
        raise InvalidSourceError(f"empty source: {_ACCEPTED}")
    parsed = urlparse(text)
    if "://" in text:
        scheme = parsed.scheme.lower()
        if scheme in ("http", "https"):
            if not parsed.netloc:
                raise InvalidSourceError(f"URL has no host: {text!r}")
            return "url", text
        raise InvalidSourceError(f"unsupported source {text!r} (scheme {scheme}://): {_ACCEPTED}")
    path = Path(text).expanduser()
    if not path.exists():
        raise InvalidSourceError(f"local file not found: {path.resolve()} ({_ACCEPTED})")
    if path.is_dir():
        raise InvalidSourceError(f"local path is a directory, not a video file: {path.resolve()}")
    return "file", str(path.resolve())


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (yt-dlp's exc_info/cause, then __cause__/__context__)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop(0)
        if cur is None or any(cur is s for s in seen):
            continue
        seen.append(cur)
        exc_info = getattr(cur, "exc_info", None)
        if isinstance(exc_info, tuple) and len(exc_info) > 1 and isinstance(exc_info[1], BaseException):
            todo.append(exc_info[1])
        cause = getattr(cur, "cause", None)
        if isinstance(cause, BaseException):
            todo.append(cause)
        todo += [cur.__cause__, cur.__context__]
    return seen


def _map_error(url: str, exc: BaseException) -> Exception:
    """Turn a yt-dlp failure into TransientError or InvalidSourceError with a readable message."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import UnsupportedError

    message = re.sub(r"^ERROR:\s*", "", str(exc)).strip() or type(exc).__name__
    chain = _causes(exc)
    for err in chain:
        if isinstance(err, UnsupportedError):
            return InvalidSourceError(f"unsupported URL (nothing downloadable found): {url}")
        if isinstance(err, HTTPError):
            status = int(getattr(err, "status", 0) or 0)
            if status in _RETRYABLE_STATUS or status >= 500:
                return TransientError(f"download failed with HTTP {status}, will retry: {url}")
            return InvalidSourceError(f"download failed with HTTP {status}: {url}")
    for err in chain:
        if isinstance(err, (TransportError, ConnectionError, TimeoutError)):
            return TransientError(f"network error while downloading {url}: {message}")
    lowered = message.lower()
    if any(hint in lowered for hint in _TRANSIENT_HINTS):
        return TransientError(f"network error while downloading {url}: {message}")
    if any(hint in lowered for hint in _PERMANENT_HINTS):
        return InvalidSourceError(f"cannot download {url}: {message}")
    return PermanentError(f"download failed: {url}: {message}")


def _cleanup(dest_dir: Path, basename: str) -> None:
    """Remove partial files yt-dlp left for ``basename`` (``.part``, fragments, unmerged formats)."""
    for leftover in dest_dir.glob(f"{glob.escape(basename)}.*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def download_url(url: str, dest_dir: Path, *, basename: str = "download") -> DownloadResult:
    """Download ``url`` with yt-dlp into ``dest_dir/<basename>.<ext>`` (merged to MP4 if split).

    Raises TransientError for network trouble (retry later) and InvalidSourceError /
    PermanentError when the URL names nothing downloadable.
    """
    import yt_dlp

    kind, _ = classify_source(url)
    if kind != "url":
        raise InvalidSourceError(f"not a URL: {url!r}")
    if not _BASENAME.match(basename):
        raise ValueError(f"basename must be a plain file name stem, got {basename!r}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    _cleanup(dest, basename)

    opts: dict[str, Any] = {
        "outtmpl": {"default": str(dest / f"{basename}.%(ext)s")},
        "restrictfilenames": True,
        "noplaylist": True,
        "retries": 5,
        "fragment_retries": 10,
        "socket_timeout": 120,
        "merge_output_format": "mp4",
        "ffmpeg_location": ffmpeg_bin(),
        "logger": _YtdlpLogger(),
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "cachedir": False,
        "overwrites": True,
    }
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            # Resolve first without downloading, so a playlist is refused rather than fetched whole.
            info = ydl.extract_info(url, download=False, process=False)
            if info is None:
                raise InvalidSourceError(f"nothing downloadable at {url}")
            if info.get("_type") in ("playlist", "multi_video"):
                raise InvalidSourceError(f"URL is a playlist, submit its videos one by one: {url}")
            info = ydl.process_ie_result(info, download=True)
            downloads = info.get("requested_downloads") or []
            target = downloads[-1].get("filepath") if downloads else None
            path = Path(target or ydl.prepare_filename(info))
    except (InvalidSourceError, PermanentError, TransientError):
        _cleanup(dest, basename)
        raise
    except Exception as exc:  # yt-dlp wraps everything in DownloadError
        _cleanup(dest, basename)
        raise _map_error(url, exc) from exc

    path = path.resolve()
    if path.parent != dest.resolve() or not path.is_file():
        _cleanup(dest, basename)
        raise PermanentError(f"yt-dlp reported {path} which is not a downloaded file in {dest}")
    size = path.stat().st_size
    if size == 0:
        path.unlink(missing_ok=True)
        raise TransientError(f"download of {url} produced an empty file")
    title = info.get("title")
    return DownloadResult(
        path=path, title=str(title) if title is not None else None, size_bytes=size, source_url=url
    )

