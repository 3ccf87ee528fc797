"""One sensor per stage, built from the stage table.

Each tick reads the items in the stage's input state (and those in flight), registers the ones
not yet known in the shared partition set of their entity (``clips`` or ``videos``), and requests
runs over *ranges* of those partitions (at most ``max_partitions_per_run`` ready items each), so a
run's cost per clip is the media work, not the launch.

All clip stages share one partition set, so a stage's ready clips need not be contiguous in it
(the approved clips that keyframes waits for sit between skipped and archived ones). A Dagster run
covers one contiguous range, so a range may *bridge* up to ``Stage.max_gap`` partitions that are
not the stage's work; the asset leaves those alone with one query (they show as part of the run in
the UI). ``max_gap=0`` requests ranges of ready items only.

While a run of the stage is still queued or starting, newly ready items wait for it to start (a
run requested now would only queue behind it); a full batch goes at once. A range of a bridging
stage also *reaches* on over the items that follow it and are still upstream of the stage
(``HEATERS_RANGE_REACH``), and back over those just before it (the clips the upstream run is still
finishing when the first ones after them are ready): the run claims what is ready when it starts,
so the clips a long sprite run approves while a keyframes run waits for the ffmpeg pool go in that
run, not in one of their own.

Nothing is requested twice: the cursor remembers ``id -> version`` for every item requested and
not yet finished; an item is requested again only when its version changes (a deliberate
re-queue bumps it). Run keys carry the ids and versions as well, so even a lost cursor cannot
launch the same work twice.
"""


import bisect
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from sqlalchemy import literal_column, select

from heaters_dagster.assets.factory import job_name
from heaters_dagster.pipeline.items import MODELS
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.stages import NODES_BY_NAME, STAGES, STAGES_BY_NAME, Stage

SCAN_LIMIT = 5000
MAX_RUNS_PER_TICK = 20


@dataclass
class StageCursor:
    requested: dict[str, int] = field(default_factory=dict)  # item id -> version requested
    # Batching (HEATERS_BATCH_WAIT_S): when the oldest ready, not yet requested item was first seen.
    waiting_since: float | None = None

    @classmethod
    def parse(cls, raw: "str | None") -> "StageCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        since = data.get("waiting_since")
        return cls(requested={str(k): int(v) for k, v in data.get("requested", {}).items()},
                   waiting_since=float(since) if since is not None else None)

    def dump(self) -> str:
        data: dict[str, Any] = {"requested": self.requested}
        if self.waiting_since is not None:
            data["waiting_since"] = self.waiting_since
        return json.dumps(data, sort_keys=True)


def batch_settings(stage: Stage) -> tuple[float, int]:
    """(window in seconds, full batch size) for a stage sensor: HEATERS_BATCH_WAIT_S / _SIZE, the
    window at least the stage's own ``hold_while_in_flight_s``."""
    from heaters_dagster.settings import get_settings

    s = get_settings()
    return max(s.batch_wait_s, stage.hold_while_in_flight_s), s.batch_size or partitions_per_run(stage)


def contiguous_chunks(keys_in_order: Sequence[str], wanted: Sequence[str], max_len: int,
                      max_gap: int = 0, barriers: Iterable[str] = ()) -> list[list[str]]:
    """Group ``wanted`` keys into runs over ranges of ``keys_in_order`` (the partition order), each
    with at most ``max_len`` wanted keys and at most ``max_gap`` other keys inside its range. No
    range bridges a key of ``barriers`` (the stage's items already requested or in flight: another
    run's work). A range run covers its chunk's first to last key."""
    pos = {k: i for i, k in enumerate(keys_in_order)}
    ordered = sorted(wanted, key=lambda k: pos[k])
    walls = sorted(pos[b] for b in barriers if b in pos)
    chunks: list[list[str]] = []
    for k in ordered:
        if chunks and len(chunks[-1]) < max_len:
            c = chunks[-1]
            others = (pos[k] - pos[c[0]] + 1) - (len(c) + 1)  # keys in the range that are not wanted
            blocked = bisect.bisect_right(walls, pos[c[-1]]) < bisect.bisect_left(walls, pos[k])
            if others <= max_gap and not blocked:
                c.append(k)
                continue
        chunks.append([k])
    return chunks


# Runs a stage sensor requested carry this tag; a run without it was launched by a person (UI,
# backfill) and may take items already past the stage back through it (Stage.rerun_from).
REQUESTED_BY_TAG = "heaters/requested_by"


