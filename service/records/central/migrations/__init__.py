"""Alembic environment of the central schema (run by :func:`service.records.central.schema.upgrade`)."""
