"""Synthetic test media with known cut frames, made with ffmpeg's lavfi sources.

Used by the tests, the benchmarks and ``heaters demo`` (nothing binary is committed). Each scene
is a different moving lavfi pattern, so a cut is a real content change; optional one-frame white
flashes inside a scene must *not* be reported as cuts. With ``number_frames=True`` every frame
carries its own index as a 12-bit strip of black/white cells along the top edge, which
:func:`read_frame_number` decodes, so tests can check exactly which frame a function returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run

# Moving patterns that look clearly different from each other.
SCENE_SOURCES: tuple[str, ...] = (
    "testsrc2",
    "mandelbrot",
    "smptehdbars",
    "life=ratio=0.3:mold=10:death_color=#202060:life_color=#f0c020",
    "rgbtestsrc",
    "cellauto=rule=110",
    "gradients=speed=0.05",
    "testsrc",
)

NUMBER_BITS = 12
STRIP_HEIGHT = 16


@dataclass(frozen=True)
class SyntheticVideo:
    path: Path
    fps: int
    width: int
    height: int
    scene_frames: tuple[int, ...]
    flash_frames: tuple[int, ...] = ()
    has_audio: bool = True
    cut_frames: tuple[int, ...] = field(init=False)
    frame_count: int = field(init=False)

    def __post_init__(self) -> None:
        cuts, acc = [], 0
        for n in self.scene_frames[:-1]:
            acc += n
            cuts.append(acc)
        object.__setattr__(self, "cut_frames", tuple(cuts))
        object.__setattr__(self, "frame_count", sum(self.scene_frames))

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps


def make_video(
    path: str | Path,
    scene_seconds: Sequence[float] = (2.0, 3.0, 2.5),
    *,
    fps: int = 24,
    width: int = 320,
    height: int = 180,
    audio: bool = True,
    flash_frames: Sequence[int] = (),
    number_frames: bool = False,
    crf: int = 18,
    preset: str = "veryfast",
) -> SyntheticVideo:
    """Write an H.264/AAC MP4 whose scenes change exactly at known frames.

    ``scene_seconds`` gives each scene's length; scene *i* uses ``SCENE_SOURCES[i % 8]``
    (seeded so the output is reproducible). ``flash_frames`` are absolute frame indices that are
    painted white for one frame.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [max(1, round(s * fps)) for s in scene_seconds]
    total = sum(frames)
    size = f"{width}x{height}"
    args: list[str] = [ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-y"]
    chains: list[str] = []
    for i, n in enumerate(frames):
        src = SCENE_SOURCES[i % len(SCENE_SOURCES)]
        sep = ":" if "=" in src else "="
        # Some sources ignore size/rate options in their own syntax; scale and fps normalise them.
        args += ["-f", "lavfi", "-i", f"{src}{sep}size={size}:rate={fps}"]
        chains.append(
            f"[{i}:v]trim=end_frame={n},setpts=PTS-STARTPTS,scale={size},setsar=1,format=yuv420p[v{i}]"
        )
    concat_in = "".join(f"[v{i}]" for i in range(len(frames)))
    post = f"{concat_in}concat=n={len(frames)}:v=1:a=0"
    for f in flash_frames:
        post += f",drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='eq(n,{int(f)})'"
    if number_frames:
        cell = f"floor(X*{NUMBER_BITS}/W)"
        bit = f"mod(floor(N/pow(2,{cell})),2)"
        post += (
            f",geq=lum='if(lt(Y,{STRIP_HEIGHT}),16+219*{bit},p(X,Y))'"
            f":cb='if(lt(Y,{STRIP_HEIGHT}),128,p(X,Y))':cr='if(lt(Y,{STRIP_HEIGHT}),128,p(X,Y))'"
        )
    post += "[vout]"
    filters = ";".join(chains + [post])
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={total / fps:.6f}"]
    args += ["-filter_complex", filters, "-map", "[vout]"]
    if audio:
        args += ["-map", f"{len(frames)}:a", "-c:a", "aac", "-b:a", "96k"]
    args += [
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-r", str(fps), "-movflags", "+faststart", str(path),
    ]
    run(args, what=f"generate synthetic video {path.name}", duration_s=total / fps)
    return SyntheticVideo(
        path=path, fps=fps, width=width, height=height, scene_frames=tuple(frames),
        flash_frames=tuple(int(f) for f in flash_frames), has_audio=audio,
    )


def read_frame_number(image: np.ndarray) -> int:
    """Decode the frame index drawn by ``make_video(number_frames=True)``.

    ``image`` is an HxW (grey) or HxWx3 array of the frame at any scale that keeps the aspect.
    """
    img = np.asarray(image)
    if img.ndim == 3:
        img = img.mean(axis=2)
    h, w = img.shape[:2]
    row = max(0, int(round(STRIP_HEIGHT / 2 * h / 180)))  # strip is 16 px of 180 at generation size
    row = min(row, h - 1)
    value = 0
    for k in range(NUMBER_BITS):
        x = int((k + 0.5) * w / NUMBER_BITS)
        if img[row, x] > 128:
            value |= 1 << k
    return value


def read_frame_numbers(path: str | Path) -> list[int]:
    """Decode every frame of a ``number_frames=True`` video (or a cut of one) back to its index."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    out: list[int] = []
    try:
        while True:
            ok, img = cap.read()
            if not ok:
                break
            out.append(read_frame_number(img))
    finally:
        cap.release()
    return out
