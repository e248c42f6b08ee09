"""File output that survives crashes: atomic writes, stale temporaries, one process per directory.

A reader sees the old file or the whole new one, never a part. A write that fails (a full disk) removes
its temporary and raises :class:`~polytask.errors.StorageError` naming the file; a temporary left by a
killed process is recognised by the pid in its name and removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

from polytask.errors import RunLockedError, StorageError

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to the pid written in the lock file
    fcntl = None  # type: ignore[assignment]

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def cache_dir() -> Path:
    """polytask's cache folder (single-task results, streamed tables' Parquet caches): ``$POLYTASK_CACHE_DIR``, else
    ``~/.cache/polytask``."""
    return Path(os.environ.get("POLYTASK_CACHE_DIR", Path.home() / ".cache" / "polytask"))


def temporary_of(path: Path) -> Path:
    """The hidden temporary beside ``path`` that this process writes before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True, folder: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    ``durable=False`` skips the two fsyncs (file and folder): still atomic for readers and for a killed process, but
    an OS crash may lose the new file or leave it cut; for bookkeeping a run can do without (an epoch's wall-clock
    times), where the fsyncs cost more than the write. ``folder=False`` skips the folder's only: after an OS crash
    the file is whole or absent (the old one, when it replaced one), for progress a run can redo (a continual
    experience's end state). On an OS error (disk full, no permission) the temporary is removed and a StorageError
    names ``path``."""
    path = Path(path)
    tmp = temporary_of(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _storage_error(path, e) from e
    _before_rename(path)
    try:
        os.replace(tmp, path)
        if durable and folder:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _storage_error(path, e) from e
    return path


def _storage_error(path: Path, e: OSError) -> StorageError:
    reason = e.strerror or str(e)
    hint = "; free space there and resume" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    err = StorageError(f"cannot write {path}: {reason} [errno {e.errno}]{hint}")
    err.errno, err.filename = e.errno, str(path)
    return err


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(), durable)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, durable: bool = True, indent: int | None = 2) -> Path:
    """``obj`` as JSON, atomically (:func:`atomic_write_bytes`); indented for a person to read, or on one line
    (``indent=None``: json's C encoder, several times faster, for records a program reads back)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n", durable)


def _before_rename(path: Path) -> None:
    """Fault-injection point for the crash tests (see ``polytask.engine.faults``)."""
    from polytask.engine import faults

    faults.hit("write", path.name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a temporary of :func:`atomic_write_bytes`."""
    return _TEMPORARY.match(path.name) is not None


def remove_stale_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries under ``root`` whose writer is no longer alive (a killed run, or a write
    that the kernel refused and could not clean up); returns them. Temporaries of live processes stay."""
    removed = []
    for p in Path(root).rglob(".*.tmp-*"):
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class DirLock:
    """An exclusive lock on a directory, held by one process at a time.

    ``fcntl.flock`` on ``<dir>/<name>``: the kernel drops it when the holder exits or is killed, so a lock
    of a dead process is never stale and is simply taken over. The file holds the holder's pid, for the
    message another process gets. Without flock (Windows, some network file systems) the pid alone decides:
    a live holder refuses, a dead one is taken over.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str = "run.lock") -> None:
        self.path = Path(directory) / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        """Take the lock or raise RunLockedError naming the holder's pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    raise self._busy(self._holder(fd)) from None
                except OSError as e:  # a file system without flock (some network mounts): the pid decides
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
            if not locked:
                holder = self._holder(fd)
                if holder not in (None, os.getpid()) and pid_alive(holder):
                    raise self._busy(holder)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would let two processes lock two different files)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> int | None:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def _busy(self, holder: int | None) -> RunLockedError:
        who = f"process {holder}" if holder is not None else "another process"
        return RunLockedError(f"{self.path.parent} is in use by {who} (lock file {self.path}); two processes "
                              "would train the same jobs: wait for it to finish, or stop it and resume")

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
