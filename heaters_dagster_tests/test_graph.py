"""The asset graph: lineage from the stage table, one partition set per entity with exact
identity edges between clip assets, the splice -> sprite edge that makes no clip stale, the
review decisions recorded on the ``review`` asset, bridged ranges of the shared clip set, and an
instance left over from the per-stage partition sets."""

from __future__ import annotations

import time

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from heaters_dagster.assets.factory import build_stage_asset
from heaters_dagster.definitions import build_definitions
from heaters_dagster.inprocess import PipelineDriver
from heaters_dagster.review.events import record_event
from heaters_dagster.sensors.factory import build_stage_sensor
from heaters_dagster.stages import STAGES, get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of

K = dg.AssetKey


def _graph():
    return build_definitions().resolve_asset_graph()


def test_lineage_walks_from_embedding_back_to_ingest():
    g = _graph()
    path, key = [], K("embedding")
    while True:
        path.append(key.to_user_string())
        parents = g.get(key).parent_keys
        if not parents:
            break
        assert len(parents) == 1, (key, parents)
        key = next(iter(parents))
    assert path == ["embedding", "keyframes", "review", "sprite", "splice", "ingest"]
    for name in ("split", "merge", "archive"):
        assert g.get(K(name)).parent_keys == {K("review")}
    assert {k.to_user_string() for k in g.get(K("review")).child_keys} == {"keyframes", "split", "merge", "archive"}

    # one partition set per entity; exact identity edges between clip assets
    for stage in STAGES:
        assert g.get(K(stage.name)).partitions_def.name == {"video": "videos", "clip": "clips"}[stage.entity]
    assert g.get(K("review")).partitions_def.name == "clips"
    assert not g.get(K("review")).is_materializable  # the reviewers' step: recorded, never run
    for child, parent in (("keyframes", "review"), ("review", "sprite"), ("embedding", "keyframes"),
                          ("splice", "ingest"), ("split", "review")):
        assert isinstance(g.get_partition_mapping(K(child), K(parent)), dg.IdentityPartitionMapping)
    edge = g.get_partition_mapping(K("sprite"), K("splice"))
    assert isinstance(edge, dg.SpecificPartitionsPartitionMapping) and list(edge.partition_keys) == []

    # the checks are on the assets they check, partitioned like them
    checks = {(k.asset_key.to_user_string(), k.name) for k in g.asset_check_keys}
    assert checks == {("splice", "clips_tile_video"), ("sprite", "sprite_matches_layout"),
                      ("embedding", "unit_vector"), ("split", "cut_tiles_video"), ("merge", "cut_tiles_video")}


def test_splicing_a_video_leaves_the_clips_fresh_and_clip_edges_are_exact(instance):
    g = _graph()
    instance.add_dynamic_partitions("videos", ["1", "2"])
    instance.add_dynamic_partitions("clips", ["1", "2"])

    def report(asset, partition):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=partition))
        time.sleep(0.01)

    report("splice", "1")
    for asset in ("sprite", "review", "keyframes", "embedding"):
        for clip in ("1", "2"):
            report(asset, clip)
    report("splice", "2")  # another video is spliced later
    report("keyframes", "1")  # clip 1's keyframes are redone

    resolver = CachingStaleStatusResolver(instance, lambda: g, LoadingContextForTest(instance))
    assert resolver.get_status(K("sprite"), "1") == StaleStatus.FRESH
    assert resolver.get_status(K("sprite"), "2") == StaleStatus.FRESH
    assert resolver.get_status(K("embedding"), "1") == StaleStatus.STALE  # exactly the clip that changed
    assert resolver.get_status(K("embedding"), "2") == StaleStatus.FRESH


def test_review_sensor_records_decisions_on_the_review_asset(defs, db, instance):
    vid = make_video(db)
    a, b, c = make_clips(db, vid, [(0, 48), (48, 96), (96, 144)], state="pending_review")
    with db.session() as s:
        approve = record_event(s, a, "approve", {}, "ann").id
        merge = record_event(s, c, "merge", {}, "bob").id  # c with its neighbour b
        rejected = record_event(s, a, "approve", {}, "ann").id  # already approved
    driver = PipelineDriver(defs, instance)
    driver.process_review_events()

    recs = instance.fetch_materializations(K("review"), limit=10).records
    by_clip = {r.partition_key: r.asset_materialization.metadata for r in recs}
    assert set(by_clip) == {str(a), str(b), str(c)}  # the merge changed two clips
    assert by_clip[str(a)]["decision"].value == "approve" and by_clip[str(a)]["reviewer"].value == "ann"
    assert by_clip[str(a)]["event_id"].value == approve and by_clip[str(a)]["state"].value == "review_approved"
    assert by_clip[str(b)]["event_id"].value == merge and by_clip[str(b)]["state"].value == "merge_pending"
    assert by_clip[str(c)]["previous_state"].value == "pending_review"
    assert set(instance.get_dynamic_partitions("clips")) >= {str(a), str(b), str(c)}  # registered if missing
    (obs,) = instance.fetch_observations(K("review"), limit=10).records
    md = obs.asset_observation.metadata
    assert obs.partition_key == str(a) and md["outcome"].value == "rejected" and md["event_id"].value == rejected

    with db.session() as s:  # an undo is a decision too: it shows on both clips it gives back
        undo = record_event(s, c, "undo", {}, "bob").id
    driver.process_review_events()
    latest = {r.partition_key: r.asset_materialization.metadata
              for r in instance.fetch_materializations(K("review"), limit=2).records}
    assert set(latest) == {str(b), str(c)}
    assert all(m["decision"].value == "undo" and m["undid_event_id"].value == merge and m["event_id"].value == undo
               for m in latest.values())
    assert {m["state"].value for m in latest.values()} == {"pending_review"}


