"""Claims with owners and leases: claim, heartbeat, fence, recovery, poison, take-back, release.

These run the real executor over the real database (in process); the same mechanisms under the
Dagster daemon are exercised by ``test_daemon_faults.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from heaters_dagster import leases
from heaters_dagster.database.models import ClipArtifact, StageResult
from heaters_dagster.pipeline.outputs import ArtifactOut, FileToStore, ItemOutput
from heaters_dagster.resources.executor import StageExecutor
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of

SPRITE = get_stage("sprite")
HOOKS: dict[str, object] = {}
log = logging.getLogger("test_leases")


def handler(ctx, item):
    hook = HOOKS.get("during")
    if callable(hook):
        hook(item)
    path = Path(ctx.workdir) / "sprite.jpg"
    path.write_bytes(b"\xff\xd8late-%d" % item.id)
    return ItemOutput(item_id=item.id, artifacts=[ArtifactOut("sprite", FileToStore(f"clips/{item.id}/sprite.jpg", path))])


STAGE = dataclasses.replace(SPRITE, name="sprite_lease_test", handler="heaters_dagster_tests.test_leases:handler")


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    HOOKS.clear()
    monkeypatch.setenv("HEATERS_LEASE_S", "2")
    monkeypatch.setenv("HEATERS_MAX_LOST", "3")


def _executor(defs) -> StageExecutor:
    return StageExecutor(database=defs.resources["database"], storage=defs.resources["storage"], max_parallel=1)


def _claim_row(db, cid):
    with db.session() as s:
        return s.execute(text("SELECT state, claim_owner, claim_run_id, claim_expires_at, version, lost_count, "
                              "claim_history, last_error, claim_expires_at > now() AS live FROM clips WHERE id = :i"),
                         {"i": cid}).first()


def test_claim_records_owner_and_lease_and_heartbeat_renews_it(defs, db):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    seen: list = []

    def during(item):  # work for longer than the lease: only the heartbeat keeps the claim alive
        first = _claim_row(db, item.id)
        time.sleep(3.0)
        seen.extend([first, _claim_row(db, item.id)])

    HOOKS["during"] = during
    report = _executor(defs).execute(STAGE, [cid], defs.resources["artifact_io_manager"], log=log, run_id="run-a",
                                     step_key="sprite")
    first, later = seen
    assert first.state == "generating_sprite" and first.claim_run_id == "run-a"
    assert first.claim_owner.startswith("run-a/sprite#0@") and leases.owner_pid(first.claim_owner) > 0
    assert later.live and later.claim_expires_at > first.claim_expires_at  # renewed while working
    assert list(report.succeeded) == [cid]
    done = _claim_row(db, cid)
    assert done.state == "pending_review" and done.claim_owner is None and done.claim_expires_at is None


def test_expired_lease_is_recovered_with_new_version_reason_and_history(db):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="generating_sprite")
    with db.session() as s:
        s.execute(text("UPDATE clips SET claim_owner = 'run-x/sprite#0@h:1', claim_run_id = 'run-x', "
                       "claim_expires_at = now() - interval '1 second' WHERE id = :i"), {"i": cid})
    with db.session() as s:
        assert [h.id for h in leases.find_expired(s)] == [cid]
        recovered = leases.recover_expired(s)
    assert [(r.id, r.to_state, r.poison) for r in recovered] == [(cid, "spliced", False)]
    row = _claim_row(db, cid)
    assert (row.state, row.version, row.lost_count, row.claim_owner) == ("spliced", 1, 1, None)
    assert "lease expired: run-x/sprite#0@h:1" in row.last_error
    assert row.claim_history[0]["owner"] == "run-x/sprite#0@h:1" and row.claim_history[0]["run_id"] == "run-x"
    with db.session() as s:
        assert s.execute(select(StageResult.status).where(StageResult.entity_id == cid)).scalars().all() == ["lost"]
        assert leases.recover_expired(s) == []  # nothing twice


def test_live_lease_is_not_recovered(db):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="generating_sprite")
    with db.session() as s:
        s.execute(text("UPDATE clips SET claim_owner = 'o', claim_expires_at = now() + interval '1 minute' "
                       "WHERE id = :i"), {"i": cid})
        assert leases.recover_expired(s) == []
    assert _claim_row(db, cid).state == "generating_sprite"


def test_item_lost_max_times_becomes_poison_with_history(db, monkeypatch):
    monkeypatch.setenv("HEATERS_MAX_LOST", "2")
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    for n in range(2):
        with db.session() as s:
            s.execute(text("UPDATE clips SET state = 'generating_sprite', claim_owner = :o, "
                           "claim_expires_at = now() - interval '1 second' WHERE id = :i"), {"i": cid, "o": f"w{n}"})
        with db.session() as s:
            (r,) = leases.recover_expired(s)
        assert r.poison == (n == 1)
    row = _claim_row(db, cid)
    assert row.state == "sprite_failed" and row.lost_count == 2
    assert row.last_error.startswith("poison item: lost 2 times") and '"w0"' in row.last_error


def test_late_worker_that_lost_its_lease_cannot_commit(defs, db, store):
    """The item's lease expires while a worker is stuck (no heartbeat), it is recovered and claimed by
    another worker; when the first worker finally finishes, nothing it produced is committed."""
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])

    def during(item):
        with db.session() as s:  # what the recovery sensor does when the lease has run out ...
            s.execute(text("UPDATE clips SET claim_expires_at = now() - interval '1 second' WHERE id = :i"),
                      {"i": item.id})
            leases.recover_expired(s)
        with db.session() as s:  # ... and another worker's claim
            assert leases.claim(s, SPRITE, item.id, leases.Claimant("other-worker", "run-b")) == "spliced"

    HOOKS["during"] = during
    report = _executor(defs).execute(STAGE, [cid], defs.resources["artifact_io_manager"], log=log, run_id="run-a")
    assert list(report.lost) == [cid] and not report.succeeded
    row = _claim_row(db, cid)
    assert row.state == "generating_sprite" and row.claim_owner == "other-worker"  # untouched by the late worker
    assert not store.exists(f"clips/{cid}/sprite.jpg")
    with db.session() as s:
        assert s.execute(select(ClipArtifact)).first() is None


def test_same_run_takes_back_its_claim_other_runs_do_not(defs, db):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    with db.session() as s:
        assert leases.claim(s, SPRITE, cid, leases.Claimant("run-a/sprite#0@h:1", "run-a")) == "spliced"
    other = _executor(defs).execute(STAGE, [cid], defs.resources["artifact_io_manager"], log=log, run_id="run-b")
    assert cid in other.held and "held by run-a/sprite#0@h:1" in other.held[cid] and not other.succeeded
    # The step retry of run-a (its process was killed) takes the claim back at once.
    retry = _executor(defs).execute(STAGE, [cid], defs.resources["artifact_io_manager"], log=log, run_id="run-a",
                                    attempt=1)
    assert retry.taken_back == [cid] and list(retry.succeeded) == [cid]
    assert row_of(db, "clip", cid).state == "pending_review"


def test_release_run_returns_only_that_runs_items(db):
    vid = make_video(db)
    a, b = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        leases.claim(s, SPRITE, a, leases.Claimant("run-dead/sprite#0@h:1", "run-dead"))
        leases.claim(s, SPRITE, b, leases.Claimant("run-live/sprite#0@h:2", "run-live"))
    with db.session() as s:
        released = leases.release_run(s, "run-dead", "run run-dead failed: worker crashed")
    assert [r.id for r in released] == [a]
    ra, rb = _claim_row(db, a), _claim_row(db, b)
    assert ra.state == "spliced" and ra.version == 1 and ra.last_error.startswith("run run-dead failed")
    assert rb.state == "generating_sprite" and rb.claim_run_id == "run-live"


def test_two_executors_over_the_same_items_process_each_once(defs, db, store):
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(12)])
    calls: list[int] = []
    lock = threading.Lock()

    def during(item):
        with lock:
            calls.append(item.id)
        time.sleep(0.05)

    HOOKS["during"] = during
    reports = []

    def go(run_id):
        reports.append(_executor(defs).execute(STAGE, ids, defs.resources["artifact_io_manager"], log=log,
                                               run_id=run_id))

    threads = [threading.Thread(target=go, args=(f"run-{n}",)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == ids  # each item processed exactly once
    assert sorted(i for r in reports for i in r.succeeded) == ids
    with db.session() as s:
        done = s.execute(select(StageResult.entity_id).where(StageResult.status == "succeeded")).scalars().all()
        arts = s.execute(select(ClipArtifact.clip_id)).scalars().all()
    assert sorted(done) == ids and sorted(arts) == ids


def test_run_with_held_items_says_so_in_its_tags(defs, db, instance):
    """A run that skipped items because another worker held them is not a silent clean success."""
    import dagster as dg

    from heaters_dagster.assets.factory import build_stage_asset

    vid = make_video(db)
    held, free = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        leases.claim(s, SPRITE, held, leases.Claimant("run-z/sprite#0@h:9", "run-z"))
    instance.add_dynamic_partitions(STAGE.partitions_name, [str(held), str(free)])
    result = dg.materialize([build_stage_asset(STAGE)], instance=instance, resources=defs.resources,
                            tags={"dagster/asset_partition_range_start": str(held),
                                  "dagster/asset_partition_range_end": str(free)})
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags["heaters/held"] == str(held) and tags["heaters/succeeded"] == "1"
    assert row_of(db, "clip", free).state == "pending_review"
