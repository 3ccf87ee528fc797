"""The yt-dlp download as a child process, so that it can be stopped (see fetch.download_url).

``python -m heaters_dagster.media.ytdlp_child '<json request>'`` with the request's ``url``,
``dest``, ``basename`` and ``parent`` (the parent's pid). It runs :func:`fetch.download_here` and
writes JSON lines on stdout (yt-dlp's own output goes to stderr):

* ``{"event": "info", "duration": 12.5}`` once the URL is resolved (duration may be null);
* ``{"event": "done", "path": "...", "title": "..."}``, or
* ``{"event": "error", "type": "TransientError", "message": "..."}``, mapped by ``_map_error``.

It dies with its whole process group (yt-dlp's ffmpeg included) on SIGTERM, which is also its
parent-death signal, and when it notices that its parent is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO


def _kill_group(*_args: Any) -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            _kill_group()
        time.sleep(0.5)


def _emit(out: TextIO, **message: Any) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _kill_group)
    request = json.loads(argv[1])
    parent = int(request["parent"])
    if os.getppid() != parent:
        return 1
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    # Our protocol gets the real stdout; anything printed by libraries goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    from heaters_dagster.errors import InvalidSourceError, PermanentError, TransientError
    from heaters_dagster.media import fetch

    url = str(request["url"])

    def on_info(info: dict[str, Any]) -> None:
        duration = info.get("duration")
        _emit(out, event="info", duration=float(duration) if isinstance(duration, (int, float)) else None)

    try:
        path, title = fetch.download_here(url, Path(request["dest"]), str(request["basename"]), on_info)
    except Exception as exc:  # yt-dlp wraps everything in DownloadError
        mapped = exc if isinstance(exc, (PermanentError, TransientError)) else fetch._map_error(url, exc)
        kind = next((c.__name__ for c in type(mapped).__mro__
                     if c in (InvalidSourceError, TransientError, PermanentError)), "PermanentError")
        _emit(out, event="error", type=kind, message=str(mapped))
        return 0
    _emit(out, event="done", path=str(path), title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
