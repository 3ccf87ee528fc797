"""The stream detector (heaters_dagster.media.scenes, detector="stream") on generated videos whose cuts
are known exactly. The hybrid detector is tested in test_scenes_hybrid.py."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pytest

from heaters_dagster.errors import InvalidMediaError
from heaters_dagster.media.scenes import stream as scenes_mod
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from functools import partial

from heaters_dagster.media.scenes import (
    SceneDetectionResult,
    analysis_size_for,
    find_cuts,
    score_frames,
    split_scenes,
)
from heaters_dagster.media.scenes import detect_scenes as _detect_scenes
from heaters_dagster.media.synthetic import make_video

detect_scenes = partial(_detect_scenes, detector="stream")


# -- helpers -------------------------------------------------------------------------------------
def assert_cuts_match(found: Sequence[int], expected: Sequence[int], tol: int = 1) -> None:
    """Every expected cut is found within +-tol frames, one-to-one, and nothing else is found."""
    unmatched = list(found)
    missing = []
    for c in expected:
        near = [f for f in unmatched if abs(f - c) <= tol]
        if not near:
            missing.append(c)
            continue
        unmatched.remove(min(near, key=lambda f: abs(f - c)))
    assert not missing and not unmatched, (
        f"expected cuts {list(expected)}, found {list(found)}: missing {missing}, spurious {unmatched}")


def assert_tiles(det: SceneDetectionResult) -> None:
    """Kept + dropped scenes tile [0, frame_count) with no gap or overlap, at the cut frames."""
    allsc = sorted(det.scenes + det.dropped, key=lambda s: s.start_frame)
    assert allsc, "no scenes at all"
    assert allsc[0].start_frame == 0
    assert allsc[-1].end_frame == det.frame_count
    for a, b in zip(allsc, allsc[1:]):
        assert a.end_frame == b.start_frame
    assert all(s.frame_count > 0 for s in allsc)
    assert [s.start_frame for s in allsc[1:]] == list(det.cut_frames)
    assert list(det.all_scenes) == allsc
    for s in allsc:
        assert s.start_s == pytest.approx(s.start_frame / det.fps)
        assert s.end_s == pytest.approx(s.end_frame / det.fps)


def build_video(path: Path, scenes: Sequence[tuple[str, str, int]], *, fps: int = 25,
                size: str = "320x180") -> tuple[list[int], int]:
    """Concatenate lavfi scenes ``(source, extra_filters, frames)``; return (cut frames, total)."""
    args = [ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-y"]
    chains = []
    for i, (src, post, n) in enumerate(scenes):
        sep = ":" if "=" in src else "="
        args += ["-f", "lavfi", "-i", f"{src}{sep}size={size}:rate={fps}"]
        extra = f",{post}" if post else ""
        chains.append(f"[{i}:v]trim=end_frame={n},setpts=PTS-STARTPTS,scale={size},setsar=1{extra},"
                      f"format=yuv420p[v{i}]")
    graph = ";".join(chains) + ";" + "".join(f"[v{i}]" for i in range(len(scenes)))
    graph += f"concat=n={len(scenes)}:v=1:a=0[out]"
    args += ["-filter_complex", graph, "-map", "[out]", "-c:v", "libx264", "-preset", "veryfast",
             "-crf", "18", "-r", str(fps), str(path)]
    subprocess.run(args, check=True, capture_output=True)
    frames = [n for _, _, n in scenes]
    return list(np.cumsum(frames)[:-1].tolist()), sum(frames)


def read_frames(path: Path, indices: Sequence[int]) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    want, out, i = set(indices), {}, 0
    while want - out.keys():
        ok, frame = cap.read()
        if not ok:
            break
        if i in want:
            out[i] = frame
        i += 1
    cap.release()
    return out


def hsv_hist_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The old detector's measure: correlation of 2-D hue/saturation histograms."""
    hs = []
    for img in (a, b):
        h = cv2.calcHist([cv2.cvtColor(img, cv2.COLOR_BGR2HSV)], [0, 1], None, [50, 60], [0, 180, 0, 256])
        hs.append(cv2.normalize(h, None).flatten())
    return float(cv2.compareHist(hs[0], hs[1], cv2.HISTCMP_CORREL))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenes")


