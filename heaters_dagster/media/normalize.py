"""Normalising a source video: H.264/AAC MP4 at a constant frame rate.

Everything downstream (scene detection, frame-exact clip cutting, sprites, keyframes) counts
frames, so the normalised file must have one frame per 1/fps second with no gaps or duplicates:
ffmpeg's ``-fps_mode cfr`` at the source's nominal rate guarantees that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from heaters_dagster.errors import FFmpegError, InvalidMediaError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.probe import ProbeResult, probe, raise_media_error, temp_path_for

# A normalised file shorter than its source by more than this means the input ended early.
_SHORT_TOLERANCE_S = 0.5
_SHORT_TOLERANCE_FRACTION = 0.02


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
) -> NormalizeResult:
    """Re-encode ``src`` to ``dst`` (H.264 yuv420p, constant frame rate, AAC, faststart).

    Raises InvalidMediaError when the source is not a usable video or turns out to be truncated or
    corrupt while decoding; ``dst`` is only ever the complete result (written via a temp file).
    """
    src_p, dst_p = Path(src), Path(dst)
    info = probe(src_p)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst_p)

    args = [
        ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y",
        "-xerror",  # stop at the first decode/demux error instead of writing a short file
        "-i", str(src_p),
        "-map", "0:V:0",
        # libx264 with 4:2:0 needs even dimensions.
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2",
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-fps_mode", "cfr", "-r", info.fps_fraction,
    ]
    if info.has_audio:
        args += ["-map", "0:a:0", "-c:a", "aac", "-b:a", audio_bitrate]
    args += ["-sn", "-dn", "-map_chapters", "-1", "-movflags", "+faststart", "-f", "mp4", str(tmp)]

    try:
        try:
            run(args, what=f"normalise {src_p.name}", timeout=timeout)
        except FFmpegError as exc:
            raise_media_error(
                exc,
                f"{src_p.name} is truncated or corrupt: ffmpeg stopped at a decoding error",
                "fetch or export the source again",
            )
        out = probe(tmp)
        tolerance = max(_SHORT_TOLERANCE_S, _SHORT_TOLERANCE_FRACTION * info.duration_s)
        if out.duration_s < info.duration_s - tolerance:
            raise InvalidMediaError(
                f"{src_p.name} is truncated or corrupt: it claims {info.duration_s:.2f}s but only "
                f"{out.duration_s:.2f}s could be decoded; fetch or export the source again"
            )
        os.replace(tmp, dst_p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    output = replace(out, path=str(dst_p))
    return NormalizeResult(output_path=dst_p, input=info, output=output, size_bytes=output.size_bytes)
