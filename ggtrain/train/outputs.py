"""What a run writes, and the rules that keep it from destroying an earlier run's results.

A run writes checkpoints (--checkpoint-out), adapters (--lora-out) and train_log.jsonl into
--outdir. ITERATION in a name becomes the step number and every save also renames the LATEST name
onto the newest file; names outside the outdir (absolute or ../) follow the same rules in their
own directory. The rules:
- A fresh run refuses an outdir that already holds such files, naming the newest checkpoint and the
  ways on (--checkpoint-in it, --overwrite, another --outdir). With --overwrite the earlier run's
  files are removed before the first step, so nothing of the two runs mixes.
- A resumed run continues in place (the log is kept, trimmed to the checkpoint's step); files of
  steps after the checkpoint's are refused unless --overwrite removes them.
- --keep-checkpoints N keeps the N newest ITERATION checkpoints and adapters (0: all of them).
- Before the first step the free space is checked against the real size of a checkpoint and an
  adapter times the copies that are on disk at once during a save.
- A run that fails before it wrote anything leaves no lock file and no directory it created.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ggtrain.adapters.modelcard import RunRecord
from ggtrain.atomic import (
    OutdirLock,
    atomic_link,
    check_free_space,
    check_writable,
    hard_links_work,
    remove_stale_temps,
)
from ggtrain.errors import GGTrainError

LOG_NAME = "train_log.jsonl"
DEFAULT_KEEP = 3
LOG_BYTES_PER_STEP = 512  # one train_log.jsonl record, rounded up

Layout = Mapping[str, tuple[int, int, int, float, float]]  # LoraWeights.layout: name -> (out, in, r, ...)


@dataclass(frozen=True)
class RunFile:
    """One file of a run found on disk."""

    path: Path
    kind: str  # "checkpoint", "adapter" or "log"
    step: int | None  # from an ITERATION name; None for LATEST, a name without ITERATION, the log
    latest: bool = False

    @property
    def saved_step(self) -> int | None:
        """The step the file holds: from its name, else from its contents (None if unreadable)."""
        if self.step is not None:
            return self.step
        if self.kind == "checkpoint":
            return checkpoint_step(self.path)
        if self.kind == "adapter":
            return adapter_step(self.path)
        return None


def checkpoint_step(path: Path) -> int | None:
    """The step recorded in a checkpoint's metadata (only that member is read), None if unreadable."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return int(json.loads(z["meta"].tobytes().decode())["step"])
    except Exception:  # noqa: BLE001 -- any unreadable file: the loader names the problem when it matters
        return None


def adapter_step(path: Path) -> int | None:
    """The training.steps key of an adapter we wrote, None if absent or unreadable."""
    import gguf

    try:
        field = gguf.GGUFReader(path).get_field("training.steps")
        return int(field.contents()) if field is not None else None
    except Exception:  # noqa: BLE001 -- not ours or not a GGUF: no step to tell
        return None


