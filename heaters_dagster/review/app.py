"""The review web page: a small Starlette app over the review queue and review events.

Routes (JSON unless noted)::

    GET  /                              the page (HTML; static files under /static/)
    GET  /clip/{clip_id}                the page, showing that clip first when it waits for review
                                        (the Dagster UI's sprite materializations link here)
    GET  /api/next?reviewer=NAME        lease the next clip (token) or preview it read-only (no token);
                                        &exclude=1,2 &prefer=ID optional; includes queue_length and
                                        `prefetch` (the next clips' sprite URLs and layouts)
    GET  /api/sprite/{clip_id}          the clip's sprite sheet (image/jpeg, cacheable; 404 if none)
    GET  /api/clips/{clip_id}/thumbnail the sprite's middle frame (image/jpeg, cacheable; shown inline
                                        in the Dagster UI's materialization metadata)
    POST /api/events                    {clip_id, action, payload?, reviewer} -> 201 {id}   (token)
    GET  /api/events/{event_id}         the event's outcome (pending / applied / rejected + reason)
    GET  /api/clips/{clip_id}/neighbours  the live clips of the clip's source (merge/group targets)
    GET  /api/clips/{clip_id}/similar   similar clips, with the model used (model_id, model_source)
    POST /api/clips/{clip_id}/lease     {reviewer}: renew the reviewer's lease      (token)
    POST /api/clips/{clip_id}/release   {reviewer}: give the clip back to the queue (token)

Every write (and leasing a clip) needs the operator's reviewer token in the ``X-Heaters-Token``
header, compared in constant time. With no token configured every write is refused (403) and the
page is read-only: the page may be reachable by anyone on the network. Inputs are validated here
(ids are positive integers in BIGINT range, action names from the schema, reviewer names from a
small alphabet, JSON bodies at most 4 KiB); the meaning of an event (is the clip reviewable, is the
split frame inside it) is checked when the event is applied, and a rejected event keeps its reason,
which the page shows.

Events are applied by the Dagster review sensor; ``apply_events=True`` runs
:func:`~heaters_dagster.review.events.process_pending_events` every ~0.5 s in a background thread
instead, for setups without the Dagster daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import threading
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heaters_dagster.database.models import REVIEW_ACTIONS, Clip, ClipArtifact, ReviewEvent
from heaters_dagster.errors import PermanentError
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.review import queue
from heaters_dagster.review.events import process_pending_events, record_event
from heaters_dagster.state_machine import CLIP_DEAD_STATES
from heaters_dagster.storage import ArtifactStore

log = logging.getLogger("heaters.review")

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE = HERE / "templates" / "index.html"

TOKEN_HEADER = "x-heaters-token"
MAX_BODY = 4096
MAX_ID = 2**63 - 1
MAX_FRAME = 2**31 - 1
MAX_EXCLUDE = 50
PREFETCH = 3
NEIGHBOURS_EACH_SIDE = 60
APPLY_INTERVAL_S = 0.5
REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")
LAYOUT_INT = ("cols", "rows", "tile_width", "tile_height", "frame_count")
LAYOUT_FLOAT = ("effective_fps",)

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store"})


def _ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})


# -- validation --------------------------------------------------------------------------------
def parse_id(value: Any, name: str = "id") -> int:
    """A positive integer in BIGINT range: a JSON int, or a string of at most 19 digits."""
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be a positive integer")
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,19}", value):
            raise BadRequest(f"{name} must be a positive integer")
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise BadRequest(f"{name} must be a positive integer")
    return value


def parse_reviewer(value: Any) -> str:
    if not isinstance(value, str) or not REVIEWER_RE.match(value):
        raise BadRequest("reviewer must be 1-64 characters: letters, digits, space and _ . @ + -")
    return value


def parse_id_list(raw: str | None, name: str) -> list[int]:
    if not raw:
        return []
    parts = raw.split(",")
    if len(parts) > MAX_EXCLUDE:
        raise BadRequest(f"{name} lists at most {MAX_EXCLUDE} ids")
    return [parse_id(p.strip(), name) for p in parts if p.strip()]


def parse_event(body: Any) -> tuple[int, str, dict[str, Any], str]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    extra = set(body) - {"clip_id", "action", "payload", "reviewer"}
    if extra:
        raise BadRequest(f"unexpected fields: {', '.join(sorted(map(str, extra)))}")
    if isinstance(body.get("clip_id"), str):  # ids in an event body are JSON numbers, never strings
        raise BadRequest("clip_id must be a positive integer")
    clip_id = parse_id(body.get("clip_id"), "clip_id")
    action = body.get("action")
    if not isinstance(action, str) or action not in REVIEW_ACTIONS:
        raise BadRequest(f"action must be one of {', '.join(REVIEW_ACTIONS)}")
    payload = body.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BadRequest("payload must be a JSON object")
    for key, value in payload.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{key} must be an integer")
        limit = MAX_FRAME if key == "frame" else MAX_ID
        if not 0 <= value <= limit:
            raise BadRequest(f"{key} is out of range")
        if key == "target_clip_id" and value == 0:
            raise BadRequest("target_clip_id must be a positive integer")
    reviewer = parse_reviewer(body.get("reviewer"))
    return clip_id, action, payload, reviewer


async def read_json(request: Request, limit: int = MAX_BODY) -> Any:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise BadRequest("send JSON (content-type: application/json)", 415)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("bad content-length")
        if int(declared) > limit:
            raise BadRequest(f"body too large (at most {limit} bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body too large (at most {limit} bytes)", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None


# -- serialisation -----------------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def sprite_layout(clip: Clip, meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sprite layout the page needs, checked; None when the stored metadata is unusable."""
    meta = meta or {}
    try:
        layout: dict[str, Any] = {k: int(meta[k]) for k in LAYOUT_INT}
        layout.update({k: float(meta[k]) for k in LAYOUT_FLOAT})
        layout["clip_fps"] = float(meta.get("clip_fps") or clip.fps)
        layout["clip_duration_s"] = float(meta.get("clip_duration_s") or clip.frame_count / clip.fps)
    except (KeyError, TypeError, ValueError):
        return None
    if min(layout[k] for k in LAYOUT_INT) < 1 or layout["effective_fps"] <= 0 or layout["clip_fps"] <= 0:
        return None
    layout["sheet_width"] = int(meta.get("sheet_width") or layout["cols"] * layout["tile_width"])
    layout["sheet_height"] = int(meta.get("sheet_height") or layout["rows"] * layout["tile_height"])
    return layout


