"""The sprite preview in the Dagster UI: short markdown with the middle frame served by the review
page (rendered inline by Dagster 1.13 under 1,000 characters), a URL to the clip on the review page,
and the embedded JPEG as a fallback; the review page's thumbnail and /clip/<id> routes."""

from __future__ import annotations

import io

import dagster as dg
from PIL import Image
from starlette.testclient import TestClient

from heaters_dagster.pipeline.handlers import preview_metadata
from heaters_dagster.review.app import create_app
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video
from heaters_dagster_tests.review_helpers import add_sprite, numbered_sprite, simple_layout


def _jpeg(size=(32, 18)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_preview_metadata_points_at_the_configured_review_page(monkeypatch):
    monkeypatch.setenv("HEATERS_REVIEW_URL", "http://review.example:9000/")
    md = preview_metadata("clip", 42, _jpeg(), "sprite 42")
    assert md["preview"] == dg.MetadataValue.md(
        "[![sprite 42](http://review.example:9000/api/clips/42/thumbnail)](http://review.example:9000/clip/42)")
    assert len(md["preview"].value) < 1000  # the UI expands only small markdown values
    assert md["review_page"] == dg.MetadataValue.url("http://review.example:9000/clip/42")
    assert md["thumbnail"].value.startswith("![sprite 42](data:image/jpeg;base64,")
    assert set(preview_metadata("video", 1, _jpeg(), "x")) == {"thumbnail"}  # no review page for videos


def test_thumbnail_is_the_middle_frame_and_clip_links_open_that_clip(db, store_dir):
    store = ArtifactStore(str(store_dir))
    vid = make_video(db)
    first, linked = make_clips(db, vid, [(0, 48), (48, 96)], state="pending_review")
    layout = simple_layout(48)
    for cid in (first, linked):
        add_sprite(db, store, cid, layout, numbered_sprite(layout))
    with TestClient(create_app(db, store, token=None)) as client:
        res = client.get(f"/api/clips/{linked}/thumbnail")
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(res.content)) as im:
            assert im.size == (layout["tile_width"], layout["tile_height"])
            # tile 24 of 48 (the middle): numbered_sprite's colour for it, away from the label
            r, g, b = im.convert("RGB").getpixel((layout["tile_width"] - 12, layout["tile_height"] - 12))
            assert abs(r - 100) < 12 and abs(g - 60) < 12 and abs(b - 120) < 12
        assert client.get("/api/clips/999999/thumbnail").status_code == 404
        page = client.get(f"/clip/{linked}")
        assert page.status_code == 200 and "/static/review.js" in page.text
        # read-only: the linked clip first, instead of the queue's head
        assert client.get("/api/next").json()["clip"]["id"] == first
        assert client.get(f"/api/next?prefer={linked}").json()["clip"]["id"] == linked
