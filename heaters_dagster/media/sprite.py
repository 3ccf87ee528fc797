"""Sprite sheets for scrubbing a clip in the review UI: every sampled frame as a tile in one JPEG.

:func:`plan_layout` is pure arithmetic and decides the grid. Its limits:

* JPEG cannot store an image wider or taller than 65535 pixels, so both sides stay within
  ``max_side`` for any clip length (the grid is widened before anything else gives).
* ``max_pixels`` (default 64 megapixels) bounds the whole sheet. Browsers decode an image to
  RGBA, 4 bytes per pixel, before drawing any part of it, so a 64 Mpx sheet costs about 256 MB of
  memory while it is shown - acceptable on a desktop, while the 300+ Mpx sheets long clips would
  otherwise get take over a gigabyte each and fail to decode in some browsers. At the default
  480x270 tiles that is ~490 tiles: clips up to ~20 s keep the full 24 fps, longer ones are
  sampled more sparsely (a 3-minute clip gets ~2.7 fps), which is still plenty for scrubbing.

The effective frame rate is lowered only when the frames at ``min(clip fps, max_fps)`` cannot fit
within these limits in any grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image

from heaters_dagster.errors import FFmpegError, InvalidMediaError, PermanentError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.probe import probe, raise_media_error, temp_path_for

JPEG_MAX_SIDE = 65535
DEFAULT_MAX_PIXELS = 64_000_000
THUMBNAIL_WIDTH = 160
# Frame rates are turned into exact fractions with denominators up to this (30000/1001 etc.).
_RATE_DENOMINATOR = 1_000_000


@dataclass(frozen=True)
class SpriteLayout:
    cols: int
    rows: int
    tile_width: int
    tile_height: int
    frame_count: int  # frames sampled into the sheet (the last row may be partly empty)
    effective_fps: float  # sampling rate: frame i of the sheet shows the clip at i / effective_fps
    clip_duration_s: float
    clip_fps: float
    sheet_width: int
    sheet_height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fps_filter_rate(self) -> str:
        """``effective_fps`` as the exact rational ffmpeg's fps filter should use."""
        rate = _fraction(self.effective_fps)
        return f"{rate.numerator}/{rate.denominator}"


@dataclass(frozen=True)
class SpriteResult:
    path: Path
    layout: SpriteLayout
    size_bytes: int
    thumbnail_jpeg: bytes  # ~160 px wide JPEG of the middle frame (for Dagster UI markdown)


def _fraction(value: float) -> Fraction:
    return Fraction(value).limit_denominator(_RATE_DENOMINATOR)


def base_columns(duration_s: float) -> int:
    """Columns the old system used for a clip of this length (before any widening)."""
    if duration_s <= 10:
        return 5
    if duration_s <= 20:
        return 8
    if duration_s <= 30:
        return 10
    return 12


def sampled_frame_count(source_frames: Fraction, clip_rate: Fraction, rate: Fraction) -> int:
    """How many frames ffmpeg's ``fps`` filter emits for ``source_frames`` frames at ``rate``.

    The filter emits one frame per output tick up to the end of the last input frame, rounding
    the end to the nearest tick (halves away from zero).
    """
    return max(1, math.floor(source_frames * rate / clip_rate + Fraction(1, 2)))


