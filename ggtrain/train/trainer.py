"""The training loop: micro-batches, gradient accumulation, AdamW, checkpoints, signals, logs.

One optimizer step consumes `grad_acc` batches of `batch` rows. Each batch is run in micro-batches
of `micro` rows (chosen by the memory monitor); every micro-batch's gradient is weighted by its share
of the step's trained tokens, so the step's gradient is exactly that of the mean loss over all of
them whatever the micro-batch size.

Stopping is always at a step boundary, so a resumed run continues exactly as an uninterrupted one.
Ctrl-C (or SIGTERM) once: the current step finishes, a checkpoint and the adapter are saved.
Twice: the rest of the step is dropped (the data position rewinds to its start, so a resume runs it
again) and the save starts at once. A press during the save does not abandon it; only the third
press quits without saving, saying which earlier checkpoint is left.
A non-finite loss or gradient stops the run before the update (Diverged): the weights are still
those of the last good step, and they are saved; a NaN never reaches an adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ggtrain.adapters.gguf_lora import write_gguf_adapter
from ggtrain.atomic import atomic_write
from ggtrain.dataset.batches import Batch as DataBatch
from ggtrain.dataset.batches import Batches
from ggtrain.errors import GGTrainError
from ggtrain.model.lora import LoraConfig, LoraWeights
from ggtrain.model.transformer import Batch, Model
from ggtrain.train.checkpoint import Checkpoint, model_fingerprint, save_checkpoint
from ggtrain.train.memory import (
    SAFETY_FRACTION,
    MemoryMonitor,
    choose_keep_ffn,
    choose_micro_batch,
    format_bytes,
    smaller_micro_batch,
)
from ggtrain.train.optim import AdamW, Schedule, clip_grad_norm
from ggtrain.train.outputs import OutputPaths

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class TrainConfig:
    """Every setting of a run that the checkpoint records (JSON-able)."""

    epochs: int | None = 1  # None: no limit (--adam-iter decides, as in llama.cpp's finetune)
    max_steps: int = -1  # --adam-iter: stop after this many optimizer steps (-1: no limit)
    batch: int = 4  # rows per batch
    grad_acc: int = 1  # batches per optimizer step
    micro_batch: int = 0  # rows per forward/backward (0: chosen from --mem-limit)
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    warmup: int = 0
    cos_decay_steps: int = -1  # -1: the whole run
    cos_decay_min: float = 0.1
    checkpointing: bool = True
    checkpoint_ffn: str = "auto"  # checkpoints keep the FFN's gate/up outputs: auto (if they fit), on, off
    save_every: int = 10  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    seed: int = 42
    mem_limit: int = 0  # bytes (0: no limit)
    lora: dict[str, Any] = field(default_factory=dict)  # LoraConfig.to_dict()
    ctx: int = 0  # tokens per row (the data position is meaningless under another one)
    train_data: str = ""  # the training data's file name, for messages
    data_digest: str = ""  # data_digest() of the training data: resuming on other data is refused
    compute: str = "f32"  # the base products' path (Model.set_matmul: f32 or bf16), --compute resolved


# Settings whose change makes a checkpoint's data position point at other rows: a resume with
# another value is refused. Any other difference is allowed and named.
RESUME_MUST_MATCH = {"ctx": "-c/--ctx", "data_digest": "--train-data (its contents)", "seed": "--seed",
                     "batch": "-b/--batch"}
RESUME_FLAG_NAMES = {"lr": "--learning-rate", "epochs": "--epochs", "max_steps": "--adam-iter",
                     "grad_acc": "--grad-acc", "beta1": "--adam-beta1", "beta2": "--adam-beta2",
                     "eps": "--adam-eps", "weight_decay": "--adam-decay", "grad_clip": "--adam-gclip",
                     "warmup": "--warmup", "cos_decay_steps": "--cos-decay-steps",
                     "cos_decay_min": "--cos-decay-min", "checkpointing": "--use-checkpointing",
                     "checkpoint_ffn": "--checkpoint-ffn",
                     "lora": "the LoRA settings (--lora-alpha, --lora-dropout)", "compute": "--compute"}


def data_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a data file's bytes (what sha256sum prints), or of every file's name and
    bytes under a directory."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Interrupted(Exception):
    """Raised inside a step at the second Ctrl-C: the step is dropped, the trainer saves and exits."""

    def __init__(self, signum: int):
        self.signum = signum


class Diverged(Exception):
    """A step's loss or gradient is not finite; raised before the update touches the weights."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def _say_now(msg: str) -> None:
    """Write to stderr from a signal handler: os.write, since the handler may interrupt a buffered
    write to the same stream (which would raise 'reentrant call')."""
    try:
        os.write(sys.stderr.fileno(), ("\n" + msg + "\n").encode())
    except (OSError, ValueError):
        pass


