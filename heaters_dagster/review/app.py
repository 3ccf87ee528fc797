"""The review web page: a small Starlette app over the review queue and review events.

Routes (JSON unless noted)::

    GET  /                              the page (HTML; static files under /static/)
    GET  /clip/{clip_id}                the page, showing that clip first when it waits for review
                                        (the Dagster UI's sprite materializations link here)
    GET  /api/session                   whether the X-Heaters-Token header is right (auth, writable)
    GET  /api/next?reviewer=NAME        lease the next clip (token) or preview it read-only (no token);
                                        &session=ID (the tab's lease identity), &exclude=1,2 &prefer=ID
                                        optional; includes queue_length and `prefetch` (the next
                                        clips' video and sprite URLs, video sizes)
    GET  /api/clips/{clip_id}/video     the clip's MP4 (Range requests: 206; cacheable)
    GET  /api/sprite/{clip_id}          the clip's sprite sheet (image/jpeg, cacheable; 404 if none)
    GET  /api/clips/{clip_id}/thumbnail the sprite's middle frame (image/jpeg, cacheable; shown inline
                                        in the Dagster UI's materialization metadata)
    POST /api/events                    {clip_id, action, payload?, reviewer, session?} -> 201 {id} (token)
    GET  /api/events/{event_id}         the event's outcome (pending / applied / rejected + reason)
    GET  /api/undoable?reviewer=NAME    the reviewer's recent events an undo would reverse   (token)
    GET  /api/clips/{clip_id}/neighbours  the live clips of the clip's source (merge/group targets),
                                        and whether a merge is possible (and why not)
    GET  /api/clips/{clip_id}/similar   similar clips, with the model used (model_id, model_source),
                                        or `unavailable`: one line saying why there are none
    POST /api/clips/{clip_id}/lease     {reviewer, session?}: renew the lease             (token)
    POST /api/clips/{clip_id}/release   {reviewer, session?}: give the clip back           (token)

Every write (and leasing a clip) needs the operator's reviewer token in the ``X-Heaters-Token``
header, compared in constant time. With no token configured every write is refused (403) and the
page is read-only: the page may be reachable by anyone on the network. Inputs are validated in
:mod:`.http`; the meaning of an event (is the clip reviewable, is the split frame inside it) is
checked when the event is applied, and a rejected event keeps its reason, which the page shows.
Errors are one line; details (paths, tracebacks) go to the server log only.

A lease belongs to ``reviewer#session`` when the page sends its session id (one per browser tab),
so two tabs signed in with the same name never hold the same clip; events are recorded under the
reviewer's name, so undo works from any of the reviewer's tabs and after a reload.

Events are applied by the Dagster review sensor; ``apply_events=True`` runs
:func:`~heaters_dagster.review.events.process_pending_events` every ~0.5 s in a background thread
instead, for setups without the Dagster daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from heaters_dagster.database.models import Clip, ReviewEvent
from heaters_dagster.errors import HeatersError, PermanentError
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.review import queue
from heaters_dagster.review.events import (
    MERGE_TARGETS, REVIEWABLE, process_pending_events, record_event, undo_window_s, undoable_events,
)
from heaters_dagster.review.http import (  # noqa: F401 - re-exported for callers and tests
    MAX_BODY, BadRequest, RedactTokenFilter, SecurityHeaders, error, lease_owner, ok, parse_event, parse_id,
    parse_id_list, parse_reviewer, parse_session, read_json,
)
from heaters_dagster.review.media_routes import media_routes
from heaters_dagster.review.serialize import clip_json, event_json, iso, sprites, video_size
from heaters_dagster.state_machine import CLIP_DEAD_STATES
from heaters_dagster.storage import ArtifactStore

log = logging.getLogger("heaters.review")

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE = HERE / "templates" / "index.html"

TOKEN_HEADER = "x-heaters-token"
PREFETCH = 3
NEIGHBOURS_EACH_SIDE = 60
APPLY_INTERVAL_S = 0.5


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


def _asset_version() -> str:
    h = hashlib.sha256()
    for p in sorted(STATIC_DIR.glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def merge_option(clip: Clip, rows: list[Clip]) -> dict[str, Any]:
    """Whether F (merge with the clip right before) can work now, with the same rules the applier
    uses, and why not: the page offers merge only when it can."""
    prev = next((c for c in rows if c.end_frame == clip.start_frame and c.id != clip.id), None)
    if clip.state not in REVIEWABLE:
        return {"possible": False, "target": None,
                "reason": f"this clip is {clip.state.replace('_', ' ')}"}
    if prev is None:
        return {"possible": False, "target": None, "reason": "no live clip right before this one"}
    if prev.state not in MERGE_TARGETS:
        return {"possible": False, "target": prev.id,
                "reason": f"the clip before (#{prev.id}) is {prev.state.replace('_', ' ')}"}
    return {"possible": True, "target": prev.id, "reason": None}


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
                return error(str(exc), exc.status)
            except Exception:  # one line for the page, the traceback for the log
                log.exception("%s %s failed", request.method, request.url.path)
                return error("the review server failed on this request (see its log)", 500)
        return wrapped

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @endpoint
    async def session_info(request: Request) -> Response:
        state = auth(request)
        return ok({"auth": state, "writable": state == "ok", "token_configured": configured is not None,
                   "lease_s": lease_s, "undo_window_s": undo_window_s()})

    @endpoint
    async def next_clip(request: Request) -> Response:
        q = request.query_params
        state = auth(request)
        if state == "wrong":
            raise BadRequest("wrong reviewer token", 403)
        writable = state == "ok"
        raw_reviewer = q.get("reviewer")
        reviewer = parse_reviewer(raw_reviewer) if (writable or raw_reviewer) else None
        owner = lease_owner(reviewer, parse_session(q.get("session"))) if reviewer else None
        exclude = parse_id_list(q.get("exclude"), "exclude")
        prefer = parse_id(q["prefer"], "prefer") if q.get("prefer") else None

        def work() -> dict[str, Any]:
            with database.session() as s:
                if writable:
                    assert owner is not None
                    clip = queue.lease_next(s, owner, lease_s=lease_s, exclude_ids=exclude, prefer_id=prefer)
                else:  # read-only: show what is next without taking it
                    peeked = queue.peek_next(s, None, 1, exclude_ids=exclude, prefer_id=prefer)
                    clip = peeked[0] if peeked else None
                shown = [clip.id] if clip else []
                after = queue.peek_next(s, owner, prefetch, exclude_ids=exclude + shown)
                everything = ([clip] if clip else []) + after
                arts = sprites(s, [c.id for c in everything])
                sizes = {c.id: video_size(store, c) for c in everything}

                def as_json(c: Clip) -> dict[str, Any]:
                    return clip_json(c, arts.get(c.id), sizes[c.id])

                return {
                    "clip": as_json(clip) if clip else None,
                    "leased": writable and clip is not None,
                    "lease_expires_at": iso(clip.lease_expires_at) if (clip and writable) else None,
                    "lease_s": lease_s,
                    "writable": writable,
                    "auth": state,
                    "queue_length": queue.queue_length(s),
                    "prefetch": [{k: v for k, v in as_json(c).items() if k in ("id", "sprite", "video")}
                                 for c in after],
                }

        return ok(await run_in_threadpool(work))

    @endpoint
    async def post_event(request: Request) -> Response:
        require_token(request)
        clip_id, action, payload, reviewer, session = parse_event(await read_json(request))

        def work() -> dict[str, Any]:
            with database.session() as s:
                ev = record_event(s, clip_id, action, payload, reviewer)
                if action != "undo":  # the reviewer is done with this clip
                    queue.release(s, clip_id, lease_owner(reviewer, session))
                return event_json(ev)

        try:
            data = await run_in_threadpool(work)
        except PermanentError as exc:
            raise BadRequest(str(exc)) from None
        return ok(data, 201)

    @endpoint
    async def get_event(request: Request) -> Response:
        event_id = parse_id(request.path_params["event_id"], "event_id")

        def work() -> dict[str, Any] | None:
            with database.session() as s:
                ev = s.get(ReviewEvent, event_id)
                return event_json(ev) if ev else None

        data = await run_in_threadpool(work)
        return ok(data) if data else error(f"event {event_id} does not exist", 404)

    @endpoint
    async def undoable(request: Request) -> Response:
        require_token(request)
        reviewer = parse_reviewer(request.query_params.get("reviewer"))

        def work() -> dict[str, Any]:
            with database.session() as s:
                return {"reviewer": reviewer, "undo_window_s": undo_window_s(),
                        "events": [event_json(ev) for ev in undoable_events(s, reviewer)]}

        return ok(await run_in_threadpool(work))

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

                return {"clip_id": clip.id, "source_video_id": clip.source_video_id,
                        "merge": merge_option(clip, rows), "clips": [
                            {"id": c.id, "start_frame": c.start_frame, "end_frame": c.end_frame,
                             "start_s": c.start_s, "end_s": c.end_s, "state": c.state, "group_id": c.group_id,
                             "relation": relation(c)}
                            for c in rows]}

        data = await run_in_threadpool(work)
        return ok(data) if data else error(f"clip {clip_id} does not exist", 404)

    @endpoint
    async def similar(request: Request) -> Response:
        from heaters_dagster.review.similar import SimilarUnavailable, similar_clips

        clip_id = parse_id(request.path_params["clip_id"], "clip_id")

        def work() -> Response:
            try:
                with database.session() as s:
                    return ok(similar_clips(s, store, clip_id))
            except LookupError as exc:
                return error(str(exc), 404)
            except SimilarUnavailable as exc:  # an answer, not a failure: the page shows the line
                log.warning("similar clips of clip %s unavailable: %s (%s)", clip_id, exc.reason,
                            exc.__cause__ or "no detail")
                return ok({"clip_id": clip_id, "clips": [], "unavailable": f"similar clips unavailable: {exc.reason}"})
            except HeatersError:
                log.warning("similar clips of clip %s unavailable", clip_id, exc_info=True)
                return ok({"clip_id": clip_id, "clips": [], "unavailable": "similar clips unavailable"})

        return await run_in_threadpool(work)

    def lease_route(renew: bool) -> Callable[[Request], Any]:
        @endpoint
        async def handler(request: Request) -> Response:
            require_token(request)
            clip_id = parse_id(request.path_params["clip_id"], "clip_id")
            body = await read_json(request)
            if not isinstance(body, dict) or set(body) - {"reviewer", "session"}:
                raise BadRequest("the body must be {\"reviewer\": NAME, \"session\": ID}")
            reviewer = parse_reviewer(body.get("reviewer"))
            owner = lease_owner(reviewer, parse_session(body.get("session")))

            def work() -> bool:
                with database.session() as s:
                    if renew:
                        return queue.renew(s, clip_id, owner, lease_s=lease_s)
                    return queue.release(s, clip_id, owner)

            done = await run_in_threadpool(work)
            if renew and not done:
                return error(f"clip {clip_id} is no longer leased to {reviewer} in this tab", 409)
            return ok({"clip_id": clip_id, "renewed" if renew else "released": done})
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
        Route("/api/session", session_info, methods=["GET"]),
        Route("/api/next", next_clip, methods=["GET"]),
        *media_routes(database, store, endpoint),
        Route("/api/events", post_event, methods=["POST"]),
        Route("/api/events/{event_id}", get_event, methods=["GET"]),
        Route("/api/undoable", undoable, methods=["GET"]),
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
