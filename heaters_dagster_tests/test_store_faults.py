"""A full and a read-only artifact store, for real: the store folder is a small tmpfs (2 MiB), and
for read-only it is remounted ``ro``. Writes fail with a clear, transient StoreWriteError and leave
no temp file; a stage run over such a store hands the item back (and finally to its failure state)
with the error, and completes once the store is fixed. Where mounting is not permitted the tmpfs
tests skip; the read-only case then still runs with ``os.replace`` failing with EROFS."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from heaters_dagster.assets.factory import build_stage_asset
from heaters_dagster.database.models import StageResult
from heaters_dagster.errors import TransientError, classify
from heaters_dagster.pipeline.outputs import ArtifactOut, FileToStore, ItemOutput
from heaters_dagster.stages import get_stage
from heaters_dagster.state_machine import transition
from heaters_dagster.storage import ArtifactStore, StoreWriteError
from heaters_dagster_tests.factories import make_clips, make_video, row_of

MiB = 1024 * 1024
SPRITE_BYTES = {"n": 3 * MiB}  # what the test handler writes (more than the 2 MiB store holds)


def handler(ctx, item):
    path = Path(ctx.workdir) / "sprite.jpg"
    path.write_bytes(b"\xff\xd8" + b"x" * (SPRITE_BYTES["n"] - 2))
    sprite = ArtifactOut("sprite", FileToStore(f"clips/{item.id}/sprite.jpg", path))
    return ItemOutput(item_id=item.id, artifacts=[sprite])


FAULT_STAGE = dataclasses.replace(get_stage("sprite"), name="sprite_fault",
                                  handler="heaters_dagster_tests.test_store_faults:handler",
                                  retry_delay_s=0.01, max_retries=1)


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


class Tmpfs:
    def __init__(self, path: Path):
        self.path = path

    def remount(self, opts: str) -> None:
        res = _mount("-o", f"remount,{opts}", str(self.path))
        assert res.returncode == 0, res.stderr


@pytest.fixture()
def tmpfs_store(store_dir: Path):
    """The test's store folder as a 2 MiB tmpfs (skips where mounting is not permitted)."""
    try:
        res = _mount("-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(store_dir))
    except FileNotFoundError:
        pytest.skip("no `mount` command: cannot make a small or read-only store")
    if res.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root with CAP_SYS_ADMIN): "
                    f"{res.stderr.strip()}")
    try:
        yield Tmpfs(store_dir)
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], capture_output=True)


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _temp_files(root: Path) -> list[str]:
    return [p for p in _all_files(root) if Path(p).name.endswith(".tmp")]


def _source(tmp_path: Path, size: int) -> Path:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1024) * (size // 1024))
    return src


# -- the store itself --------------------------------------------------------------------------
@pytest.mark.parametrize("move", [False, True])
def test_full_store_put_file_raises_clear_error_and_leaves_nothing(tmpfs_store, tmp_path, move):
    store = ArtifactStore(str(tmpfs_store.path))
    src = _source(tmp_path, 3 * MiB)
    with pytest.raises(StoreWriteError) as info:
        store.put_file(src, "clips/1/sprite.jpg", move=move)
    exc = info.value
    assert exc.errno == errno.ENOSPC and isinstance(exc, TransientError) and classify(exc) == "transient"
    assert str(exc) == f"could not store clips/1/sprite.jpg in {store.url}: No space left on device"
    assert _temp_files(tmpfs_store.path) == [] and not store.exists("clips/1/sprite.jpg")
    assert src.stat().st_size == 3 * MiB  # the caller's file is still there, even with move=True
    with pytest.raises(StoreWriteError, match="No space left on device"):
        store.put_bytes(b"y" * 3 * MiB, "clips/2/sprite.jpg")
    assert _all_files(tmpfs_store.path) == []
    store.put_bytes(b"small", "clips/3/sprite.jpg")  # what fits still works
    assert store.read_bytes("clips/3/sprite.jpg") == b"small"


def test_read_only_store_put_raises_clear_error_and_leaves_nothing(tmpfs_store, tmp_path):
    store = ArtifactStore(str(tmpfs_store.path))
    store.put_bytes(b"old", "clips/1/sprite.jpg")
    tmpfs_store.remount("ro")
    src = _source(tmp_path, 64 * 1024)
    for key in ("clips/1/sprite.jpg", "clips/2/sprite.jpg"):  # existing folder and a new one
        with pytest.raises(StoreWriteError, match="Read-only file system") as info:
            store.put_file(src, key, move=True)
        assert info.value.errno == errno.EROFS and info.value.key == key
        assert src.exists()
    with pytest.raises(StoreWriteError, match="Read-only file system"):
        store.put_bytes(b"new", "clips/1/sprite.jpg")
    assert _all_files(tmpfs_store.path) == ["clips/1/sprite.jpg"]
    assert store.read_bytes("clips/1/sprite.jpg") == b"old"  # the stored version is untouched
    tmpfs_store.remount("rw")
    store.put_file(src, "clips/2/sprite.jpg", move=True)
    assert store.size("clips/2/sprite.jpg") == 64 * 1024 and not src.exists()


@pytest.mark.parametrize("move", [False, True])
def test_failed_rename_into_place_leaves_no_temp_and_keeps_the_source(tmp_path, monkeypatch, move):
    """Fallback for machines without mount: the final rename fails (EROFS), same filesystem."""
    store = ArtifactStore(str(tmp_path / "store"))
    src = _source(tmp_path, 8 * 1024)
    real = os.replace

    def failing_replace(a, b, *args, **kw):
        if str(b).startswith(str(store.root)) and not Path(b).name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StoreWriteError, match="Read-only file system"):
        store.put_file(src, "sources/1/original.mp4", move=move)
    assert _all_files(store.root) == [] and src.stat().st_size == 8 * 1024


