"""Detect first, encode once: ingest detects scenes on the source and forces keyframes at the
cuts, splice cuts every clip by stream copy, frame-exact; and every case where the plan does not
apply falls back to detecting (and encoding) in splice, with the same clips."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import dagster as dg
import pytest

from heaters_dagster.definitions import build_definitions
from heaters_dagster.media.clips import cut_clips, keyframe_frames
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.normalize import normalize
from heaters_dagster.media.probe import probe
from heaters_dagster.media.scenes import detect_scenes
from heaters_dagster.media.synthetic import make_video, read_frame_numbers
from heaters_dagster.pipeline.scene_plan import detection_params, make_plan, plan_mismatch, result_from_plan
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import row_of
from heaters_dagster_tests.pipeline_helpers import assert_tiles, clips_of, drive, submit

SCENES = (2.0, 1.5, 0.5, 2.0, 1.5)  # the 0.5 s scene is dropped (min_scene_s 1.0)


@pytest.fixture(scope="module")
def numbered(media_dir):
    return make_video(media_dir / "plan_numbered.mp4", SCENES, fps=24, number_frames=True)


def _splice_metadata(instance: dg.DagsterInstance, video_id: int) -> dict:
    recs = instance.fetch_materializations(dg.AssetKey("splice"), limit=10).records
    (rec,) = [r for r in recs if r.partition_key == str(video_id)]
    return {k: v.value for k, v in rec.asset_materialization.metadata.items()}


def _assert_clips_exact(db, store, video_id: int, normalized_numbers: list[int]) -> list:
    clips = clips_of(db, video_id)
    assert clips
    for c in clips:
        assert read_frame_numbers(store.uri(c.file_key)) == normalized_numbers[c.start_frame:c.end_frame], c.id
    return clips


def _pipeline(db, store, instance, defs, sample, title):
    sub = submit(db, store, sample.path, title)
    runs = drive(defs, instance, stop_at={"sprite"})
    assert all(r.success for r in runs), runs
    video = row_of(db, "video", sub.video_id)
    assert video.state == "spliced", video.last_error
    return video, read_frame_numbers(store.uri(video.normalized_key))


def test_ingest_detects_and_splice_copies_every_clip(db, store, instance, defs, numbered):
    video, numbers = _pipeline(db, store, instance, defs, numbered, "planned")
    assert numbers == list(range(numbered.frame_count))
    plan = video.scene_plan
    assert plan["params"] == detection_params(get_stage("splice").params)
    assert plan["frame_count"] == video.frame_count == numbered.frame_count
    assert len(plan["cut_frames"]) == len(numbered.cut_frames)
    assert all(abs(a - b) <= 1 for a, b in zip(plan["cut_frames"], numbered.cut_frames))
    # every cut is a keyframe of the normalised file
    assert set(plan["cut_frames"]) <= keyframe_frames(store.uri(video.normalized_key))

    md = _splice_metadata(instance, video.id)
    clips = _assert_clips_exact(db, store, video.id, numbers)
    assert md["scenes_from"] == "ingest (source)" and md["detect_s"] == 0
    assert md["clips_copied"] == md["clips"] == len(clips) == len(SCENES) - 1
    spans = [(c.start_frame, c.end_frame) for c in clips]
    assert_tiles(spans, video.frame_count, [(spans[1][1], spans[2][0])])


def test_ingest_detects_with_the_splice_parameters_it_will_be_cut_with(db, store, store_dir, instance, numbered):
    defs = build_definitions(database_url=db.url, storage_url=str(store_dir),
                             stage_params={"splice": {"detector": "stream"}})
    video, numbers = _pipeline(db, store, instance, defs, numbered, "stream")
    assert video.scene_plan["params"]["detector"] == video.scene_plan["detector"] == "stream"
    md = _splice_metadata(instance, video.id)
    assert md["scenes_from"] == "ingest (source)" and md["detector"] == "stream"
    _assert_clips_exact(db, store, video.id, numbers)


@pytest.mark.parametrize("ingest_params,splice_params,reason", [
    ({}, {"detector": "stream"}, "detection parameters changed"),  # splice re-run with other parameters
    ({"detect_first": False}, {}, None),
])
def test_splice_detects_again_when_the_plan_does_not_apply(db, store, store_dir, defs, instance, numbered,
                                                           ingest_params, splice_params, reason, monkeypatch):
    sub = submit(db, store, numbered.path, "unplanned")
    monkeypatch.setenv("HEATERS_CHAIN_STAGES", "0")  # ingest alone: splice comes later, with other parameters
    ingest_defs = build_definitions(database_url=db.url, storage_url=str(store_dir),
                                    stage_params={"ingest": ingest_params})
    monkeypatch.delenv("HEATERS_CHAIN_STAGES")
    assert all(r.success for r in drive(ingest_defs, instance, stop_at={"splice", "sprite"}))
    splice_defs = build_definitions(database_url=db.url, storage_url=str(store_dir),
                                    stage_params={"splice": splice_params})
    assert all(r.success for r in drive(splice_defs, instance, stop_at={"sprite"}))
    video = row_of(db, "video", sub.video_id)
    assert video.state == "spliced", video.last_error
    numbers = read_frame_numbers(store.uri(video.normalized_key))
    md = _splice_metadata(instance, video.id)
    assert md["scenes_from"] == "splice (normalised file)" and md["detect_s"] > 0
    if reason is None:
        assert video.scene_plan is None
    else:
        assert reason in plan_mismatch(video.scene_plan, {**get_stage("splice").params, **splice_params},
                                       video.frame_count)
    clips = _assert_clips_exact(db, store, video.id, numbers)
    assert len(clips) == len(SCENES) - 1


def test_plan_checks_and_min_scene_s_from_the_plan():
    params = get_stage("splice").params
    det = result_from_plan({"params": {}, "detector": "hybrid", "fps": 24.0, "frame_count": 100,
                            "cut_frames": [10, 40, 90]}, 1.0)
    plan = make_plan(det, params)
    assert plan_mismatch(plan, params, 100) is None
    assert "frames" in plan_mismatch(plan, params, 101)
    assert "detection parameters" in plan_mismatch(plan, {**params, "threshold": 5.0}, 100)
    assert plan_mismatch(plan, {**params, "min_scene_s": 0.1}, 100) is None  # filters, does not detect
    assert plan_mismatch(None, params, 100) == "no scene plan from ingest"
    # [0, 10) and [90, 100) are shorter than 1 s at 24 fps; at 0.1 s every scene is kept
    assert [(s.start_frame, s.end_frame) for s in det.scenes] == [(10, 40), (40, 90)]
    assert len(result_from_plan(plan, 0.1).scenes) == 4


def test_variable_rate_source_is_numbered_alike_by_detection_and_normalise(tmp_path):
    """Detection on a variable-rate source counts the frames the normalised file will have: the
    cuts found on the source are the cuts found on the normalised file, and all are copied."""
    v = make_video(tmp_path / "cfr.mp4", (1.5, 2.0, 1.5), fps=24, audio=False, number_frames=True)
    vfr = tmp_path / "vfr.mkv"
    # a 12-frame hole after frame 20 and jittered spacing after frame 60
    subprocess.run([ffmpeg_bin(), "-v", "error", "-y", "-i", str(v.path), "-vf",
                    "setpts='(N+if(gte(N,20),12,0)+if(gte(N,60),0.4*mod(N,2),0))/24/TB'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", str(vfr)], check=True)
    info = probe(vfr)
    fps = float(Fraction(info.fps_fraction))
    on_source = detect_scenes(vfr, fps=fps, duration_s=info.duration_s, detector="stream")
    res = normalize(vfr, tmp_path / "norm.mp4", preset="ultrafast", keyframes=on_source.cut_frames, info=info)
    assert res.output.frame_count == on_source.frame_count > v.frame_count  # the hole was filled
    on_normalised = detect_scenes(res.output_path, detector="stream")
    assert on_normalised.cut_frames == on_source.cut_frames and len(on_source.cut_frames) == 2
    assert set(on_source.cut_frames) <= keyframe_frames(res.output_path)
    spans = [(s.start_frame, s.end_frame) for s in on_source.scenes]
    cut = cut_clips(res.output_path, spans, tmp_path / "clips", fps=fps)
    assert cut.copied == len(spans) == 3
    numbers = read_frame_numbers(res.output_path)
    for c in cut.clips:
        assert read_frame_numbers(c.path) == numbers[c.start_frame:c.end_frame]
