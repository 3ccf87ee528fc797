"""The production shape on loopback, for the Celery test and the scale benchmark: a real Redis
broker (Debian's ``redis-server``), a real S3 API server (``moto_server``), Celery workers started
with ``heaters worker``, a Dagster instance on PostgreSQL, and a driver that does what the daemon
does (tick the sensors, launch the runs they request, all of one tick at once, each run's steps
going over Celery; hand a failed run's items back; return expired leases).

    with CeleryCluster(tmp, db_url) as cluster:      # broker, S3 server, bucket, instance
        cluster.start_workers(2)                       # heaters worker processes
        driver = cluster.driver()
        driver.run_until_idle()

Every process is started in its own session and killed, with its whole tree, on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dagster as dg
import psutil

from heaters_dagster.database.embedded import to_libpq_url
from heaters_dagster_tests.dev_harness import free_port, port_open

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "heaters-test", "AWS_SECRET_ACCESS_KEY": "heaters-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


class ClusterError(AssertionError):
    pass


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise ClusterError(f"{what} not ready after {timeout:.0f} s\n{tail}")


def kill_tree(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Kill ``proc``, its process group and every descendant; wait for them."""
    if proc is None:
        return
    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        victims = []
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in victims:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path

    def pids(self) -> set[int]:
        try:
            root = psutil.Process(self.proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.Error:
            return set()


@dataclass
class CeleryCluster:
    """Redis, moto's S3 server, a bucket, a Dagster instance on its own PostgreSQL database, and
    the environment every process (this one and the workers) reads its configuration from."""

    root: Path
    database_url: str  # the Heaters database (SQLAlchemy URL)
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    instance: dg.DagsterInstance | None = None
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _dagster_db: str = ""

    # -- start/stop ------------------------------------------------------------------------------
    def __enter__(self) -> "CeleryCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, cwd=REPO, env=env or os.environ.copy(), stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        redis_port, s3_port = free_port(), free_port()
        (self.root / "redis").mkdir(exist_ok=True)
        self._popen([REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.root / "redis")], self.root / "redis.log")
        self._popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                    self.root / "moto.log", env={**os.environ, **S3_KEYS})
        _wait(lambda: port_open(redis_port), 20, "redis-server", self.root / "redis.log")
        _wait(lambda: port_open(s3_port), 60, "moto_server", self.root / "moto.log")
        endpoint = f"http://127.0.0.1:{s3_port}"
        broker = f"redis://127.0.0.1:{redis_port}/0"
        self._dagster_db = f"dagster_celery_{uuid.uuid4().hex[:8]}"
        self._create_database(self._dagster_db)
        dagster_url = _with_database(to_libpq_url(self.database_url), self._dagster_db)
        self.env = {
            **S3_KEYS,
            "HEATERS_DATABASE_URL": self.database_url,
            "HEATERS_DAGSTER_DATABASE_URL": dagster_url,
            "HEATERS_STORAGE_URL": "s3://heaters-test/store",
            "HEATERS_STORAGE_ENDPOINT_URL": endpoint,
            "HEATERS_EXECUTOR": "celery",
            "HEATERS_CELERY_BROKER_URL": broker,
            "HEATERS_CELERY_BACKEND_URL": f"redis://127.0.0.1:{redis_port}/1",
            "HEATERS_CLIP_PRETRAINED": "none",
            "HEATERS_CONFIG": "none",
            "HF_HUB_OFFLINE": "1",
            **self.extra_env,
        }
        for k, v in self.env.items():  # this process is the run worker: the same configuration
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        from heaters_dagster.settings import reload

        reload()
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_keys()).create_bucket(Bucket="heaters-test")
        home = self.root / "dagster_home"
        home.mkdir(exist_ok=True)
        (home / "dagster.yaml").write_text(
            "storage:\n  postgres:\n    postgres_url:\n      env: HEATERS_DAGSTER_DATABASE_URL\n"
            "telemetry:\n  enabled: false\n")
        self.instance = dg.DagsterInstance.from_config(str(home))

    def start_workers(self, n: int, *, concurrency: int = 1, timeout: float = 120.0) -> list[Worker]:
        """Start ``n`` ``heaters worker`` processes and wait until each answers a ping."""
        started = []
        for _ in range(n):
            name = f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:4]}@127.0.0.1"
            log = self.root / f"{name.split('@')[0]}.log"
            env = {**os.environ, **self.env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
            proc = self._popen([str(VENV_BIN / "heaters"), "worker", "-c", str(concurrency), "-n", name,
                                "-l", "INFO"], log, env=env)
            w = Worker(name, proc, log)
            self.workers.append(w)
            started.append(w)
        app = self.celery_app()
        for w in started:
            _wait(lambda w=w: w.proc.poll() is not None or bool(app.control.ping(destination=[w.name], timeout=1.0)),
                  timeout, f"celery worker {w.name}", w.log)
            if w.proc.poll() is not None:
                raise ClusterError(f"worker {w.name} exited with {w.proc.returncode}\n"
                                   f"{w.log.read_text(errors='replace')[-3000:]}")
        return started

    def stop_workers(self) -> None:
        for w in self.workers:
            kill_tree(w.proc)
        self.workers.clear()

    def celery_app(self) -> Any:
        from heaters_dagster.scaleout import celery_app

        return celery_app()

    def stop(self) -> None:
        self.stop_workers()
        for proc in reversed(self.procs):
            kill_tree(proc)
        self.procs.clear()
        if self.instance is not None:
            self.instance.dispose()
            self.instance = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        from heaters_dagster.settings import reload

        reload()
        if self._dagster_db:
            try:
                self._drop_database(self._dagster_db)
            except Exception:  # noqa: BLE001 - the server may already be gone at session end
                pass

    # -- databases -------------------------------------------------------------------------------
    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        from heaters_dagster.database.engine import normalise_url

        engine = create_engine(normalise_url(self.database_url), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def _create_database(self, name: str) -> None:
        self._admin(f'CREATE DATABASE "{name}"')

    def _drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def store(self) -> Any:
        from heaters_dagster.storage import ArtifactStore

        return ArtifactStore(self.env["HEATERS_STORAGE_URL"])

    def driver(self, **kw: Any) -> "CeleryDriver":
        assert self.instance is not None
        return CeleryDriver(self.instance, self.root / "dagster_home", **kw)


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"], "region_name": S3_KEYS["AWS_DEFAULT_REGION"]}


def _with_database(libpq_url: str, name: str) -> str:
    """The same server URL with another database name (keeps query parameters such as host=)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(libpq_url)
    return urlunsplit(parts._replace(path="/" + name))


@dataclass
class LaunchedRun:
    stage: str
    run_id: str
    success: bool
    partitions: list[str]


@dataclass
class CeleryDriver:
    """The daemon's loop in this process: tick every stage sensor (and the review sensor), launch
    the runs of one tick at once (each in a run worker process of its own, as the daemon's run
    launcher does, its step on a Celery worker), then hand failed runs' items back (``release_failed_runs``) and return expired leases
    (``lease_recovery_sensor``), until nothing is ready."""

    instance: dg.DagsterInstance
    dagster_home: Path
    max_parallel_runs: int = 8
    cursors: dict[str, str | None] = field(default_factory=dict)
    runs: list[LaunchedRun] = field(default_factory=list)
    on_round: Callable[[int], None] | None = None
    _defs: dg.Definitions | None = None

    @property
    def defs(self) -> dg.Definitions:
        if self._defs is None:
            from heaters_dagster.definitions import load_definitions

            self._defs = load_definitions()
        return self._defs

    def _sensor_context(self, name: str) -> Any:
        return dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(name),
                                       resources={"database": self.defs.resources["database"],
                                                  "storage": self.defs.resources["storage"]},
                                       definitions=self.defs)

    def tick(self, name: str) -> list[dg.RunRequest]:
        sensor = self.defs.resolve_sensor_def(name)
        with self._sensor_context(name) as ctx:
            result = sensor(ctx)
        if not isinstance(result, dg.SensorResult):
            return []
        for req in result.dynamic_partitions_requests or []:
            if isinstance(req, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        for event in result.asset_events or []:
            self.instance.report_runless_asset_event(event)
        self.cursors[name] = result.cursor
        return list(result.run_requests or [])

    def launch(self, stage: str, request: dg.RunRequest) -> LaunchedRun:
        """One run, as the daemon's run launcher starts it: a run worker process of its own
        (``dagster job execute``), whose step goes over Celery."""
        import json

        from heaters_dagster.assets.factory import job_name
        from heaters_dagster.stages import get_stage

        tags = dict(request.tags or {})
        if request.partition_key:
            tags["dagster/partition"] = request.partition_key
        launch_id = uuid.uuid4().hex
        tags["heaters/launch"] = launch_id
        parts = [request.partition_key] if request.partition_key else [
            tags.get("dagster/asset_partition_range_start", "?"), tags.get("dagster/asset_partition_range_end", "?")]
        env = {**os.environ, "DAGSTER_HOME": str(self.dagster_home), "PYTHONPATH": str(REPO)}
        log = self.dagster_home / f"run-{stage}-{launch_id[:8]}.log"
        with open(log, "wb") as fh:
            proc = subprocess.run([str(VENV_BIN / "dagster"), "job", "execute", "-m", "heaters_dagster.definitions",
                                   "-a", "load_definitions", "-d", str(REPO), "-j", job_name(get_stage(stage)),
                                   "--tags", json.dumps(tags)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                  stdout=fh, stderr=subprocess.STDOUT, timeout=600)
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={"heaters/launch": launch_id}))
        if not runs:
            raise ClusterError(f"{stage} run did not start (exit {proc.returncode})\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        run = runs[0]
        return LaunchedRun(stage, run.run_id, run.status == dg.DagsterRunStatus.SUCCESS, parts)

    def recover(self) -> int:
        """What the recovery sensors do: a failed run's items go back at once; expired leases too."""
        from heaters_dagster.sensors.recovery import evaluate_lease_recovery, release_run_items

        database = self.defs.resources["database"]
        n = 0
        for run in self.runs:
            if not run.success and run.run_id not in self._released:
                dagster_run = self.instance.get_run_by_id(run.run_id)
                n += len(release_run_items(database, dagster_run, f"run {run.run_id} failed", _NullLog()))
                self._released.add(run.run_id)
        with self._sensor_context("lease_recovery_sensor") as ctx:
            evaluate_lease_recovery(ctx, database)
        return n

    _released: set[str] = field(default_factory=set)

    def run_until_idle(self, max_rounds: int = 40, *, stop_at: set[str] | None = None,
                       settle_s: float = 0.0) -> list[LaunchedRun]:
        from heaters_dagster.stages import STAGES

        idle_rounds = 0
        for rnd in range(max_rounds):
            if self.on_round:
                self.on_round(rnd)
            self.tick("review_events_sensor")
            requests = [(s.name, r) for s in STAGES if not (stop_at and s.name in stop_at)
                        for r in self.tick(f"{s.name}_sensor")]
            if requests:
                idle_rounds = 0
                with ThreadPoolExecutor(max_workers=self.max_parallel_runs) as pool:
                    self.runs += list(pool.map(lambda sr: self.launch(*sr), requests))
            if self.recover():
                continue
            if not requests:
                idle_rounds += 1
                if idle_rounds > (1 if settle_s else 0):
                    break
                time.sleep(settle_s)
        return self.runs


class _NullLog:
    def warning(self, _msg: str) -> None:
        pass


def in_progress_owners(database_url: str, states: tuple[str, ...]) -> list[tuple[int, str]]:
    """(clip id, claim owner) of clips now in one of ``states`` with a claim."""
    from sqlalchemy import bindparam, text

    from heaters_dagster.database.engine import get_engine

    with get_engine(database_url).connect() as conn:
        return [(int(r[0]), r[1]) for r in conn.execute(
            text("SELECT id, claim_owner FROM clips WHERE state IN :s AND claim_owner IS NOT NULL ORDER BY id")
            .bindparams(bindparam("s", expanding=True)), {"s": list(states)})]


def kill_when_claimed(database_url: str, states: tuple[str, ...], pids: Callable[[], set[int]], *,
                      timeout: float = 180.0) -> threading.Thread:
    """A thread that waits until a clip is claimed in one of ``states`` by one of ``pids()`` (the
    pid in its claim owner) and SIGKILLs that process mid-task. ``thread.killed`` then holds
    ``(clip id, owner)`` or None."""
    from heaters_dagster.leases import owner_pid

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not thread.stop.is_set():
            for clip_id, owner in in_progress_owners(database_url, states):
                pid = owner_pid(owner)
                if pid and pid in pids():  # the claim lives only while the step works on the item
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    thread.killed = (clip_id, owner)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, name="kill-mid-task", daemon=True)
    thread.killed = None  # type: ignore[attr-defined]
    thread.stop = threading.Event()  # type: ignore[attr-defined]
    thread.start()
    return thread
