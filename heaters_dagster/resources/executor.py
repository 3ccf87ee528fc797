"""The generic stage executor: one Dagster resource that every stage uses.

For each partition (item id) of a run it

1. **claims** the item: one conditional UPDATE from the stage's input state to its in-progress
   state (an item someone else holds, or that is not ready, is skipped, never run twice);
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

import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import dagster as dg

from heaters_dagster.errors import ClaimConflictError, HeatersError, classify
from heaters_dagster.pipeline.items import load_snapshots, record_result
from heaters_dagster.pipeline.jsonable import to_jsonable
from heaters_dagster.pipeline.outputs import BatchReport, ItemOutput, ItemSnapshot
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.resources.storage import StorageResource
from heaters_dagster.stages import Stage
from heaters_dagster.state_machine import transition
from heaters_dagster.storage import ArtifactStore


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

    def info(self, item: ItemSnapshot, msg: str, *args: Any) -> None:
        self.log.info(f"[{self.stage.name}] {item.kind} {item.id}: " + (msg % args if args else msg))


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
    def execute(
        self,
        stage: Stage,
        item_ids: list[int],
        persister: Persister,
        *,
        log: Any,
        attempt: int = 0,
        run_id: str | None = None,
    ) -> BatchReport:
        report = BatchReport(stage=stage.name)
        claimed = self._claim(stage, item_ids, report, log)
        if not claimed:
            return report
        with self.database.session() as session:
            snapshots = load_snapshots(session, stage.entity, claimed)
        store = self.storage.store
        params = self.params_for(stage)
        final_attempt = attempt >= stage.max_retries
        lock = threading.Lock()

        with tempfile.TemporaryDirectory(prefix=f"heaters-{stage.name}-", dir=self.scratch_dir) as tmp:
            def ctx_for(item_id: int) -> ItemContext:
                wd = Path(tmp) / str(item_id)
                wd.mkdir(parents=True, exist_ok=True)
                return ItemContext(stage, wd, store, params, log)

            def finish(item: ItemSnapshot, outcome: ItemOutput | BaseException, started: float) -> None:
                if isinstance(outcome, BaseException):
                    self._fail(stage, item, outcome, report, lock, log, final_attempt, attempt, run_id, started)
                else:
                    self._succeed(stage, item, outcome, persister, store, report, lock, log, attempt, run_id,
                                  started)
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
                    else:
                        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"heaters-{stage.name}") as pool:
                            list(pool.map(one, items))
            except BaseException as exc:  # interrupted (run terminated, Ctrl+C): hand unfinished items back
                self._release_unfinished(stage, claimed, report, log, exc)
                raise
        return report

    def _release_unfinished(self, stage: Stage, claimed: list[int], report: BatchReport, log: Any,
                            exc: BaseException) -> None:
        """Put claimed items that did not finish back in the input state with a new version, so the
        sensor requests them again instead of leaving them stuck in the in-progress state."""
        done = set(report.succeeded) | set(report.permanent) | set(report.transient)
        for item_id in claimed:
            if item_id in done:
                continue
            try:
                with self.database.session() as session:
                    transition(session, stage.entity, item_id, stage.in_progress_state, stage.retry_state,
                               error=f"interrupted: {type(exc).__name__}", bump_version=True)
                log.warning(f"[{stage.name}] {stage.entity} {item_id}: interrupted, returned to {stage.retry_state}")
            except Exception as db_exc:  # noqa: BLE001 - best effort while shutting down
                log.error(f"[{stage.name}] {stage.entity} {item_id}: could not release after interruption: {db_exc}")

    # ------------------------------------------------------------------------------------------
    def _claim(self, stage: Stage, item_ids: list[int], report: BatchReport, log: Any) -> list[int]:
        claimed: list[int] = []
        for item_id in item_ids:
            try:
                with self.database.session() as session:
                    transition(session, stage.entity, item_id, stage.input_states, stage.in_progress_state,
                               condition=stage.ready_sql)
                claimed.append(item_id)
            except ClaimConflictError as exc:
                report.skipped[item_id] = str(exc)
                log.info(f"[{stage.name}] {stage.entity} {item_id}: skipped, not claimable ({exc})")
        return claimed

    def _succeed(self, stage: Stage, item: ItemSnapshot, output: ItemOutput, persister: Persister,
                 store: ArtifactStore, report: BatchReport, lock: threading.Lock, log: Any, attempt: int,
                 run_id: str | None, started: float) -> None:
        stored: list[str] = []
        try:
            with self.database.session() as session:
                outcome = persister.persist(session, stage, item, output, store)
                stored = outcome.stored_keys
                transition(session, stage.entity, item.id, stage.in_progress_state, stage.output_state,
                           clear_error=True)
                duration = time.monotonic() - started
                record_result(session, stage=stage.name, kind=stage.entity, item_id=item.id, status="succeeded",
                              duration_s=duration, attempt=attempt, run_id=run_id,
                              result=to_jsonable(output.result) if output.result is not None else None)
        except Exception as exc:
            for key in stored:  # the transaction rolled back: take the files back out too
                try:
                    store.delete(key)
                except Exception:  # pragma: no cover - best effort
                    log.warning(f"[{stage.name}] could not remove {key} after a failed commit")
            self._fail(stage, item, exc, report, lock, log, attempt >= stage.max_retries, attempt, run_id, started)
            return
        with lock:
            report.succeeded[item.id] = output
            report.new_clip_ids.extend(outcome.new_clip_ids)
            report.durations[item.id] = duration
        log.info(f"[{stage.name}] {item.kind} {item.id}: {stage.in_progress_state} -> {stage.output_state} "
                 f"in {duration:.2f}s")

    def _fail(self, stage: Stage, item: ItemSnapshot, exc: BaseException, report: BatchReport,
              lock: threading.Lock, log: Any, final_attempt: bool, attempt: int, run_id: str | None,
              started: float) -> None:
        kind = classify(exc)
        message = str(exc) if isinstance(exc, HeatersError) and str(exc) else f"{type(exc).__name__}: {exc}"
        duration = time.monotonic() - started
        retry = kind == "transient" and not final_attempt
        target = stage.retry_state if retry else stage.failure_state
        if kind == "transient" and final_attempt:
            message = f"gave up after {attempt + 1} attempts: {message}"
        try:
            with self.database.session() as session:
                transition(session, stage.entity, item.id, stage.in_progress_state, target, error=message,
                           bump_retry=True)
                record_result(session, stage=stage.name, kind=stage.entity, item_id=item.id,
                              status="transient_error" if retry else "permanent_error", duration_s=duration,
                              attempt=attempt, run_id=run_id, error=exc, message=message)
        except Exception as db_exc:  # noqa: BLE001
            log.error(f"[{stage.name}] {item.kind} {item.id}: could not record failure: {db_exc}")
        with lock:
            (report.transient if retry else report.permanent)[item.id] = message
            report.durations[item.id] = duration
        level = log.warning if retry else log.error
        level(f"[{stage.name}] {item.kind} {item.id}: {kind} error -> {target}: {message}")
