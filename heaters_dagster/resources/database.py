"""The database as a Dagster resource (embedded default, or ``url``/``HEATERS_DATABASE_URL``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import dagster as dg
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from heaters_dagster.database.engine import get_engine, session_scope


class DatabaseResource(dg.ConfigurableResource):
    """Heaters' PostgreSQL. Leave ``url`` empty to use HEATERS_DATABASE_URL or the embedded server."""

    url: Optional[str] = None

    @property
    def engine(self) -> Engine:
        return get_engine(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as s:
            yield s