def test_a_range_bridges_clips_in_other_states_and_leaves_them_alone(defs, db, instance):
    """Approved clips between skipped ones: one keyframes-like run over the range; the archive
    stage (cheap to run for real) shows the asset leaves the bridged clips untouched."""
    archive = get_stage("archive")
    vid = make_video(db)
    ids = []
    for i in range(8):
        ids += make_clips(db, vid, [(i * 24, i * 24 + 24)], state="review_archived" if i % 2 == 0 else "review_skipped")
    instance.add_dynamic_partitions("clips", [str(i) for i in ids])
    sensor = build_stage_sensor(archive)
    with dg.build_sensor_context(instance=instance, resources={"database": db}) as ctx:
        (req,) = sensor(ctx).run_requests
    assert (req.tags[ASSET_PARTITION_RANGE_START_TAG], req.tags[ASSET_PARTITION_RANGE_END_TAG]) == (str(ids[0]),
                                                                                                      str(ids[6]))
    assert req.tags["heaters/items"] == "4"
    res = dg.materialize([build_stage_asset(archive)], instance=instance, resources=defs.resources,
                         tags=dict(req.tags))
    assert res.success
    assert [row_of(db, "clip", i).state for i in ids] == ["archived", "review_skipped"] * 4
    tags = instance.get_run_by_id(res.run_id).tags
    assert tags["heaters/succeeded"] == "4" and "heaters/skipped" not in tags
    mats = instance.fetch_materializations(K("archive"), limit=20).records
    assert sorted(int(r.partition_key) for r in mats) == ids[::2]


def test_an_instance_with_the_old_per_stage_partition_sets_still_works(defs, db, instance):
    """A Dagster home from before the shared sets: the old sets and their materializations stay,
    unused; the sensors fill the new sets; nothing that reads the asset's status breaks."""
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    from heaters_dagster.assets.graph import CLIPS

    instance.add_dynamic_partitions("sprite_clips", ["1", "2", "3"])
    for k in ("1", "2"):
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sprite", partition=k))
    vid = make_video(db)
    new = make_clips(db, vid, [(0, 24), (24, 48)])
    driver = PipelineDriver(defs, instance)
    requests = driver.tick(get_stage("sprite"))
    assert len(requests) == 1 and instance.get_dynamic_partitions("clips") == [str(i) for i in new]
    value = get_and_update_asset_status_cache_value(instance, K("sprite"), CLIPS)
    assert value is not None
    assert instance.get_dynamic_partitions("sprite_clips") == ["1", "2", "3"]  # left alone


def test_partition_sets_stay_within_the_limit_by_retiring_finished_clips(db, instance, monkeypatch):
    from heaters_dagster.sensors.partitions import evaluate_partition_retirement
    from heaters_dagster.state_machine import transition

    monkeypatch.setenv("HEATERS_MAX_PARTITIONS", "10")
    vid = make_video(db)
    states = ["embedded", "archived", "pending_review", "embedded", "archived", "keyframed", "embedding_failed",
              "embedded", "embedded", "archived", "review_approved", "embedded", "embedded", "spliced"]
    ids = [make_clips(db, vid, [(i * 24, i * 24 + 24)], state=st)[0] for i, st in enumerate(states)]
    keys = [str(i) for i in ids]
    instance.add_dynamic_partitions("clips", keys)

    def sweep():
        with dg.build_sensor_context(instance=instance, resources={"database": db}) as ctx:
            result = evaluate_partition_retirement(ctx, db)
        for req in result.dynamic_partitions_requests:
            for k in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, k)
        return result

    sweep()  # 14 keys, limit 10: down to 9, the three archived clips first, then the two oldest embedded
    left = instance.get_dynamic_partitions("clips")
    retired = [k for k in keys if k not in left]
    assert len(left) == 9
    assert retired == [keys[0], keys[1], keys[3], keys[4], keys[9]]
    assert not sweep().dynamic_partitions_requests  # within the limit now

    with db.session() as s:  # a retired clip re-queued: its stage sensor registers it again
        transition(s, "clip", ids[0], "embedded", "keyframed", bump_version=True)
        # and keyframes' approved clip done too: while keyframes has a clip to do, embedding holds
        transition(s, "clip", ids[10], "review_approved", "keyframing")
        transition(s, "clip", ids[10], "keyframing", "keyframed", bump_version=True)
    PipelineDriver(build_definitions(database_url=db.url), instance).tick(get_stage("embedding"))
    assert instance.get_dynamic_partitions("clips")[-1] == keys[0]
