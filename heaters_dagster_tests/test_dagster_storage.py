"""The Dagster instance storage dagster.yaml configures (heaters_dagster/dagster_storage.py):
Dagster's tables checked and created once per process, not once per instance, and one pooled
engine per process and database, whatever number of DagsterInstances the process builds."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Iterator

import dagster as dg
import pytest
from dagster_postgres import PostgresRunStorage
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.pool import Pool

from heaters_dagster.dagster_home import project_root
from heaters_dagster.dagster_storage import (PooledPostgresEventLogStorage, PooledPostgresRunStorage,
                                             PooledPostgresScheduleStorage, shared_engine)
from heaters_dagster.database.embedded import to_libpq_url
from heaters_dagster.database.migrate import ensure_dagster_storage


@pytest.fixture()
def fresh_dagster_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty database on the test server, as HEATERS_DAGSTER_DATABASE_URL (libpq form)."""
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = to_libpq_url(make_url(db_url).set(database=name).render_as_string(hide_password=False))
    monkeypatch.setenv("HEATERS_DAGSTER_DATABASE_URL", url)
    try:
        yield url
    finally:
        shared_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    finally:
        engine.dispose()


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(project_root() / "dagster.yaml", home / "dagster.yaml")
    return home


def test_the_first_instance_of_a_process_creates_the_tables_and_later_ones_do_not_look(
        fresh_dagster_db: str, tmp_path: Path) -> None:
    home = _home(tmp_path)
    connects: list[int] = []
    count = lambda *_: connects.append(1)  # noqa: E731
    event.listen(Pool, "connect", count)  # every connection any engine in this process opens
    try:
        # A fresh database and no `heaters dev` first (a script, `dagster dev`, a benchmark).
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(instance.run_storage, PooledPostgresRunStorage)
            assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PooledPostgresScheduleStorage)
            instance.add_dynamic_partitions("clips", ["1", "2"])
            assert instance.get_dynamic_partitions("clips") == ["1", "2"]
            assert instance.get_runs() == []
        assert {"runs", "event_logs", "jobs", "instigators", "dynamic_partitions",
                "alembic_version"} <= _tables(fresh_dagster_db)
        assert connects  # it did look

        connects.clear()
        for _ in range(5):  # as the code server does: one instance per sensor evaluation
            dg.DagsterInstance.from_config(str(home)).dispose()
        assert connects == [], f"{len(connects)} connections to build 5 instances"

        # dagster-postgres' own storage lists the tables on every instance it builds.
        for _ in range(2):
            PostgresRunStorage(fresh_dagster_db)
        assert len(connects) >= 2
    finally:
        event.remove(Pool, "connect", count)

    ensure_dagster_storage()  # reads HEATERS_DAGSTER_DATABASE_URL; existing tables stay as they are
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("clips") == ["1", "2"]


def test_every_instance_of_a_process_shares_one_pool(fresh_dagster_db: str, tmp_path: Path) -> None:
    ensure_dagster_storage(fresh_dagster_db)
    home = _home(tmp_path)
    engine = shared_engine(fresh_dagster_db)
    engine.dispose()
    connects: list[int] = []
    event.listen(engine, "connect", lambda *_: connects.append(1))

    queries = 0
    for i in range(5):  # as the code server does: one instance per sensor evaluation
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
                assert storage._engine is engine
            for _ in range(4):
                instance.get_runs(limit=1)
                instance.get_dynamic_partitions("clips")
                instance.all_instigator_state()
                queries += 3
            instance.add_dynamic_partitions("clips", [str(i)])
            queries += 1
    assert queries == 65
    assert 1 <= len(connects) <= 2, f"{len(connects)} connections for {queries} queries"
    assert engine.pool.checkedout() == 0

    # dagster-postgres' own storage, for comparison: a new connection per query.
    stock = PostgresRunStorage(fresh_dagster_db, should_autocreate_tables=False)
    stock_connects: list[int] = []
    event.listen(stock._engine, "connect", lambda *_: stock_connects.append(1))
    for _ in range(10):
        stock.get_runs(limit=1)
    assert len(stock_connects) == 10
