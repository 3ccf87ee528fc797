"""The recovery sensors through Dagster's own sensor contexts: expired leases are recovered, a
failed run's items are released at once, and store hygiene removes orphans past their grace."""

from __future__ import annotations

import os
import time

import dagster as dg
from sqlalchemy import text

from heaters_dagster import leases
from heaters_dagster.sensors.recovery import lease_recovery_sensor, release_failed_runs, store_hygiene_sensor
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of


def test_lease_recovery_sensor_returns_expired_items(defs, db, instance):
    vid = make_video(db)
    expired, live = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        leases.claim(s, get_stage("sprite"), expired, leases.Claimant("dead/sprite#0@h:1", "dead"), lease_s=1)
        leases.claim(s, get_stage("sprite"), live, leases.Claimant("alive/sprite#0@h:2", "alive"), lease_s=600)
        s.execute(text("UPDATE clips SET claim_expires_at = now() - interval '1 second' WHERE id = :i"), {"i": expired})
    with dg.build_sensor_context(instance=instance, resources={"database": defs.resources["database"]}) as ctx:
        result = lease_recovery_sensor(ctx)
    assert f"clip {expired} (sprite) -> spliced" in result.skip_reason.skip_message
    assert row_of(db, "clip", expired).state == "spliced"
    assert row_of(db, "clip", live).state == "generating_sprite"


