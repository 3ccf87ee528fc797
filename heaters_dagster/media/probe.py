"""Probing media files with ffprobe, with errors a person can act on.

:func:`probe` answers "is this a usable video and what is it?" cheaply (it reads headers only,
plus a scan of the top-level MP4 boxes to notice files whose tail was cut off).
:func:`check_decodable` goes further and decodes the streams, for callers that need certainty.
Every problem with the input raises :class:`~heaters_dagster.errors.InvalidMediaError`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

from heaters_dagster.errors import FFmpegError, InvalidMediaError, TransientError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, ffprobe_bin, run

PROBE_TIMEOUT_S = 120.0

# ffprobe format names of ISO BMFF (MP4/MOV) files, and the boxes such files start with.
_MP4_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2")
_MP4_FIRST_BOXES = (b"ftyp", b"mdat", b"moov", b"free", b"skip", b"wide", b"pdin", b"styp")


@dataclass(frozen=True)
class ProbeResult:
    path: str
    duration_s: float
    fps: float
    fps_fraction: str  # the rate as ffprobe's rational, e.g. "24/1" or "30000/1001"
    width: int  # displayed size (rotation applied)
    height: int
    video_codec: str
    has_audio: bool
    frame_count: int | None  # from the container (nb_frames); None when it does not say
    size_bytes: int
    # Start of the video stream relative to the container's start (seek offsets need it).
    video_start_s: float = 0.0


def _rate(text: Any) -> Fraction | None:
    """Parse an ffprobe rational ("24/1", "0/0") into a positive Fraction, or None."""
    try:
        num, _, den = str(text).partition("/")
        value = Fraction(int(num), int(den or 1))
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _float(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN -> None


_LOG_PREFIX = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*")


def error_tail(text: str, lines: int = 3) -> str:
    """The last lines of ffmpeg's stderr on one line, without "[demuxer @ 0x...]" prefixes."""
    kept = [_LOG_PREFIX.sub("", ln.strip()) for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(kept[-lines:])


def temp_path_for(dst: Path) -> Path:
    """A hidden, unique sibling of ``dst`` (same folder, so ``os.replace`` onto it is atomic)."""
    return dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.tmp")


def raise_media_error(exc: FFmpegError, message: str, hint: str = "") -> NoReturn:
    """Re-raise an ffmpeg failure on an input: InvalidMediaError unless the environment is at fault.

    A killed or timed-out ffmpeg stays an FFmpegError (transient); a full disk is transient too.
    """
    if not exc.permanent:
        raise exc
    if "No space left on device" in exc.stderr:
        raise TransientError(f"{message}: no space left on device") from exc
    suffix = f"; {hint}" if hint else ""
    raise InvalidMediaError(f"{message} ({error_tail(exc.stderr) or exc}){suffix}") from exc


def _mp4_truncation(path: Path, size: int) -> int | None:
    """Walk the top-level MP4 boxes; return the byte count the file should have if it is cut short.

    A file whose download or copy was interrupted still has a valid header when it was written
    "faststart" (index first), so ffprobe accepts it; the last box then claims more bytes than exist.
    """
    offset = 0
    with open(path, "rb") as fh:
        while offset + 8 <= size:
            fh.seek(offset)
            header = fh.read(16)
            box_size, box_type = struct.unpack(">I4s", header[:8])
            if box_size == 1:  # 64-bit size follows the type
                if len(header) < 16:
                    return offset + 16
                box_size = struct.unpack(">Q", header[8:16])[0]
            elif box_size == 0:  # box extends to the end of the file
                return None
            if box_size < 8 or not box_type.isascii():
                return None  # not a box structure we understand: leave it to ffmpeg
            offset += box_size
    return offset if offset > size else None


def _looks_like_mp4(path: Path) -> bool:
    """True if the file starts like an MP4/MOV (its first box is one those files begin with)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and head[4:8] in _MP4_FIRST_BOXES


# Single-picture codecs: a file made only of one of these is a still image, not a video.
_IMAGE_CODECS = frozenset({"png", "mjpeg", "jpeg2000", "webp", "gif", "bmp", "tiff", "ppm", "pgm", "pam",
                           "qoi", "jpegxl", "svg", "exr", "dpx", "sgi", "targa", "xbm", "xwd", "pcx"})


def _is_still_image(format_name: str, video: dict[str, Any]) -> bool:
    names = format_name.split(",")
    if any(n.endswith("_pipe") or n in ("image2", "gif", "apng", "webp") for n in names):
        # an animated GIF/APNG/WebP has many frames: only a single picture counts as an image
        frames = str(video.get("nb_frames") or "")
        return not (frames.isdigit() and int(frames) > 1) and str(video.get("codec_name")) in _IMAGE_CODECS
    return False


def _measured_duration(p: Path, rate: Fraction) -> float | None:
    try:
        proc = run([ffprobe_bin(), "-hide_banner", "-v", "error", "-select_streams", "V:0", "-count_packets",
                    "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(p)],
                   what=f"count frames of {p.name}", timeout=PROBE_TIMEOUT_S)
    except FFmpegError as exc:
        if not exc.permanent:
            raise
        return None
    text = proc.stdout.decode("utf-8", "replace").strip().split(",")[0].strip()
    return int(text) / float(rate) if text.isdigit() and int(text) > 0 else None


def probe(path: str | os.PathLike[str]) -> ProbeResult:
    """Describe the video at ``path``; raise InvalidMediaError if it is not a usable video."""
    p = Path(path)
    if not p.exists():
        raise InvalidMediaError(f"file not found: {p}")
    if p.is_dir():
        raise InvalidMediaError(f"not a file but a directory: {p}")
    size = p.stat().st_size
    if size == 0:
        raise InvalidMediaError(f"file is empty (0 bytes): {p}")

    try:
        proc = run(
            [ffprobe_bin(), "-hide_banner", "-v", "error", "-print_format", "json",
             "-show_format", "-show_streams", str(p)],
            what=f"probe {p.name}",
            timeout=PROBE_TIMEOUT_S,
        )
    except FFmpegError as exc:
        if not exc.permanent:
            raise
        if "moov atom not found" in exc.stderr and _looks_like_mp4(p):
            raise InvalidMediaError(
                f"file is truncated or incomplete: {p.name} has no MP4 index (moov atom not found); "
                "the download or export was probably interrupted - fetch or export it again"
            ) from exc
        raise InvalidMediaError(
            f"not a video file: ffprobe could not read it ({error_tail(exc.stderr) or 'no details'}): {p}"
        ) from exc

    try:
        info = json.loads(proc.stdout.decode("utf-8", "replace") or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidMediaError(f"not a video file: ffprobe gave no usable description: {p}") from exc
    fmt: dict[str, Any] = info.get("format") or {}
    streams: list[dict[str, Any]] = info.get("streams") or []
    if not fmt and not streams:
        raise InvalidMediaError(f"not a video file: ffprobe could not read it (no streams found): {p}")

    # Cover art in audio files shows up as a one-frame "video" stream: it does not count.
    videos = [
        s for s in streams
        if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    if not videos:
        if has_audio:
            raise InvalidMediaError(f"no video stream (audio only): {p}")
        raise InvalidMediaError(f"no video stream: {p}")
    video = videos[0]

    r_rate, avg_rate = _rate(video.get("r_frame_rate")), _rate(video.get("avg_frame_rate"))
    # r_frame_rate is the stream's nominal rate; variable-rate phone footage sometimes reports a
    # timebase-like value there (e.g. 120 for ~30 fps), so fall back to the average rate then.
    rate = r_rate
    if rate is None or rate > 1000 or (avg_rate is not None and rate > avg_rate * Fraction(3, 2)):
        rate = avg_rate or (r_rate if r_rate is not None and r_rate <= 1000 else None)
    if rate is None:
        raise InvalidMediaError(f"cannot determine the frame rate of the video stream: {p}")

    format_name = str(fmt.get("format_name") or "")
    if _is_still_image(format_name, video):
        raise InvalidMediaError(
            f"not a video: {p.name} is a still image ({video.get('codec_name') or format_name}); "
            "submit a video file"
        )

    duration = _float(fmt.get("duration"))
    if duration is None:
        duration = _float(video.get("duration"))
    if duration is None or duration <= 0:
        # No duration in the headers (a raw elementary stream, a live recording): measure it
        # by counting the video packets (a demux, no decode).
        duration = _measured_duration(p, rate)
    if duration is None or duration <= 0:
        raise InvalidMediaError(
            f"video has no duration and no frames could be counted (a still image, or a stream "
            f"without timing?): {p}"
        )

    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if width <= 0 or height <= 0:
        raise InvalidMediaError(f"video stream has no picture size (corrupt header?): {p}")
    rotation = 0.0
    for side in video.get("side_data_list") or []:
        if "rotation" in side:
            rotation = _float(side.get("rotation")) or 0.0
    rotation = rotation or (_float((video.get("tags") or {}).get("rotate")) or 0.0)
    if round(abs(rotation)) % 180 == 90:
        width, height = height, width

    if any(name in format_name.split(",") for name in _MP4_FORMATS):
        needed = _mp4_truncation(p, size)
        if needed is not None:
            raise InvalidMediaError(
                f"file is truncated: {p.name} has {size} bytes but its MP4 structure needs {needed}; "
                "the download or copy was probably interrupted - fetch or copy it again"
            )

    nb_frames = str(video.get("nb_frames") or "")
    frame_count = int(nb_frames) if nb_frames.isdigit() and int(nb_frames) > 0 else None
    v_start, f_start = _float(video.get("start_time")), _float(fmt.get("start_time"))
    video_start = (v_start - f_start) if v_start is not None and f_start is not None else 0.0

    return ProbeResult(
        path=str(p),
        duration_s=duration,
        fps=float(rate),
        fps_fraction=f"{rate.numerator}/{rate.denominator}",
        width=width,
        height=height,
        video_codec=str(video.get("codec_name") or "unknown"),
        has_audio=has_audio,
        frame_count=frame_count,
        size_bytes=size,
        video_start_s=video_start,
    )


def check_decodable(path: str | os.PathLike[str], seconds: float | None = None,
                    *, timeout: float | None = None) -> None:
    """Decode the video (and audio) of ``path``, or its first ``seconds``; raise on any decode error."""
    p = Path(path)
    info = probe(p)
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-xerror"]
    if seconds is not None:
        args += ["-t", f"{seconds:.6f}"]
    args += ["-i", str(p), "-map", "0:V:0"]
    if info.has_audio:
        args += ["-map", "0:a:0?"]
    args += ["-f", "null", "-"]
    try:
        run(args, what=f"decode {p.name}", timeout=timeout,
            duration_s=info.duration_s if seconds is None else min(seconds, info.duration_s))
    except FFmpegError as exc:
        raise_media_error(
            exc, f"video is truncated or corrupt: decoding {p.name} failed", "fetch or export it again"
        )


def keyframe_frames(src: str | os.PathLike[str], timeout: float | None = None) -> frozenset[int]:
    """Display indices of the first video stream's *clean* keyframes, from its packets' flags and
    timestamps (no decode).

    A keyframe is clean when every packet before it in decode order is displayed before it and
    every packet after it is displayed after it: copying the packets from it on gives exactly the
    frames from it on, each decodable (an IDR frame of a closed GOP, what libx264 writes). An
    open-GOP keyframe, whose following B-frames are shown before it and reference the previous
    GOP, is left out. Empty when a packet has no timestamp (nothing is then copied).
    """
    src = Path(src)
    try:
        proc = run([ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,flags",
                    "-of", "csv=p=0", str(src)], what=f"read the keyframes of {src.name}", timeout=timeout)
    except FFmpegError as exc:
        raise_media_error(exc, f"reading the keyframes of {src.name} failed")
    packets: list[tuple[int, bool]] = []  # (pts, keyframe) in decode order
    for line in (proc.stdout or b"").decode("ascii", "replace").splitlines():
        pts, _, flags = line.strip().partition(",")
        if not pts:
            continue
        try:
            packets.append((int(pts), "K" in flags))
        except ValueError:  # "N/A": no order to rely on
            return frozenset()
    order = sorted(range(len(packets)), key=lambda k: packets[k][0])
    display = [0] * len(packets)
    for shown, k in enumerate(order):
        display[k] = shown
    after_min = [len(packets)] * (len(packets) + 1)  # smallest display index from decode position k on
    for k in range(len(packets) - 1, -1, -1):
        after_min[k] = min(display[k], after_min[k + 1])
    clean, before_max = set(), -1
    for k, (_, key) in enumerate(packets):
        if key and before_max < display[k] and after_min[k + 1] > display[k]:
            clean.add(display[k])
        before_max = max(before_max, display[k])
    return frozenset(clean)
