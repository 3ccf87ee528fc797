"""Locating the project and preparing DAGSTER_HOME for ``heaters dev`` and ``heaters demo``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from heaters_dagster.settings import heaters_home, project_root

__all__ = ["prepare_dagster_home", "project_root"]


def prepare_dagster_home() -> Path:
    """Create ``$HEATERS_HOME/dagster_home`` with the project's dagster.yaml and export DAGSTER_HOME
    (unless the operator set DAGSTER_HOME already)."""
    from heaters_dagster.settings import get_settings

    # dagster.yaml reads the run queue's interval from the environment (heaters dev's children inherit it).
    os.environ["HEATERS_DEQUEUE_INTERVAL_S"] = str(get_settings().dequeue_interval_s)
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    home = heaters_home() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    src = project_root() / "dagster.yaml"
    if src.exists():
        shutil.copyfile(src, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home
