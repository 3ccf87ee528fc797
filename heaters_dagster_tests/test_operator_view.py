"""What an operator sees and can do about held items: `heaters status` lists every in-progress item
with its age, owner and lease (expired ones flagged); `heaters requeue` takes back expired claims,
and live ones only with --force."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from heaters_dagster import leases
from heaters_dagster.cli.main import cli
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_clips, make_video, row_of


@pytest.fixture()
def env(db, store_dir, monkeypatch):
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store_dir))
    return db


def _held(db, lease_s: float):
    vid = make_video(db)
    live, dead = make_clips(db, vid, [(0, 24), (24, 48)])
    with db.session() as s:
        leases.claim(s, get_stage("sprite"), live, leases.Claimant("run-1/sprite#0@h:11", "run-1"), lease_s=600)
        leases.claim(s, get_stage("sprite"), dead, leases.Claimant("run-2/sprite#0@h:22", "run-2"), lease_s=lease_s)
        s.execute(text("UPDATE clips SET claim_expires_at = now() - interval '5 seconds' WHERE id = :i"), {"i": dead})
    return live, dead


def test_status_lists_in_progress_items_with_owner_and_lease(env):
    live, dead = _held(env, 1)
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 0, out.output
    lines = {ln.split("[")[0].strip(): ln for ln in out.output.splitlines() if "generating_sprite]" in ln}
    assert "owner run-1/sprite#0@h:11" in lines[f"clip {live}"] and "left" in lines[f"clip {live}"]
    assert "owner run-2/sprite#0@h:22" in lines[f"clip {dead}"] and "EXPIRED" in lines[f"clip {dead}"]
    st = json.loads(CliRunner().invoke(cli, ["status", "--json"]).output)
    by_id = {h["id"]: h for h in st["in_progress"]}
    assert by_id[dead]["expired"] is True and by_id[live]["expired"] is False
    assert by_id[live]["lease_left_s"] > 500 and by_id[live]["age_s"] >= 0


def test_requeue_takes_expired_claims_and_live_ones_only_with_force(env):
    live, dead = _held(env, 1)
    out = CliRunner().invoke(cli, ["requeue", "sprite", str(dead), str(live)])
    assert out.exit_code == 1
    assert f"clip {dead}: generating_sprite -> spliced" in out.output
    assert "live lease" in out.output and "--force" in out.output
    row = row_of(env, "clip", dead)
    assert (row.state, row.version, row.claim_owner) == ("spliced", 1, None)
    assert row_of(env, "clip", live).state == "generating_sprite"
    out = CliRunner().invoke(cli, ["requeue", "--force", "sprite", str(live)])
    assert out.exit_code == 0, out.output
    row = row_of(env, "clip", live)
    assert row.state == "spliced" and "requeued by an operator" in row.last_error
