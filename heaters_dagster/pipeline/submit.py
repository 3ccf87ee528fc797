"""Recording a submission: a source video row in state ``new`` (or straight to
``ingestion_failed`` with the reason when the submission itself is unusable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from heaters_dagster import storage_keys
from heaters_dagster.database.models import SourceVideo
from heaters_dagster.errors import HeatersError
from heaters_dagster.state_machine import VideoState, transition
from heaters_dagster.storage import ArtifactStore


@dataclass(frozen=True)
class Submission:
    video_id: int
    state: str
    error: str | None


def _guess_kind(uri: str) -> str:
    return "url" if "://" in uri else "file"


def submit_source(session: Session, store: ArtifactStore, uri: str, title: str | None = None) -> Submission:
    """Record ``uri`` (an http(s) URL or a local path). Local files are copied into the store now,
    so the submission survives the original being moved. Never raises for bad input: the row is
    kept in ``ingestion_failed`` with a message a person can act on."""
    from heaters_dagster.media.fetch import classify_source

    video = SourceVideo(source_uri=uri, source_kind=_guess_kind(uri), title=title, state=VideoState.NEW)
    session.add(video)
    session.flush()
    try:
        kind, value = classify_source(uri)
        video.source_kind = kind
        if kind == "file":
            path = Path(value)
            video.title = title or path.stem
            key = storage_keys.source_original(video.id, path.suffix or ".bin")
            store.put_file(path, key)
            video.original_key = key
        session.flush()
    except HeatersError as exc:
        session.flush()
        transition(session, "video", video.id, VideoState.NEW, VideoState.INGESTION_FAILED, error=str(exc))
        return Submission(video.id, VideoState.INGESTION_FAILED, str(exc))
    return Submission(video.id, VideoState.NEW, None)
