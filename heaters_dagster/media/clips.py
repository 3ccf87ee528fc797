"""Frame-exact clip cutting from a constant-frame-rate source (the normalised video).

How it works (one video decode for many clips):

1. The requested spans are grouped into *batches*: runs of non-overlapping spans in source
   order whose gaps are short (``max_gap_s``). Each batch is one ffmpeg process.
2. The batch process seeks once (input ``-ss``, a quarter frame before the batch's first frame,
   so ffmpeg's accurate seek keeps exactly that frame) and encodes only the video of
   ``[batch start, batch end)``, forcing an IDR keyframe at every span boundary and splitting
   there with the segment muxer (``-segment_frames`` counts frames, so the split is exact; the
   segment list is checked against the expected lengths before anything is used).
   Segments covering a gap between spans are discarded.
3. When the source has audio, each video segment is then muxed (video stream-copied) with the
   source's audio for exactly ``[start/fps, end/fps)``, re-encoded to AAC. Several clips share
   one small ffmpeg process. (Letting the segment muxer split the audio too would misplace up
   to a few frames of audio at every cut, because it splits the interleaved stream at the
   keyframe's decode time, which B-frames put ahead of its display time.)

**Stream copy where the source allows it.** A span that starts on a keyframe of the source and
ends on one (or at its end) needs no encode: its packets are copied (``video="auto"``, the
default). Ingest forces keyframes at the cuts scene detection found (``normalize(keyframes=)``),
so splice copies every clip and only spans that start elsewhere (a split) are encoded. Which
frames are keyframes is read from the packets' flags (one ffprobe pass, no decode), never
assumed; an IDR keyframe in a closed-GOP H.264 stream means no frame before it is referenced
after it, so the copied packets decode to exactly the span's frames.

Everything is written into a hidden temporary folder beside the outputs and moved into place
only when every clip succeeded. ffmpeg streams, so memory stays flat whatever the source length.
"""

from __future__ import annotations

import csv
import operator
import os
import shutil
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from typing import Sequence

from heaters_dagster.errors import FFmpegError, InvalidMediaError, PermanentError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.probe import ProbeResult, keyframe_frames, probe, raise_media_error

# Gaps between spans up to this long are encoded and thrown away rather than re-seeking: encoding
# a couple of seconds costs about as much as a new process seeking and decoding from a keyframe.
MAX_GAP_S = 2.0
# Seek points and forced keyframe times sit this many frames before the frame they mean, so
# rounding to a time base (even a coarse 1/fps one) can never land them on the previous frame.
SEEK_MARGIN_FRAMES = Fraction(1, 4)
# Clips muxed with their audio per ffmpeg process (each is only a stream copy plus AAC encode).
MUX_GROUP = 16


@dataclass(frozen=True)
class ClipFile:
    path: Path
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    frame_count: int
    size_bytes: int


@dataclass(frozen=True)
class CutResult:
    clips: tuple[ClipFile, ...]
    source_path: Path
    copied: int = 0  # clips whose video was stream-copied (the rest were encoded)


@dataclass
class _Job:
    start: int
    end: int
    target: Path
    segment: Path | None = None  # video-only (or final, without audio) segment in the temp dir
    staged: Path | None = None  # finished clip in the temp dir, ready to move into place


@dataclass
class _Batch:
    start: int
    end: int
    jobs: list[_Job] = field(default_factory=list)


def _source_rate(fps: float, info: ProbeResult) -> Fraction:
    """The exact frame rate to compute times with; ``fps`` must agree with the file."""
    exact = Fraction(info.fps_fraction)
    if fps <= 0 or abs(fps - float(exact)) > 1e-3 * float(exact):
        raise PermanentError(
            f"fps={fps} does not match the source's frame rate {info.fps_fraction} "
            f"({info.path}); cut only normalised, constant-frame-rate sources"
        )
    return exact