class _Signals:
    """SIGINT/SIGTERM, counted (see the module docstring): 1 finish the step and save, 2 drop the
    step and save now, 3 quit without saving. `status()` words what a third press would lose."""

    def __init__(self, status: Callable[[], tuple[int, str]]) -> None:
        self.received: int | None = None
        self.count = 0
        self.saving = False
        self.status = status  # () -> (current step, what is saved so far)
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        step, saved = self.status()
        if self.count == 1:
            self.received = signum
            _say_now(f"{name} received: finishing step {step + 1}, then saving a checkpoint and the adapter. "
                     "Press Ctrl-C again to save now without finishing the step, a third time to quit "
                     "without saving.")
        elif self.count == 2:
            if self.saving:
                _say_now(f"{name} received: still saving, please wait. Press Ctrl-C once more to quit "
                         f"without saving ({saved}).")
            else:
                _say_now(f"{name} received: dropping step {step + 1} (a resume runs it again) and saving "
                         f"step {step} now. Press Ctrl-C once more to quit without saving.")
        else:
            for s, h in self._old.items():  # a fourth press gets Python's default
                signal.signal(s, h)
            _say_now(f"{name} received a third time: quitting without saving; {saved}.")
            raise KeyboardInterrupt

    def check(self) -> None:
        """Inside a step: the second press drops the step."""
        if self.count >= 2 and not self.saving:
            raise Interrupted(self.received or signal.SIGINT)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def to_model_batch(b: DataBatch) -> Batch:
    return Batch.from_rows(b.tokens, b.targets, b.mask, b.positions, b.segments)


def mean_loss(model: Model, batches: Iterable[DataBatch], micro: int = 0) -> float | None:
    """Mean loss over every trained target of `batches` (evaluation: no dropout, nothing kept),
    `micro` rows at a time (0: whole batches); None when nothing is trained."""
    total, count = 0.0, 0
    for b in batches:
        for mb in b.split(micro or b.n_rows):
            if mb.n_trained:
                loss, _ = model.forward(to_model_batch(mb), train=False)
                total += loss * mb.n_trained
                count += mb.n_trained
    return total / count if count else None


@dataclass
class StepResult:
    step: int
    epoch: int
    loss: float  # mean over the step's trained tokens, before the update
    lr: float
    grad_norm: float
    tokens: int  # tokens processed (rows × ctx)
    trained: int  # trained target tokens
    seconds: float
    micro_batch: int


# The model being trained (its LoRA as it stands) -> records of what it writes for the sample prompts,
# e.g. [{"prompt": ..., "text": ...}] (finetune --sample-prompt: the generate stage makes them).
SampleFn = Callable[[Model], list[dict[str, Any]]]


