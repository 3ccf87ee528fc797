"""The review app's media: the clip video (HTTP range requests), sprite sheets, thumbnails, favicon.

``GET /api/clips/{id}/video`` serves the clip's MP4 with ``Accept-Ranges: bytes``: a ``Range``
request is answered ``206 Partial Content`` (what a ``<video>`` element asks for when it seeks),
a range past the end ``416``. Responses are cacheable (the URL carries a version that changes with
the file), so the page's prefetch of the next clip is reused when that clip is shown.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from heaters_dagster.database.models import Clip, ClipArtifact
from heaters_dagster.errors import PermanentError
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.review.http import BadRequest, parse_id
from heaters_dagster.review.serialize import sprite_version, sprites, video_version
from heaters_dagster.storage import ArtifactStore

log = logging.getLogger("heaters.review")

HERE = Path(__file__).resolve().parent
FAVICON = HERE / "static" / "favicon.svg"
CACHE = "private, max-age=86400"
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single ``bytes=a-b`` / ``a-`` / ``-n`` range of a Range header as [start, end)
    (None: no or unusable header, answer the whole file). Raises BadRequest(416) when it starts
    past the end."""
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":  # the last n bytes
        n = int(m.group(2))
        return (max(0, size - n), size) if n else None
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size:
        raise BadRequest("range not satisfiable", 416)
    return (start, end) if end > start else None


def media_routes(database: DatabaseResource, store: ArtifactStore,
                 endpoint: Callable[[Callable[[Request], Any]], Callable[[Request], Any]]) -> list[Route]:

    @endpoint
    async def video(request: Request) -> Response:
        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> tuple[str | None, str | None]:
            with database.session() as s:
                clip = s.get(Clip, clip_id)
                if clip is None or clip.file_deleted or not clip.file_key:
                    return None, None
                return clip.file_key, video_version(clip)

        key, version = await run_in_threadpool(work)
        if key is None:
            raise BadRequest(f"clip {clip_id} has no video file", 404)
        headers = {"cache-control": CACHE, "accept-ranges": "bytes"}
        try:
            if store.is_local:
                path = Path(store.uri(key))
                if not path.is_file():
                    raise FileNotFoundError(clip_id)
                # Starlette answers Range requests with 206 (and If-Range with the ETag it sets).
                return FileResponse(path, media_type="video/mp4", headers=headers)
            data = await run_in_threadpool(store.read_bytes, key)
        except (FileNotFoundError, PermanentError):
            log.warning("clip %s: video file %s is missing from storage", clip_id, key)
            raise BadRequest(f"the video of clip {clip_id} is missing from storage", 404) from None
        headers["etag"] = f'"{version}"'
        rng = byte_range(request.headers.get("range"), len(data))
        if rng is None:
            return Response(data, media_type="video/mp4", headers=headers)
        start, end = rng
        headers["content-range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return Response(data[start:end], status_code=206, media_type="video/mp4", headers=headers)

    @endpoint
    async def sprite(request: Request) -> Response:
        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> tuple[ClipArtifact | None, str | None]:
            with database.session() as s:
                art = sprites(s, [clip_id]).get(clip_id)
                return art, (sprite_version(art) if art else None)

        art, version = await run_in_threadpool(work)
        if art is None:
            raise BadRequest(f"clip {clip_id} has no sprite sheet", 404)
        etag = f'"{version}"'
        headers = {"cache-control": CACHE, "etag": etag}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        try:
            if store.is_local:
                path = Path(store.uri(art.storage_key))
                if not path.is_file():
                    raise FileNotFoundError(clip_id)
                return FileResponse(path, media_type="image/jpeg", headers=headers)
            data = await run_in_threadpool(store.read_bytes, art.storage_key)
        except (FileNotFoundError, PermanentError):
            log.warning("clip %s: sprite %s is missing from storage", clip_id, art.storage_key)
            raise BadRequest(f"the sprite sheet of clip {clip_id} is missing from storage", 404) from None
        return Response(data, media_type="image/jpeg", headers=headers)

    @endpoint
    async def thumbnail(request: Request) -> Response:
        from heaters_dagster.review.similar import middle_tile

        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> tuple[bytes | None, str | None]:
            with database.session() as s:
                art = sprites(s, [clip_id]).get(clip_id)
                if art is None:
                    return None, None
                meta, key, version = art.meta, art.storage_key, sprite_version(art)
            try:
                tile = middle_tile(store.read_bytes(key), meta)
            except (FileNotFoundError, PermanentError, KeyError, ValueError, OSError) as exc:
                log.warning("clip %s: no thumbnail from sprite %s: %s", clip_id, key, exc)
                return None, version
            buf = io.BytesIO()
            tile.save(buf, "JPEG", quality=85)
            return buf.getvalue(), version

        data, version = await run_in_threadpool(work)
        if data is None:
            raise BadRequest(f"clip {clip_id} has no sprite sheet" if version is None
                             else f"the sprite sheet of clip {clip_id} is missing from storage", 404)
        return Response(data, media_type="image/jpeg",
                        headers={"cache-control": CACHE, "etag": f'"{version}-thumb"'})

    async def favicon(request: Request) -> Response:
        return FileResponse(FAVICON, media_type="image/svg+xml", headers={"cache-control": "public, max-age=604800"})

    return [
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/api/clips/{clip_id}/video", video, methods=["GET"]),
        Route("/api/sprite/{clip_id}", sprite, methods=["GET"]),
        Route("/api/clips/{clip_id}/thumbnail", thumbnail, methods=["GET"]),
    ]

