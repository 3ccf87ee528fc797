"""Dagster resources: the database, the artifact store, and the generic stage executor."""

from heaters_dagster.resources.database import DatabaseResource  # noqa: F401
from heaters_dagster.resources.storage import StorageResource  # noqa: F401
