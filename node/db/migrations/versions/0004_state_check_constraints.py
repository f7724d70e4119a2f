"""state check constraints: jobs, exports and reference SEGs accept only the states of node.db.states

The values are written out here, not imported: a migration describes the schema as it was at this
revision. Reference SEG state "expired" (given up after storage.retention_days) was already written by
the retention tick and is part of the allowed set.

SQLite cannot add a constraint to a table, so batch mode copies each table into a new one; migrations
run with foreign key enforcement off for that (see env.py), and the copy keeps every row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 14:30:00.000000
"""
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

STATES = {
    'jobs': ('received', 'ready', 'processing', 'done', 'skipped', 'failed'),
    'exports': ('pending', 'sent', 'dead'),
    'reference_segs': ('pending', 'done', 'unmatched', 'failed', 'anatomy', 'expired'),
}


def upgrade() -> None:
    for table, states in STATES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_check_constraint(f'ck_{table}_state',
                                             'state IN (' + ', '.join(f"'{s}'" for s in states) + ')')


def downgrade() -> None:
    for table in reversed(STATES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f'ck_{table}_state', type_='check')