@dataclass
class OutputPaths:
    """Where a run writes, and how a save writes there (see the module docstring)."""

    outdir: Path
    lora_out: str | None = None  # None: ggml-lora-ITERATION-<adapter_dtype>.gguf
    checkpoint_out: str = "checkpoint-ITERATION.npz"
    adapter_dtype: str = "f32"
    keep: int = DEFAULT_KEEP  # ITERATION files of each kind kept after a save (0: all)

    def __post_init__(self) -> None:
        self.outdir = Path(self.outdir)
        if self.lora_out is None:
            self.lora_out = f"ggml-lora-ITERATION-{self.adapter_dtype}.gguf"

    # -- names ---------------------------------------------------------------------------------
    def _path(self, pattern: str) -> Path:
        p = Path(pattern)
        return p if p.is_absolute() else self.outdir / p

    def _names(self, pattern: str, step: int) -> list[Path]:
        p = self._path(pattern)
        if "ITERATION" not in p.name:
            return [p]
        return [p.with_name(p.name.replace("ITERATION", str(step))),
                p.with_name(p.name.replace("ITERATION", "LATEST"))]

    def adapters(self, step: int) -> list[Path]:
        """The adapter files a save at `step` writes: the ITERATION one, then LATEST."""
        return self._names(str(self.lora_out), step)

    def checkpoints(self, step: int) -> list[Path]:
        return self._names(self.checkpoint_out, step)

    @property
    def log(self) -> Path:
        return self.outdir / LOG_NAME

    def _patterns(self) -> list[tuple[str, str]]:
        return [("checkpoint", self.checkpoint_out), ("adapter", str(self.lora_out))]

    def dirs(self) -> list[Path]:
        """Every directory the run writes into, the outdir first."""
        out = [self.outdir]
        for _, pattern in self._patterns():
            d = self._path(pattern).parent
            if not any(_same_dir(d, o) for o in out):
                out.append(d)
        return out

    @staticmethod
    def _matcher(name_pattern: str) -> re.Pattern[str]:
        """Regex for the file names of one pattern: ITERATION as digits or LATEST (group 'it')."""
        parts = [re.escape(x) for x in name_pattern.split("ITERATION")]
        if len(parts) == 1:
            return re.compile(f"^{parts[0]}$")
        return re.compile(f"^{parts[0]}(?P<it>[0-9]+|LATEST)" + "(?P=it)".join(parts[1:]) + "$")

    def _find(self, kind: str, pattern: str) -> list[RunFile]:
        p = self._path(pattern)
        rx = self._matcher(p.name)
        try:
            entries = sorted(p.parent.iterdir())
        except OSError:
            return []
        found = []
        for e in entries:
            m = rx.match(e.name)
            if m is None or not e.is_file():
                continue
            it = m.groupdict().get("it")
            found.append(RunFile(e, kind, int(it) if it is not None and it != "LATEST" else None,
                                 latest=it == "LATEST"))
        return found

    def find(self) -> list[RunFile]:
        """Every file of a run that is on disk now: checkpoints, adapters, the log."""
        files = [f for kind, pattern in self._patterns() for f in self._find(kind, pattern)]
        if self.log.is_file():
            files.append(RunFile(self.log, "log", None))
        return files

    def owns(self, d: Path, name: str) -> bool:
        """Whether `name` in directory d is the name of a file this run writes."""
        if name == LOG_NAME and _same_dir(d, self.outdir):
            return True
        return any(_same_dir(d, self._path(p).parent) and self._matcher(self._path(p).name).match(name)
                   for _, p in self._patterns())

    def newest_checkpoint(self) -> tuple[Path, int | None] | None:
        """The newest complete checkpoint on disk and its step: the highest ITERATION one, else the
        LATEST or fixed-name one (writes are atomic, so any that exists is complete)."""
        cks = self._find("checkpoint", self.checkpoint_out)
        numbered = [f for f in cks if f.step is not None]
        if numbered:
            f = max(numbered, key=lambda f: f.step or 0)
            return f.path, f.step
        for f in cks:
            return f.path, f.saved_step
        return None

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, write_checkpoint: Callable[[Path], object],
             write_adapter: Callable[[Path], object]) -> list[Path]:
        """Write the checkpoint, then the adapter, of `step` (each writer writes atomically to the
        path it is given) and point the LATEST names at them. Returns the paths written."""
        written = []
        for pattern, write in ((self.checkpoint_out, write_checkpoint), (str(self.lora_out), write_adapter)):
            first, *latest = self._names(pattern, step)
            write(first)
            written.append(first)
            for p in latest:
                # LATEST is a hard link to the ITERATION file: no second full copy, and unlike a
                # symlink it is a plain file to every tool (llama.cpp, Ollama, a copy to another
                # machine) and never dangles when pruning removes the ITERATION name. Our writes
                # never modify a file in place (temp + rename), so the two names cannot diverge.
                atomic_link(first, p)
                written.append(p)
        return written

    def prune(self, step: int) -> list[Path]:
        """After a save at `step`: remove the ITERATION checkpoints and adapters older than the
        `keep` newest. Never LATEST, never `step`'s own files, so never the checkpoint a run
        resumed from before a newer one exists."""
        removed: list[Path] = []
        if self.keep <= 0:
            return removed
        for kind, pattern in self._patterns():
            numbered = sorted((f for f in self._find(kind, pattern) if f.step is not None and f.step <= step),
                              key=lambda f: f.step or 0, reverse=True)
            for f in numbered[self.keep:]:
                with contextlib.suppress(OSError):  # best effort: a file we cannot remove costs space only
                    f.path.unlink()
                    removed.append(f.path)
        return removed

    def resume_hint(self) -> str:
        """What a user can do after a failed save: the newest checkpoint to resume from."""
        newest = self.newest_checkpoint()
        if newest is None:
            return "no checkpoint was saved before it, so there is nothing to resume from; free some space " \
                   "and start the run again"
        path, step = newest
        at = f" (step {step})" if step is not None else ""
        return f"the newest complete checkpoint is {path}{at}: free some space and resume with " \
               f"--checkpoint-in {path}"


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


