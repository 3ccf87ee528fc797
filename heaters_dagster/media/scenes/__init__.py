"""Scene detection: split a video into shots at hard cuts and gradual transitions.

Two detectors, chosen by ``detect_scenes(detector=...)`` (the splice stage's ``detector`` param):

* ``"hybrid"`` (default): the streaming small-frame pass (:mod:`.stream`) decides clear hard cuts
  itself and proposes doubtful frames (cuts between shots that look alike, cross-fades, dips to
  black, flashes, camera shake); TransNetV2 (:mod:`.learned`) scores short windows around those
  only (:mod:`.hybrid`). A gradual transition gives one boundary.
* ``"stream"``: the small-frame pass alone (hard cuts only; no model).

Scenes tile ``[0, frame_count)``; those shorter than ``min_scene_s`` are returned in ``dropped``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heaters_dagster.media.scenes.stream import (
    DEFAULT_ANALYSIS_WIDTH,
    DEFAULT_LOOKBACK,
    DEFAULT_MIN_GAP,
    DEFAULT_MIN_SCORE,
    DEFAULT_PERSIST_FRAMES,
    DEFAULT_PERSIST_RATIO,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    FrameScores,
    analysis_size_for,
    find_cuts,
    score_frames,
)

DETECTORS = ("hybrid", "stream")
DEFAULT_DETECTOR = "hybrid"


@dataclass(frozen=True)
class Scene:
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float

    @property
    def frame_count(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SceneDetectionResult:
    fps: float
    frame_count: int
    cut_frames: tuple[int, ...]  # every detected boundary (first frame of a new scene)
    scenes: tuple[Scene, ...]  # kept: at least min_scene_s long
    dropped: tuple[Scene, ...]  # shorter than min_scene_s
    analysis_size: tuple[int, int]  # (width, height) of the analysed frames
    decode_seconds: float  # wall time of the whole detection (decode + analysis + network)
    detector: str = "stream"
    candidates: int = 0  # hybrid: frames sent to the network as candidates
    network_frames: int = 0  # hybrid: frames the network scored
    prescored: int = 0  # hybrid: network spans scored while the video was still decoding

    @property
    def all_scenes(self) -> tuple[Scene, ...]:
        """Kept and dropped scenes in frame order (they tile ``[0, frame_count)``)."""
        return tuple(sorted(self.scenes + self.dropped, key=lambda s: s.start_frame))


def split_scenes(
    cut_frames: tuple[int, ...] | list[int], frame_count: int, fps: float, min_scene_s: float
) -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    """(kept, dropped) scenes tiling ``[0, frame_count)`` at ``cut_frames``."""
    bounds = [0] + sorted(c for c in set(cut_frames) if 0 < c < frame_count) + [frame_count]
    kept: list[Scene] = []
    dropped: list[Scene] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sc = Scene(start_frame=a, end_frame=b, start_s=a / fps, end_s=b / fps)
        # a small epsilon so that a scene of exactly min_scene_s (in whole frames) is kept
        (kept if (b - a) / fps >= min_scene_s - 1e-9 else dropped).append(sc)
    return tuple(kept), tuple(dropped)


def detect_scenes(
    path: str | Path,
    *,
    detector: str = DEFAULT_DETECTOR,
    threshold: float | None = None,
    min_scene_s: float = 1.0,
    analysis_width: int = DEFAULT_ANALYSIS_WIDTH,
    fps: float | None = None,
    duration_s: float | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    window: int = DEFAULT_WINDOW,
    persist_frames: int = DEFAULT_PERSIST_FRAMES,
    threads: int = 0,
    hybrid: dict[str, Any] | None = None,
) -> SceneDetectionResult:
    """Detect shot boundaries in ``path`` and split it into scenes (see the package docstring).

    ``threshold`` is the stream pass's adaptive ratio a frame's score must reach over its
    neighbours' median (default 3.0); ``min_score`` the absolute floor of a cut's score (0..1);
    ``fps`` the frame rate the caller uses for frame <-> time (default: the stream's);
    ``duration_s`` the source's duration if known (with ``fps``, the decode needs no probe);
    ``threads`` ffmpeg's decoder threads (0 = auto); ``hybrid`` overrides of the hybrid's
    parameters (:data:`.hybrid.DEFAULTS`). Raises :class:`InvalidMediaError` for missing, empty
    or undecodable input, :class:`ValueError` for bad parameters.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown scene detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    if min_scene_s < 0:
        raise ValueError(f"min_scene_s must be >= 0, got {min_scene_s!r}")
    t0 = time.perf_counter()
    if detector == "stream":
        sc = score_frames(path, analysis_width=analysis_width, fps=fps, duration_s=duration_s,
                          persist_frames=persist_frames, threads=threads)
        cuts = find_cuts(sc, threshold=threshold, min_score=min_score, window=window)
        extra: dict[str, int] = {}
    else:
        from heaters_dagster.media.scenes.hybrid import DEFAULTS, Prescorer, decide
        from heaters_dagster.media.scenes.learned import prepared

        params = {**DEFAULTS, **(hybrid or {})}
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown hybrid parameters: {', '.join(sorted(unknown))}")
        prepared(str(params["precision"]))  # model and folded weights: once per process, before the decode
        t0 = time.perf_counter()
        kwargs = dict(threshold=threshold, min_score=min_score, window_median=window,
                      persist_ratio=DEFAULT_PERSIST_RATIO, **params)
        with tempfile.TemporaryDirectory(prefix="heaters-scenes-") as tmp:
            early = Prescorer(kwargs)  # the network scores settled spans while ffmpeg decodes
            try:
                sc = score_frames(path, analysis_width=analysis_width, fps=fps, duration_s=duration_s,
                                  persist_frames=persist_frames, threads=threads, far_gaps=(int(params["far_gap"]),),
                                  rgb_path=Path(tmp) / "small.rgb", on_progress=early)
            except BaseException:
                early.finish(abandon=True)
                raise
            scored = early.finish()
            dec = decide(sc, **kwargs, scored=scored)
        cuts = dec.cuts
        extra = {"candidates": dec.candidates, "network_frames": dec.network_frames, "prescored": dec.prescored}
    kept, dropped = split_scenes(cuts, sc.frame_count, sc.fps, min_scene_s)
    return SceneDetectionResult(
        fps=sc.fps, frame_count=sc.frame_count, cut_frames=tuple(cuts), scenes=kept, dropped=dropped,
        analysis_size=sc.analysis_size, decode_seconds=time.perf_counter() - t0, detector=detector, **extra,
    )


__all__ = [
    "Scene", "SceneDetectionResult", "FrameScores", "detect_scenes", "score_frames", "find_cuts",
    "split_scenes", "analysis_size_for", "DETECTORS", "DEFAULT_DETECTOR", "DEFAULT_LOOKBACK",
    "DEFAULT_MIN_GAP", "DEFAULT_PERSIST_FRAMES",
]
