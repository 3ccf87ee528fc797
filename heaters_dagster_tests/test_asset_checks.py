"""Asset checks per partition: the stage runs evaluate them; the statuses are read back the way
the UI's GraphQL reads them (``AssetCheckState``); a check-only run re-evaluates them after the
data was broken on purpose, and they fail for exactly the broken partitions."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.storage.asset_check_state import AssetCheckState, bulk_update_asset_check_state
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from sqlalchemy import text

from heaters_dagster.assets.graph import CLIPS, VIDEOS
from heaters_dagster.checks import sprite_problems, tiling_problems
from heaters_dagster.definitions import build_definitions
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video as make_video_row
from heaters_dagster_tests.pipeline_helpers import clips_of, drive, submit

SCENES = (2.0, 0.5, 2.0, 1.5)  # the 0.5 s scene is dropped as too short


@pytest.fixture(scope="module")
def sample(media_dir):
    return make_video(media_dir / "checks_sample.mp4", SCENES, fps=24, width=160, height=90)


def ui_statuses(instance, asset: str, check: str) -> dict[str, set[str]]:
    """Each partition's check status as the UI shows it (succeeded / failed / skipped / ...)."""
    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    pdef = VIDEOS if get_stage(asset).entity == "video" else CLIPS
    with partition_loading_context(dynamic_partitions_store=instance):
        state = bulk_update_asset_check_state(instance, [(key, pdef)], {key: AssetCheckState.empty()})[key]
        return {status.value.lower(): set(subset.subset_value.get_partition_keys())
                for status, subset in state.subsets.items() if not subset.is_empty}


def latest_evaluation(instance, asset: str, check: str, partition: str):
    from dagster._core.storage.event_log.base import PartitionKeyFilter

    key = dg.AssetCheckKey(dg.AssetKey(asset), check)
    (rec,) = instance.event_log_storage.get_asset_check_execution_history(
        key, limit=1, partition_filter=PartitionKeyFilter(key=partition))
    return rec.event.dagster_event.event_specific_data