def _sprite_version(art: ClipArtifact) -> str:
    stamp = f"{art.id}:{art.storage_key}:{art.size_bytes}:{_iso(art.updated_at)}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def clip_json(clip: Clip, art: ClipArtifact | None) -> dict[str, Any]:
    sprite = None
    if art is not None:
        layout = sprite_layout(clip, art.meta)
        if layout is not None:
            sprite = {"url": f"/api/sprite/{clip.id}?v={_sprite_version(art)}", "layout": layout}
    return {
        "id": clip.id, "source_video_id": clip.source_video_id, "state": clip.state,
        "start_frame": clip.start_frame, "end_frame": clip.end_frame, "frame_count": clip.frame_count,
        "start_s": clip.start_s, "end_s": clip.end_s, "duration_s": clip.end_s - clip.start_s,
        "fps": clip.fps,
        "group_id": clip.group_id, "sprite": sprite,
    }


def _sprites(session: Any, clip_ids: list[int]) -> dict[int, ClipArtifact]:
    if not clip_ids:
        return {}
    rows = session.execute(select(ClipArtifact).where(ClipArtifact.clip_id.in_(clip_ids),
                                                      ClipArtifact.artifact_type == "sprite")
                           .order_by(ClipArtifact.id)).scalars()
    return {a.clip_id: a for a in rows}  # the newest wins


