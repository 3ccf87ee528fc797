"""scene plan: the cuts scene detection found on the source before it was normalised (keyframes
forced at them), so splice cuts by stream copy without decoding again

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('source_videos', sa.Column('scene_plan', postgresql.JSONB(none_as_null=True), nullable=True))


def downgrade() -> None:
    op.drop_column('source_videos', 'scene_plan')
