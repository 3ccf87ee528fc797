"""The hybrid decision: the stream pass proposes, TransNetV2 decides the doubtful cases.

From one :func:`~.stream.score_frames` pass (small frames, plus far-gap distances and the 48x27
RGB frames in a scratch file):

1. **Sure cuts** (no network): frames that pass the stream detector's hard-cut rules with a wide
   margin (score ``>= sure_score``, ratio to the neighbours' median ``>= sure_ratio``) *and* whose
   new content is still different ``far_gap`` frames later (a burst of camera shake or a flash
   returns to the old picture; a cut does not).
2. **Hard candidates**: other local score maxima over a low ratio/score (cuts between shots that
   look alike, flashes, shake).
3. **Gradual candidates**: local maxima of the centred far distance ``D(i - g/2, i + g/2)`` that
   stand out of its median over a long window (cross-fades, dips to black, and fast motion).

Every candidate gets a short window of frames around it (``window`` frames; overlapping windows
merge) and TransNetV2 scores those frames only. A run of frames whose probability is over
``net_threshold`` is one boundary, at the first frame after the run (so a gradual transition
gives exactly one). Boundaries closer than ``min_gap`` frames to a sure cut or a stronger
boundary are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heaters_dagster.media.scenes.stream import FrameScores

DEFAULTS = dict(
    sure_score=0.16, sure_ratio=6.0, sure_persist=0.6, cand_score=0.03, cand_ratio=1.6,
    grad_score=0.10, grad_ratio=1.8, far_gap=16, window=24, net_threshold=0.5, min_gap=4,
)


@dataclass(frozen=True)
class HybridDecision:
    cuts: tuple[int, ...]
    sure: tuple[int, ...]  # cuts decided by the stream signals alone
    candidates: int  # hard + gradual candidates sent to the network
    network_frames: int  # frames the network scored (union of the windows)


def _local_max(x: np.ndarray, radius: int) -> np.ndarray:
    n = len(x)
    pad = np.concatenate([np.full(radius, -np.inf), np.nan_to_num(x, nan=-np.inf), np.full(radius, -np.inf)])
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * radius + 1)
    return (x >= win.max(axis=1)) & np.isfinite(x) if n else np.zeros(0, bool)


def _rolling_median(x: np.ndarray, radius: int) -> np.ndarray:
    pad = np.concatenate([np.full(radius, np.nan), x, np.full(radius, np.nan)])
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * radius + 1)
    med = np.nanmedian(win, axis=1)
    return np.nan_to_num(med, nan=0.0)


def decide(sc: FrameScores, *, threshold: float, min_score: float, window_median: int, persist_ratio: float,
           sure_score: float = DEFAULTS["sure_score"], sure_ratio: float = DEFAULTS["sure_ratio"],
           sure_persist: float = DEFAULTS["sure_persist"], cand_score: float = DEFAULTS["cand_score"],
           cand_ratio: float = DEFAULTS["cand_ratio"], grad_score: float = DEFAULTS["grad_score"],
           grad_ratio: float = DEFAULTS["grad_ratio"], far_gap: int = DEFAULTS["far_gap"],
           window: int = DEFAULTS["window"], net_threshold: float = DEFAULTS["net_threshold"],
           min_gap: int = DEFAULTS["min_gap"]) -> HybridDecision:
    from heaters_dagster.media.scenes.learned import score_windows

    n = sc.frame_count
    if n < 2:
        return HybridDecision((), (), 0, 0)
    s = sc.score.astype(np.float64)
    base = sc.baseline(window_median)
    ratio = s / np.maximum(base, 1e-3)
    m = sc.persistence()
    stream_ok = (s >= min_score) & (ratio >= threshold) & (m >= np.maximum(min_score, persist_ratio * s))
    # far persistence: D(i-1, i-1+far_gap) against the cut's own score
    farp = np.full(n, np.nan)
    d = sc.far[far_gap]
    if n > far_gap:
        farp[1:n - far_gap + 1] = d[:n - far_gap]
    far_ok = np.nan_to_num(farp, nan=np.inf) >= sure_persist * s
    peak = _local_max(s, 2)
    sure_mask = stream_ok & peak & (s >= sure_score) & (ratio >= sure_ratio) & far_ok
    sure_mask[0] = False
    sure = np.flatnonzero(sure_mask)
    hard = np.flatnonzero(peak & (s >= cand_score) & (ratio >= cand_ratio) & ~sure_mask)
    hard = hard[hard > 0]
    c = sc.far_distance(far_gap).astype(np.float64)
    cmed = _rolling_median(c, 3 * far_gap)
    grad = np.flatnonzero(_local_max(c, far_gap // 2) & (np.nan_to_num(c) >= grad_score)
                          & (np.nan_to_num(c) >= grad_ratio * cmed))
    near_sure = np.zeros(n + 1, bool)
    for f in sure:
        near_sure[max(0, f - far_gap // 2): f + far_gap // 2 + 1] = True
    grad = grad[~near_sure[grad]]
    hard = hard[~near_sure[hard]]
    cands = sorted(set(hard.tolist()) | set(grad.tolist()))
    # windows around candidates, merged where they overlap
    spans: list[list[int]] = []
    for f in cands:
        a, b = max(0, f - window // 2), min(n, f + window - window // 2)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    found: list[tuple[float, int]] = []
    net_frames = sum(b - a for a, b in spans)
    if spans:
        frames = sc.rgb()
        for (a, b), (single, _many) in zip(spans, score_windows(frames, [tuple(x) for x in spans])):
            on = single > net_threshold
            i = 0
            while i < len(on):
                if not on[i]:
                    i += 1
                    continue
                j = i
                while j < len(on) and on[j]:
                    j += 1
                cut = a + j
                if 0 < cut < n and not (a > 0 and i == 0) and not (b < n and j == len(on)):
                    found.append((float(single[i:j].max()), cut))
                i = j
    kept = list(sure.tolist())
    blocked = np.zeros(n + 1, bool)
    for f in kept:
        blocked[max(0, f - min_gap): f + min_gap + 1] = True
    for _p, f in sorted(found, reverse=True):
        if not blocked[f]:
            kept.append(f)
            blocked[max(0, f - min_gap): f + min_gap + 1] = True
    return HybridDecision(tuple(sorted(kept)), tuple(sure.tolist()), len(cands), net_frames)
