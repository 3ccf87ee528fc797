"""Supervised child processes: ffmpeg, ffprobe and the yt-dlp download.

Every child Heaters starts goes through :class:`Supervised`, which

* starts it in its own session / process group (``start_new_session``) and asks the kernel to
  kill it when the thread that started it dies (``PR_SET_PDEATHSIG`` via ``prctl``, Linux), so
  a SIGKILLed worker leaves no encoder running;
* watches it for **progress**: the bytes the group reads and writes (``/proc/<pid>/io`` of the
  child and its descendants, not counting what it writes to our stderr pipe, so periodic stats
  lines do not count), the bytes it sends on a captured stdout, and optionally the size of files
  the caller names. No progress for ``HEATERS_STALL_TIMEOUT_S`` seconds kills it;
* bounds its **overall** run time by ``HEATERS_TIMEOUT_BASE_S + HEATERS_TIMEOUT_PER_MEDIA_S x
  duration`` (seconds of media, when the caller knows it);
* kills the whole group on expiry or interruption: SIGTERM, then SIGKILL after a grace period.
  A stall or overall expiry raises :class:`~heaters_dagster.errors.MediaTimeoutError` naming
  the step and the limit.

Live children are kept in a process-wide registry; :func:`kill_all_children` kills every live
group (the executor calls it when a run is interrupted; it also runs at interpreter exit), and
:func:`install_signal_handlers` makes SIGTERM/SIGINT do so first, chaining any previous handler.
Nothing is installed at import time.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from heaters_dagster.errors import FFmpegError, MediaTimeoutError

STALL_ENV = "HEATERS_STALL_TIMEOUT_S"
BASE_ENV = "HEATERS_TIMEOUT_BASE_S"
PER_MEDIA_ENV = "HEATERS_TIMEOUT_PER_MEDIA_S"
KILL_GRACE_S = 5.0  # SIGTERM first (ffmpeg finishes cleanly), SIGKILL after this long
_STDERR_KEEP = 1 << 20  # bytes of stderr kept for error messages (the tail)
_PROC = Path("/proc")
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:  # resolved here, before any fork: the child only calls the function pointer
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_prctl = _load_prctl()


# -- limits -----------------------------------------------------------------------------------
def _limit(value: float) -> float | None:
    """A limit in seconds from the settings; 0 (or less) turns it off."""
    return value if value > 0 else None


def _fmt(seconds: float) -> str:
    return f"{seconds:g}" if float(seconds).is_integer() else f"{seconds:.1f}"


@dataclass(frozen=True)
class Limits:
    """The limits one command runs under (read from the environment when it starts)."""

    stall_s: float | None
    base_s: float | None
    per_media_s: float | None
    duration_s: float | None = None

    @property
    def overall_s(self) -> float | None:
        if self.base_s is None:
            return None
        return self.base_s + (self.per_media_s or 0.0) * max(0.0, self.duration_s or 0.0)

    def overall_text(self) -> str:
        assert self.base_s is not None and self.overall_s is not None
        if self.duration_s is None:
            return f"{BASE_ENV}={_fmt(self.base_s)}, media duration unknown"
        return (f"{BASE_ENV}={_fmt(self.base_s)} + {PER_MEDIA_ENV}={_fmt(self.per_media_s or 0.0)} "
                f"x {self.duration_s:.1f}s of media = {_fmt(self.overall_s)}s")

    def with_duration(self, duration_s: float | None) -> "Limits":
        return Limits(self.stall_s, self.base_s, self.per_media_s, duration_s)


def limits(duration_s: float | None = None) -> Limits:
    """The current limits from HEATERS_STALL_TIMEOUT_S / _BASE_S / _PER_MEDIA_S (read now; the
    settings raise ConfigError, a ValueError, for a value that is not a number)."""
    from heaters_dagster.settings import get_settings

    s = get_settings()
    return Limits(
        stall_s=_limit(s.stall_timeout_s),
        base_s=_limit(s.timeout_base_s),
        per_media_s=_limit(s.timeout_per_media_s),
        duration_s=duration_s if duration_s is not None and duration_s > 0 else None,
    )


# -- /proc helpers ----------------------------------------------------------------------------
def _read_io(pid: int) -> tuple[int, int] | None:
    """(rchar, wchar) of a whole process, or None when it is gone or unreadable."""
    try:
        text = (_PROC / str(pid) / "io").read_text()
    except OSError:
        return None
    vals = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(vals["rchar"]), int(vals["wchar"])
    except (KeyError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(_PROC / str(pid) / "task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(x) for x in (_PROC / str(pid) / "task" / tid / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    if not _PROC.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    found = []
    for name in os.listdir(_PROC):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                found.append(int(name))
    return found


def _proc_io_available() -> bool:
    return _read_io(os.getpid()) is not None


# -- the registry -----------------------------------------------------------------------------
_live: dict[int, "Supervised"] = {}
_live_lock = threading.RLock()  # re-entrant: kill_all_children may run in a signal handler


def live_children() -> list[tuple[int, str]]:
    """(process group id, what) of every supervised child still running."""
    with _live_lock:
        return [(s.pgid, s.what) for s in _live.values()]


def kill_all_children(grace: float | None = None) -> int:
    """Kill every live supervised process group (SIGTERM, then SIGKILL after ``grace``).

    Safe to call from any thread or a signal handler; the threads waiting on those children get
    a transient FFmpegError ("interrupted"). Returns how many groups were signalled.
    """
    with _live_lock:
        victims = list(_live.values())
    for s in victims:
        s._interrupt()
        s._signal(signal.SIGTERM)
    deadline = time.monotonic() + (KILL_GRACE_S if grace is None else grace)
    while victims and time.monotonic() < deadline:
        if not any(group_members(s.pgid) for s in victims):
            break
        time.sleep(0.05)
    for s in victims:
        s._signal(signal.SIGKILL)
    return len(victims)


def _at_exit() -> None:
    if _live:
        kill_all_children(grace=2.0)


atexit.register(_at_exit)


def install_signal_handlers(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Make ``signals`` kill every live child group first, then do what they did before.

    A previous Python handler is called afterwards; the default action is re-delivered (so
    SIGTERM still ends the process). Call from the main thread; calling again is a no-op.
    """
    for sig in signals:
        prev = signal.getsignal(sig)
        if getattr(prev, "_heaters_chained", False):
            continue

        def handler(signum: int, frame: Any, _prev: Any = prev) -> Any:
            kill_all_children()
            if callable(_prev):
                return _prev(signum, frame)
            if _prev == signal.SIG_IGN:
                return None
            signal.signal(signum, signal.SIG_DFL)  # SIG_DFL, or a handler set outside Python
            os.kill(os.getpid(), signum)
            return None

        handler._heaters_chained = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


