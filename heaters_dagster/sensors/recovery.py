"""Recovery sensors: nothing stays stuck in an in-progress state.

* ``lease_recovery_sensor`` returns items whose lease expired (their worker died, hung or lost the
  database for longer than a lease) to their input state with a new version, so the stage sensors
  request them again; an item lost ``HEATERS_MAX_LOST`` times becomes a poison item in its failure
  state. This is the backstop that needs no signal from anyone.
* ``release_failed_runs`` / ``release_canceled_runs`` (Dagster run status sensors) return the items
  of a run that Dagster knows is dead at once, without waiting for the lease: a run worker that
  crashed is reported failed by the code server that launched it, a run that hangs past its
  ``dagster/max_runtime`` or start timeout by the daemon's run monitoring (``dagster.yaml``), and a
  run terminated from the UI ends canceled.

* ``store_hygiene_sensor`` (every ``HEATERS_HYGIENE_INTERVAL_S``, 30 min) removes what a kill
  between storing files and committing their rows leaves behind: store files no row references and
  unfinished temp files, once older than ``HEATERS_ORPHAN_GRACE_S`` (``heaters doctor``'s checks and
  fixes, run unattended), and stale scratch folders.

They only change rows and files; the stage sensors do the requesting, so nothing is requested twice.
"""

from __future__ import annotations

import dagster as dg

from heaters_dagster import leases
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.settings import get_settings

RECOVERY_INTERVAL_S = get_settings().recovery_interval_s  # fixed when the code location loads


def _describe(recovered: list[leases.Recovered]) -> str:
    return "; ".join(f"{r.kind} {r.id} ({r.stage}) -> {r.to_state}{' [poison]' if r.poison else ''}"
                     for r in recovered[:50])


def evaluate_lease_recovery(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    with database.session() as session:
        recovered = leases.recover_expired(session)
    if not recovered:
        return dg.SensorResult(skip_reason=dg.SkipReason("no expired claims"))
    for r in recovered:
        (context.log.error if r.poison else context.log.warning)(
            f"{r.kind} {r.id}: {r.from_state} -> {r.to_state}: {r.reason}")
    return dg.SensorResult(skip_reason=dg.SkipReason(f"recovered {len(recovered)}: {_describe(recovered)}"))


@dg.sensor(name="lease_recovery_sensor", minimum_interval_seconds=RECOVERY_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Returns items whose claim lease expired to their stage's input state (new version, "
           "reason in last_error); an item lost HEATERS_MAX_LOST times goes to its failure state as poison.")
def lease_recovery_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    return evaluate_lease_recovery(context, database)


def release_run_items(database: DatabaseResource, run: dg.DagsterRun, reason: str, log: object) -> list:
    with database.session() as session:
        released = leases.release_run(session, run.run_id, reason)
    for r in released:
        getattr(log, "warning")(f"{r.kind} {r.id}: {r.from_state} -> {r.to_state}: {r.reason}")
    return released


# Interval 1: evaluated at every turn of the sensor daemon (5 s); 5 would be every other turn (see
# sensors/factory.py, build_stage_sensor).
@dg.run_failure_sensor(name="release_failed_runs", default_status=dg.DefaultSensorStatus.RUNNING,
                       minimum_interval_seconds=1,
                       description="When a run fails (a crashed run worker included), its claimed items go "
                       "back to their input state at once.")
def release_failed_runs(context: dg.RunFailureSensorContext, database: DatabaseResource) -> None:
    message = (context.failure_event.message or "").strip().splitlines()[:1]
    release_run_items(database, context.dagster_run,
                      f"run {context.dagster_run.run_id} failed" + (f": {message[0][:300]}" if message else ""),
                      context.log)


@dg.run_status_sensor(name="release_canceled_runs", run_status=dg.DagsterRunStatus.CANCELED,
                      default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=1,
                      description="When a run is canceled, its claimed items go back to their input state at once.")
def release_canceled_runs(context: dg.RunStatusSensorContext, database: DatabaseResource) -> None:
    release_run_items(database, context.dagster_run, f"run {context.dagster_run.run_id} was canceled", context.log)


HYGIENE_INTERVAL_S = get_settings().hygiene_interval_s  # fixed when the code location loads


def evaluate_store_hygiene(context: dg.SensorEvaluationContext, database: DatabaseResource,
                           store: object) -> dg.SensorResult:
    from heaters_dagster.doctor import diagnose, repair

    with database.session() as session:
        report = diagnose(session, store, checks=("orphan_file", "temp_file", "stale_scratch"))  # type: ignore[arg-type]
        if report.findings:
            repair(report, session, store)  # type: ignore[arg-type]
    for f in report.findings:
        context.log.warning(f.line())
    return dg.SensorResult(skip_reason=dg.SkipReason(report.summary()))


@dg.sensor(name="store_hygiene_sensor", minimum_interval_seconds=HYGIENE_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Removes store files that no row references and unfinished temp files (older than "
           "HEATERS_ORPHAN_GRACE_S), and stale scratch folders: what a crash between storing and committing "
           "leaves behind. `heaters doctor` shows the same findings on demand.")
def store_hygiene_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource,
                         storage: StorageResource) -> dg.SensorResult:
    return evaluate_store_hygiene(context, database, storage.store)


RECOVERY_SENSORS = [lease_recovery_sensor, release_failed_runs, release_canceled_runs, store_hygiene_sensor]
