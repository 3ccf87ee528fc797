"""Build one partitioned asset per stage from the stage table.

Each asset is a thin call into the generic executor. A run may cover many partitions (a range of
the shared ``clips`` or ``videos`` partition set: the sensors request ranges, the UI can backfill
ranges); every item that succeeds gets its own materialization with its own metadata, an item that
fails gets none. Transient failures make the step raise after the others are saved, so the asset's
RetryPolicy (exponential backoff, jitter) retries just those; permanent failures fail the run
without retry, after every other item of the run has been processed.

Each asset declares its upstream nodes from the stage table (``assets/graph.py`` has the partition
mappings) and its asset checks (``heaters_dagster/checks.py``), evaluated per partition at the end of
every run. A run that selects only an asset's checks (the UI's "Execute" on a check) evaluates them
and does no stage work.
"""


from typing import Any, Iterator

import warnings

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError  # what an interrupted step raises

from heaters_dagster.assets.graph import CLIPS, asset_deps, build_human_step_asset, partitions_def_for
from heaters_dagster.checks import CheckEnv, get_check
from heaters_dagster.pipeline.handlers import preview_metadata
from heaters_dagster.pipeline.outputs import BatchReport, ItemOutput
from heaters_dagster.resources.executor import Committed
from heaters_dagster.settings import get_settings
from heaters_dagster.stages import HUMAN_STEPS, STAGES, Stage, followers_of, get_stage, stage_groups

warnings.filterwarnings("ignore", category=dg.BetaWarning)  # backfill_policy is beta in 1.13


class TransientStageError(Exception):
    """Raised at the end of a run in which some items hit a transient error (RetryPolicy retries)."""


def _metadata_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return dg.MetadataValue.text(str(value))
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(round(value, 4))
    return dg.MetadataValue.text(str(value))


def item_metadata(stage: Stage, item_id: int, out: ItemOutput, seconds: float) -> dict[str, Any]:
    md: dict[str, Any] = {f"{stage.entity}_id": dg.MetadataValue.int(item_id),
                          "duration_s": dg.MetadataValue.float(round(seconds, 3))}
    md.update({k: _metadata_value(v) for k, v in out.metadata.items()})
    if out.thumbnail_jpeg:
        md.update(preview_metadata(stage.entity, item_id, out.thumbnail_jpeg, f"{stage.name} {item_id}"))
    return md


def report_summary(report: BatchReport) -> str:
    lines = [f"{report.stage}: {len(report.succeeded)} succeeded, {len(report.permanent)} failed, "
             f"{len(report.transient)} to retry, {len(report.skipped)} skipped"
             + (f" ({len(report.held)} held by another worker)" if report.held else "")
             + (f", {len(report.lost)} lost to another worker" if report.lost else "")
             + (f", {len(report.unfinished)} unfinished" if report.unfinished else "")
             + (f", {len(report.taken_back)} taken back from an earlier attempt" if report.taken_back else "")]
    lines += [f"  {i}: {m}" for i, m in sorted(report.permanent.items())]
    lines += [f"  {i} (transient): {m}" for i, m in sorted(report.transient.items())]
    lines += [f"  {i} (held): {m}" for i, m in sorted(report.held.items())]
    lines += [f"  {i} (lost): {m}" for i, m in sorted(report.lost.items())]
    lines += [f"  {i} (unfinished): {m}" for i, m in sorted(report.unfinished.items())]
    lines += [f"  {i} (refused): {m}" for i, m in sorted(report.refused.items())]
    lines += [f"  {i} (run again from {m})" for i, m in sorted(report.rewound.items())]
    return "\n".join(lines)


def report_tags(report: BatchReport) -> dict[str, str]:
    """Run tags that make a run that was not a clean success visible in the runs list."""
    tags = {"heaters/succeeded": str(len(report.succeeded))}
    for name, items in (("failed", report.permanent), ("retrying", report.transient), ("held", report.held),
                        ("lost", report.lost), ("unfinished", report.unfinished), ("skipped", report.skipped),
                        ("refused", report.refused), ("rerun", report.rewound)):
        if items:
            tags[f"heaters/{name}"] = ",".join(str(i) for i in sorted(items))[:200]
    if report.taken_back:
        tags["heaters/taken_back"] = ",".join(str(i) for i in sorted(report.taken_back))[:200]
    return tags


