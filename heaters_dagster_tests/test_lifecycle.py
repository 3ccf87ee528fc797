"""Lifecycle of the long-running commands under real signals: ``heaters dev`` stops its whole tree
(dagster dev, webserver, daemon, code server) and the embedded Postgres on SIGTERM, a later start
recovers from a hard kill, and ``heaters review`` stops uvicorn and Postgres on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from heaters_dagster.database.embedded import postgres_processes
from heaters_dagster.lifecycle import TOKEN_VAR
from heaters_dagster_tests.dev_harness import (
    HEATERS,
    REPO,
    _NOT_INHERITED,
    dev_tree,
    free_port,
    kill_everything,
    port_open,
    running_dev,
    start_dev,
)

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 30.0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(procs) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:150]}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "\n".join(out)


def _wait_gone(procs, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def _names(tree) -> set[str]:
    names = set()
    for p in tree:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for marker, name in (("heaters dev", "heaters"), ("dagster dev", "dagster dev"),
                             ("dagster_webserver", "webserver"), ("dagster._daemon", "daemon"),
                             ("code-server", "code server")):
            if marker in cmd:
                names.add(name)
    return names


def _holders(home: Path) -> list[int]:
    path = home / "pgdata" / ".handle_pids.json"
    return json.loads(path.read_text()) if path.exists() else []


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env["HEATERS_HOME"] = str(home)
    return env


def test_dev_sigterm_stops_the_whole_tree_and_postgres(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    detached = None
    try:
        with running_dev(home, {}, port) as dev:
            tree = dev_tree(dev.proc)
            pg = postgres_processes(home / "pgdata")
            expected = {"heaters", "dagster dev", "webserver", "daemon", "code server"}
            assert expected <= _names(tree), _describe(tree)
            assert pg, "no embedded postgres running for the home"
            # Stand-in for a run worker that detached (own session, re-parented, not a descendant any
            # more): it still carries the session token in its environment.
            token = json.loads((home / "dev.json").read_text())["token"]
            detached = subprocess.Popen(["sleep", "300"], env={**os.environ, TOKEN_VAR: token},
                                        start_new_session=True)
            tree.append(psutil.Process(detached.pid))
            t0 = time.monotonic()
            dev.proc.send_signal(signal.SIGTERM)
            left = _wait_gone(tree + pg, STOP_WITHIN_S)
            took = time.monotonic() - t0
            assert not left, f"still running {took:.0f} s after SIGTERM:\n{_describe(left)}\n{dev.log_tail()}"
            assert dev.proc.wait(5) == 128 + signal.SIGTERM
            assert not postgres_processes(home / "pgdata")
            assert not port_open(port), "the webserver port is still open"
            assert not (home / "pgdata" / "postmaster.pid").exists()
            assert _holders(home) == []
            assert not (home / "dev.json").exists()
    finally:
        if detached is not None:
            detached.kill()
            detached.wait()


def test_dev_recovers_after_hard_kills(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    generations: list[psutil.Process] = []
    first = start_dev(home, {}, port)
    started = [first.proc]
    try:
        # 1. A crash of heaters dev *and* dagster dev: the webserver, daemon and code server are
        #    orphaned (port still bound), Postgres keeps running with a dead holder registered.
        first.wait_ready(300)
        tree1 = dev_tree(first.proc)
        generations += tree1
        dagster_dev = [p for p in tree1 if "dagster dev" in " ".join(p.cmdline())]
        first.proc.kill()
        for p in dagster_dev:
            p.kill()
        first.proc.wait(10)
        orphans = [p for p in tree1 if _alive(p)]
        assert {"webserver", "daemon", "code server"} <= _names(orphans), _describe(orphans)
        assert first.proc.pid in _holders(home)
        pg1 = postgres_processes(home / "pgdata")
        assert pg1, "postgres should survive the crash"

        # 2. The next start stops the orphans, attaches to Postgres and comes up on the same port.
        second = start_dev(home, {}, port)
        started.append(second.proc)
        second.wait_ready(300)
        assert not [p for p in tree1 if _alive(p)], _describe([p for p in tree1 if _alive(p)])
        assert second.graphql("query { version }")["version"]
        assert "left by a previous heaters dev" in second.log_tail(200)
        tree2 = dev_tree(second.proc)
        generations += tree2

        # 3. heaters dev alone is killed: dagster dev (PR_SET_PDEATHSIG) shuts its tree down, and
        #    Postgres stays up, orphaned, with a stale holder.
        second.proc.kill()
        second.proc.wait(10)
        left = _wait_gone(tree2, STOP_WITHIN_S)
        assert not left, f"dagster tree still up after heaters dev died:\n{_describe(left)}"
        assert postgres_processes(home / "pgdata")
        generations += postgres_processes(home / "pgdata")

        # 4. A third start comes up in spite of the stale holder and dev.json; SIGTERM then leaves nothing.
        with running_dev(home, {}, port) as third:
            tree3 = dev_tree(third.proc)
            generations += tree3 + postgres_processes(home / "pgdata")
            third.proc.send_signal(signal.SIGTERM)
            left = _wait_gone(generations, STOP_WITHIN_S)
            assert not left, f"still running after SIGTERM:\n{_describe(left)}\n{third.log_tail()}"
        assert not postgres_processes(home / "pgdata")
        assert _holders(home) == []
        assert not port_open(port)
    finally:
        for proc in started:
            kill_everything(home, proc)


def _crash_holder(home: Path) -> int:
    """A process that starts the embedded server and dies by SIGKILL (holder left registered)."""
    code = ("import os, signal\nfrom heaters_dagster.database.embedded import start_embedded\n"
            "start_embedded()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(home), cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    return proc.returncode


def _db_url(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HEATERS), "db", "url"], env=_env(home), cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_embedded_postgres_recovers_stale_holders_and_pid_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    pgdata = home / "pgdata"
    sleeper = None
    try:
        # An orphaned server with a dead holder: the next process attaches, and stops it at exit
        # (embedded_postgres alone would keep it up forever, waiting for the dead holder).
        _crash_holder(home)
        assert postgres_processes(pgdata) and len(_holders(home)) == 1
        res = _db_url(home)
        assert res.returncode == 0, res.stderr
        assert not postgres_processes(pgdata), "the server should stop with its last live holder"
        assert _holders(home) == []

        # The server itself was killed and its PID now belongs to an unrelated process: the stale
        # postmaster.pid must not be trusted (embedded_postgres checks only that the PID exists).
        _crash_holder(home)
        for p in postgres_processes(pgdata):
            p.kill()
        psutil.wait_procs(postgres_processes(pgdata), timeout=10)
        sleeper = subprocess.Popen(["sleep", "120"])
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        lines[0] = str(sleeper.pid)
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
        res = _db_url(home)
        assert res.returncode == 0, res.stderr
        assert "heaters" in res.stdout
        assert sleeper.poll() is None, "recovery must not touch the unrelated process"
        assert not postgres_processes(pgdata)
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        kill_everything(home)


def test_review_sigterm_stops_uvicorn_and_postgres(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    log = home / "review.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(HEATERS), "review", "--port", str(port)], env=_env(home), cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not port_open(port):
            assert proc.poll() is None, f"heaters review exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"heaters review not listening:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        pg = postgres_processes(home / "pgdata")
        assert pg
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_WITHIN_S) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        left = _wait_gone(pg, 10)
        assert not left, f"postgres still running after heaters review exited:\n{_describe(left)}"
        assert not port_open(port)
        assert _holders(home) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_everything(home)
