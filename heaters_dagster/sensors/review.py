"""The review sensor: applies review events in id order, each in one transaction, and records the
reviewers' decisions on the ``review`` asset of the graph.

It requests no runs itself: an applied split or merge leaves its clip in ``split_pending`` /
``merge_pending`` with a ``ready_at`` time, and the split/merge stage sensors (from the stage
table) pick it up when the undo window has passed; approvals and archives likewise feed the
keyframe and archive stages.

For every applied event it returns one ``AssetMaterialization`` of ``review`` per clip the event
changed (partition = the clip id; decision, state before/after, reviewer and event id in the
metadata), and one ``AssetObservation`` for a rejected event (with the reason), so a reviewer's
decision shows in that clip's lineage between its sprite and its keyframes. The daemon stores
these events after the tick; the database stays the source of truth (``heaters review
--apply-events``, which runs without Dagster, records none).
"""

from __future__ import annotations

from typing import Any, Iterable

import dagster as dg

from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.review.events import Applied, process_pending_events
from heaters_dagster.stages import REVIEW


def review_asset_events(applied: Iterable[Applied]) -> list["dg.AssetMaterialization | dg.AssetObservation"]:
    events: list[dg.AssetMaterialization | dg.AssetObservation] = []
    for a in applied:
        base: dict[str, Any] = {"decision": a.action, "event_id": a.event_id, "reviewer": a.reviewer or "unknown",
                                "event_clip_id": a.clip_id}
        for k, v in sorted((a.payload or {}).items()):
            base[k] = v
        if a.undid_event_id is not None:
            base["undid_event_id"] = a.undid_event_id
        if a.outcome != "applied":
            events.append(dg.AssetObservation(
                asset_key=REVIEW.asset_name, partition=str(a.clip_id),
                description=f"{a.action} rejected: {a.reason}",
                metadata={**base, "outcome": "rejected", "reason": a.reason or ""}))
            continue
        for ch in a.changes:
            md = {**base, "clip_id": ch.clip_id, "state": ch.after, "previous_state": ch.before}
            if ch.group_id is not None:
                md["group_id"] = ch.group_id
            events.append(dg.AssetMaterialization(
                asset_key=REVIEW.asset_name, partition=str(ch.clip_id),
                description=f"{a.action} by {a.reviewer or 'unknown'} (event {a.event_id}): {ch.before} -> {ch.after}",
                metadata=md))
    return events


AUTO_REVIEWER = "auto-approve"


def auto_approve(database: DatabaseResource, limit: int = 1000, reviewer: str = AUTO_REVIEWER) -> int:
    """HEATERS_AUTO_APPROVE (benchmark only): record an approve event (``record_event``, as the
    review page does) for every ``pending_review`` clip that has no unprocessed event yet; they are
    applied like a reviewer's. Returns how many."""
    from sqlalchemy import select

    from heaters_dagster.database.models import Clip, ReviewEvent
    from heaters_dagster.review.events import record_event

    unprocessed = select(ReviewEvent.id).where(ReviewEvent.clip_id == Clip.id, ReviewEvent.processed_at.is_(None))
    with database.session() as s:
        ids = list(s.execute(select(Clip.id).where(Clip.state == "pending_review", ~unprocessed.exists())
                             .order_by(Clip.id).limit(limit)).scalars())
        for cid in ids:
            record_event(s, cid, "approve", {}, reviewer)
    return len(ids)


def evaluate_review_sensor(context, database: DatabaseResource) -> dg.SensorResult:
    from heaters_dagster.settings import get_settings

    last = int(context.cursor or 0)
    if get_settings().auto_approve:
        auto_approve(database)
    applied = process_pending_events(database)
    if not applied:
        return dg.SensorResult(skip_reason=dg.SkipReason("no unprocessed review events"), cursor=str(last))
    for a in applied:
        msg = f"review event {a.event_id}: {a.action} clip {a.clip_id} -> {a.outcome}"
        context.log.info(msg + (f" ({a.reason})" if a.reason else ""))
    events = review_asset_events(applied)
    # The clips' partitions exist already unless this instance is newer than the clips (a fresh
    # Dagster home over an existing database): register any that are missing.
    keys = sorted({e.partition for e in events if e.partition}, key=int)
    known = set(context.instance.get_dynamic_partitions(REVIEW.partitions_name)) if keys else set()
    missing = [k for k in keys if k not in known]
    requests = [dg.AddDynamicPartitionsRequest(REVIEW.partitions_name, missing)] if missing else []
    return dg.SensorResult(cursor=str(max(last, *(a.event_id for a in applied))), asset_events=events,
                           dynamic_partitions_requests=requests)


@dg.sensor(name="review_events_sensor", minimum_interval_seconds=2, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Applies reviewers' events (approve, skip, archive, undo, split, merge, group) in order, "
           "each with its state changes in one transaction; rejects invalid ones with a reason; records each "
           "decision as a materialization of the clip's `review` partition.")
def review_events_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    return evaluate_review_sensor(context, database)