class UnfinishedItemsError(Exception):
    """Raised when some items' outcome could not be recorded (database away): the RetryPolicy's next
    attempt of the same run takes their claims back and does them again."""


# Stages whose work is ffmpeg: one Dagster concurrency pool caps them across all runs (dagster.yaml).
FFMPEG_POOL = "heaters_ffmpeg"


def _takeback_run_ids(context: dg.AssetExecutionContext) -> tuple[str, ...]:
    """A run retry (Dagster's run_retries after a crash) may take back the claims of the run it retries."""
    run = context.run
    return tuple(r for r in (run.parent_run_id, run.root_run_id) if r)


def check_specs_for(stage: Stage) -> list[dg.AssetCheckSpec]:
    """One partitioned check spec per stage check (a preview feature of Dagster 1.13: the UI shows
    each partition's latest evaluation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [dg.AssetCheckSpec(name, asset=stage.asset_name, description=get_check(name).description,
                                  partitions_def=partitions_def_for(stage), blocking=False)
                for name in stage.checks]


def latest_materializations(instance: dg.DagsterInstance, key: dg.AssetKey,
                            partitions: list[str]) -> dict[str, Any]:
    """Each partition's latest materialization, as the target of a check evaluation (two queries).
    Without a target the UI treats an evaluation as older than the partition's materialization and
    shows no status for it."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster._core.events import DagsterEventType

    ids = instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION, set(partitions))
    if not ids:
        return {}
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())),
                                              limit=len(ids)).records
    return {r.partition_key: AssetCheckEvaluationTargetMaterializationData(
        storage_id=r.storage_id, run_id=r.run_id, timestamp=r.timestamp) for r in records if r.partition_key}


def evaluate_checks(stage: Stage, executor: Any, ids: list[int], log: Any,
                    instance: "dg.DagsterInstance | None" = None) -> list[dg.AssetCheckEvaluation]:
    """Evaluate the stage's checks on the run's partitions: one AssetCheckEvaluation per partition
    a check applies to, targeting that partition's latest materialization. A check that cannot
    run (database away) is logged and left unevaluated."""
    if not stage.checks or not ids:
        return []
    key = dg.AssetKey(stage.asset_name)
    try:
        targets = latest_materializations(instance, key, [str(i) for i in ids]) if instance is not None else {}
    except Exception as exc:  # noqa: BLE001 - the evaluations are still worth recording
        log.warning(f"[{stage.name}] could not look up the latest materializations for the checks: {exc}")
        targets = {}
    events: list[dg.AssetCheckEvaluation] = []
    failed: dict[str, list[int]] = {}
    for name in stage.checks:
        check = get_check(name)
        try:
            with executor.database.session() as session:
                env = CheckEnv(session=session, store=executor.storage.store, params=executor.params_for(stage),
                               splice_params=executor.params_for(get_stage("splice")))
                outcomes = check.evaluate(env, ids)
        except Exception as exc:  # noqa: BLE001 - checks report; they never fail the stage's work
            log.warning(f"[{stage.name}] check {name} could not be evaluated: {type(exc).__name__}: {exc}")
            continue
        for item_id, res in sorted(outcomes.items()):
            events.append(dg.AssetCheckEvaluation(
                asset_key=key, check_name=name, passed=res.passed, partition=str(item_id),
                description=res.description, severity=dg.AssetCheckSeverity.ERROR, blocking=False,
                metadata={k: _metadata_value(v) for k, v in res.metadata.items()},
                target_materialization_data=targets.get(str(item_id)),
            ))
            if not res.passed:
                failed.setdefault(name, []).append(item_id)
    for name, bad in failed.items():
        log.warning(f"[{stage.name}] check {name} failed for {stage.entity}s {', '.join(map(str, bad))}")
    return events


