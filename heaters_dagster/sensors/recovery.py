"""Recovery sensors: nothing stays stuck in an in-progress state.

* ``lease_recovery_sensor`` returns items whose lease expired (their worker died, hung or lost the
  database for longer than a lease) to their input state with a new version, so the stage sensors
  request them again; an item lost ``HEATERS_MAX_LOST`` times becomes a poison item in its failure
  state. This is the backstop that needs no signal from anyone.
* ``release_failed_runs`` / ``release_canceled_runs`` (Dagster run status sensors) return the items
  of a run that Dagster knows is dead at once, without waiting for the lease: a run worker that
  crashed is reported failed by the code server that launched it, a run that hangs past its
  ``dagster/max_runtime`` or start timeout by the daemon's run monitoring (``dagster.yaml``), and a
  run terminated from the UI ends canceled. The items of such a run that died before its step
  started (a worker that could not start, run monitoring's start timeout, a run canceled in the
  queue), which it never claimed, get a new version too, so their
  sensor requests them again, and so do the items it sent back after a transient error for a step
  retry that will not come (the run died in the retry's backoff, was terminated, or failed on
  another item); while Dagster will retry the run (``dagster/will_retry``), the retry covers them
  instead.

* ``store_hygiene_sensor`` (every ``HEATERS_HYGIENE_INTERVAL_S``, 30 min) removes what a kill
  between storing files and committing their rows leaves behind: store files no row references and
  unfinished temp files, once older than ``HEATERS_ORPHAN_GRACE_S`` (``heaters doctor``'s checks and
  fixes, run unattended), and stale scratch folders.

They only change rows and files; the stage sensors do the requesting, so nothing is requested twice.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import dagster as dg
from dagster._core.storage.tags import (ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG,
                                        PARTITION_NAME_TAG, WILL_RETRY_TAG)
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from heaters_dagster import leases
from heaters_dagster.assets.factory import chained, job_name
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.settings import get_settings
from heaters_dagster.stages import STAGES, Stage

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


def stage_of_run(run: dg.DagsterRun) -> Stage | None:
    """The stage whose job ``run`` is (None for any other job)."""
    return next((s for s in STAGES if job_name(s) == run.job_name), None)


def run_partition_keys(run: dg.DagsterRun, keys_in_order: Callable[[], Sequence[str]]) -> list[str]:
    """The partitions a run covers: its partition tag, or its range over the partition order
    (``keys_in_order``, called only for a range; by id when an end has since left the set)."""
    tags = run.tags
    if tags.get(PARTITION_NAME_TAG):
        return [tags[PARTITION_NAME_TAG]]
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if not start or not end:
        return []
    order = keys_in_order()
    pos = {k: i for i, k in enumerate(order)}
    if start in pos and end in pos:
        return list(order[pos[start]:pos[end] + 1])
    try:
        lo, hi = int(start), int(end)
    except ValueError:
        return []
    return [k for k in order if k.isdigit() and lo <= int(k) <= hi] or [start, end]


def unclaimed_items_of(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[Stage | None, list[int]]:
    """The items of a stage run that died before its step started (so it claimed none of them),
    less those another unfinished run of the stage covers. Empty when its step started (the
    executor claimed its items at once; a step that dies later is Dagster's step retry's and the
    leases' business) and while Dagster will retry the run (the retry covers them)."""
    stage = stage_of_run(run)
    if stage is None:
        return None, []
    fresh = instance.get_run_by_id(run.run_id) or run
    if fresh.tags.get(WILL_RETRY_TAG) == "true":
        return stage, []
    if instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START, limit=1).records:
        return stage, []
    order = functools.cache(lambda: instance.get_dynamic_partitions(stage.partitions_name))  # ranges only
    mine = set(run_partition_keys(fresh, order))
    if not mine:
        return stage, []
    mine -= covered_by_unfinished_runs(instance, stage, order, but=run.run_id)
    return stage, sorted(int(k) for k in mine if k.isdigit())


def transient_items_no_retry_takes(instance: dg.DagsterInstance, session: object, stage: Stage,
                                   run: dg.DagsterRun) -> list[int]:
    """The items of a dead stage run whose last result is a transient error in that run: the
    executor sent them back at their requested version for the step's retry, which will not come
    now (the run died in the retry's backoff, or was terminated, or failed on another item's
    permanent error). Empty while Dagster will retry the run, whose re-executed step takes them;
    less those another unfinished run of the stage covers."""
    fresh = instance.get_run_by_id(run.run_id) or run
    if fresh.tags.get(WILL_RETRY_TAG) == "true":
        return []
    left = leases.left_after_transient_errors(session, stage, run.run_id)  # type: ignore[arg-type]
    if not left:
        return []
    covered = covered_by_unfinished_runs(instance, stage, but=run.run_id)
    return [i for i in left if str(i) not in covered]


def covered_by_unfinished_runs(instance: dg.DagsterInstance, stage: Stage,
                               keys_in_order: Callable[[], Sequence[str]] | None = None,
                               but: str | None = None) -> set[str]:
    """The partitions that queued, starting or running runs of the stage's job cover (other than
    run ``but``)."""
    order = keys_in_order or functools.cache(lambda: instance.get_dynamic_partitions(stage.partitions_name))
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name(stage), statuses=list(NOT_FINISHED_STATUSES)))
    return {k for run in runs if run.run_id != but for k in run_partition_keys(run, order)}


def release_run_items(database: DatabaseResource, run: dg.DagsterRun, reason: str, log: object,
                      instance: dg.DagsterInstance | None = None) -> list:
    """The run is dead: its claimed items go back at once (new version, counted as lost), and, with
    ``instance``, so do the items it covered but never claimed and the items it sent back after a
    transient error for a step retry that will not come: both would otherwise sit in their input
    state at the version their sensor already requested, never requested again."""
    stage, unclaimed = unclaimed_items_of(instance, run) if instance is not None else (None, [])
    with database.session() as session:
        released = leases.release_run(session, run.run_id, reason)
        if stage is not None and unclaimed:
            released += leases.release_unclaimed(session, stage, unclaimed, run_id=run.run_id,
                                                 reason=f"{reason}; before it claimed this {stage.entity}")
        for part in ((stage, *chained(stage)) if stage is not None and instance is not None else ()):
            left = transient_items_no_retry_takes(instance, session, part, run)
            if left:
                released += leases.release_unclaimed(
                    session, part, left, run_id=run.run_id, error_type="RunDiedAfterTransientError",
                    reason=f"{reason}; after a transient error, with no retry of its step to come")
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
                      context.log, context.instance)


@dg.run_status_sensor(name="release_canceled_runs", run_status=dg.DagsterRunStatus.CANCELED,
                      default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=1,
                      description="When a run is canceled, its claimed items go back to their input state at once.")
def release_canceled_runs(context: dg.RunStatusSensorContext, database: DatabaseResource) -> None:
    release_run_items(database, context.dagster_run, f"run {context.dagster_run.run_id} was canceled", context.log,
                      context.instance)


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
