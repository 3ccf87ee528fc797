"""The bad-input corpus: every kind of input a person (or an attacker) might submit, generated
here with ffmpeg lavfi and Python, submitted through ``submit_source`` (and a few through the
``heaters submit`` command) and driven through the real pipeline in process beside two valid
videos.

Each input ends in a definite state with a message a person can act on: refused ones in
``ingestion_failed`` / ``splicing_failed``, and the unusual-but-fine ones (VFR, rotated, odd size,
non-H.264, lying container duration, audio longer than video, hostile titles) cut into clips in
``pending_review`` like the valid videos. No test here sends traffic anywhere: every URL is
refused at resolution, before any connection.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from heaters_dagster.errors import InvalidSourceError
from heaters_dagster.media.ffmpeg_tools import ffmpeg_bin
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.storage import ArtifactStore, copy_limited
from heaters_dagster_tests.factories import row_of
from heaters_dagster_tests.pipeline_helpers import clips_of, drive, stored_clip_files, submit

W, H = 160, 90  # every generated video is tiny: the corpus has to run on 2 cores
MAX_PIXELS = 100_000  # lowered HEATERS_MAX_PIXELS: 321x241 passes, 640x360 does not
MAX_DURATION_S = 15.0  # lowered HEATERS_MAX_DURATION_S: the 16 s video is too long


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_bin(), "-hide_banner", "-v", "error", "-y", *args], check=True)


def lavfi_video(out: Path, seconds: float, *, size: str = f"{W}x{H}", rate: int = 24, codec: tuple[str, ...] = (),
                audio_s: float | None = None, extra: tuple[str, ...] = ()) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio_s is not None:
        args += ["-f", "lavfi", "-i", f"sine=frequency=330:duration={audio_s}", "-c:a", "aac", "-b:a", "64k"]
    ffmpeg(*args, *(codec or ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")), *extra, str(out))
    return out


def _full_boxes(data: bytearray, tag: bytes):
    i = data.find(tag)
    while i >= 0:
        yield i + 4  # where the box's version/flags start
        i = data.find(tag, i + 4)


def lie_about_duration(src: Path, dst: Path, seconds: float) -> Path:
    """Rewrite the movie header (mvhd) to claim ``seconds``; the frames stay as they are."""
    data = bytearray(src.read_bytes())
    for body in _full_boxes(data, b"mvhd"):
        assert data[body] == 0  # version 0: 32-bit timescale at +12, duration at +16
        timescale = struct.unpack_from(">I", data, body + 12)[0]
        struct.pack_into(">I", data, body + 16, int(seconds * timescale))
    dst.write_bytes(bytes(data))
    return dst


def rotate_90(src: Path, dst: Path) -> Path:
    """Set a 90 degree display matrix on the video track (what phones write for portrait video)."""
    data = bytearray(src.read_bytes())
    for body in _full_boxes(data, b"tkhd"):
        assert data[body] == 0
        matrix = body + 4 + 4 * 5 + 8 + 8  # version/flags, 5 x 32-bit fields, reserved, layer..volume
        if struct.unpack_from(">I", data, matrix + 36)[0]:  # a track with a width: the video track
            struct.pack_into(">9i", data, matrix, 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    dst.write_bytes(bytes(data))
    return dst


@dataclass(frozen=True)
class Case:
    uri: str
    state: str  # the final state of the video
    words: tuple[str, ...] = ()  # what its message must say (lower case)
    title: str | None = None
    via_cli: bool = False
    env: tuple[tuple[str, str], ...] = ()  # set while submitting only


HOSTILE_TITLE = ("'); DROP TABLE source_videos; -- <script>alert(1)</script> \x00\x07\x1b[31m\u202e"
                 + "very long " * 1000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("bad_inputs")
    good = make_video(d / "good.mp4", (1.5, 1.5), width=W, height=H, preset="ultrafast").path
    cases: dict[str, Case] = {}

    def fail(name: str, uri: str | Path, *words: str, state: str = "ingestion_failed", **kw) -> None:
        cases[name] = Case(str(uri), state, tuple(w.lower() for w in words), **kw)

    def ok(name: str, uri: str | Path, **kw) -> None:
        cases[name] = Case(str(uri), "spliced", **kw)

    # -- not videos at all
    (d / "zero.mp4").write_bytes(b"")
    fail("zero-byte", d / "zero.mp4", "empty (0 bytes)")
    (d / "notes.mp4").write_text("this is not a video\n" * 50)
    fail("text-named-mp4", d / "notes.mp4", "not a video file")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(d / "picture.png"))
    fail("png", d / "picture.png", "still image", "png")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(d / "photo.jpg"))
    fail("jpeg", d / "photo.jpg", "still image")
    (d / "picture-named.mp4").write_bytes((d / "picture.png").read_bytes())
    fail("png-named-mp4", d / "picture-named.mp4", "still image")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=2", "-c:a", "aac", str(d / "audio.m4a"))
    fail("audio-only", d / "audio.m4a", "no video stream (audio only)")
    # -- broken videos
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    fail("truncated", d / "truncated.mp4", "truncated", "again")
    ffmpeg("-i", str(good), "-c", "copy", str(d / "good.mkv"))
    mkv = (d / "good.mkv").read_bytes()
    (d / "truncated.mkv").write_bytes(mkv[: len(mkv) // 2])
    fail("truncated-mkv", d / "truncated.mkv", "truncated or corrupt", "ended prematurely")
    corrupt = bytearray(data)
    rng = random.Random(7)
    for frac in (0.4, 0.7):
        at = int(len(corrupt) * frac)
        corrupt[at:at + len(corrupt) // 10] = rng.randbytes(len(corrupt) // 10)
    (d / "corrupt.mp4").write_bytes(bytes(corrupt))
    fail("corrupt-middle", d / "corrupt.mp4", "truncated or corrupt", "again")
    # -- over a limit (HEATERS_MAX_PIXELS / HEATERS_MAX_DURATION_S lowered by the test)
    lavfi_video(d / "huge.mp4", 1, size="640x360")
    fail("huge-resolution", d / "huge.mp4", "640x360", "heaters_max_pixels", "100,000")
    lavfi_video(d / "long.mp4", 16, size="64x36", rate=5)
    fail("too-long", d / "long.mp4", "too long", "16 s", "heaters_max_duration_s")
    (d / "big.mp4").write_bytes(os.urandom(300_000))
    fail("too-many-bytes", d / "big.mp4", "too large", "heaters_max_source_bytes",
         env=(("HEATERS_MAX_SOURCE_BYTES", "200000"),))
    # -- too short for any clip
    lavfi_video(d / "one-frame.mp4", 1, extra=("-frames:v", "1"))
    fail("single-frame", d / "one-frame.mp4", "no clip", "1 frame", "min_scene_s=1", state="splicing_failed")
    # -- unusual but fine: these must be accepted and cut into clips
    lavfi_video(d / "vfr.mp4", 3, rate=30, extra=("-vf", "select='lt(n,30)+not(mod(n,3))'", "-fps_mode", "vfr"))
    ok("vfr", d / "vfr.mp4")
    rotate_90(lavfi_video(d / "upright.mp4", 2, size="160x96", audio_s=2), d / "rotated.mp4")
    ok("rotated", d / "rotated.mp4")
    lavfi_video(d / "odd.mp4", 2, size="321x241")
    ok("odd-size", d / "odd.mp4")
    lavfi_video(d / "vp9.webm", 2, codec=("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                                          "-b:v", "200k"))
    ok("vp9-webm", d / "vp9.webm")
    lavfi_video(d / "mpeg4.avi", 2, codec=("-c:v", "mpeg4", "-q:v", "5"))
    ok("mpeg4-part2-avi", d / "mpeg4.avi")
    lavfi_video(d / "mjpeg.mov", 2, codec=("-c:v", "mjpeg", "-q:v", "5", "-pix_fmt", "yuvj420p"))
    ok("mjpeg-mov", d / "mjpeg.mov")
    lavfi_video(d / "hevc.mp4", 2, codec=("-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error"))
    ok("hevc", d / "hevc.mp4")
    lavfi_video(d / "long-audio.mp4", 2, audio_s=4)
    ok("audio-longer-than-video", d / "long-audio.mp4")
    lie_about_duration(lavfi_video(d / "honest.mp4", 2, audio_s=2), d / "lying.mp4", 12.0)
    ok("lying-container-duration", d / "lying.mp4")
    ok("hostile-long-title", good, title=HOSTILE_TITLE)
    odd_name = d / "x'; DROP TABLE clips; -- <b>\u202e\nname.mp4"
    odd_name.write_bytes(data)
    ok("hostile-file-name", odd_name)
    # -- not regular files
    os.mkfifo(d / "pipe.mp4")
    fail("fifo", d / "pipe.mp4", "named pipe (fifo)", "regular file")
    fail("fifo-cli", d / "pipe.mp4", "named pipe (fifo)", via_cli=True)
    fail("dev-zero", "/dev/zero", "character device", "regular file")
    (d / "zero-link.mp4").symlink_to("/dev/zero")
    fail("symlink-to-dev-zero", d / "zero-link.mp4", "character device")
    (d / "folder.mp4").mkdir()
    fail("directory", d / "folder.mp4", "directory")
    fail("missing", d / "nope.mp4", "not found")
    # -- URLs that must never be fetched (all refused at resolution: nothing is contacted)
    fail("ftp", "ftp://example.com/v.mp4", "only http and https")
    fail("file-url", "file:///etc/passwd", "only http and https")
    fail("loopback-url", "http://127.0.0.1:8000/v.mp4", "loopback", "heaters_allow_private_urls")
    fail("loopback-short-form", "http://127.1/v.mp4", "loopback")
    fail("private-url", "http://10.0.0.1/v.mp4", "private", "only public internet addresses")
    fail("private-url-cli", "https://192.168.1.20/v.mp4", "private", via_cli=True)
    fail("link-local-metadata", "http://169.254.169.254/latest/meta-data/", "link-local", "metadata")
    fail("metadata-cli", "http://169.254.169.254/latest/meta-data/", "metadata", via_cli=True)
    fail("cgnat-url", "http://100.64.0.7/v.mp4", "carrier-grade nat")
    fail("ipv6-loopback", "http://[::1]:8080/v.mp4", "loopback")
    fail("ipv4-mapped-ipv6", "http://[::ffff:169.254.169.254]/", "metadata")
    fail("ipv6-unique-local", "http://[fd00::5]/v.mp4", "private")
    return cases


def test_every_bad_input_ends_in_a_clear_state_and_the_good_videos_go_on(
        corpus, defs, db, store, store_dir, instance, tmp_path, monkeypatch):
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("HEATERS_MAX_PIXELS", str(MAX_PIXELS))
    monkeypatch.setenv("HEATERS_MAX_DURATION_S", str(MAX_DURATION_S))
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store_dir))
    assert len(corpus) >= 20

    valid = [make_video(tmp_path / "valid1.mp4", (1.5, 1.5), width=W, height=H, preset="ultrafast"),
             make_video(tmp_path / "valid2.mp4", (2.0,), width=W, height=H, preset="ultrafast")]
    ids: dict[str, int] = {}
    for name, case in corpus.items():
        with monkeypatch.context() as m:
            for key, value in case.env:
                m.setenv(key, value)
            if case.via_cli:
                out = CliRunner().invoke(cli_main(), ["submit", case.uri])
                assert out.exit_code == 1, (name, out.output)
                assert all(w in out.output.lower() for w in case.words), (name, out.output)
                ids[name] = int(out.output.split()[1].rstrip(":"))
            else:
                sub = submit(db, store, case.uri, case.title)
                ids[name] = sub.video_id
    refused_at_submit = {n for n, i in ids.items() if row_of(db, "video", i).state == "ingestion_failed"}
    # nothing of a refused file is left in the store: no copy, no temp file, no empty folder
    for name in refused_at_submit:
        assert not (store_dir / "sources" / str(ids[name])).exists(), name
    good_ids = [submit(db, store, v.path).video_id for v in valid]

    runs = drive(defs, instance, max_rounds=40)
    assert any(r.stage == "sprite" and r.success for r in runs)

    problems = []
    for name, case in corpus.items():
        row = row_of(db, "video", ids[name])
        clips = clips_of(db, row.id)
        if row.state != case.state:
            problems.append(f"{name}: {row.state} (wanted {case.state}): {row.last_error}")
            continue
        if case.state == "spliced":
            if row.last_error or not clips or not all(c.state == "pending_review" for c in clips):
                problems.append(f"{name}: clips {[c.state for c in clips]}, error {row.last_error}")
            continue
        message = (row.last_error or "").lower()
        missing = [w for w in case.words if w not in message]
        if missing or clips:
            problems.append(f"{name}: message {row.last_error!r} lacks {missing}; {len(clips)} clips")
    assert not problems, "\n".join(problems)

    for vid in good_ids:
        row = row_of(db, "video", vid)
        assert row.state == "spliced" and row.last_error is None
        clips = clips_of(db, vid)
        assert clips and all(c.state == "pending_review" for c in clips)
    assert len(clips_of(db, good_ids[0])) == 2

    # what was accepted is described by what was decoded, not by the headers
    rotated = row_of(db, "video", ids["rotated"])
    assert (rotated.width, rotated.height) == (96, 160)
    odd = row_of(db, "video", ids["odd-size"])
    assert (odd.width, odd.height) == (320, 240)  # even size for 4:2:0 H.264
    lying = row_of(db, "video", ids["lying-container-duration"])
    assert lying.duration_s == pytest.approx(2.0, abs=0.2) and lying.frame_count == 48
    long_audio = row_of(db, "video", ids["audio-longer-than-video"])
    assert long_audio.frame_count == 48
    assert sum(c.end_frame - c.start_frame for c in clips_of(db, long_audio.id)) <= 48
    # hostile titles are stored as plain text: no control characters, bounded length
    for name in ("hostile-long-title", "hostile-file-name"):
        title = row_of(db, "video", ids[name]).title
        assert title and len(title) <= 500 and not any(ord(c) < 32 or c == "\u202e" for c in title), title
        assert "DROP TABLE" in title and "<" in title
    # nothing half-written: exactly the clip files the rows name
    every = [c.file_key for vid in [*ids.values(), *good_ids] for c in clips_of(db, vid)]
    assert stored_clip_files(store) == set(every)

    # `heaters status` shows each failure with its message, e.g. the single frame
    out = CliRunner().invoke(cli_main(), ["status"])
    assert out.exit_code == 0, out.output
    assert "splicing_failed" in out.output and "no clip: the video has 1 frame" in out.output


def cli_main():
    from heaters_dagster.cli.main import cli

    return cli


# -- the store copy of a submitted file ----------------------------------------------------------
def test_put_source_file_refuses_special_and_oversized_files_and_leaves_nothing(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidSourceError, match=r"named pipe \(FIFO\)"):
        store.put_source_file(fifo, "sources/1/original.mp4", max_bytes=10**6)  # must not block
    with pytest.raises(InvalidSourceError, match="character device"):
        store.put_source_file("/dev/zero", "sources/2/original.mp4", max_bytes=10**6)
    big = tmp_path / "big.mp4"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(InvalidSourceError, match="too large: 1,001 bytes, over the limit of 1,000"):
        store.put_source_file(big, "sources/3/original.mp4", max_bytes=1000)
    # a file that grows past the limit while it is copied: /proc files say 0 bytes but are not empty
    with pytest.raises(InvalidSourceError, match="more than 10 bytes"):
        store.put_source_file("/proc/self/status", "sources/4/original.mp4", max_bytes=10)
    assert list((tmp_path / "store").rglob("*")) == []  # no temp file, no empty folder
    assert store.put_source_file(big, "sources/5/original.mp4", max_bytes=1001) == 1001
    assert store.read_bytes("sources/5/original.mp4") == big.read_bytes()
    assert [p.name for p in (tmp_path / "store" / "sources" / "5").iterdir()] == ["original.mp4"]


def test_copy_limited_stops_reading_at_the_limit(tmp_path):
    import io

    reads: list[int] = []

    class Endless(io.RawIOBase):
        def readinto(self, b):  # like /dev/zero: never ends
            reads.append(len(b))
            b[:] = b"\0" * len(b)
            return len(b)

        def readable(self):
            return True

    with pytest.raises(InvalidSourceError, match="more than 5,000,000 bytes"):
        copy_limited(io.BufferedReader(Endless()), io.BytesIO(), 5_000_000)
    assert sum(reads) < 5_000_000 + 2 * (1 << 20)
