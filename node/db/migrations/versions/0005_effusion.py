"""results pleural effusion: the effusion per side, ml for a volume and cm2 for a single slice

Existing rows keep NULL: they were analysed before the effusion was looked for.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 17:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

COLUMNS = ('right_effusion_ml', 'left_effusion_ml', 'right_effusion_cm2', 'left_effusion_cm2')


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
