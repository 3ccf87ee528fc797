"""Keep the shared partition sets within Dagster's guidance (at most 100,000 partitions per asset).

Every clip is a partition of the ``clips`` set, so a large library passes the guidance (the UI's
partition views load slower past it, and every stage sensor reads the whole key list each tick).
Once a set holds more than ``HEATERS_MAX_PARTITIONS`` keys (default 100,000), this sensor retires
the oldest keys of finished items until the set is back at 90 % of the limit: archived clips first
(their files are gone), then embedded clips, then spliced videos; never an item in progress, ready
or failed. At most ``RETIRE_PER_TICK`` keys go per tick.

A retired item keeps its rows, files, vectors and Dagster event history; it only leaves the
partition views (and the inputs of partitioned assets downstream). If it ever becomes ready again
(a re-queue), its stage sensor registers its key again, at the end of the set; a review event on it
does the same.
"""

from __future__ import annotations


import dagster as dg
from sqlalchemy import text

from heaters_dagster.leases import TABLES
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.settings import get_settings
from heaters_dagster.stages import partitions_name_for

# Retired first to last, per entity.
RETIRABLE_STATES = {"clip": ("archived", "embedded"), "video": ("spliced",)}
RETIRE_PER_TICK = 5000
SWEEP_INTERVAL_S = get_settings().partition_sweep_s  # fixed when the code location loads


def max_partitions() -> int:
    """``HEATERS_MAX_PARTITIONS``: the most keys a shared partition set keeps (default 100,000)."""
    return max(10, int(get_settings().max_partitions))


def retirement_candidates(database: DatabaseResource, entity: str, keys: list[str], limit: int,
                          per_tick: int = RETIRE_PER_TICK) -> list[str]:
    """The keys to retire from a set holding ``keys`` (in the set's order) with a limit of ``limit``."""
    if len(keys) <= limit:
        return []
    want = min(per_tick, len(keys) - int(limit * 0.9))
    ids = [int(k) for k in keys if k.isdigit()]
    with database.session() as s:
        rows = s.execute(text(f"SELECT id, state FROM {TABLES[entity]} WHERE id = ANY(CAST(:ids AS bigint[])) "
                              "AND state = ANY(CAST(:states AS text[]))"),
                         {"ids": ids, "states": list(RETIRABLE_STATES[entity])}).all()
    state = {str(r.id): r.state for r in rows}
    out: list[str] = []
    for retirable in RETIRABLE_STATES[entity]:  # in priority order, each oldest key first
        out += [k for k in keys if state.get(k) == retirable][: want - len(out)]
        if len(out) >= want:
            break
    return out


def evaluate_partition_retirement(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    limit = max_partitions()
    requests: list[dg.DeleteDynamicPartitionsRequest] = []
    notes: list[str] = []
    for entity in ("clip", "video"):
        name = partitions_name_for(entity)
        keys = list(context.instance.get_dynamic_partitions(name))
        retire = retirement_candidates(database, entity, keys, limit)
        if retire:
            requests.append(dg.DeleteDynamicPartitionsRequest(name, retire))
            notes.append(f"{name}: {len(keys)} keys over the limit of {limit}; retiring {len(retire)} finished "
                         f"{entity}s ({retire[0]}..{retire[-1]})")
            context.log.warning(notes[-1])
        elif len(keys) > limit:
            notes.append(f"{name}: {len(keys)} keys over the limit of {limit}, and none finished to retire")
            context.log.warning(notes[-1])
    return dg.SensorResult(dynamic_partitions_requests=requests,
                           skip_reason=dg.SkipReason("; ".join(notes) or f"partition sets within {limit} keys"))


@dg.sensor(name="partition_retirement_sensor", minimum_interval_seconds=SWEEP_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING,
           description="Keeps the shared `clips` and `videos` partition sets within HEATERS_MAX_PARTITIONS "
           "(100,000 by default, Dagster's guidance) by retiring the oldest keys of finished items: archived "
           "clips, then embedded clips, then spliced videos. Rows, files and history stay.")
def partition_retirement_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
    return evaluate_partition_retirement(context, database)