def test_run_failure_sensor_releases_the_failed_runs_items_at_once(defs, db, instance):
    @dg.asset
    def crashes() -> None:
        raise RuntimeError("worker crashed")

    result = dg.materialize([crashes], instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    failure = [e for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_run_failure][0]
    vid = make_video(db)
    mine, other = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        leases.claim(s, get_stage("sprite"), mine, leases.Claimant(f"{run.run_id}/sprite#0@h:1", run.run_id))
        leases.claim(s, get_stage("sprite"), other, leases.Claimant("other/sprite#0@h:2", "other-run"))
    ctx = dg.build_run_status_sensor_context(sensor_name="release_failed_runs", dagster_event=failure.dagster_event,
                                             dagster_instance=instance, dagster_run=run,
                                             resources={"database": defs.resources["database"]})
    release_failed_runs(ctx.for_run_failure())
    row = row_of(db, "clip", mine)
    assert row.state == "spliced" and row.last_error.startswith(f"run {run.run_id} failed") and row.version == 1
    assert row_of(db, "clip", other).state == "generating_sprite"


def _failed_run_of(instance, job: str, tags: dict[str, str]):
    """A run of a stage job that failed before its step started (no worker ever got to the items)."""
    from dagster._core.test_utils import create_run_for_test

    run = create_run_for_test(instance, job_name=job, status=dg.DagsterRunStatus.STARTING, tags=tags)
    event = instance.report_run_failed(run, message="the run worker could not load the code location")
    return instance.get_run_by_id(run.run_id), event


def _report_to_failure_sensor(defs, instance, run, event) -> None:
    """Evaluate ``release_failed_runs`` for ``run``'s failure ``event``, as the daemon would."""
    ctx = dg.build_run_status_sensor_context(sensor_name="release_failed_runs", dagster_event=event,
                                             dagster_instance=instance, dagster_run=run,
                                             resources={"database": defs.resources["database"]})
    release_failed_runs(ctx.for_run_failure())


def _range(a: int, b: int) -> dict[str, str]:
    return {"dagster/asset_partition_range_start": str(a), "dagster/asset_partition_range_end": str(b)}


def test_a_run_that_died_before_claiming_hands_back_what_it_never_claimed(defs, db, instance, monkeypatch):
    """A stage run fails before its step claims anything (the worker could not start, run monitoring's
    start timeout, a run canceled in the queue): its items are still in the input state at the version
    the sensor requested, so the sensor would never request them again. The failure sensor gives them
    a new version and the sensor requests them again; items that another unfinished run of the stage
    covers, or that someone holds, are left alone; a run Dagster will retry leaves them to the retry;
    an item whose runs keep dying becomes a poison item instead of looping."""
    from dagster._core.test_utils import create_run_for_test

    from heaters_dagster.inprocess import PipelineDriver

    vid = make_video(db)
    a, b, c, d, e = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(5)])
    driver = PipelineDriver(defs, instance)
    (first,) = driver.tick(get_stage("sprite"))  # one run over a..e: every clip is in the cursor now
    assert first.tags["dagster/asset_partition_range_start"] == str(a)
    assert driver.tick(get_stage("sprite")) == []  # requested: not again
    with db.session() as s:
        leases.claim(s, get_stage("sprite"), b, leases.Claimant("someone/sprite#0@h:1", "someone"))
    create_run_for_test(instance, job_name="sprite_job", status=dg.DagsterRunStatus.STARTED, tags=_range(d, e))

    run, event = _failed_run_of(instance, "sprite_job", _range(a, e))
    _report_to_failure_sensor(defs, instance, run, event)
    for clip in (a, c):
        row = row_of(db, "clip", clip)
        assert (row.state, row.version, row.lost_count) == ("spliced", 1, 1)
        assert row.last_error.startswith(f"run {run.run_id} failed: the run worker could not load")
        assert "before it claimed this clip" in row.last_error
    assert row_of(db, "clip", b).state == "generating_sprite"  # held by someone: theirs
    for clip in (d, e):  # another unfinished run of sprite covers them
        assert (row_of(db, "clip", clip).version, row_of(db, "clip", clip).lost_count) == (0, 0)
    again = driver.tick(get_stage("sprite"))
    assert [r.partition_key for r in again] == [str(a), str(c)]  # b (held) lies between them: two runs

    # A run whose step started claimed its items at once: what it left is its step retry's and the
    # leases' business, not this sensor's.
    started = create_run_for_test(instance, job_name="sprite_job", status=dg.DagsterRunStatus.STARTED,
                      tags={"dagster/partition": str(a)})
    instance.report_dagster_event(dg.DagsterEvent(event_type_value="STEP_START", job_name="sprite_job",
                                                  step_key="sprite"), started.run_id)
    event0 = instance.report_run_failed(started, message="step failed")
    _report_to_failure_sensor(defs, instance, instance.get_run_by_id(started.run_id), event0)
    assert row_of(db, "clip", a).version == 1

    # A run Dagster will retry: the retry covers its items.
    run2, event2 = _failed_run_of(instance, "sprite_job", {"dagster/partition": str(a)})
    instance.add_run_tags(run2.run_id, {"dagster/will_retry": "true"})
    _report_to_failure_sensor(defs, instance, run2, event2)
    assert row_of(db, "clip", a).version == 1

    # Runs that keep dying before they claim: after HEATERS_MAX_LOST the item is a poison item.
    monkeypatch.setenv("HEATERS_MAX_LOST", "2")
    run3, event3 = _failed_run_of(instance, "sprite_job", {"dagster/partition": str(a)})
    _report_to_failure_sensor(defs, instance, run3, event3)
    row = row_of(db, "clip", a)
    assert (row.state, row.lost_count) == ("sprite_failed", 2) and row.last_error.startswith("poison item: lost 2")
    results = [r for (r,) in db_rows(db, "SELECT status FROM stage_results WHERE entity_id = :i AND stage = 'sprite'",
                                    i=a)]
    assert results == ["lost", "lost"]


def db_rows(db, sql: str, **params):
    with db.session() as s:
        return s.execute(text(sql), params).all()


def test_store_hygiene_sensor_removes_old_orphans_only(defs, db, store, instance, monkeypatch):
    monkeypatch.setenv("HEATERS_ORPHAN_GRACE_S", "60")
    store.put_bytes(b"old", "sources/9/clips/old-orphan.mp4")
    store.put_bytes(b"new", "sources/9/clips/new-orphan.mp4")
    old = store.uri("sources/9/clips/old-orphan.mp4")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    resources = {"database": defs.resources["database"], "storage": defs.resources["storage"]}
    with dg.build_sensor_context(instance=instance, resources=resources) as ctx:
        store_hygiene_sensor(ctx)
    assert not store.exists("sources/9/clips/old-orphan.mp4")
    assert store.exists("sources/9/clips/new-orphan.mp4")  # within the grace: a commit may be in flight


