"""leases: the owner of a claimed job, and the owner and lease of an export being sent

Several node processes may share one database; each claim names its holder and expires unless renewed
(node.lease). jobs.lease_until exists since 0001; jobs.owner, exports.owner and exports.lease_until are new.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 17:30:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=128), nullable=True))
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('owner')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('owner')
