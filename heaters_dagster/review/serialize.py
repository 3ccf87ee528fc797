"""What the review API answers about clips, sprites, videos and events (JSON-ready dicts).

Nothing here names a storage key or a path: the page may be open to anonymous viewers."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

from sqlalchemy import select

from heaters_dagster.database.models import Clip, ClipArtifact, ReviewEvent
from heaters_dagster.storage import ArtifactStore

LAYOUT_INT = ("cols", "rows", "tile_width", "tile_height", "frame_count")
LAYOUT_FLOAT = ("effective_fps",)


def iso(value: datetime | None) -> str | None:
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


def sprite_version(art: ClipArtifact) -> str:
    stamp = f"{art.id}:{art.storage_key}:{art.size_bytes}:{iso(art.updated_at)}"
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def video_version(clip: Clip) -> str:
    """Changes when the clip's file does (a re-cut gets a fresh key)."""
    return hashlib.sha256(f"{clip.id}:{clip.file_key}".encode()).hexdigest()[:16]


def video_size(store: ArtifactStore, clip: Clip) -> int | None:
    """The clip file's size in bytes; None when it is gone (archived) or unreadable."""
    if clip.file_deleted or not clip.file_key:
        return None
    try:
        return int(store.size(clip.file_key))
    except Exception:  # noqa: BLE001 - a missing/unreadable file just means "no video"
        return None


def clip_json(clip: Clip, art: ClipArtifact | None, video_bytes: int | None = None) -> dict[str, Any]:
    sprite = None
    if art is not None:
        layout = sprite_layout(clip, art.meta)
        if layout is not None:
            sprite = {"url": f"/api/sprite/{clip.id}?v={sprite_version(art)}", "layout": layout}
    video = None
    if video_bytes is not None:
        video = {"url": f"/api/clips/{clip.id}/video?v={video_version(clip)}", "bytes": video_bytes}
    return {
        "id": clip.id, "source_video_id": clip.source_video_id, "state": clip.state,
        "start_frame": clip.start_frame, "end_frame": clip.end_frame, "frame_count": clip.frame_count,
        "start_s": clip.start_s, "end_s": clip.end_s, "duration_s": clip.end_s - clip.start_s,
        "fps": clip.fps,
        "group_id": clip.group_id, "sprite": sprite, "video": video,
    }


def sprites(session: Any, clip_ids: list[int]) -> dict[int, ClipArtifact]:
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
            "created_at": iso(ev.created_at), "processed_at": iso(ev.processed_at), "undone_by": ev.undone_by}
