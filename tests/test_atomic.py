"""ggtrain.atomic: atomic replace, failures leave the previous file intact, outdir lock, writability."""

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggtrain import atomic
from ggtrain.atomic import OutdirLock, atomic_open, atomic_path, atomic_write, check_writable
from ggtrain.errors import GGTrainError

REPO = Path(__file__).resolve().parents[1]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_write_new_and_replace(tmp_path):
    p = tmp_path / "a.bin"
    assert atomic_write(p, lambda f: f.write(b"one")) == p
    assert p.read_bytes() == b"one"
    atomic_write(p, lambda f: f.write(b"two, longer"))
    assert p.read_bytes() == b"two, longer"
    with atomic_open(p) as f:
        f.write(b"three")
    assert p.read_bytes() == b"three"
    assert leftovers(tmp_path) == []


def test_new_file_gets_umask_permissions(tmp_path):
    p = tmp_path / "a.bin"
    old = os.umask(0o022)
    try:
        atomic_write(p, lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_enospc_keeps_previous_and_names_path(tmp_path):
    p = tmp_path / "ckpt.npz"
    p.write_bytes(b"previous")

    def writer(f):
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(GGTrainError) as ei:
        atomic_write(p, writer)
    msg = str(ei.value)
    assert str(p) in msg and "no space left" in msg and "intact" in msg
    assert p.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_failing_fsync_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "a.bin"
    p.write_bytes(b"previous")

    def bad_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", bad_fsync)
    with pytest.raises(GGTrainError, match="Input/output error"):
        atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_non_os_error_propagates_and_cleans_up(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"previous")

    def writer(f):
        f.write(b"x")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(p, writer)
    assert p.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_real_file_size_limit_in_subprocess(tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE -> EFBIG), not a monkeypatched one."""
    p = tmp_path / "big.bin"
    p.write_bytes(b"previous")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from ggtrain.atomic import atomic_write
        from ggtrain.errors import GGTrainError
        try:
            atomic_write({str(p)!r}, lambda f: f.write(b"x" * 1_000_000))
        except GGTrainError as e:
            print(e)
            sys.exit(2)
        sys.exit(0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert str(p) in r.stdout and "could not write" in r.stdout
    assert p.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_atomic_path_with_gguf_writer(tmp_path):
    p = tmp_path / "x.gguf"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp != p
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_tensor("t", np.arange(32, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert not p.exists()  # nothing visible until the rename
    r = gguf.GGUFReader(p)
    np.testing.assert_array_equal(r.tensors[0].data, np.arange(32, dtype=np.float32))


def test_check_writable(tmp_path):
    d = tmp_path / "new" / "outdir"
    assert check_writable(d) == d and d.is_dir()
    assert list(d.iterdir()) == []  # the probe is gone
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(GGTrainError, match="is a file"):
        check_writable(f)
    with pytest.raises(GGTrainError, match="cannot create output directory") as ei:
        check_writable(f / "sub")
    assert str(f / "sub") in str(ei.value)
    with pytest.raises(GGTrainError, match="only .* MiB free"):
        check_writable(d, need_bytes=1 << 62)


def test_check_writable_read_only_filesystem():
    # /proc refuses new files even for root (chmod-based tests would pass as root).
    with pytest.raises(GGTrainError) as ei:
        check_writable("/proc/ggtrain-outdir")
    assert "/proc/ggtrain-outdir" in str(ei.value)


def test_outdir_lock_refuses_second_holder(tmp_path):
    with OutdirLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / ".ggtrain.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(GGTrainError) as ei:
            OutdirLock(tmp_path).acquire()
        assert str(tmp_path) in str(ei.value) and f"pid {os.getpid()}" in str(ei.value)
    assert not lock.held
    with OutdirLock(tmp_path):  # free again once released
        pass


def test_outdir_lock_other_process_and_crash(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from ggtrain.atomic import OutdirLock
        lock = OutdirLock({str(tmp_path)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(GGTrainError, match=f"pid {child.pid}"):
            OutdirLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    # the holder died without releasing: the kernel dropped the lock, no stale-lock cleanup needed
    deadline = time.time() + 5
    while True:
        try:
            OutdirLock(tmp_path).acquire().release()
            break
        except GGTrainError:
            assert time.time() < deadline
            time.sleep(0.05)
