"""Deciding what a submitted source is, and downloading URLs with yt-dlp.

Only ``http``/``https`` URLs and existing local files are accepted. Downloads always land in a
folder we choose under a name we choose (never one derived from the remote title), and failures
are mapped onto the error taxonomy: network trouble is transient, a URL that names nothing
downloadable is permanent.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from heaters_dagster.errors import InvalidSourceError, PermanentError, TransientError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.subprocess_guard import Supervised
from heaters_dagster.media.url_guard import follow_redirects

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
    if "\x00" in text:
        raise InvalidSourceError(f"local path contains a NUL character: {text!r}")
    path = Path(text).expanduser()
    try:
        st = os.stat(path)  # follows symlinks: what counts is what would be read
    except FileNotFoundError:
        raise InvalidSourceError(f"local file not found: {path.resolve()} ({_ACCEPTED})") from None
    except OSError as exc:
        raise InvalidSourceError(f"cannot read local path {path.resolve()}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidSourceError(f"local path is a directory, not a video file: {path.resolve()}")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidSourceError(
            f"local path is a {special_file_kind(st.st_mode)}, not a regular file: {path.resolve()}; "
            "only regular video files are accepted"
        )
    return "file", str(path.resolve())


def special_file_kind(mode: int) -> str:
    """A person's name for a non-regular file type ("named pipe (FIFO)", "character device", ...)."""
    for test, name in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


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
    PermanentError when the URL names nothing downloadable, MediaTimeoutError when the download
    makes no progress for HEATERS_STALL_TIMEOUT_S or runs past its overall bound (yt-dlp runs in
    a supervised child process, see :func:`_download_in_child`).
    """
    kind, _ = classify_source(url)
    if kind != "url":
        raise InvalidSourceError(f"not a URL: {url!r}")
    # Resolve and check the host and every redirect hop before yt-dlp connects anywhere
    # (media/url_guard.py; a no-op apart from the form check with HEATERS_ALLOW_PRIVATE_URLS).
    follow_redirects(url)
    if not _BASENAME.match(basename):
        raise ValueError(f"basename must be a plain file name stem, got {basename!r}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    _cleanup(dest, basename)

    try:
        path, title = _download_in_child(url, dest, basename)
    except BaseException:  # errors, a stall/overall kill, an interruption: no partial files
        _cleanup(dest, basename)
        raise

    path = path.resolve()
    if path.parent != dest.resolve() or not path.is_file():
        _cleanup(dest, basename)
        raise PermanentError(f"yt-dlp reported {path} which is not a downloaded file in {dest}")
    size = path.stat().st_size
    if size == 0:
        path.unlink(missing_ok=True)
        raise TransientError(f"download of {url} produced an empty file")
    return DownloadResult(
        path=path, title=str(title) if title is not None else None, size_bytes=size, source_url=url
    )



# -- the yt-dlp run itself, in a child process ----------------------------------------------------
_ERROR_TYPES: dict[str, type[Exception]] = {
    "InvalidSourceError": InvalidSourceError, "TransientError": TransientError,
    "PermanentError": PermanentError,
}


def _download_in_child(url: str, dest: Path, basename: str) -> tuple[Path, str | None]:
    """Run :func:`download_here` in ``python -m heaters_dagster.media.ytdlp_child`` under the
    stall and overall limits (progress: the child's I/O and the growth of its files in ``dest``).

    The child reports JSON lines on stdout: ``info`` (the duration, which rescales the overall
    bound), then ``done`` (path, title) or ``error`` (an error type and message, already mapped by
    :func:`_map_error`). yt-dlp's own ffmpeg processes run in the child's process group.
    """
    request = json.dumps({"url": url, "dest": str(dest), "basename": basename, "parent": os.getpid()})
    pattern = f"{glob.escape(basename)}.*"

    def files() -> tuple[tuple[str, int], ...]:
        return tuple(sorted((f.name, f.stat().st_size) for f in dest.glob(pattern)))

    outcome: dict[str, Any] | None = None
    with Supervised(
        [sys.executable, "-m", "heaters_dagster.media.ytdlp_child", request], what=f"download {url}",
        stdout=subprocess.PIPE, watch=files, death_signal=signal.SIGTERM,
    ) as child:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if message.get("event") == "info":
                duration = message.get("duration")
                child.set_duration(float(duration) if isinstance(duration, (int, float)) else None)
            elif message.get("event") in ("done", "error"):
                outcome = message
        rc = child.wait()  # raises MediaTimeoutError when the guard killed it
        stderr = child.stderr.decode("utf-8", "replace")
    if outcome is None:
        if rc < 0:
            raise TransientError(f"download of {url} was killed (signal {-rc})")
        kept = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        raise _map_error(url, RuntimeError("; ".join(kept[-3:]) or f"yt-dlp exited with code {rc}"))
    if outcome["event"] == "error":
        raise _ERROR_TYPES.get(str(outcome.get("type")), PermanentError)(str(outcome.get("message")))
    title = outcome.get("title")
    return Path(str(outcome["path"])), (str(title) if title is not None else None)


def download_here(url: str, dest: Path, basename: str,
                  on_info: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, str | None]:
    """The yt-dlp download in this process (the child runs this); returns (path, title).

    Raises InvalidSourceError / PermanentError / TransientError, or whatever yt-dlp raised (the
    caller maps it with :func:`_map_error`).
    """
    import yt_dlp

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
    with yt_dlp.YoutubeDL(opts) as ydl:
        # Resolve first without downloading, so a playlist is refused rather than fetched whole.
        info = ydl.extract_info(url, download=False, process=False)
        if info is None:
            raise InvalidSourceError(f"nothing downloadable at {url}")
        if info.get("_type") in ("playlist", "multi_video"):
            raise InvalidSourceError(f"URL is a playlist, submit its videos one by one: {url}")
        if on_info is not None:
            on_info(info)
        info = ydl.process_ie_result(info, download=True)
        downloads = info.get("requested_downloads") or []
        target = downloads[-1].get("filepath") if downloads else None
        path = Path(target or ydl.prepare_filename(info))
    title = info.get("title")
    return path, (str(title) if title is not None else None)
