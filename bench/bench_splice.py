#!/usr/bin/env python
"""Benchmark of the splice stage: scene detection (and clip cutting) against a bare decode.

Generates (once, cached under ``bench/.cache/``) a long 1080p H.264/AAC source with known cuts,
then measures in the same run:

(a) bare decode: wall time of ``ffmpeg -threads T -i src -map 0:v:0 -an -sn -f null -`` (the
    video decode that scene detection cannot avoid);
(b) ``detect_scenes(src)``: wall time and its ratio to (a) (target <= 1.5x);
(c) peak RSS of the Python process running the detection and of its ffmpeg children
    (target < 1 GiB);
(d) when ``heaters_dagster.media.clips.cut_clips`` is importable: the time and peak RSS of
    cutting every kept scene, reported separately.

Every phase runs in a fresh worker process (this script with ``--worker``) so that its
``ru_maxrss`` figures (self and children) belong to that phase alone. Phases alternate
(bare, detect, bare, detect, ...) with ``--repeat``; the table reports the fastest of each.
Results go to ``bench/results/splice.json``. Generation time is excluded from every figure.

    python bench/bench_splice.py                 # one hour, 1920x1080, 30 fps
    python bench/bench_splice.py --minutes 5 --repeat 2
    python bench/bench_splice.py --minutes 5 --no-cut
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results" / "splice.json"
GIB = 1024 ** 3

# Moving lavfi patterns (source, extra filters, render divisor), clearly different from each other.
# Noise-like sources are rendered at 1/4 size and scaled up, so that the 1080p source has a
# realistic bitrate (~10 Mb/s) rather than the ~90 Mb/s of per-pixel noise.
PATTERNS: tuple[tuple[str, str, int], ...] = (
    ("testsrc2", "", 1),
    ("testsrc", "", 1),
    ("smptehdbars", "", 1),
    ("rgbtestsrc", "", 1),
    ("life=ratio=0.3:mold=10:death_color=#202060:life_color=#f0c020", "", 4),
    ("cellauto=rule=110", "", 4),
    ("testsrc2", "hflip,hue=h=120", 1),
    ("mandelbrot", "", 4),
    ("life=ratio=0.5:seed=7:mold=5:death_color=#402010:life_color=#20c0f0", "", 4),
)
PATTERN_SECONDS = 24  # each pattern is encoded once; scenes are keyframe-aligned slices of it
SCENE_SECONDS = (1, 12)  # scene lengths (whole seconds) drawn uniformly from this range


def _ffmpeg() -> str:
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin

    return ffmpeg_bin()


def _ffprobe() -> str:
    from heaters_dagster.media.ffmpeg_tools import ffprobe_bin

    return ffprobe_bin()


# -- source generation (cached) ------------------------------------------------------------------
def _pattern_file(idx: int, width: int, height: int, fps: int) -> Path:
    src, post, div = PATTERNS[idx]
    out = CACHE / f"pattern{idx}_{width}x{height}_{fps}.mp4"
    if out.exists():
        return out
    sep = ":" if "=" in src else "="
    rw, rh = max(2, width // div // 2 * 2), max(2, height // div // 2 * 2)
    vf = f"scale={width}:{height}:flags=bicubic,setsar=1" + (f",{post}" if post else "") + ",format=yuv420p"
    tmp = out.with_suffix(".tmp.mp4")
    subprocess.run([
        _ffmpeg(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"{src}{sep}size={rw}x{rh}:rate={fps}",
        "-frames:v", str(PATTERN_SECONDS * fps), "-vf", vf,
        # a keyframe every second and no B-frames: whole-second slices are frame exact with -c copy
        "-c:v", "libx264", "-preset", "ultrafast", "-g", str(fps), "-keyint_min", str(fps),
        "-sc_threshold", "0", "-bf", "0", "-r", str(fps), str(tmp),
    ], check=True)
    tmp.rename(out)
    return out


def make_source(minutes: float, width: int, height: int, fps: int, seed: int = 1) -> tuple[Path, dict]:
    """A cached source with known cuts; returns (path, truth)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stem = f"splice_{minutes:g}min_{width}x{height}_{fps}fps_s{seed}"
    src, meta = CACHE / f"{stem}.mp4", CACHE / f"{stem}.json"
    if src.exists() and meta.exists():
        return src, json.loads(meta.read_text())
    t0 = time.perf_counter()
    rng = random.Random(seed)
    total_s = int(round(minutes * 60))
    scenes: list[tuple[int, int, int]] = []  # (pattern, inpoint s, length s)
    acc, prev = 0, -1
    while acc < total_s:
        length = min(rng.randint(*SCENE_SECONDS), total_s - acc)
        pat = rng.choice([i for i in range(len(PATTERNS)) if i != prev])
        start = rng.randint(0, PATTERN_SECONDS - length)
        scenes.append((pat, start, length))
        acc += length
        prev = pat
    files = {i: _pattern_file(i, width, height, fps) for i in sorted({p for p, _, _ in scenes})}
    lst = CACHE / f"{stem}.concat.txt"
    lst.write_text("ffconcat version 1.0\n" + "".join(
        f"file '{files[p].name}'\ninpoint {a}\noutpoint {a + n}\n" for p, a, n in scenes))
    tmp = src.with_suffix(".tmp.mp4")
    subprocess.run([
        _ffmpeg(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "concat", "-safe", "0", "-i", str(lst),
        "-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=48000:duration={total_s}",
        "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-b:a", "96k", "-ac", "1",
        "-shortest", "-movflags", "+faststart", str(tmp),
    ], check=True)
    tmp.rename(src)
    cuts, f = [], 0
    for _, _, n in scenes[:-1]:
        f += n * fps
        cuts.append(f)
    frames = int(subprocess.run(
        [_ffprobe(), "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=nb_read_packets", "-of", "csv=p=0", str(src)],
        check=True, capture_output=True, text=True).stdout.strip() or 0)
    truth = {
        "minutes": minutes, "width": width, "height": height, "fps": fps, "seed": seed,
        "expected_frames": total_s * fps, "packets": frames, "cut_frames": cuts,
        "scene_count": len(scenes), "generate_seconds": round(time.perf_counter() - t0, 1),
    }
    meta.write_text(json.dumps(truth))
    return src, truth


# -- workers (one process per measured phase) ---------------------------------------------------------
def _vm_hwm_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _RssSampler(threading.Thread):
    """Samples this process's VmRSS (the ru_maxrss / VmHWM numbers are the authoritative peak)."""

    def __init__(self, period: float = 0.1):
        super().__init__(daemon=True)
        self.period, self.peak_kib, self.samples = period, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                        self.samples += 1
                        break
            except OSError:
                return
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _usage(before_kib: int) -> dict:
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    child_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "python_rss_before_mib": round(before_kib / 1024, 1),
        "python_peak_rss_mib": round(max(self_ru.ru_maxrss, _vm_hwm_kib()) / 1024, 1),  # KiB on Linux
        "ffmpeg_peak_rss_mib": round(child_ru.ru_maxrss / 1024, 1),  # largest child
        "python_cpu_s": round(self_ru.ru_utime + self_ru.ru_stime, 2),
        "ffmpeg_cpu_s": round(child_ru.ru_utime + child_ru.ru_stime, 2),
    }


