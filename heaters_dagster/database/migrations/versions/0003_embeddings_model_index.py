"""an index on embeddings (model_id, strategy): which models have stored embeddings, answered from
the index (search and similar clips fall back to the stored model when the configured one has none)

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_embeddings_model_strategy', 'embeddings', ['model_id', 'strategy'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_embeddings_model_strategy', table_name='embeddings')
