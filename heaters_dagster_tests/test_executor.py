"""The generic executor through a real Dagster asset built by the stage factory, on a test stage
whose handler is controlled per clip: success, permanent and transient errors, retries, batches."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from heaters_dagster.assets.factory import build_stage_asset
from heaters_dagster.database.models import ClipArtifact, StageResult
from heaters_dagster.errors import InvalidMediaError, TransientError
from heaters_dagster.pipeline.outputs import ArtifactOut, FileToStore, ItemOutput
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of

BEHAVIOUR: dict[int, list[str]] = {}  # clip id -> outcomes to play, one per call
CALLS: Counter[int] = Counter()


def handler(ctx, item):
    CALLS[item.id] += 1
    plan = BEHAVIOUR.get(item.id, ["ok"])
    outcome = plan[min(CALLS[item.id] - 1, len(plan) - 1)]
    if outcome == "permanent":
        raise InvalidMediaError(f"clip {item.id} is not a video")
    if outcome == "transient":
        raise TransientError("storage briefly unavailable")
    if outcome == "interrupt":
        raise KeyboardInterrupt()
    if outcome == "bug":
        raise ZeroDivisionError("division by zero")
    if outcome == "slow":
        time.sleep(1.0)
    if outcome == "child":  # a media subprocess (as ffmpeg is) that runs until it is killed
        from heaters_dagster.media import ffmpeg_tools

        ffmpeg_tools.run(["sleep", "30"], what=f"clip {item.id}'s long child", capture_stdout=False)
    path = Path(ctx.workdir) / "sprite.jpg"
    path.write_bytes(b"\xff\xd8fake-jpeg-%d" % item.id)
    return ItemOutput(item_id=item.id, artifacts=[ArtifactOut("sprite", FileToStore(f"clips/{item.id}/sprite.jpg", path),
                                                              metadata={"cols": 5})],
                      metadata={"frames": 10 * item.id})


TEST_STAGE = dataclasses.replace(get_stage("sprite"), name="sprite_test",
                                 handler="heaters_dagster_tests.test_executor:handler", retry_delay_s=0.01,
                                 max_retries=2)


@pytest.fixture(autouse=True)
def _reset():
    BEHAVIOUR.clear()
    CALLS.clear()


def _run(defs, instance, clip_ids):
    asset = build_stage_asset(TEST_STAGE)
    keys = [str(i) for i in clip_ids]
    instance.add_dynamic_partitions(TEST_STAGE.partitions_name, keys)
    tags = {} if len(keys) == 1 else {"dagster/asset_partition_range_start": keys[0],
                                      "dagster/asset_partition_range_end": keys[-1]}
    tags["heaters/requested_by"] = "sensor"  # as the stage sensors request it (explicit runs: test_reruns.py)
    return dg.materialize([asset], instance=instance, resources=defs.resources,
                          partition_key=keys[0] if len(keys) == 1 else None, tags=tags, raise_on_error=False)


def _materialized(instance, key):
    recs = instance.fetch_materializations(dg.AssetKey(TEST_STAGE.asset_name), limit=100).records
    return sorted(int(r.partition_key) for r in recs)


def test_success_persists_artifact_transitions_and_records(defs, db, store, instance):
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 24), (24, 48), (48, 96)])
    result = _run(defs, instance, ids)
    assert result.success
    for cid in ids:
        assert row_of(db, "clip", cid).state == "pending_review"
        assert store.read_bytes(f"clips/{cid}/sprite.jpg") == b"\xff\xd8fake-jpeg-%d" % cid
    with db.session() as s:
        arts = s.execute(select(ClipArtifact)).scalars().all()
        results = s.execute(select(StageResult)).scalars().all()
    assert sorted(a.clip_id for a in arts) == ids and all(a.meta == {"cols": 5} for a in arts)
    assert sorted((r.entity_id, r.status) for r in results) == [(i, "succeeded") for i in ids]
    assert _materialized(instance, None) == ids  # one materialization per partition, one run
    rec = instance.fetch_materializations(dg.AssetKey("sprite_test"), limit=10).records[0]
    assert rec.asset_materialization.metadata["frames"].value == 10 * int(rec.partition_key)


def test_permanent_error_fails_that_item_only_without_retry(defs, db, store, instance):
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 24), (24, 48), (48, 96)])
    BEHAVIOUR[ids[1]] = ["permanent"]
    result = _run(defs, instance, ids)
    assert not result.success  # the run reports the failure...
    bad = row_of(db, "clip", ids[1])
    assert bad.state == "sprite_failed" and "is not a video" in bad.last_error and bad.retry_count == 1
    assert CALLS[ids[1]] == 1  # ...and was not retried
    for cid in (ids[0], ids[2]):  # the others went on
        assert row_of(db, "clip", cid).state == "pending_review"
    assert _materialized(instance, None) == [ids[0], ids[2]]
    assert not store.exists(f"clips/{ids[1]}/sprite.jpg")


def test_unknown_exception_is_permanent_with_type_in_message(defs, db, instance):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    BEHAVIOUR[cid] = ["bug"]
    assert not _run(defs, instance, [cid]).success
    row = row_of(db, "clip", cid)
    assert row.state == "sprite_failed" and row.last_error == "ZeroDivisionError: division by zero"


def test_transient_error_is_retried_by_retry_policy(defs, db, instance):
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 24), (24, 48)])
    BEHAVIOUR[ids[0]] = ["transient", "transient", "ok"]
    result = _run(defs, instance, ids)
    assert result.success
    assert CALLS[ids[0]] == 3 and CALLS[ids[1]] == 1  # the finished item is not redone on retry
    row = row_of(db, "clip", ids[0])
    assert row.state == "pending_review" and row.retry_count == 2 and row.last_error is None
    with db.session() as s:
        statuses = [r.status for r in s.execute(select(StageResult).where(StageResult.entity_id == ids[0])
                                                 .order_by(StageResult.id)).scalars()]
    assert statuses == ["transient_error", "transient_error", "succeeded"]


def test_transient_error_gives_up_after_max_retries(defs, db, instance):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    BEHAVIOUR[cid] = ["transient"]
    assert not _run(defs, instance, [cid]).success
    assert CALLS[cid] == TEST_STAGE.max_retries + 1
    row = row_of(db, "clip", cid)
    assert row.state == "sprite_failed" and row.last_error.startswith("gave up after 3 attempts")


def test_item_not_in_input_state_is_skipped_not_rerun(defs, db, instance):
    vid = make_video(db)
    (done,) = make_clips(db, vid, [(0, 24)], state="pending_review")
    (ready,) = make_clips(db, vid, [(24, 48)])
    assert _run(defs, instance, [done, ready]).success
    assert CALLS[done] == 0 and CALLS[ready] == 1
    assert _materialized(instance, None) == [ready]


def test_failed_commit_takes_stored_files_back_out(defs, db, store, instance, monkeypatch):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    from heaters_dagster.resources import executor as executor_mod

    def broken_transition(*a, **kw):
        if a[4] == "pending_review":
            raise RuntimeError("database went away mid-commit")
        return real(*a, **kw)

    real = executor_mod.transition
    monkeypatch.setattr(executor_mod, "transition", broken_transition)
    assert not _run(defs, instance, [cid]).success
    assert not store.exists(f"clips/{cid}/sprite.jpg")  # no file without a row
    with db.session() as s:
        assert s.execute(select(ClipArtifact)).first() is None  # no row without a file
    assert row_of(db, "clip", cid).state == "sprite_failed"


def test_interrupted_run_hands_unfinished_items_back(defs, db, instance):
    import logging

    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 24), (24, 48), (48, 72)])
    BEHAVIOUR[ids[1]] = ["interrupt"]
    from heaters_dagster.resources.executor import StageExecutor

    executor = StageExecutor(database=defs.resources["database"], storage=defs.resources["storage"], max_parallel=1)
    with pytest.raises(KeyboardInterrupt):
        executor.execute(TEST_STAGE, ids, defs.resources["artifact_io_manager"], log=logging.getLogger("t"))
    assert row_of(db, "clip", ids[0]).state == "pending_review"  # finished before the interruption
    for cid in ids[1:]:  # interrupted and never started: back to ready, with a new version for the sensor
        row = row_of(db, "clip", cid)
        assert (row.state, row.version) == ("spliced", 1) and row.last_error.startswith("interrupted")


# -- events recorded as items commit (HEATERS_STREAM_EVENTS) ------------------------------------------------
SEEN: dict[int, tuple[set[str], set[str]]] = {}  # clip id -> (materialized, checked) partitions when it started
WATCH: dict[str, dg.DagsterInstance] = {}


def watching_handler(ctx, item):
    """The test stage's handler, noting which partitions already have a materialization and a check
    evaluation in the Dagster instance when each item starts."""
    inst = WATCH["instance"]
    mats = {r.partition_key for r in inst.fetch_materializations(dg.AssetKey(TEST_STAGE.asset_name), limit=100).records}
    SEEN[item.id] = (mats, _checked(inst))
    return handler(ctx, item)


def _checked(inst) -> set[str]:
    key = dg.AssetCheckKey(dg.AssetKey(TEST_STAGE.asset_name), TEST_STAGE.checks[0])
    return set(_evaluated(inst, key))


def _evaluated(inst, key) -> list[str]:
    """The partitions of the check's evaluations (not of the runs that planned one)."""
    return [r.event.dagster_event.event_specific_data.partition
            for r in inst.event_log_storage.get_asset_check_execution_history(key, limit=200)
            if r.event.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]


