"""Engine and session helpers. One engine per URL per process."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def sql_literal(value: str) -> str:
    """A SQL string literal, for the few places that must inline a value (partial index DDL and the
    queries that have to match its predicate)."""
    return "'" + value.replace("'", "''") + "'"


def normalise_url(url: str) -> str:
    """Accept ``postgres://``/``postgresql://`` URLs and use the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def database_url() -> str:
    """The configured database URL; starts the embedded server when none is configured."""
    from heaters_dagster.database.embedded import ensure_environment
    from heaters_dagster.settings import get_settings

    ensure_environment()  # exports the URL (the embedded server's, when none is configured)
    return normalise_url(get_settings().database_url or "")


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, future=True)


def get_engine(url: str | None = None) -> Engine:
    return _engine_for(normalise_url(url) if url else database_url())


@lru_cache(maxsize=8)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, future=True)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session in one transaction: commit on success, roll back on any error."""
    session = _sessionmaker(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
