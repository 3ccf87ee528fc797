"""Supervised media subprocesses: stall and overall limits, process groups, dying with the parent.

Everything here runs real processes: ffmpeg on a loopback HTTP server whose HLS playlist or MP4
body stops mid-way, yt-dlp in its child process, and small Python parents that get SIGKILLed.
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from heaters_dagster.errors import FFmpegError, MediaTimeoutError, classify
from heaters_dagster.media import subprocess_guard as guard
from heaters_dagster.media.fetch import download_url
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run
from heaters_dagster.media.synthetic import make_video

REPO = Path(__file__).resolve().parents[2]


# -- helpers ------------------------------------------------------------------------------------
def _group(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process, zombies included, whose process group is ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if int(fields[2]) == pgid:
            found.append((int(name), fields[0]))
    return found


def _gone(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rfind(")") + 2:].split()[0] in ("Z", "X")  # a zombie waiting for init


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class _GroupSpy:
    """Records the process groups the guard starts while the test body runs (in another thread)."""

    def __init__(self) -> None:
        self.groups: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pgid, what in guard.live_children():
                self.groups.setdefault(pgid, what)
            time.sleep(0.02)

    def __enter__(self) -> "_GroupSpy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture()
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 s stall limit and a short SIGTERM grace, so the tests are quick."""
    monkeypatch.setenv(guard.STALL_ENV, "3")
    monkeypatch.setattr(guard, "KILL_GRACE_S", 1.0)
    monkeypatch.setenv("HEATERS_ALLOW_PRIVATE_URLS", "1")  # the URL guard lets the loopback server through


# -- a loopback server whose media stops half-way ----------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("www")
    run([ffmpeg_bin(), "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=size=160x120:rate=24", "-t", "4", "-c:v", "libx264", "-preset", "ultrafast",
         "-g", "24", "-f", "hls", "-hls_time", "2",
         "-hls_list_size", "0", "-hls_segment_filename", str(root / "seg%d.ts"), str(root / "index.m3u8")],
        what="make HLS test stream")
    assert "seg1.ts" in (root / "index.m3u8").read_text()
    body = make_video(root / "video.mp4", (1.0, 1.0)).path.read_bytes()
    release = threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.endswith("/seg1.ts"):  # the second segment never arrives
                release.wait()
                return
            if self.path.startswith("/stall.mp4"):  # half the body, then nothing
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                release.wait()
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    release.set()
    srv.shutdown()
    srv.server_close()


# -- stall ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stalled_hls_input_is_killed_at_the_stall_limit(quick: None, server: str, tmp_path: Path) -> None:
    # The command normalise runs, on an HLS playlist whose second segment request hangs.
    url = f"{server}/index.m3u8"
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-xerror", "-i", url,
            "-map", "0:V:0", "-c:v", "libx264", "-preset", "ultrafast", "-fps_mode", "cfr", "-r", "24/1",
            "-f", "mp4", str(tmp_path / "out.mp4")]
    with _GroupSpy() as spy, pytest.raises(MediaTimeoutError) as err:
        run(args, what="normalise index.m3u8", duration_s=4.0)
    assert str(err.value) == (
        "normalise index.m3u8: no progress for 3s (stall limit HEATERS_STALL_TIMEOUT_S=3), killed")
    assert err.value.kind == "stall" and err.value.limit_s == 3
    assert classify(err.value) == "permanent"
    assert list(spy.groups.values()) == ["normalise index.m3u8"]
    (pgid,) = spy.groups
    assert _group(pgid) == []  # killed and reaped: nothing of that group is left
    assert guard.live_children() == []


@pytest.mark.timeout(60)
def test_stall_of_a_streaming_decode_is_seen_on_its_stdout_pipe(quick: None, server: str) -> None:
    # Like scene detection: raw frames on stdout, read by us; the input stalls after segment 1.
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-i", f"{server}/index.m3u8",
            "-map", "0:v:0", "-vf", "scale=32:24", "-pix_fmt", "gray", "-f", "rawvideo", "pipe:1"]
    got = 0
    with pytest.raises(MediaTimeoutError, match="no progress for 3s"):
        with guard.Supervised(args, what="scene decode", stdout=subprocess.PIPE, bufsize=0) as child:
            assert child.proc.stdout is not None
            while chunk := child.proc.stdout.read(4096):
                got += len(chunk)
            child.wait()
    assert got >= 32 * 24 * 24  # the first segment's frames did arrive