def worker(phase: str, args: argparse.Namespace) -> dict:
    src = Path(args.src)
    if phase == "bare":
        before = _vm_hwm_kib()
        cmd = [_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", str(args.threads),
               "-i", str(src), "-map", "0:v:0", "-an", "-sn", "-f", "null", "-"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        return {"wall_s": round(time.perf_counter() - t0, 3), "command": " ".join(cmd), **_usage(before)}
    if phase == "detect":
        import numpy  # noqa: F401  (imports are not part of the measurement)

        from heaters_dagster.media.scenes import detect_scenes

        before = _vm_hwm_kib()
        sampler = _RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        det = detect_scenes(src, analysis_width=args.analysis_width, threads=args.threads)
        wall = time.perf_counter() - t0
        sampler.stop()
        Path(args.spans_out).write_text(json.dumps({
            "fps": det.fps, "spans": [[s.start_frame, s.end_frame] for s in det.scenes]}))
        return {
            "wall_s": round(wall, 3), "decode_s": round(det.decode_seconds, 3),
            "frames": det.frame_count, "fps": det.fps, "cut_frames": list(det.cut_frames),
            "kept": len(det.scenes), "dropped": len(det.dropped), "analysis_size": list(det.analysis_size),
            "sampled_peak_rss_mib": round(sampler.peak_kib / 1024, 1), **_usage(before),
        }
    if phase == "cut":
        from heaters_dagster.media.clips import cut_clips

        spans_doc = json.loads(Path(args.spans_in).read_text())
        spans = [tuple(s) for s in spans_doc["spans"]]
        if args.cut_scenes:
            spans = spans[: args.cut_scenes]
        out_dir = Path(tempfile.mkdtemp(prefix="clips_", dir=CACHE))
        before = _vm_hwm_kib()
        sampler = _RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        try:
            res = cut_clips(src, spans, out_dir, fps=spans_doc["fps"])
            wall = time.perf_counter() - t0
            sampler.stop()
            clips = list(getattr(res, "clips", []) or [])
            size = sum(int(getattr(c, "size_bytes", 0) or 0) for c in clips)
            frames = sum(e - s for s, e in spans)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        return {
            "wall_s": round(wall, 3), "clips": len(clips), "spans": len(spans), "frames": frames,
            "clip_bytes": size, "sampled_peak_rss_mib": round(sampler.peak_kib / 1024, 1), **_usage(before),
        }
    raise SystemExit(f"unknown phase {phase}")


def run_phase(phase: str, src: Path, args: argparse.Namespace, **extra: str) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", dir=CACHE, delete=False) as fh:
        out = Path(fh.name)
    try:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--src", str(src),
               "--result", str(out), "--threads", str(args.threads),
               "--analysis-width", str(args.analysis_width), "--cut-scenes", str(args.cut_scenes or 0)]
        for k, v in extra.items():
            cmd += [f"--{k.replace('_', '-')}", v]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# -- reporting ---------------------------------------------------------------------------------------
