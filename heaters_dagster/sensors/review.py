"""The review sensor: applies review events in id order, each in one transaction.

It requests no runs itself: an applied split or merge leaves its clip in ``split_pending`` /
``merge_pending`` with a ``ready_at`` time, and the split/merge stage sensors (from the stage
table) pick it up when the undo window has passed; approvals and archives likewise feed the
keyframe and archive stages.
"""

import dagster as dg

from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.review.events import process_pending_events


def evaluate_review_sensor(context, database: DatabaseResource) -> dg.SensorResult:
    last = int(context.cursor or 0)
    applied = process_pending_events(database)
    if not applied:
        return dg.SensorResult(skip_reason=dg.SkipReason("no unprocessed review events"), cursor=str(last))
    for a in applied:
        msg = f"review event {a.event_id}: {a.action} clip {a.clip_id} -> {a.outcome}"
        context.log.info(msg + (f" ({a.reason})" if a.reason else ""))
    return dg.SensorResult(cursor=str(max(last, *(a.event_id for a in applied))))


@dg.sensor(name="review_events_sensor", minimum_interval_seconds=2, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Applies reviewers' events (approve, skip, archive, undo, split, merge, group) in order, "
           "each with its state changes in one transaction; rejects invalid ones with a reason.")
def review_events_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    return evaluate_review_sensor(context, database)
