"""Row factories for tests (plain inserts through the typed models)."""

from __future__ import annotations

from heaters_dagster.database.models import Clip, SourceVideo
from heaters_dagster.resources.database import DatabaseResource


def make_video(db: DatabaseResource, state: str = "spliced", **kw) -> int:
    with db.session() as s:
        v = SourceVideo(source_uri=kw.pop("source_uri", "/tmp/x.mp4"), source_kind=kw.pop("source_kind", "file"),
                        state=state, fps=kw.pop("fps", 24.0), frame_count=kw.pop("frame_count", 240), **kw)
        s.add(v)
        s.flush()
        return v.id


def make_clips(db: DatabaseResource, video_id: int, spans: list[tuple[int, int]], state: str = "spliced",
               fps: float = 24.0) -> list[int]:
    ids = []
    with db.session() as s:
        for a, b in spans:
            c = Clip(source_video_id=video_id, start_frame=a, end_frame=b, start_s=a / fps, end_s=b / fps, fps=fps,
                     file_key=f"sources/{video_id}/clips/{a:08d}-{b:08d}-test.mp4", state=state)
            s.add(c)
            s.flush()
            ids.append(c.id)
    return ids


def state_of(db: DatabaseResource, kind: str, item_id: int) -> str:
    from heaters_dagster.pipeline.items import MODELS

    with db.session() as s:
        return s.get(MODELS[kind], item_id).state


def row_of(db: DatabaseResource, kind: str, item_id: int):
    from heaters_dagster.pipeline.items import MODELS

    with db.session() as s:
        return s.get(MODELS[kind], item_id)
