"""0001 baseline: the schema of the release before migrations (storage/models.py as create_all made it).

A database of that release has exactly these tables and indexes; it is stamped
at this revision (storage.migrate.upgrade) instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table('patients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('PatientID', sa.String(length=64), nullable=False),
    sa.Column('IssuerOfPatientID', sa.String(length=64), nullable=False),
    sa.Column('PatientName', sa.String(length=324), nullable=False),
    sa.Column('PatientBirthDate', sa.String(length=8), nullable=False),
    sa.Column('PatientSex', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('PatientID', 'IssuerOfPatientID', name='uq_patient_identity')
    )
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('StudyInstanceUID', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.Integer(), nullable=False),
    sa.Column('StudyDate', sa.String(length=8), nullable=False),
    sa.Column('StudyTime', sa.String(length=16), nullable=False),
    sa.Column('AccessionNumber', sa.String(length=16), nullable=False),
    sa.Column('StudyDescription', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.Column('state_changed_at', sa.DateTime(), nullable=False),
    sa.Column('stable_deadline', sa.DateTime(), nullable=True),
    sa.Column('stable_at', sa.DateTime(), nullable=True),
    sa.Column('updated', sa.Boolean(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_at', sa.DateTime(), nullable=True),
    sa.Column('inference_attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('result_version', sa.Integer(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('last_calling_ae', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['patient_id'], ['patients.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('StudyInstanceUID')
    )
    op.create_index('ix_studies_stable_deadline', 'studies', ['stable_deadline'])
    op.create_index('ix_studies_state', 'studies', ['state'])
    op.create_table('result_objects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('result_version', sa.Integer(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('SOPInstanceUID', sa.String(length=64), nullable=False),
    sa.Column('SOPClassUID', sa.String(length=64), nullable=False),
    sa.Column('SeriesInstanceUID', sa.String(length=64), nullable=False),
    sa.Column('TransferSyntaxUID', sa.String(length=64), nullable=False),
    sa.Column('file_path', sa.String(length=255), nullable=False),
    sa.Column('file_size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('superseded', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('SOPInstanceUID')
    )
    op.create_index('ix_result_objects_study_id', 'result_objects', ['study_id'])
    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('SeriesInstanceUID', sa.String(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('Modality', sa.String(length=16), nullable=False),
    sa.Column('SeriesNumber', sa.String(length=12), nullable=False),
    sa.Column('SeriesDescription', sa.String(length=64), nullable=False),
    sa.Column('BodyPartExamined', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('SeriesInstanceUID')
    )
    op.create_index('ix_series_study_id', 'series', ['study_id'])
    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('result_id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['result_id'], ['result_objects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('result_id', 'destination', name='uq_delivery')
    )
    op.create_index('ix_deliveries_due', 'deliveries', ['state', 'next_attempt_at'])
    op.create_index('ix_deliveries_result_id', 'deliveries', ['result_id'])
    op.create_index('ix_deliveries_study_id', 'deliveries', ['study_id'])
    op.create_table('instances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('SOPInstanceUID', sa.String(length=64), nullable=False),
    sa.Column('SOPClassUID', sa.String(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('TransferSyntaxUID', sa.String(length=64), nullable=False),
    sa.Column('Modality', sa.String(length=16), nullable=False),
    sa.Column('BodyPartExamined', sa.String(length=64), nullable=False),
    sa.Column('ViewPosition', sa.String(length=16), nullable=False),
    sa.Column('Laterality', sa.String(length=16), nullable=False),
    sa.Column('InstanceNumber', sa.String(length=12), nullable=False),
    sa.Column('PhotometricInterpretation', sa.String(length=16), nullable=False),
    sa.Column('Rows', sa.Integer(), nullable=True),
    sa.Column('Columns', sa.Integer(), nullable=True),
    sa.Column('file_path', sa.String(length=255), nullable=False),
    sa.Column('file_size', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('receive_count', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('SOPInstanceUID')
    )
    op.create_index('ix_instances_series_id', 'instances', ['series_id'])
    op.create_index('ix_instances_study_received', 'instances', ['study_id', 'received_at'])


def downgrade() -> None:
    op.drop_index('ix_instances_study_received', table_name='instances')
    op.drop_index('ix_instances_series_id', table_name='instances')
    op.drop_table('instances')
    op.drop_index('ix_deliveries_study_id', table_name='deliveries')
    op.drop_index('ix_deliveries_result_id', table_name='deliveries')
    op.drop_index('ix_deliveries_due', table_name='deliveries')
    op.drop_table('deliveries')
    op.drop_index('ix_series_study_id', table_name='series')
    op.drop_table('series')
    op.drop_index('ix_result_objects_study_id', table_name='result_objects')
    op.drop_table('result_objects')
    op.drop_index('ix_studies_state', table_name='studies')
    op.drop_index('ix_studies_stable_deadline', table_name='studies')
    op.drop_table('studies')
    op.drop_table('patients')
