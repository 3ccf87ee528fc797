"""Frame-exact clip cutting, checked by decoding every frame's drawn index and the audio's beeps."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from heaters_dagster.errors import FFmpegError, InvalidMediaError, PermanentError
from heaters_dagster.media import clips as clips_mod
from heaters_dagster.media.clips import ClipFile, cut_clips, cut_range
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, ffprobe_bin
from heaters_dagster.media.synthetic import SyntheticVideo, make_video, read_frame_numbers
from heaters_dagster_tests.media.spies import spy_ffmpeg

FPS = 24
BEEP_EVERY = 12  # frames between audio beeps in the source


def frame_numbers(path: Path) -> list[int]:
    return read_frame_numbers(path)


def streams(path: Path) -> dict[str, dict]:
    proc = subprocess.run(
        [ffprobe_bin(), "-v", "error", "-show_entries",
         "stream=codec_type,codec_name,pix_fmt,start_time,duration", "-of", "json", str(path)],
        check=True, capture_output=True, text=True)
    return {s["codec_type"]: s for s in json.loads(proc.stdout)["streams"]}


def beep_onsets(path: Path) -> list[float]:
    """Times (s) where a beep starts in the file's first audio stream."""
    raw = subprocess.run(
        [ffmpeg_bin(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", "48000",
         "-f", "f32le", "-"], check=True, capture_output=True).stdout
    loud = np.abs(np.frombuffer(raw, np.float32)) > 0.3
    starts = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    if loud.size and loud[0]:
        starts = np.r_[0, starts]
    onsets: list[int] = []
    for s in starts:
        if not onsets or s - onsets[-1] > 4800:  # beeps are 10 ms long and 0.5 s apart
            onsets.append(int(s))
    return [s / 48000 for s in onsets]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVideo:
    """Numbered frames; audio with a 10 ms beep at every 12th frame's start time."""
    d = tmp_path_factory.mktemp("clip_src")
    v = make_video(d / "silent.mp4", (1.0, 1.5, 1.0, 1.5), audio=False, number_frames=True)
    src = d / "source.mp4"
    beep = f"if(lt(mod(t\\,{BEEP_EVERY / FPS})\\,0.01)\\,0.8*sin(2*PI*1000*t)\\,0)"
    subprocess.run(
        [ffmpeg_bin(), "-v", "error", "-y", "-i", str(v.path), "-f", "lavfi",
         "-i", f"aevalsrc={beep}:s=48000:d={v.duration_s}", "-map", "0:v", "-map", "1:a",
         "-c:v", "copy", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", str(src)],
        check=True)
    return SyntheticVideo(path=src, fps=FPS, width=320, height=180, scene_frames=v.scene_frames)


@pytest.fixture(scope="module")
def silent_source(source: SyntheticVideo) -> Path:
    return source.path.with_name("silent.mp4")


def assert_clip(clip: ClipFile, start: int, end: int) -> None:
    assert (clip.start_frame, clip.end_frame, clip.frame_count) == (start, end, end - start)
    assert clip.start_s == pytest.approx(start / FPS) and clip.end_s == pytest.approx(end / FPS)
    assert clip.size_bytes == clip.path.stat().st_size > 0
    assert frame_numbers(clip.path) == list(range(start, end)), f"wrong frames in {clip.path.name}"


def assert_av_clip(clip: ClipFile, start: int, end: int) -> None:
    """assert_clip, plus H.264/AAC from t=0, audio of exactly the span, faststart, beeps in place."""
    assert_clip(clip, start, end)
    s = streams(clip.path)
    assert s["video"]["codec_name"] == "h264" and s["video"]["pix_fmt"] == "yuv420p"
    assert s["audio"]["codec_name"] == "aac"
    assert float(s["video"]["start_time"]) == pytest.approx(0, abs=1e-3)
    assert float(s["audio"]["duration"]) == pytest.approx((end - start) / FPS, abs=0.005)
    head = clip.path.read_bytes()
    assert 0 < head.find(b"moov") < head.find(b"mdat")  # +faststart
    # Beeps sit at every 12th source frame; in the clip they must appear exactly there.
    first = math.ceil(start / BEEP_EVERY) * BEEP_EVERY
    expected = [(f - start) / FPS for f in range(first, end, BEEP_EVERY)]
    assert beep_onsets(clip.path) == pytest.approx(expected, abs=0.002), clip.path.name


# Contiguous scenes, a dropped short scene (gap 60..62), a big gap, an overlap, single frames at
# both ends of the source, and spans given out of order.
SPANS = [(10, 24), (24, 60), (62, 84), (84, 120), (100, 110), (0, 1), (119, 120), (40, 41)]


def test_cut_clips_frame_exact_with_audio_in_sync(source: SyntheticVideo, tmp_path: Path) -> None:
    out = tmp_path / "clips"
    res = cut_clips(source.path, SPANS, out, fps=FPS)
    assert res.source_path == source.path
    assert [(c.start_frame, c.end_frame) for c in res.clips] == SPANS  # caller's order
    assert [c.path.name for c in res.clips] == [f"clip_{i:05d}.mp4" for i in range(len(SPANS))]
    assert sorted(p.name for p in out.iterdir()) == sorted(c.path.name for c in res.clips)
    for clip, (start, end) in zip(res.clips, SPANS):
        assert_av_clip(clip, start, end)


def test_cut_clips_without_audio(silent_source: Path, tmp_path: Path) -> None:
    spans = [(0, 24), (24, 30), (50, 70)]
    res = cut_clips(silent_source, spans, tmp_path, fps=FPS, names=["a", "b.mp4", "c"])
    assert [c.path.name for c in res.clips] == ["a.mp4", "b.mp4", "c.mp4"]
    for clip, (start, end) in zip(res.clips, spans):
        assert_clip(clip, start, end)
        assert "audio" not in streams(clip.path)
        head = clip.path.read_bytes()
        assert 0 < head.find(b"moov") < head.find(b"mdat")


def test_cut_range_writes_one_exact_clip(source: SyntheticVideo, tmp_path: Path) -> None:
    dst = tmp_path / "deep" / "one.mp4"
    clip = cut_range(source.path, 37, 71, dst, fps=FPS)
    assert clip.path == dst
    assert_clip(clip, 37, 71)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["one.mp4"]


def test_contiguous_spans_decode_the_source_once(
    source: SyntheticVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_ffmpeg(monkeypatch, clips_mod)
    spans = [(0, 20), (20, 45), (47, 80), (80, 120)]  # one 2-frame gap: still one pass
    cut_clips(source.path, spans, tmp_path / "a", fps=FPS, video="encode")
    encodes = [a for a in calls if "libx264" in a]
    assert len(encodes) == 1
    assert encodes[0].count("-i") == 1 and "-ss" not in encodes[0]  # starts at frame 0: no seek
    mux = [a for a in calls if "libx264" not in a]
    assert len(mux) == 1 and mux[0].count("-i") == 2 * len(spans)  # all clips share one mux run

    calls.clear()
    far = [(5, 10), (110, 115)]  # > max_gap_s apart: two seeking passes instead of encoding the gap
    res = cut_clips(source.path, far, tmp_path / "b", fps=FPS, video="encode")
    encodes = [a for a in calls if "libx264" in a]
    assert len(encodes) == 2
    assert all(a.index("-ss") < a.index("-i") for a in encodes)  # input seeking
    for clip, (start, end) in zip(res.clips, far):
        assert_clip(clip, start, end)

    calls.clear()
    overlapping = [(0, 30), (30, 60), (10, 20), (60, 90)]  # (10, 20) needs its own pass; the rest share one
    res = cut_clips(source.path, overlapping, tmp_path / "c", fps=FPS, video="encode")
    assert len([a for a in calls if "libx264" in a]) == 2
    for clip, (start, end) in zip(res.clips, overlapping):
        assert_clip(clip, start, end)


@pytest.mark.parametrize(
    "spans,kwargs,words",
    [
        ([(10, 5)], {}, "start < end"),
        ([(-1, 5)], {}, "start < end"),
        ([(100, 121)], {}, "ends after the source's last frame"),
        ([(0, 5)], {"fps": 25}, "does not match"),
        ([(0, 5.5)], {}, "integer"),
        ([(0, 5), (5, 9)], {"names": ["a"]}, "names"),
        ([(0, 5), (5, 9)], {"names": ["a", "a.mp4"]}, "same file"),
        ([(0, 5)], {"names": ["../evil"]}, "plain file name"),
    ],
)
def test_bad_requests_are_refused_before_writing(
    source: SyntheticVideo, tmp_path: Path, spans: list, kwargs: dict, words: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(PermanentError) as err:
        cut_clips(source.path, spans, out, **({"fps": FPS} | kwargs))
    assert words in str(err.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_failure_leaves_no_partial_outputs(
    source: SyntheticVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    real_run = clips_mod.run
    seen: list[int] = []

    def flaky(args, **kw):  # type: ignore[no-untyped-def]
        seen.append(1)
        if len(seen) == 2:  # let the video pass succeed, then fail the audio mux
            raise FFmpegError("boom", stderr="Invalid data found when processing input", permanent=True)
        return real_run(args, **kw)

    monkeypatch.setattr(clips_mod, "run", flaky)
    with pytest.raises(InvalidMediaError, match="Invalid data found"):
        cut_clips(source.path, [(0, 10), (10, 20)], out, fps=FPS, video="encode")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # no clips, no temp folder


def test_killed_ffmpeg_stays_transient(
    source: SyntheticVideo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(args, **kw):  # type: ignore[no-untyped-def]
        raise FFmpegError("killed", stderr="", permanent=False)

    monkeypatch.setattr(clips_mod, "run", killed)
    with pytest.raises(FFmpegError) as err:
        cut_clips(source.path, [(0, 10)], tmp_path, fps=FPS)
    assert err.value.permanent is False
    assert list(tmp_path.iterdir()) == []


def test_hundreds_of_boundaries_in_one_pass(
    silent_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_ffmpeg(monkeypatch, clips_mod)
    spans = [(i, i + 1) for i in range(120)]  # 119 cuts: more than ffmpeg's 100-term expressions allow
    res = cut_clips(silent_source, spans, tmp_path, fps=FPS, video="encode")
    assert len(calls) == 1
    assert [frame_numbers(c.path) for c in res.clips] == [[i] for i in range(120)]


# -- stream copy at keyframes --------------------------------------------------------------------
KEYS = (24, 60, 84)  # keyframes forced into `keyed` (and frame 0)


@pytest.fixture(scope="module")
def keyed(source: SyntheticVideo) -> Path:
    """`source` re-encoded with IDR frames at KEYS only (no scene-cut or interval keyframes)."""
    out = source.path.with_name("keyed.mp4")
    times = ",".join(f"{(k - 0.25) / FPS:.6f}" for k in KEYS)
    subprocess.run(
        [ffmpeg_bin(), "-v", "error", "-y", "-i", str(source.path), "-map", "0:v", "-map", "0:a", "-c:v", "libx264",
         "-preset", "veryfast", "-crf", "18", "-x264-params", "scenecut=0:keyint=1000", "-force_key_frames", times,
         "-c:a", "copy", "-movflags", "+faststart", str(out)], check=True)
    return out


def test_keyframe_frames_reads_the_packets(keyed: Path) -> None:
    assert clips_mod.keyframe_frames(keyed) == {0, *KEYS}


def test_spans_between_keyframes_are_copied_frame_exact_with_audio(
    keyed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_ffmpeg(monkeypatch, clips_mod)
    spans = [(0, 24), (24, 60), (84, 120), (60, 84), (30, 50)]  # the last is not on keyframes
    res = cut_clips(keyed, spans, tmp_path, fps=FPS)
    assert res.copied == 4
    encodes = [a for a in calls if "libx264" in a]
    assert len(encodes) == 1 and "-frames:v" in encodes[0] and encodes[0][encodes[0].index("-frames:v") + 1] == "20"
    copies = [a for a in calls if "copy" in a and "libx264" not in a and "-bsf:v" in a]
    assert len(copies) == 1 and copies[0].count("-i") == 4  # the copied clips share one process
    for clip, (start, end) in zip(res.clips, spans):
        assert_av_clip(clip, start, end)


def test_copy_without_audio_and_encode_on_request(keyed: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent_keyed.mp4"
    subprocess.run([ffmpeg_bin(), "-v", "error", "-y", "-i", str(keyed), "-map", "0:v", "-c", "copy", str(silent)],
                   check=True)
    spans = [(24, 60), (60, 84)]
    res = cut_clips(silent, spans, tmp_path / "a", fps=FPS)
    assert res.copied == 2
    for clip, (start, end) in zip(res.clips, spans):
        assert_clip(clip, start, end)
        assert "audio" not in streams(clip.path)
    forced = cut_clips(silent, spans, tmp_path / "b", fps=FPS, video="encode")
    assert forced.copied == 0
    for clip, (start, end) in zip(forced.clips, spans):
        assert_clip(clip, start, end)


def test_open_gop_keyframes_are_not_cut_points(source: SyntheticVideo, tmp_path: Path) -> None:
    """An open-GOP I-frame is flagged as a keyframe, but the B-frames after it are shown before it:
    copying from it would start the clip with frames of the previous scene. Only clean keyframes
    (IDR, closed GOP) count, and a span starting elsewhere is encoded, frame-exact."""
    open_gop = tmp_path / "open_gop.mp4"
    subprocess.run(
        [ffmpeg_bin(), "-v", "error", "-y", "-i", str(source.path), "-map", "0:v", "-c:v", "libx264", "-preset",
         "veryfast", "-x264-params", "open-gop=1:scenecut=0:keyint=24:min-keyint=24:bframes=3", str(open_gop)],
        check=True)
    flagged = subprocess.run(
        [ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=flags", "-of", "csv=p=0",
         str(open_gop)], check=True, capture_output=True, text=True).stdout.count("K")
    clean = clips_mod.keyframe_frames(open_gop)
    assert flagged > len(clean) and 0 in clean  # some flagged keyframes are open-GOP points
    spans = [(24, 48), (48, 72)]
    res = cut_clips(open_gop, spans, tmp_path / "out", fps=FPS)
    assert res.copied == sum(1 for a, b in spans if a in clean and b in clean)
    for clip, (start, end) in zip(res.clips, spans):
        assert_clip(clip, start, end)
