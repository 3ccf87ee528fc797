"""Dagster's Postgres instance storage with one connection pool per process (dagster.yaml).

dagster-postgres gives every storage of every DagsterInstance an engine with SQLAlchemy's
``NullPool``: each query opens a new Postgres connection (a new server process) and closes it.
The daemon runs a few dozen such queries per sensor tick, and the code server builds a whole new
DagsterInstance for each sensor evaluation. On an idle ``heaters dev`` that connection churn, on
both sides of the socket, was most of a core of a 2-core machine (dagster-io/dagster#20325; pool
settings are not configurable in dagster-postgres 0.29, dagster-io/dagster#33935).

These subclasses of dagster-postgres' run, event log and schedule storages change one thing:
their engine is one pooled engine per database URL and process, shared by every instance the
process builds, so connections are reused instead of opened per query and the number a process
holds stays bounded however many instances it makes (which is why dagster-postgres does not pool
per instance). Everything else (schema, queries, migrations, the event watcher, the webserver's
own pooled engine from ``optimize_for_webserver``) is dagster-postgres' own.

A pooled connection can outlive the server (``heaters dev`` restarts the embedded one): connections
are checked with a ping on checkout and recycled after ``_RECYCLE_S``. A forked child does not
reuse its parent's connections (``os.register_at_fork``).

Table autocreation happens once per process and database, not once per instance: with
``should_autocreate_tables`` on (the default), dagster-postgres lists the database's tables on
three new connections in every DagsterInstance it builds, which was about a third of an idle
``heaters dev``'s CPU. Here only the first storage of each kind a process builds for a URL checks
and creates its tables; the later ones trust that. Any entry point (``heaters dev``, ``dagster
dev``, a script's ``DagsterInstance.get()``) therefore works on a fresh database. A table dropped
under a running process is not recreated until that process restarts.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import sqlalchemy as sa
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

__all__ = ["PooledPostgresEventLogStorage", "PooledPostgresRunStorage", "PooledPostgresScheduleStorage",
           "shared_engine"]

# Connections kept open per process and database (the daemon's sensor and run-queue threads use a
# few at once); more are opened when needed and closed again when returned.
_POOL_SIZE = 2
_MAX_OVERFLOW = 16
_RECYCLE_S = 1800

_lock = threading.Lock()
_engines: dict[str, sa.engine.Engine] = {}
# (storage class, database URL) pairs whose tables this process has already checked and created.
_tables_checked: set[tuple[str, str]] = set()


def shared_engine(url: str) -> sa.engine.Engine:
    """This process's pooled AUTOCOMMIT engine for ``url`` (dagster-postgres' isolation level)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=_POOL_SIZE,
                                      max_overflow=_MAX_OVERFLOW, pool_pre_ping=True, pool_recycle=_RECYCLE_S)
            _engines[url] = engine
        return engine


def _forget_parent_connections() -> None:
    for engine in list(_engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def _kwargs(inst_data: Any, config_value: Any) -> dict[str, Any]:
    return {"inst_data": inst_data, "postgres_url": pg_url_from_config(config_value),
            "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
            "token_provider": get_token_provider_from_config(config_value)}


def _autocreate_once(kind: str, postgres_url: str, should_autocreate_tables: bool) -> bool:
    """Whether this storage should check and create its tables: only the first of its kind for
    this URL in this process (and never when the configuration turns autocreation off)."""
    if not should_autocreate_tables:
        return False
    with _lock:
        first = (kind, postgres_url) not in _tables_checked
        _tables_checked.add((kind, postgres_url))
        return first


def _share(storage: Any) -> None:
    # A token provider (cloud IAM auth) injects credentials per connection: keep its own engine.
    if storage._token_provider is None:
        storage._engine = shared_engine(storage.postgres_url)


class PooledPostgresRunStorage(PostgresRunStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None) -> None:
        autocreate = _autocreate_once("run", postgres_url, should_autocreate_tables)
        try:
            super().__init__(postgres_url, autocreate, inst_data, token_provider)
        except BaseException:
            if autocreate:  # let the next instance try again
                _tables_checked.discard(("run", postgres_url))
            raise
        _share(self)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> PooledPostgresRunStorage:  # type: ignore[override]
        return cls(**_kwargs(inst_data, config_value))


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None) -> None:
        autocreate = _autocreate_once("eventlog", postgres_url, should_autocreate_tables)
        try:
            super().__init__(postgres_url, autocreate, inst_data, token_provider)
        except BaseException:
            if autocreate:  # let the next instance try again
                _tables_checked.discard(("eventlog", postgres_url))
            raise
        _share(self)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> PooledPostgresEventLogStorage:  # type: ignore[override]
        return cls(**_kwargs(inst_data, config_value))


class PooledPostgresScheduleStorage(PostgresScheduleStorage):
    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data: Any = None,
                 token_provider: Any = None) -> None:
        autocreate = _autocreate_once("schedule", postgres_url, should_autocreate_tables)
        try:
            super().__init__(postgres_url, autocreate, inst_data, token_provider)
        except BaseException:
            if autocreate:  # let the next instance try again
                _tables_checked.discard(("schedule", postgres_url))
            raise
        _share(self)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> PooledPostgresScheduleStorage:  # type: ignore[override]
        return cls(**_kwargs(inst_data, config_value))