def test_a_dead_run_hands_back_what_it_sent_back_for_a_retry_that_will_not_come(defs, db, instance):
    """A run's step sent clips back to their input state after a transient error, at the version
    their sensor requested, for the step's retry; then the run died (or was terminated, or failed
    on another clip's permanent error) with no retry to come. The failure sensor gives those clips a
    new version, so the sensor requests them again; a clip whose last result is no longer that
    transient error, that someone holds, or that a retry attempt took again (and handed back itself
    when it was interrupted), is left alone, and so is every clip while Dagster will retry the run."""
    from dagster._core.test_utils import create_run_for_test

    from heaters_dagster.pipeline.items import record_result

    vid = make_video(db)
    a, b, c, d, e = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(5)])

    def started_run():
        run = create_run_for_test(instance, job_name="sprite_job", status=dg.DagsterRunStatus.STARTED,
                                  tags=_range(a, e))
        instance.report_dagster_event(dg.DagsterEvent(event_type_value="STEP_START", job_name="sprite_job",
                                                      step_key="sprite"), run.run_id)
        with db.session() as s:
            for clip in (a, b, c, e):
                record_result(s, stage="sprite", kind="clip", item_id=clip, status="transient_error",
                              run_id=run.run_id, message="HTTP 503")
            record_result(s, stage="sprite", kind="clip", item_id=b, status="succeeded", run_id=run.run_id)
        return run

    retried = started_run()
    instance.add_run_tags(retried.run_id, {"dagster/will_retry": "true"})
    _report_to_failure_sensor(defs, instance, instance.get_run_by_id(retried.run_id),
                              instance.report_run_failed(retried, message="run worker crashed"))
    assert [row_of(db, "clip", i).version for i in (a, b, c, d, e)] == [0] * 5  # the retry takes them

    run = started_run()
    with db.session() as s:
        leases.claim(s, get_stage("sprite"), c, leases.Claimant("someone/sprite#0@h:1", "someone"))
        retry = f"{run.run_id}/sprite#1@h:3"  # the step's retry attempt takes e, then is interrupted
        leases.claim(s, get_stage("sprite"), e, leases.Claimant(retry, run.run_id))
    with db.session() as s:
        leases.release_items(s, "clip", [e], reason="interrupted", owner=retry, counts_as_lost=False)
    assert row_of(db, "clip", e).version == 1
    _report_to_failure_sensor(defs, instance, instance.get_run_by_id(run.run_id),
                              instance.report_run_failed(run, message="run worker crashed"))
    row = row_of(db, "clip", a)
    assert (row.state, row.version, row.lost_count) == ("spliced", 1, 1)
    assert "after a transient error, with no retry of its step to come" in row.last_error
    assert (row_of(db, "clip", b).version, row_of(db, "clip", d).version) == (0, 0)
    assert (row_of(db, "clip", e).version, row_of(db, "clip", e).lost_count) == (1, 0)  # not twice
    assert row_of(db, "clip", c).state == "generating_sprite"  # held by someone: theirs
    lost = db_rows(db, "SELECT entity_id, error_type FROM stage_results WHERE status = 'lost' AND run_id = :r",
                   r=run.run_id)
    assert [(r.entity_id, r.error_type) for r in lost] == [(a, "RunDiedAfterTransientError")]
    # the failure is reported again (a second sensor tick): nothing is handed back twice
    _report_to_failure_sensor(defs, instance, instance.get_run_by_id(run.run_id),
                              instance.report_run_failed(run, message="run worker crashed"))
    assert row_of(db, "clip", a).version == 1