def event_json(ev: ReviewEvent) -> dict[str, Any]:
    outcome = ev.outcome or ("pending" if ev.processed_at is None else None)
    return {"id": ev.id, "clip_id": ev.clip_id, "action": ev.action, "payload": ev.payload,
            "reviewer": ev.reviewer, "outcome": outcome, "reason": ev.reason,
            "processed_at": _iso(ev.processed_at), "undone_by": ev.undone_by}


# -- middleware --------------------------------------------------------------------------------
class SecurityHeaders:
    """Adds CSP and friends to every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class EventApplier:
    """Applies pending review events every ``interval`` seconds in a daemon thread."""

    def __init__(self, database: DatabaseResource, interval: float = APPLY_INTERVAL_S):
        self.database, self.interval = database, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heaters-review-applier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for a in process_pending_events(self.database):
                    log.info("review event %s: %s clip %s -> %s%s", a.event_id, a.action, a.clip_id,
                             a.outcome, f" ({a.reason})" if a.reason else "")
            except Exception:  # keep serving; the next round retries
                log.exception("applying review events failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# -- the app -----------------------------------------------------------------------------------
def _asset_version() -> str:
    h = hashlib.sha256()
    for p in sorted(STATIC_DIR.glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def create_app(database: DatabaseResource, store: ArtifactStore, *, token: str | None,
               apply_events: bool = False, lease_s: float = queue.DEFAULT_LEASE_S,
               prefetch: int = PREFETCH) -> Starlette:
    """The review app. ``token``: the reviewer token every write needs (None or "": read-only)."""
    configured = token or None
    page = TEMPLATE.read_text(encoding="utf-8").replace("{{version}}", _asset_version())

    def auth(request: Request) -> str:
        """'ok', 'missing' (no header), 'wrong', or 'disabled' (no token configured)."""
        given = request.headers.get(TOKEN_HEADER)
        if configured is None:
            return "disabled"
        if given is None or given == "":
            return "missing"
        return "ok" if hmac.compare_digest(given.encode("utf-8"), configured.encode("utf-8")) else "wrong"

    def require_token(request: Request) -> None:
        state = auth(request)
        if state == "disabled":
            raise BadRequest("writes are disabled: the operator has configured no reviewer token", 403)
        if state == "missing":
            raise BadRequest("a reviewer token is required (X-Heaters-Token)", 403)
        if state == "wrong":
            raise BadRequest("wrong reviewer token", 403)

    def endpoint(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except BadRequest as exc:
                return _error(str(exc), exc.status)
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @endpoint
    async def next_clip(request: Request) -> Response:
        q = request.query_params
        state = auth(request)
        if state == "wrong":
            raise BadRequest("wrong reviewer token", 403)
        writable = state == "ok"
        raw_reviewer = q.get("reviewer")
        reviewer = parse_reviewer(raw_reviewer) if (writable or raw_reviewer) else None
        exclude = parse_id_list(q.get("exclude"), "exclude")
        prefer = parse_id(q["prefer"], "prefer") if q.get("prefer") else None

        def work() -> dict[str, Any]:
            with database.session() as s:
                if writable:
                    assert reviewer is not None
                    clip = queue.lease_next(s, reviewer, lease_s=lease_s, exclude_ids=exclude,
                                            prefer_id=prefer)
                else:  # read-only: show what is next without taking it
                    peeked = queue.peek_next(s, None, 1, exclude_ids=exclude, prefer_id=prefer)
                    clip = peeked[0] if peeked else None
                shown = [clip.id] if clip else []
                after = queue.peek_next(s, reviewer, prefetch, exclude_ids=exclude + shown)
                arts = _sprites(s, [c.id for c in ([clip] if clip else []) + after])
                return {
                    "clip": clip_json(clip, arts.get(clip.id)) if clip else None,
                    "leased": writable and clip is not None,
                    "lease_expires_at": _iso(clip.lease_expires_at) if (clip and writable) else None,
                    "lease_s": lease_s,
                    "writable": writable,
                    "auth": state,
                    "queue_length": queue.queue_length(s),
                    "prefetch": [{"id": c.id, "sprite": clip_json(c, arts.get(c.id))["sprite"]}
                                 for c in after],
                }

        return _ok(await run_in_threadpool(work))

    @endpoint
    async def sprite(request: Request) -> Response:
        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> tuple[ClipArtifact | None, str | None]:
            with database.session() as s:
                art = _sprites(s, [clip_id]).get(clip_id)
                return art, (_sprite_version(art) if art else None)

        art, version = await run_in_threadpool(work)
        if art is None:
            raise BadRequest(f"clip {clip_id} has no sprite sheet", 404)
        etag = f'"{version}"'
        headers = {"cache-control": "private, max-age=86400", "etag": etag}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        try:
            if store.is_local:
                path = Path(store.uri(art.storage_key))
                if not path.is_file():
                    raise FileNotFoundError(path)
                return FileResponse(path, media_type="image/jpeg", headers=headers)
            data = await run_in_threadpool(store.read_bytes, art.storage_key)
        except (FileNotFoundError, PermanentError):
            raise BadRequest(f"the sprite sheet of clip {clip_id} is missing from storage", 404) from None
        return Response(data, media_type="image/jpeg", headers=headers)

    @endpoint
    async def post_event(request: Request) -> Response:
        require_token(request)
        clip_id, action, payload, reviewer = parse_event(await read_json(request))

        def work() -> dict[str, Any]:
            with database.session() as s:
                ev = record_event(s, clip_id, action, payload, reviewer)
                if action != "undo":  # the reviewer is done with this clip
                    queue.release(s, clip_id, reviewer)
                return event_json(ev)

        try:
            data = await run_in_threadpool(work)
        except PermanentError as exc:
            raise BadRequest(str(exc)) from None
        return _ok(data, 201)

    @endpoint
    async def get_event(request: Request) -> Response:
        event_id = parse_id(request.path_params["event_id"], "event_id")

        def work() -> dict[str, Any] | None:
            with database.session() as s:
                ev = s.get(ReviewEvent, event_id)
                return event_json(ev) if ev else None

        data = await run_in_threadpool(work)
        return _ok(data) if data else _error(f"event {event_id} does not exist", 404)

    @endpoint
    async def neighbours(request: Request) -> Response:
        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> dict[str, Any] | None:
            with database.session() as s:
                clip = s.get(Clip, clip_id)
                if clip is None:
                    return None
                live = (select(Clip).where(Clip.source_video_id == clip.source_video_id,
                                           Clip.state.not_in(tuple(CLIP_DEAD_STATES))))
                before = s.execute(live.where(Clip.start_frame < clip.start_frame)
                                   .order_by(Clip.start_frame.desc(), Clip.id.desc())
                                   .limit(NEIGHBOURS_EACH_SIDE)).scalars().all()
                after = s.execute(live.where(Clip.start_frame >= clip.start_frame, Clip.id != clip.id)
                                  .order_by(Clip.start_frame, Clip.id)
                                  .limit(NEIGHBOURS_EACH_SIDE)).scalars().all()
                rows = list(reversed(before)) + [clip] + list(after)

                def relation(c: Clip) -> str | None:
                    if c.id == clip.id:
                        return "current"
                    if c.end_frame == clip.start_frame:
                        return "previous"
                    if c.start_frame == clip.end_frame:
                        return "next"
                    return None

                return {"clip_id": clip.id, "source_video_id": clip.source_video_id, "clips": [
                    {"id": c.id, "start_frame": c.start_frame, "end_frame": c.end_frame, "start_s": c.start_s,
                     "end_s": c.end_s, "state": c.state, "group_id": c.group_id, "relation": relation(c)}
                    for c in rows]}

        data = await run_in_threadpool(work)
        return _ok(data) if data else _error(f"clip {clip_id} does not exist", 404)

    @endpoint
    async def thumbnail(request: Request) -> Response:
        from heaters_dagster.review.similar import middle_tile

        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> tuple[bytes | None, str | None]:
            with database.session() as s:
                art = _sprites(s, [clip_id]).get(clip_id)
                if art is None:
                    return None, None
                meta, key, version = art.meta, art.storage_key, _sprite_version(art)
            try:
                tile = middle_tile(store.read_bytes(key), meta)
            except (FileNotFoundError, PermanentError, KeyError, ValueError, OSError):
                return None, version
            buf = io.BytesIO()
            tile.save(buf, "JPEG", quality=85)
            return buf.getvalue(), version

        data, version = await run_in_threadpool(work)
        if data is None:
            raise BadRequest(f"clip {clip_id} has no sprite sheet" if version is None
                             else f"the sprite sheet of clip {clip_id} is missing from storage", 404)
        return Response(data, media_type="image/jpeg",
                        headers={"cache-control": "private, max-age=86400", "etag": f'"{version}-thumb"'})

    @endpoint
    async def similar(request: Request) -> Response:
        from heaters_dagster.errors import HeatersError
        from heaters_dagster.review.similar import similar_clips

        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> Response:
            try:
                with database.session() as s:
                    return _ok(similar_clips(s, store, clip_id))
            except LookupError as exc:
                return _error(str(exc), 404)
            except HeatersError as exc:  # no sprite yet, model weights not available offline, ...
                return _error(str(exc), 503)

        return await run_in_threadpool(work)

    def lease_route(renew: bool) -> Callable[[Request], Any]:
        @endpoint
        async def handler(request: Request) -> Response:
            require_token(request)
            clip_id = parse_id(request.path_params["clip_id"], "clip_id")
            body = await read_json(request)
            if not isinstance(body, dict) or set(body) - {"reviewer"}:
                raise BadRequest("the body must be {\"reviewer\": NAME}")
            reviewer = parse_reviewer(body.get("reviewer"))

            def work() -> bool:
                with database.session() as s:
                    if renew:
                        return queue.renew(s, clip_id, reviewer, lease_s=lease_s)
                    return queue.release(s, clip_id, reviewer)

            done = await run_in_threadpool(work)
            if renew and not done:
                return _error(f"clip {clip_id} is no longer leased to {reviewer}", 409)
            return _ok({"clip_id": clip_id, "renewed" if renew else "released": done})
        return handler

    applier = EventApplier(database) if apply_events else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if applier is not None:
            applier.start()
        try:
            yield
        finally:
            if applier is not None:
                applier.stop()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/clip/{clip_id:int}", index, methods=["GET"]),
        Route("/api/next", next_clip, methods=["GET"]),
        Route("/api/sprite/{clip_id}", sprite, methods=["GET"]),
        Route("/api/clips/{clip_id}/thumbnail", thumbnail, methods=["GET"]),
        Route("/api/events", post_event, methods=["POST"]),
        Route("/api/events/{event_id}", get_event, methods=["GET"]),
        Route("/api/clips/{clip_id}/neighbours", neighbours, methods=["GET"]),
        Route("/api/clips/{clip_id}/similar", similar, methods=["GET"]),
        Route("/api/clips/{clip_id}/lease", lease_route(True), methods=["POST"]),
        Route("/api/clips/{clip_id}/release", lease_route(False), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(SecurityHeaders)
    app.state.token_configured = configured is not None
    app.state.applier = applier
    return app


class RedactTokenFilter(logging.Filter):
    """Keeps a ``?token=`` handed to the page out of the access log."""

    _re = re.compile(r"([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._re.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def serve(host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          apply_events: bool = False) -> None:
    """Serve the review page with uvicorn (blocks). The database and store come from the settings."""
    import uvicorn

    from heaters_dagster.settings import storage_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactTokenFilter())
    app = create_app(DatabaseResource(), ArtifactStore(storage_url()), token=token, apply_events=apply_events)
    log.info("review page on http://%s:%s/ (%s)", host, port,
             "writes need the reviewer token" if token else "read-only: no reviewer token configured")
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False, server_header=False)
