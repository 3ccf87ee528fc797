"""Error taxonomy shared by media functions and the generic executor (no Dagster imports).

The executor classifies every exception raised by a stage:

* :class:`PermanentError` (and its subclasses) -> the item goes to its failure state with the
  message; retrying would not help (bad input, unsupported media, invalid request).
* :class:`TransientError` -> retried with exponential backoff (a busy database, a network blip,
  a killed ffmpeg process).

Anything else is classified by :func:`classify` using its type.
"""

from __future__ import annotations

import subprocess


class HeatersError(Exception):
    """Base class of every error Heaters raises on purpose."""


class PermanentError(HeatersError):
    """Retrying will not help: the input or the request is wrong."""


class TransientError(HeatersError):
    """A retry may succeed: the failure came from the environment, not from the input."""


class ConfigError(PermanentError, ValueError):
    """A setting (environment or heaters.toml) has a value Heaters cannot use."""


class InvalidMediaError(PermanentError):
    """The media file is missing, empty, not a video, truncated or undecodable."""


class InvalidSourceError(PermanentError):
    """A submission names something Heaters will not fetch (bad scheme, missing path)."""


class MediaTimeoutError(PermanentError):
    """A media command (ffmpeg, ffprobe, the yt-dlp download) was killed at a time limit.

    ``kind`` is ``"stall"`` (no progress for the stall limit) or ``"overall"`` (ran past the bound
    scaled to the media's duration). Permanent: a stalled input stalls again, so the item goes to
    its failure state with the message; an operator can requeue it.
    """

    def __init__(self, message: str, *, what: str = "", kind: str = "stall", limit_s: float = 0.0):
        super().__init__(message)
        self.what = what
        self.kind = kind
        self.limit_s = limit_s


class IllegalTransitionError(PermanentError):
    """A state change that the state machine does not allow."""


class ClaimConflictError(HeatersError):
    """The item was not in the expected state when we tried to claim it (someone else has it)."""


class FFmpegError(HeatersError):
    """ffmpeg/ffprobe exited non-zero. ``permanent`` says whether the input is at fault."""

    def __init__(self, message: str, *, stderr: str = "", permanent: bool = True):
        super().__init__(message)
        self.stderr = stderr
        self.permanent = permanent


def classify(exc: BaseException) -> str:
    """Return ``"permanent"`` or ``"transient"`` for an exception raised by stage code."""
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, FFmpegError):
        return "permanent" if exc.permanent else "transient"
    # Environment-side failures that may go away on their own.
    if isinstance(exc, (subprocess.TimeoutExpired, TimeoutError, ConnectionError, MemoryError)):
        return "transient"
    try:  # database connectivity problems are transient
        from sqlalchemy.exc import DBAPIError, OperationalError

        if isinstance(exc, OperationalError):
            return "transient"
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return "transient"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return "transient"
    # Programming errors and unknown failures: do not hammer them with retries.
    return "permanent"
