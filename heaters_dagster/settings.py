"""Runtime settings, read from the environment (documented in README.md).

| variable | meaning | default |
| --- | --- | --- |
| HEATERS_HOME | project-local data folder (embedded Postgres data, artifact store, Dagster home) | ``./.heaters`` |
| HEATERS_DATABASE_URL | a real PostgreSQL (with pgvector) for Heaters' tables | embedded Postgres |
| HEATERS_DAGSTER_DATABASE_URL | PostgreSQL for Dagster's own instance storage | a ``dagster`` database beside Heaters' |
| HEATERS_STORAGE_URL | artifact store: a folder, or ``s3://bucket/prefix`` (fsspec) | ``$HEATERS_HOME/store`` |
"""

from __future__ import annotations

import os
from pathlib import Path


def heaters_home() -> Path:
    home = Path(os.environ.get("HEATERS_HOME") or Path.cwd() / ".heaters").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def storage_url() -> str:
    return os.environ.get("HEATERS_STORAGE_URL") or str(heaters_home() / "store")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default

