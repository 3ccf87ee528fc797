"""Review events: recorded append-only, applied in id order, each in one transaction.

An event's outcome (``applied`` or ``rejected`` with a reason), the clip state changes and any
follow-up (a split or merge waiting out its undo window, picked up later by its stage sensor)
commit together or not at all. Invalid events are never dropped: they end ``rejected`` with a
reason a reviewer can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from heaters_dagster.database.models import REVIEW_ACTIONS, Clip, ReviewEvent
from heaters_dagster.errors import ClaimConflictError, IllegalTransitionError, PermanentError
from heaters_dagster.settings import get_settings
from heaters_dagster.state_machine import CLIP_DEAD_STATES, ClipState as C, transition

REVIEWABLE = (C.PENDING_REVIEW, C.REVIEW_SKIPPED)
GROUPABLE = (C.PENDING_REVIEW, C.REVIEW_SKIPPED, C.REVIEW_APPROVED)
MERGE_TARGETS = (C.PENDING_REVIEW, C.REVIEW_SKIPPED, C.REVIEW_APPROVED)
MIN_SPLIT_PART_S = 0.5


def undo_window_s() -> float:
    return get_settings().undo_window_s


class Rejected(Exception):
    """An event that cannot be applied; the message is the reason stored with it."""


# -- recording ---------------------------------------------------------------------------------
def validate_payload(action: str, payload: Any) -> dict[str, Any]:
    """Server-side shape validation (the web API answers 400 on these); meaning is checked when
    the event is applied."""
    if action not in REVIEW_ACTIONS:
        raise PermanentError(f"unknown action {action!r}; expected one of {', '.join(REVIEW_ACTIONS)}")
    payload = dict(payload or {})
    allowed = {"split": {"frame"}, "merge": {"target_clip_id"}, "group": {"target_clip_id"}}.get(action, set())
    extra = set(payload) - allowed
    if extra:
        raise PermanentError(f"unexpected fields for {action}: {', '.join(sorted(extra))}")
    for key in allowed & set(payload):
        if not isinstance(payload[key], int) or isinstance(payload[key], bool):
            raise PermanentError(f"{key} must be an integer")
    if action == "split" and "frame" not in payload:
        raise PermanentError("split needs a clip-relative frame")
    if action == "group" and "target_clip_id" not in payload:
        raise PermanentError("group needs target_clip_id")
    return payload


def record_event(session: Session, clip_id: int, action: str, payload: Any = None, reviewer: str = "") -> ReviewEvent:
    if not isinstance(clip_id, int) or isinstance(clip_id, bool):
        raise PermanentError("clip_id must be an integer")
    ev = ReviewEvent(clip_id=clip_id, action=action, payload=validate_payload(action, payload),
                     reviewer=str(reviewer)[:200])
    session.add(ev)
    session.flush()
    return ev


# -- applying ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipChange:
    """One clip an applied event changed: its state before and after (equal for a re-skip or a
    group of an approved clip)."""

    clip_id: int
    before: str
    after: str
    group_id: int | None = None


@dataclass(frozen=True)
class Applied:
    event_id: int
    clip_id: int
    action: str
    outcome: str
    reason: str | None
    reviewer: str = ""
    payload: dict[str, Any] | None = None
    changes: tuple[ClipChange, ...] = ()  # every clip the event changed (none when rejected)
    undid_event_id: int | None = None


def _lock_clip(session: Session, clip_id: int) -> Clip:
    clip = session.execute(select(Clip).where(Clip.id == clip_id).with_for_update()).scalar_one_or_none()
    if clip is None:
        raise Rejected(f"clip {clip_id} does not exist")
    return clip


def _move(session: Session, clip: Clip, to_state: str, info: dict[str, Any], **values: Any) -> None:
    before = clip.state
    try:
        transition(session, "clip", clip.id, before, to_state, values=values or None)
    except (IllegalTransitionError, ClaimConflictError) as exc:
        raise Rejected(str(exc)) from exc
    info[str(clip.id)] = {"before": before, "after": to_state, "group_id": clip.group_id,
                          "pending_op": clip.pending_op}
    session.refresh(clip)


def _regroup(clip: Clip, group_id: int, info: dict[str, Any]) -> None:
    """Set a clip's group without changing its state (undo puts the old group back)."""
    info[str(clip.id)] = {"before": clip.state, "after": clip.state, "group_id": clip.group_id,
                          "pending_op": clip.pending_op}
    clip.group_id = group_id