@pytest.mark.parametrize("stream", [True, False])
def test_a_step_records_each_item_as_it_commits_while_the_later_ones_still_run(defs, db, instance, monkeypatch,
                                                                               stream):
    from heaters_dagster.assets import factory
    from heaters_dagster.resources.executor import StageExecutor

    monkeypatch.setenv("HEATERS_STREAM_EVENTS", "1" if stream else "0")
    stage = dataclasses.replace(TEST_STAGE, handler="heaters_dagster_tests.test_executor:watching_handler")
    WATCH["instance"] = instance
    SEEN.clear()
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 24, (i + 1) * 24) for i in range(factory.STREAM_CHECKS_EVERY + 2)])
    keys = [str(i) for i in ids]
    instance.add_dynamic_partitions(stage.partitions_name, keys)
    serial = StageExecutor(database=defs.resources["database"], storage=defs.resources["storage"], max_parallel=1)
    result = dg.materialize([build_stage_asset(stage)], instance=instance,
                            resources={**defs.resources, "executor": serial},
                            tags={"dagster/asset_partition_range_start": keys[0],
                                  "dagster/asset_partition_range_end": keys[-1],
                                  "heaters/requested_by": "sensor"}, raise_on_error=False)
    assert result.success
    last_mats, last_checked = SEEN[ids[-1]]
    if stream:  # the items before the last one were recorded before it started; checks in groups
        assert last_mats == set(keys[:-1])
        assert last_checked == set(keys[:factory.STREAM_CHECKS_EVERY])
    else:  # all at the end
        assert last_mats == set() and last_checked == set()
    # Either way each item has one materialization and one check evaluation in the end.
    recs = instance.fetch_materializations(dg.AssetKey(stage.asset_name), limit=100).records
    assert sorted(r.partition_key for r in recs) == sorted(keys)
    key = dg.AssetCheckKey(dg.AssetKey(stage.asset_name), stage.checks[0])
    assert Counter(_evaluated(instance, key)) == Counter(keys)
    assert all(row_of(db, "clip", i).state == "pending_review" for i in ids)