def _stage_part(context: dg.AssetExecutionContext, stage: Stage, ids: list[int], explicit: bool,
                ) -> Iterator[Any]:
    """One stage's work over the run's partitions ``ids``: yields its materializations, then its
    check evaluations (which target those materializations, so they must be stored first), and
    returns its report and the error the step must raise for it (None when clean)."""
    key = dg.AssetKey(stage.asset_name)
    executor = context.resources.executor
    work, others = ids, []
    if len(ids) > 1 and not explicit:  # a sensor's range of the shared partition set may bridge items
        work, others = executor.stage_work(stage, ids)
        if others:
            context.log.info(f"[{stage.name}] {len(work)} of the range's {len(ids)} partitions are this "
                             f"stage's work; {len(others)} {stage.entity}s in other states left alone")
    waiting = set(others)  # the range's items still upstream: those ready when the work is done go too

    def top_up() -> list[int]:
        # ... and those of its work it could not claim at first (not ready yet)
        ready = executor.ready_among(stage, sorted(waiting | (set(report.skipped) - set(report.succeeded))))
        waiting.difference_update(ready)
        for i in ready:
            report.skipped.pop(i, None)
        return ready

    report = BatchReport(stage=stage.name)
    progress = executor.execute_iter(
        stage, work, getattr(context.resources, stage.io_manager_key), log=context.log,
        attempt=context.retry_number, run_id=context.run_id, step_key=stage.name,
        takeback_run_ids=_takeback_run_ids(context), explicit=explicit, report=report,
        top_up=top_up if others and get_settings().range_reach else None,
    )
    stream = get_settings().stream_events
    held: list[Committed] = []  # committed, not yet recorded
    recorded: set[int] = set()
    unchecked: list[int] = []  # materialized, checks not yet evaluated
    checked: set[int] = set()
    try:
        while True:
            try:
                held.append(next(progress))
            except StopIteration:
                break
            if stream:
                done = yield from _record(context, stage, key, held)
                recorded.update(done)
                unchecked += done
                held = []
                if len(unchecked) >= STREAM_CHECKS_EVERY:
                    yield from evaluate_checks(stage, executor, unchecked, context.log, context.instance)
                    checked.update(unchecked)
                    unchecked = []
    except BaseException as exc:
        # Raised in the executor, or here (an interruption while an event was written): there the
        # executor hands its unfinished items back as if it had been raised in it. Either way the
        # exception goes on up...
        try:
            progress.throw(exc)
        except BaseException as again:
            if again is not exc:
                raise
        if isinstance(exc, (KeyboardInterrupt, DagsterExecutionInterruptedError)):
            # ... after the items committed before the work stopped (those being worked on when
            # the interruption came may have finished) are recorded, or their partitions would
            # stay unmaterialized in Dagster although they went on to the next stage.
            late = {i: out for i, out in report.succeeded.items() if i not in recorded}
            if late:
                yield from _record(context, stage, key, [Committed(
                    late, {i: report.durations.get(i, 0.0) for i in late}, tuple(report.new_clip_ids))])
        raise exc
    yield from _record(context, stage, key, held)
    # The checks of the rest of the range: the items not committed here are checked too.
    yield from evaluate_checks(stage, executor, [i for i in ids if i not in checked], context.log, context.instance)
    summary = report_summary(report)
    clean = not _not_done(report)
    (context.log.info if clean else context.log.warning)(summary)
    try:
        tags = report_tags(report)
        if stage.runs_after:  # a follower's counts beside its head's, in the same run
            tags = {k.replace("heaters/", f"heaters/{stage.name}/", 1): v for k, v in tags.items()}
        context.instance.add_run_tags(context.run_id, tags)
    except Exception as exc:  # noqa: BLE001 - tags are for people; never fail the work over them
        context.log.warning(f"could not tag the run: {exc}")
    error: Exception | None = None
    if report.unfinished:
        error = UnfinishedItemsError(summary)
    elif report.transient:
        error = TransientStageError(summary)
    elif report.refused:
        error = dg.Failure(description=summary, allow_retries=False, metadata={"refused": dg.MetadataValue.text(
            "; ".join(f"{i}: {m}" for i, m in sorted(report.refused.items()))[:4000])})
    elif report.permanent:
        error = dg.Failure(description=summary, allow_retries=False,
                           metadata={"failed_ids": dg.MetadataValue.text(
                               ", ".join(str(i) for i in sorted(report.permanent)))})
    return report, error


