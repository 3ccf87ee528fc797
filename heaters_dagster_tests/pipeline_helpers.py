"""Helpers for end-to-end tests: submit files and drive the sensors/assets in process."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from sqlalchemy import select

from heaters_dagster.database.models import Clip, ClipArtifact
from heaters_dagster.inprocess import PipelineDriver
from heaters_dagster.pipeline.submit import submit_source


def submit(db, store, path: str | Path, title: str | None = None):
    with db.session() as s:
        return submit_source(s, store, str(path), title)


def drive(defs: dg.Definitions, instance: dg.DagsterInstance, *, stop_at: set[str] | None = None,
          max_rounds: int = 30):
    driver = PipelineDriver(defs, instance)
    return driver.run_until_idle(max_rounds=max_rounds, stop_at=stop_at)


def clips_of(db, video_id: int) -> list[Clip]:
    with db.session() as s:
        return list(s.execute(select(Clip).where(Clip.source_video_id == video_id).order_by(Clip.start_frame,
                                                                                              Clip.id)).scalars())


def artifacts_of(db, clip_id: int) -> list[ClipArtifact]:
    with db.session() as s:
        return list(s.execute(select(ClipArtifact).where(ClipArtifact.clip_id == clip_id)
                              .order_by(ClipArtifact.id)).scalars())


def live_clips(db, video_id: int) -> list[Clip]:
    dead = {"review_archived", "archiving", "archived", "archive_failed"}
    return [c for c in clips_of(db, video_id) if c.state not in dead]


def current_cut(db, video_id: int) -> list[Clip]:
    """The clips that make up the source's current cut: every clip not replaced by a split or merge
    (a clip the reviewer archived still marks its frames as reviewed and dropped, not as a gap)."""
    clips = clips_of(db, video_id)
    replaced = {p for c in clips for p in (c.parent_clip_ids or [])}
    return [c for c in clips if c.id not in replaced]


def assert_tiles(spans: list[tuple[int, int]], frame_count: int, dropped: list[tuple[int, int]] = ()) -> None:
    """Spans (plus dropped ones) cover [0, frame_count) with no gap and no overlap."""
    allspans = sorted([*spans, *dropped])
    pos = 0
    for a, b in allspans:
        assert a == pos, f"gap or overlap at frame {pos}: next span starts at {a} ({allspans})"
        assert b > a
        pos = b
    assert pos == frame_count, f"spans end at {pos}, source has {frame_count} frames"


def stored_clip_files(store) -> set[str]:
    root = Path(store.root)
    return {str(p.relative_to(root)) for p in root.glob("sources/*/clips/*.mp4")}
