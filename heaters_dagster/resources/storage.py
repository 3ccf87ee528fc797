"""The artifact store as a Dagster resource: a local folder by default, S3/fsspec when configured."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import dagster as dg

from heaters_dagster.settings import storage_url
from heaters_dagster.storage import ArtifactStore


class StorageResource(dg.ConfigurableResource):
    """Where clip files, sprites and keyframes live. ``url``: a folder or ``s3://bucket/prefix``;
    empty means HEATERS_STORAGE_URL or ``$HEATERS_HOME/store``."""

    url: Optional[str] = None

    @property
    def store(self) -> ArtifactStore:
        return _store_for(self.url or storage_url())


@lru_cache(maxsize=8)
def _store_for(url: str) -> ArtifactStore:
    return ArtifactStore(url)
