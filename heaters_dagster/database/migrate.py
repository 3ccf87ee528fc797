"""Apply Alembic migrations programmatically (``heaters db upgrade``, test fixtures, ``heaters dev``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from heaters_dagster.database.engine import database_url, normalise_url

    command.upgrade(alembic_config(normalise_url(url) if url else database_url()), revision)


def ensure_dagster_storage(url: str | None = None) -> None:
    """Create Dagster's instance tables in its database (``HEATERS_DAGSTER_DATABASE_URL``) when
    they are missing.

    The storages dagster.yaml configures create them too, once per process
    (``heaters_dagster/dagster_storage.py``); the commands that bring the database up
    (``heaters dev``, ``heaters db upgrade``, ``heaters demo``) create them here first, so a
    database is complete before any Dagster process starts. Existing tables are left as they are;
    ``dagster instance migrate`` upgrades them after a Dagster upgrade.
    """
    import os

    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    url = url or os.environ.get("HEATERS_DAGSTER_DATABASE_URL")
    if not url:
        return
    # Each storage creates (and stamps) its tables when its main table is missing.
    PostgresRunStorage(url, should_autocreate_tables=True)
    PostgresEventLogStorage(url, should_autocreate_tables=True).dispose()
    PostgresScheduleStorage(url, should_autocreate_tables=True)
