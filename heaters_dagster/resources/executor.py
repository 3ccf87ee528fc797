"""The generic stage executor: one Dagster resource that every stage uses.

For each partition (item id) of a run it

1. **claims** the item: one conditional UPDATE from the stage's input state to its in-progress
   state that also records the owner (this step attempt) and a lease (an item someone else holds,
   or that is not ready, is skipped, never run twice). A heartbeat thread renews the leases while
   the items are worked on; every later write is fenced on the owner, so a worker whose lease was
   taken away can never commit (see ``heaters_dagster/leases.py``);
2. runs the stage's **handler** (a thin call into a pure media function) in a scratch folder;
3. **persists** the output through the stage's IO manager and makes the **success transition** in
   the same database transaction (files are moved into the store first and removed again if the
   transaction fails: no rows without files, no files without rows);
4. on error **classifies** it: permanent -> the failure state with the message, no retry;
   transient -> back to the input state, and the run raises so the asset's ``RetryPolicy``
   (exponential backoff with jitter) retries it; on the last attempt a transient error is final;
5. records a structured row in ``stage_results`` (error analytics) and returns a report that the
   asset turns into per-partition materializations with metadata (duration, sizes, counts).

Logs always name the item (``clip 42``/``video 7``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Optional, Protocol

import dagster as dg
from sqlalchemy import text

from heaters_dagster import leases
from heaters_dagster.errors import ClaimConflictError, HeatersError, classify
from heaters_dagster.pipeline.items import load_snapshots, record_result
from heaters_dagster.pipeline.jsonable import to_jsonable
from heaters_dagster.pipeline.outputs import BatchReport, ItemOutput, ItemSnapshot
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.stages import Stage, get_stage
from heaters_dagster.state_machine import transition
from heaters_dagster.storage import ArtifactStore


# How many times a run takes the items of its range that became ready while it worked (top_up).
MAX_TOP_UPS = 20


@dataclass
class _Told:
    """What a step has been told was committed (across the rounds of a top-up)."""
    ids: set[int] = field(default_factory=set)
    new_clips: int = 0


class Persister(Protocol):
    """What the executor needs from a stage's IO manager."""

    def persist(self, session: Any, stage: Stage, item: ItemSnapshot, output: ItemOutput,
                store: ArtifactStore) -> "PersistOutcome": ...


@dataclass
class PersistOutcome:
    new_clip_ids: list[int]
    stored_keys: list[str]  # keys written that did not exist before (removed if the txn fails)


@dataclass
class ItemContext:
    """What a handler gets besides its item: a scratch folder, the store, parameters, a logger."""

    stage: Stage
    workdir: Path
    store: ArtifactStore
    params: dict[str, Any]
    log: Any
    # another stage's parameters as this executor runs it (ingest detects scenes with splice's)
    params_of: Callable[[str], dict[str, Any]] = lambda name: dict(get_stage(name).params)

    def info(self, item: ItemSnapshot, msg: str, *args: Any) -> None:
        self.log.info(f"[{self.stage.name}] {item.kind} {item.id}: " + (msg % args if args else msg))


@dataclass(frozen=True)
class Committed:
    """Items the executor committed since it last yielded: what their materializations record."""

    outputs: dict[int, ItemOutput]
    durations: dict[int, float]
    new_clip_ids: tuple[int, ...] = ()  # clips these items registered (splice, split, merge)