def match_cuts(found: list[int], truth: list[int], tol: int = 1) -> dict:
    left = sorted(found)
    hit = 0
    for c in truth:
        near = [f for f in left if abs(f - c) <= tol]
        if near:
            left.remove(min(near, key=lambda f: abs(f - c)))
            hit += 1
    return {"true_cuts": len(truth), "found": len(found), "matched_within_1": hit,
            "missed": len(truth) - hit, "spurious": len(left)}


def host_info() -> dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    ver = subprocess.run([_ffmpeg(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu, "python": platform.python_version(),
            "ffmpeg": ver, "loadavg_start": list(os.getloadavg())}


def print_table(summary: dict) -> None:
    cols = [("bare decode", summary["bare"]), ("detect_scenes", summary["detect"])]
    if summary.get("cut"):
        cols.append(("cut_clips", summary["cut"]))
    rows = [
        ("wall time (s)", lambda r: f"{r['wall_s']:.2f}"),
        ("frames / s", lambda r: f"{r['frames_per_s']:.0f}" if r.get("frames_per_s") else "-"),
        ("x bare decode", lambda r: f"{r['wall_s'] / summary['bare']['wall_s']:.2f}x"),
        ("python peak RSS (MiB)", lambda r: f"{r['python_peak_rss_mib']:.0f}"),
        ("ffmpeg peak RSS (MiB)", lambda r: f"{r['ffmpeg_peak_rss_mib']:.0f}"),
        ("python CPU (s)", lambda r: f"{r['python_cpu_s']:.1f}"),
        ("ffmpeg CPU (s)", lambda r: f"{r['ffmpeg_cpu_s']:.1f}"),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    print("".ljust(w0) + "".join(name.rjust(16) for name, _ in cols))
    for label, fmt in rows:
        print(label.ljust(w0) + "".join(fmt(r).rjust(16) for _, r in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="source length (default 60)")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="ffmpeg decoder threads for both (0 = auto)")
    ap.add_argument("--analysis-width", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="alternating bare/detect rounds (best is kept)")
    ap.add_argument("--no-cut", action="store_true", help="skip the cut_clips measurement")
    ap.add_argument("--cut-scenes", type=int, default=0, help="cut only the first N kept scenes (0 = all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--spans-out", help=argparse.SUPPRESS)
    ap.add_argument("--spans-in", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.analysis_width is None:
        from heaters_dagster.media.scenes import DEFAULT_ANALYSIS_WIDTH

        args.analysis_width = DEFAULT_ANALYSIS_WIDTH
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args)))
        return

    print(f"source: {args.minutes:g} min {args.width}x{args.height} {args.fps} fps (cached in {CACHE})",
          flush=True)
    t0 = time.perf_counter()
    src, truth = make_source(args.minutes, args.width, args.height, args.fps)
    print(f"  {src.name}: {src.stat().st_size / 1e6:.0f} MB, {truth['expected_frames']} frames, "
          f"{len(truth['cut_frames'])} cuts (ready in {time.perf_counter() - t0:.1f} s; not measured)",
          flush=True)
    host = host_info()
    spans_file = CACHE / "splice_spans.json"
    rounds = []
    for i in range(max(1, args.repeat)):
        bare = run_phase("bare", src, args)
        print(f"  round {i + 1}: bare decode {bare['wall_s']:.2f} s", flush=True)
        det = run_phase("detect", src, args, spans_out=str(spans_file))
        print(f"  round {i + 1}: detect_scenes {det['wall_s']:.2f} s "
              f"({det['wall_s'] / bare['wall_s']:.2f}x)", flush=True)
        rounds.append({"bare": bare, "detect": det})
    best_bare = min((r["bare"] for r in rounds), key=lambda r: r["wall_s"])
    best_det = min((r["detect"] for r in rounds), key=lambda r: r["wall_s"])
    frames = best_det["frames"]
    for r in (best_bare, best_det):
        r["frames_per_s"] = round(frames / r["wall_s"], 1)
    accuracy = match_cuts(best_det["cut_frames"], truth["cut_frames"])

    cut = None
    cut_note = None
    if args.no_cut:
        cut_note = "skipped (--no-cut)"
    else:
        try:
            from heaters_dagster.media.clips import cut_clips  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - report why, do not fail the benchmark
            cut_note = f"heaters_dagster.media.clips.cut_clips not importable: {exc!r}"
        else:
            print("  cutting clips ...", flush=True)
            cut = run_phase("cut", src, args, spans_in=str(spans_file))
            cut["frames_per_s"] = round(cut["frames"] / cut["wall_s"], 1) if cut["wall_s"] else None
    spans_file.unlink(missing_ok=True)

    ratio = best_det["wall_s"] / best_bare["wall_s"]
    # CPU seconds are less disturbed than wall time by other work on a shared machine
    bare_cpu = min(r["bare"]["ffmpeg_cpu_s"] + r["bare"]["python_cpu_s"] for r in rounds)
    det_cpu = min(r["detect"]["ffmpeg_cpu_s"] + r["detect"]["python_cpu_s"] for r in rounds)
    cpu_ratio = det_cpu / bare_cpu if bare_cpu else float("nan")
    peak_total = best_det["python_peak_rss_mib"] + best_det["ffmpeg_peak_rss_mib"]
    summary = {"bare": best_bare, "detect": best_det, "cut": cut}
    print()
    print_table(summary)
    print()
    print(f"detect/bare ratio: {ratio:.2f}x (target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'})")
    print(f"detect/bare CPU-time ratio: {cpu_ratio:.2f}x (ffmpeg + python CPU s, best of "
          f"{len(rounds)}: {det_cpu:.1f} vs {bare_cpu:.1f})")
    print(f"detect peak RSS: python {best_det['python_peak_rss_mib']:.0f} MiB + ffmpeg "
          f"{best_det['ffmpeg_peak_rss_mib']:.0f} MiB = {peak_total:.0f} MiB "
          f"(target < 1024 MiB: {'PASS' if peak_total < 1024 else 'FAIL'})")
    print(f"cuts: {accuracy['matched_within_1']}/{accuracy['true_cuts']} found within +-1 frame, "
          f"{accuracy['spurious']} spurious; {best_det['kept']} scenes kept, {best_det['dropped']} dropped")
    if cut:
        cut_total = cut["python_peak_rss_mib"] + cut["ffmpeg_peak_rss_mib"]
        print(f"cut_clips: {cut['clips']} clips, {cut['frames']} frames in {cut['wall_s']:.1f} s, "
              f"peak RSS python {cut['python_peak_rss_mib']:.0f} + ffmpeg {cut['ffmpeg_peak_rss_mib']:.0f}"
              f" = {cut_total:.0f} MiB")
    else:
        print(f"cut_clips: {cut_note}")

    for r in rounds:  # keep the JSON small: cut lists only once, in the summary
        r["detect"] = {k: v for k, v in r["detect"].items() if k != "cut_frames"}
    doc = {
        "benchmark": "splice",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {**host, "loadavg_end": list(os.getloadavg())},
        "source": {"path": str(src.relative_to(ROOT)), "bytes": src.stat().st_size,
                   **{k: v for k, v in truth.items() if k != "cut_frames"}},
        "settings": {"threads": args.threads, "analysis_width": args.analysis_width, "repeat": args.repeat,
                     "cut_scenes": args.cut_scenes or "all"},
        "bare_decode": best_bare,
        "detect_scenes": {k: v for k, v in best_det.items() if k != "cut_frames"},
        "detect_over_bare": round(ratio, 3),
        "detect_over_bare_cpu": round(cpu_ratio, 3),
        "detect_peak_rss_total_mib": round(peak_total, 1),
        "targets": {"detect_over_bare_max": 1.5, "peak_rss_max_mib": 1024,
                    "ratio_ok": ratio <= 1.5, "rss_ok": peak_total < 1024},
        "accuracy": accuracy,
        "cut_clips": cut if cut else {"skipped": cut_note},
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()


# -- `heaters bench splice` (bench/common.py) ----------------------------------------------------
NAME = "splice"
DESCRIPTION = ("Scene detection against a bare decode of the same generated source (with known cuts); "
               "full: 60 min 1080p30 without cut_clips, smoke: 0.2 min 640x360 with cut_clips.")


def summarize(doc: dict) -> list[dict]:
    from common import figure

    acc = doc.get("accuracy") or {}
    cut = doc.get("cut_clips") or {}
    figs = [
        figure("detect / bare decode, wall", doc["detect_over_bare"], "x", target=1.5,
               baseline=1.0, baseline_name="bare decode"),
        figure("detect / bare decode, CPU time", doc.get("detect_over_bare_cpu"), "x", target=1.5, baseline=1.0,
               baseline_name="bare decode"),
        figure("detect_scenes wall", doc["detect_scenes"]["wall_s"], "s", baseline=doc["bare_decode"]["wall_s"],
               baseline_name="bare decode"),
        figure("detect peak RSS (Python + ffmpeg)", doc["detect_peak_rss_total_mib"], "MiB", target=1024),
        figure("cuts found within +-1 frame", acc.get("matched_within_1", 0) / max(1, acc.get("true_cuts", 1)),
               "fraction", target=1.0, kind="min", note=f"{acc.get('spurious', '?')} spurious"),
    ]
    if cut.get("wall_s"):
        figs.append(figure("cut_clips wall", cut["wall_s"], "s", note=f"{cut.get('clips')} clips re-encoded"))
    return figs


def run(smoke: bool, out_dir: Path) -> dict:
    from common import run_script

    args = ["--minutes", "0.2", "--width", "640", "--height", "360"] if smoke else ["--no-cut"]
    doc = run_script("bench_splice.py", args, out_dir, NAME)
    doc["figures"] = summarize(doc)
    return doc
