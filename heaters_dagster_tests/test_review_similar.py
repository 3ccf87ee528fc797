"""The review page's "similar clips": a clip under review (no embedding yet) is embedded on the fly
from its sprite's middle tile with the embedding stage's model and searched in pgvector."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import text
from starlette.testclient import TestClient

from heaters_dagster import stages
from heaters_dagster.io_managers.embeddings import upsert_embedding
from heaters_dagster.media.embedding import ClipEmbedder
from heaters_dagster.pipeline.handlers import embedding_spec
from heaters_dagster.review.app import create_app
from heaters_dagster.review.similar import middle_tile
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video
from heaters_dagster_tests.review_helpers import add_sprite, numbered_sprite, simple_layout

TINY = {"model_name": "heaters-tiny-vit", "pretrained": None, "checkpoint_path": None, "precision": "fp32"}


def _sprite(layout, colour):
    img = Image.new("RGB", (layout["sheet_width"], layout["sheet_height"]), colour)
    d = ImageDraw.Draw(img)
    for i in range(0, layout["sheet_width"], 23):
        d.line([(i, 0), (layout["sheet_width"] - i, layout["sheet_height"])], fill=(255 - colour[0], 90, colour[2]), width=3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def tiny(monkeypatch):
    for k, v in TINY.items():
        monkeypatch.setitem(stages.get_stage("embedding").params, k, v)
    return ClipEmbedder.load(embedding_spec(stages.get_stage("embedding").params))


def test_pending_clip_finds_the_embedded_clip_that_looks_the_same(db, store_dir, tiny):
    store = ArtifactStore(str(store_dir))
    vid = make_video(db)
    pending, twin, other1, other2 = make_clips(db, vid, [(0, 48), (48, 96), (96, 144), (144, 192)])
    layout = simple_layout(48)
    look = _sprite(layout, (200, 40, 30))
    add_sprite(db, store, pending, layout, look)
    for cid, jpeg in ((twin, look), (other1, _sprite(layout, (20, 160, 60))), (other2, numbered_sprite(layout))):
        add_sprite(db, store, cid, layout, jpeg)
        vec = tiny.embed_images([middle_tile(jpeg, layout)])[0]
        with db.session() as s:
            upsert_embedding(s, cid, tiny.model_id, "keyframe_multi_avg", vec, 1)
            s.execute(text("UPDATE clips SET state = 'embedded' WHERE id = :i"), {"i": cid})
    with TestClient(create_app(db, store, token="t")) as client:
        res = client.get(f"/api/clips/{pending}/similar")
        assert res.status_code == 200, res.text
        data = res.json()
        assert data["basis"] == "middle sprite frame" and data["model_id"] == tiny.model_id
        assert data["clips"][0]["id"] == twin and data["clips"][0]["similarity"] == pytest.approx(1.0, abs=1e-3)
        assert [c["id"] for c in data["clips"]][1:] and pending not in [c["id"] for c in data["clips"]]
        # an embedded clip uses its stored vector
        assert client.get(f"/api/clips/{twin}/similar").json()["basis"] == "stored embedding"
        assert client.get("/api/clips/999999/similar").status_code == 404


def test_clip_without_sprite_answers_why_there_are_none(db, store_dir, tiny):
    store = ArtifactStore(str(store_dir))
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 48)])
    with TestClient(create_app(db, store, token="t")) as client:
        res = client.get(f"/api/clips/{cid}/similar")
    assert res.status_code == 200 and res.json()["clips"] == []
    assert res.json()["unavailable"] == "similar clips unavailable: no sprite sheet yet"