# A streaming step evaluates the checks of the items it materialized in groups of this many (the
# check queries cost about the same for one item as for many).
STREAM_CHECKS_EVERY = 8


def _record(context: dg.AssetExecutionContext, stage: Stage, key: dg.AssetKey,
            committed: list[Committed]) -> Iterator[Any]:
    """Materializations of committed items (after registering the clips they made); returns their ids."""
    ids: list[int] = []
    for c in committed:
        if stage.registers_new_clips and c.new_clip_ids:
            context.instance.add_dynamic_partitions(CLIPS.name, [str(i) for i in c.new_clip_ids])
        for item_id, out in c.outputs.items():
            yield dg.AssetMaterialization(asset_key=key, partition=str(item_id),
                                          metadata=item_metadata(stage, item_id, out, c.durations[item_id]))
            ids.append(item_id)
    return ids


def _run_terminated(context: dg.AssetExecutionContext) -> bool:
    """Whether a person (UI, GraphQL, CLI) asked for the step's run to be terminated."""
    try:
        run = context.instance.get_run_by_id(context.run_id)
    except Exception:  # noqa: BLE001 - no database: treat the interruption as Dagster does
        return False
    return run is not None and run.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


def step_error(first: Exception | None, then: Exception | None) -> Exception | None:
    """What a step of several stages raises: the first part's error, unless a later part's asks
    for a retry and the first's does not (a splice item's transient error must still be retried
    when an ingest item of the same run failed for good: the retry skips what is done)."""
    retryable = (TransientStageError, UnfinishedItemsError)
    if first is None or (isinstance(then, retryable) and not isinstance(first, retryable)):
        return then
    return first


def _not_done(report: BatchReport) -> set[int]:
    """Items a stage did not finish in this attempt: the stages after it in the step leave them alone."""
    return {*report.permanent, *report.transient, *report.refused, *report.unfinished, *report.lost, *report.held}


