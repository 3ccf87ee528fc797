"""Review events: each action and each rejection, asserted on the database after a sensor tick."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from sqlalchemy import select

from heaters_dagster.database.models import ReviewEvent
from heaters_dagster.errors import PermanentError
from heaters_dagster.review.events import process_pending_events, record_event
from heaters_dagster.sensors.review import review_events_sensor
from heaters_dagster_tests.factories import make_clips, make_video, row_of

FPS = 24.0


@pytest.fixture()
def clips(db):
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 48), (48, 96), (96, 144), (144, 192)], state="pending_review")
    return vid, ids


def _event(db, clip_id, action, reviewer="r1", **payload):
    with db.session() as s:
        return record_event(s, clip_id, action, payload, reviewer).id


def _tick(db, instance, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": db}) as ctx:
        return review_events_sensor(ctx)


def _outcome(db, event_id):
    with db.session() as s:
        ev = s.get(ReviewEvent, event_id)
        return ev.outcome, ev.reason


def test_approve_skip_archive(db, instance, clips):
    _, (a, b, c, _d) = clips
    e1, e2, e3 = _event(db, a, "approve"), _event(db, b, "skip"), _event(db, c, "archive")
    result = _tick(db, instance)
    assert result.cursor == str(e3)
    assert [_outcome(db, e) for e in (e1, e2, e3)] == [("applied", None)] * 3
    assert [row_of(db, "clip", i).state for i in (a, b, c)] == ["review_approved", "review_skipped", "review_archived"]
    assert row_of(db, "clip", a).reviewed_at is not None


def test_second_approve_is_rejected_with_reason(db, instance, clips):
    _, (a, *_rest) = clips
    _event(db, a, "approve")
    e2 = _event(db, a, "approve")
    _tick(db, instance)
    assert _outcome(db, e2) == ("rejected", f"clip {a} is already approved")


def test_actions_on_archived_or_unknown_clip_are_rejected(db, instance, clips):
    _, (a, *_rest) = clips
    _event(db, a, "archive")
    e2 = _event(db, a, "approve")
    e3 = _event(db, 999_999, "approve")
    _tick(db, instance)
    assert _outcome(db, e2)[0] == "rejected" and "archived" in _outcome(db, e2)[1]
    assert _outcome(db, e3) == ("rejected", "clip 999999 does not exist")


def test_group_approves_the_clip_and_links_the_target_without_approving_it(db, instance, clips):
    _, (a, b, c, _d) = clips
    e = _event(db, a, "group", target_clip_id=c)
    _tick(db, instance)
    assert _outcome(db, e) == ("applied", None)
    ra, rc = row_of(db, "clip", a), row_of(db, "clip", c)
    # the reviewer looked at a: approved; nobody reviewed c: it joins the group, still to review
    assert (ra.state, rc.state) == ("review_approved", "pending_review")
    assert ra.group_id == rc.group_id == min(a, c)
    assert row_of(db, "clip", b).group_id is None
    e2 = _event(db, c, "approve")  # c's own review, later, keeps the group
    _tick(db, instance)
    assert _outcome(db, e2) == ("applied", None)
    rc = row_of(db, "clip", c)
    assert (rc.state, rc.group_id) == ("review_approved", min(a, c))


def test_group_across_sources_is_rejected(db, instance, clips):
    _, (a, *_rest) = clips
    other_vid = make_video(db)
    (x,) = make_clips(db, other_vid, [(0, 48)], state="pending_review")
    e = _event(db, a, "group", target_clip_id=x)
    _tick(db, instance)
    assert _outcome(db, e)[0] == "rejected" and "another source video" in _outcome(db, e)[1]
    assert row_of(db, "clip", a).state == "pending_review"


def test_split_waits_in_split_pending_with_absolute_frame(db, instance, clips):
    _, (_a, b, *_rest) = clips
    e = _event(db, b, "split", frame=20)
    _tick(db, instance)
    assert _outcome(db, e) == ("applied", None)
    row = row_of(db, "clip", b)
    assert row.state == "split_pending"
    assert row.pending_op["frame"] == 20 and row.pending_op["absolute_frame"] == 48 + 20


@pytest.mark.parametrize("frame", [0, 48, 60, -3])
def test_split_frame_outside_clip_is_rejected(db, instance, clips, frame):
    _, (_a, b, *_rest) = clips
    e = _event(db, b, "split", frame=frame)
    _tick(db, instance)
    outcome, reason = _outcome(db, e)
    assert outcome == "rejected" and "outside clip" in reason
    assert row_of(db, "clip", b).state == "pending_review"


def test_split_leaving_a_too_short_part_is_rejected(db, instance, clips):
    _, (_a, b, *_rest) = clips
    e = _event(db, b, "split", frame=5)  # 5 frames at 24 fps < 0.5 s
    _tick(db, instance)
    assert _outcome(db, e)[0] == "rejected" and "shorter than" in _outcome(db, e)[1]


def test_merge_with_previous_marks_both_pending(db, instance, clips):
    _, (a, b, *_rest) = clips
    e = _event(db, b, "merge")
    _tick(db, instance)
    assert _outcome(db, e) == ("applied", None)
    ra, rb = row_of(db, "clip", a), row_of(db, "clip", b)
    assert ra.state == rb.state == "merge_pending"
    assert rb.pending_op["role"] == "source" and rb.pending_op["partner"] == a and rb.pending_op["start_frame"] == 0
    assert ra.pending_op["role"] == "target"


def test_merge_with_non_adjacent_clip_or_first_clip_is_rejected(db, instance, clips):
    _, (a, b, c, _d) = clips
    e1 = _event(db, c, "merge", target_clip_id=a)
    e2 = _event(db, a, "merge")
    _tick(db, instance)
    assert _outcome(db, e1)[0] == "rejected" and "not the clip right before" in _outcome(db, e1)[1]
    assert _outcome(db, e2)[0] == "rejected" and "no live clip right before" in _outcome(db, e2)[1]
    assert {row_of(db, "clip", i).state for i in (a, b, c)} == {"pending_review"}


def test_undo_reverses_the_latest_action(db, instance, clips):
    _, (a, b, *_rest) = clips
    _event(db, a, "skip")
    _event(db, a, "approve")  # skipped -> approved
    u1 = _event(db, a, "undo")
    _tick(db, instance)
    assert _outcome(db, u1) == ("applied", None)
    assert row_of(db, "clip", a).state == "review_skipped"  # back to the state before the approve
    u2 = _event(db, a, "undo")
    u3 = _event(db, a, "undo")
    _tick(db, instance)
    assert _outcome(db, u2) == ("applied", None) and row_of(db, "clip", a).state == "pending_review"
    assert _outcome(db, u3) == ("rejected", f"nothing to undo on clip {a}")


def test_undo_cancels_pending_split_and_merge_and_group(db, instance, clips):
    _, (a, b, c, d) = clips
    _event(db, b, "split", frame=24)
    _event(db, d, "merge")
    _event(db, a, "group", target_clip_id=b)  # b is split_pending: rejected
    _tick(db, instance)
    _event(db, b, "undo")
    _event(db, d, "undo")
    _tick(db, instance)
    for i in (b, c, d):
        row = row_of(db, "clip", i)
        assert (row.state, row.pending_op) == ("pending_review", None)
    e = _event(db, a, "group", target_clip_id=c)
    _tick(db, instance)
    _event(db, c, "undo")  # undo from the target's side reverses the group for both
    _tick(db, instance)
    assert _outcome(db, e) == ("applied", None)
    for i in (a, c):
        row = row_of(db, "clip", i)
        assert (row.state, row.group_id) == ("pending_review", None)


def test_undo_after_window_or_after_work_started_is_rejected(db, clips):
    _, (a, b, *_rest) = clips
    t0 = datetime.now(timezone.utc)
    _event(db, b, "split", frame=24)
    process_pending_events(db, now=t0)
    u = _event(db, b, "undo")
    process_pending_events(db, now=t0 + timedelta(seconds=61))
    assert _outcome(db, u)[0] == "rejected" and "undo window" in _outcome(db, u)[1]
    assert row_of(db, "clip", b).state == "split_pending"

    _event(db, a, "approve")
    process_pending_events(db)
    from heaters_dagster.state_machine import transition

    with db.session() as s:  # the keyframe stage has claimed it
        transition(s, "clip", a, "review_approved", "keyframing")
    u2 = _event(db, a, "undo")
    process_pending_events(db)
    assert _outcome(db, u2)[0] == "rejected" and "work has started" in _outcome(db, u2)[1]
    assert row_of(db, "clip", a).state == "keyframing"


def test_malformed_events_are_refused_at_recording(db, clips):
    _, (a, *_rest) = clips
    with db.session() as s:
        with pytest.raises(PermanentError, match="unknown action"):
            record_event(s, a, "delete", {})
        with pytest.raises(PermanentError, match="frame must be an integer"):
            record_event(s, a, "split", {"frame": "12"})
        with pytest.raises(PermanentError, match="unexpected fields"):
            record_event(s, a, "approve", {"sql": "drop"})


def test_rejected_event_changes_nothing_else_in_its_transaction(db, instance, clips):
    _, (a, b, *_rest) = clips
    # group with an archived target fails after the first clip was inspected: nothing may stick
    _event(db, b, "archive")
    e = _event(db, a, "group", target_clip_id=b)
    _tick(db, instance)
    assert _outcome(db, e)[0] == "rejected"
    assert (row_of(db, "clip", a).state, row_of(db, "clip", a).group_id) == ("pending_review", None)
    with db.session() as s:
        assert all(ev.processed_at is not None for ev in s.execute(select(ReviewEvent)).scalars())


def test_auto_approve_setting_approves_every_pending_clip_once_and_only_when_set(db, instance, clips, monkeypatch):
    _, ids = clips
    _tick(db, instance)  # off by default: nothing happens to pending clips
    assert {row_of(db, "clip", i).state for i in ids} == {"pending_review"}
    monkeypatch.setenv("HEATERS_AUTO_APPROVE", "1")
    skip = _event(db, ids[0], "skip")  # a reviewer's own pending event is applied, not overridden
    result = _tick(db, instance)
    assert row_of(db, "clip", ids[0]).state == "review_skipped" and _outcome(db, skip) == ("applied", None)
    assert [row_of(db, "clip", i).state for i in ids[1:]] == ["review_approved"] * 3
    with db.session() as s:
        auto = s.execute(select(ReviewEvent).where(ReviewEvent.reviewer == "auto-approve")).scalars().all()
    assert sorted(e.clip_id for e in auto) == ids[1:] and {e.outcome for e in auto} == {"applied"}
    assert {m.partition for m in result.asset_events} >= {str(i) for i in ids[1:]}
    _tick(db, instance, result.cursor)  # nothing pending any more: no second approval
    with db.session() as s:
        assert len(s.execute(select(ReviewEvent).where(ReviewEvent.reviewer == "auto-approve")).all()) == 3
