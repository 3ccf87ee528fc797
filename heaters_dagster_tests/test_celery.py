"""Scale-out on Celery gives the single-host results: a real Redis broker, moto's S3 API server
and two ``heaters worker`` processes on loopback run the pipeline from submit to ``embedded``
(every clip approved through review events, as a reviewer would) over three generated videos,
with the artifact store on S3 and the Dagster instance on PostgreSQL. The clips, artifacts and
vectors equal those of an in-process single-host run on the same inputs; no item is processed
twice; both workers did steps; and a worker process killed mid-step (SIGKILL of the pid in the
claim owner, during keyframes or embedding) is recovered: Celery reports the task lost, its run
fails, ``release_failed_runs`` hands its items back and a live worker does them.

Everything is started once for the module (broker, S3 server, workers) and killed on teardown.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from sqlalchemy import select, text

from heaters_dagster.database.engine import get_engine
from heaters_dagster.database.models import Clip, ClipArtifact, Embedding, SourceVideo, StageResult
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.sensors.review import auto_approve
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.celery_harness import REDIS_SERVER, CeleryCluster, kill_when_claimed
from heaters_dagster_tests.conftest import TABLES
from heaters_dagster_tests.pipeline_helpers import submit

pytestmark = pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="redis-server is not installed "
                                "(scripts/setup.sh installs it)")

VIDEOS = {"a": (1.2, 1.5), "b": (1.5, 1.2), "c": (1.2, 1.2)}
# Small runs, so the two workers share each stage; a short lease, so a dead worker's claim expires
# soon; the 64-d test architecture with random weights in fp32 (int8's dynamic quantisation makes a
# vector depend on the rest of its batch, and runs of another size batch differently).
EMBED = {"model_name": "heaters-tiny-vit", "pretrained": "none", "precision": "fp32"}
ENV = {"HEATERS_MAX_PARTITIONS_PER_RUN": "2", "HEATERS_LEASE_S": "6", "HEATERS_MAX_FFMPEG": "1",
       "HEATERS_CLIP_MODEL": EMBED["model_name"], "HEATERS_CLIP_PRECISION": EMBED["precision"]}


def _truncate(url: str) -> None:
    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


def _approve_all(db: DatabaseResource) -> int:
    return auto_approve(db, reviewer="tester")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(db: DatabaseResource, store: ArtifactStore) -> dict:
    """Per video title: its clips in order, each with its state, file digest, artifacts (type,
    strategy, tag, digest, layout) and vectors; store keys (which carry random parts) left out."""
    out: dict = {}
    with db.session() as s:
        for v in s.execute(select(SourceVideo).order_by(SourceVideo.id)).scalars():
            clips = []
            for c in s.execute(select(Clip).where(Clip.source_video_id == v.id)
                               .order_by(Clip.start_frame)).scalars():
                arts = sorted((a.artifact_type, a.strategy, a.tag, a.size_bytes, _sha(store.read_bytes(a.storage_key)),
                               repr(sorted(a.meta.items())))
                              for a in s.execute(select(ClipArtifact).where(ClipArtifact.clip_id == c.id)).scalars())
                vecs = sorted((e.model_id, e.strategy, e.dim, tuple(np.asarray(e.embedding, dtype=np.float64)))
                              for e in s.execute(select(Embedding).where(Embedding.clip_id == c.id)).scalars())
                clips.append({"span": (c.start_frame, c.end_frame), "state": c.state,
                              "file": _sha(store.read_bytes(c.file_key)), "artifacts": arts, "vectors": vecs})
            out[v.title] = {"state": v.state, "frames": v.frame_count, "clips": clips}
    return out


def _submit_all(db: DatabaseResource, store: ArtifactStore, videos: dict[str, Path]) -> None:
    for title, path in videos.items():
        submit(db, store, path, title)


@pytest.fixture(scope="module")
def videos(media_dir) -> dict[str, Path]:
    return {t: make_video(media_dir / f"celery_{t}.mp4", scenes, fps=24, width=160, height=96).path
            for t, scenes in VIDEOS.items()}


@pytest.fixture(scope="module")
def baseline(db_url, videos, tmp_path_factory) -> dict:
    """The single-host run: in process, local store, the same settings otherwise."""
    from heaters_dagster.definitions import build_definitions
    from heaters_dagster.inprocess import PipelineDriver

    _truncate(db_url)
    root = tmp_path_factory.mktemp("celery-baseline")
    defs = build_definitions(database_url=db_url, storage_url=str(root / "store"),
                             stage_params={"embedding": EMBED})
    db, store = defs.resources["database"], defs.resources["storage"].store
    _submit_all(db, store, videos)
    mp = pytest.MonkeyPatch()
    for k, v in ENV.items():
        mp.setenv(k, v)
    try:
        with dg.instance_for_test() as instance:
            driver = PipelineDriver(defs, instance)
            driver.run_until_idle()
            assert _approve_all(db) > 0
            driver.run_until_idle()
    finally:
        mp.undo()
    snap = snapshot(db, store)
    _truncate(db_url)
    return snap


@pytest.fixture(scope="module")
def cluster(db_url, baseline, tmp_path_factory):
    root = tmp_path_factory.mktemp("celery-cluster")
    with CeleryCluster(root, db_url, extra_env=ENV) as c:
        c.start_workers(2)
        yield c


@pytest.fixture(scope="module")
def celery_run(cluster, db_url, videos):
    """Submit to embedded over Celery; one worker process is killed in the middle of a keyframes or
    embedding step (the first it is seen holding a claim of)."""
    _truncate(db_url)
    db, store = DatabaseResource(url=db_url), cluster.store()
    _submit_all(db, store, videos)
    driver = cluster.driver()
    driver.run_until_idle(settle_s=1.0)
    assert db and _approve_all(db) > 0
    worker_pids = lambda: set().union(*(w.pids() for w in cluster.workers)) - {w.proc.pid for w in cluster.workers}
    killer = kill_when_claimed(db_url, ("keyframing", "embedding"), worker_pids)
    try:
        driver.run_until_idle(settle_s=1.0)
    finally:
        killer.stop.set()
        killer.join(5)
    return {"driver": driver, "killed": killer.killed, "snapshot": snapshot(db, store), "db": db, "store": store}


def test_two_celery_workers_give_the_single_host_results(celery_run, baseline):
    snap = celery_run["snapshot"]
    assert set(snap) == set(VIDEOS)
    for title, video in snap.items():
        assert video["state"] == "spliced"
        assert video["clips"] and all(c["state"] == "embedded" for c in video["clips"]), (title, video["clips"])
        assert all(c["vectors"] for c in video["clips"])
    assert [c["span"] for v in snap.values() for c in v["clips"]] == \
        [c["span"] for v in baseline.values() for c in v["clips"]]
    for title in VIDEOS:
        for got, want in zip(snap[title]["clips"], baseline[title]["clips"]):
            assert got["file"] == want["file"], (title, got["span"])
            assert got["artifacts"] == want["artifacts"], (title, got["span"])
            assert [v[:3] for v in got["vectors"]] == [v[:3] for v in want["vectors"]]
            for (*_, a), (*_, b) in zip(got["vectors"], want["vectors"]):
                np.testing.assert_allclose(a, b, atol=1e-5)
                assert float(np.dot(a, b)) > 0.99999
    # the artifacts are on the S3 server, not on a local disk
    store = celery_run["store"]
    assert not store.is_local and store.url.startswith("s3://")


def test_no_item_processed_twice_and_both_workers_worked(celery_run):
    driver, db = celery_run["driver"], celery_run["db"]
    instance = driver.instance
    with db.session() as s:
        done = s.execute(select(StageResult.stage, StageResult.entity_kind, StageResult.entity_id)
                         .where(StageResult.status == "succeeded")).all()
        n_clips = s.execute(select(Clip.id)).all()
    assert len(done) == len(set(done)), "an item succeeded twice in one stage"
    for stage in ("sprite", "keyframes", "embedding"):
        recs = instance.fetch_materializations(dg.AssetKey(stage), limit=1000).records
        keys = [r.partition_key for r in recs]
        assert len(keys) == len(set(keys)) == len(n_clips), (stage, sorted(keys))
    # every step ran on a Celery worker, and both workers ran steps
    hosts = set()
    for run in driver.runs:
        for rec in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
            md = rec.event_log_entry.dagster_event.engine_event_data.metadata or {}
            if "Celery worker" in md:
                hosts.add(md["Celery worker"].value)
    assert len(hosts) == 2, hosts


def test_worker_killed_mid_task_is_recovered(celery_run, cluster):
    killed = celery_run["killed"]
    assert killed is not None, "no keyframes/embedding step was caught in flight"
    clip_id, owner = killed
    driver = celery_run["driver"]
    failed = [r for r in driver.runs if not r.success]
    assert failed and all(r.stage in ("keyframes", "embedding") for r in failed), failed
    with celery_run["db"].session() as s:
        clip = s.get(Clip, clip_id)
        assert clip.state == "embedded" and clip.claim_owner is None
        history = clip.claim_history or []
        assert any(h.get("owner") == owner for h in history), history
        assert s.execute(select(Embedding).where(Embedding.clip_id == clip_id)).first() is not None
    # the worker that lost its process is still serving (Celery replaced the process)
    assert all(w.proc.poll() is None for w in cluster.workers)
    assert len(cluster.celery_app().control.ping(timeout=2.0)) == 2


def test_teardown_leaves_nothing(tmp_path, db_url):
    """Starting and stopping the cluster kills redis, moto and the workers with their children."""
    import psutil

    with CeleryCluster(tmp_path / "c", db_url) as c:
        c.start_workers(1)
        pids = {p.pid for p in c.procs} | set().union(*(w.pids() for w in c.workers))
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    assert shutil.which("redis-server")