# -- sizes ---------------------------------------------------------------------------------------
_NPZ_MEMBER = 320  # a zip member's local and central headers (zip64 extras) and its .npy header
_NPZ_META = 4096  # the checkpoint's JSON metadata without the per-tensor part ...
_NPZ_META_PER_TENSOR = 192  # ... and per LoRA tensor (layout entry, names)
_GGUF_HEADER = 4096  # GGUF header and metadata keys of an adapter
_GGUF_ALIGN = 32


def checkpoint_nbytes(layout: Layout) -> int:
    """Size of a checkpoint of this LoRA layout: the f32 weights and Adam's two moments, plus the
    zip/npy framing and the JSON metadata."""
    n = sum(r * (o + i) for o, i, r, _, _ in layout.values())
    return 3 * 4 * n + 4 * _NPZ_MEMBER + _NPZ_META + _NPZ_META_PER_TENSOR * len(layout)


def _tensor_nbytes(rows: int, cols: int, dtype: str) -> int:
    """Bytes of one adapter tensor as ggtrain.adapters.gguf_lora writes it: q8_0 only for rows of a multiple
    of 32 values (34 bytes a block), f16 for the others."""
    if dtype == "f32":
        return 4 * rows * cols
    if dtype == "q8_0" and cols % 32 == 0:
        return rows * cols // 32 * 34
    return 2 * rows * cols


def adapter_nbytes(layout: Layout, dtype: str) -> int:
    """Size of a GGUF adapter of this layout and tensor type: A (r x in) and B (out x r) per
    tensor, each with its tensor info and alignment, plus the header and metadata."""
    total = _GGUF_HEADER
    for name, (o, i, r, _, _) in layout.items():
        for rows, cols in ((r, i), (o, r)):
            total += 8 + len(name) + 7 + 4 + 2 * 8 + 4 + 8  # tensor info: name, dims, type, offset
            data = _tensor_nbytes(rows, cols, dtype)
            total += data + (-data) % _GGUF_ALIGN
    return total


