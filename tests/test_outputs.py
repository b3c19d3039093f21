"""The files a run writes (ggtrain.train.outputs): no run destroys an earlier one's results, disk use is
bounded (--keep-checkpoints, LATEST as a hard link) and checked before the first step, a failed save
names the checkpoint to resume from, stale temp files and unused outdirs are cleaned up.

CLI behaviour runs `ggtrain finetune` in a subprocess on a tiny Q8_0 llama, as a user would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from tinymodels import tiny_model

from ggtrain import atomic
from ggtrain.adapters.gguf_lora import read_gguf_adapter, write_gguf_adapter
from ggtrain.atomic import LOCK_NAME, OutdirLock, atomic_link, remove_stale_temps
from ggtrain.errors import GGTrainError
from ggtrain.gguf.arch import read_hparams
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
from ggtrain.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ggtrain.train.optim import AdamW
from ggtrain.train.outputs import OutputPaths, adapter_nbytes, checkpoint_nbytes
from ggtrain.train.trainer import TrainConfig

TEXT = "/usr/share/common-licenses/GPL-3"
GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model("llama", "Q8_0")


def ft(model: Path, outdir: Path, *extra: str, data: str = TEXT) -> list[str]:
    return [*GGTRAIN, "finetune", "-m", str(model), "--train-data", data, "--format", "text",
            "--outdir", str(outdir), "-c", "128", "-b", "4", "-t", "2", "--seed", "3", *extra]


def run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def contents(d: Path) -> dict[str, bytes]:
    """Every file in d (not the lock) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != LOCK_NAME}


