"""The hybrid decision: the stream pass proposes, TransNetV2 decides the doubtful cases.

From one :func:`~.stream.score_frames` pass (small frames, plus far-gap distances and the 48x27
RGB frames in a scratch file):

1. **Sure cuts** (no network): frames that pass the stream detector's hard-cut rules with a wide
   margin (score ``>= sure_score``, ratio to the neighbours' median ``>= sure_ratio``) *and* whose
   new content persists: its distance to the frames before stays at least ``sure_persist`` of the
   step over the next frames and ``far_gap`` frames later (a burst of camera shake or a flash
   returns to the old picture; a cut does not).
2. **Hard candidates**: other local score maxima over a low ratio/score (cuts between shots that
   look alike, flashes, shake).
3. **Gradual candidates**: local maxima of the centred far distance ``D(i - g/2, i + g/2)`` that
   stand out of its median over a long window (cross-fades, dips to black, and fast motion).

Every candidate gets a short window of frames around it (``hard_window`` / ``grad_window``
frames; overlapping windows merge) and TransNetV2 scores those frames only, in bfloat16 where the
CPU has it (:mod:`.transnet_infer`). A hard candidate is a cut when the network says so
(``>= hard_threshold``), or when it agrees weakly (``>= hard_weak``) and the step is clean (it
persists as for a sure cut). A gradual candidate gives one boundary at the most probable frame of
its run (``>= grad_threshold``), unless that is a flash (:func:`_is_flash`). Two sure cuts under
``far_gap`` frames apart around a dark picture (mean RGB under ``dark_luma``: the two edges of a
dip to black) are not sure: they become hard candidates. A boundary is dropped within ``far_gap / 2`` frames of a sure cut or ``far_gap`` of
a stronger boundary.

The windows (24 and 40 frames) are the shortest that keep the benchmark's F1: at 16 / 32 frames
the network misses dissolves it finds with more context (``bench/results/scenes.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from heaters_dagster.media.scenes.stream import FrameScores

DEFAULTS = dict(
    sure_score=0.04, sure_ratio=4.0, sure_persist=0.8, cand_score=0.04, cand_ratio=2.5, cand_persist=0.4,
    grad_score=0.10, grad_ratio=1.4, far_gap=16, hard_window=24, grad_window=40, hard_threshold=0.3,
    hard_weak=0.08, grad_threshold=0.35, flash_luma=25.0, dark_luma=40.0, precision="auto",
)


@dataclass(frozen=True)
class HybridDecision:
    cuts: tuple[int, ...]
    sure: tuple[int, ...]  # cuts decided by the stream signals alone
    candidates: int  # hard + gradual candidates sent to the network
    network_frames: int  # frames the network scored (union of the windows)
    prescored: int = 0  # spans scored while the video was still being decoded


def _local_max(x: np.ndarray, radius: int) -> np.ndarray:
    n = len(x)
    if not n:
        return np.zeros(0, bool)
    pad = np.concatenate([np.full(radius, -np.inf), np.nan_to_num(x, nan=-np.inf), np.full(radius, -np.inf)])
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * radius + 1)
    return (x >= win.max(axis=1)) & np.isfinite(x)


def _rolling_median(x: np.ndarray, radius: int) -> np.ndarray:
    pad = np.concatenate([np.full(radius, np.nan), x, np.full(radius, np.nan)])
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * radius + 1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(win, axis=1)
    return np.nan_to_num(med, nan=0.0)


def _merge(spans: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _luma(rgb: np.ndarray, i: int) -> float:
    """Mean RGB of frame ``i`` (clamped to the video) of the 48x27 frames."""
    return float(rgb[min(max(i, 0), len(rgb) - 1)].mean())


def _is_flash(rgb: np.ndarray, cz: np.ndarray, cmed: np.ndarray, k: int, grad_score: float, grad_ratio: float,
              flash_luma: float) -> bool:
    """A boundary the network put at ``k`` is a flash: a frame just before it is brighter than
    both sides by ``flash_luma`` (of 255) *and* the pictures on both sides match (the far
    distance around ``k`` does not stand out). Two shots of one film that look alike are not
    brighter in between, so they are kept."""
    bright = max(_luma(rgb, j) for j in range(k - 3, k + 2)) > max(_luma(rgb, k - 6), _luma(rgb, k + 5)) + flash_luma
    around = cz[max(0, k - 2): k + 3]
    differ = bool(around.size and around.max() >= max(grad_score, grad_ratio * cmed[min(k, len(cmed) - 1)]))
    return bright and not differ


@dataclass(frozen=True)
class _Candidates:
    s: np.ndarray
    m: np.ndarray
    farp: np.ndarray
    sure: np.ndarray
    hard: np.ndarray
    grad: np.ndarray
    cz: np.ndarray
    cmed: np.ndarray
    spans: list[tuple[int, int]]  # frame ranges the network scores (merged windows)


def _candidates(sc: FrameScores, *, window_median: int, persist_ratio: float, sure_score: float, sure_ratio: float,
                sure_persist: float, cand_score: float, cand_ratio: float, cand_persist: float, grad_score: float,
                grad_ratio: float, far_gap: int, hard_window: int, grad_window: int, dark_luma: float,
                **_: object) -> _Candidates:
    """Sure cuts, hard and gradual candidates and the network's spans, from the stream signals
    alone. Every rule looks at most ``margin(params)`` frames ahead, so on the first frames of a
    video still being decoded it gives what it will give on the whole video."""
    n = sc.frame_count
    s = sc.score.astype(np.float64)
    ratio = s / np.maximum(sc.baseline(window_median), 1e-3)
    m = sc.persistence()
    farp = np.full(n, np.inf)  # D(i-1, i-1+far_gap): is the new picture still new later on?
    if n > far_gap:
        farp[1:n - far_gap + 1] = np.nan_to_num(sc.far[far_gap][:n - far_gap], nan=np.inf)
    peak = _local_max(s, 2)
    peak[0] = False
    sure_mask = (peak & (s >= max(sure_score, 1e-6)) & (ratio >= sure_ratio) & (m >= sure_persist * s)
                 & (farp >= sure_persist * s) & (m >= persist_ratio * s))
    sure = np.flatnonzero(sure_mask)
    if len(sure) > 1 and sc.rgb_path is not None:
        # two steps under far_gap frames apart around a dark picture (the two edges of a dip to
        # black) are not sure: the network decides them. A short shot between two cuts stays.
        rgb = sc.rgb()
        close = np.array([b - a < far_gap and _luma(rgb, (a + b) // 2) < dark_luma
                          for a, b in zip(sure[:-1], sure[1:])], bool)
        demote = np.zeros(len(sure), bool)
        demote[:-1] |= close
        demote[1:] |= close
        sure_mask[sure[demote]] = False
        sure = sure[~demote]
    hard = np.flatnonzero(peak & (s >= cand_score) & (ratio >= cand_ratio) & (m >= cand_persist * s) & ~sure_mask)
    c = sc.far_distance(far_gap).astype(np.float64)
    cmed = _rolling_median(c, 3 * far_gap)
    cz = np.nan_to_num(c)
    grad = np.flatnonzero(_local_max(c, far_gap // 2) & (cz >= grad_score) & (cz >= grad_ratio * cmed))
    near_sure = np.zeros(n + 1, bool)
    for f in sure:
        near_sure[max(0, f - far_gap // 2 - 2): f + far_gap // 2 + 3] = True
    grad = grad[~near_sure[grad]]
    hard = hard[~near_sure[hard]]
    spans = _merge([(max(0, f - hard_window // 2), min(n, f + hard_window // 2)) for f in hard]
                   + [(max(0, f - grad_window // 2), min(n, f + grad_window // 2)) for f in grad])
    return _Candidates(s=s, m=m, farp=farp, sure=sure, hard=hard, grad=grad, cz=cz, cmed=cmed,
                       spans=[(int(x), int(y)) for x, y in spans])


def margin(params: dict) -> int:
    """Frames past a span's end that must be decoded before the span is final: the rules' look-ahead
    (far distance, its rolling median, persistence) plus a window that a later candidate could merge in."""
    g = int(params["far_gap"])
    return 4 * g + 16 + int(max(params["grad_window"], params["hard_window"])) // 2


def decide(sc: FrameScores, *, threshold: float, min_score: float, window_median: int, persist_ratio: float,
           sure_score: float, sure_ratio: float, sure_persist: float, cand_score: float, cand_ratio: float,
           cand_persist: float, grad_score: float, grad_ratio: float, far_gap: int, hard_window: int,
           grad_window: int, hard_threshold: float, grad_threshold: float,
           hard_weak: float, flash_luma: float, dark_luma: float, precision: str = "auto",
           scored: dict[tuple[int, int], np.ndarray] | None = None) -> HybridDecision:
    """Boundaries of one scored video (see the module docstring); parameters: :data:`DEFAULTS`.
    ``scored``: network probabilities of spans already scored (by a :class:`Prescorer`)."""
    from heaters_dagster.media.scenes.learned import score_windows

    n = sc.frame_count
    if n < 2:
        return HybridDecision((), (), 0, 0)
    cand = _candidates(sc, window_median=window_median, persist_ratio=persist_ratio, sure_score=sure_score,
                       sure_ratio=sure_ratio, sure_persist=sure_persist, cand_score=cand_score, cand_ratio=cand_ratio,
                       cand_persist=cand_persist, grad_score=grad_score, grad_ratio=grad_ratio, far_gap=far_gap,
                       hard_window=hard_window, grad_window=grad_window, dark_luma=dark_luma)
    s, m, farp, cz, cmed = cand.s, cand.m, cand.farp, cand.cz, cand.cmed
    sure, hard, grad = cand.sure, cand.hard, cand.grad
    scored = scored or {}
    prob = np.zeros(n, np.float32)
    net_frames = sum(b - a for a, b in cand.spans)
    todo = [sp for sp in cand.spans if sp not in scored]
    for sp in cand.spans:
        if sp in scored:
            prob[sp[0]:sp[1]] = scored[sp]
    if todo:
        for (a, b), (single, _many) in zip(todo, score_windows(sc.rgb(), todo, precision=precision)):
            prob[a:b] = single
    found: list[tuple[float, int]] = []
    for f in hard:  # TransNetV2 marks the last frame before a cut
        p = float(prob[max(0, f - 3): f + 1].max())
        # a clean step (the new picture persists, next frames and far_gap frames on) needs only
        # the network's weak agreement; shake and motion do not persist, flashes return
        clean = m[f] >= sure_persist * s[f] and farp[f] >= sure_persist * s[f]
        if p >= hard_threshold or (clean and p >= hard_weak):
            found.append((p, int(f)))
    rgb = sc.rgb()
    for f in grad:  # one boundary per run of probable frames near the candidate
        lo, hi = max(1, f - far_gap), min(n - 1, f + far_gap)
        seg = prob[lo:hi]
        if seg.size and seg.max() >= grad_threshold:
            k = int(np.argmax(seg)) + int(lo) + 1
            if not _is_flash(rgb, cz, cmed, k, grad_score, grad_ratio, flash_luma):
                found.append((float(seg.max()), k))
    kept = [int(f) for f in sure]
    blocked = np.zeros(n + 1, bool)
    for f in kept:
        blocked[max(0, f - far_gap // 2): f + far_gap // 2 + 1] = True
    for p, f in sorted(found, reverse=True):
        if 0 < f < n and not blocked[f]:
            kept.append(f)
            blocked[max(0, f - far_gap): f + far_gap + 1] = True
    return HybridDecision(tuple(sorted(int(f) for f in kept)), tuple(int(f) for f in sure), int(len(hard) + len(grad)),
                          int(net_frames), prescored=sum(1 for sp in cand.spans if sp in scored))


class Prescorer:
    """Scores the network's spans of a video on a worker thread while the stream pass is still
    decoding it, so the network runs next to ffmpeg instead of after it.

    :func:`~.stream.score_frames` calls it (``on_progress``) with the signals of the frames decoded
    so far; spans that are final (more than :func:`margin` frames behind the last decoded frame) go
    to the worker, which reads their frames from the RGB scratch file. :meth:`finish` returns what
    it scored for :func:`decide`, which scores any other span itself: the result is the same as
    without it, only sooner (a span the prefix got wrong is scored again, not trusted).
    """

    def __init__(self, params: dict) -> None:
        """``params``: :func:`decide`'s keyword arguments (without ``scored``)."""
        import queue
        import threading

        self.params = params
        self.margin = margin(params)
        self.scored: dict[tuple[int, int], np.ndarray] = {}
        self._sent: set[tuple[int, int]] = set()
        self._queue: "queue.Queue[tuple[np.ndarray, tuple[int, int]] | None]" = queue.Queue()
        self._abandoned = False
        self._thread = threading.Thread(target=self._work, name="heaters-prescorer", daemon=True)
        self._thread.start()

    def __call__(self, partial: FrameScores) -> None:
        n = partial.frame_count
        if partial.rgb_path is None or n <= self.margin:
            return
        cand = _candidates(partial, **self.params)
        rgb = partial.rgb()  # the frames decoded so far, flushed to the scratch file
        for sp in cand.spans:
            if sp[1] <= n - self.margin and sp not in self._sent:
                self._sent.add(sp)
                self._queue.put((rgb, sp))

    def _work(self) -> None:
        from heaters_dagster.media.scenes.learned import score_windows

        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._abandoned:
                continue
            rgb, (a, b) = item
            try:
                frames = np.array(rgb[a:b])
                (single, _many), = score_windows(frames, [(0, b - a)], precision=str(self.params["precision"]))
                self.scored[(a, b)] = single
            except Exception:  # noqa: BLE001 - decide() scores the span itself (and raises, if it must)
                continue

    def finish(self, abandon: bool = False) -> dict[tuple[int, int], np.ndarray]:
        """Wait for the worker; the spans it scored. ``abandon``: skip what is still queued (the
        decode failed or was interrupted, so nothing will use it)."""
        self._abandoned = abandon
        self._queue.put(None)
        self._thread.join()
        return dict(self.scored)
