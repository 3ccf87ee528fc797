"""The hybrid scene detector (stream candidates + TransNetV2 on short windows) on small videos.

Videos are generated with ffmpeg (lavfi patterns) or cut from real footage shipped inside
installed packages (dagster-webserver's Dagster_world.mp4, a 10 s globe animation).
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.scenes import detect_scenes, learned
from heaters_dagster.media.scenes.stream import score_frames
from heaters_dagster.media.synthetic import make_video


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True,
                   capture_output=True)


def _globe() -> Path:
    import dagster_webserver

    p = Path(dagster_webserver.__file__).resolve().parent / "webapp" / "build" / "Dagster_world.mp4"
    if not p.is_file():
        pytest.skip("dagster-webserver ships no Dagster_world.mp4 in this version")
    return p


def _transition(path: Path, a: str, b: str, kind: str, seconds: float = 2.0, dur: float = 0.6, fps: int = 25,
                size: str = "320x180") -> tuple[int, int]:
    """Two lavfi patterns joined by an xfade ``kind``; returns (first mixed frame, first clean frame)."""
    offset = seconds - dur
    _ffmpeg("-f", "lavfi", "-i", f"{a}=size={size}:rate={fps}:duration={seconds}",
            "-f", "lavfi", "-i", f"{b}=size={size}:rate={fps}:duration={seconds}",
            "-filter_complex", f"[0:v][1:v]xfade=transition={kind}:duration={dur}:offset={offset},format=yuv420p",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-r", str(fps), str(path))
    return int(round(offset * fps)), int(round((offset + dur) * fps))


def _inside(cuts: tuple[int, ...], lo: int, hi: int) -> list[int]:
    return [c for c in cuts if lo - 1 <= c <= hi + 1]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hybrid")


def test_cut_between_two_pieces_of_one_real_shot(media: Path) -> None:
    # two stretches of the same rotating globe (same palette, same layout): a cut between two
    # shots of one film that look alike
    path = media / "globe.mp4"
    _ffmpeg("-i", str(_globe()), "-filter_complex",
            "[0:v]trim=start_frame=0:end_frame=90,setpts=PTS-STARTPTS[a];"
            "[0:v]trim=start_frame=330:end_frame=420,setpts=PTS-STARTPTS[b];[a][b]concat=n=2:v=1[v]",
            "-map", "[v]", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-r", "60", str(path))
    det = detect_scenes(path, min_scene_s=0.0)
    assert det.detector == "hybrid" and det.frame_count == 180
    assert len(det.cut_frames) == 1 and abs(det.cut_frames[0] - 90) <= 1, det.cut_frames


@pytest.mark.parametrize("kind", ["fade", "fadeblack"])
def test_gradual_transition_gives_exactly_one_boundary(media: Path, kind: str) -> None:
    # a cross-fade and a dip to black between two patterns: one boundary, inside the transition
    path = media / f"{kind}.mp4"
    lo, hi = _transition(path, "testsrc2", "smptehdbars", kind)
    det = detect_scenes(path, min_scene_s=0.0)
    assert len(det.cut_frames) == 1 and _inside(det.cut_frames, lo, hi), (det.cut_frames, lo, hi)
    assert det.network_frames < det.frame_count  # the network saw windows, not the whole video


def test_white_flash_and_camera_shake_are_not_cuts(media: Path) -> None:
    # one moving pattern with a one-frame and a two-frame white flash and a 12-frame burst of
    # camera shake (random shift, zoom and rotation per frame), then a real cut at frame 100
    import cv2

    src = media / "base.mp4"
    make_video(src, (4.0, 2.0), fps=25, audio=False)
    raw = subprocess.run([ffmpeg_bin(), "-loglevel", "error", "-i", str(src), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:1"], check=True, capture_output=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, 180, 320, 3).copy()
    assert len(frames) == 150
    for f in (20, 60, 61):
        frames[f] = np.clip(frames[f].astype(np.int16) + 200, 0, 255).astype(np.uint8)
    rng = random.Random(3)
    for f in range(76, 88):
        m = cv2.getRotationMatrix2D((160, 90), rng.uniform(-4, 4), rng.uniform(1.05, 1.2))
        m[:, 2] += (rng.uniform(-25, 25), rng.uniform(-14, 14))
        frames[f] = cv2.warpAffine(frames[f], m, (320, 180), borderMode=cv2.BORDER_REFLECT)
    path = media / "fx.mp4"
    proc = subprocess.Popen([ffmpeg_bin(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                             "-s", "320x180", "-r", "25", "-i", "pipe:0", "-pix_fmt", "yuv420p", "-c:v", "libx264",
                             "-preset", "veryfast", "-crf", "18", str(path)], stdin=subprocess.PIPE)
    proc.communicate(frames.tobytes())
    assert proc.returncode == 0
    sc = score_frames(path)
    calm = float(np.median(sc.score[30:58]))
    assert sc.score[76] > 3 * calm and sc.score[20] > 10 * calm  # the effects are loud frame to frame
    det = detect_scenes(path, min_scene_s=0.0)
    assert len(det.cut_frames) == 1 and abs(det.cut_frames[0] - 100) <= 1, det.cut_frames


def test_transnetv2_runs_on_cpu_with_the_shipped_weights(media: Path) -> None:
    # the package's own windowing (predict_frames) and ours agree, and a hard cut is found
    import torch

    video = make_video(media / "two.mp4", (1.0, 1.0), fps=25, audio=False)  # 50 frames: one window
    frames = learned.decode_small_rgb(video.path)
    model = learned.load_transnet()
    assert next(model.parameters()).device.type == "cpu"
    ours_single, ours_many = learned.predict_all(frames)
    with torch.inference_mode():
        ref_single, ref_many = model.predict_frames(torch.from_numpy(frames.copy()), quiet=True)
    np.testing.assert_allclose(ours_single, ref_single.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_many, ref_many.numpy(), atol=1e-4)
    cuts = learned.transnet_cuts(ours_single)
    assert len(cuts) == 1 and abs(cuts[0] - 25) <= 1, cuts
    assert ours_single[22:28].max() > 0.5 and np.delete(ours_single, range(22, 28)).max() < 0.5


def test_model_loads_once_per_run_and_leaves_torch_settings_alone(media: Path) -> None:
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    video = make_video(media / "once.mp4", (1.5, 1.5), fps=25, audio=False)
    a = detect_scenes(video.path, min_scene_s=0.0)
    b = detect_scenes(video.path, min_scene_s=0.0)
    assert a.cut_frames == b.cut_frames
    assert learned.LOADS == 1
    assert learned.load_transnet() is learned.load_transnet()
    assert learned.LOADS == 1
    assert torch.are_deterministic_algorithms_enabled() == before


def test_bad_detector_name_is_a_clear_error(media: Path) -> None:
    with pytest.raises(ValueError, match="unknown scene detector"):
        detect_scenes(media / "whatever.mp4", detector="magic")
    with pytest.raises(ValueError, match="unknown hybrid parameters"):
        video = make_video(media / "p.mp4", (1.0,), fps=25, audio=False)
        detect_scenes(video.path, hybrid={"nope": 1})


def test_fast_inference_pass_equals_the_package_forward(media: Path) -> None:
    # the folded / bfloat16 pass the hybrid runs gives the package's predict_raw probabilities
    # (fp32: to rounding; bf16 where the CPU has it: within a few 1e-3), on real frames
    import torch

    from heaters_dagster.media.scenes import transnet_infer

    globe = learned.decode_small_rgb(_globe())
    video = make_video(media / "infer.mp4", (1.0, 1.0), fps=25, audio=False)
    frames = np.concatenate([globe[:40], learned.decode_small_rgb(video.path)[:40]])  # a cut at 40
    x = torch.from_numpy(np.stack([frames[:48], frames[24:72]]))
    model = learned.load_transnet()
    with torch.inference_mode():
        ref_single, ref_many = model.predict_raw(x)
        precisions = ["fp32"] + (["bf16"] if transnet_infer.bf16_supported() else [])
        for precision, tol in (("fp32", 1e-4), ("bf16", 0.03)):
            if precision not in precisions:
                continue
            single, many = transnet_infer.predict(model, learned.prepared(precision), x)
            assert single.dtype == torch.float32 and single.shape == ref_single.shape
            np.testing.assert_allclose(single.numpy(), ref_single.numpy(), atol=tol)
            np.testing.assert_allclose(many.numpy(), ref_many.numpy(), atol=tol)
    assert ref_single[0, 36:42].max() > 0.5  # the cut is there to be agreed on
    assert learned.prepared("auto") is learned.prepared(transnet_infer.resolve_precision("auto"))
    assert transnet_infer.resolve_precision("auto") == ("bf16" if transnet_infer.bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="unknown precision"):
        transnet_infer.resolve_precision("fp8")


def test_scored_windows_are_batched_only_with_equal_lengths(media: Path) -> None:
    # windows of other lengths are not padded to one another: each window's probabilities are
    # the ones it gets alone
    video = make_video(media / "wins.mp4", (1.0, 1.0, 1.0), fps=25, audio=False)
    frames = learned.decode_small_rgb(video.path)
    windows = [(10, 40), (15, 60), (30, 54), (0, 24)]
    together = learned.score_windows(frames, windows, batch=4)
    for w, (single, many) in zip(windows, together):
        alone_single, alone_many = learned.score_windows(frames, [w], batch=1)[0]
        assert single.shape == (w[1] - w[0],)
        np.testing.assert_allclose(single, alone_single, atol=1e-2)


def test_early_scoring_during_the_decode_changes_nothing(media: Path, tmp_path: Path) -> None:
    # the globe with a cross-fade to another stretch of itself early on (so its span settles
    # while the decode goes on): the network's spans scored while ffmpeg decodes give the same
    # boundaries as scoring them all afterwards
    from heaters_dagster.media.scenes import hybrid
    from heaters_dagster.media.scenes.stream import DEFAULT_PERSIST_RATIO

    path = media / "early.mp4"
    _ffmpeg("-i", str(_globe()), "-filter_complex",
            "[0:v]trim=start_frame=0:end_frame=120,setpts=PTS-STARTPTS[a];"
            "[0:v]trim=start_frame=300:end_frame=600,setpts=PTS-STARTPTS[b];"
            "[a][b]xfade=transition=fade:duration=0.25:offset=1.75,format=yuv420p[v]",
            "-map", "[v]", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-r", "60", str(path))
    det = detect_scenes(path, min_scene_s=0.0)
    assert det.prescored >= 1  # something really was scored early
    kwargs = dict(threshold=3.0, min_score=0.08, window_median=4, persist_ratio=DEFAULT_PERSIST_RATIO,
                  **hybrid.DEFAULTS)
    sc = score_frames(path, far_gaps=(int(hybrid.DEFAULTS["far_gap"]),), rgb_path=tmp_path / "rgb")
    late = hybrid.decide(sc, **kwargs)
    assert late.prescored == 0
    assert det.cut_frames == late.cuts and det.network_frames == late.network_frames
    assert [c for c in det.cut_frames if 100 <= c <= 125], det.cut_frames  # the cross-fade (frames 105-120)
