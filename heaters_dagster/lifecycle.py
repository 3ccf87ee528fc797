"""Process lifecycle for ``heaters dev``: supervise ``dagster dev`` and everything it spawns, stop all
of it on SIGTERM/SIGINT/SIGHUP, and clean up after a previous ``heaters dev`` that was hard-killed.

How the process tree is found, so that nothing is left behind:

- ``dagster dev`` runs in its own session and process group, with ``PR_SET_PDEATHSIG`` so that it
  shuts down (gracefully, as on Ctrl+C) if ``heaters dev`` dies without cleaning up;
- ``heaters dev`` is a child subreaper (Linux), so processes orphaned inside the tree (a run worker
  that detached, a webserver whose parent died) are re-parented to it and stay its descendants;
- every process of the tree inherits ``HEATERS_DEV_SESSION=<token>``, found through
  ``/proc/PID/environ`` even for processes that left the tree;
- the descendants seen so far are recorded, with their start times, in ``$HEATERS_HOME/dev.json``,
  which the next ``heaters dev`` reads if this one was killed before it could clean up.

``$HEATERS_HOME/dev.lock`` (an flock, released by the kernel whatever way the holder dies) makes a
second ``heaters dev`` for the same home refuse to start.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

import psutil

log = logging.getLogger(__name__)

TOKEN_VAR = "HEATERS_DEV_SESSION"
STATE_FILE = "dev.json"
LOCK_FILE = "dev.lock"
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class DevAlreadyRunning(RuntimeError):
    pass


# -- small process helpers ----------------------------------------------------------------------
def _key(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, round(proc.create_time(), 2)
    except psutil.Error:
        return None


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (``is_running`` also guards against PID reuse)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_with_token(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``HEATERS_DEV_SESSION=token``."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TOKEN_VAR) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _process_from_record(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.05 or not alive(proc):
            return None
        return proc
    except psutil.Error:
        return None


def stop_processes(procs: Iterable[psutil.Process], *, first: int = signal.SIGTERM, grace_s: float = 10.0,
                   pgid: int | None = None, describe: Callable[[str], None] | None = None) -> None:
    """Send ``first`` to every process, wait up to ``grace_s``, then SIGKILL the process group
    ``pgid`` (when given) and every process still alive, and wait for them to go."""
    procs = [p for p in procs if alive(p)]
    for p in procs:
        try:
            p.send_signal(first)
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.2)
    _kill_leftovers(procs, pgid, describe)


def _kill_leftovers(procs: Iterable[psutil.Process], pgid: int | None,
                    describe: Callable[[str], None] | None) -> None:
    left = [p for p in procs if alive(p)]
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if left and describe:
        describe("killing " + ", ".join(f"{_name(p)}[{p.pid}]" for p in left))
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in left):
        time.sleep(0.1)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return "?"


# -- the single-instance lock and the state file -------------------------------------------------
def acquire_dev_lock(home: Path) -> int:
    """Hold ``home/dev.lock`` for the life of this process (the fd is not inherited by children);
    raise DevAlreadyRunning when another ``heaters dev`` holds it."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_state(home).get("pid", "?")
        os.close(fd)
        raise DevAlreadyRunning(f"heaters dev is already running for {home} (pid {other})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _read_state(home: Path) -> dict:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(home: Path, state: dict) -> None:
    tmp = home / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, home / STATE_FILE)


def leftover_processes(home: Path) -> list[psutil.Process]:
    """Processes of a previous ``heaters dev`` in ``home`` that are still alive (from dev.json)."""
    state = _read_state(home)
    found: dict[int, psutil.Process] = {}
    for pid, ctime in state.get("processes", []):
        proc = _process_from_record(int(pid), float(ctime))
        if proc is not None:
            found[proc.pid] = proc
    if state.get("token"):
        for proc in processes_with_token(state["token"]):
            found.setdefault(proc.pid, proc)
    found.pop(os.getpid(), None)
    return list(found.values())


def recover_previous_dev(home: Path, echo: Callable[[str], None] = print) -> None:
    """Stop whatever a hard-killed ``heaters dev`` left running in ``home`` (call it holding the
    dev lock, so that no live ``heaters dev`` owns them)."""
    if not (home / STATE_FILE).exists():
        return
    left = leftover_processes(home)
    if left:
        echo(f"stopping {len(left)} processes left by a previous heaters dev "
             f"(pid {_read_state(home).get('pid', '?')}): " + ", ".join(f"{_name(p)}[{p.pid}]" for p in left))
        stop_processes(left, first=signal.SIGTERM, grace_s=10.0, describe=echo)
    (home / STATE_FILE).unlink(missing_ok=True)


# -- supervising dagster dev ---------------------------------------------------------------------
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _set_subreaper() -> None:
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.debug("could not become a child subreaper")


def _child_preexec(parent_pid: int):
    libc = _libc() if sys.platform.startswith("linux") else None

    def preexec() -> None:  # runs in the forked child, before exec
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGINT)

    return preexec