def logged_steps(outdir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (outdir / "train_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


def error_line(r: subprocess.CompletedProcess) -> str:
    """The run's one error line (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("ggtrain: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@contextlib.contextmanager
def tmpfs(d: Path, size: str) -> Iterator[Path]:
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


# -- a run never destroys an earlier run's results ------------------------------------------------
def test_second_run_is_refused_and_leaves_the_first_intact(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run(ft(model, out, "--adam-iter", "3", "--save-every", "1"))
    assert first.returncode == 0, first.stderr
    before = contents(out)
    assert "ggml-lora-LATEST-f32.gguf" in before and "checkpoint-3.npz" in before

    r = run(ft(model, out, "--adam-iter", "2", "--lora-r", "4"))
    msg = error_line(r)
    assert f"{out}: holds the results of an earlier run" in msg
    assert f"newest checkpoint {out / 'checkpoint-3.npz'} at step 3" in msg
    assert f"--checkpoint-in {out / 'checkpoint-3.npz'}" in msg and "--overwrite" in msg and "--outdir" in msg
    assert contents(out) == before  # byte-identical: adapters, checkpoints, the log
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_overwrite_replaces_the_earlier_run_without_mixing(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(ft(model, out, "--adam-iter", "4", "--save-every", "1", "--keep-checkpoints", "0")).returncode == 0
    assert {"checkpoint-1.npz", "checkpoint-4.npz", "ggml-lora-1-f32.gguf", "ggml-lora-4-f32.gguf"} <= set(contents(out))
    r = run(ft(model, out, "--adam-iter", "2", "--save-every", "1", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert set(contents(out)) == {"checkpoint-1.npz", "checkpoint-2.npz", "checkpoint-LATEST.npz",
                                  "ggml-lora-1-f32.gguf", "ggml-lora-2-f32.gguf", "ggml-lora-LATEST-f32.gguf",
                                  "train_log.jsonl"}
    assert logged_steps(out) == [1, 2]
    assert load_checkpoint(out / "checkpoint-LATEST.npz").step == 2


def test_fixed_lora_out_is_not_replaced_by_a_second_run(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(ft(model, out, "--adam-iter", "2", "--lora-out", "adapter.bin")).returncode == 0
    adapter = (out / "adapter.bin").read_bytes()
    msg = error_line(run(ft(model, out, "--adam-iter", "1", "--lora-out", "adapter.bin")))
    assert "adapter.bin" in msg and "--overwrite" in msg
    assert (out / "adapter.bin").read_bytes() == adapter

    # A name outside the outdir follows the same rule, in a new outdir too (which is not left behind).
    shared = tmp_path / "shared" / "adapter-ITERATION.gguf"
    assert run(ft(model, tmp_path / "a", "--adam-iter", "2", "--lora-out", str(shared))).returncode == 0
    kept = (tmp_path / "shared" / "adapter-LATEST.gguf").read_bytes()
    msg = error_line(run(ft(model, tmp_path / "b", "--adam-iter", "1", "--lora-out", str(shared))))
    assert f"adapter {tmp_path / 'shared'}" in msg and "at step 2" in msg
    assert "another --outdir or --lora-out" in msg and "no checkpoint to continue from" in msg
    assert (tmp_path / "shared" / "adapter-LATEST.gguf").read_bytes() == kept
    assert not (tmp_path / "b").exists()


def test_resume_appends_and_an_older_checkpoint_is_refused(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(ft(model, out, "--adam-iter", "4", "--save-every", "2")).returncode == 0
    r = run(ft(model, out, "--adam-iter", "6", "--save-every", "2", "--checkpoint-in", str(out / "checkpoint-4.npz")))
    assert r.returncode == 0, r.stderr
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    names = set(contents(out))
    assert {"checkpoint-2.npz", "checkpoint-4.npz", "checkpoint-6.npz", "ggml-lora-6-f32.gguf"} <= names
    assert load_checkpoint(out / "checkpoint-LATEST.npz").step == 6

    # From checkpoint-2, the files of steps 4 and 6 would mix with the new ones: refused, untouched.
    before = contents(out)
    older = ["--adam-iter", "3", "--save-every", "0", "--checkpoint-in", str(out / "checkpoint-2.npz")]
    msg = error_line(run(ft(model, out, *older)))
    assert "after step 2" in msg and "checkpoint-4.npz" in msg and "checkpoint-6.npz" in msg
    assert f"--checkpoint-in {out / 'checkpoint-6.npz'}" in msg and "--overwrite" in msg
    assert contents(out) == before
    r = run(ft(model, out, *older, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert logged_steps(out) == [1, 2, 3]
    assert set(contents(out)) == {"checkpoint-2.npz", "checkpoint-3.npz", "checkpoint-LATEST.npz",
                                  "ggml-lora-2-f32.gguf", "ggml-lora-3-f32.gguf", "ggml-lora-LATEST-f32.gguf",
                                  "train_log.jsonl"}


# -- disk use: bounded and checked --------------------------------------------------------------------
def test_keep_checkpoints_prunes_and_latest_is_a_loadable_hard_link(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(ft(model, out, "--adam-iter", "5", "--save-every", "1", "--keep-checkpoints", "2"))
    assert r.returncode == 0, r.stderr
    assert set(contents(out)) == {"checkpoint-4.npz", "checkpoint-5.npz", "checkpoint-LATEST.npz",
                                  "ggml-lora-4-f32.gguf", "ggml-lora-5-f32.gguf", "ggml-lora-LATEST-f32.gguf",
                                  "train_log.jsonl"}
    for latest, newest in (("checkpoint-LATEST.npz", "checkpoint-5.npz"),
                           ("ggml-lora-LATEST-f32.gguf", "ggml-lora-5-f32.gguf")):
        a, b = (out / latest).stat(), (out / newest).stat()
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2  # one file, two names
    assert load_checkpoint(out / "checkpoint-LATEST.npz", base=ModelFile(model)).step == 5
    lora, _, meta = read_gguf_adapter(out / "ggml-lora-LATEST-f32.gguf", base=ModelFile(model))
    assert meta["training.steps"] == 5 and np.abs(lora.flat).max() > 0

    sys.path.insert(0, str(Path(__file__).parent))
    import llamacpp

    latest, _ = llamacpp.perplexity(model, TEXT, ctx=128, chunks=2, lora=[out / "ggml-lora-LATEST-f32.gguf"])
    numbered, _ = llamacpp.perplexity(model, TEXT, ctx=128, chunks=2, lora=[out / "ggml-lora-5-f32.gguf"])
    assert np.isfinite(latest) and latest == numbered


def test_outdir_too_small_for_one_checkpoint_fails_before_the_first_step(model: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "512k") as mnt:
        t0 = time.time()
        msg = error_line(run(ft(model, mnt / "new", "--adam-iter", "2")))
        assert f"{mnt / 'new'}: only 0.5 MiB free" in msg and "need about" in msg and "--keep-checkpoints" in msg
        assert not (mnt / "new").exists()  # created by the run, removed with its lock
        msg = error_line(run(ft(model, mnt, "--adam-iter", "2")))
        assert "only 0.5 MiB free" in msg
        assert list(mnt.iterdir()) == []  # existed: only the lock file the run created is gone
        assert time.time() - t0 < 300


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_free_space_estimate_is_the_real_size(model: Path, tmp_path: Path, dtype: str) -> None:
    mf = ModelFile(model)
    hp = read_hparams(mf)
    for r in (4, 32):
        lcfg = LoraConfig.make(r=r, alpha=16)
        lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=1)
        opt = AdamW({"lora": lora.flat}).state_dict()
        ck = Checkpoint(lora=lora, optimizer=opt, step=7, epoch=0, data_position={"epoch": 0, "index": 12, "seed": 3},
                        config=asdict(TrainConfig(lora=lcfg.to_dict())), base_fingerprint="f" * 64,
                        base_name=model.name)
        real = save_checkpoint(tmp_path / f"c{r}.npz", ck).stat().st_size
        real += write_gguf_adapter(tmp_path / f"a{r}.gguf", lora, mf, dtype=dtype,
                                   extra_meta={"training.steps": 7, "training.epochs": 0}).stat().st_size
        est = checkpoint_nbytes(lora.layout) + adapter_nbytes(lora.layout, dtype)
        assert abs(est - real) <= 0.2 * real, (r, dtype, est, real)
        assert est >= real  # never under: the check is for the worst case


def test_failed_save_says_which_checkpoint_to_resume_from(model: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        out = mnt / "o"
        args = ["--adam-iter", "8", "--save-every", "1", "--keep-checkpoints", "0"]
        proc = subprocess.Popen(ft(model, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not (out / "ggml-lora-1-f32.gguf").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # the disk fills up while the run goes on
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        _, err = proc.communicate(timeout=600)
        msg = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
        assert "saving step" in msg and "failed" in msg and "no space left on device" in msg
        failed_step = int(msg.split("saving step ")[1].split()[0])
        resume = Path(msg.split("--checkpoint-in ")[1].split()[0])
        assert resume.parent == out and resume.name.startswith("checkpoint-")
        assert 1 <= load_checkpoint(resume).step <= failed_step
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the failed temp file is gone

        filler.unlink()
        r = run(ft(model, out, *args, "--checkpoint-in", str(resume)))
        assert r.returncode == 0, r.stderr
        assert logged_steps(out) == list(range(1, 9))


def test_stale_temp_files_of_a_killed_save_are_removed(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = textwrap.dedent(f"""
        import os, signal
        from ggtrain.atomic import atomic_path
        with atomic_path({str(out / 'checkpoint-3.npz')!r}) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", code], check=False)
    assert killed.returncode == -signal.SIGKILL
    stale = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].name.startswith(".checkpoint-3.npz.")
    dead_pid = int(stale[0].name.split(".")[3])
    not_ours = out / f".notes.txt.{dead_pid}.abcdefgh.tmp"  # a temp name, but not of a file a run writes
    alive = out / f".checkpoint-9.npz.{os.getpid()}.abcdefgh.tmp"  # its writer is still running
    not_ours.write_bytes(b"x")
    alive.write_bytes(b"x")

    r = run(ft(model, out, "--adam-iter", "1"))
    assert r.returncode == 0, r.stderr
    assert not stale[0].exists()
    assert not_ours.exists() and alive.exists()


def test_failure_before_the_first_step_leaves_no_outdir(model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    msg = error_line(run(ft(model, tmp_path / "new" / "nested", data=str(empty))))
    assert str(empty) in msg
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    error_line(run(ft(model, existing, data=str(empty))))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]

    # A lock file that was there before the run is not the run's to remove.
    (existing / LOCK_NAME).write_text("")
    error_line(run(ft(model, existing, data=str(empty))))
    assert sorted(p.name for p in existing.iterdir()) == [LOCK_NAME, "notes.txt"]


# -- the helpers underneath ---------------------------------------------------------------------
def test_atomic_link_replaces_and_falls_back_to_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "x-7.bin", tmp_path / "x-LATEST.bin"
    src.write_bytes(b"seven")
    dst.write_bytes(b"older")
    assert atomic_link(src, dst) is True
    assert dst.stat().st_ino == src.stat().st_ino and dst.read_bytes() == b"seven"
    assert atomic_link(src, dst) is True  # again onto the same file: no temp name left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-7.bin", "x-LATEST.bin"]

    def no_links(a: object, b: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)  # a filesystem without hard links (vfat)
    other = tmp_path / "x-8.bin"
    other.write_bytes(b"eight")
    assert atomic_link(other, dst) is False
    assert dst.read_bytes() == b"eight" and dst.stat().st_ino != other.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-7.bin", "x-8.bin", "x-LATEST.bin"]


def test_remove_stale_temps_only_removes_dead_writers_of_named_targets(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid
    names = [f".a.gguf.{dead}.abcdefgh.tmp", f".b.gguf.{dead}.abcdefgh.tmp", f".a.gguf.{os.getpid()}.abcdefgh.tmp",
             ".a.gguf.abcdefgh.tmp", "a.gguf"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path, lambda target: target == "a.gguf")
    assert [p.name for p in removed] == [f".a.gguf.{dead}.abcdefgh.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_lock_removed_by_its_holder_is_not_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that opened the lock file just before its holder removed it must not lock that dead
    file while a third run holds the new one: it notices and tries the file at the path."""
    first = OutdirLock(tmp_path).acquire()
    assert first.created
    old = open(tmp_path / LOCK_NAME, "a+b")  # noqa: SIM115 -- the second run's handle, opened in time
    first.release(remove=True)
    assert not (tmp_path / LOCK_NAME).exists()
    third = OutdirLock(tmp_path).acquire()
    opened: list[object] = []

    def open_old_first(path: object, mode: str = "r") -> object:
        opened.append(path)
        return old if len(opened) == 1 else open(path, mode)

    monkeypatch.setattr(atomic, "open", open_old_first, raising=False)
    with pytest.raises(GGTrainError, match="another ggtrain run"):
        OutdirLock(tmp_path).acquire()
    assert len(opened) == 2 and old.closed
    third.release()


def test_output_paths_patterns(tmp_path: Path) -> None:
    out = OutputPaths(tmp_path / "o", None, "ck-ITERATION-ITERATION.npz", "q8_0")
    assert out.adapters(3) == [tmp_path / "o" / "ggml-lora-3-q8_0.gguf", tmp_path / "o" / "ggml-lora-LATEST-q8_0.gguf"]
    (tmp_path / "o").mkdir()
    for n in ("ck-2-2.npz", "ck-2-3.npz", "ck-LATEST-LATEST.npz", "ggml-lora-12-q8_0.gguf", "ggml-lora-x-q8_0.gguf"):
        (tmp_path / "o" / n).write_bytes(b"")
    found = {f.path.name: (f.kind, f.step, f.latest) for f in out.find()}
    assert found == {"ck-2-2.npz": ("checkpoint", 2, False), "ck-LATEST-LATEST.npz": ("checkpoint", None, True),
                     "ggml-lora-12-q8_0.gguf": ("adapter", 12, False)}
