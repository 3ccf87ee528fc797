"""Crash safety with ``HEATERS_INPROCESS_EXECUTOR=1`` under the real ``heaters dev``.

With Dagster's ``in_process_executor`` a stage job's one step runs inside the run worker, so
there is no step process: the run worker itself holds the claims. These tests kill that process
in the middle of the work and assert the same end state as ``test_daemon_faults.py`` does for the
multiprocess layout: the run is marked failed, its item is handed back (run failure sensor) or
its claim expires (recovery sensor), the item completes exactly once, nothing is stuck in an
in-progress state and no orphan file is left.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from heaters_dagster import leases
from heaters_dagster_tests.dev_harness import free_port, running_dev
from heaters_dagster_tests.test_daemon_faults import (
    DEV_ENV,
    Dev,
    _claimed,
    _done,
    _assert_clean,
    _video,
    assert_killed_run_failed,
    assert_terminated_run_canceled,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    home = tmp_path_factory.mktemp("dev-faults-inprocess")
    with running_dev(home, {**DEV_ENV, "HEATERS_INPROCESS_EXECUTOR": "1"}, free_port()) as proc:
        yield Dev(proc, home)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-media-inprocess")


def _kill_claim_owner(dev: Dev, table: str, item_id: int, state: str) -> str:
    """SIGKILL the process that holds the item's claim; assert it is the run worker (no step
    process: its parent is the code server). Returns the killed run's id."""
    row = wait_for(lambda: _claimed(dev, table, item_id, state), 180, f"a run to claim {table} {item_id}", dev.proc)
    return _kill(dev, table, item_id, row.claim_owner)


def _kill(dev: Dev, table: str, item_id: int, claim_owner: str) -> str:
    pid = leases.owner_pid(claim_owner)
    assert pid and pid != dev.proc.proc.pid and psutil.pid_exists(pid)
    worker = psutil.Process(pid)
    parent = worker.parent()
    assert parent is not None and "api" in parent.cmdline() and "grpc" in parent.cmdline(), (
        "with the in-process executor the claim should be held by the run worker, a child of the code server; "
        f"its parent is {parent.cmdline() if parent else None}")
    run_id = dev.sql(f"SELECT claim_run_id FROM {table} WHERE id = :i", i=item_id)[0][0]
    os.kill(pid, signal.SIGKILL)
    return run_id


def test_sigkill_of_the_run_worker_mid_splice_inprocess(dev, media):
    clip = _video(media, "inproc-splice-kill", [5.0, 6.0, 5.0, 6.0, 5.0])
    vid = dev.submit(clip.path, "in-process run worker kill, splice")
    run_id = _kill_claim_owner(dev, "source_videos", vid, "splicing")
    wait_for(lambda: _done(dev, vid, 5), 240, "the video to be spliced and its clips sprited", dev.proc)
    _assert_clean(dev, vid, 5)
    assert_killed_run_failed(dev, run_id, "splice", vid)


def test_sigkill_of_the_run_worker_mid_sprite_inprocess(dev, media):
    """A sprite run covers many clips: killing it mid-run hands back the clip it was on and the
    clips it had not reached; every clip ends with exactly one sprite."""
    clip = _video(media, "inproc-sprite-kill", [3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    vid = dev.submit(clip.path, "in-process run worker kill, sprite")
    wait_for(lambda: dev.sql("SELECT count(*) FROM clips WHERE source_video_id = :v", v=vid)[0][0] == 6, 240,
             "the video's clips", dev.proc)
    row = wait_for(lambda: (dev.sql("SELECT id, claim_owner FROM clips WHERE source_video_id = :v AND "
                                    "state = 'generating_sprite' AND claim_owner IS NOT NULL LIMIT 1", v=vid)
                            or [None])[0], 180, "a sprite run to claim a clip", dev.proc, every=0.05)
    run_id = _kill(dev, "clips", row.id, row.claim_owner)
    wait_for(lambda: _done(dev, vid, 6), 240, "every clip to be sprited", dev.proc)
    _assert_clean(dev, vid, 6)
    # clips it finished before the kill may have materialized
    assert_killed_run_failed(dev, run_id, "sprite", row.id, materialized_nothing=False)



def test_a_sprite_run_terminated_from_the_ui_is_canceled_inprocess(dev, media):
    """With the in-process executor Dagster would retry the interrupted step inside the same run
    worker (the assets' RetryPolicy; dagster#15026) and the terminated run would end SUCCESS."""
    assert_terminated_run_canceled(dev, media, "inproc-sprite-terminate")


@pytest.fixture()
def flaky_server(media):
    """A loopback HTTP server that answers 503 to every GET until ``ok`` is set, then serves a
    two-scene video: a download that fails transiently, then would succeed."""
    import functools
    import http.server
    import threading

    body = _video(media, "flaky-body", [2.0, 2.0]).path.read_bytes()
    ok = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _head(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body) if status == 200 else 0))
            self.end_headers()

        def do_HEAD(self) -> None:
            self._head(200 if ok.is_set() else 503)

        def do_GET(self) -> None:
            self._head(200 if ok.is_set() else 503)
            if ok.is_set():
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/flaky.mp4", ok
    srv.shutdown()
    srv.server_close()