class DevSupervisor:
    """Run ``cmd`` (``dagster dev``) and, when asked to stop, stop its whole tree.

    Stopping: SIGINT to ``dagster dev`` (its graceful shutdown, which also stops the webserver,
    daemon and code server), up to ``grace_s`` for the tree to exit, then SIGKILL for the process
    group and every process of the tree still alive. A second signal skips the wait.
    """

    def __init__(self, cmd: Sequence[str], *, cwd: Path, home: Path, grace_s: float = 20.0,
                 echo: Callable[[str], None] = print) -> None:
        self.cmd = list(cmd)
        self.cwd = cwd
        self.home = home
        self.grace_s = grace_s
        self.echo = echo
        self.token = uuid.uuid4().hex
        self.child: subprocess.Popen | None = None
        self.tracked: dict[tuple[int, float], psutil.Process] = {}
        self.signum: int | None = None
        self.escalate = False
        self._me = psutil.Process()

    # signals only set flags; the main loop does the work
    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self.escalate = True

    def run(self) -> int:
        """Start ``cmd``, wait for a signal or for it to exit, stop the tree; return an exit code
        (128 + signal number when stopped by a signal)."""
        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, self._on_signal)
        _set_subreaper()
        env = {**os.environ, TOKEN_VAR: self.token}
        self.child = subprocess.Popen(self.cmd, cwd=self.cwd, env=env, start_new_session=True,
                                      preexec_fn=_child_preexec(os.getpid()))
        try:
            self._record(save=True)
            last = time.monotonic()
            while self.signum is None and self.child.poll() is None:
                time.sleep(0.25)
                if time.monotonic() - last >= 2.0:
                    self._record(save=True)
                    self._reap()
                    last = time.monotonic()
        finally:
            self.shutdown()
        if self.signum is not None:
            return 128 + self.signum
        code = self.child.returncode or 0
        return 128 - code if code < 0 else code

    def _descendants(self) -> list[psutil.Process]:
        try:
            return self._me.children(recursive=True)
        except psutil.Error:
            return []

    def _record(self, *, save: bool = False, scan_env: bool = False) -> None:
        procs = self._descendants()
        if scan_env:
            procs += processes_with_token(self.token)
        changed = False
        for p in procs:
            key = _key(p)
            if key is None or key in self.tracked or p.pid == self._me.pid:
                continue
            if _name(p) in ("postgres", "pg_ctl"):  # the embedded server is stopped separately
                continue
            self.tracked[key] = p
            changed = True
        if save and changed:
            _write_state(self.home, {
                "pid": self._me.pid, "create_time": self._me.create_time(), "token": self.token,
                "child": self.child.pid if self.child else None,
                "processes": [[pid, ctime] for (pid, ctime), p in self.tracked.items() if alive(p)],
            })

    def _reap(self) -> None:
        """Collect orphans re-parented to us (we are a subreaper), leaving dagster dev to Popen."""
        for p in self._me.children():
            if self.child is not None and p.pid == self.child.pid:
                continue
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(p.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass

    def _tree_alive(self) -> list[psutil.Process]:
        return [p for p in self.tracked.values() if alive(p)]

    def shutdown(self) -> None:
        child = self.child
        if child is None:
            return
        self._record(scan_env=True)
        if child.poll() is None:
            name = signal.Signals(self.signum).name if self.signum else "shutdown"
            self.echo(f"{name}: stopping Dagster (up to {self.grace_s:.0f} s)")
            try:
                os.kill(child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        started = time.monotonic()
        deadline = started + self.grace_s
        while time.monotonic() < deadline and not self.escalate:
            child.poll()
            self._record()
            self._reap()
            if child.returncode is not None and not self._tree_alive():
                break
            time.sleep(0.2)
        self._record(scan_env=True)
        # The group id is dagster dev's pid: safe to signal while dagster dev is unreaped or a member
        # of the group lives (until then the kernel cannot hand that number to a new process).
        group_alive = child.poll() is None or any(_pgid(p) == child.pid for p in self._tree_alive())
        _kill_leftovers(self.tracked.values(), child.pid if group_alive else None, self.echo)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reap()
        (self.home / STATE_FILE).unlink(missing_ok=True)
        self.echo(f"Dagster stopped ({time.monotonic() - started:.1f} s)")


def fail_interrupted_runs(echo: Callable[[str], None] = log.info) -> list[str]:
    """Mark runs that a previous ``heaters dev`` left in progress as failed.

    When ``heaters dev`` stops (or is killed) while runs are going, their workers die with it and
    Dagster's records keep saying STARTED: the default run launcher cannot check a run worker's
    health after a restart. On the embedded database nothing else can be running them (``dev.lock``
    allows one ``heaters dev`` per home), so at start every run still in progress is reported failed;
    the ``release_failed_runs`` sensor then hands their items back at once instead of waiting for the
    leases. With a configured server (``HEATERS_DATABASE_URL``) other daemons may own those runs:
    nothing is touched, and the leases recover their items."""
    from heaters_dagster.settings import get_settings

    settings = get_settings()
    if settings.database_url or settings.dagster_database_url:
        return []
    import dagster as dg
    from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

    failed: list[str] = []
    with dg.DagsterInstance.get() as instance:
        statuses = [*IN_PROGRESS_RUN_STATUSES, dg.DagsterRunStatus.CANCELING]
        for record in instance.get_run_records(filters=dg.RunsFilter(statuses=statuses)):
            run = record.dagster_run
            instance.report_run_failed(run, "heaters dev stopped while this run was in progress; its items "
                                            "go back to their input state")
            failed.append(run.run_id)
    if failed:
        echo(f"marked {len(failed)} run(s) interrupted by the previous session as failed")
    return failed
