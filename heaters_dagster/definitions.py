"""The Dagster code location: the asset graph and sensors built from the stage table, plus resources.

To add assets of your own downstream of the pipeline (they receive the stage's outputs through its
IO manager's ``load_input``), merge them in: ``dg.Definitions.merge(build_definitions(),
dg.Definitions(assets=[my_asset]))``; see the README's "Your own assets downstream"."""

from __future__ import annotations

import dagster as dg

from heaters_dagster.assets.factory import build_graph_assets, build_stage_jobs
from heaters_dagster.io_managers.artifacts import ArtifactIOManager
from heaters_dagster.io_managers.embeddings import EmbeddingIOManager
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.executor import StageExecutor
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.sensors.factory import build_stage_sensors
from heaters_dagster.sensors.partitions import partition_retirement_sensor
from heaters_dagster.sensors.recovery import RECOVERY_SENSORS
from heaters_dagster.sensors.review import review_events_sensor


def default_resources(database_url: str | None = None, storage_url: str | None = None,
                      **executor_config: object) -> dict[str, object]:
    from heaters_dagster.settings import get_settings
    from heaters_dagster.stages import check_stage_params

    database = DatabaseResource(url=database_url)
    storage = StorageResource(url=storage_url)
    # stage parameters: the settings' (HEATERS_STAGE_PARAMS / heaters.toml), then the caller's, per key
    given = dict(executor_config.pop("stage_params", None) or {})  # type: ignore[call-overload]
    configured = get_settings().stage_params
    check_stage_params(configured, "HEATERS_STAGE_PARAMS (or heaters.toml's stage_params)")
    check_stage_params(given, "the executor's stage_params")
    stage_params = {name: {**configured.get(name, {}), **given.get(name, {})} for name in {*configured, *given}}
    return {
        "database": database,
        "storage": storage,
        "executor": StageExecutor(database=database, storage=storage, stage_params=stage_params,
                                  **executor_config),
        "artifact_io_manager": ArtifactIOManager(database=database, storage=storage),
        "video_io_manager": ArtifactIOManager(database=database, storage=storage),
        "embedding_io_manager": EmbeddingIOManager(database=database, storage=storage),
    }


def build_definitions(**resource_overrides: object) -> dg.Definitions:
    return dg.Definitions(
        assets=build_graph_assets(),
        jobs=build_stage_jobs(),
        sensors=[*build_stage_sensors(), review_events_sensor, *RECOVERY_SENSORS, partition_retirement_sensor],
        resources=default_resources(**resource_overrides),  # type: ignore[arg-type]
    )


defs = build_definitions()


def load_definitions() -> dg.Definitions:
    """The definitions built now, from the settings in force: a target for a reconstructable code
    pointer (``heaters_dagster.definitions:load_definitions``) whose every load, in the run worker and
    in each Celery worker, reads the configuration afresh."""
    return build_definitions()
