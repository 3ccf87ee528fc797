"""Representative still frames of a clip (for CLIP embeddings and the review UI).

A strategy is a list of ``(tag, position)`` pairs; position is a fraction of the clip. The frames
are read in whichever way decodes fewer frames, counted from the clip's keyframes (its packets'
flags): either one ffmpeg run from the start up to the last wanted frame that keeps the wanted
ones (the ``select`` filter on the decoded frame number), or one short run per frame that seeks
(input ``-ss``) to just before it and decodes from the keyframe preceding it. A short clip cut by
stream copy has one keyframe, at its start: three seeks would decode 1.5 clips' worth of frames,
one pass 0.75. A long clip with regular keyframes is cheaper to seek in.
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
from heaters_dagster.media.probe import keyframe_frames, probe, raise_media_error, temp_path_for

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


def one_pass_is_cheaper(indices: list[int], keyframes: frozenset[int]) -> bool:
    """Whether decoding from the start to the last of ``indices`` decodes no more frames than
    seeking to each (from the keyframe at or before it). No keyframes known: seek."""
    if not keyframes or not indices:
        return False
    seek_cost = sum(i - max((k for k in keyframes if k <= i), default=0) + 1 for i in indices)
    return max(indices) + 1 <= seek_cost


def _ppm_images(data: bytes, name: str) -> list[Image.Image]:
    """Split a stream of binary PPM images (``P6 <w> <h> <maxval>`` + RGB bytes) into images."""
    images, pos = [], 0
    while pos < len(data):
        fields: list[bytes] = []
        while len(fields) < 4:  # magic, width, height, maxval separated by whitespace
            while pos < len(data) and data[pos:pos + 1].isspace():
                pos += 1
            end = pos
            while end < len(data) and not data[end:end + 1].isspace():
                end += 1
            fields.append(data[pos:end])
            pos = end
        if fields[0] != b"P6" or not all(f.isdigit() for f in fields[1:]) or fields[3] != b"255":
            raise InvalidMediaError(f"keyframes of {name}: ffmpeg wrote an unexpected image stream")
        w, h = int(fields[1]), int(fields[2])
        pos += 1  # the single whitespace byte before the pixels
        size = w * h * 3
        if pos + size > len(data):
            raise InvalidMediaError(f"keyframes of {name}: the image stream ended early")
        images.append(Image.frombytes("RGB", (w, h), data[pos:pos + size]))
        pos += size
    return images


def _read_frames(clip: Path, indices: list[int], timeout: float | None) -> dict[int, Image.Image]:
    """Decode the clip once, up to its last wanted frame, and return the frames ``indices``."""
    wanted = sorted(set(indices))
    # n is the decoded frame's number from 0 in display order: the clip-relative frame index
    select = "+".join(f"eq(n\\,{i})" for i in wanted)
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-i", str(clip), "-map", "0:V:0",
            "-an", "-sn", "-dn", "-vf", f"select={select}", "-fps_mode", "passthrough",
            "-frames:v", str(len(wanted)), "-f", "image2pipe", "-c:v", "ppm", "pipe:1"]
    try:
        proc = run(args, what=f"keyframes {wanted} of {clip.name}", timeout=timeout)
    except FFmpegError as exc:
        raise_media_error(exc, f"reading frames {wanted} of {clip.name} failed")
    images = _ppm_images(proc.stdout or b"", clip.name)
    if len(images) != len(wanted):
        missing = wanted[len(images):]
        raise InvalidMediaError(f"{clip.name} has no frame {missing[0]} (is the frame count right?)")
    return dict(zip(wanted, images))


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
    indices = [index for _, index in picks]
    if len(indices) > 1 and one_pass_is_cheaper(indices, keyframe_frames(clip, timeout)):
        frames = _read_frames(clip, indices, timeout)
    else:
        frames = {i: _read_frame(clip, i, rate, info.video_start_s, timeout) for i in dict.fromkeys(indices)}
    try:
        for tag, index in picks:
            img = frames[index]
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
