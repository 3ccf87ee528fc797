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