def run_request_for(stage: Stage, chunk: list[str], versions: dict[str, int],
                    end: str | None = None, *, start: str | None = None) -> dg.RunRequest:
    """The run for ``chunk`` (ready keys in partition order): one partition, or the range from
    ``start`` to ``end`` (its first and last key unless the range reaches further: :func:`reach_ranges`)."""
    end = end or chunk[-1]
    start = start or chunk[0]
    if len(chunk) == 1 and start == end == chunk[0]:
        return dg.RunRequest(run_key=stage.run_key(int(chunk[0]), versions[chunk[0]]), partition_key=chunk[0],
                             tags={"heaters/stage": stage.name, REQUESTED_BY_TAG: "sensor"})
    digest = hashlib.sha1(",".join(f"{k}:{versions[k]}" for k in chunk).encode()).hexdigest()[:12]
    return dg.RunRequest(
        run_key=f"{stage.name}:{start}-{end}:{digest}",
        tags={ASSET_PARTITION_RANGE_START_TAG: start, ASSET_PARTITION_RANGE_END_TAG: end,
              "heaters/stage": stage.name, "heaters/items": str(len(chunk)), REQUESTED_BY_TAG: "sensor"},
    )


WAITING_STATUSES = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING)


def waiting_run(context: Any, stage: Stage) -> "dg.DagsterRun | None":
    """A run of the stage's job that is queued or starting (its items not yet claimed), if any."""
    runs = context.instance.get_runs(filters=dg.RunsFilter(job_name=job_name(stage), statuses=list(WAITING_STATUSES)),
                             limit=1)
    return runs[0] if runs else None


# A run in these takes the items of its range that are ready when it starts or become ready while
# it works. (Queued and starting too: a tick that saw the run starting when it looked for working
# runs, and started when it looked for waiting ones, requested a run the top-up then left empty.)
LIVE_STATUSES = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                 dg.DagsterRunStatus.STARTED)


def ranges_of_live_runs(instance: dg.DagsterInstance, stage: Stage) -> set[str]:
    """The partitions of the stage's sensor-requested runs that are queued, starting or working:
    each takes the items of its range that are ready when it starts, or become ready while it
    works (``executor.execute_iter``'s top-up)."""
    import functools

    from heaters_dagster.sensors.recovery import run_partition_keys

    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name(stage), statuses=list(LIVE_STATUSES),
                                                   tags={REQUESTED_BY_TAG: "sensor"}))
    if not runs:
        return set()
    order = functools.cache(lambda: instance.get_dynamic_partitions(stage.partitions_name))
    return {k for run in runs for k in run_partition_keys(run, order)}


def upstream_busy(database: DatabaseResource, stage: Stage) -> bool:
    """Whether a stage upstream of ``stage`` (same entity) has items ready for it or in progress."""
    model = MODELS[stage.entity]
    states = [st for up in STAGES if up.name in stage.upstream and up.entity == stage.entity
              for st in (*up.input_states, up.in_progress_state)]
    if not states:
        return False
    with database.session() as session:
        return session.execute(select(model.id).where(model.state.in_(states)).limit(1)).first() is not None


def upstream_states(stage: Stage) -> tuple[str, ...]:
    """The states of the stage's entity from which an item can still become ready for the stage:
    the states of every stage upstream of it in the graph (through the human review step), other
    than the stage's own. For keyframes: ``spliced``, ``generating_sprite``, ``pending_review``."""
    states: list[str] = []
    seen: set[str] = set()
    todo = list(stage.upstream)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = NODES_BY_NAME[name]
        if node.entity != stage.entity:
            continue
        if isinstance(node, Stage):
            states += [*node.input_states, node.in_progress_state, node.output_state]
        todo += node.upstream
    own = {*stage.input_states, stage.in_progress_state}
    return tuple(st for st in dict.fromkeys(states) if st not in own)


