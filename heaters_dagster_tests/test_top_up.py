"""A run takes the items of its range that became ready while it worked (the asset's top-up), and
the stage sensor leaves them to it instead of requesting a run of their own that would only queue
behind it: clips a reviewer approves, or a sprite run finishes, while a keyframes run works."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
from sqlalchemy import text

from heaters_dagster.assets.factory import build_stage_asset
from heaters_dagster.pipeline.outputs import ArtifactOut, FileToStore, ItemOutput
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of

CALLS: list[int] = []
BECOME_READY: dict[int, int] = {}  # clip id -> the clip that is made ready while it is worked on
DATABASE_URL: list[str] = []


def handler(ctx, item):
    CALLS.append(item.id)
    if item.id in BECOME_READY:  # meanwhile, upstream, another clip of the range becomes ready
        from heaters_dagster.database.engine import get_engine

        with get_engine(DATABASE_URL[0]).begin() as conn:
            conn.execute(text("UPDATE clips SET state = 'spliced' WHERE id = :i"), {"i": BECOME_READY[item.id]})
    path = Path(ctx.workdir) / "sprite.jpg"
    path.write_bytes(b"\xff\xd8top-up-%d" % item.id)
    return ItemOutput(item_id=item.id, artifacts=[ArtifactOut("sprite", FileToStore(f"clips/{item.id}/sprite.jpg", path))])


# sprite's shape with a bridging range, like keyframes (which needs real clips to run)
STAGE = dataclasses.replace(get_stage("sprite"), name="sprite_top_up_test", checks=(), max_gap=10,
                            handler="heaters_dagster_tests.test_top_up:handler")


def _run(defs, instance, ids):
    keys = [str(i) for i in ids]
    instance.add_dynamic_partitions(STAGE.partitions_name, keys)
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1],
            "heaters/requested_by": "sensor"}
    return dg.materialize([build_stage_asset(STAGE)], instance=instance, resources=defs.resources, tags=tags,
                          raise_on_error=False)


def test_a_run_takes_the_items_of_its_range_that_became_ready_while_it_worked(defs, db, instance, monkeypatch):
    CALLS.clear()
    DATABASE_URL[:] = [db.url]
    vid = make_video(db)
    a, b, c, d = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(4)])
    # c and d are in a state outside this stage when the run starts (as keyframes' clips still in
    # sprite or review are); c becomes ready while the run works, d never does
    with db.session() as s:
        s.execute(text("UPDATE clips SET state = 'pending_review' WHERE id IN (:c, :d)"), {"c": c, "d": d})
    BECOME_READY.clear()
    BECOME_READY[a] = c  # c is finished upstream while the run works on a
    result = _run(defs, instance, [a, b, c, d])
    assert result.success
    assert sorted(CALLS) == [a, b, c]  # c in the same run, after a and b; d left alone
    assert {row_of(db, "clip", i).state for i in (a, b, c)} == {"pending_review"}
    assert row_of(db, "clip", d).state == "pending_review"
    done = sorted(int(r.partition_key) for r in instance.fetch_materializations(
        dg.AssetKey(STAGE.asset_name), limit=10).records)
    assert done == [a, b, c]  # one materialization each
    with db.session() as s:
        runs = s.execute(text("SELECT entity_id, run_id FROM stage_results WHERE stage = :s AND status = 'succeeded'"),
                         {"s": STAGE.name}).all()
    assert sorted(r.entity_id for r in runs) == [a, b, c] and {r.run_id for r in runs} == {result.run_id}


def test_without_range_reach_a_run_does_only_what_was_ready_when_it_started(defs, db, instance, monkeypatch):
    monkeypatch.setenv("HEATERS_RANGE_REACH", "0")
    CALLS.clear()
    DATABASE_URL[:] = [db.url]
    vid = make_video(db)
    a, b, c = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(3)])
    with db.session() as s:
        s.execute(text("UPDATE clips SET state = 'pending_review' WHERE id = :c"), {"c": c})
    BECOME_READY.clear()
    BECOME_READY[a] = c
    assert _run(defs, instance, [a, b, c]).success
    assert sorted(CALLS) == [a, b] and row_of(db, "clip", c).state == "spliced"
