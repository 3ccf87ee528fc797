"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 08:44:22.487765
"""
from alembic import op
import sqlalchemy as sa
import pgvector.sqlalchemy
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table('source_videos',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('source_kind', sa.String(length=8), nullable=False),
    sa.Column('state', sa.String(length=32), server_default='new', nullable=False),
    sa.Column('original_key', sa.Text(), nullable=True),
    sa.Column('normalized_key', sa.Text(), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('fps', sa.Float(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('frame_count', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('retry_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('version', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("source_kind IN ('url', 'file')", name='ck_source_videos_kind'),
    sa.CheckConstraint("state IN ('new', 'downloading', 'downloaded', 'splicing', 'spliced', 'ingestion_failed', 'splicing_failed')", name='ck_source_videos_state'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_source_videos_state', 'source_videos', ['state'], unique=False)
    op.create_table('stage_results',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('entity_kind', sa.String(length=8), nullable=False),
    sa.Column('entity_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error_type', sa.Text(), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('duration_s', sa.Float(), server_default='0', nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('run_id', sa.Text(), nullable=True),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('succeeded', 'transient_error', 'permanent_error', 'skipped')", name='ck_stage_results_status'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_stage_results_item', 'stage_results', ['entity_kind', 'entity_id'], unique=False)
    op.create_index('ix_stage_results_stage_status', 'stage_results', ['stage', 'status'], unique=False)
    op.create_table('clips',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('source_video_id', sa.BigInteger(), nullable=False),
    sa.Column('start_frame', sa.Integer(), nullable=False),
    sa.Column('end_frame', sa.Integer(), nullable=False),
    sa.Column('start_s', sa.Float(), nullable=False),
    sa.Column('end_s', sa.Float(), nullable=False),
    sa.Column('fps', sa.Float(), nullable=False),
    sa.Column('file_key', sa.Text(), nullable=False),
    sa.Column('file_deleted', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('state', sa.String(length=32), server_default='spliced', nullable=False),
    sa.Column('origin', sa.String(length=16), server_default='splice', nullable=False),
    sa.Column('parent_clip_ids', postgresql.ARRAY(sa.BigInteger()), server_default='{}', nullable=False),
    sa.Column('group_id', sa.BigInteger(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('retry_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('version', sa.Integer(), server_default='0', nullable=False),
    sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('pending_op', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('lease_owner', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('spliced', 'generating_sprite', 'pending_review', 'review_approved', 'review_skipped', 'review_archived', 'split_pending', 'merge_pending', 'splitting', 'merging', 'keyframing', 'keyframed', 'embedding', 'embedded', 'archiving', 'archived', 'sprite_failed', 'keyframe_failed', 'embedding_failed', 'archive_failed', 'split_failed', 'merge_failed')", name='ck_clips_state'),
    sa.CheckConstraint('end_frame > start_frame AND start_frame >= 0', name='ck_clips_frames'),
    sa.ForeignKeyConstraint(['source_video_id'], ['source_videos.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_clips_source_start', 'clips', ['source_video_id', 'start_frame'], unique=False)
    op.create_index('ix_clips_state', 'clips', ['state'], unique=False)
    op.create_table('clip_artifacts',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('clip_id', sa.BigInteger(), nullable=False),
    sa.Column('artifact_type', sa.String(length=16), nullable=False),
    sa.Column('strategy', sa.String(length=32), server_default='', nullable=False),
    sa.Column('tag', sa.String(length=32), server_default='', nullable=False),
    sa.Column('storage_key', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("artifact_type IN ('sprite', 'keyframe')", name='ck_clip_artifacts_type'),
    sa.ForeignKeyConstraint(['clip_id'], ['clips.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('clip_id', 'artifact_type', 'strategy', 'tag', name='uq_clip_artifacts_identity')
    )
    op.create_index(op.f('ix_clip_artifacts_clip_id'), 'clip_artifacts', ['clip_id'], unique=False)
    op.create_table('embeddings',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('clip_id', sa.BigInteger(), nullable=False),
    sa.Column('model_id', sa.Text(), nullable=False),
    sa.Column('strategy', sa.String(length=32), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('embedding', pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
    sa.Column('keyframe_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('vector_dims(embedding) = dim', name='ck_embeddings_dim'),
    sa.ForeignKeyConstraint(['clip_id'], ['clips.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('clip_id', 'model_id', 'strategy', name='uq_embeddings_identity')
    )
    op.create_index(op.f('ix_embeddings_clip_id'), 'embeddings', ['clip_id'], unique=False)
    op.create_table('review_events',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('clip_id', sa.BigInteger(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('reviewer', sa.Text(), server_default='', nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('undo_info', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('undone_by', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("action IN ('approve', 'skip', 'archive', 'undo', 'split', 'merge', 'group')", name='ck_review_events_action'),
    sa.CheckConstraint("outcome IS NULL OR outcome IN ('applied', 'rejected', 'pending')", name='ck_review_events_outcome'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_review_events_clip_id'), 'review_events', ['clip_id'], unique=False)
    op.create_index('ix_review_events_unprocessed', 'review_events', ['id'], unique=False, postgresql_where='processed_at IS NULL')


def downgrade() -> None:
    op.drop_index('ix_review_events_unprocessed', table_name='review_events', postgresql_where='processed_at IS NULL')
    op.drop_index(op.f('ix_review_events_clip_id'), table_name='review_events')
    op.drop_table('review_events')
    op.drop_index(op.f('ix_embeddings_clip_id'), table_name='embeddings')
    op.drop_table('embeddings')
    op.drop_index(op.f('ix_clip_artifacts_clip_id'), table_name='clip_artifacts')
    op.drop_table('clip_artifacts')
    op.drop_index('ix_clips_state', table_name='clips')
    op.drop_index('ix_clips_source_start', table_name='clips')
    op.drop_table('clips')
    op.drop_index('ix_stage_results_stage_status', table_name='stage_results')
    op.drop_index('ix_stage_results_item', table_name='stage_results')
    op.drop_table('stage_results')
    op.drop_index('ix_source_videos_state', table_name='source_videos')
    op.drop_table('source_videos')
