"""Representative still frames of a clip (for CLIP embeddings and the review UI).

A strategy is a list of ``(tag, position)`` pairs; position is a fraction of the clip. Each frame
is fetched with its own short ffmpeg run that seeks (input ``-ss``) to just before it, so only
the stretch from the preceding keyframe is decoded, never the whole clip.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image

from heaters_dagster.errors import FFmpegError, InvalidMediaError, PermanentError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.probe import probe, raise_media_error, temp_path_for

STRATEGIES: dict[str, tuple[tuple[str, float], ...]] = {
    "midpoint": (("mid", 0.5),),
    "multi": (("25pct", 0.25), ("50pct", 0.5), ("75pct", 0.75)),
}

# Seek this many frames before the wanted one; ffmpeg's accurate seek then drops everything
# earlier than the seek point, so the first frame out is the wanted one (see clips.py).
_SEEK_MARGIN_FRAMES = Fraction(1, 4)
_PREFIX = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Keyframe:
    tag: str
    frame_index: int  # clip-relative
    time_s: float
    width: int
    height: int
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class KeyframeResult:
    strategy: str
    keyframes: tuple[Keyframe, ...]


def keyframe_indices(frame_count: int, strategy: str) -> list[tuple[str, int]]:
    """``(tag, clip-relative frame index)`` for each keyframe of ``strategy``."""
    if strategy not in STRATEGIES:
        raise PermanentError(f"unknown keyframe strategy {strategy!r}; use one of {sorted(STRATEGIES)}")
    if frame_count <= 0:
        raise PermanentError(f"cannot pick keyframes from a clip with {frame_count} frames")
    return [
        # Fraction(str(pct)) keeps e.g. 0.3 * 10 from flooring to 2.
        (tag, min(frame_count - 1, math.floor(frame_count * Fraction(str(pct)))))
        for tag, pct in STRATEGIES[strategy]
    ]


def _read_frame(
    clip: Path, index: int, rate: Fraction, video_start_s: float, timeout: float | None
) -> Image.Image:
    """Decode frame ``index`` (seeking to just before it) and return it as an RGB image."""
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error"]
    if index > 0:
        seek = video_start_s + (index - _SEEK_MARGIN_FRAMES) / rate
        args += ["-ss", f"{float(seek):.6f}"]
    args += ["-i", str(clip), "-map", "0:V:0", "-frames:v", "1", "-f", "image2pipe", "-c:v", "ppm", "pipe:1"]
    try:
        proc = run(args, what=f"keyframe {index} of {clip.name}", timeout=timeout)
    except FFmpegError as exc:
        raise_media_error(exc, f"reading frame {index} of {clip.name} failed")
    if not proc.stdout:
        raise InvalidMediaError(f"{clip.name} has no frame {index} (is the frame count right?)")
    img = Image.open(io.BytesIO(proc.stdout))
    img.load()
    return img.convert("RGB")


def extract_keyframes(
    clip_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    strategy: str = "multi",
    fps: float,
    frame_count: int,
    jpeg_quality: int = 90,
    name_prefix: str = "keyframe_",
    timeout: float | None = None,
) -> KeyframeResult:
    """Save the strategy's frames of ``clip_path`` as ``out_dir/<name_prefix><tag>.jpg``."""
    clip, out = Path(clip_path), Path(out_dir)
    picks = keyframe_indices(frame_count, strategy)
    if not _PREFIX.match(name_prefix):
        raise PermanentError(f"name_prefix must be a plain file-name fragment, got {name_prefix!r}")
    info = probe(clip)
    rate = Fraction(info.fps_fraction)
    if fps <= 0 or abs(fps - float(rate)) > 1e-3 * float(rate):
        rate = Fraction(fps).limit_denominator(1_000_000) if fps > 0 else rate
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    keyframes = []
    try:
        for tag, index in picks:
            img = _read_frame(clip, index, rate, info.video_start_s, timeout)
            path = out / f"{name_prefix}{tag}.jpg"
            tmp = temp_path_for(path)
            try:
                img.save(tmp, format="JPEG", quality=jpeg_quality)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(path)
            keyframes.append(Keyframe(
                tag=tag, frame_index=index, time_s=float(index / rate), width=img.width,
                height=img.height, path=path, size_bytes=path.stat().st_size,
            ))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return KeyframeResult(strategy=strategy, keyframes=tuple(keyframes))