# -- known cuts ------------------------------------------------------------------------------------
CASES = {
    "24fps-4-scenes": dict(scene_seconds=(2.0, 1.5, 3.0, 2.5), fps=24),
    "30fps-6-mixed": dict(scene_seconds=(1.2, 3.0, 0.8, 2.0, 1.0, 2.4), fps=30),
    "25fps-9-all-patterns": dict(scene_seconds=(1.0, 1.6, 1.2, 2.0, 1.4, 1.0, 1.8, 1.2, 1.5), fps=25),
    "24fps-1-scene": dict(scene_seconds=(3.0,), fps=24),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def generated(request: pytest.FixtureRequest, media: Path):
    video = make_video(media / f"{request.param}.mp4", audio=request.param.startswith("30"),
                       **CASES[request.param])
    return video, detect_scenes(video.path)


def test_finds_every_known_cut_and_nothing_else(generated) -> None:
    video, det = generated
    assert det.frame_count == video.frame_count
    assert det.fps == pytest.approx(video.fps)
    assert_cuts_match(det.cut_frames, video.cut_frames)


def test_scenes_tile_the_video(generated) -> None:
    _, det = generated
    assert_tiles(det)
    assert det.analysis_size[0] <= 160  # analysed small, not at source resolution
    assert det.decode_seconds > 0


def test_short_scenes_go_to_dropped(generated) -> None:
    video, det = generated
    for s in det.scenes:
        assert s.frame_count / video.fps >= 1.0 - 1e-9
    for s in det.dropped:
        assert s.frame_count / video.fps < 1.0
    short_truth = [n for n in video.scene_frames if n < video.fps]
    assert len(det.dropped) == len(short_truth)


def test_min_scene_s_moves_scenes_between_kept_and_dropped(media: Path) -> None:
    video = make_video(media / "short.mp4", (2.0, 0.5, 2.0, 0.6, 1.5), fps=24, audio=False)
    det = detect_scenes(video.path, min_scene_s=1.0)
    assert_cuts_match(det.cut_frames, video.cut_frames)
    assert_tiles(det)
    assert len(det.scenes) == 3 and len(det.dropped) == 2
    assert sorted(s.frame_count for s in det.dropped) == pytest.approx([12, 14], abs=2)
    none_dropped = detect_scenes(video.path, min_scene_s=0.0)
    assert none_dropped.dropped == () and len(none_dropped.scenes) == 5
    strict = detect_scenes(video.path, min_scene_s=1.8)
    assert len(strict.scenes) == 2 and len(strict.dropped) == 3  # the 1.5 s scene goes too
    assert_tiles(strict)


# -- flashes -----------------------------------------------------------------------------------------
def test_white_flashes_are_not_cuts(media: Path) -> None:
    # one-frame flashes mid-scene, a two-frame flash, and one-frame flashes right before and right
    # after a cut (scene lengths 50 frames at 25 fps: cuts at 50, 100, 150, 200)
    flashes = (12, 37, 49, 101, 130, 131, 175, 222)
    video = make_video(media / "flash.mp4", (2.0, 2.0, 2.0, 2.0, 2.0), fps=25, flash_frames=flashes,
                       audio=False)
    scores = score_frames(video.path)
    # The flashes are loud in the raw frame-to-frame score (so suppression, not luck, removes them)
    s = scores.score
    for f in (12, 37, 130, 175, 222):
        assert s[f] > 5 * scenes_mod.DEFAULT_MIN_SCORE and s[f] > 10 * np.median(s[f - 8:f - 2])
    det = detect_scenes(video.path)
    assert_cuts_match(det.cut_frames, video.cut_frames)
    assert_tiles(det)
    assert len(det.dropped) == 0


def test_without_flash_suppression_the_flashes_would_fire(media: Path) -> None:
    # the same signals with the persistence test disabled report the flashes: the test above
    # passes because of the suppression
    video = make_video(media / "flash2.mp4", (3.0, 3.0), fps=24, flash_frames=(20, 50), audio=False)
    scores = score_frames(video.path)
    naive = find_cuts(scores, suppress_flashes=False, min_gap=0)
    assert any(abs(c - 20) <= 1 for c in naive) and any(abs(c - 50) <= 1 for c in naive)
    assert_cuts_match(find_cuts(scores), video.cut_frames)


# -- similar-looking scenes -----------------------------------------------------------------------------
def test_cuts_between_scenes_with_the_same_colours(media: Path) -> None:
    # the same moving test card, mirrored; and two Game-of-Life runs with the same colours and
    # density but different seeds: colour histograms are (almost) identical across these cuts
    path = media / "similar.mp4"
    cuts, total = build_video(path, [
        ("testsrc2", "", 45),
        ("testsrc2", "hflip", 40),
        ("testsrc2", "vflip", 50),
        ("life=seed=1:ratio=0.3:mold=10", "", 45),
        ("life=seed=2:ratio=0.3:mold=10", "", 45),
    ], fps=25)
    frames = read_frames(path, [i for c in cuts for i in (c - 1, c)])
    for c in (cuts[0], cuts[1], cuts[3]):  # premise: the old measure sees (nearly) no change
        assert hsv_hist_correlation(frames[c - 1], frames[c]) > 0.95
    det = detect_scenes(path)
    assert det.frame_count == total
    assert_cuts_match(det.cut_frames, cuts)
    assert_tiles(det)


def test_cut_between_recoloured_copies_of_one_scene(media: Path) -> None:
    # same layout and motion, only the hue changes (luma nearly identical across the cut)
    path = media / "hue.mp4"
    cuts, total = build_video(path, [
        ("testsrc2", "", 48), ("testsrc2", "hue=h=90", 48), ("testsrc2", "hue=h=200", 48),
    ], fps=24)
    det = detect_scenes(path)
    assert det.frame_count == total
    assert_cuts_match(det.cut_frames, cuts)


# -- frame rate, chunking, sizes --------------------------------------------------------------------
def test_fps_argument(media: Path) -> None:
    video = make_video(media / "rate30.mp4", (2.0, 2.0, 2.0), fps=30, audio=False)
    same = detect_scenes(video.path, fps=30.0)
    assert same.frame_count == video.frame_count and same.fps == 30.0
    assert_cuts_match(same.cut_frames, video.cut_frames)
    # a different rate resamples the analysed stream: indices (and times) follow that rate
    half = detect_scenes(video.path, fps=15.0)
    assert half.fps == 15.0
    assert half.frame_count == pytest.approx(video.frame_count / 2, abs=1)
    assert_cuts_match(half.cut_frames, [c // 2 for c in video.cut_frames])
    for a, b in zip(same.scenes, half.scenes):
        assert a.start_s == pytest.approx(b.start_s, abs=1 / 15 + 1e-9)


def test_known_rate_and_duration_skip_the_probe(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The splice stage passes the rate and duration ingest recorded: the decode then starts without
    an ffprobe run, with the same signals as the probed path."""
    video = make_video(media / "known.mp4", (1.0, 1.2, 0.8), fps=25, audio=False)
    probed = score_frames(video.path)
    probes: list[Path] = []
    real_probe = scenes_mod._probe
    monkeypatch.setattr(scenes_mod, "_probe", lambda p: probes.append(p) or real_probe(p))
    known = score_frames(video.path, fps=25.0, duration_s=video.frame_count / 25)
    assert probes == []
    assert known.frame_count == probed.frame_count == video.frame_count
    assert known.analysis_size == probed.analysis_size and known.fps == probed.fps == 25.0
    np.testing.assert_array_equal(known.score, probed.score)
    assert find_cuts(known) == find_cuts(probed)
    score_frames(video.path, fps=25.0)  # no duration: probed for the decode's time limit
    assert probes == [video.path]


def test_decoded_size_is_analysis_size_for(media: Path) -> None:
    """ffmpeg computes the analysis size from the source's own size (no probe): the same rule as
    analysis_size_for, for landscape, portrait, odd and very wide sources."""
    for w, h in ((320, 180), (180, 320), (250, 130), (1000, 8)):
        p = media / f"size_{w}x{h}.mp4"
        subprocess.run([ffmpeg_bin(), "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc=size={w}x{h}:rate=10:duration=0.5", "-pix_fmt", "yuv444p",
                        "-c:v", "libx264", "-preset", "ultrafast", str(p)], check=True)
        sc = score_frames(p, analysis_width=64)
        assert sc.analysis_size == analysis_size_for(w, h, 64), (w, h)
        assert sc.frame_count == 5


def test_small_chunks_give_identical_results(media: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    video = make_video(media / "chunks.mp4", (1.0, 0.7, 1.3, 1.1), fps=24, flash_frames=(30, 62),
                       audio=False)
    big = score_frames(video.path)
    w, h = big.analysis_size
    monkeypatch.setattr(scenes_mod, "_CHUNK_BYTES", (w * h * 3 // 2) * 5)  # -> 16-frame chunks
    small = score_frames(video.path)
    assert small.frame_count == big.frame_count == video.frame_count
    np.testing.assert_allclose(small.score, big.score, rtol=1e-6, atol=1e-7)
    for a, b in zip(small.gap, big.gap):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert find_cuts(small) == find_cuts(big)
    assert_cuts_match(find_cuts(small), video.cut_frames)


def test_analysis_size_keeps_aspect_and_is_even() -> None:
    assert analysis_size_for(1920, 1080, 96) == (96, 54)
    assert analysis_size_for(1080, 1920, 96) == (96, 170)
    assert analysis_size_for(640, 480, 97) == (96, 72)
    w, h = analysis_size_for(7, 3001, 64)
    assert w % 2 == 0 and h % 2 == 0 and h > w
    assert analysis_size_for(3000, 8, 96) == (96, 2)


def test_split_scenes_is_a_partition() -> None:
    kept, dropped = split_scenes([30, 10, 10, 55, 0, 100], 100, 25.0, 0.5)
    allsc = sorted(kept + dropped, key=lambda s: s.start_frame)
    assert [(s.start_frame, s.end_frame) for s in allsc] == [(0, 10), (10, 30), (30, 55), (55, 100)]
    assert [(s.start_frame, s.end_frame) for s in dropped] == [(0, 10)]


# -- bad input ----------------------------------------------------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(InvalidMediaError, match="empty"):
        detect_scenes(p)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.mp4"
    p.write_text("this is not a video\n" * 50)
    with pytest.raises(InvalidMediaError, match="notes.mp4"):
        detect_scenes(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidMediaError, match="no such file"):
        detect_scenes(tmp_path / "nope.mp4")


def test_audio_only_file(tmp_path: Path) -> None:
    p = tmp_path / "tone.m4a"
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(p)], check=True)
    with pytest.raises(InvalidMediaError, match="no video stream"):
        detect_scenes(p)


def test_truncated_file_with_no_decodable_frame(media: Path, tmp_path: Path) -> None:
    video = make_video(media / "whole.mp4", (1.0, 1.0), fps=24, audio=False)
    data = video.path.read_bytes()
    p = tmp_path / "truncated.mp4"
    p.write_bytes(data[: max(64, len(data) // 50)])  # the header and almost no frame data
    with pytest.raises(InvalidMediaError, match="truncated.mp4"):
        detect_scenes(p)
