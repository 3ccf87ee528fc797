"""From submission to `embedded` in process with a real open_clip ViT-B-32 (random weights: no
downloads here), then similarity search: a clip's exact copy is its nearest neighbour, the clip
itself comes first, and a text query runs end to end."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from heaters_dagster.database.models import Embedding
from heaters_dagster.definitions import build_definitions
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.review.events import record_event
from heaters_dagster.search import search_by_clip, search_by_text
from heaters_dagster_tests.pipeline_helpers import artifacts_of, clips_of, drive, submit

EMBED = {"model_name": "ViT-B-32", "pretrained": "none", "strategy": "keyframe_multi_avg"}
MODEL_ID = "ViT-B-32/random"


@pytest.fixture(scope="module")
def sample(media_dir):
    return make_video(media_dir / "search_sample.mp4", (1.5, 2.0, 1.5), fps=24, width=320, height=180,
                      number_frames=True)


@pytest.fixture()
def sdefs(db, store_dir):
    return build_definitions(database_url=db.url, storage_url=str(store_dir), stage_params={"embedding": EMBED})


def _approve_all(db, video_ids):
    with db.session() as s:
        for vid in video_ids:
            for c in clips_of(db, vid):
                record_event(s, c.id, "approve", {}, "tester")


def test_submission_to_embedded_and_search(sdefs, db, store, instance, sample):
    store = sdefs.resources["storage"].store
    a = submit(db, store, sample.path, "original")
    b = submit(db, store, sample.path, "exact copy")
    drive(sdefs, instance)
    _approve_all(db, [a.video_id, b.video_id])
    runs = drive(sdefs, instance)
    assert all(r.success for r in runs), runs
    assert {"keyframes", "embedding"} <= {r.stage for r in runs}
    clips_a, clips_b = clips_of(db, a.video_id), clips_of(db, b.video_id)
    assert len(clips_a) == len(clips_b) == 3
    assert all(c.state == "embedded" for c in clips_a + clips_b)
    assert len([r for r in runs if r.stage == "embedding"]) == 1  # one run (one model load) for all six

    # keyframes: multi strategy, exact clip-relative frames 25/50/75 %
    for c in clips_a:
        kfs = {k.tag: k.meta for k in artifacts_of(db, c.id) if k.artifact_type == "keyframe"}
        n = c.end_frame - c.start_frame
        assert {t: m["frame_index"] for t, m in kfs.items()} == {"25pct": n // 4, "50pct": n // 2,
                                                                  "75pct": (3 * n) // 4}
        assert all(m["absolute_frame"] == c.start_frame + m["frame_index"] for m in kfs.values())

    with db.session() as s:
        rows = s.execute(select(Embedding)).scalars().all()
    assert len(rows) == 6 and {r.model_id for r in rows} == {MODEL_ID} and {r.dim for r in rows} == {512}
    for r in rows:
        assert np.linalg.norm(np.asarray(r.embedding)) == pytest.approx(1.0, abs=1e-4)

    with db.session() as s:
        for ca, cb in zip(clips_a, clips_b):
            hits = search_by_clip(s, ca.id, model_id=MODEL_ID, strategy="keyframe_multi_avg", k=3)
            # the clip and its exact copy tie at the top (similarity 1), everything else is below
            assert {h.clip_id for h in hits[:2]} == {ca.id, cb.id}, [(h.clip_id, h.similarity) for h in hits]
            assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
            assert hits[1].similarity == pytest.approx(1.0, abs=1e-4) and hits[2].similarity < 0.9999
            # each is the other's nearest neighbour
            for me, other in ((ca, cb), (cb, ca)):
                near = search_by_clip(s, me.id, model_id=MODEL_ID, strategy="keyframe_multi_avg", k=1,
                                      exclude_clip_id=me.id)
                assert near[0].clip_id == other.id
        only_b = search_by_clip(s, clips_a[0].id, model_id=MODEL_ID, strategy="keyframe_multi_avg", k=5,
                                source_video_id=b.video_id)
        assert [h.source_video_id for h in only_b] == [b.video_id] * 3  # the filter returns all that exist

    from heaters_dagster.media.embedding import ClipEmbedder
    from heaters_dagster.pipeline.handlers import embedding_spec

    embedder = ClipEmbedder.load(embedding_spec({**EMBED, "precision": "auto"}))
    with db.session() as s:
        hits = search_by_text(s, embedder, "a colourful test pattern", strategy="keyframe_multi_avg", k=4)
    assert len(hits) == 4 and hits == sorted(hits, key=lambda h: -h.similarity)

    # rerun replaces, never duplicates: re-queue one clip through embedding
    from heaters_dagster.state_machine import transition

    with db.session() as s:
        transition(s, "clip", clips_a[0].id, "embedded", "keyframed", bump_version=True)
    drive(sdefs, instance)
    with db.session() as s:
        assert len(s.execute(select(Embedding).where(Embedding.clip_id == clips_a[0].id)).all()) == 1


def test_search_cli_json(sdefs, db, store, instance, sample, monkeypatch):
    import json

    from heaters_dagster.cli.main import cli

    store = sdefs.resources["storage"].store
    a = submit(db, store, sample.path)
    drive(sdefs, instance)
    _approve_all(db, [a.video_id])
    drive(sdefs, instance)
    first = clips_of(db, a.video_id)[0]
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store.root))
    from heaters_dagster import stages

    monkeypatch.setitem(stages.get_stage("embedding").params, "pretrained", None)
    out = CliRunner().invoke(cli, ["search", "--clip", str(first.id), "-k", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["model_source"] == "configured" and data["model_id"] == data["configured_model_id"]
    rows = data["results"]
    assert rows[0]["clip_id"] == first.id and len(rows) == 2
    assert rows[0]["file_uri"].endswith(".mp4")
    bad = CliRunner().invoke(cli, ["search", "--clip", "999999"])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_hnsw_index_serves_filtered_queries(sdefs, db, instance):
    """100 random unit vectors: the partial HNSW index exists and a filtered query returns k rows."""
    from sqlalchemy import text

    from heaters_dagster.io_managers.embeddings import index_name, upsert_embedding
    from heaters_dagster_tests.factories import make_clips, make_video as make_video_row

    vids = [make_video_row(db) for _ in range(2)]
    ids = make_clips(db, vids[0], [(i, i + 1) for i in range(90)], state="embedded")
    ids += make_clips(db, vids[1], [(i, i + 1) for i in range(10)], state="embedded")
    rng = np.random.default_rng(0)
    with db.session() as s:
        for cid in ids:
            v = rng.normal(size=512).astype(np.float32)
            upsert_embedding(s, cid, MODEL_ID, "keyframe_multi_avg", v / np.linalg.norm(v), 3)
    with db.session() as s:
        assert s.execute(text("SELECT 1 FROM pg_indexes WHERE indexname = :n"),
                         {"n": index_name(MODEL_ID, 512)}).first() is not None
        s.execute(text("SET LOCAL enable_seqscan = off"))
        hits = search_by_clip(s, ids[0], model_id=MODEL_ID, strategy="keyframe_multi_avg", k=10,
                              source_video_id=vids[1])
    assert len(hits) == 10 and {h.source_video_id for h in hits} == {vids[1]}

    # a rare state filter (with the index walk capped) still returns every match
    with db.session() as s:
        s.execute(text("UPDATE clips SET state = 'review_approved' WHERE id = ANY(:ids)"), {"ids": ids[::9]})
    with db.session() as s:
        s.execute(text("SET LOCAL hnsw.max_scan_tuples = 20"))
        s.execute(text("SET LOCAL enable_seqscan = off"))
        hits = search_by_clip(s, ids[1], model_id=MODEL_ID, strategy="keyframe_multi_avg", k=10,
                              states=["review_approved"])
    assert {h.state for h in hits} == {"review_approved"} and len(hits) == min(10, len(ids[::9]))
    _ = dg  # (dagster imported for fixtures' side effects)
