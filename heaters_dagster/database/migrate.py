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
