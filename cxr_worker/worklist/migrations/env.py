"""Alembic environment: runs on the connection that ``cxr_worker.worklist.schema`` hands in."""

from __future__ import annotations

from alembic import context

from cxr_worker.worklist.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