def test_remote_failed_upload_leaves_no_temp_key(tmp_path, monkeypatch):
    store = ArtifactStore(f"memory://heaters-faults-{tmp_path.name}")
    src = _source(tmp_path, 4 * 1024)

    def broken_mv(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store._fs, "mv", broken_mv)
    with pytest.raises(StoreWriteError, match="Input/output error"):
        store.put_file(src, "clips/1/sprite.jpg", move=True)
    assert list(store.walk()) == [] and src.exists()
    monkeypatch.undo()
    store.put_file(src, "clips/1/sprite.jpg", move=True)
    assert [e.path for e in store.walk()] == ["clips/1/sprite.jpg"] and not src.exists()


# -- through a real stage run ------------------------------------------------------------------
def _run(defs, instance, clip_id: int):
    asset = build_stage_asset(FAULT_STAGE)
    instance.add_dynamic_partitions(FAULT_STAGE.partitions_name, [str(clip_id)])
    return dg.materialize([asset], instance=instance, resources=defs.resources, partition_key=str(clip_id),
                          raise_on_error=False, tags={"heaters/requested_by": "sensor"})


def _requeue(db, clip_id: int) -> None:
    with db.session() as s:
        transition(s, "clip", clip_id, FAULT_STAGE.failure_state, FAULT_STAGE.retry_state, clear_error=True,
                   bump_version=True)


def _statuses(db, clip_id: int) -> list[str]:
    with db.session() as s:
        return [r.status for r in s.execute(select(StageResult).where(StageResult.entity_id == clip_id)
                                             .order_by(StageResult.id)).scalars()]


def _check_failed_cleanly(db, store_root: Path, clip_id: int, reason: str) -> None:
    row = row_of(db, "clip", clip_id)
    assert row.state == FAULT_STAGE.failure_state  # retried (transient), then given up
    assert row.last_error.startswith("gave up after 2 attempts: could not store") and reason in row.last_error
    assert _statuses(db, clip_id) == ["transient_error", "permanent_error"]
    assert _all_files(store_root) == []  # no temp file, no half-stored sprite


def test_stage_run_on_a_full_store_fails_cleanly_and_recovers(tmpfs_store, defs, db, store, instance):
    SPRITE_BYTES["n"] = 3 * MiB
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    assert not _run(defs, instance, cid).success
    _check_failed_cleanly(db, tmpfs_store.path, cid, "No space left on device")

    tmpfs_store.remount("size=16m")  # the operator makes room
    _requeue(db, cid)
    assert _run(defs, instance, cid).success
    assert row_of(db, "clip", cid).state == FAULT_STAGE.output_state
    assert store.size(f"clips/{cid}/sprite.jpg") == 3 * MiB
    assert _temp_files(tmpfs_store.path) == []


def test_stage_run_on_a_read_only_store_fails_cleanly_and_recovers(tmpfs_store, defs, db, store, instance):
    SPRITE_BYTES["n"] = 64 * 1024
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    tmpfs_store.remount("ro")
    assert not _run(defs, instance, cid).success
    _check_failed_cleanly(db, tmpfs_store.path, cid, "Read-only file system")

    tmpfs_store.remount("rw")
    _requeue(db, cid)
    assert _run(defs, instance, cid).success
    assert row_of(db, "clip", cid).state == FAULT_STAGE.output_state
    assert store.size(f"clips/{cid}/sprite.jpg") == 64 * 1024
    assert _temp_files(tmpfs_store.path) == []
