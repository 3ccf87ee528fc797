"""The reviewer's queue: order, leases, expiry, and no clip shown to two reviewers at once."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from heaters_dagster.review import queue
from heaters_dagster.review.events import process_pending_events, record_event
from heaters_dagster_tests.factories import make_clips, make_video, row_of


def _lease(db, reviewer, **kw):
    with db.session() as s:
        clip = queue.lease_next(s, reviewer, **kw)
        return clip.id if clip else None


def _event(db, clip_id, action, reviewer="r1", **payload):
    with db.session() as s:
        return record_event(s, clip_id, action, payload, reviewer).id


@pytest.fixture()
def clips(db):
    v1, v2 = make_video(db), make_video(db)
    # Inserted out of order on purpose: the queue orders by source, then start frame.
    b = make_clips(db, v2, [(0, 48)], state="pending_review")
    a = make_clips(db, v1, [(48, 96), (0, 48)], state="pending_review")
    return [a[1], a[0], b[0]]  # queue order


def test_pending_clips_in_source_order_then_skipped_oldest_first(db, clips):
    first, second, third = clips
    vid = make_video(db)
    skipped = make_clips(db, vid, [(0, 24), (24, 48)], state="review_skipped")
    now = datetime.now(timezone.utc)
    with db.session() as s:  # the later clip was skipped earlier: it comes back first
        from heaters_dagster.database.models import Clip
        s.get(Clip, skipped[0]).reviewed_at = now - timedelta(minutes=1)
        s.get(Clip, skipped[1]).reviewed_at = now - timedelta(minutes=5)
    with db.session() as s:
        order = [c.id for c in queue.peek_next(s, "r1", 10)]
        assert queue.queue_length(s) == 5
    assert order == [first, second, third, skipped[1], skipped[0]]
    # Leasing follows the same order (each lease excluding the ones already taken).
    got = [_lease(db, f"r{i}") for i in range(5)]
    assert got == order
    assert _lease(db, "r9") is None


def test_clip_with_unprocessed_event_is_not_served_until_applied(db, clips):
    first, second, _ = clips
    ev = _event(db, first, "skip")
    assert _lease(db, "r1") == second
    with db.session() as s:
        assert queue.queue_length(s) == 2
    process_pending_events(db)
    assert row_of(db, "clip", first).state == "review_skipped"
    with db.session() as s:
        assert first in [c.id for c in queue.peek_next(s, "r2", 10)]
        assert queue.queue_length(s) == 3
    assert ev


def test_own_lease_comes_back_and_one_lease_per_reviewer(db, clips):
    first, second, _ = clips
    assert _lease(db, "ann") == first
    assert _lease(db, "ann") == first  # a reload gives the same clip back
    assert _lease(db, "bob") == second
    assert _lease(db, "ann", exclude_ids=[first]) != first
    row = row_of(db, "clip", first)
    assert row.lease_owner is None and row.lease_expires_at is None  # released by the new lease


def test_lease_sets_owner_and_expiry_and_release_frees(db, clips):
    first, *_ = clips
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert _lease(db, "ann", lease_s=30, now=t0) == first
    row = row_of(db, "clip", first)
    assert row.lease_owner == "ann" and row.lease_expires_at == t0 + timedelta(seconds=30)
    with db.session() as s:
        assert not queue.release(s, first, "bob")  # only the holder can release
        assert queue.release(s, first, "ann")
    assert row_of(db, "clip", first).lease_owner is None
    assert _lease(db, "bob", now=t0) == first


def test_expired_lease_can_be_taken_over(db, clips):
    first, second, _ = clips
    t0 = datetime.now(timezone.utc)
    assert _lease(db, "ann", lease_s=120, now=t0) == first
    assert _lease(db, "bob", now=t0 + timedelta(seconds=119)) == second
    with db.session() as s:  # bob gives his clip back; ann's is still hers
        queue.release(s, second, "bob")
    assert _lease(db, "bob", now=t0 + timedelta(seconds=121)) == first  # ann's lease ran out
    assert row_of(db, "clip", first).lease_owner == "bob"
    with db.session() as s:
        assert not queue.renew(s, first, "ann")
        assert queue.renew(s, first, "bob", lease_s=60)


def test_renew_keeps_the_clip_and_prefer_picks_a_free_clip(db, clips):
    first, second, third = clips
    t0 = datetime.now(timezone.utc)
    assert _lease(db, "ann", lease_s=10, now=t0) == first
    with db.session() as s:
        assert queue.renew(s, first, "ann", lease_s=300, now=t0 + timedelta(seconds=5))
    assert _lease(db, "bob", now=t0 + timedelta(seconds=60)) == second  # still ann's after renewal
    assert _lease(db, "cy", prefer_id=third) == third
    assert _lease(db, "dee", prefer_id=first) not in (first, second, third)  # held by ann: not given
    with db.session() as s:
        assert queue.peek_next(s, "dee", 10) == []  # every clip is someone else's now


def test_lease_requires_a_reviewer(db, clips):
    with db.session() as s, pytest.raises(ValueError):
        queue.lease_next(s, "")


def _run_reviewers(db, names, work, seconds):
    errors: list[BaseException] = []
    start = threading.Barrier(len(names))

    def run(name):
        try:
            start.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and work(name):
                pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def test_concurrent_reviewers_never_hold_the_same_clip(db):
    """Reviewers lease and give back clips as fast as they can; the intervals in which each
    clip is held never overlap between reviewers."""
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 10, i * 10 + 10) for i in range(6)], state="pending_review")
    held: dict[int, list[tuple[float, float, str]]] = {i: [] for i in ids}
    lock = threading.Lock()
    counts = {"leases": 0}

    def work(name):
        with db.session() as s:
            clip = queue.lease_next(s, name, lease_s=60)
            clip_id = clip.id if clip else None
        got = time.monotonic()  # after the commit
        if clip_id is None:
            time.sleep(0.001)
            return True
        time.sleep(0.002)
        done = time.monotonic()  # before the release commits
        with db.session() as s:
            assert queue.release(s, clip_id, name)
        with lock:
            held[clip_id].append((got, done, name))
            counts["leases"] += 1
        return True

    _run_reviewers(db, ["ann", "bob", "cy", "dee"], work, seconds=4)
    assert counts["leases"] > 50
    reviewers_seen = set()
    for clip_id, spans in held.items():
        spans.sort()
        for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"clip {clip_id} held by {n1} and {n2} at the same time"
        reviewers_seen |= {n for _, _, n in spans}
    assert len(reviewers_seen) == 4


def test_concurrent_reviewers_each_clip_reviewed_once(db):
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 10, i * 10 + 10) for i in range(40)], state="pending_review")
    served: dict[int, list[str]] = {}
    lock = threading.Lock()

    def work(name):
        with db.session() as s:
            clip = queue.lease_next(s, name)
            clip_id = clip.id if clip else None
        if clip_id is None:
            return False
        with lock:
            served.setdefault(clip_id, []).append(name)
        with db.session() as s:
            record_event(s, clip_id, "approve", {}, name)
            queue.release(s, clip_id, name)
        return True

    _run_reviewers(db, ["ann", "bob", "cy"], work, seconds=60)
    assert sorted(served) == sorted(ids)
    assert all(len(v) == 1 for v in served.values()), {k: v for k, v in served.items() if len(v) > 1}
    assert len({v[0] for v in served.values()}) >= 2  # the work really was shared
    applied = process_pending_events(db)
    assert [a.outcome for a in applied] == ["applied"] * 40


def test_preferred_clip_waits_for_a_release_in_flight_instead_of_skipping_it(db, clips):
    """A tab that reloads asks for the clip it held (prefer) while its release, sent as the old
    page went away, may still hold the row lock: it gets that clip, not the next one."""
    first, second, _third = clips
    assert _lease(db, "ann#tab1") == first
    locked, done = threading.Event(), threading.Event()

    def slow_release():
        with db.session() as s:
            assert queue.release(s, first, "ann#tab1")  # row lock held until commit
            locked.set()
            time.sleep(0.5)
        done.set()

    t = threading.Thread(target=slow_release)
    t.start()
    assert locked.wait(10)
    got = _lease(db, "ann#tab1", prefer_id=first)
    t.join(10)
    assert done.is_set() and got == first
    assert row_of(db, "clip", first).lease_owner == "ann#tab1"
    # without prefer, a locked row is skipped as before
    assert _lease(db, "bob") == second
