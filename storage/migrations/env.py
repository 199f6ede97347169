"""Alembic environment of the index: run by :mod:`storage.migrate`, never from an ``alembic.ini``.

:func:`storage.migrate.alembic_config` hands over an open connection (in
``config.attributes["connection"]``) on which the caller already holds the
migration lock and a transaction; the migrations run inside that transaction.
Offline (``--sql``) mode is not supported.
"""

from __future__ import annotations

from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("the index's migrations run through storage.migrate (dicom-node db upgrade), "
                       "on an open connection")

context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