# -- overall ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_progressing_command_is_killed_at_the_overall_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(guard.STALL_ENV, "20")
    monkeypatch.setenv(guard.BASE_ENV, "1")
    monkeypatch.setenv(guard.PER_MEDIA_ENV, "1")
    monkeypatch.setattr(guard, "KILL_GRACE_S", 1.0)
    out = tmp_path / "frames.yuv"
    # Real time, writing every frame: always making progress, but 60 s long.
    args = [ffmpeg_bin(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-re", "-f", "lavfi",
            "-i", "testsrc=size=160x120:rate=25", "-t", "60", "-f", "rawvideo", str(out)]
    with pytest.raises(MediaTimeoutError) as err:
        run(args, what="encode test pattern", duration_s=2.0)
    message = str(err.value)
    assert message.startswith("encode test pattern: still running after ")
    assert ("(overall limit HEATERS_TIMEOUT_BASE_S=1 + HEATERS_TIMEOUT_PER_MEDIA_S=1 x 2.0s of media = 3s), "
            "killed") in message
    assert err.value.kind == "overall" and err.value.limit_s == 3
    assert out.stat().st_size > 0  # it was making progress


def test_limits_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (guard.STALL_ENV, guard.BASE_ENV, guard.PER_MEDIA_ENV):
        monkeypatch.delenv(name, raising=False)
    lim = guard.limits(60.0)
    assert (lim.stall_s, lim.base_s, lim.per_media_s, lim.overall_s) == (120, 300, 10, 900)
    assert guard.limits().overall_s == 300  # duration unknown: the base alone
    monkeypatch.setenv(guard.STALL_ENV, "0")  # 0 turns a limit off
    monkeypatch.setenv(guard.PER_MEDIA_ENV, "2.5")
    lim = guard.limits(10.0)
    assert lim.stall_s is None and lim.overall_s == 325
    monkeypatch.setenv(guard.BASE_ENV, "soon")
    with pytest.raises(ValueError, match="HEATERS_TIMEOUT_BASE_S must be a number of seconds"):
        guard.limits()


# -- interruption and parent death ------------------------------------------------------------------
_PARENT = textwrap.dedent("""
    import sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from heaters_dagster.media import subprocess_guard as guard
    from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin, run

    where, handlers = sys.argv[1], sys.argv[2] == "handlers"
    if handlers:
        guard.install_signal_handlers()

    def report():
        while not guard.live_children():
            time.sleep(0.02)
        print(guard.live_children()[0][0], flush=True)

    threading.Thread(target=report, daemon=True).start()
    args = [ffmpeg_bin(), "-nostdin", "-v", "error", "-re", "-f", "lavfi",
            "-i", "testsrc=size=160x120:rate=25", "-t", "60", "-f", "rawvideo", "-y", "/dev/null"]
    if where == "thread":
        with ThreadPoolExecutor(1) as pool:
            pool.submit(run, args, what="long encode", capture_stdout=False).result()
    else:
        run(args, what="long encode", capture_stdout=False)
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "sig,where,handlers",
    [
        (signal.SIGKILL, "main", "default"),
        (signal.SIGKILL, "thread", "default"),
        (signal.SIGTERM, "main", "default"),
        (signal.SIGTERM, "thread", "handlers"),
    ],
)
def test_killing_the_python_parent_leaves_no_ffmpeg(sig: int, where: str, handlers: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, where, handlers], cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent did not report its ffmpeg (exit {parent.poll()})"
        ffmpeg_pid = int(line)
        assert not _gone(ffmpeg_pid)
        assert Path(f"/proc/{ffmpeg_pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"ffmpeg")
        time.sleep(0.3)
        parent.send_signal(sig)
        assert parent.wait(timeout=20) == -sig
        assert _wait_for(lambda: _gone(ffmpeg_pid), 10), "ffmpeg outlived its parent"
        assert _wait_for(lambda: all(state == "Z" for _, state in _group(ffmpeg_pid)), 5)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.timeout(60)
def test_kill_all_children_stops_ffmpeg_in_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "KILL_GRACE_S", 2.0)
    args = [ffmpeg_bin(), "-nostdin", "-v", "error", "-re", "-f", "lavfi",
            "-i", "testsrc=size=160x120:rate=25", "-t", "60", "-f", "rawvideo", "-y", "/dev/null"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, args, what=f"encode {i}", capture_stdout=False) for i in range(2)]
        assert _wait_for(lambda: len(guard.live_children()) == 2, 20)
        pgids = [pgid for pgid, _ in guard.live_children()]
        assert guard.kill_all_children() == 2
        for i, fut in enumerate(futures):
            with pytest.raises(FFmpegError, match=f"encode {i}: interrupted, killed") as err:
                fut.result(timeout=20)
            assert classify(err.value) == "transient"
    assert all(_group(pgid) == [] for pgid in pgids)
    assert guard.live_children() == []


# -- yt-dlp ----------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["/stall.mp4", "/index.m3u8"])
def test_stalled_download_is_killed_and_cleaned_up(
    quick: None, server: str, tmp_path: Path, path: str
) -> None:
    dest = tmp_path / "dl"
    url = server + path
    with _GroupSpy() as spy, pytest.raises(MediaTimeoutError) as err:
        download_url(url, dest, basename="original")
    assert str(err.value) == (
        f"download {url}: no progress for 3s (stall limit HEATERS_STALL_TIMEOUT_S=3), killed")
    assert classify(err.value) == "permanent"
    assert list(dest.iterdir()) == []  # partial files removed
    assert list(spy.groups.values()) == [f"download {url}"]
    (pgid,) = spy.groups
    assert _group(pgid) == []  # the yt-dlp child and anything it started are gone
