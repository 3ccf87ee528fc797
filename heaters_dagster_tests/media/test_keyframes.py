"""Keyframe picking (pure) and extraction, checked against the frame index drawn in each frame."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heaters_dagster.errors import InvalidMediaError, PermanentError
from heaters_dagster.media import keyframes as keyframes_mod
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.keyframes import STRATEGIES, extract_keyframes, keyframe_indices
from heaters_dagster.media.synthetic import SyntheticVideo, make_video, read_frame_number
from heaters_dagster_tests.media.spies import spy_ffmpeg


@pytest.mark.parametrize("frame_count", [1, 2, 3, 4, 5, 7, 24, 99, 100, 101, 1001])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_indices_follow_the_formula(frame_count: int, strategy: str) -> None:
    picks = keyframe_indices(frame_count, strategy)
    assert [tag for tag, _ in picks] == [tag for tag, _ in STRATEGIES[strategy]]
    for (_, index), (_, pct) in zip(picks, STRATEGIES[strategy]):
        assert 0 <= index < frame_count
        assert index == min(frame_count - 1, math.floor(frame_count * pct))
    assert [i for _, i in picks] == sorted(i for _, i in picks)


def test_indices_examples() -> None:
    assert keyframe_indices(100, "multi") == [("25pct", 25), ("50pct", 50), ("75pct", 75)]
    assert keyframe_indices(1, "multi") == [("25pct", 0), ("50pct", 0), ("75pct", 0)]
    assert keyframe_indices(7, "midpoint") == [("mid", 3)]


def test_indices_reject_bad_requests() -> None:
    with pytest.raises(PermanentError, match="unknown keyframe strategy"):
        keyframe_indices(10, "random")
    with pytest.raises(PermanentError):
        keyframe_indices(0, "multi")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    # 8.5 s: with x264's 250-frame keyframe interval the later targets need a real seek + decode.
    return make_video(tmp_path_factory.mktemp("kf") / "clip.mp4", (3.0, 2.5, 3.0), number_frames=True)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_saved_jpegs_show_exactly_the_computed_frames(
    clip: SyntheticVideo, tmp_path: Path, strategy: str
) -> None:
    res = extract_keyframes(
        clip.path, tmp_path, strategy=strategy, fps=clip.fps, frame_count=clip.frame_count
    )
    assert res.strategy == strategy
    expected = keyframe_indices(clip.frame_count, strategy)
    assert [(k.tag, k.frame_index) for k in res.keyframes] == expected
    for kf in res.keyframes:
        assert kf.path == tmp_path / f"keyframe_{kf.tag}.jpg"
        assert kf.time_s == pytest.approx(kf.frame_index / clip.fps)
        assert kf.size_bytes == kf.path.stat().st_size
        with Image.open(kf.path) as img:
            assert img.format == "JPEG"
            assert (img.width, img.height) == (kf.width, kf.height) == (clip.width, clip.height)
            assert read_frame_number(np.asarray(img.convert("L"))) == kf.frame_index
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"keyframe_{t}.jpg" for t, _ in expected)


def test_positions_are_exact_at_ntsc_rate(tmp_path: Path) -> None:
    v = make_video(tmp_path / "v.mp4", (1.0,), audio=False, number_frames=True)
    ntsc = tmp_path / "ntsc.mp4"
    subprocess.run(
        [ffmpeg_bin(), "-v", "error", "-i", str(v.path), "-vf", "setpts=N/(30000/1001)/TB",
         "-r", "30000/1001", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", str(ntsc)],
        check=True)
    for count in (5, 13, 24):  # the caller's count decides the indices
        res = extract_keyframes(ntsc, tmp_path / str(count), fps=30000 / 1001, frame_count=count)
        for kf in res.keyframes:
            with Image.open(kf.path) as img:
                assert read_frame_number(np.asarray(img.convert("L"))) == kf.frame_index


def test_seeks_instead_of_decoding_from_the_start(
    clip: SyntheticVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_ffmpeg(monkeypatch, keyframes_mod)
    res = extract_keyframes(clip.path, tmp_path, strategy="multi", fps=clip.fps, frame_count=clip.frame_count)
    assert len(calls) == 3
    for args, kf in zip(calls, res.keyframes):
        assert args.index("-ss") < args.index("-i")  # input seeking
        seek = float(args[args.index("-ss") + 1])
        assert seek == pytest.approx(kf.frame_index / clip.fps, abs=0.5 / clip.fps)
        assert args[args.index("-frames:v") + 1] == "1"


def test_a_clip_with_one_keyframe_is_decoded_once(
    clip: SyntheticVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clip cut by stream copy has one keyframe: one pass to the last frame beats three seeks."""
    single = tmp_path / "single_gop.mp4"
    subprocess.run([ffmpeg_bin(), "-v", "error", "-y", "-i", str(clip.path), "-c:v", "libx264", "-preset",
                    "ultrafast", "-x264-params", "scenecut=0:keyint=1000", "-an", str(single)], check=True)
    calls = spy_ffmpeg(monkeypatch, keyframes_mod)
    res = extract_keyframes(single, tmp_path / "out", strategy="multi", fps=clip.fps, frame_count=clip.frame_count)
    assert len(calls) == 1 and "-ss" not in calls[0]
    assert calls[0][calls[0].index("-frames:v") + 1] == "3"
    assert [(k.tag, k.frame_index) for k in res.keyframes] == keyframe_indices(clip.frame_count, "multi")
    for kf in res.keyframes:
        with Image.open(kf.path) as img:
            assert read_frame_number(np.asarray(img.convert("L"))) == kf.frame_index
            assert img.size == (clip.width, clip.height)


def test_one_pass_or_seeks_by_frames_decoded() -> None:
    assert keyframes_mod.one_pass_is_cheaper([50, 100, 150], frozenset({0}))  # 151 <= 51 + 101 + 151
    assert not keyframes_mod.one_pass_is_cheaper([500, 1000, 1500], frozenset({0, 250, 500, 750, 1000, 1250, 1500}))
    assert not keyframes_mod.one_pass_is_cheaper([50, 100], frozenset())  # keyframes unknown: seek


def test_jpeg_quality_is_applied(clip: SyntheticVideo, tmp_path: Path) -> None:
    hi = extract_keyframes(clip.path, tmp_path / "hi", strategy="midpoint", fps=clip.fps,
                           frame_count=clip.frame_count, jpeg_quality=95)
    lo = extract_keyframes(clip.path, tmp_path / "lo", strategy="midpoint", fps=clip.fps,
                           frame_count=clip.frame_count, jpeg_quality=30)
    assert lo.keyframes[0].size_bytes < hi.keyframes[0].size_bytes


def test_frame_beyond_the_clip_is_an_error_and_writes_nothing(clip: SyntheticVideo, tmp_path: Path) -> None:
    with pytest.raises(InvalidMediaError, match="no frame"):
        extract_keyframes(
            clip.path, tmp_path, strategy="multi", fps=clip.fps, frame_count=clip.frame_count * 3
        )
    assert list(tmp_path.iterdir()) == []
