"""Recording a submission: a source video row in state ``new`` (or straight to
``ingestion_failed`` with the reason when the submission itself is unusable)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from heaters_dagster import storage_keys
from heaters_dagster.database.models import SourceVideo
from heaters_dagster.errors import HeatersError, TransientError
from heaters_dagster.state_machine import VideoState, transition
from heaters_dagster.storage import ArtifactStore


@dataclass(frozen=True)
class Submission:
    video_id: int
    state: str
    error: str | None


def _guess_kind(uri: str) -> str:
    return "url" if "://" in uri else "file"


_TITLE_MAX = 500
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_title(title: str | None, max_len: int = _TITLE_MAX) -> str | None:
    """A title safe to store and show: control and bidi-override characters removed, whitespace
    runs (newlines, tabs) made one space, at most ``max_len`` characters (cut with "…"); None if
    nothing is left. SQL or HTML in a title is just text (queries are parametrised, pages escape)."""
    if title is None:
        return None
    text = " ".join(_CONTROL.sub("", str(title)).split())
    if len(text) > max_len:
        text = text[: max_len - 1].rstrip() + "…"
    return text or None


def _storable(uri: str) -> str:
    """``uri`` as it can be stored in a text column (PostgreSQL text cannot hold NUL)."""
    return uri.replace("\x00", "\\x00")


def submit_source(session: Session, store: ArtifactStore, uri: str, title: str | None = None) -> Submission:
    """Record ``uri`` (an http(s) URL or a local path). Local files are copied into the store now,
    so the submission survives the original being moved. Never raises for bad input: the row is
    kept in ``ingestion_failed`` with a message a person can act on.

    URLs must be http(s) and their host must resolve to public addresses only (checked again,
    with every redirect, when ingest fetches them; see media/url_guard.py); local paths must be
    regular files no larger than HEATERS_MAX_SOURCE_BYTES."""
    from heaters_dagster.media.fetch import classify_source
    from heaters_dagster.media.url_guard import check_url
    from heaters_dagster.settings import max_source_bytes

    video = SourceVideo(source_uri=_storable(uri), source_kind=_guess_kind(uri), title=clean_title(title),
                        state=VideoState.NEW)
    session.add(video)
    session.flush()
    try:
        kind, value = classify_source(uri)
        video.source_kind = kind
        if kind == "url":
            try:
                check_url(value)
            except TransientError:
                pass  # the host does not resolve right now: ingest checks again before fetching
        if kind == "file":
            path = Path(value)
            video.title = clean_title(title) or clean_title(path.stem)
            key = storage_keys.source_original(video.id, path.suffix or ".bin")
            store.put_source_file(path, key, max_bytes=max_source_bytes())
            video.original_key = key
        session.flush()
    except HeatersError as exc:
        session.flush()
        transition(session, "video", video.id, VideoState.NEW, VideoState.INGESTION_FAILED, error=str(exc))
        return Submission(video.id, VideoState.INGESTION_FAILED, str(exc))
    return Submission(video.id, VideoState.NEW, None)
