"""Normalising a source video: H.264/AAC MP4 at a constant frame rate.

Everything downstream (scene detection, frame-exact clip cutting, sprites, keyframes) counts
frames, so the normalised file must have one frame per 1/fps second with no gaps or duplicates:
ffmpeg's ``fps`` filter at the source's nominal rate guarantees that (``-fps_mode cfr`` keeps the
muxed timestamps on the grid). It is the filter scene detection's decode uses too, so a detection
run on the *source* at the same rate numbers its frames as the normalised file will.

``keyframes``: frames at which the encoder must start a new GOP (an IDR frame). Ingest passes the
cuts scene detection found on the source, so splice can cut every clip by stream copy.

Durations are *measured*, not trusted: the result describes the normalised file, i.e. what
could actually be decoded. A source whose container claims more than it holds (a header that
lies, a 60 s container with 5 s of frames) is accepted at its decoded length when ffmpeg
decoded it without a single error; it is only called truncated or corrupt when decoding failed
or ffmpeg reported demuxing/decoding errors on the way (e.g. "File ended prematurely").

Limits (``max_pixels``, ``max_duration_s``) are checked on the probe, before any transcoding,
and the duration limit again on the decoded result (``-t`` stops the encode just past it, so a
header that under-states a long file costs at most the limit's worth of encoding).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from heaters_dagster.errors import FFmpegError, InvalidMediaError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.probe import ProbeResult, error_tail, probe, raise_media_error, temp_path_for

log = logging.getLogger(__name__)

# A normalised file shorter than its source by more than this means the input ended early.
_SHORT_TOLERANCE_S = 0.5
_SHORT_TOLERANCE_FRACTION = 0.02
# -force_key_frames takes its times as one argument; Linux refuses a single argument over 128 KiB.
_MAX_KEYFRAME_ARG = 120_000


def format_duration(seconds: float) -> str:
    """``14400`` -> ``"4 h"``, ``5400`` -> ``"1 h 30 min"``, ``90.5`` -> ``"90.5 s"``."""
    if seconds < 600:
        return f"{seconds:g} s"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes = rest // 60
    parts = ([f"{hours} h"] if hours else []) + ([f"{minutes} min"] if minutes else [])
    return " ".join(parts) or "0 s"


def check_limits(info: ProbeResult, name: str, *, max_pixels: int | None = None,
                 max_duration_s: float | None = None) -> None:
    """Refuse (InvalidMediaError, permanent) a source whose picture or duration is over a limit."""
    pixels = info.width * info.height
    if max_pixels is not None and pixels > max_pixels:
        raise InvalidMediaError(
            f"{name} is too large: {info.width}x{info.height} is {pixels:,} pixels per frame, over the limit "
            f"of {max_pixels:,} (HEATERS_MAX_PIXELS; 3840x2160 = 8,294,400 by default); downscale it first")
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise InvalidMediaError(
            f"{name} is too long: {format_duration(info.duration_s)}, over the limit of "
            f"{format_duration(max_duration_s)} (HEATERS_MAX_DURATION_S); cut it into shorter parts")


def _stderr(proc: object) -> str:
    raw = getattr(proc, "stderr", None) or b""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def keyframe_times(frames: Sequence[int], rate: Fraction) -> str:
    """``-force_key_frames`` times for ``frames``: a quarter frame early, so rounding into the
    encoder's time base never lands on the frame before (the encoder forces a keyframe on the
    first frame at or after each time). "" when there are none, or too many for one argument
    (then no keyframe is forced: splice encodes the clips instead of copying them)."""
    wanted = sorted({int(f) for f in frames if int(f) > 0})
    text = ",".join(f"{float((f - Fraction(1, 4)) / rate):.6f}" for f in wanted)
    if len(text) > _MAX_KEYFRAME_ARG:
        log.warning("%d keyframes to force are too many for one ffmpeg argument; none are forced", len(wanted))
        return ""
    return text


@dataclass(frozen=True)
class NormalizeResult:
    output_path: Path
    input: ProbeResult
    output: ProbeResult
    size_bytes: int


def normalize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    crf: int = 20,
    preset: str = "fast",
    audio_bitrate: str = "192k",
    timeout: float | None = None,
    max_pixels: int | None = None,
    max_duration_s: float | None = None,
    keyframes: Sequence[int] = (),
    info: ProbeResult | None = None,
) -> NormalizeResult:
    """Re-encode ``src`` to ``dst`` (H.264 yuv420p, constant frame rate, AAC, faststart).

    ``keyframes``: frame numbers (at the source's rate) that must be keyframes in ``dst``;
    ``info``: the source's probe when the caller has one (else it is probed here).

    Raises InvalidMediaError when the source is not a usable video, is over a limit, or turns out
    to be truncated or corrupt while decoding; ``dst`` is only ever the complete result (written
    via a temp file).
    """
    src_p, dst_p = Path(src), Path(dst)
    info = probe(src_p) if info is None else info
    check_limits(info, src_p.name, max_pixels=max_pixels, max_duration_s=max_duration_s)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst_p)

    args = [
        ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y",
        "-xerror",  # stop at the first decode/demux error instead of writing a short file
        "-i", str(src_p),
        "-map", "0:V:0",
        # The constant rate first (the filter scene detection's decode uses); libx264 with 4:2:0
        # needs even dimensions.
        "-vf", f"fps={info.fps_fraction},scale=trunc(iw/2)*2:trunc(ih/2)*2",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-fps_mode", "cfr", "-r", info.fps_fraction,
    ]
    forced = keyframe_times(keyframes, Fraction(info.fps_fraction))
    if forced:
        args += ["-force_key_frames", forced]
    if info.has_audio:
        args += ["-map", "0:a:0", "-c:a", "aac", "-b:a", audio_bitrate]
    if max_duration_s is not None:
        args += ["-t", f"{max_duration_s + 1.0:.3f}"]  # stop just past the limit (checked below)
    args += ["-sn", "-dn", "-map_chapters", "-1", "-movflags", "+faststart", "-f", "mp4", str(tmp)]

    try:
        try:
            proc = run(args, what=f"normalise {src_p.name}", timeout=timeout, duration_s=info.duration_s)
        except FFmpegError as exc:
            raise_media_error(
                exc,
                f"{src_p.name} is truncated or corrupt: ffmpeg stopped at a decoding error",
                "fetch or export the source again",
            )
        out = probe(tmp)
        if max_duration_s is not None and out.duration_s > max_duration_s:
            raise InvalidMediaError(
                f"{src_p.name} is too long: it decodes to more than {format_duration(max_duration_s)}, the "
                f"limit (HEATERS_MAX_DURATION_S); cut it into shorter parts")
        tolerance = max(_SHORT_TOLERANCE_S, _SHORT_TOLERANCE_FRACTION * info.duration_s)
        if out.duration_s < info.duration_s - tolerance:
            # The container claims more than was decoded. With ffmpeg silent (-v error) the file
            # decoded cleanly and its header is what is wrong: keep the measured result. Errors
            # on the way ("File ended prematurely", broken packets) mean it really is cut short.
            errors = error_tail(_stderr(proc))
            if errors:
                raise InvalidMediaError(
                    f"{src_p.name} is truncated or corrupt: it claims {info.duration_s:.2f}s but only "
                    f"{out.duration_s:.2f}s could be decoded ({errors}); fetch or export the source again"
                )
            log.info("%s: container claims %.2fs, decoded %.2fs cleanly; using the decoded length",
                     src_p.name, info.duration_s, out.duration_s)
        os.replace(tmp, dst_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    output = replace(out, path=str(dst_p))
    return NormalizeResult(output_path=dst_p, input=info, output=output, size_bytes=output.size_bytes)
