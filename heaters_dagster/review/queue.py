"""The reviewer's queue: which clip a reviewer sees next, with short leases.

A clip is *reviewable* when it is ``pending_review`` or ``review_skipped`` and has no review event
still waiting to be applied (so a clip a reviewer has just decided on never comes back before its
event is applied). Pending clips come first, in source order (``source_video_id, start_frame``);
skipped clips follow, oldest skip first, so skipping sends a clip to the back of the queue.

:func:`lease_next` takes the first reviewable clip whose lease is free, expired or already this
reviewer's with ``SELECT ... FOR UPDATE SKIP LOCKED`` and writes ``lease_owner`` and
``lease_expires_at`` in the same transaction. Two reviewers asking at the same moment lock
different rows; one asking just after the other's commit sees the lease (PostgreSQL re-checks the
lease condition on the newest row version before locking it). So no clip is ever the current clip
of two reviewers while its lease runs. A reviewer holds one lease at a time: leasing a clip
releases the reviewer's other leases. A lease that runs out (a closed tab) frees the clip for
others; the page renews its lease while the reviewer looks at the clip.

All functions work inside the caller's session/transaction; the caller commits.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterable

from sqlalchemy import and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session

from heaters_dagster.database.models import Clip, ReviewEvent
from heaters_dagster.state_machine import ClipState as C

REVIEWABLE_STATES = (C.PENDING_REVIEW, C.REVIEW_SKIPPED)
DEFAULT_LEASE_S = 120.0


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(timezone.utc)


def _no_pending_event():
    return ~exists().where(ReviewEvent.clip_id == Clip.id, ReviewEvent.processed_at.is_(None))


def _reviewable():
    return and_(Clip.state.in_(REVIEWABLE_STATES), _no_pending_event())


def _lease_free_for(reviewer: str, now: datetime):
    return or_(Clip.lease_owner.is_(None), Clip.lease_expires_at.is_(None), Clip.lease_expires_at <= now,
               Clip.lease_owner == reviewer)


def _queue_order(reviewer: str | None, now: datetime) -> list:
    order: list = []
    if reviewer is not None:
        # A reviewer who reloads the page gets the clip they hold back first.
        order.append(case((and_(Clip.lease_owner == reviewer, Clip.lease_expires_at > now), 0), else_=1))
    order += [
        case((Clip.state == C.PENDING_REVIEW, 0), else_=1),
        # Only skipped clips have a non-NULL key here: pending ones tie and fall through to source order.
        case((Clip.state == C.REVIEW_SKIPPED, Clip.reviewed_at), else_=None).asc().nulls_first(),
        Clip.source_video_id, Clip.start_frame, Clip.id,
    ]
    return order


def _clean_ids(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids]


def lease_next(session: Session, reviewer: str, *, lease_s: float = DEFAULT_LEASE_S,
               exclude_ids: Iterable[int] = (), prefer_id: int | None = None,
               now: datetime | None = None) -> Clip | None:
    """Lease the next clip for ``reviewer`` (or ``prefer_id`` when it is reviewable and free).

    Returns the leased clip, or None when nothing is left for this reviewer."""
    if not reviewer:
        raise ValueError("a reviewer name is required to lease a clip")
    now = _now(now)
    exclude = _clean_ids(exclude_ids)
    base = (select(Clip).where(_reviewable(), _lease_free_for(reviewer, now))
            .with_for_update(skip_locked=True, of=Clip))
    if exclude:
        base = base.where(Clip.id.not_in(exclude))
    clip = None
    if prefer_id is not None:
        # The preferred clip waits for a row lock instead of skipping it: a tab that reloads asks
        # for the clip it held while its own release (sent on page hide) may still be committing.
        # Locks on clip rows are held for one short transaction. PostgreSQL re-checks the lease
        # condition on the row version it gets.
        preferred = (select(Clip).where(_reviewable(), _lease_free_for(reviewer, now), Clip.id == int(prefer_id))
                     .with_for_update(of=Clip))
        if exclude:
            preferred = preferred.where(Clip.id.not_in(exclude))
        clip = session.execute(preferred).scalar_one_or_none()
    if clip is None:
        clip = session.execute(base.order_by(*_queue_order(reviewer, now)).limit(1)).scalar_one_or_none()
    # One lease per reviewer: whatever else they held goes back to the queue.
    session.execute(
        update(Clip).where(Clip.lease_owner == reviewer, *([Clip.id != clip.id] if clip is not None else []))
        .values(lease_owner=None, lease_expires_at=None).execution_options(synchronize_session=False))
    if clip is None:
        return None
    clip.lease_owner = reviewer
    clip.lease_expires_at = now + timedelta(seconds=lease_s)
    session.flush()
    return clip


def peek_next(session: Session, reviewer: str | None, n: int, *, exclude_ids: Iterable[int] = (),
              now: datetime | None = None, prefer_id: int | None = None) -> list[Clip]:
    """The next ``n`` reviewable clips in queue order that ``reviewer`` could lease (not leased by
    anyone else), without leasing or locking them. For prefetching sprites, and for the read-only
    view. ``reviewer=None`` lists only clips nobody holds. ``prefer_id`` comes first when it is
    one of them."""
    now = _now(now)
    n = max(0, min(int(n), 50))
    if n == 0:
        return []
    free = (_lease_free_for(reviewer, now) if reviewer else
            or_(Clip.lease_owner.is_(None), Clip.lease_expires_at.is_(None), Clip.lease_expires_at <= now))
    stmt = select(Clip).where(_reviewable(), free)
    exclude = _clean_ids(exclude_ids)
    if exclude:
        stmt = stmt.where(Clip.id.not_in(exclude))
    first = (session.execute(stmt.where(Clip.id == int(prefer_id))).scalar_one_or_none()
             if prefer_id is not None else None)
    if first is not None:
        stmt, n = stmt.where(Clip.id != first.id), n - 1
    rest = list(session.execute(stmt.order_by(*_queue_order(None, now)).limit(n)).scalars()) if n else []
    return ([first] if first is not None else []) + rest


def renew(session: Session, clip_id: int, reviewer: str, *, lease_s: float = DEFAULT_LEASE_S,
          now: datetime | None = None) -> bool:
    """Extend ``reviewer``'s lease on a clip they still hold (an expired lease nobody took counts).
    False when the clip is held by someone else, or is no longer waiting for review."""
    now = _now(now)
    row = session.execute(
        update(Clip)
        .where(Clip.id == int(clip_id), Clip.lease_owner == reviewer, Clip.state.in_(REVIEWABLE_STATES))
        .values(lease_expires_at=now + timedelta(seconds=lease_s)).returning(Clip.id)
        .execution_options(synchronize_session=False)).first()
    return row is not None


def release(session: Session, clip_id: int, reviewer: str) -> bool:
    """Give a clip back to the queue (only the lease holder can). Returns whether a lease was held."""
    row = session.execute(
        update(Clip).where(Clip.id == int(clip_id), Clip.lease_owner == reviewer)
        .values(lease_owner=None, lease_expires_at=None).returning(Clip.id)
        .execution_options(synchronize_session=False)).first()
    return row is not None


def queue_length(session: Session) -> int:
    """Clips left to review (pending or skipped, no event waiting), leased ones included."""
    return int(session.execute(select(func.count()).select_from(Clip).where(_reviewable())).scalar_one())

