"""Locating and running ffmpeg/ffprobe.

The binaries come from the system (the setup installs Debian's ``ffmpeg`` package); they can be
overridden with ``HEATERS_FFMPEG`` / ``HEATERS_FFPROBE``. Every invocation goes through
:func:`run` so that failures raise :class:`~heaters_dagster.errors.FFmpegError` with the tail of
ffmpeg's own message, and a process-wide semaphore bounds how many ffmpeg processes run at once
(the old system was OOM-killed by many concurrent encodes). Each process is supervised by
:mod:`heaters_dagster.media.subprocess_guard`: its own process group, killed with the parent,
a stall limit and an overall bound scaled to the media's duration (``duration_s``).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from functools import lru_cache
from typing import Sequence

from heaters_dagster.errors import FFmpegError
from heaters_dagster.media.subprocess_guard import Supervised, kill_all_children

__all__ = ["ffmpeg_bin", "ffprobe_bin", "kill_all_children", "run", "slot"]

_slots: threading.BoundedSemaphore | None = None
_slots_lock = threading.Lock()


def _get_slots() -> threading.BoundedSemaphore:
    """The process-wide bound (HEATERS_MAX_FFMPEG), fixed when the first ffmpeg starts."""
    global _slots
    with _slots_lock:
        if _slots is None:
            from heaters_dagster.settings import get_settings

            _slots = threading.BoundedSemaphore(max(1, get_settings().max_ffmpeg))
        return _slots


@lru_cache(maxsize=None)
def ffmpeg_bin() -> str:
    return _find("HEATERS_FFMPEG", "ffmpeg")


@lru_cache(maxsize=None)
def ffprobe_bin() -> str:
    return _find("HEATERS_FFPROBE", "ffprobe")


def _find(env: str, name: str) -> str:
    from heaters_dagster.settings import get_settings

    path = getattr(get_settings(), name) or shutil.which(name)
    if not path:
        raise FFmpegError(
            f"{name} not found on PATH; run the setup (scripts/setup.sh installs Debian's ffmpeg) "
            f"or set {env}",
            permanent=False,
        )
    return path


def _tail(text: str, lines: int = 6) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def run(
    args: Sequence[str],
    *,
    what: str,
    timeout: float | None = None,
    capture_stdout: bool = True,
    duration_s: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ffmpeg/ffprobe (``args[0]`` is the binary) and raise FFmpegError on failure.

    ``what`` names the operation in the error message ("normalise source video 12").
    ``duration_s`` (seconds of media the command handles) scales the overall time bound; a
    stall or overall expiry raises MediaTimeoutError. ``timeout`` is an extra hard limit that
    raises a transient FFmpegError, as before.
    """
    with _get_slots():
        with Supervised(
            args, what=what, duration_s=duration_s, timeout=timeout,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
        ) as child:
            stdout, stderr_b, returncode = child.communicate()
    proc = subprocess.CompletedProcess(list(args), returncode, stdout if capture_stdout else None, stderr_b)
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        # Killed by a signal (OOM killer, operator): the input is not at fault.
        permanent = proc.returncode > 0
        raise FFmpegError(f"{what}: {_tail(stderr) or f'exit code {proc.returncode}'}", stderr=stderr, permanent=permanent)
    return proc


def slot() -> threading.BoundedSemaphore:
    """The semaphore bounding concurrent ffmpeg processes, for callers that stream via Popen."""
    return _get_slots()
