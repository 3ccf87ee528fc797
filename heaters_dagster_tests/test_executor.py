"""The generic executor through a real Dagster asset built by the stage factory, on a test stage
whose handler is controlled per clip: success, permanent and transient errors, retries, batches."""

from __future__ import annotations

import dataclasses
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