@pytest.mark.parametrize("max_parallel", [1, 2])
def test_an_interruption_raised_into_the_executor_at_a_yield_hands_the_unfinished_items_back(defs, db,
                                                                                             max_parallel):
    """What the asset does when it is interrupted while it writes an event: it raises the interruption
    into the executor's generator, which hands back what it had not finished."""
    import logging

    from heaters_dagster.resources.executor import StageExecutor

    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 24, (i + 1) * 24) for i in range(5)])
    for i in ids[1:]:  # the first commits at once, the others take a while: still running or queued
        BEHAVIOUR[i] = ["slow"]
    executor = StageExecutor(database=defs.resources["database"], storage=defs.resources["storage"],
                             max_parallel=max_parallel)
    work = executor.execute_iter(TEST_STAGE, ids, defs.resources["artifact_io_manager"], log=logging.getLogger("t"))
    first = next(work)
    assert set(first.outputs) == {ids[0]}
    with pytest.raises(KeyboardInterrupt):
        work.throw(KeyboardInterrupt())
    states = {i: row_of(db, "clip", i).state for i in ids}
    assert all(states[i] == "pending_review" for i in first.outputs)
    assert set(states.values()) <= {"pending_review", "spliced"}, states  # none left in progress
    back = [i for i in ids if states[i] == "spliced"]
    # Those not started were not started after the interruption (the pool's queue is dropped).
    assert back and set(back) >= set(ids[1 + max_parallel:]), states
    assert all(row_of(db, "clip", i).last_error.startswith("interrupted") for i in back)
    assert all(CALLS[i] == 0 for i in ids[1 + max_parallel:])


def test_an_item_whose_child_the_interruption_killed_is_handed_back_not_failed(defs, db):
    """The interruption kills the media subprocesses of the items being worked on, so their
    handlers fail (a signal-killed ffmpeg is a transient error). That failure is the interruption's,
    not the item's, and no retry of the interrupted step will come: the item goes back to its input
    state with a new version (so its sensor requests it again), like the items not started."""
    import logging

    from heaters_dagster.resources.executor import StageExecutor

    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 24, (i + 1) * 24) for i in range(3)])
    BEHAVIOUR[ids[0]] = ["ok"]
    BEHAVIOUR[ids[1]] = ["child"]
    BEHAVIOUR[ids[2]] = ["slow"]
    before = {i: row_of(db, "clip", i).version for i in ids}
    executor = StageExecutor(database=defs.resources["database"], storage=defs.resources["storage"], max_parallel=2)
    work = executor.execute_iter(TEST_STAGE, ids, defs.resources["artifact_io_manager"], log=logging.getLogger("t"))
    first = next(work)
    assert set(first.outputs) == {ids[0]}
    from heaters_dagster.media.subprocess_guard import live_children

    deadline = time.monotonic() + 20
    while not live_children() and time.monotonic() < deadline:  # clip 1's child is running
        time.sleep(0.02)
    assert live_children()
    with pytest.raises(KeyboardInterrupt):
        work.throw(KeyboardInterrupt())
    assert not live_children()
    killed = row_of(db, "clip", ids[1])
    assert (killed.state, killed.claim_owner) == ("spliced", None)
    assert killed.version > before[ids[1]]
    assert killed.last_error.startswith("interrupted")
    with db.session() as session:
        statuses = [r.status for r in session.query(StageResult).filter_by(entity_id=ids[1], stage=TEST_STAGE.name)]
    assert "transient_error" not in statuses