def _require_reviewable(clip: Clip, verb: str) -> None:
    if clip.state not in REVIEWABLE:
        raise Rejected(f"clip {clip.id} is {clip.state}; only clips waiting for review can be {verb}")


def _check_alive(clip: Clip) -> None:
    if clip.state in CLIP_DEAD_STATES:
        raise Rejected(f"clip {clip.id} is archived ({clip.state})")


def _previous_neighbour(session: Session, clip: Clip) -> Clip | None:
    return session.execute(
        select(Clip).where(Clip.source_video_id == clip.source_video_id, Clip.end_frame == clip.start_frame,
                           Clip.state.not_in(tuple(CLIP_DEAD_STATES) + (C.ARCHIVED,)))
        .with_for_update()
    ).scalars().first()


def _apply(session: Session, ev: ReviewEvent, now: datetime) -> dict[str, Any]:
    """Apply one event; return undo_info. Raises Rejected with the reason."""
    info: dict[str, Any] = {}
    clip = _lock_clip(session, ev.clip_id)
    action = ev.action
    if action == "undo":
        _undo(session, ev, clip, now)
        return info  # an undo is not itself undoable
    _check_alive(clip)
    reviewed = {"reviewed_at": now}
    if action == "approve":
        if clip.state == C.REVIEW_APPROVED:
            raise Rejected(f"clip {clip.id} is already approved")
        _require_reviewable(clip, "approved")
        _move(session, clip, C.REVIEW_APPROVED, info, **reviewed)
    elif action == "skip":
        _require_reviewable(clip, "skipped")
        if clip.state == C.REVIEW_SKIPPED:  # skipping again sends it to the back of the queue
            info[str(clip.id)] = {"before": clip.state, "after": clip.state, "group_id": clip.group_id,
                                  "pending_op": clip.pending_op}
            clip.reviewed_at = now
        else:
            _move(session, clip, C.REVIEW_SKIPPED, info, **reviewed)
    elif action == "archive":
        _require_reviewable(clip, "archived")
        _move(session, clip, C.REVIEW_ARCHIVED, info, **reviewed)
    elif action == "split":
        _require_reviewable(clip, "split")
        frame = int(ev.payload["frame"])
        n = clip.end_frame - clip.start_frame
        if not 1 <= frame <= n - 1:
            raise Rejected(f"split frame {frame} is outside clip {clip.id} (valid: 1..{n - 1}, clip-relative)")
        min_frames = max(1, round(MIN_SPLIT_PART_S * clip.fps))
        if frame < min_frames or n - frame < min_frames:
            raise Rejected(f"split at frame {frame} leaves a part shorter than {MIN_SPLIT_PART_S} s")
        op = {"op": "split", "frame": frame, "absolute_frame": clip.start_frame + frame, "event_id": ev.id,
              "ready_at": (now + timedelta(seconds=undo_window_s())).isoformat()}
        _move(session, clip, C.SPLIT_PENDING, info, pending_op=op, **reviewed)
    elif action == "merge":
        _require_reviewable(clip, "merged")
        prev = _previous_neighbour(session, clip)
        target_id = ev.payload.get("target_clip_id")
        if target_id is not None and (prev is None or prev.id != target_id):
            target = session.get(Clip, target_id)
            if target is None:
                raise Rejected(f"merge target clip {target_id} does not exist")
            if target.source_video_id != clip.source_video_id:
                raise Rejected(f"clip {target_id} belongs to another source video")
            raise Rejected(f"clip {target_id} is not the clip right before clip {clip.id}")
        if prev is None:
            raise Rejected(f"clip {clip.id} has no live clip right before it to merge with")
        if prev.state not in MERGE_TARGETS:
            raise Rejected(f"the previous clip {prev.id} is {prev.state} and cannot be merged now")
        ready_at = (now + timedelta(seconds=undo_window_s())).isoformat()
        _move(session, prev, C.MERGE_PENDING, info,
              pending_op={"op": "merge", "role": "target", "partner": clip.id, "event_id": ev.id, "ready_at": ready_at})
        _move(session, clip, C.MERGE_PENDING, info,
              pending_op={"op": "merge", "role": "source", "partner": prev.id, "event_id": ev.id, "ready_at": ready_at,
                          "start_frame": prev.start_frame},
              **reviewed)
    elif action == "group":
        target_id = int(ev.payload["target_clip_id"])
        if target_id == clip.id:
            raise Rejected("a clip cannot be grouped with itself")
        target = session.execute(select(Clip).where(Clip.id == target_id).with_for_update()).scalar_one_or_none()
        if target is None:
            raise Rejected(f"group target clip {target_id} does not exist")
        if target.source_video_id != clip.source_video_id:
            raise Rejected(f"clip {target_id} belongs to another source video; groups stay within one source")
        _check_alive(target)
        for c in (clip, target):
            if c.state not in GROUPABLE:
                raise Rejected(f"clip {c.id} is {c.state} and cannot be grouped")
        group_id = clip.group_id or target.group_id or min(clip.id, target.id)
        # The reviewer looked at this clip: it is approved (if it was not already). The target only
        # joins the group; its review state is left alone, so a clip nobody reviewed is never
        # approved by a group and still comes up for review (shown as a member of the group).
        if clip.state == C.REVIEW_APPROVED:
            _regroup(clip, group_id, info)
        else:
            _move(session, clip, C.REVIEW_APPROVED, info, group_id=group_id, **reviewed)
        _regroup(target, group_id, info)
    else:  # pragma: no cover - the CHECK constraint forbids it
        raise Rejected(f"unknown action {action}")
    return info