def run_checks_only(defs, instance, stage: str, keys: list[str]):
    """What the UI's "Execute" on the stage's checks does: a run with only the checks selected."""
    job = defs.resolve_job_def(f"{stage}_job")
    checks = {dg.AssetCheckKey(dg.AssetKey(stage), n) for n in get_stage(stage).checks}
    sub = job.get_subset(asset_selection=set(), asset_check_selection=checks)
    tags = {} if len(keys) == 1 else {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return sub.execute_in_process(instance=instance, partition_key=keys[0] if len(keys) == 1 else None, tags=tags,
                                  raise_on_error=False)


def test_stage_runs_evaluate_checks_per_partition_and_broken_data_fails_them(defs, db, store, instance, sample):
    sub = submit(db, store, sample.path, "checks")
    runs = drive(defs, instance)
    assert all(r.success for r in runs), runs
    clips = clips_of(db, sub.video_id)
    assert len(clips) == 3  # the short scene was dropped: a hole the coverage check must accept
    vid, cids = str(sub.video_id), [str(c.id) for c in clips]

    assert ui_statuses(instance, "splice", "clips_tile_video") == {"succeeded": {vid}}
    assert ui_statuses(instance, "sprite", "sprite_matches_layout") == {"succeeded": set(cids)}
    ev = latest_evaluation(instance, "splice", "clips_tile_video", vid)
    assert ev.passed and ev.metadata["dropped_scenes"].value == 1 and ev.metadata["clips_in_cut"].value == 3
    assert ev.target_materialization_data is not None  # it targets the partition's materialization

    # Break coverage: lose the middle clip's row. The next evaluation fails with the gap in its metadata.
    middle = clips[1]
    with db.session() as s:
        s.execute(text("DELETE FROM clips WHERE id = :i"), {"i": middle.id})
    res = run_checks_only(defs, instance, "splice", [vid])
    assert res.success  # checks report; they never fail the run
    assert ui_statuses(instance, "splice", "clips_tile_video") == {"failed": {vid}}
    ev = latest_evaluation(instance, "splice", "clips_tile_video", vid)
    assert not ev.passed and f"[{middle.start_frame}, {middle.end_frame})" in ev.metadata["gaps"].value

    # An overlap fails it as well (the first clip now reaches into the dropped scene).
    with db.session() as s:
        s.execute(text("UPDATE clips SET end_frame = end_frame + 3 WHERE id = :i"), {"i": clips[0].id})
    run_checks_only(defs, instance, "splice", [vid])
    ev = latest_evaluation(instance, "splice", "clips_tile_video", vid)
    assert not ev.passed and "overlaps" in ev.metadata
    with db.session() as s:
        s.execute(text("UPDATE clips SET end_frame = end_frame - 3 WHERE id = :i"), {"i": clips[0].id})

    # Break one sprite's layout: only that clip's partition fails; the run covers the range.
    last = clips[2]
    with db.session() as s:
        s.execute(text("UPDATE clip_artifacts SET metadata = jsonb_set(metadata, '{cols}', "
                       "to_jsonb((metadata->>'cols')::int + 1)) WHERE clip_id = :i"), {"i": last.id})
    assert run_checks_only(defs, instance, "sprite", [cids[0], cids[2]]).success
    statuses = ui_statuses(instance, "sprite", "sprite_matches_layout")
    assert statuses["failed"] == {str(last.id)}
    assert str(clips[0].id) in statuses["succeeded"]
    ev = latest_evaluation(instance, "sprite", "sprite_matches_layout", str(last.id))
    assert not ev.passed and "tiles of" in ev.description


@pytest.fixture()
def edefs(db, store_dir):
    return build_definitions(database_url=db.url, storage_url=str(store_dir),
                             stage_params={"embedding": {"model_name": "ViT-B-32", "pretrained": "none"}})


def test_unit_vector_check_fails_for_wrong_norm_dimension_and_missing_vectors(edefs, db, instance):
    from heaters_dagster.io_managers.embeddings import upsert_embedding

    vid = make_video_row(db)
    good, scaled, short, missing = make_clips(db, vid, [(0, 24), (24, 48), (48, 72), (72, 96)], state="embedded")
    instance.add_dynamic_partitions("clips", [str(i) for i in (good, scaled, short, missing)])
    rng = np.random.default_rng(1)

    def unit(n):
        v = rng.normal(size=n).astype(np.float32)
        return v / np.linalg.norm(v)

    with db.session() as s:
        for cid in (good, scaled):
            upsert_embedding(s, cid, "ViT-B-32/random", "keyframe_multi_avg", unit(512), 3)
        upsert_embedding(s, short, "ViT-B-32/random", "keyframe_multi_avg", unit(256), 3)  # a unit vector, wrong size
        s.execute(text("UPDATE embeddings SET embedding = (SELECT array_agg(x * 2) FROM unnest("
                       "embedding::real[]) x)::vector WHERE clip_id = :i"), {"i": scaled})
    res = run_checks_only(edefs, instance, "embedding", [str(good), str(missing)])
    assert res.success
    statuses = ui_statuses(instance, "embedding", "unit_vector")
    assert statuses == {"succeeded": {str(good)}, "failed": {str(scaled), str(short), str(missing)}}
    assert "norm 2.0" in latest_evaluation(instance, "embedding", "unit_vector", str(scaled)).description
    assert "ViT-B-32 has 512" in latest_evaluation(instance, "embedding", "unit_vector", str(short)).description
    assert "no ViT-B-32/random" in latest_evaluation(instance, "embedding", "unit_vector", str(missing)).description


def test_tiling_problems():
    assert tiling_problems(100, [(0, 40), (50, 100)], [(40, 50)]) == ([], [])
    assert tiling_problems(100, [(0, 40), (50, 100)], []) == ([(40, 50)], [])
    assert tiling_problems(100, [(0, 45), (40, 100)], []) == ([], [(40, 45)])
    assert tiling_problems(100, [(0, 40)], []) == ([(40, 100)], [])
    assert tiling_problems(100, [(0, 40), (40, 100), (40, 60)], []) == ([], [(40, 60)])
    # an incomplete record of dropped scenes tolerates only short gaps
    assert tiling_problems(100, [(0, 40), (50, 100)], [], short_gap_frames=24) == ([], [])
    assert tiling_problems(100, [(0, 10), (50, 100)], [], short_gap_frames=24) == ([(10, 50)], [])


def test_sprite_problems():
    layout = {"cols": 5, "rows": 2, "tile_width": 48, "tile_height": 27, "frame_count": 8, "effective_fps": 12.0,
              "sheet_width": 240, "sheet_height": 54}
    assert sprite_problems(layout, 16, 24.0, (240, 54)) == []
    assert any("JPEG is 240x60" in p for p in sprite_problems(layout, 16, 24.0, (240, 60)))
    assert any("give 12" in p for p in sprite_problems(layout, 24, 24.0, (240, 54)))
    assert any("last row" in p for p in sprite_problems({**layout, "frame_count": 4}, 8, 24.0, (240, 54)))
    assert sprite_problems({"cols": 1}, 8, 24.0, None)[0].startswith("layout lacks")