def reach_ranges(keys_in_order: Sequence[str], chunks: list[list[str]], reachable: set[str], max_gap: int,
                 barriers: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Where each chunk's range starts and ends: back before its first key and on past its last
    over the neighbouring keys, to the farthest of them in ``reachable`` (items still upstream of
    the stage), within the chunk's ``max_gap`` budget of other keys (back first: the items an
    upstream run is still finishing before the first ready ones, which would otherwise straggle
    into a run of their own), never over a barrier (another run's work) or into another chunk's
    range."""
    pos = {k: i for i, k in enumerate(keys_in_order)}
    walls = {pos[b] for b in barriers if b in pos}
    ranges: list[tuple[str, str]] = []
    floor = 0  # the first position no earlier range covers
    for n, chunk in enumerate(chunks):
        first, last = pos[chunk[0]], pos[chunk[-1]]
        budget = max(max_gap - ((last - first + 1) - len(chunk)), 0)
        start = first
        for j in range(first - 1, max(floor, first - budget) - 1, -1):
            if j in walls:
                break
            if keys_in_order[j] in reachable:
                start = j
        budget -= first - start
        stop = pos[chunks[n + 1][0]] if n + 1 < len(chunks) else len(keys_in_order)
        end = last
        for j in range(last + 1, min(stop, last + 1 + budget)):
            if j in walls:
                break
            if keys_in_order[j] in reachable:
                end = j
        ranges.append((keys_in_order[start], keys_in_order[end]))
        floor = end + 1
    return ranges


def reachable_keys(database: DatabaseResource, stage: Stage, keys_in_order: Sequence[str],
                   chunks: list[list[str]]) -> set[str]:
    """The keys within ``max_gap`` before and after each chunk whose items are still upstream of
    the stage (one query over those keys only)."""
    states = upstream_states(stage)
    if not states or not chunks:
        return set()
    pos = {k: i for i, k in enumerate(keys_in_order)}
    candidates = {int(k) for chunk in chunks
                  for k in (*keys_in_order[max(pos[chunk[0]] - stage.max_gap, 0):pos[chunk[0]]],
                            *keys_in_order[pos[chunk[-1]] + 1:pos[chunk[-1]] + 1 + stage.max_gap])}
    if not candidates:
        return set()
    model = MODELS[stage.entity]
    with database.session() as session:
        rows = session.execute(select(model.id).where(model.state.in_(states),
                                                      model.id.in_(sorted(candidates)))).all()
    return {str(r.id) for r in rows}


def chained_head(stage: Stage) -> "Stage | None":
    """The stage whose job also runs ``stage`` in its step (``Stage.runs_after``), if chained."""
    from heaters_dagster.assets.factory import chained

    head = STAGES_BY_NAME.get(stage.runs_after) if stage.runs_after else None
    return head if head is not None and stage in chained(head) else None


def range_reach() -> bool:
    from heaters_dagster.settings import get_settings

    return get_settings().range_reach


def partitions_per_run(stage: Stage) -> int:
    """The stage's ``max_partitions_per_run``, capped by ``HEATERS_MAX_PARTITIONS_PER_RUN``."""
    from heaters_dagster.settings import get_settings

    cap = get_settings().max_partitions_per_run
    return min(stage.max_partitions_per_run, cap) if cap else stage.max_partitions_per_run


def evaluate_stage_sensor(context: Any, stage: Stage, database: DatabaseResource, *,
                          now: float | None = None) -> dg.SensorResult:
    cursor = StageCursor.parse(context.cursor)
    now = time.time() if now is None else now
    model = MODELS[stage.entity]
    watched = (*stage.input_states, stage.in_progress_state)
    ready_expr = literal_column(f"({stage.ready_sql})" if stage.ready_sql else "true")
    with database.session() as session:
        rows = session.execute(
            select(model.id, model.version, model.state, ready_expr.label("is_ready"))
            .where(model.state.in_(watched)).order_by(model.id).limit(SCAN_LIMIT)
        ).all()
    ready = {str(r.id): r.version for r in rows
             if r.state in stage.input_states and r.is_ready and cursor.requested.get(str(r.id)) != r.version}
    # Forget items that finished or failed; keep those still ready or in flight.
    live = {str(r.id) for r in rows}
    if ready and (head := chained_head(stage)) is not None:
        # The stage runs in its head stage's step too (Stage.runs_after): what an unfinished run of
        # the head's job covers is that run's work (it does them right after the head).
        from heaters_dagster.sensors.recovery import covered_by_unfinished_runs

        covered = covered_by_unfinished_runs(context.instance, head)
        ready = {k: v for k, v in ready.items() if k not in covered}
    cursor.requested = {k: v for k, v in cursor.requested.items() if k in live}
    topping_up: set[str] = set()
    if ready and stage.max_gap > 0 and range_reach():
        # Items in the range of a run of the stage that is queued or working: it takes those ready
        # when it starts, or when its work is done (the asset's top-up), so a run of their own
        # would only queue behind it.
        topping_up = {k for k in ready if k in ranges_of_live_runs(context.instance, stage)}
        ready = {k: v for k, v in ready.items() if k not in topping_up}

    # Batching: while this stage has work in flight (a run requested or running), collect newly
    # ready items over a short window, so items that become ready over several ticks (approvals,
    # the clips of a sprite run as they commit) share one run and pay one launch; they would wait
    # behind the run in flight anyway. The window opens when such an item is first seen; a full
    # batch or the window's end requests the runs. A stage with nothing in flight requests at once.
    wait_s, full = batch_settings(stage)
    in_flight = any(k in live and k not in ready for k in cursor.requested)
    if ready and not in_flight and stage.hold_while_in_flight_s > 0:
        # A stage with a fixed start cost also holds while its upstream stage still has items
        # ready or in flight (the rest of them will be here soon), within the same window.
        in_flight = upstream_busy(database, stage)
    if not ready:
        cursor.waiting_since = None
    elif len(ready) < full and (waiting := waiting_run(context, stage)) is not None:
        # A run of this stage is still queued or starting: a run requested now would only queue
        # behind it (the stage's pool or the run limit holds it), paying its own launch and start.
        # Hold the items until that run has started; they then go in one run, at once if the
        # window has passed by then. This is what keeps the clips a long sprite run approves one
        # by one from becoming a queue of small keyframes runs.
        if cursor.waiting_since is None:
            cursor.waiting_since = now
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"holding {len(ready)} ready {stage.entity}s for {stage.name} until run "
                                      f"{waiting.run_id[:8]} ({waiting.status.value.lower()}) has started"),
            cursor=cursor.dump())
    elif wait_s > 0 and len(ready) < full and in_flight:
        if cursor.waiting_since is None:
            cursor.waiting_since = now
        if now - cursor.waiting_since < wait_s:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"collecting ready {stage.entity}s for {stage.name}: {len(ready)} so far, "
                                          f"{wait_s - (now - cursor.waiting_since):.1f} s of the window left"),
                cursor=cursor.dump())

    existing = context.instance.get_dynamic_partitions(stage.partitions_name)
    known = set(existing)
    new_keys = [k for k in sorted(ready, key=int) if k not in known]
    order = list(existing) + new_keys
    busy = live - set(ready)  # requested and not started, or in flight: another run's work
    chunks = contiguous_chunks(order, list(ready), partitions_per_run(stage), stage.max_gap,
                               barriers=busy)[:MAX_RUNS_PER_TICK]
    ranges = [(c[0], c[-1]) for c in chunks]
    if chunks and stage.max_gap > 0 and range_reach():
        ranges = reach_ranges(order, chunks, reachable_keys(database, stage, order, chunks), stage.max_gap,
                              barriers=busy)
    requests = [run_request_for(stage, chunk, ready, end, start=start) for chunk, (start, end) in zip(chunks, ranges)]
    for chunk in chunks:
        for k in chunk:
            cursor.requested[k] = ready[k]
    # Items left over (more than MAX_RUNS_PER_TICK runs' worth) go at the next tick without a new window.
    cursor.waiting_since = None if len(ready) == sum(map(len, chunks)) else cursor.waiting_since
    partition_requests = [dg.AddDynamicPartitionsRequest(stage.partitions_name, new_keys)] if new_keys else []
    if not requests:
        why = (f"{len(topping_up)} ready {stage.entity}s left to the {stage.name} run working on their range"
               if topping_up else f"no {stage.entity}s ready for {stage.name}")
        return dg.SensorResult(skip_reason=dg.SkipReason(why),
                               dynamic_partitions_requests=partition_requests, cursor=cursor.dump())
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=partition_requests,
                           cursor=cursor.dump())