def _validate(spans: Sequence[tuple[int, int]], info: ProbeResult, rate: Fraction) -> list[tuple[int, int]]:
    last = info.frame_count
    if last is None:  # container did not say: derive from the duration
        last = int(Fraction(info.duration_s) * rate + Fraction(1, 2))
    out = []
    for span in spans:
        try:
            start, end = (operator.index(v) for v in span)
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"a span must be two integer frame numbers, got {span!r}") from exc
        if not 0 <= start < end:
            raise PermanentError(f"invalid span [{start}, {end}): need 0 <= start < end")
        if end > last:
            raise PermanentError(
                f"span [{start}, {end}) ends after the source's last frame ({last} frames): {info.path}"
            )
        out.append((start, end))
    return out


def _plan(jobs: list[_Job], max_gap_frames: int) -> list[_Batch]:
    """Group jobs into batches of non-overlapping spans separated by at most ``max_gap_frames``.

    A span overlapping another goes to a different batch, so one stray overlap does not break
    a long run of contiguous scenes into pieces.
    """
    batches: list[_Batch] = []
    for job in sorted(jobs, key=lambda j: (j.start, j.end)):
        fits = [b for b in batches if b.end <= job.start <= b.end + max_gap_frames]
        if fits:
            cur = max(fits, key=lambda b: b.end)
            cur.jobs.append(job)
            cur.end = job.end
        else:
            batches.append(_Batch(job.start, job.end, [job]))
    return batches


def _seconds(value: Fraction | float) -> str:
    return f"{float(value):.6f}"


