"""Typed SQLAlchemy 2 models. The schema itself is created by Alembic migrations
(``heaters_dagster/database/migrations``); these classes mirror it for queries.

Every table has ``created_at``/``updated_at``; states are constrained by CHECK constraints
generated from :mod:`heaters_dagster.state_machine`; unique keys make writes idempotent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from heaters_dagster.state_machine import CLIP_STATES, VIDEO_STATES


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


REVIEW_ACTIONS = ("approve", "skip", "archive", "undo", "split", "merge", "group")
REVIEW_OUTCOMES = ("applied", "rejected", "pending")


class Base(DeclarativeBase):
    pass


class ClaimMixin:
    """Who holds an item in its in-progress state (a step attempt of a Dagster run), until when
    (renewed by the executor's heartbeat), and how often it was lost (see ``leases.py``)."""

    claim_owner: Mapped[Optional[str]] = mapped_column(Text)
    claim_run_id: Mapped[Optional[str]] = mapped_column(Text)
    claimed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    claim_expires_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    lost_count: Mapped[int] = mapped_column(Integer, server_default="0")
    claim_history: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default="[]")


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class SourceVideo(ClaimMixin, TimestampMixin, Base):
    __tablename__ = "source_videos"
    __table_args__ = (
        CheckConstraint(_in("state", VIDEO_STATES), name="ck_source_videos_state"),
        CheckConstraint("source_kind IN ('url', 'file')", name="ck_source_videos_kind"),
        Index("ix_source_videos_state", "state"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    title: Mapped[Optional[str]] = mapped_column(Text)
    source_uri: Mapped[str] = mapped_column(Text)
    source_kind: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(32), server_default="new")
    original_key: Mapped[Optional[str]] = mapped_column(Text)
    normalized_key: Mapped[Optional[str]] = mapped_column(Text)
    duration_s: Mapped[Optional[float]] = mapped_column(Float)
    fps: Mapped[Optional[float]] = mapped_column(Float)
    width: Mapped[Optional[int]] = mapped_column(Integer)
    height: Mapped[Optional[int]] = mapped_column(Integer)
    frame_count: Mapped[Optional[int]] = mapped_column(Integer)
    # ingest's scene detection on the source (cuts forced as keyframes): splice's plan, see
    # heaters_dagster.pipeline.scene_plan
    scene_plan: Mapped[Optional[dict[str, Any]]] = mapped_column(JSONB(none_as_null=True))
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(Integer, server_default="0")
    version: Mapped[int] = mapped_column(Integer, server_default="0")


class Clip(ClaimMixin, TimestampMixin, Base):
    __tablename__ = "clips"
    __table_args__ = (
        CheckConstraint(_in("state", CLIP_STATES), name="ck_clips_state"),
        CheckConstraint("end_frame > start_frame AND start_frame >= 0", name="ck_clips_frames"),
        Index("ix_clips_state", "state"),
        Index("ix_clips_source_start", "source_video_id", "start_frame"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    source_video_id: Mapped[int] = mapped_column(ForeignKey("source_videos.id", ondelete="CASCADE"))
    start_frame: Mapped[int] = mapped_column(Integer)
    end_frame: Mapped[int] = mapped_column(Integer)  # exclusive
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    fps: Mapped[float] = mapped_column(Float)
    file_key: Mapped[str] = mapped_column(Text, nullable=False)
    file_deleted: Mapped[bool] = mapped_column(server_default="false")
    state: Mapped[str] = mapped_column(String(32), server_default="spliced")
    origin: Mapped[str] = mapped_column(String(16), server_default="splice")
    parent_clip_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), server_default="{}")
    group_id: Mapped[Optional[int]] = mapped_column(BigInteger)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(Integer, server_default="0")
    version: Mapped[int] = mapped_column(Integer, server_default="0")
    reviewed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    pending_op: Mapped[Optional[dict[str, Any]]] = mapped_column(JSONB(none_as_null=True))  # a split/merge waiting out its undo window
    lease_owner: Mapped[Optional[str]] = mapped_column(Text)
    lease_expires_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    @property
    def frame_count(self) -> int:
        return self.end_frame - self.start_frame


class ClipArtifact(TimestampMixin, Base):
    __tablename__ = "clip_artifacts"
    __table_args__ = (
        UniqueConstraint("clip_id", "artifact_type", "strategy", "tag", name="uq_clip_artifacts_identity"),
        CheckConstraint("artifact_type IN ('sprite', 'keyframe')", name="ck_clip_artifacts_type"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"), index=True)
    artifact_type: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(32), server_default="")
    tag: Mapped[str] = mapped_column(String(32), server_default="")
    storage_key: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default="{}")


class ReviewEvent(TimestampMixin, Base):
    __tablename__ = "review_events"
    __table_args__ = (
        CheckConstraint(_in("action", REVIEW_ACTIONS), name="ck_review_events_action"),
        CheckConstraint(f"outcome IS NULL OR {_in('outcome', REVIEW_OUTCOMES)}", name="ck_review_events_outcome"),
        Index("ix_review_events_unprocessed", "id", postgresql_where="processed_at IS NULL"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # No foreign key on purpose: an event naming an unknown clip is kept and rejected with a reason.
    clip_id: Mapped[int] = mapped_column(BigInteger, index=True)
    action: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    reviewer: Mapped[str] = mapped_column(Text, server_default="")
    processed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[Optional[str]] = mapped_column(String(16))
    reason: Mapped[Optional[str]] = mapped_column(Text)
    # For undo: {clip_id: {"before": state, "after": state, "group_id": ...}} of every clip it changed.
    undo_info: Mapped[Optional[dict[str, Any]]] = mapped_column(JSONB(none_as_null=True))
    undone_by: Mapped[Optional[int]] = mapped_column(BigInteger)


class Embedding(TimestampMixin, Base):
    """One vector per clip, model and strategy. The column has no fixed dimension so several models
    can share the table; each (model, dimension) gets its own partial HNSW index on
    ``(embedding::vector(dim)) vector_cosine_ops`` created by the embedding IO manager."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("clip_id", "model_id", "strategy", name="uq_embeddings_identity"),
        CheckConstraint("vector_dims(embedding) = dim", name="ck_embeddings_dim"),
        Index("ix_embeddings_model_strategy", "model_id", "strategy"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(Text)
    strategy: Mapped[str] = mapped_column(String(32))
    dim: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[Any] = mapped_column(Vector())
    keyframe_count: Mapped[int] = mapped_column(Integer, server_default="0")


class StageResult(Base):
    """One row per item per stage attempt: the structured result or the classified error.
    This is the error analytics table (``heaters status`` reads it)."""

    __tablename__ = "stage_results"
    __table_args__ = (
        CheckConstraint("status IN ('succeeded', 'transient_error', 'permanent_error', 'skipped', 'lost')",
                        name="ck_stage_results_status"),
        Index("ix_stage_results_item", "entity_kind", "entity_id"),
        Index("ix_stage_results_stage_status", "stage", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    stage: Mapped[str] = mapped_column(String(32))
    entity_kind: Mapped[str] = mapped_column(String(8))
    entity_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[Optional[str]] = mapped_column(Text)
    message: Mapped[Optional[str]] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float, server_default="0")
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    run_id: Mapped[Optional[str]] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