class StageExecutor(dg.ConfigurableResource):
    """Runs any stage of the stage table over a set of partitions. See the module docstring."""

    database: DatabaseResource
    storage: StorageResource
    max_parallel: int = 2  # items of one run processed at once (ffmpeg itself is bounded too)
    scratch_dir: Optional[str] = None
    stage_params: dict[str, dict[str, Any]] = {}

    def params_for(self, stage: Stage) -> dict[str, Any]:
        return {**stage.params, **self.stage_params.get(stage.name, {})}

    # ------------------------------------------------------------------------------------------
    def execute(self, stage: Stage, item_ids: list[int], persister: Persister, **kwargs: Any) -> BatchReport:
        """``execute_iter`` to its end: the report of the stage's work over ``item_ids``."""
        work = self.execute_iter(stage, item_ids, persister, **kwargs)
        while True:
            try:
                next(work)
            except StopIteration as stop:
                return stop.value

    def execute_iter(
        self,
        stage: Stage,
        item_ids: list[int],
        persister: Persister,
        *,
        log: Any,
        attempt: int = 0,
        run_id: str | None = None,
        step_key: str | None = None,
        takeback_run_ids: tuple[str, ...] = (),
        explicit: bool = False,
        report: BatchReport | None = None,
        top_up: Callable[[], list[int]] | None = None,
    ) -> Generator[Committed, None, BatchReport]:
        """The stage's work over ``item_ids``. While the items are worked on, yields the ones committed
        since the last yield (a ``Committed``), so the caller can record them (Dagster events) while the
        other items still run; returns the report at the end. Whatever the caller raises into it at
        a yield (an interruption) is handled as if it had happened here: the unfinished items are
        handed back.

        ``explicit``: a person launched the run (UI, backfill, CLI) rather than a stage sensor. Items
        already past the stage are then taken back through it when the stage table allows it
        (``Stage.rerun_from``, or the failure state: a retry), and every other item that cannot run
        is reported as refused, with the reason, instead of being skipped quietly.

        ``report``: the caller's (empty) report to fill, so that after an interruption it still
        sees what was committed before the work stopped.

        ``top_up``: when the claimed items are done, called for more item ids (items of the run's
        range that became ready while it worked, for example clips a reviewer approved meanwhile);
        those that can be claimed are done in the same way, until it returns none (at most
        ``MAX_TOP_UPS`` times). A run of their own would only have queued behind this one."""
        report = report if report is not None else BatchReport(stage=stage.name)
        who = leases.Claimant(owner=leases.owner_token(run_id, step_key or stage.name, attempt), run_id=run_id,
                              takeback_run_ids=tuple(r for r in (run_id, *takeback_run_ids) if r))
        claimed = self._claim(stage, item_ids, who, report, log, explicit=explicit)
        told = _Told()
        rounds = 0
        while claimed:
            heartbeat = Heartbeat(self.database, stage, who.owner, claimed, log)
            heartbeat.start()
            try:
                yield from self._execute_claimed(stage, claimed, persister, who, heartbeat, report, log, attempt,
                                                 run_id, told)
            finally:
                heartbeat.stop()
            if top_up is None or rounds >= MAX_TOP_UPS:
                break
            rounds += 1
            more = top_up()
            claimed = self._claim(stage, more, who, report, log) if more else []
            if claimed:
                log.info(f"[{stage.name}] {len(claimed)} more {stage.entity}s of the run's range became ready "
                         f"while it worked: taking them too ({', '.join(map(str, claimed[:20]))})")
        return report

    def _execute_claimed(self, stage: Stage, claimed: list[int], persister: Persister, who: leases.Claimant,
                         heartbeat: "Heartbeat", report: BatchReport, log: Any, attempt: int,
                         run_id: str | None, told: "_Told") -> Generator[Committed, None, BatchReport]:
        with self.database.session() as session:
            snapshots = load_snapshots(session, stage.entity, claimed)
        store = self.storage.store
        params = self.params_for(stage)
        final_attempt = attempt >= stage.max_retries
        lock = threading.Lock()
        interrupted = threading.Event()  # set before the children of running items are killed

        def committed() -> "Committed | None":
            """The items committed since the last call (None: none)."""
            with lock:
                fresh = [i for i in report.succeeded if i not in told.ids]
                if not fresh:
                    return None
                told.ids.update(fresh)
                new_clips = tuple(report.new_clip_ids[told.new_clips:])
                told.new_clips = len(report.new_clip_ids)
                return Committed({i: report.succeeded[i] for i in fresh},
                                 {i: report.durations.get(i, 0.0) for i in fresh}, new_clips)

        with tempfile.TemporaryDirectory(prefix=f"heaters-{stage.name}-", dir=self.scratch_dir) as tmp:
            def ctx_for(item_id: int) -> ItemContext:
                wd = Path(tmp) / str(item_id)
                wd.mkdir(parents=True, exist_ok=True)
                return ItemContext(stage, wd, store, params, log,
                                   params_of=lambda name: self.params_for(get_stage(name)))

            def finish(item: ItemSnapshot, outcome: ItemOutput | BaseException, started: float) -> None:
                lost = heartbeat.lost.get(item.id)
                if lost is not None:  # someone took the item over: our work must not commit
                    with lock:
                        report.lost[item.id] = lost
                    log.warning(f"[{stage.name}] {item.kind} {item.id}: {lost}; result discarded")
                elif isinstance(outcome, BaseException) and interrupted.is_set():
                    # Failed because the interruption killed its children: not the item's fault,
                    # and no retry of this step will come. It is handed back with the unfinished.
                    log.warning(f"[{stage.name}] {item.kind} {item.id}: stopped by the interruption "
                                f"({type(outcome).__name__})")
                    return
                elif isinstance(outcome, BaseException):
                    self._fail(stage, item, outcome, report, lock, log, final_attempt, attempt, run_id, started,
                               who.owner)
                else:
                    self._succeed(stage, item, outcome, persister, store, report, lock, log, attempt, run_id,
                                  started, who.owner)
                heartbeat.done(item.id)
                shutil.rmtree(Path(tmp) / str(item.id), ignore_errors=True)

            try:
                items = [snapshots[i] for i in claimed if i in snapshots]
                if stage.batch_handler:
                    started = time.monotonic()
                    try:
                        outcomes = stage.handler_fn(ctx_for(0), items)
                    except Exception as exc:  # the whole batch failed the same way
                        outcomes = {item.id: exc for item in items}
                    for item in items:
                        finish(item, outcomes.get(item.id, RuntimeError("handler returned no output")), started)
                    if fresh := committed():
                        yield fresh
                else:
                    def one(item: ItemSnapshot) -> None:
                        started = time.monotonic()
                        try:
                            ctx = ctx_for(item.id)
                            ctx.info(item, "started (attempt %d)", attempt + 1)
                            out: ItemOutput | BaseException = stage.handler_fn(ctx, item)
                        except Exception as exc:
                            out = exc
                        finish(item, out, started)

                    workers = max(1, min(self.max_parallel, len(items)))
                    if workers == 1:
                        for item in items:
                            one(item)
                            if fresh := committed():
                                yield fresh
                    else:
                        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"heaters-{stage.name}") as pool:
                            try:
                                running = {pool.submit(one, item) for item in items}
                                while running:
                                    done, running = wait(running, return_when=FIRST_COMPLETED)
                                    for f in done:
                                        f.result()  # an error outside the handler: the step fails
                                    if fresh := committed():
                                        yield fresh
                            except BaseException as exc:
                                if not isinstance(exc, Exception):
                                    # Interrupted (run terminated, Ctrl+C): the items not started yet are
                                    # not started (the pool's shutdown would run them all), and the children
                                    # of those being worked on (ffmpeg, yt-dlp) are killed, or the shutdown
                                    # would wait for them.
                                    for f in running:
                                        f.cancel()
                                    interrupted.set()
                                    _kill_children()
                                raise
            except BaseException as exc:  # interrupted (run terminated, Ctrl+C): hand unfinished items back
                _kill_children()
                self._release_unfinished(stage, claimed, report, log, exc, who.owner)
                raise
        return report

    def _release_unfinished(self, stage: Stage, claimed: list[int], report: BatchReport, log: Any,
                            exc: BaseException, owner: str) -> None:
        """Put claimed items that did not finish back in the input state with a new version, so the
        sensor requests them again instead of leaving them stuck in the in-progress state. Fenced on
        our own claim: an item someone else took over is left alone."""
        done = set(report.succeeded) | set(report.permanent) | set(report.transient) | set(report.lost)
        todo = [i for i in claimed if i not in done]
        try:
            with self.database.session() as session:
                back = leases.release_items(session, stage.entity, todo, owner=owner, counts_as_lost=False,
                                            reason=f"interrupted: {type(exc).__name__}")
            for r in back:
                log.warning(f"[{stage.name}] {stage.entity} {r.id}: interrupted, returned to {r.to_state}")
        except Exception as db_exc:  # noqa: BLE001 - best effort while shutting down; the lease expires
            log.error(f"[{stage.name}] could not release {todo} after interruption ({db_exc}); "
                      f"their leases expire and the recovery sensor returns them")

    def ready_among(self, stage: Stage, item_ids: list[int]) -> list[int]:
        """Those of ``item_ids`` that are in the stage's input state and ready now (one query)."""
        if not item_ids:
            return []
        from sqlalchemy import bindparam

        ready = f"({stage.ready_sql})" if stage.ready_sql else "true"
        with self.database.session() as session:
            rows = session.execute(text(
                f"SELECT id FROM {leases.TABLES[stage.entity]} WHERE id IN :ids AND state IN :inputs AND {ready} "
                "ORDER BY id").bindparams(bindparam("ids", expanding=True), bindparam("inputs", expanding=True)),
                {"ids": list(item_ids), "inputs": list(stage.input_states)}).all()
        return [int(r.id) for r in rows]

    def stage_work(self, stage: Stage, item_ids: list[int]) -> tuple[list[int], list[int]]:
        """Split a run's partitions into this stage's work (in an input or the in-progress state,
        or unknown) and the others (a range bridging clips in other states of the shared clip
        partition set): one query, so a wide range costs no claim attempt per foreign clip."""
        if not item_ids:
            return [], []
        from sqlalchemy import bindparam

        with self.database.session() as session:
            rows = session.execute(text(
                f"SELECT id, state FROM {leases.TABLES[stage.entity]} WHERE id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)), {"ids": list(item_ids)}).all()
        mine = {*stage.input_states, stage.in_progress_state}
        state = {int(r.id): r.state for r in rows}
        work = [i for i in item_ids if i not in state or state[i] in mine]
        return work, [i for i in item_ids if i in state and state[i] not in mine]

    # ------------------------------------------------------------------------------------------
    def _claim(self, stage: Stage, item_ids: list[int], who: leases.Claimant, report: BatchReport,
               log: Any, *, explicit: bool = False) -> list[int]:
        claimed: list[int] = []
        rewind = (*stage.rerun_from, stage.failure_state) if explicit else ()
        for item_id in item_ids:
            with self.database.session() as session:
                got = leases.claim(session, stage, item_id, who, rewind_from=rewind)
                if got is None:
                    row = session.execute(text(
                        f"SELECT state, claim_owner, claim_expires_at FROM {leases.TABLES[stage.entity]} "
                        "WHERE id = :id"), {"id": item_id}).first()
            if got is not None:
                claimed.append(item_id)
                if got == stage.in_progress_state:
                    report.taken_back.append(item_id)
                    log.warning(f"[{stage.name}] {stage.entity} {item_id}: took back this run's earlier claim")
                elif got in rewind:
                    report.rewound[item_id] = got
                    log.info(f"[{stage.name}] {stage.entity} {item_id}: run again from {got} (launched by a person)")
                continue
            if row is None:
                reason = f"{stage.entity} {item_id} does not exist"
            elif row.state == stage.in_progress_state:
                reason = f"held by {row.claim_owner} until {row.claim_expires_at}"
                report.held[item_id] = reason
            elif row.state in stage.input_states:
                reason = f"not ready yet ({stage.ready_sql})"
            else:
                reason = f"in state {row.state!r}, expected {' or '.join(stage.input_states)}"
            if explicit and item_id not in report.held:
                allowed = ", ".join((*stage.input_states, *stage.rerun_from, stage.failure_state))
                report.refused[item_id] = f"{reason}; {stage.name} runs {stage.entity}s in {allowed}"
                log.error(f"[{stage.name}] {stage.entity} {item_id}: refused ({report.refused[item_id]})")
                continue
            report.skipped[item_id] = reason
            log.info(f"[{stage.name}] {stage.entity} {item_id}: skipped, not claimable ({reason})")
        return claimed

    def _succeed(self, stage: Stage, item: ItemSnapshot, output: ItemOutput, persister: Persister,
                 store: ArtifactStore, report: BatchReport, lock: threading.Lock, log: Any, attempt: int,
                 run_id: str | None, started: float, owner: str) -> None:
        stored: list[str] = []
        try:
            with self.database.session() as session:
                outcome = persister.persist(session, stage, item, output, store)
                stored = outcome.stored_keys
                transition(session, stage.entity, item.id, stage.in_progress_state, stage.output_state,
                           clear_error=True, condition=leases.fence_condition(owner),
                           values=leases.clear_claim_values())
                duration = time.monotonic() - started
                record_result(session, stage=stage.name, kind=stage.entity, item_id=item.id, status="succeeded",
                              duration_s=duration, attempt=attempt, run_id=run_id,
                              result=to_jsonable(output.result) if output.result is not None else None)
        except Exception as exc:
            for key in stored:  # the transaction rolled back: take the files back out too
                try:
                    store.delete(key)
                except Exception:  # pragma: no cover - best effort; `heaters doctor` finds orphans
                    log.warning(f"[{stage.name}] could not remove {key} after a failed commit")
            if isinstance(exc, ClaimConflictError) and not self._still_ours(stage, item.id, owner):
                # The fence: someone else owns the item now (its lease was recovered).
                with lock:
                    report.lost[item.id] = f"claim lost before commit ({exc})"
                log.warning(f"[{stage.name}] {item.kind} {item.id}: claim lost before commit; result discarded")
                return
            self._fail(stage, item, exc, report, lock, log, attempt >= stage.max_retries, attempt, run_id, started,
                       owner)
            return
        # Lineage in the materialization's metadata: a clip's source video (the video -> clip edge
        # has no partition mapping), a video's or split/merge's new clips.
        if item.kind == "clip" and item.row.get("source_video_id") is not None:
            output.metadata.setdefault("source_video_id", int(item.row["source_video_id"]))
        if outcome.new_clip_ids:
            output.metadata.setdefault("new_clip_ids", ", ".join(str(i) for i in outcome.new_clip_ids))
        with lock:
            report.succeeded[item.id] = output
            report.new_clip_ids.extend(outcome.new_clip_ids)
            report.durations[item.id] = duration
        log.info(f"[{stage.name}] {item.kind} {item.id}: {stage.in_progress_state} -> {stage.output_state} "
                 f"in {duration:.2f}s")

    def _still_ours(self, stage: Stage, item_id: int, owner: str) -> bool:
        try:
            with self.database.session() as session:
                return session.execute(text(f"SELECT claim_owner = :o FROM {leases.TABLES[stage.entity]} "
                                            "WHERE id = :id"), {"o": owner, "id": item_id}).scalar() is True
        except Exception:  # noqa: BLE001 - cannot tell: treat as ours, the failure path decides
            return True

    def _fail(self, stage: Stage, item: ItemSnapshot, exc: BaseException, report: BatchReport,
              lock: threading.Lock, log: Any, final_attempt: bool, attempt: int, run_id: str | None,
              started: float, owner: str) -> None:
        kind = classify(exc)
        message = str(exc) if isinstance(exc, HeatersError) and str(exc) else f"{type(exc).__name__}: {exc}"
        duration = time.monotonic() - started
        retry = kind == "transient" and not final_attempt
        target = stage.retry_state if retry else stage.failure_state
        if kind == "transient" and final_attempt:
            message = f"gave up after {attempt + 1} attempts: {message}"

        def record() -> None:
            with self.database.session() as session:
                transition(session, stage.entity, item.id, stage.in_progress_state, target, error=message,
                           bump_retry=True, condition=leases.fence_condition(owner),
                           values=leases.clear_claim_values())
                record_result(session, stage=stage.name, kind=stage.entity, item_id=item.id,
                              status="transient_error" if retry else "permanent_error", duration_s=duration,
                              attempt=attempt, run_id=run_id, error=exc, message=message)

        try:
            _with_db_retries(record, what=f"record the failure of {item.kind} {item.id}", log=log)
        except ClaimConflictError as conflict:
            with lock:
                report.lost[item.id] = f"claim lost before the failure was recorded ({conflict})"
            log.warning(f"[{stage.name}] {item.kind} {item.id}: claim lost; failure not recorded")
            return
        except Exception as db_exc:  # noqa: BLE001 - the database stayed away: the lease expires
            with lock:
                report.unfinished[item.id] = f"{message}; could not be recorded: {db_exc}"
            log.error(f"[{stage.name}] {item.kind} {item.id}: could not record failure ({db_exc}); the item stays "
                      f"claimed until its lease expires, then the recovery sensor returns it")
            return
        with lock:
            (report.transient if retry else report.permanent)[item.id] = message
            report.durations[item.id] = duration
        level = log.warning if retry else log.error
        level(f"[{stage.name}] {item.kind} {item.id}: {kind} error -> {target}: {message}")


def _with_db_retries(fn: Callable[[], None], *, what: str, log: Any, tries: int = 6) -> None:
    """Run a database write, retrying while the database is unreachable (a restart takes seconds):
    1, 2, 4, 8, 16 s between tries. Conflicts and other errors are raised at once."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    for i in range(tries):
        try:
            fn()
            return
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                raise
            if i == tries - 1:
                raise
            log.warning(f"database unavailable while trying to {what} ({type(exc).__name__}); retrying")
            time.sleep(2 ** i)


def _kill_children() -> None:
    """Kill every media subprocess this process started (their process groups)."""
    try:
        from heaters_dagster.media.ffmpeg_tools import kill_all_children
    except ImportError:  # pragma: no cover - older runner
        return
    kill_all_children()


class Heartbeat:
    """Renews the leases of the items a step is working on, every lease/4 seconds.

    An item whose claim is no longer ours (the recovery sensor or an operator gave it to someone
    else) is marked lost; the executor then discards its result. If the process that started this
    step (the run worker) dies, the step is an orphan: Dagster has marked or will mark the run
    failed, so the step kills its media subprocesses, hands its unfinished items back and exits
    without materializing anything."""

    def __init__(self, database: DatabaseResource, stage: Stage, owner: str, ids: list[int], log: Any):
        self.database, self.stage, self.owner, self.log = database, stage, owner, log
        self.active = set(ids)
        self.lost: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._parent = os.getppid()
        self.interval = max(0.2, leases.lease_seconds() / 4)
        self._thread = threading.Thread(target=self._loop, name=f"heaters-heartbeat-{stage.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def done(self, item_id: int) -> None:
        with self._lock:
            self.active.discard(item_id)

    def _orphaned(self) -> bool:
        return self._parent > 1 and os.getppid() != self._parent

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._orphaned():
                self._exit_orphan()
                return
            with self._lock:
                ids = sorted(self.active)
            if not ids:
                continue
            try:
                with self.database.session() as session:
                    held = leases.renew(session, self.stage.entity, self.owner, ids)
            except Exception as exc:  # noqa: BLE001 - database briefly away: try again next beat
                self.log.warning(f"[{self.stage.name}] lease renewal failed ({type(exc).__name__}); retrying")
                continue
            with self._lock:
                for i in ids:
                    if i not in held and i in self.active:
                        self.lost[i] = "lease lost (the item was recovered and handed to another worker)"

    def _exit_orphan(self) -> None:
        self.log.error(f"[{self.stage.name}] the run worker that started this step died; stopping the step "
                       f"and handing its items back")
        _kill_children()
        with self._lock:
            ids = sorted(self.active)
        try:
            with self.database.session() as session:
                leases.release_items(session, self.stage.entity, ids, owner=self.owner,
                                     reason="the run worker died while the item was in progress")
        except Exception:  # noqa: BLE001 - the lease expires instead
            pass
        os._exit(70)
