"""Nothing is lost: atomic file writes, a lock on the output directory, an early writability check.

A write goes to a temp file in the target's own directory (same filesystem, so rename is atomic),
is fsynced, renamed over the target, and the directory is fsynced so the rename survives a crash.
Any failure on the way (a full disk, a killed writer, a bad value) removes the temp file and leaves
the previous file exactly as it was; the error becomes one GGTrainError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ggtrain.errors import GGTrainError

if TYPE_CHECKING:
    from typing_extensions import Self

LOCK_NAME = ".ggtrain.lock"


def _fsync_dir(d: Path) -> None:
    """Make a rename in d durable; some filesystems refuse to fsync a directory, which is harmless."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def _file_mode(path: Path) -> int:
    """The replaced file's mode, or 0666 minus the umask for a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for writers that open files by name (e.g. gguf.GGUFWriter).

    On a clean exit the temp file is fsynced and renamed over `path`; on any exception it is removed,
    the previous `path` is untouched and OSErrors become GGTrainError("<path>: could not write ...").
    """
    path = Path(path)
    d = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=d)
    except OSError as e:
        raise GGTrainError(f"{path}: cannot create a file in {d}: {_describe(e)}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the result the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise GGTrainError(f"{path}: could not write: {_describe(e)} "
                               f"(the previous {path.name}, if any, is intact)") from None
        raise
    _fsync_dir(d)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_open(p) as f: f.write(...)` — binary file object; same guarantees as atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()


def atomic_write(path: str | os.PathLike, writer_fn: Callable[[BinaryIO], object]) -> Path:
    """Call writer_fn(f) on a temp file and atomically replace `path` with the result; return path."""
    with atomic_open(path) as f:
        writer_fn(f)
    return Path(path)


def check_writable(d: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Create directory d if needed and prove a file can be written, fsynced and removed there.

    Run before training so an unwritable --outdir fails in the first second, not after an hour.
    need_bytes > 0 also refuses a disk with less free space than that.
    """
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise GGTrainError(f"{d}: output directory is a file, not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGTrainError(f"{d}: cannot create output directory: {_describe(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".ggtrain-probe.", dir=d)
        try:
            os.write(fd, b"ggtrain")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise GGTrainError(f"{d}: output directory is not writable: {_describe(e)}") from None
    if need_bytes > 0:
        import shutil

        free = shutil.disk_usage(d).free
        if free < need_bytes:
            raise GGTrainError(f"{d}: only {free / 2**20:.1f} MiB free, the outputs need about "
                               f"{need_bytes / 2**20:.1f} MiB")
    return d


class OutdirLock:
    """Exclusive fcntl lock on an output directory, so two runs never write the same files.

    `with OutdirLock(outdir): ...` — a second run pointed at the same directory gets a GGTrainError
    naming the directory and the pid of the run holding it. The lock dies with the process (no stale
    locks after a crash); the small lock file stays in the directory. Keep a reference to the
    object: the lock is released when it is garbage-collected.
    """

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        self.path = self.outdir / LOCK_NAME
        self._f: BinaryIO | None = None

    def acquire(self) -> Self:
        if self._f is not None:
            return self
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+b")  # noqa: SIM115 -- held open for as long as the lock is
        except OSError as e:
            raise GGTrainError(f"{self.outdir}: cannot create lock file {LOCK_NAME}: {_describe(e)}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(64).decode("ascii", "replace").strip() or "unknown"
            f.close()
            raise GGTrainError(f"{self.outdir}: another ggtrain run (pid {holder}) is using this output "
                               "directory; wait for it to finish or choose another --outdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is None:
            return
        with contextlib.suppress(OSError):
            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()
        self._f = None

    @property
    def held(self) -> bool:
        return self._f is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