def _undo(session: Session, ev: ReviewEvent, clip: Clip, now: datetime) -> ReviewEvent:
    target = session.execute(
        select(ReviewEvent)
        .where(ReviewEvent.outcome == "applied", ReviewEvent.undone_by.is_(None), ReviewEvent.action != "undo",
               ReviewEvent.undo_info.has_key(str(clip.id)), ReviewEvent.id < ev.id)
        .order_by(ReviewEvent.id.desc()).limit(1).with_for_update()
    ).scalar_one_or_none()
    if target is None:
        raise Rejected(f"nothing to undo on clip {clip.id}")
    if target.action in ("split", "merge"):
        age = (now - target.processed_at).total_seconds() if target.processed_at else 0.0
        if age > undo_window_s():
            raise Rejected(f"the {target.action}'s undo window ({undo_window_s():.0f} s) has passed")
    info: dict[str, Any] = target.undo_info or {}
    clips = {int(cid): session.execute(select(Clip).where(Clip.id == int(cid)).with_for_update()).scalar_one()
             for cid in info}
    for cid, entry in info.items():
        c = clips[int(cid)]
        if c.state != entry["after"]:
            raise Rejected(f"cannot undo {target.action}: clip {cid} is now {c.state} (work has started)")
    for cid, entry in info.items():
        c = clips[int(cid)]
        values = {"group_id": entry.get("group_id"), "pending_op": entry.get("pending_op")}
        if entry["before"] != entry["after"]:
            try:
                transition(session, "clip", c.id, entry["after"], entry["before"], values=values)
            except (IllegalTransitionError, ClaimConflictError) as exc:
                raise Rejected(f"cannot undo {target.action}: {exc}") from exc
        else:
            c.group_id = values["group_id"]
            c.pending_op = values["pending_op"]
    target.undone_by = ev.id
    return target


UNDOABLE_LIMIT = 20
UNDOABLE_SCAN = 200


