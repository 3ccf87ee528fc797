"""The state machine: legal and illegal transitions, atomic claims under concurrency."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from heaters_dagster.errors import ClaimConflictError, IllegalTransitionError
from heaters_dagster.state_machine import (
    CLIP_STATES,
    CLIP_TRANSITIONS,
    VIDEO_TRANSITIONS,
    ClipState,
    VideoState,
    transition,
)
from heaters_dagster_tests.factories import make_clips, make_video, row_of, state_of


def test_every_transition_target_is_a_declared_state():
    for table in (VIDEO_TRANSITIONS, CLIP_TRANSITIONS):
        for src, targets in table.items():
            assert targets <= set(table), f"{src} -> undeclared {targets - set(table)}"


@pytest.mark.parametrize(
    "kind,src,dst",
    [
        ("clip", ClipState.SPLICED, ClipState.EMBEDDED),
        ("clip", ClipState.ARCHIVED, ClipState.PENDING_REVIEW),
        ("clip", ClipState.PENDING_REVIEW, ClipState.KEYFRAMING),
        ("video", VideoState.NEW, VideoState.SPLICED),
        ("video", VideoState.SPLICED, VideoState.NEW),
    ],
)
def test_illegal_transition_is_rejected_without_touching_the_row(db, kind, src, dst):
    vid = make_video(db, state=src if kind == "video" else "spliced")
    item = vid if kind == "video" else make_clips(db, vid, [(0, 24)], state=src)[0]
    with pytest.raises(IllegalTransitionError, match=f"{src} -> {dst}"):
        with db.session() as s:
            transition(s, kind, item, src, dst)
    assert state_of(db, kind, item) == src


def test_unknown_state_is_rejected(db):
    with pytest.raises(IllegalTransitionError, match="unknown clip state"):
        with db.session() as s:
            transition(s, "clip", 1, ClipState.SPLICED, "teleported")


def test_transition_from_wrong_current_state_is_a_conflict(db):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state=ClipState.PENDING_REVIEW)
    with pytest.raises(ClaimConflictError, match="pending_review"):
        with db.session() as s:
            transition(s, "clip", cid, ClipState.SPLICED, ClipState.GENERATING_SPRITE)
    assert state_of(db, "clip", cid) == ClipState.PENDING_REVIEW


def test_transition_records_error_retry_and_version(db):
    vid = make_video(db, state=VideoState.NEW)
    with db.session() as s:
        transition(s, "video", vid, VideoState.NEW, VideoState.DOWNLOADING)
        transition(s, "video", vid, VideoState.DOWNLOADING, VideoState.INGESTION_FAILED, error="boom", bump_retry=True)
    row = row_of(db, "video", vid)
    assert (row.state, row.last_error, row.retry_count) == ("ingestion_failed", "boom", 1)
    with db.session() as s:  # retrying from a failed state is legal and bumps the version
        transition(s, "video", vid, VideoState.INGESTION_FAILED, VideoState.NEW, clear_error=True, bump_version=True)
    row = row_of(db, "video", vid)
    assert (row.state, row.last_error, row.version) == ("new", None, 1)


def test_database_rejects_states_outside_the_machine(db):
    vid = make_video(db)
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.execute(text("UPDATE source_videos SET state = 'bogus' WHERE id = :i"), {"i": vid})


def test_two_threads_claiming_one_clip_exactly_one_wins(db):
    vid = make_video(db)
    for _ in range(10):  # repeat to give a race a chance to show
        (cid,) = make_clips(db, vid, [(0, 24)])
        barrier = threading.Barrier(2)
        results: list[str] = []

        def claim() -> None:
            barrier.wait()
            try:
                with db.session() as s:
                    transition(s, "clip", cid, ClipState.SPLICED, ClipState.GENERATING_SPRITE)
                results.append("won")
            except ClaimConflictError:
                results.append("lost")

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["lost", "won"]
        assert state_of(db, "clip", cid) == ClipState.GENERATING_SPRITE


def test_clip_states_match_database_constraint(db):
    with db.session() as s:
        ddl = s.execute(text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'ck_clips_state'")).scalar_one()
    for state in CLIP_STATES:
        assert f"'{state}'" in ddl
