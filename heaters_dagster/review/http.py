"""Request parsing, JSON answers and response headers for the review app (no routes here)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from heaters_dagster.database.models import REVIEW_ACTIONS

MAX_BODY = 4096
MAX_ID = 2**63 - 1
MAX_FRAME = 2**31 - 1
MAX_EXCLUDE = 50
REVIEWER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@+-]{0,63}$")
# A browser session's lease identity: random, made by the page (sessionStorage, one per tab).
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store"})


def ok(data: Any, status: int = 200) -> JSONResponse:
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


def parse_session(value: Any) -> str | None:
    """The page's browser-session id (optional): 8-64 of A-Z a-z 0-9 _ -."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not SESSION_RE.match(value):
        raise BadRequest("session must be 8-64 characters: letters, digits, _ and -")
    return value


def lease_owner(reviewer: str, session: str | None) -> str:
    """Who holds a lease: the reviewer, and the browser session when the page sent one, so two
    tabs signed in with the same name hold different clips. ``#`` is outside both alphabets."""
    return f"{reviewer}#{session}" if session else reviewer


def parse_id_list(raw: str | None, name: str) -> list[int]:
    if not raw:
        return []
    parts = raw.split(",")
    if len(parts) > MAX_EXCLUDE:
        raise BadRequest(f"{name} lists at most {MAX_EXCLUDE} ids")
    return [parse_id(p.strip(), name) for p in parts if p.strip()]


def parse_event(body: Any) -> tuple[int, str, dict[str, Any], str, str | None]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    extra = set(body) - {"clip_id", "action", "payload", "reviewer", "session"}
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
    return clip_id, action, payload, reviewer, parse_session(body.get("session"))


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


# -- middleware and logging --------------------------------------------------------------------
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


class RedactTokenFilter(logging.Filter):
    """Keeps a ``?token=`` handed to the page out of the access log."""

    _re = re.compile(r"([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._re.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        return True