def undoable_events(session: Session, reviewer: str, *, now: datetime | None = None,
                    limit: int = UNDOABLE_LIMIT) -> list[ReviewEvent]:
    """The reviewer's recent events an undo would still reverse, newest first.

    The same rules as :func:`_undo`: an event not yet undone and not rejected (an event still
    waiting to be applied counts, since it is applied before the undo), a split or merge only
    within its undo window, and only while every clip it changed is still in the state it left
    it in (so no work has started on it). Undo takes back the newest such event of a clip, so
    older events of a clip that a newer one changed are left out. Looks at the reviewer's last
    ``UNDOABLE_SCAN`` events."""
    now = now or datetime.now(timezone.utc)
    window = undo_window_s()
    rows = session.execute(
        select(ReviewEvent).where(ReviewEvent.reviewer == reviewer, ReviewEvent.action != "undo",
                                  ReviewEvent.undone_by.is_(None),
                                  or_(ReviewEvent.outcome.is_(None), ReviewEvent.outcome == "applied"))
        .order_by(ReviewEvent.id.desc()).limit(UNDOABLE_SCAN)).scalars().all()
    clip_ids = {int(cid) for ev in rows for cid in (ev.undo_info or {})} | {ev.clip_id for ev in rows}
    states = dict(session.execute(select(Clip.id, Clip.state).where(Clip.id.in_(clip_ids))).all()) if clip_ids else {}
    # Undo reverses the newest event on a clip, whoever sent it: later events of others count.
    later = session.execute(
        select(ReviewEvent.id, ReviewEvent.undo_info)
        .where(ReviewEvent.id > min(ev.id for ev in rows), ReviewEvent.outcome == "applied",
               ReviewEvent.action != "undo", ReviewEvent.undone_by.is_(None))
        .order_by(ReviewEvent.id.desc()).limit(10 * UNDOABLE_SCAN)).all() if rows else []
    last_touch: dict[int, int] = {}
    for eid, linfo in later:
        for cid in (linfo or {}):
            last_touch[int(cid)] = max(last_touch.get(int(cid), 0), eid)
    out: list[ReviewEvent] = []
    seen: set[int] = set()
    for ev in rows:
        info = ev.undo_info or {}
        touched = {int(c) for c in info} or {ev.clip_id}
        if touched & seen or any(last_touch.get(c, 0) > ev.id for c in touched):
            continue
        seen |= touched
        if ev.processed_at is None:
            if states.get(ev.clip_id) is None:
                continue
        else:
            if ev.action in ("split", "merge") and (now - ev.processed_at).total_seconds() > window:
                continue
            if any(states.get(int(cid)) != entry.get("after") for cid, entry in info.items()):
                continue
        out.append(ev)
        if len(out) >= limit:
            break
    return out


def apply_event(session: Session, event_id: int, now: datetime | None = None) -> Applied | None:
    """Apply one unprocessed event inside the caller's transaction (locks it first)."""
    now = now or datetime.now(timezone.utc)
    ev = session.execute(
        select(ReviewEvent).where(ReviewEvent.id == event_id, ReviewEvent.processed_at.is_(None))
        .with_for_update(skip_locked=True)
    ).scalar_one_or_none()
    if ev is None:
        return None
    savepoint = session.begin_nested()
    changes: tuple[ClipChange, ...] = ()
    undid: int | None = None
    try:
        ev.undo_info = _apply(session, ev, now)
        if ev.action == "undo":
            target = session.execute(select(ReviewEvent).where(ReviewEvent.undone_by == ev.id)).scalar_one()
            undid = target.id
            changes = tuple(ClipChange(int(cid), e["after"], e["before"], e.get("group_id"))
                            for cid, e in (target.undo_info or {}).items())
        else:
            changes = tuple(ClipChange(int(cid), e["before"], e["after"], session.get(Clip, int(cid)).group_id)
                            for cid, e in (ev.undo_info or {}).items())
        savepoint.commit()
        ev.outcome, ev.reason = "applied", None
    except Rejected as exc:
        savepoint.rollback()
        ev = session.get(ReviewEvent, event_id)
        assert ev is not None
        ev.outcome, ev.reason = "rejected", str(exc)
        changes, undid = (), None
    ev.processed_at = now
    session.flush()
    return Applied(ev.id, ev.clip_id, ev.action, ev.outcome or "", ev.reason, reviewer=ev.reviewer or "",
                   payload=dict(ev.payload or {}), changes=changes, undid_event_id=undid)


def process_pending_events(database: Any, *, after_id: int = 0, limit: int = 1000,
                           now: datetime | None = None) -> list[Applied]:
    """Apply unprocessed events in id order, one transaction each; return what happened."""
    with database.session() as s:
        ids = s.execute(select(ReviewEvent.id).where(ReviewEvent.processed_at.is_(None), ReviewEvent.id > after_id)
                        .order_by(ReviewEvent.id).limit(limit)).scalars().all()
    done: list[Applied] = []
    for event_id in ids:
        with database.session() as s:
            res = apply_event(s, event_id, now)
        if res is not None:
            done.append(res)
    return done
