"""Work launched by a person (the UI's Materialize, a backfill) means what it says: items already past
the stage are taken back through it where the stage table allows (Stage.rerun_from), failed items
are retried, and anything else fails its partition with the reason; sensor runs never rewind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg

from heaters_dagster.assets.factory import build_stage_asset
from heaters_dagster.pipeline.outputs import ArtifactOut, FileToStore, ItemOutput
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of

CALLS: list[int] = []


def handler(ctx, item):
    CALLS.append(item.id)
    path = Path(ctx.workdir) / "sprite.jpg"
    path.write_bytes(b"\xff\xd8rerun-%d" % item.id)
    return ItemOutput(item_id=item.id, artifacts=[ArtifactOut("sprite", FileToStore(f"clips/{item.id}/sprite.jpg", path))])


STAGE = dataclasses.replace(get_stage("sprite"), name="sprite_rerun_test", checks=(),
                            handler="heaters_dagster_tests.test_reruns:handler")


def _run(defs, instance, ids, *, sensor: bool):
    keys = [str(i) for i in ids]
    instance.add_dynamic_partitions(STAGE.partitions_name, keys)
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    if sensor:
        tags["heaters/requested_by"] = "sensor"
    return dg.materialize([build_stage_asset(STAGE)], instance=instance, resources=defs.resources, tags=tags,
                          raise_on_error=False)


def test_a_persons_run_re_renders_past_items_retries_failed_ones_and_refuses_the_rest(defs, db, instance):
    CALLS.clear()
    vid = make_video(db)
    reviewed, failed, approved = make_clips(db, vid, [(0, 24), (24, 48), (48, 72)], state="pending_review")
    with db.session() as s:
        from sqlalchemy import text

        s.execute(text("UPDATE clips SET state = 'sprite_failed', last_error = 'boom' WHERE id = :i"), {"i": failed})
        s.execute(text("UPDATE clips SET state = 'review_approved' WHERE id = :i"), {"i": approved})
    result = _run(defs, instance, [reviewed, failed, approved], sensor=False)
    assert not result.success  # the refused partition fails the run, with the reason ...
    assert sorted(CALLS) == [reviewed, failed]  # ... after the others were done
    for cid in (reviewed, failed):
        row = row_of(db, "clip", cid)
        assert row.state == "pending_review" and row.version == 1 and row.last_error is None
    assert row_of(db, "clip", approved).state == "review_approved"  # a reviewer's decision is not undone
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags["heaters/refused"] == str(approved) and tags["heaters/rerun"] == f"{reviewed},{failed}"
    failure = [e for e in instance.all_logs(result.run_id) if e.dagster_event and e.dagster_event.is_step_failure][0]
    assert "in state 'review_approved'" in failure.dagster_event.step_failure_data.error.message
    done = sorted(int(r.partition_key) for r in instance.fetch_materializations(
        dg.AssetKey(STAGE.asset_name), limit=10).records)
    assert done == [reviewed, failed]


def test_a_sensor_run_never_rewinds(defs, db, instance):
    CALLS.clear()
    vid = make_video(db)
    reviewed, ready = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        from sqlalchemy import text

        s.execute(text("UPDATE clips SET state = 'pending_review' WHERE id = :i"), {"i": reviewed})
    assert _run(defs, instance, [reviewed, ready], sensor=True).success
    assert CALLS == [ready] and row_of(db, "clip", reviewed).version == 0


FLAKY: dict[int, int] = {}  # clip id -> transient failures still to raise


def flaky_handler(ctx, item):
    if FLAKY.get(item.id, 0) > 0:
        FLAKY[item.id] -= 1
        from heaters_dagster.errors import TransientError

        raise TransientError("store briefly unavailable")
    return handler(ctx, item)


FLAKY_STAGE = dataclasses.replace(STAGE, name="sprite_rerun_retry_test", retry_delay_s=0.01,
                                  handler="heaters_dagster_tests.test_reruns:flaky_handler")


def test_a_persons_run_retried_finishes_what_its_first_attempt_left_and_redoes_nothing(defs, db, instance):
    """The step retry of a run a person launched only finishes the items its first attempt left:
    the item that attempt already re-rendered is not re-rendered again."""
    CALLS.clear()
    vid = make_video(db)
    done_first, flaky = make_clips(db, vid, [(0, 24), (24, 48)], state="pending_review")
    FLAKY.clear()
    FLAKY[flaky] = 1
    keys = [str(done_first), str(flaky)]
    instance.add_dynamic_partitions(FLAKY_STAGE.partitions_name, keys)
    result = dg.materialize([build_stage_asset(FLAKY_STAGE)], instance=instance, resources=defs.resources,
                            tags={"dagster/asset_partition_range_start": keys[0],
                                  "dagster/asset_partition_range_end": keys[-1]}, raise_on_error=False)
    assert result.success
    assert CALLS == [done_first, flaky]  # each rendered once: the retry took only the one left
    for cid in (done_first, flaky):
        assert row_of(db, "clip", cid).state == "pending_review"


def test_a_step_of_two_stages_is_retried_when_either_part_asks_for_it():
    """Ingest and splice share a step: a splice item's transient error is retried even when an
    ingest item of the same run failed for good (else that item would wait in its input state for a
    retry that never comes); two final failures keep the first."""
    from heaters_dagster.assets.factory import TransientStageError, UnfinishedItemsError, step_error

    final, retry, unfinished = dg.Failure("ingest: 1 failed"), TransientStageError("splice"), UnfinishedItemsError("x")
    assert step_error(None, None) is None
    assert step_error(final, None) is final and step_error(None, retry) is retry
    assert step_error(final, retry) is retry and step_error(retry, final) is retry
    assert step_error(final, unfinished) is unfinished
    other = dg.Failure("splice: 1 failed")
    assert step_error(final, other) is final and step_error(retry, TransientStageError("b")) is retry