def plan_layout(
    duration_s: float,
    clip_fps: float,
    frame_count: int | None,
    *,
    tile_width: int = 480,
    tile_height: int,
    max_fps: float = 24.0,
    max_side: int = JPEG_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> SpriteLayout:
    """Choose the grid and sampling rate for a clip's sprite sheet (see the module docstring)."""
    if clip_fps <= 0 or max_fps <= 0:
        raise PermanentError(f"frame rates must be positive (clip {clip_fps}, max {max_fps})")
    if not frame_count and duration_s <= 0:
        raise PermanentError("clip has neither a frame count nor a duration")
    if tile_width < 1 or tile_height < 1 or tile_width > max_side or tile_height > max_side:
        raise PermanentError(f"tile {tile_width}x{tile_height} does not fit a {max_side}px sheet")
    if tile_width * tile_height > max_pixels:
        raise PermanentError(f"tile {tile_width}x{tile_height} exceeds max_pixels={max_pixels}")

    clip_rate = _fraction(clip_fps)
    source_frames = Fraction(frame_count) if frame_count else Fraction(duration_s) * clip_rate
    duration = float(source_frames / clip_rate) if frame_count else duration_s
    rate = min(clip_rate, _fraction(max_fps))
    wanted = sampled_frame_count(source_frames, clip_rate, rate)
    max_cols, max_rows = max_side // tile_width, max_side // tile_height
    base = base_columns(duration)

    def grid(n: int) -> tuple[int, int] | None:
        # The old layout (base columns), widened only as far as the height limit requires.
        cols = max(1, min(base, n))
        if math.ceil(n / cols) > max_rows:
            cols = math.ceil(n / max_rows)
        rows = math.ceil(n / cols)
        if cols > max_cols or cols * rows * tile_width * tile_height > max_pixels:
            return None
        return cols, rows

    count = wanted
    layout = grid(count)
    if layout is None:
        # If n frames fit, n - 1 do too: binary-search the largest count that fits, then sample
        # at exactly the rate that yields that many frames.
        lo, hi = 1, wanted - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if grid(mid) is not None else (lo, mid - 1)
        count = lo
        rate = Fraction(count) * clip_rate / source_frames
        layout = grid(count)
        assert layout is not None and sampled_frame_count(source_frames, clip_rate, rate) == count
    cols, rows = layout
    return SpriteLayout(
        cols=cols,
        rows=rows,
        tile_width=tile_width,
        tile_height=tile_height,
        frame_count=count,
        effective_fps=float(rate),
        clip_duration_s=duration,
        clip_fps=float(clip_rate),
        sheet_width=cols * tile_width,
        sheet_height=rows * tile_height,
    )


def make_sprite(
    clip_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    tile_width: int = 480,
    max_fps: float = 24.0,
    jpeg_qscale: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail_width: int = THUMBNAIL_WIDTH,
    timeout: float | None = None,
) -> SpriteResult:
    """Render ``clip_path``'s sprite sheet to ``out_path`` (JPEG) in one ffmpeg run.

    The same run also encodes the middle frame as a small JPEG thumbnail (returned as bytes).
    """
    clip, out = Path(clip_path), Path(out_path)
    info = probe(clip)
    # Keep the aspect ratio; even heights keep the chroma planes aligned.
    tile_height = max(2, 2 * round(tile_width * info.height / info.width / 2))
    layout = plan_layout(
        info.duration_s, info.fps, info.frame_count, tile_width=tile_width,
        tile_height=tile_height, max_fps=max_fps, max_pixels=max_pixels,
    )
    frames = info.frame_count or max(1, math.floor(info.duration_s * info.fps))
    middle = frames // 2
    thumb_height = max(2, 2 * round(thumbnail_width * info.height / info.width / 2))
    graph = (
        f"[0:V:0]split=2[all][one];"
        f"[all]fps={layout.fps_filter_rate()},scale={tile_width}:{tile_height},setsar=1,"
        f"tile={layout.cols}x{layout.rows}[sheet];"
        f"[one]select='eq(n\\,{middle})',scale={thumbnail_width}:{thumb_height},setsar=1[thumb]"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    args = [
        ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-i", str(clip),
        "-filter_complex", graph,
        "-map", "[sheet]", "-frames:v", "1", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p",
        "-q:v", str(jpeg_qscale), "-f", "image2", "-update", "1", str(tmp),
        "-map", "[thumb]", "-frames:v", "1", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p",
        "-q:v", "4", "-f", "image2pipe", "pipe:1",
    ]
    try:
        try:
            proc = run(args, what=f"sprite sheet for {clip.name}", timeout=timeout, duration_s=info.duration_s)
        except FFmpegError as exc:
            raise_media_error(exc, f"making the sprite sheet of {clip.name} failed")
        thumbnail = proc.stdout
        if not thumbnail or not tmp.exists():
            raise InvalidMediaError(f"{clip.name}: ffmpeg produced no frames for the sprite sheet")
        with Image.open(tmp) as img:
            size = img.size
        if size != (layout.sheet_width, layout.sheet_height):
            raise InvalidMediaError(
                f"{clip.name}: sprite sheet came out {size[0]}x{size[1]}, "
                f"expected {layout.sheet_width}x{layout.sheet_height}"
            )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return SpriteResult(path=out, layout=layout, size_bytes=out.stat().st_size, thumbnail_jpeg=thumbnail)