def test_a_run_terminated_after_a_transient_error_does_not_strand_that_item(dev, media, flaky_server,
                                                                            monkeypatch):
    """An ingest run covers two videos: one download fails with HTTP 503 (transient: the executor
    sends the video back to `new` at its requested version, for the step's retry), the other is
    still being worked on when an operator terminates the run. No retry comes after a terminate, and
    the sensor never requests a version twice, so the failed video would sit in `new` for good; the
    cancellation sensor gives it a new version instead, and both videos complete once."""
    from heaters_dagster.database.engine import get_engine, session_scope
    from heaters_dagster.pipeline.submit import submit_source

    monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", "1")
    url, ok = flaky_server
    slow = _video(media, "terminate-neighbour", [15.0, 15.0, 15.0])
    with session_scope(get_engine(dev.url)) as s:  # one commit: both in the same ingest run
        flaky = submit_source(s, dev.store, url, "flaky download").video_id
        busy = submit_source(s, dev.store, str(slow.path), "busy neighbour").video_id
    failed = wait_for(lambda: dev.sql("SELECT run_id FROM stage_results WHERE stage = 'ingest' AND entity_id = :v "
                                      "AND status = 'transient_error'", v=flaky), 180,
                      "the download to fail transiently", dev.proc, every=0.05)
    run_id = failed[0].run_id
    wait_for(lambda: dev.sql("SELECT claim_run_id FROM source_videos WHERE id = :v", v=busy)[0][0] == run_id, 60,
             "the same run to work on the other video", dev.proc, every=0.05)
    data = dev.proc.graphql(
        "mutation($r: String!) { terminateRun(runId: $r) { __typename "
        "... on TerminateRunFailure { message } ... on PythonError { message } } }", {"r": run_id})
    assert data["terminateRun"]["__typename"] == "TerminateRunSuccess", data
    status = lambda: dev.dagster_sql("SELECT status FROM runs WHERE run_id = :r", r=run_id)[0][0]
    wait_for(lambda: status() not in ("STARTED", "CANCELING"), 90, "the terminated run to end", dev.proc)
    assert status() == "CANCELED"
    ok.set()  # the next download succeeds
    try:
        wait_for(lambda: _done(dev, flaky, 2) and _done(dev, busy, 3), 300, "both videos to complete", dev.proc)
    except AssertionError:
        print("videos:", dev.sql("SELECT id, state, version, claim_owner, last_error FROM source_videos "
                                 "WHERE id = ANY(:ids)", ids=[flaky, busy]))
        raise
    _assert_clean(dev, flaky, 2)
    _assert_clean(dev, busy, 3)
    lost = dev.sql("SELECT error_type, run_id FROM stage_results WHERE stage = 'ingest' AND entity_id = :v "
                   "AND status = 'lost'", v=flaky)
    assert [(r.error_type, r.run_id) for r in lost] == [("RunDiedAfterTransientError", run_id)]
    row = dev.sql("SELECT lost_count, last_error FROM source_videos WHERE id = :v", v=flaky)[0]
    assert row.lost_count == 1
