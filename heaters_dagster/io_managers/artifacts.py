"""Persist stage outputs: files into the artifact store, rows into Postgres (one transaction)."""

from __future__ import annotations

from typing import Any

import dagster as dg
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from heaters_dagster.database.models import Clip, ClipArtifact, SourceVideo
from heaters_dagster.pipeline.items import MODELS
from heaters_dagster.pipeline.outputs import FileToStore, ItemOutput, ItemSnapshot
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.executor import PersistOutcome
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.stages import STAGES_BY_NAME, Stage
from heaters_dagster.state_machine import transition
from heaters_dagster.storage import ArtifactStore


def _put(store: ArtifactStore, f: FileToStore, stored: list[str]) -> None:
    existed = store.exists(f.key)
    store.put_file(f.local_path, f.key, move=True)
    if not existed:
        stored.append(f.key)


def persist_files_and_rows(session: Session, item: ItemSnapshot, output: ItemOutput,
                           store: ArtifactStore) -> PersistOutcome:
    stored: list[str] = []
    try:
        for f in output.files:
            _put(store, f, stored)
        if output.updates:
            model = MODELS[item.kind]
            session.execute(update(model).where(model.id == item.id).values(**output.updates, updated_at=func.now()))
        for a in output.artifacts:
            _put(store, a.file, stored)
            size = a.file.local_path.stat().st_size if a.file.local_path.exists() else store.size(a.file.key)
            stmt = pg_insert(ClipArtifact).values(
                clip_id=item.id, artifact_type=a.artifact_type, strategy=a.strategy, tag=a.tag,
                storage_key=a.file.key, size_bytes=size, meta=a.metadata,
            )
            session.execute(stmt.on_conflict_do_update(
                constraint="uq_clip_artifacts_identity",
                set_={"storage_key": stmt.excluded.storage_key, "size_bytes": stmt.excluded.size_bytes,
                      "metadata": stmt.excluded.metadata, "updated_at": func.now()},
            ))
        new_ids: list[int] = []
        source_id = item.id if item.kind == "video" else item.row["source_video_id"]
        for c in output.new_clips:
            _put(store, c.file, stored)
            new_id = session.execute(insert(Clip).values(
                source_video_id=source_id, start_frame=c.start_frame, end_frame=c.end_frame,
                start_s=c.start_s, end_s=c.end_s, fps=c.fps, file_key=c.file.key, origin=c.origin,
                parent_clip_ids=list(c.parent_clip_ids),
            ).returning(Clip.id)).scalar_one()
            new_ids.append(new_id)
        for kind, other_id, from_state, to_state in output.partner_transitions:
            transition(session, kind, other_id, from_state, to_state, values={"pending_op": None}
                       if kind == "clip" else None)
    except BaseException:
        for key in stored:
            store.delete(key)
        raise
    return PersistOutcome(new_clip_ids=new_ids, stored_keys=stored)


# What a downstream asset receives per upstream stage (other clip stages: all the clip's artifacts).
ARTIFACT_TYPES = {"sprite": ("sprite",), "keyframes": ("keyframe",)}


def input_partition_ids(context: dg.InputContext) -> list[int]:
    """The upstream partitions (item ids) a downstream step reads: its own keys mapped through the
    edge's partition mapping (identity for an asset partitioned by ``clips``)."""
    return [int(k) for k in context.asset_partition_keys] if context.has_asset_partitions else []


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores clip files, sprites and keyframes (local folder or S3) with their database rows.

    ``load_input`` gives an asset downstream of a stage that stage's stored output for each of
    the upstream partitions it reads:

    * after a clip stage, ``{clip_id: [artifact, ...]}``; an artifact is a dict with
      ``artifact_type``, ``strategy``, ``tag``, ``storage_key``, ``uri`` (a local path or URL) and
      ``metadata`` (the sprite layout, a keyframe's frame index and time, ...). ``sprite`` gives the
      sprite sheet, ``keyframes`` the keyframes; a clip with none has an empty list;
    * after a video stage (``ingest``, ``splice``), ``{video_id: {...}}`` with the normalised file
      (``normalized_key``, ``uri``) and its ``fps``, ``frame_count``, ``width``, ``height``,
      ``duration_s`` and ``state``; a video with no normalised file yet has ``uri`` None.
    """

    database: DatabaseResource
    storage: StorageResource

    def persist(self, session: Session, stage: Stage, item: ItemSnapshot, output: ItemOutput,
                store: ArtifactStore) -> PersistOutcome:
        return persist_files_and_rows(session, item, output, store)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # Stage assets persist inside the executor's transaction and emit per-partition
        # materializations; nothing is handed to this method by them.
        if obj is not None:
            raise TypeError("ArtifactIOManager persists through the stage executor, not handle_output")

    def load_input(self, context: dg.InputContext) -> dict[int, Any]:
        ids = input_partition_ids(context)
        upstream = context.asset_key.path[-1] if context.has_asset_key else ""
        stage = STAGES_BY_NAME.get(upstream)
        if stage is not None and stage.entity == "video":
            return self._load_videos(ids)
        return self._load_clip_artifacts(ids, ARTIFACT_TYPES.get(upstream))

    def _load_videos(self, ids: list[int]) -> dict[int, Any]:
        store = self.storage.store
        with self.database.session() as session:
            rows = session.execute(select(SourceVideo).where(SourceVideo.id.in_(ids))).scalars().all()
        return {r.id: {"normalized_key": r.normalized_key, "uri": store.uri(r.normalized_key) if r.normalized_key
                       else None, "fps": r.fps, "frame_count": r.frame_count, "width": r.width, "height": r.height,
                       "duration_s": r.duration_s, "state": r.state, "title": r.title}
                for r in rows}

    def _load_clip_artifacts(self, ids: list[int], types: "tuple[str, ...] | None") -> dict[int, Any]:
        store = self.storage.store
        query = select(ClipArtifact).where(ClipArtifact.clip_id.in_(ids))
        if types:
            query = query.where(ClipArtifact.artifact_type.in_(types))
        with self.database.session() as session:
            rows = session.execute(query.order_by(ClipArtifact.clip_id, ClipArtifact.id)).scalars().all()
        out: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        for r in rows:
            out[r.clip_id].append({"artifact_type": r.artifact_type, "strategy": r.strategy, "tag": r.tag,
                                   "storage_key": r.storage_key, "uri": store.uri(r.storage_key),
                                   "metadata": r.meta})
        return out
