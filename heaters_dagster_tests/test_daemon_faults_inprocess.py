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
