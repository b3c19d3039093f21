"""The training loop: micro-batches, gradient accumulation, AdamW, checkpoints, signals, logs.

One optimizer step consumes `grad_acc` batches of `batch` rows. Each batch is run in micro-batches
of `micro` rows (chosen by the memory monitor); every micro-batch's gradient is weighted by its share
of the step's trained tokens, so the step's gradient is exactly that of the mean loss over all of
them whatever the micro-batch size. A step is all or nothing: an interrupt mid-step rewinds the data
position to the step's start before the checkpoint is written, so a resumed run repeats that step
and continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ggtrain.adapter import write_gguf_adapter
from ggtrain.atomic import atomic_write
from ggtrain.checkpoint import Checkpoint, model_fingerprint, save_checkpoint
from ggtrain.dataset import Batch as DataBatch
from ggtrain.dataset import Batches
from ggtrain.errors import GGTrainError
from ggtrain.lora import LoraConfig, LoraWeights
from ggtrain.memory import MemoryMonitor, choose_micro_batch, format_bytes
from ggtrain.model import Batch, Model
from ggtrain.optim import AdamW, Schedule, clip_grad_norm

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class TrainConfig:
    """Every setting of a run that the checkpoint records (JSON-able)."""

    epochs: int = 1
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
    save_every: int = 10  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    seed: int = 42
    mem_limit: int = 0  # bytes (0: no limit)
    lora: dict[str, Any] = field(default_factory=dict)  # LoraConfig.to_dict()


@dataclass
class OutputPaths:
    """Where a run writes. ITERATION in a name becomes the step number, and every save also writes
    the LATEST copy (llama.cpp finetune's convention)."""

    outdir: Path
    lora_out: str = "ggml-lora-ITERATION-f32.gguf"
    checkpoint_out: str = "checkpoint-ITERATION.npz"
    adapter_dtype: str = "f32"

    def _names(self, pattern: str, step: int) -> list[Path]:
        p = Path(pattern)
        p = p if p.is_absolute() else self.outdir / p
        if "ITERATION" not in p.name:
            return [p]
        return [p.with_name(p.name.replace("ITERATION", str(step))),
                p.with_name(p.name.replace("ITERATION", "LATEST"))]

    def adapters(self, step: int) -> list[Path]:
        return self._names(self.lora_out, step)

    def checkpoints(self, step: int) -> list[Path]:
        return self._names(self.checkpoint_out, step)

    @property
    def log(self) -> Path:
        return self.outdir / "train_log.jsonl"


class Interrupted(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrived; the trainer saves and exits."""

    def __init__(self, signum: int):
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks between micro-batches (a step is never half-saved)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)

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
        step = micro or b.n_rows
        for r in range(0, b.n_rows, step):
            mb = DataBatch(*(a[r:r + step] for a in (b.tokens, b.targets, b.mask, b.positions, b.segments)))
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


class Trainer:
    """Runs training of `model.trainable` on `train` batches; see the module docstring."""

    def __init__(self, model: Model, lora: LoraWeights, train: Batches, val: Batches | None,
                 cfg: TrainConfig, out: OutputPaths, echo: Callable[[str], None] = print):
        self.model, self.lora, self.train, self.val, self.cfg, self.out = model, lora, train, val, cfg, out
        self.echo = echo
        model.trainable = lora
        self.grads = lora.zeros_like()
        self.opt = AdamW({"lora": lora.flat}, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         weight_decay=cfg.weight_decay)
        self.step = 0
        self.total_steps = self._plan_steps()
        decay = cfg.cos_decay_steps if cfg.cos_decay_steps >= 0 else self.total_steps
        self.schedule = Schedule(lr=cfg.lr, warmup=cfg.warmup, cos_decay_steps=decay,
                                 cos_decay_min=cfg.cos_decay_min)
        self.micro = cfg.micro_batch or cfg.batch
        self.monitor = MemoryMonitor(cfg.mem_limit or None)
        self.fingerprint = model_fingerprint(model.mf)
        self.last_val: float | None = None
        self.micro_log: list[int] = []  # micro-batch used at each step (tests, logs)
        self.interrupted_by: int | None = None  # the signal that stopped fit()

    # -- planning ------------------------------------------------------------------------------
    def _plan_steps(self) -> int:
        """Optimizer steps of the whole run: epochs of batches, grad_acc batches a step, capped."""
        batches = self.train.total_steps(self.cfg.epochs)
        steps = math.ceil(batches / self.cfg.grad_acc)
        if self.cfg.max_steps >= 0:
            steps = min(steps, self.cfg.max_steps)
        return steps

    def choose_micro_batch(self, hp: Any, lora_config: LoraConfig, ctx: int, file_bytes: int) -> int:
        """The largest micro-batch that fits cfg.mem_limit (refusing a limit nothing fits in)."""
        if self.cfg.micro_batch:
            self.micro = self.cfg.micro_batch
        elif self.cfg.mem_limit:
            self.micro = choose_micro_batch(self.cfg.batch, self.cfg.mem_limit, hp, lora_config, ctx,
                                            self.cfg.checkpointing, file_bytes)
        return self.micro

    # -- state ---------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(lora=self.lora, optimizer=self.opt.state_dict(), step=self.step,
                          epoch=self.train.epoch, data_position=self.train.state(),
                          config=asdict(self.cfg), base_fingerprint=self.fingerprint,
                          base_name=self.model.mf.path.name)

    def restore(self, ck: Checkpoint) -> None:
        if ck.lora.layout != self.lora.layout:
            raise GGTrainError("the checkpoint's LoRA layout (targets, ranks) differs from this run's flags; "
                               "resume with the same --lora-r/--rank-* settings")
        self.lora.flat[...] = ck.lora.flat
        opt_state = dict(ck.optimizer)
        self.opt.load_state_dict(opt_state)
        self.opt.t = int(opt_state.get("t", ck.step))
        self.step = ck.step
        self.train.load_state(ck.data_position)

    def save(self) -> list[Path]:
        """Checkpoint and adapter for the current step (atomic writes; earlier files stay intact)."""
        written = []
        ck = self.checkpoint()
        for p in self.out.checkpoints(self.step):
            written.append(save_checkpoint(p, ck))
        meta = {"training.steps": self.step, "training.epochs": self.train.epoch}
        for p in self.out.adapters(self.step):
            written.append(write_gguf_adapter(p, self.lora, self.model.mf, dtype=self.out.adapter_dtype,
                                              extra_meta=meta))
        return written

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
        data = ("\n".join(keep) + "\n" if keep else "").encode()
        atomic_write(self.out.log, lambda f: f.write(data))

    # -- one step ------------------------------------------------------------------------------
    def _micro_sizes(self) -> list[int]:
        """Divisors of the batch, largest first: the micro-batches the monitor may fall back to."""
        b = self.cfg.batch
        return [k for k in range(b, 0, -1) if b % k == 0]

    def run_step(self, signals: _Signals | None = None) -> StepResult:
        """One optimizer step. Raises Interrupted (data position rewound) when a signal arrived."""
        t0 = time.perf_counter()
        start_pos = self.train.state()
        batches = [self.train.next() for _ in range(self.cfg.grad_acc)]
        epoch = batches[0].epoch
        n_trained = sum(b.n_trained for b in batches)
        tokens = sum(b.tokens.size for b in batches)
        self.grads.flat[...] = 0.0
        loss_sum = 0.0
        step_seed = (self.cfg.seed * 1_000_003 + self.step) & 0x7FFFFFFF
        try:
            for bi, b in enumerate(batches):
                row = 0
                while row < b.n_rows:
                    if signals is not None:
                        signals.check()
                    mb = DataBatch(*(a[row:row + self.micro] for a in
                                     (b.tokens, b.targets, b.mask, b.positions, b.segments)))
                    n_mb = mb.n_trained
                    self.monitor.reset_window()
                    if n_mb:
                        loss, state = self.model.forward(to_model_batch(mb), train=True,
                                                         checkpointing=self.cfg.checkpointing,
                                                         step_seed=step_seed + 7919 * (bi * 65536 + row))
                        weight = n_mb / n_trained
                        self.model.backward(state, self.grads, dloss=weight)
                        del state
                        loss_sum += loss * n_mb
                    row += mb.n_rows
                    self._maybe_shrink()
        except Interrupted:
            self.train.load_state(start_pos)  # the step did not happen
            raise
        grad_norm = clip_grad_norm({"lora": self.grads.flat}, self.cfg.grad_clip) if self.cfg.grad_clip > 0 \
            else float(np.linalg.norm(self.grads.flat))
        lr = self.schedule(self.step + 1)
        if n_trained:
            self.opt.step({"lora": self.grads.flat}, lr=lr)
        self.step += 1
        self.micro_log.append(self.micro)
        return StepResult(self.step, epoch, loss_sum / n_trained if n_trained else float("nan"), lr,
                          grad_norm, tokens, n_trained, time.perf_counter() - t0, self.micro)

    def _maybe_shrink(self) -> None:
        """Near the memory limit: continue with the next smaller micro-batch (same step, same result)."""
        if self.monitor.limit is None or not self.monitor.near_limit():
            return
        smaller = [k for k in self._micro_sizes() if k < self.micro]
        if smaller:
            self.echo(f"memory: RSS {format_bytes(self.monitor.window_peak)} is near --mem-limit "
                      f"{format_bytes(self.monitor.limit)}; micro-batch {self.micro} -> {smaller[0]}")
            self.micro = smaller[0]

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> float | None:
        """Mean loss over every trained token of the validation data."""
        if self.val is None:
            return None
        self.last_val = mean_loss(self.model, self.val.epoch_batches(0), self.micro)
        return self.last_val

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, progress: Any = None) -> str:
        """Train to the end (or an interrupt). Returns "done" or "interrupted"."""
        cfg = self.cfg
        self.monitor.start()
        ema: float | None = None
        try:
            with _Signals() as signals:
                while self.step < self.total_steps:
                    try:
                        r = self.run_step(signals)
                    except Interrupted as e:  # mid-step: the data position was rewound
                        return self._stop(e.signum)
                    ema = r.loss if ema is None else 0.9 * ema + 0.1 * r.loss
                    rec = {"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr,
                           "grad_norm": r.grad_norm, "tokens": r.tokens, "trained_tokens": r.trained,
                           "seconds": r.seconds, "tokens_per_s": r.tokens / r.seconds,
                           "rss_bytes": self.monitor.rss, "peak_rss_bytes": self.monitor.peak,
                           "micro_batch": r.micro_batch}
                    if cfg.eval_every and r.step % cfg.eval_every == 0 and self.val is not None:
                        rec["val_loss"] = self.validate()
                    self.log(rec)
                    if progress is not None:
                        progress(r, ema, self)
                    if cfg.save_every and r.step % cfg.save_every == 0 and r.step < self.total_steps:
                        self.save()
                    if signals.received is not None:  # arrived during the update: the step is whole
                        return self._stop(signals.received)
        finally:
            self.monitor.stop()
        if self.val is not None and (not cfg.eval_every or self.step % cfg.eval_every):
            v = self.validate()
            self.log({"step": self.step, "val_loss": v})
        self.save()
        return "done"

    def _stop(self, signum: int) -> str:
        """A signal arrived: save at the current step boundary and report it."""
        self.interrupted_by = signum
        self.echo(f"\n{signal.Signals(signum).name} received: saving a checkpoint at step {self.step}")
        paths = self.save()
        self.echo("saved " + ", ".join(str(p) for p in paths))
        return "interrupted"


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
