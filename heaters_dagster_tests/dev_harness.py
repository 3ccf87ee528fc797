"""Run the real ``heaters dev`` (webserver, daemon, code server, embedded Postgres) for a test.

    from heaters_dagster_tests.dev_harness import free_port, running_dev

    with running_dev(tmp_path / "home", {"HEATERS_UNDO_WINDOW_S": "1"}, free_port()) as dev:
        data = dev.graphql("query { version }")
        ...                      # dev.proc (Popen), dev.base_url, dev.log_path, dev.log_tail()

``running_dev`` starts ``.venv/bin/heaters dev -p PORT`` with ``HEATERS_HOME=home`` (plus ``env``;
the caller's database URLs and DAGSTER_HOME are not inherited unless given in ``env``), with its
stdout and stderr in ``home/dev.log``. It returns once the webserver answers and the daemon's
SENSOR and QUEUED_RUN_COORDINATOR have sent a heartbeat since this start. On exit it sends SIGTERM and
waits; whatever is still alive afterwards (or after a failure) is killed: the process group, the
tree recorded in ``home/dev.json`` and any postgres of ``home/pgdata``, so a test never leaves
processes behind. Every timeout raises DevHarnessError with the tail of the log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import psutil

REPO = Path(__file__).resolve().parents[1]
HEATERS = REPO / ".venv" / "bin" / "heaters"
REQUIRED_DAEMONS = ("SENSOR", "QUEUED_RUN_COORDINATOR")
DAEMON_HEALTH_QUERY = """
query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy lastHeartbeatTime } } } }
"""
# The caller's own database / Dagster settings must not leak into the child.
_NOT_INHERITED = ("HEATERS_DATABASE_URL", "HEATERS_DAGSTER_DATABASE_URL", "DAGSTER_HOME",
                  "HEATERS_STORAGE_URL", "HEATERS_DEV_SESSION")


class DevHarnessError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class DevProcess:
    proc: subprocess.Popen
    base_url: str
    port: int
    home: Path
    log_path: Path
    started_at: float
    env: dict[str, str] = field(default_factory=dict)

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def fail(self, message: str) -> DevHarnessError:
        return DevHarnessError(f"{message}\n--- last lines of {self.log_path} ---\n{self.log_tail()}")

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, *,
                timeout: float = 30.0) -> dict:
        """POST to /graphql; return ``data``; raise DevHarnessError on HTTP or GraphQL errors."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(f"{self.base_url}/graphql", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise self.fail(f"GraphQL HTTP {exc.code}: {exc.read()[:2000]!r}") from exc
        if payload.get("errors"):
            raise self.fail(f"GraphQL errors: {json.dumps(payload['errors'])[:2000]}")
        return payload["data"]

    def daemon_statuses(self) -> dict[str, dict]:
        data = self.graphql(DAEMON_HEALTH_QUERY)
        return {d["daemonType"]: d for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        stage, last_err = "webserver", ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"heaters dev exited with {self.proc.returncode} before it was ready "
                                f"(waiting for the {stage})")
            try:
                if stage == "webserver":
                    with urllib.request.urlopen(f"{self.base_url}/server_info", timeout=5) as resp:
                        if resp.status == 200:
                            stage = "daemon"
                            continue
                else:
                    statuses = self.daemon_statuses()
                    # Heartbeats stay "healthy" for 30 min: only count ones sent since this start,
                    # so a daemon of a previous (killed) run is not mistaken for this one.
                    fresh = {t for t, d in statuses.items()
                             if d.get("healthy") and (d.get("lastHeartbeatTime") or 0) >= self.started_at - 1}
                    missing = [t for t in REQUIRED_DAEMONS if t not in fresh]
                    if not missing:
                        return
                    last_err = f"daemons without a fresh heartbeat: {missing}"
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError) as exc:
                last_err = repr(exc)
            except DevHarnessError as exc:
                last_err = str(exc).splitlines()[0]
            time.sleep(1.0)
        raise self.fail(f"heaters dev not ready after {timeout:.0f} s "
                        f"(waiting for the {stage}; last: {last_err})")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45.0) -> int:
        """Send ``sig`` to heaters dev and wait for it to exit; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"heaters dev did not exit within {timeout:.0f} s "
                            f"of {signal.Signals(sig).name}") from None


def dev_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """heaters dev and every live descendant (dagster dev, webserver, daemon, code server, run workers)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def kill_everything(home: Path, proc: subprocess.Popen | None = None) -> None:
    """Last-resort cleanup: kill heaters dev's group and tree, what home/dev.json names, and any
    postgres of home/pgdata."""
    from heaters_dagster.database.embedded import postgres_processes
    from heaters_dagster.lifecycle import leftover_processes

    victims: dict[int, psutil.Process] = {}
    if proc is not None:
        for p in dev_tree(proc):
            victims[p.pid] = p
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in leftover_processes(home):
        victims.setdefault(p.pid, p)
    for p in postgres_processes(home / "pgdata"):
        victims.setdefault(p.pid, p)
    victims.pop(os.getpid(), None)
    for p in victims.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def start_dev(home: Path, env: Mapping[str, str] | None, port: int, *,
              extra_args: tuple[str, ...] = ()) -> DevProcess:
    """Start heaters dev (not waiting for it); see running_dev."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    child_env.update({"HEATERS_HOME": str(home), "PYTHONUNBUFFERED": "1", "DAGSTER_DISABLE_TELEMETRY": "1"})
    child_env.update(env or {})
    log_path = home / "dev.log"
    with open(log_path, "ab") as log:
        log.write(f"\n===== heaters dev -p {port} at {time.strftime('%H:%M:%S')} =====\n".encode())
        log.flush()
        started_at = time.time()
        proc = subprocess.Popen([str(HEATERS), "dev", "-p", str(port), *extra_args], cwd=REPO, env=child_env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return DevProcess(proc=proc, base_url=f"http://127.0.0.1:{port}", port=port, home=home, log_path=log_path,
                      started_at=started_at, env=child_env)


@contextmanager
def running_dev(home: Path, env: Mapping[str, str] | None, port: int, *, ready_timeout: float = 300.0,
                stop_timeout: float = 45.0, extra_args: tuple[str, ...] = ()) -> Iterator[DevProcess]:
    """Start ``heaters dev -p port`` in ``home``, wait until the webserver and daemon are up, yield a
    DevProcess; on exit SIGTERM it and wait (then kill whatever is left, whatever happened)."""
    dev = start_dev(home, env, port, extra_args=extra_args)
    try:
        dev.wait_ready(ready_timeout)
        yield dev
        if dev.alive():
            dev.stop(signal.SIGTERM, stop_timeout)
    finally:
        kill_everything(dev.home, dev.proc)
