"""Loading item snapshots and recording stage results (plain SQLAlchemy, no Dagster)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select
from sqlalchemy.orm import Session

from heaters_dagster.database.models import Clip, ClipArtifact, SourceVideo, StageResult
from heaters_dagster.pipeline.outputs import ItemSnapshot

MODELS: dict[str, Any] = {"video": SourceVideo, "clip": Clip}


def row_dict(obj: Any) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in sa_inspect(obj).mapper.column_attrs}


def load_snapshots(session: Session, kind: str, ids: list[int]) -> dict[int, ItemSnapshot]:
    model = MODELS[kind]
    rows = session.execute(select(model).where(model.id.in_(ids))).scalars().all()
    sources: dict[int, dict[str, Any]] = {}
    artifacts: dict[int, list[dict[str, Any]]] = {}
    if kind == "clip" and rows:
        for a in session.execute(select(ClipArtifact).where(ClipArtifact.clip_id.in_(ids))
                                 .order_by(ClipArtifact.id)).scalars():
            artifacts.setdefault(a.clip_id, []).append(
                {"artifact_type": a.artifact_type, "strategy": a.strategy, "tag": a.tag,
                 "storage_key": a.storage_key, "meta": a.meta})
        vids = {r.source_video_id for r in rows}
        for v in session.execute(select(SourceVideo).where(SourceVideo.id.in_(vids))).scalars():
            sources[v.id] = row_dict(v)
    out = {}
    for r in rows:
        out[r.id] = ItemSnapshot(
            kind=kind, id=r.id, state=r.state, version=r.version, retry_count=r.retry_count,
            row=row_dict(r), source=sources.get(r.source_video_id) if kind == "clip" else None,
            artifacts=tuple(artifacts.get(r.id, ())),
        )
    return out


def record_result(
    session: Session,
    *,
    stage: str,
    kind: str,
    item_id: int,
    status: str,
    duration_s: float = 0.0,
    attempt: int = 0,
    run_id: str | None = None,
    error: BaseException | None = None,
    message: str | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    session.add(
        StageResult(
            stage=stage, entity_kind=kind, entity_id=item_id, status=status, duration_s=duration_s,
            attempt=attempt, run_id=run_id, error_type=type(error).__name__ if error else None,
            message=message if message is not None else (str(error) if error else None), result=result or {},
        )
    )
