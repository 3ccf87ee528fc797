"""The artifact store: local folder and an fsspec filesystem (memory://, the same code path as
s3://), atomic puts, idempotent deletes, and keys that cannot escape the store."""

from __future__ import annotations

import pytest

from heaters_dagster import storage_keys
from heaters_dagster.errors import PermanentError
from heaters_dagster.storage import ArtifactStore, validate_key


@pytest.fixture(params=["local", "memory"])
def any_store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(f"memory://heaters-test-{tmp_path.name}")


def test_put_read_copy_delete(any_store, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"abc" * 1000)
    key = storage_keys.sprite(7)
    any_store.put_file(src, key)
    assert any_store.exists(key) and any_store.size(key) == 3000
    assert any_store.read_bytes(key) == b"abc" * 1000
    with any_store.local_copy(key) as p:
        assert p.read_bytes() == b"abc" * 1000
    assert any_store.delete(key) is True
    assert any_store.delete(key) is False  # twice is harmless
    assert not any_store.exists(key)


def test_missing_key_is_a_clear_permanent_error(tmp_path):
    store = ArtifactStore(str(tmp_path / "s"))
    with pytest.raises(PermanentError, match="missing"):
        with store.local_copy("clips/1/sprite.jpg"):
            pass


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/path", "clips/../../x", "clips//x", "Clips/Ünïcode",
                                 "clips/1/a b.jpg", "", "clips/./x"])
def test_keys_that_could_escape_are_refused(key, tmp_path):
    with pytest.raises(PermanentError):
        validate_key(key)
    with pytest.raises(PermanentError):
        ArtifactStore(str(tmp_path / "s")).put_bytes(b"x", key)


def test_keys_are_built_from_ids_only():
    assert storage_keys.source_original(3, ".MP4") == "sources/3/original.mp4"
    assert storage_keys.source_original(3, "../../evil") == "sources/3/original.bin"
    assert storage_keys.keyframe(5, "multi", "25pct") == "clips/5/keyframes/multi_25pct.jpg"
    a, b = storage_keys.clip_file(1, 0, 48), storage_keys.clip_file(1, 0, 48)
    assert a != b and a.startswith("sources/1/clips/00000000-00000048-")
    for k in (a, storage_keys.sprite(9), storage_keys.source_normalized(2)):
        validate_key(k)
