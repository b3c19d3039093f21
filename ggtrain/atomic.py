"""Nothing is lost: atomic file writes, a lock on the output directory, an early writability check.

A write goes to a temp file in the target's own directory (same filesystem, so rename is atomic),
is fsynced, renamed over the target, and the directory is fsynced so the rename survives a crash.
Any failure on the way (a full disk, a bad value) removes the temp file and leaves the previous
file exactly as it was; the error becomes one GGTrainError naming the path. A writer killed
outright cannot clean up: its temp file `.<target name>.<pid>.<8 random chars>.tmp` names the
target and the writer's pid, so the next run can tell a stale one (pid gone) and remove it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ggtrain.errors import GGTrainError

if TYPE_CHECKING:
    from typing_extensions import Self

LOCK_NAME = ".ggtrain.lock"
# .<target>.<pid>.<random>.tmp: mkstemp's random part is 8 chars of [a-z0-9_], atomic_link's 8 hex digits
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
# errnos of a filesystem without hard links (vfat, some FUSE and network filesystems)
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temps(d: str | os.PathLike, is_target: Callable[[str], bool]) -> list[Path]:
    """Remove the temp files in d that a killed writer left behind: names matching TEMP_RE whose
    target name satisfies is_target and whose writer pid is no longer running. Returns them.

    Call it only while holding the OutdirLock of the directory the targets belong to, so no other
    run of ours can be writing them.
    """
    removed = []
    try:
        entries = list(Path(d).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_RE.match(p.name)
        if m is None or not is_target(m["target"]) or _pid_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for writers that open files by name (e.g. gguf.GGUFWriter).

    On a clean exit the temp file is fsynced and renamed over `path`; on any exception it is removed,
    the previous `path` is untouched and OSErrors become GGTrainError("<path>: could not write ...").
    """
    path = Path(path)
    d = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=d)
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
            kept = f" (the previous {path.name} is intact)" if path.exists() else ""
            raise GGTrainError(f"{path}: could not write: {_describe(e)}{kept}") from None
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


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Make dst name the same file as src: a hard link made at a temp name beside dst and renamed
    over it, so dst is always either the old file or the new one. Where the filesystem has no hard
    links, dst becomes an atomic copy instead. Returns True for a link, False for a copy.
    """
    src, dst = Path(src), Path(dst)
    d = dst.parent if str(dst.parent) else Path(".")
    tmp = None
    while tmp is None:
        cand = d / f"{_temp_prefix(dst)}{secrets.token_hex(4)}.tmp"
        try:
            os.link(src, cand)
            tmp = cand
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise GGTrainError(f"{dst}: could not link it to {src.name}: {_describe(e)}") from None

            def copy(f: BinaryIO) -> None:
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f, 1 << 20)

            atomic_write(dst, copy)
            return False
    try:
        os.replace(tmp, dst)
    except OSError as e:
        raise GGTrainError(f"{dst}: could not replace it: {_describe(e)} (the previous {dst.name}, if any, "
                           "is intact)") from None
    finally:
        # also after a successful rename: renaming a link over another link to the same file is a
        # no-op that leaves both names in place
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(d)
    return True


def hard_links_work(d: str | os.PathLike) -> bool:
    """Whether directory d's filesystem has hard links (probed with two temp names)."""
    d = Path(d)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ggtrain-probe.", dir=d)
    except OSError:
        return False
    os.close(fd)
    link = Path(f"{probe}.link")
    try:
        os.link(probe, link)
        return True
    except OSError:
        return False
    finally:
        for p in (link, Path(probe)):
            with contextlib.suppress(OSError):
                p.unlink()


def check_free_space(d: str | os.PathLike, need_bytes: int, what: str = "the outputs", freed: int = 0,
                     hint: str = "") -> None:
    """Refuse a directory whose filesystem has less than need_bytes free. `what` says what needs the
    space, `freed` is space about to be freed (counted as free), `hint` what the user can do."""
    free = shutil.disk_usage(d).free + freed
    if free < need_bytes:
        counting = f" (counting the {freed / 2**20:.1f} MiB of files that --overwrite removes)" if freed else ""
        raise GGTrainError(f"{d}: only {free / 2**20:.1f} MiB free{counting}, {what} need about "
                           f"{need_bytes / 2**20:.1f} MiB" + (f"; {hint}" if hint else ""))


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
        check_free_space(d, need_bytes)
    return d


class OutdirLock:
    """Exclusive fcntl lock on an output directory, so two runs never write the same files.

    `with OutdirLock(outdir): ...` — a second run pointed at the same directory gets a GGTrainError
    naming the directory and the pid of the run holding it. The lock dies with the process (no stale
    locks after a crash); the small lock file stays in the directory unless release(remove=True)
    takes it away. Keep a reference to the object: the lock is released when it is garbage-collected.
    """

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        self.path = self.outdir / LOCK_NAME
        self.created = False  # whether acquire() created the lock file (rather than finding one)
        self._f: BinaryIO | None = None

    def acquire(self) -> Self:
        if self._f is not None:
            return self
        while True:
            existed = self.path.exists()
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
            # A holder that removed the lock file (release(remove=True)) before we locked our handle
            # to it: that lock guards nothing any more; take the one at the path now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        self.created = not existed
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        self._f = f
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; remove=True also deletes the lock file (while still holding it, so a run waiting
        on the old file notices and retries instead of sharing the directory with a newer run)."""
        if self._f is None:
            return
        with contextlib.suppress(OSError):
            if remove:
                self.path.unlink()
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