def saves_of(start: int, total: int, save_every: int) -> int:
    """Saves a run makes from step `start` to `total`: every save_every steps before the end, and
    the final one."""
    if save_every <= 0 or start >= total:
        return 1
    first = (start // save_every + 1) * save_every
    return len(range(first, total, save_every)) + 1


# -- one run's hold on its outputs ------------------------------------------------------------
class RunOutputs:
    """A run's claim on its output directories: the writability check, the outdir lock, the
    removal of stale temp files, and the refusal to mix with or destroy an earlier run's results.

    Construct it before anything is loaded; call check_space() and clear() just before the first
    step; call release() when the run ends (it may be called more than once). A run that wrote
    nothing by then (it failed before its first step) removes the lock file it created and the
    directories it created, if they are empty.
    """

    def __init__(self, out: OutputPaths, fresh: bool, resume_from: Path | None = None,
                 overwrite: bool = False):
        self.out = out
        self.overwrite = overwrite
        self.replaced: list[RunFile] = []  # an earlier run's files that clear() removes (--overwrite)
        self._created: list[Path] = []
        self.lock = OutdirLock(out.outdir)
        self._snapshot = self._stat()  # what was there before: wrote() compares with it
        try:
            for d in out.dirs():
                p = d
                while not p.exists() and p != p.parent:
                    self._created.append(p)
                    p = p.parent
                check_writable(d)
            self.lock.acquire()
            for d in out.dirs():
                remove_stale_temps(d, lambda name, d=d: out.owns(d, name))
            self.replaced = self._refuse_or_replace(fresh, resume_from)
        except BaseException:
            self.release()
            raise

    def _stat(self) -> dict[Path, tuple[int, int, int]]:
        st = {}
        for f in self.out.find():
            with contextlib.suppress(OSError):
                s = f.path.stat()
                st[f.path] = (s.st_ino, s.st_mtime_ns, s.st_size)
        return st

    def _refuse_or_replace(self, fresh: bool, resume_from: Path | None) -> list[RunFile]:
        files = self.out.find()
        if fresh:
            if files and not self.overwrite:
                raise GGTrainError(self._refusal(files))
            return files
        step = checkpoint_step(resume_from) if resume_from is not None else None
        if step is None:  # unreadable: loading it names what is wrong
            return []
        resumed = _realpath(resume_from)
        later = [f for f in files if f.kind != "log" and _realpath(f.path) != resumed
                 and (f.saved_step if f.saved_step is not None else -1) > step]
        if later and not self.overwrite:
            newest = self.out.newest_checkpoint()
            cont = f"resume from the newest (--checkpoint-in {newest[0]}), " \
                if newest is not None and newest[1] is not None and newest[1] > step else ""
            raise GGTrainError(f"{self.out.outdir}: holds files of steps after step {step} of {resume_from} "
                               f"({_listing(later)}), which this run would mix with its own; {cont}add "
                               f"--overwrite to remove them, or choose {self._elsewhere(later)}")
        return later

    def _elsewhere(self, files: list[RunFile]) -> str:
        """'another --outdir', naming --lora-out / --checkpoint-out too when files they name are outside it."""
        outside = {f.kind for f in files if not _same_dir(f.path.parent, self.out.outdir)}
        flags = ["--outdir"] + [flag for kind, flag in (("checkpoint", "--checkpoint-out"), ("adapter", "--lora-out"))
                                if kind in outside]
        return "another " + " or ".join(flags)

    def _refusal(self, files: list[RunFile]) -> str:
        other = self._elsewhere(files)
        newest = self.out.newest_checkpoint()
        if newest is not None:
            path, step = newest
            what = f"newest checkpoint {path}" + (f" at step {step}" if step is not None else "")
            ways = f"continue it with --checkpoint-in {path}, replace it with --overwrite, or choose {other}"
        else:
            adapters = [f for f in files if f.kind == "adapter"]
            if adapters:
                a = max(adapters, key=lambda f: (-1 if f.saved_step is None else f.saved_step, not f.latest))
                step = a.saved_step
                what = f"adapter {a.path}" + (f" at step {step}" if step is not None else "")
            else:
                what = str(files[0].path)
            ways = f"replace it with --overwrite or choose {other} (there is no checkpoint to continue from)"
        return f"{self.out.outdir}: holds the results of an earlier run ({what}; {_listing(files)}): {ways}"

    # -- just before the first step ------------------------------------------------------------
    def check_space(self, layout: Layout, start: int, total: int, save_every: int) -> int:
        """Refuse (GGTrainError) a filesystem without room for the save that needs the most: the
        checkpoint's and adapter's temp files beside the kept ones, LATEST copies where there are
        no hard links, and the log. Returns the bytes needed."""
        n_saves = saves_of(start, total, save_every)
        ck, ad = checkpoint_nbytes(layout), adapter_nbytes(layout, self.out.adapter_dtype)
        gone = {_realpath(f.path) for f in self.replaced}
        need: dict[int, list] = {}  # st_dev -> [dir, bytes, freed]

        def add(d: Path, nbytes: int) -> None:
            need.setdefault(os.stat(d).st_dev, [d, 0, 0])[1] += nbytes

        copies = {}
        for (kind, pattern), size in zip(self.out._patterns(), (ck, ad), strict=True):
            p = self.out._path(pattern)
            present = [f for f in self.out._find(kind, pattern) if _realpath(f.path) not in gone]
            if "ITERATION" not in p.name:
                n = 1  # one file, replaced atomically: its temp file beside it
            else:
                existing = sum(f.step is not None for f in present)
                if self.out.keep <= 0:
                    n = n_saves
                else:
                    n = max(0, min(existing + n_saves - 1, self.out.keep) - existing) + 1
                if not hard_links_work(p.parent):  # LATEST is a copy: its temp beside the old one
                    n += 1 if any(f.latest for f in present) else 2
            copies[kind] = n
            add(p.parent, n * size)
        add(self.out.outdir, (max(total - start, 0) + 1) * LOG_BYTES_PER_STEP)
        inodes = set()
        for f in self.replaced:  # what --overwrite removes first frees its space (LATEST links once)
            with contextlib.suppress(OSError):
                s = f.path.stat()
                if (s.st_dev, s.st_ino) not in inodes and s.st_dev in need:
                    inodes.add((s.st_dev, s.st_ino))
                    need[s.st_dev][2] += s.st_size
        keep = self.out.keep or "0 (all)"
        what = (f"the outputs (a checkpoint of {ck / 2**20:.2f} MiB and an adapter of {ad / 2**20:.2f} MiB, "
                f"each up to {max(copies.values())} times at once during a save with --keep-checkpoints {keep})")
        for d, nbytes, freed in need.values():
            check_free_space(d, nbytes, what, freed=freed,
                             hint="free some space, lower --keep-checkpoints or choose another --outdir")
        return sum(v[1] for v in need.values())

    def clear(self) -> list[Path]:
        """Remove the earlier run's files that --overwrite replaces (before the first step)."""
        removed = []
        for f in self.replaced:
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()
                removed.append(f.path)
        self.replaced = []
        self._snapshot = self._stat()
        return removed

    # -- the end -------------------------------------------------------------------------------
    def wrote(self) -> bool:
        """Whether this run has written any of its files since it claimed the outdir."""
        return self._stat().items() - self._snapshot.items() != set()

    def release(self) -> None:
        """Unlock. A run that wrote nothing leaves no trace: its lock file (if it created it) and
        the directories it created (if empty) are removed."""
        unused = not self.wrote()
        if self.lock.held:
            self.lock.release(remove=unused and self.lock.created)
        if unused:
            for d in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            self._created = []


def _realpath(p: Path) -> str:
    return os.path.realpath(p)


def _listing(files: list[RunFile], n: int = 4) -> str:
    names = [f.path.name for f in files]
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def run_record(adapter: Path, steps: int | None) -> RunRecord:
    """The run that wrote `adapter` (its directory's train_log.jsonl, and the checkpoint of step
    `steps`); empty where the adapter no longer lies beside them."""
    from ggtrain.train.checkpoint import load_checkpoint

    rec = RunRecord()
    log = adapter.parent / "train_log.jsonl"
    if log.is_file():
        try:
            for line in log.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                    continue
                if steps is not None and r["step"] > steps:
                    continue
                if isinstance(r.get("loss"), (int, float)):
                    rec.losses[r["step"]] = float(r["loss"])
                if isinstance(r.get("val_loss"), (int, float)):
                    rec.val_losses[r["step"]] = float(r["val_loss"])
        except (OSError, UnicodeDecodeError, ValueError):
            rec.losses, rec.val_losses = {}, {}  # not our log: the card goes without its figures
    if steps is not None:
        for ck_path in sorted(adapter.parent.glob("*.npz")):
            if str(steps) not in ck_path.name and "LATEST" not in ck_path.name:
                continue
            try:
                ck = load_checkpoint(ck_path)
            except GGTrainError:
                continue
            if ck.step == steps:
                rec.config = dict(ck.config)
                break
    return rec