class Trainer:
    """Trains `lora` on `model`'s frozen weights (self.model = model.with_trainable(lora); the given
    model is left as it is) over `train` batches; see the module docstring. `samples`, when given,
    runs at every evaluation (and at the end if none ran there) and its records go to the log."""

    def __init__(self, model: Model, lora: LoraWeights, train: Batches, val: Batches | None,
                 cfg: TrainConfig, out: OutputPaths, echo: Callable[[str], None] = print,
                 samples: SampleFn | None = None):
        self.model = model.with_trainable(lora)
        self.lora, self.train, self.val, self.cfg, self.out = lora, train, val, cfg, out
        self.echo = echo
        self.samples = samples
        self.grads = lora.zeros_like()
        self.opt = AdamW({"lora": lora.flat}, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         weight_decay=cfg.weight_decay)
        self.step = 0
        self.total_steps = self._plan_steps()
        decay = cfg.cos_decay_steps if cfg.cos_decay_steps >= 0 else \
            Schedule.whole_run_decay(self.total_steps, cfg.warmup)
        self.schedule = Schedule(lr=cfg.lr, warmup=cfg.warmup, cos_decay_steps=decay,
                                 cos_decay_min=cfg.cos_decay_min)
        self.micro = cfg.micro_batch or cfg.batch
        self.keep_ffn = cfg.checkpointing and cfg.checkpoint_ffn == "on"  # choose_micro_batch decides "auto"
        self.monitor = MemoryMonitor(cfg.mem_limit or None)
        self.fingerprint = model_fingerprint(model.mf)
        self.last_val: float | None = None
        self.micro_log: list[int] = []  # micro-batch used at each step (tests, logs)
        self.interrupted_by: int | None = None  # the signal that stopped fit()
        self.diverged: Diverged | None = None  # why fit() stopped early, if it diverged
        self.saved: tuple[int, Path] | None = None  # (step, path) of the newest checkpoint on disk
        self.ema: float | None = None  # smoothed training loss
        # The run's figures for the adapter, summed as the log is written (and over the kept lines
        # on resume), so a save never re-reads the log.
        self.logged = {"tokens": 0, "trained_tokens": 0, "loss": None}

    # -- planning ------------------------------------------------------------------------------
    def _plan_steps(self) -> int:
        """Optimizer steps of the whole run: --adam-iter, or epochs of batches (grad_acc batches a
        step), whichever ends first; with no --epochs, --adam-iter alone decides."""
        if self.cfg.epochs is None:
            if self.cfg.max_steps < 0:
                raise ValueError("a run needs an epoch limit or a step limit")
            return self.cfg.max_steps
        cap = self.cfg.max_steps if self.cfg.max_steps >= 0 else None
        return min(self.epoch_steps(cap), cap) if cap is not None else self.epoch_steps()

    def epoch_steps(self, enough: int | None = None) -> int:
        """Optimizer steps that cfg.epochs passes over the data take (cfg.epochs must be set);
        counting stops once `enough` steps are reached (a huge --epochs with --adam-iter)."""
        batches = 0
        for e in range(self.cfg.epochs or 0):
            batches += self.train.steps_in_epoch(e)
            if enough is not None and batches >= enough * self.cfg.grad_acc:
                break
        return math.ceil(batches / self.cfg.grad_acc)

    def choose_micro_batch(self, hp: Any, lora_config: LoraConfig, ctx: int, file_bytes: int) -> int:
        """The largest micro-batch that fits cfg.mem_limit (refusing a limit nothing fits in), then
        whether the checkpoints keep the FFN's outputs too (cfg.checkpoint_ffn, choose_keep_ffn)."""
        cfg = self.cfg
        if cfg.micro_batch:
            self.micro = cfg.micro_batch
        elif cfg.mem_limit:
            self.micro = choose_micro_batch(cfg.batch, cfg.mem_limit, hp, lora_config, ctx, cfg.checkpointing,
                                            file_bytes, compute=cfg.compute, keep_ffn=self.keep_ffn)
        self.keep_ffn = choose_keep_ffn(cfg.checkpoint_ffn, cfg.mem_limit, hp, lora_config, ctx, self.micro,
                                        cfg.checkpointing, file_bytes, compute=cfg.compute)
        return self.micro

    # -- state ---------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(lora=self.lora, optimizer=self.opt.state_dict(), step=self.step,
                          epoch=self.train.epoch, data_position=self.train.state(),
                          config=asdict(self.cfg), base_fingerprint=self.fingerprint,
                          base_name=self.model.mf.path.name)

    def resume_differences(self, ck: Checkpoint, source: str) -> list[str]:
        """Settings that differ from the checkpoint's run, worded for the user. Raises GGTrainError
        for a difference that makes the resume meaningless (the LoRA layout, the data position)."""
        if ck.lora.layout != self.lora.layout:
            raise GGTrainError(f"{source}: the checkpoint's LoRA layout (targets, ranks) differs from this "
                               "run's flags; resume with the same --lora-r/--rank-* settings")
        old, new = ck.config, asdict(self.cfg)
        for key, flag in RESUME_MUST_MATCH.items():
            if key in old and old[key] != new[key]:
                was = old.get("train_data") or "other data" if key == "data_digest" else old[key]
                now = new.get("train_data") or "other data" if key == "data_digest" else new[key]
                raise GGTrainError(f"{source}: the checkpoint was trained with {flag} {was}, this run has "
                                   f"{now}; its data position means nothing here. Resume with the same "
                                   "setting, or start a fresh run without --checkpoint-in")
        return [f"{RESUME_FLAG_NAMES[k]} {new[k]} (the checkpoint's run had {old[k]})"
                for k in RESUME_FLAG_NAMES if k in old and old[k] != new[k]]

    def restore(self, ck: Checkpoint, source: Path | None = None) -> None:
        """Continue from ck (read from source: named in messages as the newest saved state)."""
        if ck.lora.layout != self.lora.layout:
            raise GGTrainError("the checkpoint's LoRA layout (targets, ranks) differs from this run's flags; "
                               "resume with the same --lora-r/--rank-* settings")
        self.lora.flat[...] = ck.lora.flat
        opt_state = dict(ck.optimizer)
        self.opt.load_state_dict(opt_state)
        self.opt.t = int(opt_state.get("t", ck.step))
        self.step = ck.step
        self.train.load_state(ck.data_position)
        if source is not None:
            self.saved = (ck.step, source)

    def save(self) -> list[Path]:
        """Checkpoint and adapter for the current step (atomic writes; earlier files stay intact),
        then the ITERATION files beyond --keep-checkpoints are pruned. A failed write (full disk,
        I/O error) is one GGTrainError naming the file and the newest checkpoint to resume from."""
        ck = self.checkpoint()
        # The run's figures for the adapter (keys: ggtrain.adapters.gguf_lora's docstring). Token counts are
        # those of the logged steps (a resume counts the kept lines), so they cover the whole run.
        meta: dict[str, str | int | float] = {"training.steps": self.step,
                                              "training.epochs": self.train.epoch,
                                              "training.compute": self.model.matmul}
        meta.update({"training.tokens": self.logged["tokens"],
                     "training.trained_tokens": self.logged["trained_tokens"]})
        for key, v in (("training.loss", self.logged["loss"]), ("training.loss_smoothed", self.ema),
                       ("training.val_loss", self.last_val)):
            if v is not None and math.isfinite(v):
                meta[key] = float(v)
        data = Path(self.cfg.train_data) if self.cfg.train_data else None
        if data is not None:
            meta["training.data"] = data.name
            if self.cfg.data_digest:  # a file's sha256, as sha256sum prints it (see data_digest)
                meta["training.data_sha256"] = self.cfg.data_digest
        try:
            written = self.out.save(
                self.step, lambda p: save_checkpoint(p, ck),
                lambda p: write_gguf_adapter(p, self.lora, self.model.mf, dtype=self.out.adapter_dtype,
                                             extra_meta=meta))
        except (GGTrainError, OSError) as e:
            raise self._write_failed(f"saving step {self.step}", e) from None
        self.out.prune(self.step)
        return written

    def _write_failed(self, doing: str, e: GGTrainError | OSError) -> GGTrainError:
        what = str(e) if isinstance(e, GGTrainError) else f"{e.filename or self.out.outdir}: {e.strerror or e}"
        return GGTrainError(f"{doing} failed: {what}; {self.out.resume_hint()}")

    def log(self, record: dict[str, Any]) -> None:
        try:
            with open(self.out.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise self._write_failed(f"logging step {record.get('step')}", e) from None
        self._count(record)

    def _count(self, record: dict[str, Any]) -> None:
        self.logged["tokens"] += int(record.get("tokens", 0))
        self.logged["trained_tokens"] += int(record.get("trained_tokens", 0))
        self.logged["loss"] = record.get("loss", self.logged["loss"])

    def trim_log(self) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be run again)."""
        if not self.out.log.exists():
            return
        keep = []
        for line in self.out.log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(rec.get("step", 0)) <= self.step:
                keep.append(line)
                self._count(rec)
        data = ("\n".join(keep) + "\n" if keep else "").encode()
        atomic_write(self.out.log, lambda f: f.write(data))

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, signals: _Signals | None = None) -> StepResult:
        """One optimizer step. Raises Interrupted (data position rewound) at a second Ctrl-C, Diverged
        (data position rewound, weights untouched) for a non-finite loss or gradient."""
        # Overflow is caught as a non-finite loss or gradient below, with a message saying what to
        # do: numpy's warnings on the way there would only bury it.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._run_step(signals)

    def _run_step(self, signals: _Signals | None) -> StepResult:
        t0 = time.perf_counter()
        start_pos = self.train.state()
        batches = [self.train.next() for _ in range(self.cfg.grad_acc)]
        epoch = batches[0].epoch
        n_trained = sum(b.n_trained for b in batches)
        tokens = sum(b.tokens.size for b in batches)
        self.grads.flat[...] = 0.0
        loss_sum = 0.0
        try:
            for bi, b in enumerate(batches):
                pending = b.split(self.micro)
                while pending:
                    if signals is not None:
                        signals.check()
                    mb = pending.pop(0)
                    n_mb = mb.n_trained
                    self.monitor.reset_window()
                    if n_mb:
                        # Dropout's seed: the run's, then (step, batch, row): resumable and deterministic.
                        row = mb.index - b.index
                        seed = np.random.SeedSequence(self.cfg.seed, spawn_key=(self.step, bi, row))
                        loss, state = self.model.forward(to_model_batch(mb), train=True,
                                                         checkpointing=self.cfg.checkpointing, step_seed=seed,
                                                         keep_ffn=self.keep_ffn)
                        weight = n_mb / n_trained
                        self.model.backward(state, self.grads, dloss=weight)
                        del state
                        loss_sum += loss * n_mb
                    if self._maybe_shrink():  # the rest of the batch in smaller micro-batches
                        pending = [p for rest in pending for p in rest.split(self.micro)]
            if signals is not None:  # the last chance to drop the step: before the update
                signals.check()
        except Interrupted:
            self.train.load_state(start_pos)  # the step did not happen
            raise
        grad_norm = clip_grad_norm({"lora": self.grads.flat}, self.cfg.grad_clip) if self.cfg.grad_clip > 0 \
            else float(np.linalg.norm(self.grads.flat))
        mean = loss_sum / n_trained if n_trained else 0.0
        if not (math.isfinite(mean) and math.isfinite(grad_norm)):
            self.train.load_state(start_pos)  # the weights are the last good step's: resume from here
            raise Diverged(self.step + 1, mean, grad_norm)
        lr = self.schedule(self.step + 1)
        if n_trained:
            self.opt.step({"lora": self.grads.flat}, lr=lr)
        self.step += 1
        self.micro_log.append(self.micro)
        return StepResult(self.step, epoch, loss_sum / n_trained if n_trained else float("nan"), lr,
                          grad_norm, tokens, n_trained, time.perf_counter() - t0, self.micro)

    def _maybe_shrink(self) -> bool:
        """Near the memory limit: continue without the FFN outputs an "auto" checkpoint keeps, or else
        with the next smaller micro-batch (same step, same result either way). True when it did."""
        # "near": RSS has entered the estimate's safety margin, i.e. the run uses more than the
        # estimate's parts allow at this limit (so a run at its estimate does not shrink)
        if self.monitor.limit is None or not self.monitor.near_limit(1 / (1 + SAFETY_FRACTION)):
            return False
        if self.keep_ffn and self.cfg.checkpoint_ffn == "auto":  # first the outputs kept for speed only
            self.echo(f"memory: RSS {format_bytes(self.monitor.window_peak)} is near --mem-limit "
                      f"{format_bytes(self.monitor.limit)}; the checkpoints no longer keep the FFN's outputs")
            self.keep_ffn = False
            return True
        smaller = smaller_micro_batch(self.cfg.batch, self.micro)
        if smaller is None:
            return False
        self.echo(f"memory: RSS {format_bytes(self.monitor.window_peak)} is near --mem-limit "
                  f"{format_bytes(self.monitor.limit)}; micro-batch {self.micro} -> {smaller}")
        self.micro = smaller
        return True

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Mean loss over every trained token of the validation data."""
        if self.val is None:
            return None
        self.last_val = mean_loss(self.model, self.val.epoch_batches(0), self.micro)
        return self.last_val

    def evaluate(self) -> dict[str, Any]:
        """The validation loss and the sample prompts' continuations, as log fields (printed too)."""
        rec: dict[str, Any] = {}
        if self.val is not None:
            rec["val_loss"] = self.validate()
        if self.samples is not None:
            rec["samples"] = self.samples(self.model)
            for smp in rec["samples"]:
                self.echo(f"sample at step {self.step}: {json.dumps(smp['prompt'], ensure_ascii=False)} -> "
                          f"{json.dumps(smp['text'], ensure_ascii=False)}")
        return rec

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, progress: Any = None) -> str:
        """Train to the end (or an interrupt). Returns "done" or "interrupted"."""
        cfg = self.cfg
        self.monitor.start()
        ema: float | None = None
        self.signals = signals = _Signals(self._saved_status)
        try:
            with signals:
                while self.step < self.total_steps:
                    try:
                        r = self.run_step(signals)
                    except Interrupted as e:  # second press mid-step: the data position was rewound
                        return self._stop(e.signum)
                    except Diverged as e:
                        return self._diverged(e)
                    ema = r.loss if ema is None else 0.9 * ema + 0.1 * r.loss
                    self.ema = ema
                    rec = {"step": r.step, "epoch": r.epoch + 1, "loss": r.loss, "lr": r.lr,
                           "grad_norm": r.grad_norm, "tokens": r.tokens, "trained_tokens": r.trained,
                           "seconds": r.seconds, "tokens_per_s": r.tokens / r.seconds,
                           "rss_bytes": self.monitor.rss, "peak_rss_bytes": self.monitor.peak,
                           "micro_batch": r.micro_batch}
                    if cfg.eval_every and r.step % cfg.eval_every == 0:
                        rec.update(self.evaluate())
                    self.log(rec)
                    if progress is not None:
                        progress(r, ema, self)
                    if signals.received is not None and self.step < self.total_steps:  # a whole step
                        return self._stop(signals.received)
                    if cfg.save_every and r.step % cfg.save_every == 0 and r.step < self.total_steps:
                        self._save(signals)
                if (self.val is not None or self.samples) and (not cfg.eval_every or self.step % cfg.eval_every):
                    self.log({"step": self.step, **self.evaluate()})
                self._save(signals)
                return "done"
        finally:
            self.monitor.stop()

    def _save(self, signals: _Signals) -> list[Path]:
        """save(), with Ctrl-C presses during it counted as 'still saving' rather than 'drop the step'."""
        signals.saving = True
        try:
            paths = self.save()
        finally:
            signals.saving = False
        self.saved = (self.step, self.out.checkpoints(self.step)[0])
        return paths

    def _saved_status(self) -> tuple[int, str]:
        """(current step, what is kept if the run quits now without saving) for the signal messages."""
        if self.saved is None:
            return self.step, "this run has saved nothing yet"
        saved_step, kept = self.saved
        lost = self.step - saved_step
        return self.step, f"the newest checkpoint is {kept} (step {saved_step})" + (
            f"; {lost} later step{'s' if lost != 1 else ''} would be lost" if lost else "")

    def _stop(self, signum: int) -> str:
        """A signal arrived: save at the current step boundary and report it."""
        self.interrupted_by = signum
        if self.saved is None or self.saved[0] != self.step:
            self.echo(f"saving a checkpoint at step {self.step} ...")
            paths = self._save(self.signals)
            self.echo("saved " + ", ".join(str(p) for p in paths))
        return "interrupted"

    def _diverged(self, e: Diverged) -> str:
        """A non-finite loss or gradient: keep the last good state (saved, if any step was done)."""
        self.diverged = e
        if self.step and (self.saved is None or self.saved[0] != self.step):
            self._save(self.signals)
        return "diverged"

def check_plan(trainer: Trainer, checkpoint_in: Path | None = None) -> None:
    """Refuse a run whose flags cannot be met by its data (before the first step): more batches a
    step than an epoch holds (--grad-acc), or a resumed run with no step left to take."""
    cfg, train = trainer.cfg, trainer.train
    rows, n = train.rows_in_epoch(0), train.steps_in_epoch(0)
    if rows == 0:
        raise GGTrainError(f"the training data gives no row to train at --ctx {train.ctx} (no window holds a "
                           "trained token)")
    if cfg.grad_acc > n:
        raise GGTrainError(f"--grad-acc {cfg.grad_acc} asks for {cfg.grad_acc} batches a step, but an epoch of the "
                           f"training data has {n} batch{'es' if n > 1 else ''} of --batch {cfg.batch} ({rows} "
                           f"rows of --ctx {train.ctx}): use --grad-acc {n} or less")
    if checkpoint_in is not None and trainer.step >= trainer.total_steps:
        raise GGTrainError(f"--checkpoint-in {checkpoint_in}: the checkpoint is at step {trainer.step}, and this "
                           f"run has {trainer.total_steps} steps, so there is nothing left to train (raise --epochs "
                           "or --adam-iter to train further)")
