"""Claims with leases: who holds an in-progress item, until when, and what happens when they vanish.

A stage claims an item by moving it from its input state to its in-progress state *and* writing
its owner in the same conditional UPDATE:

* ``claim_owner``: one step attempt (``run_id/step_key#attempt@host:pid``), unique per attempt;
* ``claim_run_id``: the Dagster run, so a run known dead releases all its items at once;
* ``claim_expires_at``: ``now() + lease``. The executor's heartbeat renews it while it works.

Every later write of the executor (success, failure, release) is **fenced**: it matches only while
``claim_owner`` is still its own. Work from a worker that lost its lease (it was presumed dead and
its item handed to someone else) can never commit.

Recovery returns an item to its stage's input state with a new version (so the stage sensor
requests it again), the reason in ``last_error`` and an entry in ``claim_history``:

* when its lease expired (:func:`recover_expired`, run by the ``lease_recovery_sensor``);
* at once when its owning run is known dead (:func:`release_run`, run by the run failure /
  cancellation sensors, after Dagster's run monitoring marked a crashed run worker's run failed);
  the items such a run was requested for but never claimed (:func:`release_unclaimed`: it died
  before its step claimed them, or was canceled in the queue) get a new version the same way.

An item lost ``max_lost`` times goes to its failure state instead, as a poison item, with the
history in ``last_error``. A retry of the same run (a step retry, or a run retry whose parent held
the claim) may take the claim back without waiting for the lease (:func:`claim`).

No Dagster imports: this is plain SQL over the stage table, so the CLI (``heaters doctor``,
``heaters requeue``) and the sensors share it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from heaters_dagster.settings import get_settings

TABLES = {"video": "source_videos", "clip": "clips"}


def lease_seconds() -> float:
    """How long a claim lives without a heartbeat (``HEATERS_LEASE_S``, default 120 s)."""
    return max(1.0, get_settings().lease_s)


def max_lost() -> int:
    """After this many lost claims an item is a poison item (``HEATERS_MAX_LOST``, default 3)."""
    return max(1, get_settings().max_lost)


def owner_token(run_id: str | None, step_key: str | None, attempt: int) -> str:
    """A unique name for one step attempt, readable by an operator."""
    return f"{run_id or 'local'}/{step_key or 'step'}#{attempt}@{socket.gethostname()}:{os.getpid()}"


def owner_pid(owner: str | None) -> int | None:
    """The process id recorded in an owner token (for ``heaters status`` and the fault tests)."""
    if not owner or ":" not in owner:
        return None
    try:
        return int(owner.rsplit(":", 1)[1])
    except ValueError:
        return None


@dataclass(frozen=True)
class Claimant:
    owner: str
    run_id: str | None
    # Runs whose claims this claimant may take back at once: its own run (a step retry after the
    # step process was killed) and the run it retries (a Dagster run retry after a crash).
    takeback_run_ids: tuple[str, ...] = ()


def _table(kind: str) -> str:
    return TABLES[kind]


def claim(session: Session, stage: Any, item_id: int, who: Claimant, *, lease_s: float | None = None,
          rewind_from: Sequence[str] = ()) -> str | None:
    """Claim one item for ``stage``: from an input state (ready), or back from a claim of one of
    ``who.takeback_run_ids``, or (a run a person launched) from one of ``rewind_from``, the states
    past the stage it may be taken back from. Returns the state it was claimed from, or None when
    not claimable."""
    lease = lease_s if lease_s is not None else lease_seconds()
    ready = f"({stage.ready_sql})" if stage.ready_sql else "true"
    sql = text(f"""
        UPDATE {_table(stage.entity)} AS t SET
            state = :in_progress, claim_owner = :owner, claim_run_id = :run_id, claimed_at = now(),
            version = CASE WHEN t.state IN :rewind THEN t.version + 1 ELSE t.version END,
            claim_expires_at = now() + make_interval(secs => :lease), updated_at = now()
        FROM (SELECT state AS old_state FROM {_table(stage.entity)} WHERE id = :id FOR UPDATE) AS old
        WHERE t.id = :id AND (
            (t.state IN :inputs AND {ready})
            OR (t.state = :in_progress AND t.claim_run_id IN :takeback)
            OR t.state IN :rewind
        )
        RETURNING old.old_state
    """).bindparams(bindparam("inputs", expanding=True), bindparam("takeback", expanding=True),
                    bindparam("rewind", expanding=True))
    row = session.execute(sql, {
        "in_progress": stage.in_progress_state, "owner": who.owner, "run_id": who.run_id, "lease": lease,
        "id": item_id, "inputs": list(stage.input_states),
        "takeback": list(who.takeback_run_ids) or [""], "rewind": list(rewind_from) or [""],
    }).first()
    return None if row is None else row[0]


def renew(session: Session, kind: str, owner: str, ids: Sequence[int], *, lease_s: float | None = None) -> set[int]:
    """Extend the leases of ``ids`` still held by ``owner``; returns the ids it still holds."""
    if not ids:
        return set()
    lease = lease_s if lease_s is not None else lease_seconds()
    rows = session.execute(text(f"""
        UPDATE {_table(kind)} SET claim_expires_at = now() + make_interval(secs => :lease)
        WHERE id IN :ids AND claim_owner = :owner RETURNING id
    """).bindparams(bindparam("ids", expanding=True)), {"lease": lease, "ids": list(ids), "owner": owner}).all()
    return {int(r[0]) for r in rows}


def fence_condition(owner: str) -> str:
    """A SQL condition for :func:`~heaters_dagster.state_machine.transition`: still ours."""
    return "claim_owner = " + "'" + owner.replace("'", "''") + "'"


def clear_claim_values() -> dict[str, Any]:
    return {"claim_owner": None, "claim_run_id": None, "claim_expires_at": None}


# -- recovery -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recovered:
    kind: str
    id: int
    stage: str
    from_state: str
    to_state: str
    poison: bool
    owner: str | None
    reason: str


@dataclass(frozen=True)
class HeldItem:
    kind: str
    id: int
    state: str
    stage: str
    owner: str | None
    run_id: str | None
    claimed_at: datetime | None
    expires_at: datetime | None
    expired: bool
    lost_count: int


def _in_progress_stages(kind: str) -> dict[str, Any]:
    from heaters_dagster.stages import STAGES

    return {s.in_progress_state: s for s in STAGES if s.entity == kind}


def held_items(session: Session, *, expired_only: bool = False) -> list[HeldItem]:
    """Every item in an in-progress state with its claim (what ``heaters status`` lists)."""
    out: list[HeldItem] = []
    for kind, table in TABLES.items():
        stages = _in_progress_stages(kind)
        where = "state IN :states" + (" AND (claim_expires_at IS NULL OR claim_expires_at <= now())"
                                      if expired_only else "")
        rows = session.execute(text(f"""
            SELECT id, state, claim_owner, claim_run_id, claimed_at, claim_expires_at, lost_count,
                   (claim_expires_at IS NULL OR claim_expires_at <= now()) AS expired
            FROM {table} WHERE {where} ORDER BY id
        """).bindparams(bindparam("states", expanding=True)), {"states": list(stages)}).all()
        out += [HeldItem(kind, int(r.id), r.state, stages[r.state].name, r.claim_owner, r.claim_run_id,
                         r.claimed_at, r.claim_expires_at, bool(r.expired), int(r.lost_count)) for r in rows]
    return out


def find_expired(session: Session) -> list[HeldItem]:
    return held_items(session, expired_only=True)


def _recover(session: Session, kind: str, where: str, params: dict[str, Any], reason_sql: str,
             limit_n: int) -> list[Recovered]:
    """Return matching in-progress items to their input state (or failure state when poisoned)."""
    out: list[Recovered] = []
    poison_after = max_lost()
    for in_progress, stage in _in_progress_stages(kind).items():
        rows = session.execute(text(f"""
            WITH victims AS (
                SELECT id, claim_owner AS old_owner FROM {_table(kind)}
                WHERE state = :in_progress AND {where}
                ORDER BY id LIMIT :limit_n FOR UPDATE SKIP LOCKED
            ), upd AS (
                UPDATE {_table(kind)} AS t SET
                    state = CASE WHEN t.lost_count + 1 >= :poison THEN :failure ELSE :retry END,
                    version = t.version + 1,
                    lost_count = t.lost_count + 1,
                    last_error = left(CASE WHEN t.lost_count + 1 >= :poison
                        THEN 'poison item: lost ' || (t.lost_count + 1) || ' times (HEATERS_MAX_LOST=' || :poison
                             || '); last: ' || {reason_sql} || '; history: '
                             || (t.claim_history || jsonb_build_array(jsonb_build_object(
                                    'owner', t.claim_owner, 'claimed_at', t.claimed_at, 'lost_at', now(),
                                    'reason', {reason_sql})))::text
                        ELSE {reason_sql} END, 4000),
                    claim_history = t.claim_history || jsonb_build_array(jsonb_build_object(
                        'owner', t.claim_owner, 'run_id', t.claim_run_id, 'claimed_at', t.claimed_at,
                        'lost_at', now(), 'reason', {reason_sql})),
                    claim_owner = NULL, claim_run_id = NULL, claim_expires_at = NULL, updated_at = now()
                FROM victims v
                WHERE t.id = v.id
                RETURNING t.id, t.state, v.old_owner, t.last_error
            ) SELECT * FROM upd
        """), {**params, "in_progress": in_progress, "poison": poison_after, "failure": stage.failure_state,
               "retry": stage.retry_state, "limit_n": limit_n}).all()
        for r in rows:
            out.append(Recovered(kind, int(r.id), stage.name, in_progress, r.state,
                                 r.state == stage.failure_state, r.old_owner, r.last_error))
            session.execute(text("""
                INSERT INTO stage_results (stage, entity_kind, entity_id, status, error_type, message, run_id)
                VALUES (:stage, :kind, :id, 'lost', 'LeaseLost', :msg, NULL)
            """), {"stage": stage.name, "kind": kind, "id": int(r.id), "msg": r.last_error})
    return out


def recover_expired(session: Session, *, reason: str | None = None, limit_n: int = 1000) -> list[Recovered]:
    """Items whose lease ran out (their worker died or hung) go back to their input state."""
    reason_sql = ("'lease expired: ' || coalesce(t.claim_owner, 'no owner') || ' last renewed until ' || "
                  "coalesce(t.claim_expires_at::text, 'never')")
    if reason:
        reason_sql = ":reason || ' (' || coalesce(t.claim_owner, 'no owner') || ')'"
    out: list[Recovered] = []
    for kind in TABLES:
        out += _recover(session, kind, "(claim_expires_at IS NULL OR claim_expires_at <= now())",
                        {"reason": reason or ""}, reason_sql, limit_n)
    return out


def release_run(session: Session, run_id: str, reason: str) -> list[Recovered]:
    """Items claimed by ``run_id`` go back at once (the run is known dead: failed or canceled)."""
    reason_sql = ":reason || ' (' || coalesce(t.claim_owner, 'no owner') || ')'"
    out: list[Recovered] = []
    for kind in TABLES:
        out += _recover(session, kind, "claim_run_id = :run_id", {"run_id": run_id, "reason": reason},
                        reason_sql, 100000)
    return out


def release_unclaimed(session: Session, stage: Any, ids: Iterable[int], *, run_id: str,
                      reason: str, error_type: str = "RunDiedBeforeClaim") -> list[Recovered]:
    """Items a dead run was to do but never claimed (it failed or was canceled before its step
    started) sit in the stage's input state at the version its sensor already requested, so no
    sensor would request them again. Each gets a new version, so its sensor requests it again, and
    counts as lost once: a run that keeps dying before it claims anything (a code location that
    cannot load) poisons its items after ``max_lost`` tries instead of looping. Items held or
    finished meanwhile are left alone."""
    id_list = sorted({int(i) for i in ids})
    if not id_list:
        return []
    poison_after = max_lost()
    ready = f"({stage.ready_sql})" if stage.ready_sql else "true"
    rows = session.execute(text(f"""
        WITH victims AS (
            SELECT id, state AS old_state FROM {_table(stage.entity)}
            WHERE id IN :ids AND state IN :inputs AND claim_owner IS NULL AND {ready}
            ORDER BY id FOR UPDATE SKIP LOCKED
        ) UPDATE {_table(stage.entity)} AS t SET
            state = CASE WHEN t.lost_count + 1 >= :poison THEN :failure ELSE t.state END,
            version = t.version + 1,
            lost_count = t.lost_count + 1,
            last_error = left(CASE WHEN t.lost_count + 1 >= :poison
                THEN 'poison item: lost ' || (t.lost_count + 1) || ' times (HEATERS_MAX_LOST=' || :poison
                     || '); last: ' || :reason
                ELSE :reason END, 4000),
            claim_history = t.claim_history || jsonb_build_array(jsonb_build_object(
                'owner', NULL, 'run_id', CAST(:run_id AS text), 'claimed_at', NULL, 'lost_at', now(),
                'reason', CAST(:reason AS text))),
            updated_at = now()
        FROM victims v WHERE t.id = v.id
        RETURNING t.id, v.old_state, t.state, t.last_error
    """).bindparams(bindparam("ids", expanding=True), bindparam("inputs", expanding=True)),
        {"ids": id_list, "inputs": list(stage.input_states), "poison": poison_after,
         "failure": stage.failure_state, "reason": reason, "run_id": run_id}).all()
    out = []
    for r in rows:
        out.append(Recovered(stage.entity, int(r.id), stage.name, r.old_state, r.state,
                             r.state == stage.failure_state, None, r.last_error))
        session.execute(text("""
            INSERT INTO stage_results (stage, entity_kind, entity_id, status, error_type, message, run_id)
            VALUES (:stage, :kind, :id, 'lost', :error_type, :msg, :run_id)
        """), {"stage": stage.name, "kind": stage.entity, "id": int(r.id), "msg": r.last_error, "run_id": run_id,
               "error_type": error_type})
    return out


def left_after_transient_errors(session: Session, stage: Any, run_id: str) -> list[int]:
    """Items whose last result in ``stage`` is a transient error in run ``run_id``, not claimed
    since: the executor sent them back to the input state at the version their sensor requested,
    for the step's retry to take again. When that run is dead and will not be retried, no one would ever take them:
    ``release_unclaimed`` gives them a new version (the caller decides when)."""
    # Not claimed since (claimed_at is kept after a claim ends): a retry attempt that took the item
    # and was interrupted handed it back with a new version itself.
    rows = session.execute(text(f"""
        SELECT last.entity_id FROM (
            SELECT DISTINCT ON (entity_id) entity_id, status, run_id, created_at FROM stage_results
            WHERE stage = :stage AND entity_kind = :kind AND entity_id IN (
                SELECT entity_id FROM stage_results
                WHERE stage = :stage AND status = 'transient_error' AND run_id = :run_id)
            ORDER BY entity_id, id DESC
        ) last JOIN {_table(stage.entity)} t ON t.id = last.entity_id
        WHERE last.status = 'transient_error' AND last.run_id = :run_id
          AND (t.claimed_at IS NULL OR t.claimed_at <= last.created_at)
    """), {"stage": stage.name, "kind": stage.entity, "run_id": run_id}).all()
    return sorted(int(r.entity_id) for r in rows)


def release_items(session: Session, kind: str, ids: Iterable[int], *, reason: str, owner: str | None = None,
                  counts_as_lost: bool = True) -> list[Recovered]:
    """Return specific in-progress items (``heaters requeue --force``, or the executor handing back
    unfinished items when it is interrupted: then ``owner`` fences it and it is not counted as lost)."""
    id_list = [int(i) for i in ids]
    if not id_list:
        return []
    where = "id IN (" + ", ".join(str(i) for i in id_list) + ")"
    if owner is not None:
        where += " AND " + fence_condition(owner)
    if not counts_as_lost:
        out: list[Recovered] = []
        for in_progress, stage in _in_progress_stages(kind).items():
            rows = session.execute(text(f"""
                UPDATE {_table(kind)} SET state = :retry, version = version + 1, last_error = :reason,
                    claim_owner = NULL, claim_run_id = NULL, claim_expires_at = NULL, updated_at = now()
                WHERE state = :in_progress AND {where} RETURNING id
            """), {"retry": stage.retry_state, "reason": reason, "in_progress": in_progress}).all()
            out += [Recovered(kind, int(r.id), stage.name, in_progress, stage.retry_state, False, owner, reason)
                    for r in rows]
        return out
    return _recover(session, kind, where, {"reason": reason}, ":reason", len(id_list))


def history_json(history: Any) -> str:
    return json.dumps(history or [], default=str)
