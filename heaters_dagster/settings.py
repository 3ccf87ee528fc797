"""Runtime settings, read from the environment (documented in README.md).

| variable | meaning | default |
| --- | --- | --- |
| HEATERS_HOME | project-local data folder (embedded Postgres data, artifact store, Dagster home) | ``./.heaters`` |
| HEATERS_DATABASE_URL | a real PostgreSQL (with pgvector) for Heaters' tables | embedded Postgres |
| HEATERS_DAGSTER_DATABASE_URL | PostgreSQL for Dagster's own instance storage | a ``dagster`` database beside Heaters' |
| HEATERS_STORAGE_URL | artifact store: a folder, or ``s3://bucket/prefix`` (fsspec) | ``$HEATERS_HOME/store`` |
| HEATERS_ALLOW_PRIVATE_URLS | fetch URLs whose host is loopback/private/link-local too | off |
| HEATERS_MAX_SOURCE_BYTES | largest local file accepted at submit (bytes; ``K``/``M``/``G``/``T`` suffixes) | 20 GiB |
| HEATERS_MAX_PIXELS | largest picture (width x height) ingest accepts | 3840x2160 |
| HEATERS_MAX_DURATION_S | longest source ingest accepts, in seconds | 14400 (4 h) |
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


DEFAULT_MAX_SOURCE_BYTES = 20 * 1024**3
DEFAULT_MAX_PIXELS = 3840 * 2160
DEFAULT_MAX_DURATION_S = 4 * 3600.0
_SIZE_SUFFIX = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _size(name: str, default: int) -> int:
    raw = (os.environ.get(name) or "").strip().lower().removesuffix("ib").removesuffix("b")
    if not raw:
        return default
    number, suffix = (raw[:-1], raw[-1]) if raw[-1] in _SIZE_SUFFIX else (raw, "")
    try:
        value = int(float(number) * _SIZE_SUFFIX[suffix])
    except ValueError:
        raise ValueError(f"{name} must be a byte count such as 20G or 1048576, got {os.environ[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {os.environ[name]!r}")
    return value


def max_source_bytes() -> int:
    """HEATERS_MAX_SOURCE_BYTES: the largest local file copied into the store at submit."""
    return _size("HEATERS_MAX_SOURCE_BYTES", DEFAULT_MAX_SOURCE_BYTES)


def max_pixels() -> int:
    """HEATERS_MAX_PIXELS: the largest width x height of a source's picture."""
    return int(env_float("HEATERS_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def max_duration_s() -> float:
    """HEATERS_MAX_DURATION_S: the longest source, in seconds."""
    return env_float("HEATERS_MAX_DURATION_S", DEFAULT_MAX_DURATION_S)
