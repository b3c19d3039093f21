"""`ggtrain finetune`: train a LoRA adapter on a quantized GGUF model, with llama.cpp finetune's flags."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import click
from ggtrain.cli.dataflags import data_options, data_options_from
from ggtrain.cli.options import (
    BATCH_MAX,
    EPOCHS_MAX,
    EPOCHS_REFUSALS,
    THREADS_MAX,
    Command,
    Float,
    Int,
    PathType,
    Size,
    Text,
    toml_types,
)

from ggtrain.errors import GGTrainError

RANK_FLAGS = {  # llama.cpp finetune flag -> LoRA target
    "rank_wq": "attn_q", "rank_wk": "attn_k", "rank_wv": "attn_v", "rank_wo": "attn_output",
    "rank_ffn_gate": "ffn_gate", "rank_ffn_up": "ffn_up", "rank_ffn_down": "ffn_down",
    "rank_output": "output",
}


def load_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--config FILE.toml: its keys (flag names, with - or _) become the defaults of every option.

    Each value goes through its option's own type, as a typed flag would, and must already have the
    TOML type that option takes: `lora-r = 4.5` or `lora-r = "8"` is refused, not read as 4 or 8.
    """
    if value is None:
        return None
    import tomllib

    try:
        data = tomllib.loads(value.read_bytes().decode("utf-8"))
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{value}: not a TOML file (not UTF-8 text: bad byte at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML: {e}") from None
    known = {p.name: p for p in ctx.command.params}
    aliases = {opt.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params
               for opt in getattr(p, "opts", []) if opt.startswith("--")}
    defaults: dict[str, Any] = {}
    for key, v in data.items():
        name = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in known or name == "config":
            raise click.BadParameter(f"{value}: unknown setting '{key}' (use the long flag names, "
                                     "e.g. lora-r = 8)")
        defaults[name] = _config_value(value, key, v, known[name], ctx)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


_WANTED = {(bool,): "true or false", (int,): "an integer", (int, float): "a number", (str,): "a string",
           (str, int): "a size (a string such as \"6G\", or a number of bytes)"}
_TOML_KIND = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", dict: "a table",
              list: "an array"}


def _config_value(path: Path, key: str, v: Any, param: click.Parameter, ctx: click.Context) -> Any:
    """v from the config file, checked as the option's type checks what is typed on the command line."""
    want = toml_types(param)
    shown = _toml_repr(v)
    if isinstance(v, bool) != (bool in want) or not isinstance(v, want):
        got = _TOML_KIND.get(type(v), f"a {type(v).__name__}")
        raise click.BadParameter(f"{path}: {key} = {shown}: expected {_WANTED.get(want, want)}, not {got}")
    if isinstance(param, click.Option) and param.is_flag:
        return v
    try:
        param.type.convert(v, param, ctx)
    except click.BadParameter as e:
        raise click.BadParameter(f"{path}: {key} = {shown}: {e.message}") from None
    return v  # click converts the default again when it takes it


def _toml_repr(v: Any) -> str:
    s = ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


@click.command(cls=Command)
@click.option("--config", type=PathType(exists=True, dir_okay=False, path_type=Path), is_eager=True,
              expose_value=False, callback=load_config,
              help="TOML file whose keys set any of these options (flags on the command line win).")
@click.option("-m", "--model", "--model-base", "model_path", type=PathType(dir_okay=False, path_type=Path),
              help="Base model GGUF, any supported quantization (default: the bundled Gemma 3 270M Q4_K_M).")
