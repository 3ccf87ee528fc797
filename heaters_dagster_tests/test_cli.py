"""The `heaters` command line against the test database: submit, requeue."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from heaters_dagster.cli.main import cli
from heaters_dagster.state_machine import transition
from heaters_dagster_tests.factories import make_clips, make_video, row_of


@pytest.fixture()
def env(db, store_dir, monkeypatch):
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store_dir))
    return db


def test_submit_file_copies_it_into_the_store(env, store_dir, tmp_path):
    f = tmp_path / "My Holiday (final).mp4"
    f.write_bytes(b"not checked until ingest")
    out = CliRunner().invoke(cli, ["submit", str(f), "--title", "Holiday"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == "video 1: new"
    row = row_of(env, "video", 1)
    assert (row.title, row.source_kind, row.original_key) == ("Holiday", "file", "sources/1/original.mp4")
    assert (store_dir / "sources/1/original.mp4").read_bytes() == b"not checked until ingest"


@pytest.mark.parametrize("uri,needle", [
    ("ftp://host/v.mp4", "http"), ("/no/such/file.mp4", "not found"), ("/dev/zero", "character device"),
    ("http://10.0.0.1/v.mp4", "private address"), ("http://169.254.169.254/latest/", "cloud metadata"),
    ("http://[::1]:8000/v.mp4", "loopback"),
])
def test_submit_bad_source_records_failure_and_exits_non_zero(env, store_dir, uri, needle, monkeypatch):
    monkeypatch.delenv("HEATERS_ALLOW_PRIVATE_URLS", raising=False)
    out = CliRunner().invoke(cli, ["submit", uri])
    assert out.exit_code == 1
    assert needle in out.output.lower()
    row = row_of(env, "video", 1)
    assert row.state == "ingestion_failed" and needle in row.last_error.lower()
    assert not (store_dir / "sources").exists()  # nothing copied, no empty folder


def test_submit_fifo_is_refused_without_blocking(env, tmp_path):
    import os

    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    out = CliRunner().invoke(cli, ["submit", str(fifo)])
    assert out.exit_code == 1 and "named pipe (fifo)" in out.output.lower()
    assert row_of(env, "video", 1).state == "ingestion_failed"


def test_requeue_moves_failed_items_back_with_a_new_version(env):
    vid = make_video(env)
    a, b = make_clips(env, vid, [(0, 24), (24, 48)])
    with env.session() as s:
        transition(s, "clip", a, "spliced", "generating_sprite")
        transition(s, "clip", a, "generating_sprite", "sprite_failed", error="boom")
    out = CliRunner().invoke(cli, ["requeue", "sprite", str(a), str(b)])
    assert out.exit_code == 1  # b was not failed
    assert f"clip {a}: sprite_failed -> spliced" in out.output
    row = row_of(env, "clip", a)
    assert (row.state, row.version, row.last_error) == ("spliced", 1, None)
    assert row_of(env, "clip", b).version == 0
