"""Read-only summaries for ``heaters status`` and ``heaters demo``."""

from __future__ import annotations

from typing import Any

from datetime import datetime, timezone

from sqlalchemy import func, select

from heaters_dagster.database.engine import session_scope
from heaters_dagster.leases import HeldItem, held_items
from heaters_dagster.database.models import Clip, ClipArtifact, SourceVideo, StageResult
from heaters_dagster.settings import storage_url
from heaters_dagster.state_machine import CLIP_FAILED_STATES, VIDEO_FAILED_STATES
from heaters_dagster.storage import ArtifactStore


def collect_status() -> dict[str, Any]:
    with session_scope() as s:
        videos = dict(s.execute(select(SourceVideo.state, func.count()).group_by(SourceVideo.state)).all())
        clips = dict(s.execute(select(Clip.state, func.count()).group_by(Clip.state)).all())
        failures = [
            {"kind": "video", "id": r.id, "state": r.state, "retry_count": r.retry_count, "last_error": r.last_error}
            for r in s.execute(select(SourceVideo).where(SourceVideo.state.in_(VIDEO_FAILED_STATES))
                               .order_by(SourceVideo.id)).scalars()
        ] + [
            {"kind": "clip", "id": r.id, "state": r.state, "retry_count": r.retry_count, "last_error": r.last_error}
            for r in s.execute(select(Clip).where(Clip.state.in_(CLIP_FAILED_STATES)).order_by(Clip.id)).scalars()
        ]
        errors = [
            {"stage": r.stage, "status": r.status, "error_type": r.error_type, "count": r.n}
            for r in s.execute(
                select(StageResult.stage, StageResult.status, StageResult.error_type, func.count().label("n"))
                .where(StageResult.status.in_(("transient_error", "permanent_error")))
                .group_by(StageResult.stage, StageResult.status, StageResult.error_type)
                .order_by(StageResult.stage)
            )
        ]
        in_progress = [_held_dict(h) for h in held_items(s)]
    return {"videos": videos, "clips": clips, "failures": failures, "errors_by_stage": errors,
            "in_progress": in_progress}


def _held_dict(h: HeldItem) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {"kind": h.kind, "id": h.id, "state": h.state, "stage": h.stage, "owner": h.owner, "run_id": h.run_id,
            "age_s": round((now - h.claimed_at).total_seconds(), 1) if h.claimed_at else None,
            "lease_left_s": round((h.expires_at - now).total_seconds(), 1) if h.expires_at else None,
            "expired": h.expired, "lost_count": h.lost_count}


def clip_summary(video_id: int) -> list[dict[str, Any]]:
    store = ArtifactStore(storage_url())
    with session_scope() as s:
        rows = s.execute(select(Clip).where(Clip.source_video_id == video_id).order_by(Clip.start_frame)).scalars().all()
        sprites = {a.clip_id: a.storage_key for a in s.execute(
            select(ClipArtifact).where(ClipArtifact.clip_id.in_([r.id for r in rows]),
                                       ClipArtifact.artifact_type == "sprite")).scalars()}
    out = []
    for r in rows:
        key = sprites.get(r.id)
        out.append({"id": r.id, "state": r.state, "start_frame": r.start_frame, "end_frame": r.end_frame,
                    "start_s": r.start_s, "end_s": r.end_s, "file_uri": store.uri(r.file_key),
                    "sprite_uri": store.uri(key) if key else None, "sprite_exists": bool(key and store.exists(key))})
    return out
