"""``heaters doctor``: diagnose finds exactly the planted problems (an old orphan file, a row without
its file, an old temp file, a stale scratch folder, an expired claim, a dead embedded-Postgres
holder) and nothing fresh or deliberate; repair fixes them and a second diagnose is clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from heaters_dagster import storage_keys
from heaters_dagster.cli.main import cli
from heaters_dagster.database.models import ClipArtifact, StageResult
from heaters_dagster.doctor import HOLDERS_FILE, diagnose, repair
from heaters_dagster_tests.factories import make_clips, make_video, row_of

HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _age_tree(path: Path, seconds: float) -> None:
    for p in [*path.rglob("*"), path]:
        _age(p, seconds)


def _stored(store, key: str, data: bytes = b"data", age: float = 0.0) -> Path:
    store.put_bytes(data, key)
    path = store.root / key
    if age:
        _age(path, age)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def planted(db, store, tmp_path):
    """A store and database with one of each problem, plus things that must not be reported."""
    vid = make_video(db, state="spliced")
    original, normalized = storage_keys.source_original(vid, "mp4"), storage_keys.source_normalized(vid)
    with db.session() as s:
        s.execute(text("UPDATE source_videos SET original_key = :o, normalized_key = :n WHERE id = :id"),
                  {"o": original, "n": normalized, "id": vid})
    _stored(store, original, age=5 * HOUR)
    _stored(store, normalized, age=5 * HOUR)
    ok, missing, archived, gone = make_clips(db, vid, [(0, 24), (24, 48), (48, 72), (72, 96)])
    with db.session() as s:
        s.execute(text("UPDATE clips SET state = 'archived', file_deleted = true WHERE id = :id"),
                  {"id": archived})
        s.execute(text("UPDATE clips SET state = 'review_archived' WHERE id = :id"), {"id": gone})
    ok_key, missing_key = row_of(db, "clip", ok).file_key, row_of(db, "clip", missing).file_key
    _stored(store, ok_key, age=5 * HOUR)  # referenced: fine however old

    orphan = storage_keys.clip_file(vid, 96, 120)
    _stored(store, orphan, age=2 * HOUR)
    fresh_orphan = storage_keys.clip_file(vid, 120, 144)
    _stored(store, fresh_orphan, age=60)  # a commit may be in flight: inside the grace period
    temp = store.root / "clips" / "9" / ".sprite.jpg.0badf00d.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"half a sprite")
    _age(temp, 2 * HOUR)
    fresh_temp = store.root / "clips" / "9" / ".sprite.jpg.0000beef.tmp"
    fresh_temp.write_bytes(b"being written")

    scratch = tmp_path / "scratch"
    stale = scratch / "heaters-sprite-k2j4h5g6"
    (stale / str(ok)).mkdir(parents=True)
    (stale / str(ok) / "sprite.jpg").write_bytes(b"x")
    _age_tree(stale, 7 * HOUR)
    busy = scratch / "heaters-splice-a1b2c3d4"  # an old folder a live run still writes into
    (busy / "1").mkdir(parents=True)
    _age_tree(busy, 7 * HOUR)
    (busy / "1" / "clip.mp4").write_bytes(b"fresh")
    unrelated = scratch / "heaters-test-home-zzz"  # not a stage scratch folder
    unrelated.mkdir()
    _age_tree(unrelated, 7 * HOUR)

    return {"vid": vid, "ok": ok, "missing": missing, "missing_key": missing_key, "orphan": orphan,
            "fresh_orphan": fresh_orphan, "temp": temp, "fresh_temp": fresh_temp, "scratch": scratch,
            "stale": stale, "busy": busy, "unrelated": unrelated, "pgdata": tmp_path / "no-pgdata"}


def _diagnose(db, store, p, **kw):
    with db.session() as s:
        return diagnose(s, store, scratch_dirs=[p["scratch"]], pgdata=p["pgdata"], **kw)


def _subjects(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f.subject)
    return out


def test_diagnose_finds_exactly_the_planted_problems_and_repair_fixes_them(db, store, planted):
    p = planted
    report = _diagnose(db, store, p)
    assert _subjects(report) == {
        "orphan_file": [p["orphan"]],
        "temp_file": ["clips/9/.sprite.jpg.0badf00d.tmp"],
        "missing_file": [f"clip {p['missing']}"],
        "stale_scratch": [str(p["stale"])],
    }, [f.line() for f in report.findings]
    assert not report.healthy and all(f.fixable for f in report.findings) and report.skipped == []
    missing = report.by_check("missing_file")[0]
    assert p["missing_key"] in missing.message and "sprite_failed" in missing.fix

    with db.session() as s:
        repair(report, s, store)
    assert report.unresolved == [], [f.line() for f in report.findings]
    assert "4 fixed, 0 left" in report.summary()
    assert not store.exists(p["orphan"]) and not p["temp"].exists() and not p["stale"].exists()
    assert store.exists(p["fresh_orphan"]) and p["fresh_temp"].exists()
    assert p["busy"].exists() and p["unrelated"].exists()
    row = row_of(db, "clip", p["missing"])
    assert (row.state, row.last_error) == ("sprite_failed", f"stored file missing: {p['missing_key']}")
    with db.session() as s:
        res = s.execute(select(StageResult).where(StageResult.entity_id == p["missing"])).scalar_one()
    assert (res.stage, res.status, res.message) == ("sprite", "permanent_error", row.last_error)
    assert row_of(db, "clip", p["ok"]).state == "spliced"

    again = _diagnose(db, store, p)
    assert again.healthy, [f.line() for f in again.findings]
    assert again.summary() == "healthy: nothing to fix"


def test_in_grace_files_count_once_the_grace_is_over(db, store, planted):
    p = planted
    later = _diagnose(db, store, p, now=time.time() + 2 * HOUR, checks=("orphan_file", "temp_file"))
    assert sorted(_subjects(later)["orphan_file"]) == sorted([p["orphan"], p["fresh_orphan"]])
    assert len(_subjects(later)["temp_file"]) == 2
    strict = _diagnose(db, store, p, orphan_grace=10, checks=("orphan_file",))
    assert sorted(_subjects(strict)["orphan_file"]) == sorted([p["orphan"], p["fresh_orphan"]])


def test_repair_leaves_a_file_that_changed_since_the_diagnosis(db, store, planted):
    p = planted
    report = _diagnose(db, store, p, checks=("orphan_file",))
    _stored(store, p["orphan"], b"rewritten")  # stored again (fresh) after the diagnosis
    with db.session() as s:
        repair(report, s, store)
    (f,) = report.findings
    assert not f.fixed and "changed" in f.outcome and store.exists(p["orphan"])


def test_missing_file_outside_a_waiting_state_is_only_reported(db, store, tmp_path):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="pending_review")
    store.put_bytes(b"clip", row_of(db, "clip", cid).file_key)
    with db.session() as s:
        s.add(ClipArtifact(clip_id=cid, artifact_type="sprite", storage_key=storage_keys.sprite(cid)))
    with db.session() as s:
        report = diagnose(s, store, checks=("missing_file",))
    (f,) = report.findings
    assert f.subject == f"clip {cid}" and not f.fixable and "sprite" in f.message
    with db.session() as s:
        repair(report, s, store)
    assert report.unresolved == [f] and row_of(db, "clip", cid).state == "pending_review"


def test_expired_claim_is_found_and_recovered(db, store):
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="generating_sprite")
    with db.session() as s:
        s.execute(text("UPDATE clips SET claim_owner = 'run/step#0@gone:1', "
                       "claim_expires_at = now() - interval '1 minute' WHERE id = :id"), {"id": cid})
    with db.session() as s:
        report = diagnose(s, store, checks=("expired_claim",))
    assert _subjects(report) == {"expired_claim": [f"clip {cid}"]}
    with db.session() as s:
        repair(report, s, store)
    assert report.unresolved == [] and "generating_sprite -> spliced" in report.findings[0].outcome
    row = row_of(db, "clip", cid)
    assert row.state == "spliced" and "heaters doctor" in row.last_error
    with db.session() as s:
        assert diagnose(s, store, checks=("expired_claim",)).healthy


def test_dead_embedded_postgres_holders_are_removed(db, store, tmp_path):
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    dead = _dead_pid()
    (pgdata / HOLDERS_FILE).write_text(json.dumps([os.getpid(), dead]))
    with db.session() as s:
        report = diagnose(s, store, pgdata=pgdata, checks=("stale_pg_holder",))
    assert _subjects(report) == {"stale_pg_holder": [f"pid {dead}"]}
    with db.session() as s:
        repair(report, s, store)
    assert report.unresolved == []
    assert json.loads((pgdata / HOLDERS_FILE).read_text()) == [os.getpid()]


def test_cli_reports_then_fixes(db, store, store_dir, planted, monkeypatch):
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store_dir))
    args = ["doctor", "--scratch-dir", str(planted["scratch"])]
    out = CliRunner().invoke(cli, [*args, "--json"])
    assert out.exit_code == 1, out.output
    doc = json.loads(out.output)
    assert not doc["healthy"]
    assert {f["subject"] for f in doc["findings"]} >= {planted["orphan"], str(planted["stale"])}
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1 and out.output.strip().splitlines()[-1].startswith("doctor: ")
    lines = out.output.splitlines()
    assert any(line.startswith("orphan_file") and planted["orphan"] in line for line in lines)
    out = CliRunner().invoke(cli, [*args, "--fix"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0 and "doctor: healthy" in out.output, out.output