def build_stage_sensor(stage: Stage, *, minimum_interval_seconds: int | None = None) -> dg.SensorDefinition:
    """The stage's sensor. Its interval (HEATERS_SENSOR_INTERVAL_S, default 1) is below the sensor
    daemon's fixed 5 s loop on purpose: the daemon evaluates a sensor in a loop turn only when the
    interval has passed since its last tick *started*, and ticks start a moment after the turn
    does, so an interval of exactly 5 s is just short at every other turn: ticks every 10 s."""
    if minimum_interval_seconds is None:
        from heaters_dagster.settings import get_settings

        minimum_interval_seconds = get_settings().sensor_interval_s

    @dg.sensor(
        name=f"{stage.name}_sensor",
        job_name=job_name(stage),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests `{stage.name}` runs for {stage.entity}s in state "
        f"{' / '.join(stage.input_states)} (ranges of at most {stage.max_partitions_per_run} of them"
        + (f", bridging at most {stage.max_gap} other {stage.entity}s" if stage.max_gap else "") + ").",
    )
    def _stage_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource) -> dg.SensorResult:
        return evaluate_stage_sensor(context, stage, database)

    return _stage_sensor


def build_stage_sensors(stages: tuple[Stage, ...] = STAGES) -> list[dg.SensorDefinition]:
    return [build_stage_sensor(s) for s in stages]
