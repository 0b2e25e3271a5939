"""Alembic migrations for the refloop schema (SQLite and PostgreSQL)."""
