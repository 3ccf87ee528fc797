"""Artifact storage: a project-local folder by default, S3-compatible object storage (or any fsspec
filesystem) when ``HEATERS_STORAGE_URL`` names one (``s3://bucket/prefix``).

Keys are built from database ids by :mod:`heaters_dagster.storage_keys`, never from names a user
supplied, and :func:`validate_key` rejects anything that could escape the store (``..``, absolute
paths, odd characters).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from heaters_dagster.errors import PermanentError

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*(/[a-z0-9][a-z0-9_.\-]*)*$")


def validate_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/") or any(p in (".", "..") for p in key.split("/")):
        raise PermanentError(f"invalid storage key {key!r}")
    return key


class ArtifactStore:
    """Put, fetch and delete files by key. Local folders are the fast path (no copies on read)."""

    def __init__(self, url: str):
        self.url = url
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            root = url[len("file://"):] if url.startswith("file://") else url
            self.root = Path(root).expanduser().resolve()
            self.root.mkdir(parents=True, exist_ok=True)
            self._fs = None
        else:
            import fsspec

            self._fs, self._base = fsspec.core.url_to_fs(url)
            self._base = self._base.rstrip("/")

    # -- paths ---------------------------------------------------------------------------------
    def _local(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise PermanentError(f"storage key {key!r} escapes the store")
        return path

    def _remote(self, key: str) -> str:
        return f"{self._base}/{validate_key(key)}"

    def uri(self, key: str) -> str:
        """A human-readable location (a local path or a URL)."""
        return str(self._local(key)) if self.is_local else f"{self.url.rstrip('/')}/{validate_key(key)}"

    # -- operations ----------------------------------------------------------------------------
    def put_file(self, local_path: Path | str, key: str, *, move: bool = False) -> str:
        """Store ``local_path`` under ``key`` atomically (readers never see a partial file)."""
        local_path = Path(local_path)
        if self.is_local:
            dest = self._local(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            if move:
                shutil.move(str(local_path), tmp)
            else:
                shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        else:
            assert self._fs is not None
            self._fs.put_file(str(local_path), self._remote(key))
            if move:
                local_path.unlink(missing_ok=True)
        return key

    def put_bytes(self, data: bytes, key: str) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as fh:
            fh.write(data)
        try:
            return self.put_file(fh.name, key, move=True)
        finally:
            Path(fh.name).unlink(missing_ok=True)

    def read_bytes(self, key: str) -> bytes:
        if self.is_local:
            return self._local(key).read_bytes()
        assert self._fs is not None
        return self._fs.cat_file(self._remote(key))

    def exists(self, key: str) -> bool:
        if self.is_local:
            return self._local(key).exists()
        assert self._fs is not None
        return bool(self._fs.exists(self._remote(key)))

    def size(self, key: str) -> int:
        if self.is_local:
            return self._local(key).stat().st_size
        assert self._fs is not None
        return int(self._fs.size(self._remote(key)))

    def delete(self, key: str) -> bool:
        """Delete one key; returns whether something was deleted (deleting twice is harmless)."""
        if self.is_local:
            path = self._local(key)
            if path.exists():
                path.unlink()
                return True
            return False
        assert self._fs is not None
        if self._fs.exists(self._remote(key)):
            self._fs.rm_file(self._remote(key))
            return True
        return False

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local path for reading ``key`` (the file itself for a local store, a temp copy otherwise)."""
        if self.is_local:
            path = self._local(key)
            if not path.exists():
                raise PermanentError(f"stored file {key!r} is missing from {self.url}")
            yield path
            return
        assert self._fs is not None
        with tempfile.TemporaryDirectory(prefix="heaters-") as tmp:
            dest = Path(tmp) / Path(key).name
            self._fs.get_file(self._remote(key), str(dest))
            yield dest
