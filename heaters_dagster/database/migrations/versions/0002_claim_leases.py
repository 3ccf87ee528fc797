"""claim leases: who holds an in-progress item, until when, and how often it was lost

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_TABLES = ('source_videos', 'clips')
_IN_PROGRESS = {
    'source_videos': ('downloading', 'splicing'),
    'clips': ('generating_sprite', 'keyframing', 'embedding', 'splitting', 'merging', 'archiving'),
}


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column('claim_owner', sa.Text(), nullable=True))
        op.add_column(table, sa.Column('claim_run_id', sa.Text(), nullable=True))
        op.add_column(table, sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column('claim_expires_at', sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column('lost_count', sa.Integer(), server_default='0', nullable=False))
        op.add_column(table, sa.Column('claim_history', postgresql.JSONB(), server_default='[]', nullable=False))
        op.create_index(f'ix_{table}_claim_expires', table, ['claim_expires_at'],
                        postgresql_where=sa.text('claim_expires_at IS NOT NULL'))
        op.create_index(f'ix_{table}_claim_run', table, ['claim_run_id'],
                        postgresql_where=sa.text('claim_run_id IS NOT NULL'))
        # Items already in progress before leases existed have no owner: expire them now, so the
        # recovery sensor returns them to their input state instead of leaving them stuck.
        states = ", ".join(f"'{s}'" for s in _IN_PROGRESS[table])
        op.execute(f"UPDATE {table} SET claim_owner = 'unknown (before leases)', claim_expires_at = now() "
                   f"WHERE state IN ({states})")
    op.drop_constraint('ck_stage_results_status', 'stage_results', type_='check')
    op.create_check_constraint(
        'ck_stage_results_status', 'stage_results',
        "status IN ('succeeded', 'transient_error', 'permanent_error', 'skipped', 'lost')")


def downgrade() -> None:
    op.drop_constraint('ck_stage_results_status', 'stage_results', type_='check')
    op.execute("DELETE FROM stage_results WHERE status = 'lost'")
    op.create_check_constraint(
        'ck_stage_results_status', 'stage_results',
        "status IN ('succeeded', 'transient_error', 'permanent_error', 'skipped')")
    for table in _TABLES:
        op.drop_index(f'ix_{table}_claim_run', table_name=table)
        op.drop_index(f'ix_{table}_claim_expires', table_name=table)
        for col in ('claim_history', 'lost_count', 'claim_expires_at', 'claimed_at', 'claim_run_id', 'claim_owner'):
            op.drop_column(table, col)