@data_options
@click.option("--outdir", type=PathType(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Directory for adapters, checkpoints and train_log.jsonl.")
@click.option("--lora-out", type=Text(), default="ggml-lora-ITERATION-f32.gguf", show_default=True,
              help="Adapter file name (relative to --outdir); ITERATION becomes the step number and a "
                   "LATEST copy is kept beside it.")
@click.option("--lora-out-type", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="Tensor type of the written adapter.")
@click.option("--checkpoint-out", type=Text(), default="checkpoint-ITERATION.npz", show_default=True,
              help="Checkpoint file name (relative to --outdir); ITERATION and LATEST as for --lora-out.")
@click.option("--checkpoint-in", type=PathType(dir_okay=False, path_type=Path), default=None,
              help="Resume from this checkpoint (LoRA, optimizer, step and data position).")
@click.option("--save-every", type=Int(min=0), default=10, show_default=True,
              help="Save a checkpoint and adapter every N steps (0: only at the end).")
@click.option("--epochs", type=Int(min=1, max=EPOCHS_MAX, refusals=EPOCHS_REFUSALS), default=1, show_default=True,
              help="Passes over the training data.")
@click.option("--adam-iter", "max_steps", type=Int(min=1, also={-1: "no limit"}), default=-1, show_default=True,
              help="Stop after this many optimizer steps (-1: no limit; --epochs decides).")
@click.option("-b", "--batch", "--batch-size", "batch", type=Int(min=1, max=BATCH_MAX), default=4, show_default=True,
              help="Rows of --ctx tokens per batch.")
@click.option("--grad-acc", type=Int(min=1), default=1, show_default=True,
              help="Batches accumulated per optimizer step (effective batch = --batch x --grad-acc).")
@click.option("--micro-batch", type=Int(min=0, max=BATCH_MAX), default=0, show_default=True,
              help="Rows per forward/backward pass (0: the largest that fits --mem-limit). Results do not "
                   "depend on it.")
@click.option("--mem-limit", type=Size(), default=None, metavar="SIZE",
              help="Memory the run may use, e.g. 6G or 1500M (default: a safe share of available RAM). "
                   "The micro-batch is chosen to fit, and shrunk if RSS nears the limit.")
@click.option("-t", "--threads", type=Int(min=1, max=THREADS_MAX), default=None,
              help="Threads for every kernel (default: physical cores).")
@click.option("--lora-r", type=Int(min=1), default=8, show_default=True,
              help="LoRA rank of every adapted projection.")
@click.option("--lora-alpha", type=Float(min=0, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha: the update is scaled by alpha / rank.")
@click.option("--lora-dropout", type=Float(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Dropout on the LoRA branch's input (PEFT's lora_dropout).")
@click.option("--rank-wq", type=Int(min=0), default=None, help="Rank for attn_q (0: not trained).")
@click.option("--rank-wk", type=Int(min=0), default=None, help="Rank for attn_k (0: not trained).")
@click.option("--rank-wv", type=Int(min=0), default=None, help="Rank for attn_v (0: not trained).")
@click.option("--rank-wo", type=Int(min=0), default=None,
              help="Rank for attn_output (0: not trained).")
@click.option("--rank-ffn-gate", type=Int(min=0), default=None,
              help="Rank for ffn_gate (0: not trained).")
@click.option("--rank-ffn-up", type=Int(min=0), default=None, help="Rank for ffn_up (0: not trained).")
@click.option("--rank-ffn-down", type=Int(min=0), default=None,
              help="Rank for ffn_down (0: not trained).")
@click.option("--rank-output", type=Int(min=0), default=None,
              help="Rank for the output head (llama.cpp's --rank-out); only 0 for now: training a LoRA on "
                   "the head is not supported yet.")
# --learning-rate and --adam-decay at most 1: AdamW's decoupled decay scales the weights by 1 - lr·decay
# every step, which must stay in [0, 1]; an Adam step moves every weight by about lr.
@click.option("--learning-rate", "--adam-alpha", "lr", type=Float(0, 1), default=2e-4,
              show_default=True, help="Peak learning rate of AdamW (llama.cpp's finetune used 1e-3, which "
                                      "overfits small data sets within a few epochs).")
@click.option("--adam-beta1", type=Float(0, 1, max_open=True), default=0.9, show_default=True,
              help="AdamW beta1.")
@click.option("--adam-beta2", type=Float(0, 1, max_open=True), default=0.999, show_default=True,
              help="AdamW beta2.")
@click.option("--adam-eps", type=Float(0, 1, min_open=True), default=1e-8, show_default=True, help="AdamW epsilon.")
@click.option("--adam-decay", type=Float(0, 1), default=0.0, show_default=True,
              help="AdamW (decoupled) weight decay.")
@click.option("--adam-gclip", type=Float(min=0), default=1.0, show_default=True,
              help="Clip the gradient's global norm to this (0: no clipping).")
@click.option("--warmup", type=Int(min=0), default=0, show_default=True,
              help="Steps of linear learning-rate warmup.")
@click.option("--cos-decay-steps", type=Int(min=0, also={-1: "the whole run"}), default=-1, show_default=True,
              help="Steps of cosine decay after warmup (-1: the whole run, 0: constant rate).")
@click.option("--cos-decay-min", type=Float(0, 1), default=0.1, show_default=True,
              help="Learning-rate multiplier at the end of the cosine decay.")
@click.option("--use-checkpointing/--no-checkpointing", "checkpointing", default=True, show_default=True,
              help="Gradient checkpointing: keep only each block's input and recompute in backward "
                   "(less memory, ~30% more compute).")
@click.option("--eval-every", type=Int(min=0), default=0, show_default=True,
              help="Validation loss every N steps (0: at the end only); needs --val-data or --val-split.")
def finetune(model_path: Path | None, outdir: Path, lora_out: str, lora_out_type: str, checkpoint_out: str,
             checkpoint_in: Path | None, save_every: int, epochs: int, max_steps: int, batch: int,
             grad_acc: int, micro_batch: int, mem_limit: int | None, threads: int | None, lora_r: int,
             lora_alpha: float, lora_dropout: float, lr: float, adam_beta1: float, adam_beta2: float,
             adam_eps: float, adam_decay: float, adam_gclip: float, warmup: int, cos_decay_steps: int,
             cos_decay_min: float, checkpointing: bool, eval_every: int, **kw: Any) -> None:
    """Fine-tune a LoRA adapter on a quantized GGUF model.

    The base stays in its GGUF type; the adapter is written in llama.cpp's GGUF LoRA format
    (llama-cli --lora ADAPTER). Ctrl-C or SIGTERM saves a checkpoint; --checkpoint-in resumes it.
    """
    # Heavy imports (Numba kernels) here, so `ggtrain --help` stays quick.
    from tqdm import tqdm

    from ggtrain.arch import read_hparams
    from ggtrain.atomic import OutdirLock, check_writable
    from ggtrain.checkpoint import load_checkpoint
    from ggtrain.dataset import load_batches
    from ggtrain.defaults import default_model_path
    from ggtrain.lora import DEFAULT_TARGETS, LoraConfig, LoraWeights, target_shapes
    from ggtrain.memory import check_fits, default_mem_limit, format_bytes
    from ggtrain.model import Model
    from ggtrain.modelfile import ModelFile
    from ggtrain.threads import default_threads, set_threads
    from ggtrain.tokenizer import Tokenizer
    from ggtrain.trainer import OutputPaths, TrainConfig, Trainer, check_plan

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    opts = data_options_from(kw)
    if opts.train_data is None:
        raise GGTrainError("--train-data FILE is required (see `ggtrain data --help` for the formats)")
    if batch % (micro_batch or batch):
        raise GGTrainError(f"--micro-batch {micro_batch} must divide --batch {batch}")

    # Outputs first: an unwritable --outdir fails now, not after an hour of training.
    check_writable(outdir, need_bytes=16 << 20)
    lock = OutdirLock(outdir).acquire()
    n_threads = set_threads(threads or default_threads())

    t0 = time.perf_counter()
    path = model_path or default_model_path()
    mf = ModelFile(path)
    hp = read_hparams(mf)

    # The LoRA settings and the memory a step needs are checked before anything big is allocated
    # (the model's buffers, the data, the LoRA weights): a rank or --ctx far too big fails at once.
    ranks = {RANK_FLAGS[k]: kw.pop(k) for k in list(RANK_FLAGS) if kw.get(k) is not None}
    for k in RANK_FLAGS:
        kw.pop(k, None)
    if kw:
        raise AssertionError(f"unhandled options {sorted(kw)}")
    if ranks.get("output"):
        raise GGTrainError("--rank-output: training a LoRA on the output head is not supported yet (use 0)")
    lcfg = LoraConfig.make(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=DEFAULT_TARGETS, ranks=ranks)
    limit = mem_limit or default_mem_limit()
    check_fits(batch, micro_batch, limit, hp, lcfg, opts.ctx, checkpointing, path.stat().st_size,
               limit_given=mem_limit is not None, threads=n_threads)

    model = Model(mf, hp)
    tok = Tokenizer.from_model_file(mf)
    train, val, prep = load_batches(opts, tok, batch, mf)
    if not prep.train.samples:
        raise GGTrainError(f"{opts.train_data}: no usable training samples")
    # The vocabulary and the samples live as long as the run: keep full garbage collections,
    # triggered by every step's array allocations, from walking them again and again.
    gc.collect()
    gc.freeze()

    shapes = target_shapes(mf.tensors, lcfg, hp.n_layer, source=str(path))
    lora = LoraWeights.init(lcfg, shapes, seed=opts.seed)

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch=batch, grad_acc=grad_acc, micro_batch=micro_batch,
                      lr=lr, beta1=adam_beta1, beta2=adam_beta2, eps=adam_eps, weight_decay=adam_decay,
                      grad_clip=adam_gclip, warmup=warmup, cos_decay_steps=cos_decay_steps,
                      cos_decay_min=cos_decay_min, checkpointing=checkpointing, save_every=save_every,
                      eval_every=eval_every, seed=opts.seed, mem_limit=limit, lora=lcfg.to_dict())
    out = OutputPaths(outdir, lora_out, checkpoint_out, lora_out_type)
    trainer = Trainer(model, lora, train, val, cfg, out, echo=say)
    micro = trainer.choose_micro_batch(hp, lcfg, opts.ctx, path.stat().st_size)

    if checkpoint_in is not None:
        ck = load_checkpoint(checkpoint_in, base=mf)
        trainer.restore(ck)
        trainer.trim_log()
        say(f"resuming from {checkpoint_in} at step {trainer.step} (epoch {train.epoch})")
    elif out.log.exists():
        out.log.unlink()  # a fresh run: a fresh log
    check_plan(trainer, checkpoint_in)  # --grad-acc beyond the data, a resume with nothing left to do

    n_params = lora.n_params
    say(f"model: {path.name} ({hp.arch}, {hp.n_layer} layers, {format_bytes(path.stat().st_size)}), "
        f"loaded in {time.perf_counter() - t0:.1f} s")
    say(f"data: {len(prep.train.samples)} samples, {prep.train.n_tokens} tokens, {prep.train.n_trained} trained; "
        f"{train.rows_in_epoch(0)} rows of {opts.ctx} per epoch"
        + (f"; validation {len(prep.val.samples)} samples" if prep.val is not None else ""))
    say(f"lora: r {lora_r}, alpha {lora_alpha:g} on {', '.join(lcfg.targets)}: {n_params:,} parameters")
    say(f"training: {trainer.total_steps} steps, batch {batch} x grad-acc {grad_acc}, micro-batch {micro}, "
        f"{n_threads} threads, memory limit {format_bytes(limit)}")

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=None)
    tok_rate: list[float] = []

    def progress(r: Any, ema: float, tr: Trainer) -> None:
        tok_rate.append(r.tokens / r.seconds)
        post = {"epoch": r.epoch + 1, "loss": f"{ema:.4f}", "tok/s": f"{r.tokens / r.seconds:.0f}",
                "rss": format_bytes(tr.monitor.rss)}
        if tr.last_val is not None:
            post["val"] = f"{tr.last_val:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if bar.disable:  # no terminal: one line a step instead of a bar
            say(f"step {r.step}/{tr.total_steps} epoch {r.epoch + 1} loss {r.loss:.4f} lr {r.lr:.2e} "
                f"tok/s {r.tokens / r.seconds:.0f} rss {format_bytes(tr.monitor.rss)}")

    try:
        status = trainer.fit(progress)
    finally:
        bar.close()
        lock.release()
    adapter = out.adapters(trainer.step)[-1]
    if status != "done":
        sig = trainer.interrupted_by or 2
        say(f"stopped at step {trainer.step}; resume with --checkpoint-in {out.checkpoints(trainer.step)[-1]}")
        sys.exit(128 + sig)

    click.echo(f"done: {trainer.step} steps, final training loss {last_logged_loss(out.log)}"
               + (f", validation loss {trainer.last_val:.4f}" if trainer.last_val is not None else ""))
    click.echo(f"adapter:    {adapter}")
    click.echo(f"checkpoint: {out.checkpoints(trainer.step)[-1]}")
    click.echo(f"log:        {out.log}")
    click.echo("")
    click.echo("use it with llama.cpp:")
    click.echo(f"  llama-cli -m {path} --lora {adapter}")
    click.echo(f"  llama-server -m {path} --lora {adapter}     (or --lora-scaled {adapter}:0.5)")
    click.echo("or with Ollama (Modelfile):")
    click.echo(f"  FROM {path}")
    click.echo(f"  ADAPTER {adapter.resolve()}")


def last_logged_loss(log: Path) -> str:
    """The last step's training loss from train_log.jsonl, formatted."""
    import json

    last = None
    for line in log.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            last = rec["loss"]
    return f"{last:.4f}" if last is not None else "n/a"
