"""Shared fixtures: a real PostgreSQL with pgvector (the embedded default, in a temporary folder,
or HEATERS_TEST_DATABASE_URL), migrated once per session and emptied before each test; a
temporary artifact store; Dagster definitions wired to both; a test Dagster instance."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

_TEST_HOME = Path(tempfile.mkdtemp(prefix="heaters-test-home-"))
os.environ.setdefault("HEATERS_HOME", str(_TEST_HOME))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A developer's heaters.toml (in the checkout or their home) never reaches the tests: tests that
# need a project file write their own and point HEATERS_CONFIG / HEATERS_HOME at it.
os.environ["HEATERS_CONFIG"] = "none"
# Tests never use a developer's configured database by accident.
os.environ.pop("HEATERS_DATABASE_URL", None)
if os.environ.get("HEATERS_TEST_DATABASE_URL"):
    os.environ["HEATERS_DATABASE_URL"] = os.environ["HEATERS_TEST_DATABASE_URL"]

import dagster as dg  # noqa: E402
from sqlalchemy import text  # noqa: E402

from heaters_dagster.database.engine import database_url, get_engine  # noqa: E402
from heaters_dagster.database.migrate import upgrade  # noqa: E402
from heaters_dagster.resources.database import DatabaseResource  # noqa: E402

TABLES = ("review_events", "embeddings", "clip_artifacts", "stage_results", "clips", "source_videos")


@pytest.fixture(scope="session")
def db_url() -> str:
    url = database_url()
    upgrade(url)
    return url


@pytest.fixture()
def db(db_url: str) -> Iterator[DatabaseResource]:
    engine = get_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield DatabaseResource(url=db_url)


@pytest.fixture()
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture()
def defs(db: DatabaseResource, store_dir: Path) -> dg.Definitions:
    from heaters_dagster.definitions import build_definitions

    return build_definitions(database_url=db.url, storage_url=str(store_dir))


@pytest.fixture()
def store(defs: dg.Definitions):
    return defs.resources["storage"].store


@pytest.fixture()
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")