def build_stage_asset(group: "Stage | tuple[Stage, ...]") -> dg.AssetsDefinition:
    """One op for a stage, or for a stage and the stages that run after it (``Stage.runs_after``,
    ``stages.stage_groups``): one asset per stage, each with its own checks and IO manager. A run
    that selects several of them does them in order in one step, each later one on the partitions
    the ones before did not fail; a run that selects one (its own job, the UI) does only that one."""
    group = (group,) if isinstance(group, Stage) else tuple(group)
    head = group[0]
    keys = {s.name: dg.AssetKey(s.asset_name) for s in group}
    external = [d for s in group for d in asset_deps(s) if d.asset_key not in keys.values()]
    outs = {s.asset_name: dg.AssetOut(
        key=keys[s.name], description=s.description, io_manager_key=s.io_manager_key, is_required=False,
        group_name="pipeline", kinds=set(s.kinds),
        metadata={"entity": s.entity, "input_states": ", ".join(s.input_states),
                  "in_progress_state": s.in_progress_state, "output_state": s.output_state,
                  "failure_state": s.failure_state, "upstream": ", ".join(s.upstream) or "none",
                  **({"runs_after": s.runs_after} if s.runs_after else {})},
    ) for s in group}

    @dg.multi_asset(
        name=head.asset_name,
        outs=outs,
        deps=external,
        internal_asset_deps={s.asset_name: {dg.AssetKey(u) for u in s.upstream} for s in group}
        if len(group) > 1 else None,
        partitions_def=partitions_def_for(head),
        check_specs=[spec for s in group for spec in check_specs_for(s)],
        can_subset=True,  # its checks can run without the stage's work, a group's stages one by one
        required_resource_keys={"executor", *(s.io_manager_key for s in group)},
        retry_policy=dg.RetryPolicy(max_retries=max(s.max_retries for s in group), delay=head.retry_delay_s,
                                    backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS),
        backfill_policy=dg.BackfillPolicy.multi_run(
            max_partitions_per_run=min(s.max_partitions_per_run for s in group)),
        pool=FFMPEG_POOL if any("ffmpeg" in s.kinds for s in group) else None,
    )
    def _stage_asset(context: dg.AssetExecutionContext) -> Iterator[Any]:
        ids = [int(k) for k in context.partition_keys]
        executor = context.resources.executor
        # A run no stage sensor requested was launched by a person: it means what it says. Its
        # retries (RetryPolicy) only finish what the first attempt left, so the items that attempt
        # already took past a stage are not refused then.
        explicit = context.run.tags.get("heaters/requested_by") != "sensor" and context.retry_number == 0
        selected_checks = {k.name for k in context.selected_asset_check_keys}
        error: Exception | None = None
        skip: set[int] = set()
        try:
            for stage in group:
                if keys[stage.name] not in context.selected_asset_keys:
                    if selected_checks & set(stage.checks):  # only the checks were selected
                        yield from evaluate_checks(stage, executor, ids, context.log, context.instance)
                    continue
                todo = [i for i in ids if i not in skip]
                if not todo:
                    continue
                report, err = yield from _stage_part(context, stage, todo, explicit)
                skip |= _not_done(report)
                error = step_error(error, err)
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
            # The items were handed back (executor). Dagster turns an interruption inside an op
            # with a RetryPolicy into a retry; with the in-process executor the retry then runs in
            # the same run worker and the run a person terminated ends SUCCESS (dagster#15026).
            # A terminated run's step fails without retry instead, and Dagster records the run
            # CANCELED (a step that fails while its run is CANCELING).
            if _run_terminated(context):
                raise dg.Failure(description="the run was terminated; its unfinished items were handed back "
                                 "to their stage's sensor", allow_retries=False) from exc
            raise
        if error is not None:
            raise error

    return _stage_asset


def build_stage_assets(stages: tuple[Stage, ...] = STAGES) -> list[dg.AssetsDefinition]:
    return [build_stage_asset(g) for g in stage_groups(stages)]


def build_graph_assets(stages: tuple[Stage, ...] = STAGES) -> list["dg.AssetsDefinition | dg.AssetSpec"]:
    """Every node of the graph: the stage assets and the human review step."""
    return [*build_stage_assets(stages), *(build_human_step_asset(h) for h in HUMAN_STEPS)]


def job_name(stage: Stage) -> str:
    return f"{stage.name}_job"


def chained(stage: Stage, stages: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    """The stages the stage's job runs after it in the same step (``Stage.runs_after``), with
    HEATERS_CHAIN_STAGES on."""
    return followers_of(stage, stages) if get_settings().chain_stages else ()


def build_stage_job(stage: Stage, stages: tuple[Stage, ...] = STAGES) -> "dg.JobDefinition | object":
    """One job per stage (what its sensor launches and what the UI shows per stage). A stage job
    has one step: the stage's asset with its checks, and the assets of the stages that run after it
    (``chained``). Where the step runs is configuration (``heaters_dagster.scaleout``): this
    host's step subprocesses by default, Celery workers or Kubernetes pods with HEATERS_EXECUTOR;
    on this host, HEATERS_INPROCESS_EXECUTOR runs it inside the run worker (Dagster's
    ``in_process_executor``) instead of in a step subprocess."""
    from heaters_dagster.scaleout import stage_executor_def

    executor = stage_executor_def()
    if executor is None and get_settings().inprocess_executor:
        executor = dg.in_process_executor
    selection = [stage.asset_name, *(s.asset_name for s in chained(stage, stages))]
    return dg.define_asset_job(job_name(stage), selection=selection, partitions_def=partitions_def_for(stage),
                               tags={"heaters/stage": stage.name}, executor_def=executor)


def build_stage_jobs(stages: tuple[Stage, ...] = STAGES) -> list:
    return [build_stage_job(s, stages) for s in stages]
