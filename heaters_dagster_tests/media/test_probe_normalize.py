"""probe / check_decodable / normalize on generated media, including broken inputs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest

from heaters_dagster.errors import InvalidMediaError, classify
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, ffprobe_bin
from heaters_dagster.media.normalize import normalize
from heaters_dagster.media.probe import check_decodable, probe
from heaters_dagster.media.synthetic import SyntheticVideo, make_video, read_frame_numbers


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-v", "error", "-y", *args], check=True)


def frame_numbers(path: Path) -> list[int]:
    return read_frame_numbers(path)


def video_pts(path: Path) -> list[float]:
    proc = subprocess.run(
        [ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
         "-of", "json", str(path)], check=True, capture_output=True, text=True)
    return sorted(float(p["pts_time"]) for p in json.loads(proc.stdout)["packets"])


def cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture(scope="module")
def good_video(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    return make_video(tmp_path_factory.mktemp("good") / "good.mp4", (1.0, 1.0), number_frames=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, good_video: SyntheticVideo) -> dict[str, Path]:
    """Good and broken files, by name; "dir" is the folder itself."""
    d = tmp_path_factory.mktemp("probe_media")
    good = shutil.copy(good_video.path, d / "good.mp4")
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("these are my notes, not a video\n" * 20)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(d / "audio_only.mp4"))
    # Same video written without +faststart: the index (moov) is at the end and is lost.
    ffmpeg("-i", str(good), "-c", "copy", str(d / "moov_last.mp4"))
    cut_in_half(d / "moov_last.mp4", d / "trunc_no_moov.mp4")
    cut_in_half(good, d / "trunc_faststart.mp4")
    ffmpeg("-i", str(good), "-c", "copy", str(d / "good.mkv"))
    cut_in_half(d / "good.mkv", d / "trunc.mkv")
    corrupt = bytearray(good.read_bytes())
    rng = random.Random(1234)
    for frac in (0.4, 0.7):
        at = int(len(corrupt) * frac)
        corrupt[at:at + 20000] = rng.randbytes(20000)
    (d / "corrupt.mp4").write_bytes(bytes(corrupt))
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def test_probe_reports_the_streams(good_video: SyntheticVideo) -> None:
    info = probe(good_video.path)
    assert info.path == str(good_video.path)
    assert info.duration_s == pytest.approx(good_video.duration_s, abs=0.05)
    assert info.fps == 24.0 and info.fps_fraction == "24/1"
    assert (info.width, info.height) == (320, 180)
    assert info.video_codec == "h264"
    assert info.has_audio is True
    assert info.frame_count == good_video.frame_count
    assert info.size_bytes == good_video.path.stat().st_size


def test_probe_silent_video_and_ntsc_rate(tmp_path: Path) -> None:
    v = make_video(tmp_path / "silent.mp4", (0.5,), audio=False)
    ntsc = tmp_path / "ntsc.mp4"
    ffmpeg("-i", str(v.path), "-vf", "fps=30000/1001", "-c:v", "libx264", "-preset", "ultrafast", str(ntsc))
    assert probe(v.path).has_audio is False
    info = probe(ntsc)
    assert info.fps_fraction == "30000/1001"
    assert info.fps == pytest.approx(29.97, abs=0.001)


BAD_INPUTS = [
    # (file name, words the message must contain)
    ("missing.mp4", "file not found"),
    ("empty.mp4", "file is empty (0 bytes)"),
    ("notes.mp4", "not a video file: ffprobe could not read it"),
    ("audio_only.mp4", "no video stream (audio only)"),
    ("trunc_no_moov.mp4", "truncated"),
    ("trunc_faststart.mp4", "truncated"),
    ("dir", "directory"),
]


@pytest.mark.parametrize("name,words", BAD_INPUTS)
def test_probe_rejects_bad_input_with_actionable_message(
    media: dict[str, Path], name: str, words: str
) -> None:
    path = media.get(name, media["dir"] / name)
    with pytest.raises(InvalidMediaError) as err:
        probe(path)
    assert words in str(err.value)
    assert classify(err.value) == "permanent"
    if name != "dir":
        assert path.name in str(err.value)


@pytest.mark.parametrize(
    "name,words",
    BAD_INPUTS + [("trunc.mkv", "truncated or corrupt"), ("corrupt.mp4", "truncated or corrupt")],
)
def test_normalize_rejects_bad_input_and_leaves_nothing(
    media: dict[str, Path], tmp_path: Path, name: str, words: str
) -> None:
    path = media.get(name, media["dir"] / name)
    out_dir = tmp_path / "out"
    with pytest.raises(InvalidMediaError) as err:
        normalize(path, out_dir / "normalized.mp4", preset="ultrafast")
    assert words in str(err.value)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_check_decodable(media: dict[str, Path]) -> None:
    check_decodable(media["good.mp4"])
    probe(media["corrupt.mp4"])  # the headers are fine: only decoding finds the damage
    check_decodable(media["good.mkv"], seconds=0.5)
    with pytest.raises(InvalidMediaError, match="truncated or corrupt"):
        check_decodable(media["corrupt.mp4"])
    with pytest.raises(InvalidMediaError, match="truncated"):
        check_decodable(media["trunc_faststart.mp4"])


def _lie_about_duration(src: Path, dst: Path, seconds: float) -> Path:
    """Rewrite the MP4 movie header (mvhd, version 0) to claim ``seconds``; the frames stay."""
    import struct

    data = bytearray(src.read_bytes())
    at = data.find(b"mvhd") + 4
    timescale = struct.unpack_from(">I", data, at + 12)[0]
    struct.pack_into(">I", data, at + 16, int(seconds * timescale))
    dst.write_bytes(bytes(data))
    return dst


def test_normalize_measures_a_source_whose_header_claims_more_than_it_holds(
    good_video: SyntheticVideo, tmp_path: Path
) -> None:
    lying = _lie_about_duration(good_video.path, tmp_path / "lying.mp4", 60.0)
    assert probe(lying).duration_s == pytest.approx(60.0)
    res = normalize(lying, tmp_path / "n" / "normalized.mp4", preset="ultrafast")
    assert res.input.duration_s == pytest.approx(60.0)
    assert res.output.duration_s == pytest.approx(good_video.duration_s, abs=0.1)
    assert frame_numbers(res.output_path) == list(range(good_video.frame_count))


def test_truncated_mkv_still_fails_with_ffmpegs_reason(media: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidMediaError, match=r"truncated or corrupt: .*File ended prematurely.*again"):
        normalize(media["trunc.mkv"], tmp_path / "out.mp4", preset="ultrafast")


def test_normalize_refuses_sources_over_the_limits_before_transcoding(
    good_video: SyntheticVideo, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "normalized.mp4"
    with pytest.raises(InvalidMediaError, match=r"320x180 is 57,600 pixels per frame, over the limit of 50,000"):
        normalize(good_video.path, out, max_pixels=50_000)
    with pytest.raises(InvalidMediaError, match=r"too long: 2 s, over the limit of 1.5 s \(HEATERS_MAX_DURATION_S\)"):
        normalize(good_video.path, out, max_duration_s=1.5)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # a header that under-states the length: the decoded result is checked too
    short_claim = _lie_about_duration(good_video.path, tmp_path / "short_claim.mp4", 0.5)
    with pytest.raises(InvalidMediaError, match="decodes to more than 1 s"):
        normalize(short_claim, out, max_duration_s=1.0, preset="ultrafast")
    assert not out.exists()


def test_probe_refuses_still_images_and_measures_streams_without_duration(tmp_path: Path) -> None:
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(tmp_path / "still.png"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(tmp_path / "still.jpg"))
    for name in ("still.png", "still.jpg"):
        with pytest.raises(InvalidMediaError, match=f"not a video: {name} is a still image"):
            probe(tmp_path / name)
    raw = tmp_path / "raw.h264"  # an elementary stream: no container, no duration in any header
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=24", "-t", "1", "-c:v", "libx264", "-preset",
           "ultrafast", "-f", "h264", str(raw))
    assert probe(raw).duration_s == pytest.approx(1.0)


def test_normalize_keeps_every_frame_at_constant_rate(good_video: SyntheticVideo, tmp_path: Path) -> None:
    dst = tmp_path / "n" / "normalized.mp4"
    res = normalize(good_video.path, dst, preset="ultrafast")
    assert res.output_path == dst and dst.is_file()
    assert res.size_bytes == dst.stat().st_size == res.output.size_bytes
    assert res.input.path == str(good_video.path) and res.output.path == str(dst)
    assert res.output.video_codec == "h264" and res.output.has_audio
    assert res.output.fps_fraction == "24/1"
    assert frame_numbers(dst) == list(range(good_video.frame_count))
    pts = video_pts(dst)
    assert {round(b - a, 4) for a, b in pairwise(pts)} == {round(1 / 24, 4)}
    probe_out = subprocess.run(
        [ffprobe_bin(), "-v", "error", "-show_entries", "stream=codec_name,pix_fmt,bit_rate,codec_type",
         "-of", "json", str(dst)], check=True, capture_output=True, text=True)
    streams = {s["codec_type"]: s for s in json.loads(probe_out.stdout)["streams"]}
    assert streams["video"]["pix_fmt"] == "yuv420p"
    assert streams["audio"]["codec_name"] == "aac"
    # faststart: the index comes before the media data
    head = dst.read_bytes()
    assert 0 < head.find(b"moov") < head.find(b"mdat")
    assert [p.name for p in dst.parent.iterdir()] == ["normalized.mp4"]


def test_normalize_makes_variable_rate_constant(tmp_path: Path) -> None:
    v = make_video(tmp_path / "src.mp4", (1.0,), audio=False, number_frames=True)
    vfr = tmp_path / "vfr.mkv"
    # Frames 12.. are delayed by half a second: a 12-frame hole in the timeline.
    ffmpeg("-i", str(v.path), "-vf", "setpts='(N+if(gte(N,12),12,0))/24/TB'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0", str(vfr))
    src_pts = video_pts(vfr)
    assert len(src_pts) == 24 and src_pts[12] - src_pts[11] > 0.4  # really variable

    res = normalize(vfr, tmp_path / "cfr.mp4", preset="ultrafast")
    assert res.output.fps_fraction == "24/1"
    assert res.output.has_audio is False
    pts = video_pts(res.output_path)
    assert {round(b - a, 4) for a, b in pairwise(pts)} == {round(1 / 24, 4)}
    numbers = frame_numbers(res.output_path)
    # the hole is filled by repeating the last frame before it; every source frame survives
    assert len(numbers) == 36
    assert sorted(set(numbers)) == list(range(24))
    assert numbers[:12] == list(range(12)) and numbers[-12:] == list(range(12, 24))


def test_normalize_overwrites_atomically(
    good_video: SyntheticVideo, media: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / "same.mp4"
    shutil.copy(good_video.path, dst)
    before = dst.read_bytes()
    with pytest.raises(InvalidMediaError):
        normalize(media["corrupt.mp4"], dst, preset="ultrafast")
    assert dst.read_bytes() == before  # the failed run never touched the existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]
