"""Artifact storage: a project-local folder by default, S3-compatible object storage (or any fsspec
filesystem) when ``HEATERS_STORAGE_URL`` names one (``s3://bucket/prefix``).

Keys are built from database ids by :mod:`heaters_dagster.storage_keys`, never from names a user
supplied, and :func:`validate_key` rejects anything that could escape the store (``..``, absolute
paths, odd characters).

Writes are atomic and leave nothing behind on failure: a local put goes to a hidden sibling
``.<name>.<hex>.tmp`` that is renamed over the key (and removed again on any error); remote puts
rely on the backend's atomic object writes (S3, GCS) or go to a temp key that is moved over the
key. A failed write raises :class:`StoreWriteError` (transient: a full or read-only store can be
fixed, and the stage retries). Stored files get the time they were stored as their mtime, which
``heaters doctor`` uses to leave files of a commit still in flight alone.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from heaters_dagster.errors import PermanentError, TransientError

# Backends whose object writes are atomic (an object appears complete or not at all; a failed
# multipart upload is never visible). Everything else writes to a temp key and moves it.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})


class StoreWriteError(TransientError, OSError):
    """Writing into the artifact store failed (full, read-only, unreachable). Nothing partial was
    left behind. Transient (the stage retries: the store can be fixed), and an ``OSError`` with
    the cause's ``errno`` for callers that check it."""

    def __init__(self, message: str, *, errno: int | None = None, key: str | None = None):
        if errno is None:
            OSError.__init__(self, message)
        else:
            OSError.__init__(self, errno, message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (self.__class__, (self.message,), {"key": self.key, "errno": self.errno})


def is_temp_name(name: str) -> bool:
    """A store write's temp file (``.<name>.<hex>.tmp``), which readers never look at."""
    return name.startswith(".") and name.endswith(".tmp")


def _temp_sibling(path: str) -> str:
    head, _, name = path.rpartition("/")
    tmp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    return f"{head}/{tmp}" if head else tmp


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # pragma: no cover - the store itself is broken; doctor finds the rest
        pass


@dataclass(frozen=True)
class StoredEntry:
    """One file under the store (what :meth:`ArtifactStore.walk` yields)."""

    path: str  # relative to the store root, "/"-separated (a key, or a temp file's name)
    size: int
    mtime: float | None  # POSIX seconds; None when the backend does not say


def _info_mtime(info: dict[str, Any]) -> float | None:
    for name in ("mtime", "LastModified", "last_modified", "modified", "updated", "timeCreated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


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

            from heaters_dagster.settings import storage_options

            self._fs, self._base = fsspec.core.url_to_fs(url, **storage_options(url))
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
    def _write_error(self, key: str, exc: BaseException) -> StoreWriteError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason = reason or type(exc).__name__
        code = exc.errno if isinstance(exc, OSError) else None
        return StoreWriteError(f"could not store {key} in {self.url}: {reason}", errno=code, key=key)

    def _put_local(self, key: str, write_tmp: Callable[[Path], Callable[[], None] | None]) -> None:
        """Write via a hidden temp sibling, then rename it over the key. ``write_tmp(tmp)`` fills
        the temp file and returns whether it moved a caller's file there (to be moved back on
        failure). On any error the temp file is gone and a StoreWriteError (or the original
        non-OS error) is raised."""
        dest = self._local(key)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        restore: Callable[[], None] | None = None
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            restore = write_tmp(tmp)
            os.utime(tmp)  # mtime = when stored (a rename keeps the scratch file's old mtime)
            os.replace(tmp, dest)
        except BaseException as exc:
            if callable(restore):
                try:
                    restore()
                except OSError:
                    _unlink_quietly(tmp)
            else:
                _unlink_quietly(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, StoreWriteError):
                raise self._write_error(key, exc) from exc
            raise

    def put_file(self, local_path: Path | str, key: str, *, move: bool = False) -> str:
        """Store ``local_path`` under ``key`` atomically (readers never see a partial file).

        With ``move`` the local file is consumed (renamed when on the same filesystem); if the put
        fails it is left where it was. Raises :class:`StoreWriteError` when the store cannot be
        written (no space, read-only, ...) and leaves no temp file behind."""
        validate_key(key)
        local_path = Path(local_path)
        if not local_path.is_file():
            raise FileNotFoundError(_errno.ENOENT, f"no file to store under {key}", str(local_path))
        if self.is_local:
            def write_tmp(tmp: Path) -> Callable[[], None] | None:
                if move:
                    try:
                        os.rename(local_path, tmp)
                        return lambda: os.rename(tmp, local_path)
                    except OSError as exc:
                        if exc.errno != _errno.EXDEV:
                            raise
                shutil.copyfile(local_path, tmp)
                return None

            self._put_local(key, write_tmp)
            if move:
                local_path.unlink(missing_ok=True)
        else:
            fs = self._fs
            assert fs is not None
            self._put_remote(key, lambda rpath: fs.put_file(str(local_path), rpath))
            if move:
                local_path.unlink(missing_ok=True)
        return key

    def _put_remote(self, key: str, upload: Callable[[str], Any]) -> None:
        assert self._fs is not None
        dest = self._remote(key)
        proto = self._fs.protocol
        protocols = tuple(proto) if isinstance(proto, (tuple, list)) else (proto,)
        if _ATOMIC_PUT_PROTOCOLS.intersection(protocols):
            try:
                upload(dest)
            except Exception as exc:
                raise self._write_error(key, exc) from exc
            return
        tmp = _temp_sibling(dest)
        try:
            upload(tmp)
            self._fs.mv(tmp, dest)
        except BaseException as exc:
            try:
                if self._fs.exists(tmp):
                    self._fs.rm_file(tmp)
            except Exception:  # noqa: BLE001 - best effort; doctor finds leftover temp keys
                pass
            if isinstance(exc, Exception):
                raise self._write_error(key, exc) from exc
            raise

    def put_bytes(self, data: bytes, key: str) -> str:
        """Store ``data`` under ``key`` atomically (same guarantees as :meth:`put_file`)."""
        if self.is_local:
            def write_tmp(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                return None

            self._put_local(key, write_tmp)
        else:
            fs = self._fs
            assert fs is not None
            self._put_remote(key, lambda rpath: fs.pipe_file(rpath, data))
        return key

    def read_bytes(self, key: str) -> bytes:
        if self.is_local:
            return self._local(key).read_bytes()
        assert self._fs is not None
        return self._fs.cat_file(self._remote(key))

    def read_head(self, key: str, n: int) -> bytes:
        """The first ``n`` bytes of a stored file (a header), without fetching the rest."""
        if self.is_local:
            with self._local(key).open("rb") as f:
                return f.read(n)
        assert self._fs is not None
        return self._fs.cat_file(self._remote(key), start=0, end=n)

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

    # -- listing (heaters doctor) ---------------------------------------------------------------
    def walk(self) -> Iterator[StoredEntry]:
        """Every file under the store, temp files included (no key validation: this is for
        finding what does not belong)."""
        if self.is_local:
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    full = Path(dirpath) / name
                    try:
                        st = full.lstat()
                    except FileNotFoundError:  # removed while we looked
                        continue
                    yield StoredEntry(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)
            return
        assert self._fs is not None
        if not self._fs.exists(self._base):
            return
        base = self._base.strip("/") + "/"
        for path, info in self._fs.find(self._base, detail=True).items():
            path = path.lstrip("/")
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            yield StoredEntry(rel, int(info.get("size") or 0), _info_mtime(info))

    def stat_entry(self, path: str) -> StoredEntry | None:
        """The entry at a path :meth:`walk` returned, or None when it is gone."""
        if self.is_local:
            full = self._listed(path)
            try:
                st = full.lstat()
            except FileNotFoundError:
                return None
            return StoredEntry(path, st.st_size, st.st_mtime)
        assert self._fs is not None
        try:
            info = self._fs.info(self._listed_remote(path))
        except FileNotFoundError:
            return None
        return StoredEntry(path, int(info.get("size") or 0), _info_mtime(info))

    def remove_entry(self, path: str) -> bool:
        """Delete a file :meth:`walk` returned (a temp file or an orphan); empty folders above it
        in a local store are removed too. Returns whether something was deleted."""
        if self.is_local:
            full = self._listed(path)
            try:
                full.unlink()
            except FileNotFoundError:
                return False
            parent = full.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
            return True
        assert self._fs is not None
        rpath = self._listed_remote(path)
        if self._fs.exists(rpath):
            self._fs.rm_file(rpath)
            return True
        return False

    @staticmethod
    def _check_listed(path: str) -> str:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise PermanentError(f"store path {path!r} is not a path under the store")
        return path

    def _listed(self, path: str) -> Path:
        full = self.root.joinpath(*self._check_listed(path).split("/"))
        if self.root not in full.parents:
            raise PermanentError(f"store path {path!r} escapes the store")
        return full

    def _listed_remote(self, path: str) -> str:
        return f"{self._base}/{self._check_listed(path)}"

    # -- submitted source files ----------------------------------------------------------------
    def put_source_file(self, local_path: Path | str, key: str, *, max_bytes: int) -> int:
        """Copy a submitted file into the store under ``key``; returns the bytes copied.

        Only regular files are read: the file is opened with ``O_NONBLOCK`` (a named pipe never
        blocks the open) and checked with ``fstat`` on the open descriptor, so a path swapped for
        a FIFO or a device after an earlier check is refused too. At most ``max_bytes`` are
        copied: a larger file, or one that grows past the limit while it is copied, is refused.
        Problems with the source raise :class:`~heaters_dagster.errors.InvalidSourceError`; on any
        error neither a temp file nor a folder made for the key is left behind.
        """
        import stat

        from heaters_dagster.errors import InvalidSourceError

        validate_key(key)
        src_path = Path(local_path)
        try:
            fd = os.open(src_path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InvalidSourceError(f"cannot read {src_path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb", buffering=0) as src:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                from heaters_dagster.media.fetch import special_file_kind

                raise InvalidSourceError(
                    f"{src_path} is a {special_file_kind(st.st_mode)}, not a regular file; "
                    "only regular video files are accepted")
            if st.st_size > max_bytes:
                raise InvalidSourceError(_too_large(src_path, max_bytes, st.st_size))
            if not self.is_local:
                with tempfile.TemporaryDirectory(prefix="heaters-submit-") as scratch:
                    tmp = Path(scratch) / "source"
                    with open(tmp, "wb") as dst:
                        copied = copy_limited(src, dst, max_bytes, src_path)
                    self.put_file(tmp, key, move=True)
                return copied
            dest = self._local(key)
            created: list[Path] = []
            parent = dest.parent
            while parent != self.root and not parent.exists():
                created.append(parent)
                parent = parent.parent
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "xb") as dst:
                    copied = copy_limited(src, dst, max_bytes, src_path)
                os.replace(tmp, dest)
            except BaseException:
                _unlink_quietly(tmp)
                for folder in created:  # deepest first; only the ones made here, and only if empty
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                raise
            return copied

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


_COPY_CHUNK = 1 << 20


def _too_large(path: Path, max_bytes: int, size: int | None = None) -> str:
    got = f"{size:,} bytes" if size is not None else f"more than {max_bytes:,} bytes"
    return (f"{path} is too large: {got}, over the limit of {max_bytes:,} bytes "
            "(HEATERS_MAX_SOURCE_BYTES); submit a smaller file or raise the limit")


def copy_limited(src: Any, dst: Any, max_bytes: int, name: Path | str = "source") -> int:
    """Copy file object ``src`` to ``dst``, refusing (InvalidSourceError) once more than
    ``max_bytes`` have been read; returns the bytes copied. Read errors are the source's fault
    (InvalidSourceError); write errors propagate as they are."""
    from heaters_dagster.errors import InvalidSourceError

    total = 0
    while True:
        try:
            chunk = src.read(min(_COPY_CHUNK, max_bytes - total + 1))
        except OSError as exc:
            raise InvalidSourceError(f"cannot read {name}: {exc.strerror or exc}") from None
        if not chunk:
            return total
        total += len(chunk)
        if total > max_bytes:
            raise InvalidSourceError(_too_large(Path(name), max_bytes))
        dst.write(chunk)
