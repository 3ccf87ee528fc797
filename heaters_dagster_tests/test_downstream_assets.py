"""A user's own assets downstream of the pipeline receive the stages' outputs through the IO
managers' ``load_input``: CLIP vectors from ``embedding``, keyframe files from ``keyframes``,
sprite sheets from ``sprite``, the normalised video from ``ingest`` (random-weight ViT-B-32, as in
test_pipeline_search.py)."""

import dagster as dg
import numpy as np
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from PIL import Image
from sqlalchemy import select

from heaters_dagster.assets.graph import CLIPS, VIDEOS
from heaters_dagster.database.models import Embedding
from heaters_dagster.definitions import build_definitions
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.review.events import record_event
from heaters_dagster_tests.pipeline_helpers import clips_of, drive, submit

EMBED = {"model_name": "ViT-B-32", "pretrained": "none", "strategy": "keyframe_multi_avg"}
SEEN: dict[str, object] = {}


@dg.asset(partitions_def=CLIPS)
def clip_similarity_to_centroid(embedding: dict[int, np.ndarray]) -> dg.MaterializeResult:
    """The user's asset: every partition's vector, loaded by the embedding IO manager."""
    SEEN["embedding"] = embedding
    vectors = np.stack([embedding[i] for i in sorted(embedding)])
    centroid = vectors.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    return dg.MaterializeResult(metadata={"clips": len(embedding),
                                          "min_similarity": float((vectors @ centroid).min())})


@dg.asset(partitions_def=CLIPS)
def keyframe_sizes(keyframes: dict[int, list[dict]], sprite: dict[int, list[dict]]) -> None:
    SEEN["keyframes"] = keyframes
    SEEN["sprite"] = sprite


@dg.asset(partitions_def=VIDEOS)
def video_files(ingest: dict[int, dict]) -> None:
    SEEN["ingest"] = ingest


@pytest.fixture(scope="module")
def sample(media_dir):
    return make_video(media_dir / "downstream_sample.mp4", (1.5, 2.0, 1.5), fps=24, width=320, height=180)


@pytest.fixture()
def udefs(db, store_dir):
    pipeline = build_definitions(database_url=db.url, storage_url=str(store_dir), stage_params={"embedding": EMBED})
    mine = dg.Definitions(
        assets=[clip_similarity_to_centroid, keyframe_sizes, video_files],
        jobs=[dg.define_asset_job("centroid_job", selection=[clip_similarity_to_centroid], partitions_def=CLIPS),
              dg.define_asset_job("files_job", selection=[keyframe_sizes], partitions_def=CLIPS),
              dg.define_asset_job("videos_job", selection=[video_files], partitions_def=VIDEOS)])
    return dg.Definitions.merge(pipeline, mine)


def _range(keys):
    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


def test_downstream_assets_load_vectors_and_files_through_the_io_managers(udefs, db, instance, sample):
    SEEN.clear()
    store = udefs.resources["storage"].store
    sub = submit(db, store, sample.path, "downstream")
    drive(udefs, instance)
    with db.session() as s:
        for c in clips_of(db, sub.video_id):
            record_event(s, c.id, "approve", {}, "tester")
    assert all(r.success for r in drive(udefs, instance))
    clips = clips_of(db, sub.video_id)
    assert len(clips) == 3 and {c.state for c in clips} == {"embedded"}
    keys = [str(c.id) for c in clips]

    res = udefs.resolve_job_def("centroid_job").execute_in_process(instance=instance, tags=_range(keys))
    assert res.success
    loaded = SEEN["embedding"]
    with db.session() as s:
        stored = {r.clip_id: np.asarray(r.embedding, dtype=np.float32) for r in s.execute(select(Embedding)).scalars()}
    assert sorted(loaded) == [c.id for c in clips]
    for clip_id, vec in loaded.items():
        assert vec.dtype == np.float32 and vec.shape == (512,)
        np.testing.assert_array_equal(vec, stored[clip_id])
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-4)
    mats = instance.fetch_materializations(dg.AssetKey("clip_similarity_to_centroid"), limit=10).records
    assert sorted(r.partition_key for r in mats) == sorted(keys)
    assert all(r.asset_materialization.metadata["clips"].value == 3 for r in mats)

    # one partition: only that clip's vector
    assert udefs.resolve_job_def("centroid_job").execute_in_process(instance=instance, partition_key=keys[1]).success
    assert list(SEEN["embedding"]) == [clips[1].id]

    # files: the keyframes' and the sprite sheet's stored records, with readable URIs
    assert udefs.resolve_job_def("files_job").execute_in_process(instance=instance, tags=_range(keys)).success
    kfs, sprites = SEEN["keyframes"], SEEN["sprite"]
    assert sorted(kfs) == sorted(sprites) == [c.id for c in clips]
    for c in clips:
        assert {a["tag"] for a in kfs[c.id]} == {"25pct", "50pct", "75pct"}
        assert {a["artifact_type"] for a in kfs[c.id]} == {"keyframe"}
        (sheet,) = sprites[c.id]
        with Image.open(sheet["uri"]) as im:
            assert im.size == (sheet["metadata"]["sheet_width"], sheet["metadata"]["sheet_height"])
        for a in kfs[c.id]:
            with Image.open(a["uri"]) as im:
                assert im.size == (a["metadata"]["width"], a["metadata"]["height"])

    # a video asset's input: the normalised file
    assert udefs.resolve_job_def("videos_job").execute_in_process(instance=instance,
                                                                  partition_key=str(sub.video_id)).success
    video = SEEN["ingest"][sub.video_id]
    assert video["uri"].endswith("normalized.mp4") and video["frame_count"] == sample.frame_count


def test_embedding_input_metadata_chooses_the_model(db, store_dir, instance):
    """With vectors of two models, ``AssetIn(metadata={"model_id": ...})`` picks one."""
    from heaters_dagster.io_managers.embeddings import upsert_embedding
    from heaters_dagster_tests.factories import make_clips, make_video as make_video_row

    vid = make_video_row(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="embedded")
    a, b = np.zeros(4, np.float32), np.zeros(8, np.float32)
    a[0], b[1] = 1.0, 1.0
    with db.session() as s:
        upsert_embedding(s, cid, "model-a", "keyframe_multi_avg", a, 1)
        upsert_embedding(s, cid, "model-b", "keyframe_multi_avg", b, 1)

    @dg.asset(partitions_def=CLIPS, ins={"embedding": dg.AssetIn(metadata={"model_id": "model-a"})})
    def picks_a(embedding):
        SEEN["a"] = embedding

    defs = dg.Definitions.merge(
        build_definitions(database_url=db.url, storage_url=str(store_dir)),
        dg.Definitions(assets=[picks_a], jobs=[dg.define_asset_job("a_job", selection=[picks_a], partitions_def=CLIPS)]))
    instance.add_dynamic_partitions("clips", [str(cid)])
    assert defs.resolve_job_def("a_job").execute_in_process(instance=instance, partition_key=str(cid)).success
    np.testing.assert_array_equal(SEEN["a"][cid], a)
