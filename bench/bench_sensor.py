"""Sensor tick: one evaluation of the embedding stage's sensor with N clips in Postgres, N/10 of
them ready (``keyframed``), every clip registered in the shared ``clips`` dynamic partition set of
a Dagster instance on PostgreSQL storage (what ``heaters dev`` uses).

    python bench/bench_sensor.py                 # 100,000 clips, 10,000 ready
    python bench/bench_sensor.py --clips 1000    # the smoke size
    heaters bench sensor [--smoke]

A temporary ``HEATERS_HOME`` gets the embedded Postgres, migrated; the clips are inserted with
``generate_series`` (ready ones spread evenly, every 10th clip, so the range runs bridge other
clips as they do in production), the partitions with ``add_dynamic_partitions``. Then a **fresh
process** imports the sensor, builds a sensor context on that instance and evaluates it twice:
the first tick (nothing requested yet: it reads the watched rows, the partition keys, and builds
the run requests, at most 20 runs a tick) and a second tick with the first one's cursor (it
requests the next ready items). Reported: wall time of each tick, the process's peak RSS (``ru_maxrss``,
imports included) and its growth during the first tick. Baseline: the sensor's scan query alone,
timed in the same process. Targets (issue 8): <= 2 s per tick, <= 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

NAME = "sensor"
DESCRIPTION = ("One evaluation of the embedding sensor with 100,000 clips in Postgres (smoke: 1,000), a tenth "
               "of them ready, all registered as dynamic partitions on Dagster's Postgres storage.")
RESULTS = ROOT / "bench" / "results" / "sensor.json"
STAGE = "embedding"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker() -> dict[str, Any]:
    """In a fresh process (env from the parent): evaluate the sensor twice; time and memory."""
    t0 = time.perf_counter()
    import dagster as dg
    from sqlalchemy import select

    from heaters_dagster.pipeline.items import MODELS
    from heaters_dagster.resources.database import DatabaseResource
    from heaters_dagster.sensors.factory import SCAN_LIMIT, build_stage_sensor
    from heaters_dagster.stages import get_stage

    stage = get_stage(STAGE)
    sensor = build_stage_sensor(stage)
    database = DatabaseResource(url=os.environ["HEATERS_DATABASE_URL"])
    import_s = time.perf_counter() - t0
    instance = dg.DagsterInstance.get()
    # Warm the connections the way a long-lived daemon has them (not timed).
    with database.session() as s:
        s.execute(select(MODELS["clip"].id).limit(1)).all()
    instance.get_dynamic_partitions("videos")
    rss_before = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ticks = []
    cursor = None
    for _ in range(2):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": database})
        t = time.perf_counter()
        result = sensor(ctx)
        tick_s = time.perf_counter() - t
        cursor = result.cursor
        reqs = result.run_requests or []
        items = sum(int(r.tags.get("heaters/items", "1")) for r in reqs)
        ticks.append({"tick_s": round(tick_s, 3), "run_requests": len(reqs), "items_requested": items,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    model = MODELS[stage.entity]
    t = time.perf_counter()
    with database.session() as s:
        n = len(s.execute(select(model.id, model.version, model.state)
                          .where(model.state.in_((*stage.input_states, stage.in_progress_state)))
                          .order_by(model.id).limit(SCAN_LIMIT)).all())
    scan_s = time.perf_counter() - t
    return {"import_s": round(import_s, 2), "rss_before_mib": round(rss_before, 1),
            "peak_rss_before_mib": round(peak_before, 1), "ticks": ticks, "scan_query_s": round(scan_s, 4),
            "scan_rows": n, "scan_limit": SCAN_LIMIT,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def populate(n_clips: int, n_videos: int, ready_every: int) -> dict[str, Any]:
    from sqlalchemy import text

    import dagster as dg

    from heaters_dagster.dagster_home import prepare_dagster_home
    from heaters_dagster.database.embedded import ensure_environment
    from heaters_dagster.database.engine import get_engine
    from heaters_dagster.database.migrate import upgrade

    ensure_environment()
    url = os.environ["HEATERS_DATABASE_URL"]
    upgrade(url)
    prepare_dagster_home()
    t0 = time.perf_counter()
    per_video = max(1, n_clips // n_videos)
    with get_engine(url).begin() as c:
        c.execute(text("INSERT INTO source_videos (id, title, source_uri, source_kind, state, fps, frame_count) "
                       "SELECT g, 'bench ' || g, 'file:///bench/' || g || '.mp4', 'file', 'spliced', 30, "
                       ":fpv * 90 FROM generate_series(1, :n) g"), {"n": n_videos, "fpv": per_video})
        # Every ready_every-th clip is keyframed (ready for embedding); the rest are past it or
        # waiting for review, as in a library that has been running for a while.
        c.execute(text(
            "INSERT INTO clips (id, source_video_id, start_frame, end_frame, start_s, end_s, fps, file_key, state) "
            "SELECT g, 1 + (g - 1) / :pv, ((g - 1) % :pv) * 90, ((g - 1) % :pv) * 90 + 90, "
            "((g - 1) % :pv) * 3.0, ((g - 1) % :pv) * 3.0 + 3.0, 30, 'clips/bench/' || g || '.mp4', "
            "CASE WHEN g % :every = 0 THEN 'keyframed' WHEN g % 7 = 0 THEN 'pending_review' "
            "WHEN g % 11 = 0 THEN 'archived' ELSE 'embedded' END FROM generate_series(1, :n) g"),
            {"n": n_clips, "pv": per_video, "every": ready_every})
        c.execute(text("SELECT setval(pg_get_serial_sequence('clips', 'id'), :n)"), {"n": n_clips})
        c.execute(text("ANALYZE clips"))
        ready = c.execute(text("SELECT count(*) FROM clips WHERE state = 'keyframed'")).scalar_one()
    rows_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        keys = [str(i) for i in range(1, n_clips + 1)]
        for i in range(0, len(keys), 10_000):
            instance.add_dynamic_partitions("clips", keys[i:i + 10_000])
        instance.add_dynamic_partitions("videos", [str(i) for i in range(1, n_videos + 1)])
        registered = len(instance.get_dynamic_partitions("clips"))
    return {"clips": n_clips, "videos": n_videos, "ready": int(ready), "partitions": registered,
            "insert_rows_s": round(rows_s, 1), "add_partitions_s": round(time.perf_counter() - t0, 1)}


def run(smoke: bool, out_dir: Path, n_clips: int | None = None) -> dict[str, Any]:
    n = n_clips or (1_000 if smoke else 100_000)
    home = Path(tempfile.mkdtemp(prefix="heaters-bench-sensor-"))
    saved = {k: os.environ.get(k) for k in ("HEATERS_HOME", "HEATERS_DATABASE_URL", "HEATERS_DAGSTER_DATABASE_URL",
                                             "DAGSTER_HOME", "HEATERS_CONFIG")}
    # The benchmark's own child process inherits these; restore the caller's afterwards.
    os.environ.update({"HEATERS_HOME": str(home), "HEATERS_CONFIG": "none"})
    for k in ("HEATERS_DATABASE_URL", "HEATERS_DAGSTER_DATABASE_URL", "DAGSTER_HOME"):
        os.environ.pop(k, None)
    from heaters_dagster.database.embedded import stop_embedded

    try:
        setup = populate(n, max(1, n // 1000), 10)
        print(f"sensor: {setup}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"sensor worker failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        stop_embedded()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)
    doc = {"benchmark": NAME, "description": DESCRIPTION, "smoke": smoke, "generated_at": stamp(),
           "host": host_info(), "stage": STAGE, "setup": setup, "measured": measured}
    doc["figures"] = summarize(doc)
    return doc


def summarize(doc: dict) -> list[dict]:
    m = doc["measured"]
    first, second = m["ticks"][0], m["ticks"][1]
    n = doc["setup"]["clips"]
    return [
        figure(f"first tick, {n:,} clips", first["tick_s"], "s", target=2.0, baseline=m["scan_query_s"],
               baseline_name="scan query alone",
               note=f"{first['run_requests']} run requests, {first['items_requested']} items "
                    f"(scan limit {m['scan_limit']})"),
        figure("second tick (the first one's cursor)", second["tick_s"], "s", target=2.0,
               baseline=m["scan_query_s"], baseline_name="scan query alone",
               note=f"{second['run_requests']} more run requests, {second['items_requested']} items"),
        figure("peak RSS of the process", m["peak_rss_mib"] * 1.048576, "MB", target=300.0,
               baseline=m["peak_rss_before_mib"] * 1.048576, baseline_name="after imports, before the tick"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker()))
        return 0
    doc = run(args.clips <= 1000, args.out.parent, args.clips)
    write_json(args.out, doc)
    print(json.dumps(doc["figures"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
