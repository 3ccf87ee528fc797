"""The streaming small-frame pass: per-frame cut signals from one small decode (and hard-cut rules).

One ffmpeg process decodes the source and downscales every frame to a tiny YUV 4:2:0 image
(``analysis_width`` pixels wide, ``fast_bilinear``) which it writes as yuv4mpeg on stdout (its
header says the size). Python reads that pipe in fixed-size chunks of frames, so memory stays flat whatever the source length
or resolution: only a chunk of small frames plus a few float32 numbers per frame are ever held.

Every pair of frames ``(a, b)`` gets a *distance* ``D(a, b)`` in ``[0, 1]``:

* ``hist``: half the L1 distance between normalised colour histograms (16 luma bins and a joint
  8x8 chroma histogram, averaged), which sees colour/tone changes and ignores motion;
* ``pixel``: mean absolute difference of the small luma and chroma planes (luma weighted 2:1),
  which sees layout changes between scenes whose histograms are alike (what the old
  histogram-correlation detector missed).

``D = (hist + pixel) / 2``. The per-frame *score* is ``s[i] = D(i-1, i)``. Frame ``i`` is a cut
when all of the following hold:

1. **absolute floor**: ``s[i] >= min_score`` (ignores noise in static shots);
2. **adaptive ratio**: ``s[i] >= threshold * baseline[i]`` where ``baseline[i]`` is the median of
   the scores of the ``window`` frames on each side of ``i`` (not ``i`` itself), as in
   PySceneDetect's AdaptiveDetector but with a median so that a nearby flash or cut does not
   raise it; fast motion raises the baseline, so it does not read as cuts;
3. **persistence / flash suppression**: the new content must not return to the old content
   within ``persist_frames`` frames. With ``m[i] = min D(a, b)`` over ``a`` in the
   ``lookback`` frames before ``i`` and ``b`` in ``i .. i+persist_frames-1``, a cut needs
   ``m[i] >= max(min_score, persist_ratio * s[i])``. A one- or two-frame flash (white frame,
   strobe, a single inserted frame) differs strongly from its neighbours but the frames after it
   match the frames before it, so ``m`` is small and the flash is not a cut - neither on the way
   in nor on the way out (``lookback`` = 3 covers flashes of up to two frames);
4. **non-maximum suppression**: of candidates at most ``min_gap`` (2) frames apart only the
   strongest is kept (a flash right before a cut gives two candidates a frame apart).

The frame count comes from the decoded stream (constant frame rate at the stream's rate, or at the
caller's ``fps``). A caller that knows the frame rate and duration (the splice stage: ingest
recorded them) passes them and the decode starts without an ffprobe run first.

For the hybrid detector (:mod:`.hybrid`) the same pass also computes distances over longer gaps
(``far_gaps``: ``D(x, x+g)``, which rise across a gradual transition) and can write every frame
as 48x27 RGB (the learned scorer's input) to a scratch file, built from the small YUV frame
(luma averaged 2x2, chroma planes as they are, BT.601 limited range) so no second decode is
needed.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from heaters_dagster.errors import FFmpegError, InvalidMediaError
from heaters_dagster.media.ffmpeg_tools import _tail, ffmpeg_bin, ffprobe_bin, run, slot
from heaters_dagster.media.subprocess_guard import Supervised

DEFAULT_THRESHOLD = 3.0
DEFAULT_MIN_SCORE = 0.08
DEFAULT_ANALYSIS_WIDTH = 96
DEFAULT_WINDOW = 4
DEFAULT_PERSIST_FRAMES = 3
DEFAULT_LOOKBACK = 3
DEFAULT_PERSIST_RATIO = 0.4
DEFAULT_MIN_GAP = 2

_Y_BINS = 16  # luma histogram: Y >> 4
_C_BITS = 3  # chroma histogram: (U >> 5, V >> 5) -> 8 x 8 joint bins
_C_BINS = 1 << (2 * _C_BITS)
_PROGRESS_FRAMES = 64  # on_progress: every 64 frames (a chunk) at first, then every 1/8 of those decoded
_CHUNK_BYTES = 1 << 20  # read about 1 MiB of small frames (~130 at 96x54) at a time


@dataclass(frozen=True)
class FrameScores:
    """Per-frame signals of one decode pass (float32 arrays of length ``frame_count``).

    ``score[i] = D(i-1, i)`` (0 for frame 0); ``gap[g-1][x] = D(x, x+g)`` for
    ``g = 1 .. lookback+persist_frames-1`` (NaN where ``x+g`` is past the end).
    """

    fps: float
    frame_count: int
    score: np.ndarray
    gap: tuple[np.ndarray, ...]
    analysis_size: tuple[int, int]
    decode_seconds: float
    lookback: int
    persist_frames: int
    far: dict[int, np.ndarray] = field(default_factory=dict)  # g -> D(x, x+g) for the far gaps
    rgb_path: Path | None = None  # (frame_count, 27, 48, 3) uint8 RGB frames, when asked for

    def rgb(self) -> np.ndarray:
        """The 48x27 RGB frames written during the pass (a read-only memory map)."""
        if self.rgb_path is None:
            raise ValueError("score_frames was not asked to keep RGB frames")
        return np.memmap(self.rgb_path, dtype=np.uint8, mode="r", shape=(self.frame_count, 27, 48, 3))

    def far_distance(self, g: int) -> np.ndarray:
        """``c[i] = D(i - g//2, i + g - g//2)`` (NaN where out of range): centred far distance."""
        d = self.far[g]
        out = np.full(self.frame_count, np.nan, dtype=np.float32)
        h = g // 2
        n = self.frame_count - g
        if n > 0:
            out[h:h + n] = d[:n]
        return out

    def persistence(self) -> np.ndarray:
        """``m[i] = min D(a, b)``, a in ``[i-lookback, i)``, b in ``[i, i+persist_frames)``."""
        n = self.frame_count
        m = np.full(n, np.inf, dtype=np.float64)
        idx = np.arange(n)
        for da in range(1, self.lookback + 1):
            for db in range(self.persist_frames):
                g = da + db
                x = idx - da
                ok = x >= 0
                vals = np.full(n, np.nan)
                vals[ok] = self.gap[g - 1][x[ok]]
                have = ~np.isnan(vals)
                m[have] = np.minimum(m[have], vals[have])
        m[np.isinf(m)] = 0.0
        return m

    def baseline(self, window: int) -> np.ndarray:
        """Median of the ``window`` scores on each side of each frame (frame itself excluded)."""
        n = self.frame_count
        s = self.score.astype(np.float64)
        if n == 0:
            return s
        pad = np.full(n + 2 * window, np.nan)
        pad[window:window + n] = s
        # neighbours at offsets -window..-1 and 1..window
        cols = [pad[window + k: window + k + n] for k in range(-window, window + 1) if k != 0]
        stack = np.stack(cols, axis=1)
        base = np.nanmedian(stack, axis=1) if window > 0 else np.zeros(n)
        return np.nan_to_num(base, nan=0.0)


# -- probing -------------------------------------------------------------------------------------
def _rate(text: str | None) -> Fraction | None:
    if not text or text in ("0/0", "0"):
        return None
    try:
        r = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return r if 0 < r <= 1000 else None


def _probe(path: Path) -> tuple[int, int, Fraction, float | None]:
    """(coded width, coded height, frame rate, duration in seconds if known) of the first video stream."""
    try:
        proc = run(
            [ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-show_entries",
             "stream=codec_type,width,height,avg_frame_rate,r_frame_rate:format=duration", "-of", "json",
             str(path)],
            what=f"probe {path.name}", timeout=120,
        )
    except FFmpegError as exc:
        if not exc.permanent:
            raise
        raise InvalidMediaError(f"{path.name}: not a readable media file ({exc})") from exc
    try:
        described = json.loads(proc.stdout or b"{}")
        streams = described.get("streams") or []
    except ValueError as exc:
        raise InvalidMediaError(f"{path.name}: ffprobe returned unreadable output") from exc
    if not streams:
        raise InvalidMediaError(f"{path.name}: no video stream")
    st = streams[0]
    w, h = int(st.get("width") or 0), int(st.get("height") or 0)
    if w <= 0 or h <= 0:
        raise InvalidMediaError(f"{path.name}: video stream has no frame size")
    avg, real = _rate(st.get("avg_frame_rate")), _rate(st.get("r_frame_rate"))
    if real and avg and abs(float(real) - float(avg)) <= 0.005 * float(avg):
        rate = real  # constant frame rate: r_frame_rate is the clean rational (30000/1001)
    else:
        rate = avg or real  # variable frame rate: the mean rate keeps index/fps ~ time
    if not rate:
        raise InvalidMediaError(f"{path.name}: video stream has no frame rate")
    try:
        duration: float | None = float((described.get("format") or {}).get("duration"))
    except (TypeError, ValueError):
        duration = None
    return w, h, rate, duration


def analysis_size_for(width: int, height: int, analysis_width: int) -> tuple[int, int]:
    """Even (w, h) of the analysed frames: ``analysis_width`` wide, source aspect kept (what the
    decode's scale expression, :func:`_scale_expr`, computes from the source's size)."""
    w = _even(analysis_width)
    h = max(2, int(math.floor(w * height / width / 2.0 + 0.5)) * 2)
    return w, h


def _even(analysis_width: int) -> int:
    return max(2, int(analysis_width) // 2 * 2)


def _scale_expr(analysis_width: int) -> str:
    """ffmpeg ``scale`` arguments for :func:`analysis_size_for`'s size, evaluated by ffmpeg on the
    source's size (so the decode needs no probe; the y4m header says the result)."""
    w = _even(analysis_width)
    return f"{w}:'max(2,trunc({w}*ih/iw/2+0.5)*2)'"


# -- decoding + per-frame signals -----------------------------------------------------------------
class _Features:
    """Distance features of a run of small frames (arrays indexed by frame)."""

    __slots__ = ("y", "u", "v", "hist")

    def __init__(self, y: np.ndarray, u: np.ndarray, v: np.ndarray, hist: np.ndarray):
        self.y, self.u, self.v, self.hist = y, u, v, hist

    @classmethod
    def from_raw(cls, raw: np.ndarray, w: int, h: int) -> "_Features":
        """``raw``: (n, frame_bytes) uint8 yuv420p frames."""
        n = raw.shape[0]
        ysz, csz = w * h, (w // 2) * (h // 2)
        y = raw[:, :ysz]
        u = raw[:, ysz:ysz + csz]
        v = raw[:, ysz + csz:ysz + 2 * csz]
        rows = np.arange(n, dtype=np.int64)[:, None]
        yb = (y >> 4).astype(np.int64) + rows * _Y_BINS
        yh = np.bincount(yb.ravel(), minlength=n * _Y_BINS).reshape(n, _Y_BINS) / float(ysz)
        cb = ((u >> (8 - _C_BITS)).astype(np.int64) << _C_BITS) | (v >> (8 - _C_BITS))
        cb = cb + rows * _C_BINS
        ch = np.bincount(cb.ravel(), minlength=n * _C_BINS).reshape(n, _C_BINS) / float(csz)
        hist = np.concatenate([yh, ch], axis=1).astype(np.float32)
        return cls(y.astype(np.int16), u.astype(np.int16), v.astype(np.int16), hist)

    def __len__(self) -> int:
        return self.y.shape[0]

    def slice(self, start: int, stop: int | None = None) -> "_Features":
        return _Features(self.y[start:stop], self.u[start:stop], self.v[start:stop], self.hist[start:stop])

    @staticmethod
    def concat(a: "_Features", b: "_Features") -> "_Features":
        return _Features(*(np.concatenate([getattr(a, k), getattr(b, k)]) for k in _Features.__slots__))

    def distance(self, gap: int) -> np.ndarray:
        """``D(x, x+gap)`` for every x with both frames present (float32, length len-gap)."""
        a, b = slice(None, -gap), slice(gap, None)
        hy = np.abs(self.hist[a, :_Y_BINS] - self.hist[b, :_Y_BINS]).sum(axis=1)
        hc = np.abs(self.hist[a, _Y_BINS:] - self.hist[b, _Y_BINS:]).sum(axis=1)
        hist_d = (hy + hc) / 4.0  # each L1 is in [0, 2]
        py = np.abs(self.y[a] - self.y[b]).mean(axis=1)
        pu = np.abs(self.u[a] - self.u[b]).mean(axis=1)
        pv = np.abs(self.v[a] - self.v[b]).mean(axis=1)
        pix_d = (2.0 * py + pu + pv) / (4.0 * 255.0)
        return ((hist_d + pix_d) / 2.0).astype(np.float32)


def small_rgb(raw: np.ndarray, w: int, h: int) -> np.ndarray:
    """(n, 27, 48, 3) uint8 RGB from (n, frame_bytes) yuv420p frames of size (w, h)."""
    n = raw.shape[0]
    ysz, cw, chh = w * h, w // 2, h // 2
    y = raw[:, :ysz].reshape(n, h, w)[:, :chh * 2, :cw * 2].astype(np.float32)
    y = y.reshape(n, chh, 2, cw, 2).mean(axis=(2, 4))
    u = raw[:, ysz:ysz + cw * chh].reshape(n, chh, cw).astype(np.float32) - 128.0
    v = raw[:, ysz + cw * chh:ysz + 2 * cw * chh].reshape(n, chh, cw).astype(np.float32) - 128.0
    yy = 1.164 * (y - 16.0)
    rgb = np.stack([yy + 1.596 * v, yy - 0.392 * u - 0.813 * v, yy + 2.017 * u], axis=-1)
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if (cw, chh) != (48, 27):
        import cv2

        rgb = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in rgb])
    return rgb


class _Grow:
    """Append-only float32 array (amortised doubling)."""

    def __init__(self) -> None:
        self.buf = np.empty(4096, dtype=np.float32)
        self.n = 0

    def extend(self, vals: np.ndarray) -> None:
        need = self.n + len(vals)
        if need > len(self.buf):
            self.buf = np.resize(self.buf, max(need, 2 * len(self.buf)))
        self.buf[self.n:need] = vals
        self.n = need

    def array(self, length: int) -> np.ndarray:
        out = np.full(length, np.nan, dtype=np.float32)
        k = min(length, self.n)
        out[:k] = self.buf[:k]
        return out


def _decode_args(path: Path, analysis_width: int, rate: Fraction, threads: int) -> list[str]:
    return [
        ffmpeg_bin(), "-hide_banner", "-nostdin", "-loglevel", "error",
        "-threads", str(threads), "-noautorotate",
        # no deblocking: its effect is invisible at the analysis size, and it is 15-20 % of an
        # H.264 decode (decoders without a loop filter ignore the option)
        "-skip_loop_filter", "all",
        "-i", str(path),
        "-map", "0:v:0", "-an", "-sn", "-dn",
        # fast_bilinear: a 2-tap decimation costs next to nothing next to decoding, and the
        # small aliasing it leaves is noise the adaptive ratio absorbs.
        # fps first: a constant-rate stream at the rate used for frame <-> time (a no-op for a
        # constant-rate source at its own rate; drops frames before scaling when resampling down).
        "-vf", f"fps={rate.numerator}/{rate.denominator},scale={_scale_expr(analysis_width)}:flags=fast_bilinear",
        "-fps_mode", "passthrough",
        "-pix_fmt", "yuv420p", "-f", "yuv4mpegpipe", "pipe:1",
    ]


_Y4M_FRAME = b"FRAME\n"


def _y4m_size(stream: "io.RawIOBase", name: str) -> tuple[int, int] | None:
    """(w, h) from the yuv4mpeg stream header, or None when the stream ended before one."""
    line = bytearray()
    while not line.endswith(b"\n"):
        b = stream.read(1)
        if not b:
            return None
        line += b
        if len(line) > 4096:
            break
    fields = bytes(line).split()
    if not fields or fields[0] != b"YUV4MPEG2":
        raise FFmpegError(f"scene detection decode of {name}: not a yuv4mpeg stream", permanent=False)
    params = {f[:1]: f[1:] for f in fields[1:]}
    try:
        return int(params[b"W"]), int(params[b"H"])
    except (KeyError, ValueError) as exc:
        raise FFmpegError(f"scene detection decode of {name}: yuv4mpeg header without a frame size",
                          permanent=False) from exc


def score_frames(
    path: str | Path,
    *,
    analysis_width: int = DEFAULT_ANALYSIS_WIDTH,
    fps: float | None = None,
    duration_s: float | None = None,
    lookback: int = DEFAULT_LOOKBACK,
    persist_frames: int = DEFAULT_PERSIST_FRAMES,
    threads: int = 0,
    far_gaps: tuple[int, ...] = (),
    rgb_path: Path | None = None,
    on_progress: "Callable[[FrameScores], None] | None" = None,
) -> FrameScores:
    """Decode ``path`` once (small frames, streaming) and return the per-frame signals.

    ``fps``: the frame rate for frame <-> time (default: the stream's); ``duration_s``: the
    source's duration, for the decode's time limit. When the caller knows both (the splice stage
    does: ingest recorded them), the decode starts at once; otherwise ffprobe reads them first.
    ``far_gaps``: extra gaps ``g`` for which ``D(x, x+g)`` is kept (``FrameScores.far``);
    ``rgb_path``: a scratch file to write every frame to as 48x27 RGB (``FrameScores.rgb``);
    ``on_progress``: called now and then during the decode with the signals of the frames decoded
    so far (their RGB frames flushed to ``rgb_path``), e.g. to start work on them early.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidMediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidMediaError(f"{path.name}: file is empty (0 bytes)")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps!r}")
    if duration_s is not None and not (duration_s >= 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")
    if fps is None or duration_s is None:
        _, _, rate, probed = _probe(path)
        duration_s = probed if duration_s is None else duration_s
        if fps is not None and abs(float(rate) - fps) > 1e-3 * fps:  # another rate: resample to it
            rate = Fraction(fps).limit_denominator(1001)
    else:
        rate = Fraction(fps).limit_denominator(1001)
    out_fps = float(rate) if fps is None else float(fps)
    max_gap = max(1, lookback + persist_frames - 1)
    want = sorted(set(range(1, max_gap + 1)) | {int(g) for g in far_gaps if g > 0})
    grows = {g: _Grow() for g in want}  # grows[g] holds D(x, x+g) for x = 0, 1, ...
    keep = want[-1]  # frames carried over between chunks
    tail: _Features | None = None  # last `keep` frames of the previous chunk
    total = 0
    size = (0, 0)
    next_progress = _PROGRESS_FRAMES
    t0 = time.perf_counter()
    rgb_out = open(rgb_path, "wb") if rgb_path is not None else None  # noqa: SIM115 (closed below)
    with tempfile.TemporaryFile() as errf, slot():
        with Supervised(
            _decode_args(path, analysis_width, rate, threads), what=f"scene detection decode of {path.name}",
            duration_s=duration_s, stdout=subprocess.PIPE, stderr=errf, bufsize=0,
        ) as child:
            proc = child.proc
            assert proc.stdout is not None
            got_size = _y4m_size(proc.stdout, path.name)  # None: ffmpeg wrote nothing (see rc below)
            if got_size is not None:
                size = w, h = got_size
                frame_bytes = w * h + 2 * (w // 2) * (h // 2)
                record = len(_Y4M_FRAME) + frame_bytes  # "FRAME\n" + the three planes
                chunk_frames = max(16, _CHUNK_BYTES // frame_bytes)
                buf = bytearray(chunk_frames * record)
                view = memoryview(buf)
            while got_size is not None:
                got = 0
                while got < len(buf):
                    k = proc.stdout.readinto(view[got:])
                    if not k:
                        break
                    got += k
                n = got // record
                if n:
                    recs = np.frombuffer(buf, dtype=np.uint8, count=n * record).reshape(n, record)
                    if recs[:, :len(_Y4M_FRAME)].tobytes() != _Y4M_FRAME * n:
                        raise FFmpegError(f"scene detection decode of {path.name}: yuv4mpeg frame "
                                          "headers with parameters are not supported", permanent=False)
                    raw = np.ascontiguousarray(recs[:, len(_Y4M_FRAME):])
                    feats = _Features.from_raw(raw, w, h)
                    cat = feats if tail is None else _Features.concat(tail, feats)
                    base = total - (0 if tail is None else len(tail))  # global index of cat[0]
                    if rgb_out is not None:
                        rgb_out.write(small_rgb(raw, w, h).tobytes())
                    for g, grow in grows.items():
                        if len(cat) > g:
                            d = cat.distance(g)  # D(x, x+g) for x = base .. base+len(cat)-g-1
                            grow.extend(d[grow.n - base:])
                    total += n
                    tail = cat.slice(max(0, len(cat) - keep))
                    if on_progress is not None and total >= next_progress:
                        next_progress = total + max(_PROGRESS_FRAMES, total // 8)
                        if rgb_out is not None:
                            rgb_out.flush()
                        on_progress(_snapshot(grows, total, out_fps, size, lookback, persist_frames, max_gap,
                                              far_gaps, rgb_path, time.perf_counter() - t0))
                if got < len(buf):
                    break
            rc = child.wait()  # raises MediaTimeoutError if the guard killed it
        errf.seek(0)
        stderr = errf.read().decode("utf-8", "replace")
    if rgb_out is not None:
        rgb_out.close()
    elapsed = time.perf_counter() - t0
    if rc < 0:  # killed by a signal (OOM killer, operator): not the input's fault
        raise FFmpegError(f"scene detection decode of {path.name} killed (signal {-rc})", stderr=stderr,
                          permanent=False)
    if rc != 0 and total == 0:
        raise InvalidMediaError(f"{path.name}: cannot decode video: {_tail(stderr) or f'exit code {rc}'}")
    if rc != 0:
        raise InvalidMediaError(
            f"{path.name}: decoding failed after {total} frames: {_tail(stderr) or f'exit code {rc}'}")
    if total == 0:
        raise InvalidMediaError(f"{path.name}: the video stream decoded to no frames")
    return _snapshot(grows, total, out_fps, size, lookback, persist_frames, max_gap, far_gaps, rgb_path, elapsed)


def _snapshot(grows: dict, total: int, fps: float, size: tuple[int, int], lookback: int, persist_frames: int,
              max_gap: int, far_gaps: tuple[int, ...], rgb_path: Path | None, elapsed: float) -> FrameScores:
    """The signals of the first ``total`` frames (a copy: the pass goes on growing its buffers)."""
    gap_arrays = tuple(grows[g].array(total) for g in range(1, max_gap + 1))
    far = {g: grows[g].array(total) for g in far_gaps if g > 0}
    score = np.zeros(total, dtype=np.float32)
    score[1:] = gap_arrays[0][:-1]
    return FrameScores(
        fps=fps, frame_count=total, score=score, gap=gap_arrays, analysis_size=size,
        decode_seconds=elapsed, lookback=lookback, persist_frames=persist_frames, far=far,
        rgb_path=Path(rgb_path) if rgb_path is not None else None,
    )


# -- decisions --------------------------------------------------------------------------------------
def find_cuts(
    scores: FrameScores,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_score: float = DEFAULT_MIN_SCORE,
    window: int = DEFAULT_WINDOW,
    persist_ratio: float = DEFAULT_PERSIST_RATIO,
    min_gap: int = DEFAULT_MIN_GAP,
    suppress_flashes: bool = True,
) -> tuple[int, ...]:
    """Cut frames (first frame of each new scene) from the per-frame signals."""
    n = scores.frame_count
    if n < 2:
        return ()
    s = scores.score.astype(np.float64)
    base = scores.baseline(window)
    ok = (s >= min_score) & (s >= threshold * base)
    if suppress_flashes:
        m = scores.persistence()
        ok &= m >= np.maximum(min_score, persist_ratio * s)
    ok[0] = False
    # Non-maximum suppression: of candidates closer than min_gap frames keep the strongest (a
    # flash next to a cut makes two candidates, one frame apart; the cut is one of them).
    cand = np.flatnonzero(ok)
    blocked = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in sorted(cand.tolist(), key=lambda k: (-s[k], k)):
        if not blocked[i]:
            kept.append(i)
            blocked[max(0, i - min_gap): i + min_gap + 1] = True
    return tuple(sorted(kept))
