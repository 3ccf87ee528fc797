"""Database: typed SQLAlchemy models, Alembic migrations, engine/session helpers and the embedded
PostgreSQL used when no ``HEATERS_DATABASE_URL`` is configured."""

from heaters_dagster.database.engine import database_url, get_engine, session_scope

__all__ = ["database_url", "get_engine", "session_scope"]
