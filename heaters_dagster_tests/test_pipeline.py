"""End to end in process: submit -> ingest -> splice -> sprite through the real sensors, jobs and
assets (materialized in process on a test instance), on generated media with known cuts; and
every bad input ending in a failed state with a message while the good video goes on."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.synthetic import make_video
from heaters_dagster_tests.factories import row_of
from heaters_dagster_tests.pipeline_helpers import (
    artifacts_of,
    assert_tiles,
    clips_of,
    drive,
    stored_clip_files,
    submit,
)

SCENES = (2.0, 3.0, 0.5, 2.5, 1.5)  # the 0.5 s scene is dropped as too short (min 1.0 s)


@pytest.fixture(scope="module")
def sample(media_dir):
    return make_video(media_dir / "sample.mp4", SCENES, fps=24, width=320, height=180, flash_frames=(20,))


def test_submission_to_pending_review(defs, db, store, instance, sample):
    sub = submit(db, store, sample.path, "sample")
    assert sub.state == "new"
    runs = drive(defs, instance)
    assert all(r.success for r in runs), runs
    assert {r.stage for r in runs} == {"ingest", "sprite"}  # splice runs in ingest's step (Stage.runs_after)

    video = row_of(db, "video", sub.video_id)
    assert video.state == "spliced" and video.last_error is None
    assert (video.width, video.height, video.frame_count) == (320, 180, sample.frame_count)
    assert video.fps == pytest.approx(24.0)

    clips = clips_of(db, sub.video_id)
    assert all(c.state == "pending_review" for c in clips)
    spans = [(c.start_frame, c.end_frame) for c in clips]
    # every boundary is a known cut (within one frame) and the short scene is the only hole
    boundaries = sorted({b for s in spans for b in s} - {0, sample.frame_count})
    expected = list(sample.cut_frames)
    short = (sample.cut_frames[1], sample.cut_frames[2])
    assert len(boundaries) == len(expected)
    for got, want in zip(boundaries, expected):
        assert abs(got - want) <= 1
    dropped = [(spans[1][1], spans[2][0])]
    assert abs(dropped[0][0] - short[0]) <= 1 and abs(dropped[0][1] - short[1]) <= 1
    assert_tiles(spans, sample.frame_count, dropped)
    for c in clips:
        assert c.start_s == pytest.approx(c.start_frame / 24.0) and c.end_s == pytest.approx(c.end_frame / 24.0)
        assert store.exists(c.file_key)
        (sprite,) = artifacts_of(db, c.id)
        layout = sprite.meta
        with Image.open(store.uri(sprite.storage_key)) as im:
            assert im.size == (layout["cols"] * layout["tile_width"], layout["rows"] * layout["tile_height"])
        assert layout["frame_count"] <= layout["cols"] * layout["rows"]
        assert layout["frame_count"] == pytest.approx((c.end_frame - c.start_frame) * layout["effective_fps"] / 24.0,
                                                      abs=1)
    # one sprite run covered all the clips
    sprite_runs = [r for r in runs if r.stage == "sprite"]
    assert len(sprite_runs) == 1
    # nothing runs twice: another round requests nothing
    assert drive(defs, instance) == []


def test_materializations_visible_per_partition(defs, db, store, instance, sample):
    import dagster as dg

    sub = submit(db, store, sample.path)
    drive(defs, instance)
    clips = clips_of(db, sub.video_id)
    recs = instance.fetch_materializations(dg.AssetKey("sprite"), limit=100).records
    assert sorted(int(r.partition_key) for r in recs) == [c.id for c in clips]
    md = recs[0].asset_materialization.metadata
    assert md["thumbnail"].value.startswith("![sprite") and "data:image/jpeg;base64," in md["thumbnail"].value
    # shown inline by the UI (markdown under 1,000 characters), linked to the clip on the review page
    cid, base = int(recs[0].partition_key), "http://127.0.0.1:8765"
    assert md["preview"].value == f"[![sprite {cid}]({base}/api/clips/{cid}/thumbnail)]({base}/clip/{cid})"
    assert md["review_page"] == dg.MetadataValue.url(f"{base}/clip/{cid}")


def _bad_inputs(tmp_path, sample):
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    audio = tmp_path / "audio.mp4"
    subprocess.run([ffmpeg_bin(), "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=2",
                    "-c:a", "aac", str(audio)], check=True)
    trunc = tmp_path / "truncated.mp4"
    data = sample.path.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    return {
        "zero-byte": (str(zero), "empty"),
        "text": (str(text), "not a video"),
        "audio-only": (str(audio), "no video stream"),
        "truncated": (str(trunc), "truncated"),
        "missing": (str(tmp_path / "nope.mp4"), "not found"),
        "ftp": ("ftp://example.com/v.mp4", "http"),
        "file-url": ("file:///etc/passwd", "http"),
    }


def test_bad_inputs_fail_with_messages_and_the_good_video_goes_on(defs, db, store, instance, sample, tmp_path):
    bad = _bad_inputs(tmp_path, sample)
    subs = {name: submit(db, store, uri) for name, (uri, _) in bad.items()}
    good = submit(db, store, sample.path)
    runs = drive(defs, instance)
    assert any(r.stage == "sprite" and r.success for r in runs)
    for name, (uri, needle) in bad.items():
        row = row_of(db, "video", subs[name].video_id)
        assert row.state == "ingestion_failed", (name, row.state, row.last_error)
        assert needle in row.last_error.lower(), (name, row.last_error)
        assert clips_of(db, row.id) == []
    assert row_of(db, "video", good.video_id).state == "spliced"
    assert clips_of(db, good.video_id) and all(c.state == "pending_review" for c in clips_of(db, good.video_id))
    # nothing half-written: exactly the clip files the rows name
    every = [c.file_key for v in [good, *subs.values()] for c in clips_of(db, v.video_id)]
    assert stored_clip_files(store) == set(every)


def test_status_json_lists_failures(defs, db, store, instance, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from heaters_dagster.cli.main import cli

    submit(db, store, str(tmp_path / "missing.mp4"))
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    out = CliRunner().invoke(cli, ["status", "--json"])
    assert out.exit_code == 0, out.output
    st = json.loads(out.output)
    assert st["videos"] == {"ingestion_failed": 1}
    assert "not found" in st["failures"][0]["last_error"]