def _encode_batch(
    src: Path, info: ProbeResult, rate: Fraction, batch: _Batch, work: Path, tag: str, *,
    crf: int, preset: str, final: bool, timeout: float | None,
) -> None:
    """Encode the batch's video once, split at every span boundary; set each job's segment."""
    n = batch.end - batch.start
    inner = {j.start - batch.start for j in batch.jobs} | {j.end - batch.start for j in batch.jobs}
    bounds = sorted(inner | {0, n})
    cuts = bounds[1:-1]
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    if batch.start > 0:
        # Accurate seek: ffmpeg decodes from the keyframe before this point and drops every frame
        # earlier than it. A quarter-frame margin absorbs timestamp rounding, even in a 1/fps
        # time base where ffmpeg rounds the seek point to the nearest frame.
        args += ["-ss", _seconds(info.video_start_s + (batch.start - SEEK_MARGIN_FRAMES) / rate)]
    args += [
        "-i", str(src),
        "-map", "0:V:0", "-an", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
        "-vf", "setpts=PTS-STARTPTS", "-frames:v", str(n), "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
    ]
    if cuts:
        # Frame c is the first at or after (c - 1/4) / fps: the margin absorbs rounding into the
        # encoder's time base. (An expr: with eq(n,c) terms would be exact too, but ffmpeg's
        # expression parser refuses more than 100 terms.)
        times = (_seconds((c - SEEK_MARGIN_FRAMES) / rate) for c in cuts)
        args += ["-force_key_frames", ",".join(times)]
    seg_list = work / f"{tag}.csv"
    args += [
        "-avoid_negative_ts", "disabled",  # keep each segment's first frame at t=0
        "-f", "segment", "-segment_list", str(seg_list), "-segment_list_type", "csv",
        "-reset_timestamps", "1", "-segment_format", "mp4",
    ]
    args += ["-segment_frames", ",".join(map(str, cuts))] if cuts else ["-segment_time", "1000000000"]
    if final:
        args += ["-segment_format_options", "movflags=+faststart"]
    args.append(str(work / f"{tag}_%05d.mp4"))
    try:
        run(args, what=f"cut clips from {src.name}", timeout=timeout, duration_s=float(n / rate))
    except FFmpegError as exc:
        raise_media_error(exc, f"cutting clips from {src.name} failed")

    # Check ffmpeg produced every segment with the expected length before trusting the mapping.
    with open(seg_list, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    expected = list(pairwise(bounds))
    if len(rows) != len(expected):
        raise InvalidMediaError(
            f"cutting clips from {src.name}: expected {len(expected)} segments between frames "
            f"{batch.start} and {batch.end}, ffmpeg wrote {len(rows)} (source ended early or is corrupt?)"
        )
    by_start: dict[int, Path] = {}
    for (lo, hi), row in zip(expected, rows):
        got = (float(row[2]) - float(row[1])) * float(rate)
        if abs(got - (hi - lo)) > 0.5:
            raise InvalidMediaError(
                f"cutting clips from {src.name}: segment for frames [{batch.start + lo}, "
                f"{batch.start + hi}) has {got:.1f} frames (source ended early or is corrupt?)"
            )
        by_start[lo] = work / Path(row[0]).name
    for job in batch.jobs:
        job.segment = by_start.pop(job.start - batch.start)
        if final:
            job.staged = job.segment
    for gap in by_start.values():  # frames between spans: encoded only to avoid a re-seek
        gap.unlink(missing_ok=True)


def _copy_video(src: Path, info: ProbeResult, rate: Fraction, jobs: list[_Job], work: Path, tag: str, *,
                final: bool, timeout: float | None) -> None:
    """Copy each job's packets (its span starts on a keyframe) into its own segment file."""
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    for job in jobs:
        # The seek lands on the keyframe at or before this time: the span's first frame (the margin
        # absorbs rounding); a stream copy keeps every packet from that keyframe on.
        args += ["-ss", _seconds(info.video_start_s + (job.start + SEEK_MARGIN_FRAMES) / rate), "-i", str(src)]
    for k, job in enumerate(jobs):
        job.segment = work / f"{tag}_{k:05d}.mp4"
        args += [
            "-map", f"{k}:V:0", "-an", "-sn", "-dn", "-map_metadata", "-1", "-map_chapters", "-1",
            "-frames:v", str(job.end - job.start), "-c:v", "copy",
            # the span's first frame at t=0 (decode times before it stay negative, as in an encode)
            "-bsf:v", "setts=pts=PTS-STARTPTS:dts=DTS-STARTPTS", "-avoid_negative_ts", "disabled",
            "-movflags", "+faststart", "-f", "mp4", str(job.segment),
        ]
        if final:
            job.staged = job.segment
    try:
        run(args, what=f"copy clips from {src.name}", timeout=timeout)
    except FFmpegError as exc:
        raise_media_error(exc, f"copying clips from {src.name} failed")


def _mux_audio(
    src: Path, info: ProbeResult, rate: Fraction, jobs: list[_Job], *,
    audio_bitrate: str, timeout: float | None,
) -> None:
    """Combine each job's video segment with the source audio of exactly its time range."""
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    for job in jobs:
        assert job.segment is not None
        args += ["-i", str(job.segment)]
        args += [
            "-ss", _seconds(info.video_start_s + job.start / rate),
            "-t", _seconds((job.end - job.start) / rate),
            "-i", str(src),
        ]
    for k, job in enumerate(jobs):
        job.staged = job.segment.with_name(f"{job.segment.stem}.av.mp4")  # type: ignore[union-attr]
        args += [
            "-map", f"{2 * k}:v:0", "-map", f"{2 * k + 1}:a:0", "-map_metadata", "-1",
            "-c:v", "copy", "-c:a", "aac", "-b:a", audio_bitrate,
            "-movflags", "+faststart", "-f", "mp4", str(job.staged),
        ]
    try:
        run(args, what=f"add audio to clips of {src.name}", timeout=timeout,
            duration_s=float(sum((j.end - j.start) / rate for j in jobs)))
    except FFmpegError as exc:
        raise_media_error(exc, f"adding audio to clips of {src.name} failed")
    for job in jobs:  # the video-only segments are no longer needed: free the disk space now
        job.segment.unlink(missing_ok=True)  # type: ignore[union-attr]


def _cut(
    src: str | os.PathLike[str], spans: Sequence[tuple[int, int]], targets: Sequence[Path], *,
    fps: float, crf: int, preset: str, audio_bitrate: str, max_gap_s: float, timeout: float | None,
    video: str = "auto",
) -> CutResult:
    if video not in ("auto", "encode"):
        raise ValueError(f"video must be 'auto' or 'encode', got {video!r}")
    src_p = Path(src)
    info = probe(src_p)
    rate = _source_rate(fps, info)
    checked = _validate(spans, info, rate)
    if len(targets) != len(checked):
        raise PermanentError(f"{len(checked)} spans but {len(targets)} output names")
    if len({t.resolve() for t in targets}) != len(targets):
        raise PermanentError("two clips would be written to the same file")
    jobs = [_Job(s, e, t) for (s, e), t in zip(checked, targets)]
    if not jobs:
        return CutResult(clips=(), source_path=src_p)

    parents = {t.parent for t in targets}
    for parent in parents:
        parent.mkdir(parents=True, exist_ok=True)
    work = next(iter(parents)) / f".cut-{uuid.uuid4().hex[:12]}.tmp"
    work.mkdir()
    moved: list[Path] = []
    try:
        total = info.frame_count or max(j.end for j in jobs)
        keys = keyframe_frames(src_p, timeout) if video == "auto" else frozenset()
        copied = [j for j in jobs if j.start in keys and (j.end in keys or j.end >= total)]
        for g in range(0, len(copied), MUX_GROUP):
            _copy_video(src_p, info, rate, copied[g:g + MUX_GROUP], work, f"c{g:05d}",
                        final=not info.has_audio, timeout=timeout)
        encoded = [j for j in jobs if j.segment is None]
        max_gap = int(max_gap_s * float(rate))
        for i, batch in enumerate(_plan(encoded, max_gap)):
            _encode_batch(
                src_p, info, rate, batch, work, f"b{i:04d}", crf=crf, preset=preset,
                final=not info.has_audio, timeout=timeout,
            )
        if info.has_audio:
            for g in range(0, len(jobs), MUX_GROUP):
                _mux_audio(
                    src_p, info, rate, jobs[g:g + MUX_GROUP],
                    audio_bitrate=audio_bitrate, timeout=timeout,
                )
        clips = []
        for job in jobs:
            assert job.staged is not None
            os.replace(job.staged, job.target)
            moved.append(job.target)
            clips.append(ClipFile(
                path=job.target, start_frame=job.start, end_frame=job.end,
                start_s=float(job.start / rate), end_s=float(job.end / rate),
                frame_count=job.end - job.start, size_bytes=job.target.stat().st_size,
            ))
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CutResult(clips=tuple(clips), source_path=src_p, copied=len(copied))


def cut_range(
    src: str | os.PathLike[str], start_frame: int, end_frame: int, dst: str | os.PathLike[str], *,
    fps: float, crf: int = 23, preset: str = "veryfast", audio_bitrate: str = "128k",
    timeout: float | None = None, video: str = "auto",
) -> ClipFile:
    """Write frames ``[start_frame, end_frame)`` of ``src`` to ``dst`` (H.264/AAC MP4)."""
    result = _cut(
        src, [(start_frame, end_frame)], [Path(dst)], fps=fps, crf=crf, preset=preset,
        audio_bitrate=audio_bitrate, max_gap_s=0.0, timeout=timeout, video=video,
    )
    return result.clips[0]


def cut_clips(
    src: str | os.PathLike[str], spans: Sequence[tuple[int, int]], out_dir: str | os.PathLike[str], *,
    fps: float, names: Sequence[str] | None = None, crf: int = 23, preset: str = "veryfast",
    audio_bitrate: str = "128k", max_gap_s: float = MAX_GAP_S, timeout: float | None = None,
    video: str = "auto",
) -> CutResult:
    """Cut every span ``(start_frame, end_frame)`` of ``src`` into its own MP4 in ``out_dir``.

    ``names`` are plain file names (".mp4" is added when they have no suffix); by default clips
    are named ``clip_00000.mp4`` ... in span order. Results keep the order of ``spans``.
    ``video``: "auto" copies the packets of spans bounded by keyframes and encodes the others;
    "encode" encodes every span.
    """
    out = Path(out_dir)
    if names is None:
        names = [f"clip_{i:05d}.mp4" for i in range(len(spans))]
    elif len(names) != len(spans):
        raise PermanentError(f"{len(spans)} spans but {len(names)} names")
    targets = []
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise PermanentError(f"clip name must be a plain file name, got {name!r}")
        targets.append(out / (name if Path(name).suffix else f"{name}.mp4"))
    return _cut(
        src, spans, targets, fps=fps, crf=crf, preset=preset, audio_bitrate=audio_bitrate,
        max_gap_s=max_gap_s, timeout=timeout, video=video,
    )