# -- one supervised child ---------------------------------------------------------------------
def _preexec(death_signal: int, parent: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: no locks, no imports
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + death_signal)
    return setup


class Supervised:
    """A child process in its own group, under the stall and overall limits.

    Use as a context manager; leaving the block (normally or by an exception) kills whatever of
    the group is left and reaps the child. ``stdout`` is ``subprocess.DEVNULL`` or ``PIPE`` (read
    it yourself, or use :meth:`communicate`); ``stderr`` is ``PIPE`` (collected here, see
    :attr:`stderr`) or an open file. ``watch`` returns a value that changes when the child makes
    progress in a way /proc cannot see (e.g. the sizes of its output files).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        what: str,
        duration_s: float | None = None,
        timeout: float | None = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = subprocess.PIPE,
        watch: Callable[[], Hashable] | None = None,
        death_signal: int = signal.SIGKILL,
        env: dict[str, str] | None = None,
        bufsize: int = -1,
    ) -> None:
        self.what = what
        self.limits = limits(duration_s)
        self._timeout = timeout
        self._watch = watch
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._reaped = False
        self._error: BaseException | None = None
        self._stderr_chunks: list[bytes] = []
        self._stderr_kept = 0
        self._stderr_seen = 0
        self._stdout_seen = 0
        self._stderr_file = None if stderr is subprocess.PIPE else stderr
        self.returncode: int | None = None
        self.proc = subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, bufsize=bufsize,
            env=env, start_new_session=True, preexec_fn=_preexec(int(death_signal), os.getpid()),
        )
        self.pid = self.pgid = self.proc.pid
        self.started = time.monotonic()
        with _live_lock:
            _live[self.pid] = self
        self._stderr_thread: threading.Thread | None = None
        if self.proc.stderr is not None:
            self._stderr_thread = threading.Thread(
                target=self._pump_stderr, name=f"stderr-{self.pid}", daemon=True)
            self._stderr_thread.start()
        self._watchdog = threading.Thread(target=self._watch_loop, name=f"watchdog-{self.pid}", daemon=True)
        self._watchdog.start()

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "Supervised":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.returncode is None:
            if not self._exited():
                self.kill()
            self._reap()

    # -- public ---------------------------------------------------------------------------
    @property
    def stderr(self) -> bytes:
        """What the child wrote on stderr (the last MiB), once it has exited."""
        return b"".join(self._stderr_chunks)

    def set_duration(self, duration_s: float | None) -> None:
        """Learned the media's duration while running (yt-dlp): rescale the overall bound."""
        if duration_s is not None and duration_s > 0:
            self.limits = self.limits.with_duration(duration_s)

    def communicate(self) -> tuple[bytes, bytes, int]:
        """Read stdout (when it is a pipe) to the end, wait, and return (stdout, stderr, rc)."""
        chunks: list[bytes] = []
        if self.proc.stdout is not None:
            fd = self.proc.stdout.fileno()
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                chunks.append(data)
                self._stdout_seen += len(data)
        rc = self.wait()
        return b"".join(chunks), self.stderr, rc

    def wait(self) -> int:
        """Wait for the child; raise MediaTimeoutError (or FFmpegError) if it was killed by us."""
        if self.returncode is None:
            while not self._exited(block=True):
                pass
            self._reap()
        if self._error is not None:
            raise self._error
        assert self.returncode is not None
        return self.returncode

    def kill(self, grace: float | None = None) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds (or at once once the child is gone)."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + (KILL_GRACE_S if grace is None else grace)
        while time.monotonic() < deadline:
            if self._exited() and not group_members(self.pgid):
                break
            time.sleep(0.05)
        self._signal(signal.SIGKILL)

    # -- internals ------------------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        with self._lock:
            if self._reaped:  # the group id may belong to someone else now
                return
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _exited(self, block: bool = False) -> bool:
        """Whether the child has exited, without reaping it (its pid keeps the group id ours)."""
        if self._reaped:
            return True
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        try:
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True

    def _reap(self) -> None:
        with self._lock:
            if not self._reaped:
                try:  # the child is a zombie: whatever is left of its group goes too
                    os.killpg(self.pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self._reaped = True
                self.returncode = self.proc.wait()
        self._done.set()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        with _live_lock:
            _live.pop(self.pid, None)

    def _interrupt(self) -> None:
        if self._error is None:
            self._error = FFmpegError(f"{self.what}: interrupted, killed", permanent=False)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                return
            if not data:
                return
            self._stderr_seen += len(data)
            self._stderr_chunks.append(data)
            self._stderr_kept += len(data)
            while self._stderr_kept > _STDERR_KEEP and len(self._stderr_chunks) > 1:
                self._stderr_kept -= len(self._stderr_chunks.pop(0))

    def _stderr_written(self) -> int:
        if self._stderr_file is None:
            return self._stderr_seen
        try:
            fileno = self._stderr_file if isinstance(self._stderr_file, int) else self._stderr_file.fileno()
            return os.fstat(fileno).st_size
        except (OSError, AttributeError, ValueError):
            return 0

    def _progress_mark(self, use_proc: bool) -> Hashable:
        """A value that changes whenever the child shows signs of work."""
        parts: list[Hashable] = [self._stdout_seen]
        if use_proc:
            seen, todo = set(), [self.pid]
            while todo and len(seen) < 256:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                io = _read_io(pid)
                if io is not None:
                    rchar, wchar = io
                    if pid == self.pid:  # stats/log lines on stderr are not progress
                        wchar -= self._stderr_written()
                    parts.append((pid, rchar, wchar))
                todo += _children(pid)
        if self._watch is not None:
            try:
                parts.append(self._watch())
            except OSError:
                pass
        return tuple(parts)

    def _expire(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.kill()

    def _watch_loop(self) -> None:
        use_proc = _proc_io_available()
        # Without /proc we only see stdout and watched files: no stall limit if neither is there.
        can_see = use_proc or self._watch is not None or self.proc.stdout is not None
        mark = None
        last_progress = self.started
        while True:
            lim = self.limits
            stall = lim.stall_s if can_see else None
            period = min(0.5, stall / 4) if stall else 0.5
            if self._done.wait(period) or self._error is not None:
                return
            now = time.monotonic()
            new_mark = self._progress_mark(use_proc)
            if new_mark != mark:
                mark, last_progress = new_mark, now
            overall = lim.overall_s
            if stall is not None and now - last_progress >= stall:
                self._expire(MediaTimeoutError(
                    f"{self.what}: no progress for {_fmt(stall)}s "
                    f"(stall limit {STALL_ENV}={_fmt(stall)}), killed",
                    what=self.what, kind="stall", limit_s=stall))
                return
            if overall is not None and now - self.started >= overall:
                self._expire(MediaTimeoutError(
                    f"{self.what}: still running after {_fmt(round(now - self.started, 1))}s "
                    f"(overall limit {lim.overall_text()}), killed",
                    what=self.what, kind="overall", limit_s=overall))
                return
            if self._timeout is not None and now - self.started >= self._timeout:
                self._expire(FFmpegError(f"{self.what}: timed out after {self._timeout:.0f}s",
                                         permanent=False))
                return
