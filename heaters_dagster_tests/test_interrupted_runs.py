"""A `heaters dev` that stopped while runs were going leaves them STARTED in Dagster (the default
launcher cannot check run workers after a restart): the next start marks them failed, so the run
failure sensor hands their items back at once. Only on the embedded database."""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from dagster._core.utils import make_new_run_id

from heaters_dagster.lifecycle import fail_interrupted_runs


def _instance_home(tmp_path, monkeypatch):
    (tmp_path / "dagster.yaml").write_text(f"storage:\n  sqlite:\n    base_dir: {tmp_path}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))


def _add(instance, status):
    run = DagsterRun(job_name="sprite_job", run_id=make_new_run_id(), status=status)
    instance.add_run(run)
    return run.run_id


def test_runs_left_in_progress_are_failed_at_start(tmp_path, monkeypatch):
    _instance_home(tmp_path, monkeypatch)
    monkeypatch.delenv("HEATERS_DATABASE_URL", raising=False)
    monkeypatch.delenv("HEATERS_DAGSTER_DATABASE_URL", raising=False)
    with dg.DagsterInstance.get() as instance:
        started = _add(instance, DagsterRunStatus.STARTED)
        done = _add(instance, DagsterRunStatus.SUCCESS)
    assert fail_interrupted_runs(echo=lambda _m: None) == [started]
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(started).status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(done).status == DagsterRunStatus.SUCCESS
        failures = [e for e in instance.all_logs(started) if e.dagster_event and e.dagster_event.is_run_failure]
        assert failures and "heaters dev stopped" in failures[0].message


def test_a_configured_server_is_left_alone(tmp_path, monkeypatch):
    _instance_home(tmp_path, monkeypatch)
    monkeypatch.setenv("HEATERS_DATABASE_URL", "postgresql://someone@db.example/heaters")
    with dg.DagsterInstance.get() as instance:
        started = _add(instance, DagsterRunStatus.STARTED)
    assert fail_interrupted_runs(echo=lambda _m: None) == []
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(started).status == DagsterRunStatus.STARTED
