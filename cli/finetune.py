"""`ggtrain finetune`: train a LoRA adapter on a quantized GGUF model, with llama.cpp finetune's flags."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import click
from ggtrain.cli.common import (
    compute_option,
    model_option,
    open_model,
    start_threads,
    threads_option,
)
from ggtrain.cli.dataflags import data_options, data_options_from
from ggtrain.cli.options import (
    BATCH_MAX,
    EPOCHS_MAX,
    EPOCHS_REFUSALS,
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
    """v from the config file, checked as the option's type checks what is typed on the command line;
    a repeatable option (--sample-prompt) takes an array of such values, or one."""
    if isinstance(param, click.Option) and param.multiple:
        return [_config_value_one(path, key, x, param, ctx) for x in (v if isinstance(v, list) else [v])]
    return _config_value_one(path, key, v, param, ctx)


def _config_value_one(path: Path, key: str, v: Any, param: click.Parameter, ctx: click.Context) -> Any:
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
@model_option("--model-base")
@data_options
@click.option("--outdir", type=PathType(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Directory for adapters, checkpoints and train_log.jsonl.")
@click.option("--lora-out", type=Text(), default=None,
              help="Adapter file name (relative to --outdir); ITERATION becomes the step number and a "
                   "LATEST hard link to the newest is kept beside it. [default: "
                   "ggml-lora-ITERATION-TYPE.gguf, TYPE being --lora-out-type]")
@click.option("--lora-out-type", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="Tensor type of the written adapter.")
@click.option("--checkpoint-out", type=Text(), default="checkpoint-ITERATION.npz", show_default=True,
              help="Checkpoint file name (relative to --outdir); ITERATION and LATEST as for --lora-out.")
@click.option("--checkpoint-in", type=PathType(dir_okay=False, path_type=Path), default=None,
              help="Resume from this checkpoint (LoRA, optimizer, step and data position). A relative "
                   "name is looked up in --outdir first (as --checkpoint-out writes it), then in the "
                   "current directory; a LATEST name that does not exist yet starts a fresh run.")
@click.option("--save-every", type=Int(min=0), default=10, show_default=True,
              help="Save a checkpoint and adapter every N steps (0: only at the end).")
@click.option("--epochs", type=Int(min=1, max=EPOCHS_MAX, refusals=EPOCHS_REFUSALS), default=None,
              help="Passes over the training data [default: 1; with --adam-iter and no --epochs, no "
                   "limit: --adam-iter decides, as in llama.cpp's finetune].")
@click.option("--adam-iter", "max_steps", type=Int(min=1, also={-1: "no limit"}), default=-1, show_default=True,
              help="Optimizer steps to run, over as many epochs as that takes (-1: no limit; --epochs "
                   "decides).")
@click.option("-b", "--batch", "--batch-size", "batch", type=Int(min=1, max=BATCH_MAX), default=4, show_default=True,
              help="Rows of --ctx tokens per batch.")
@click.option("--grad-acc", type=Int(min=1), default=1, show_default=True,
              help="Batches accumulated per optimizer step (effective batch = --batch x --grad-acc).")
@click.option("--micro-batch", type=Int(min=0, max=BATCH_MAX), default=0, show_default=True,
              help="Rows per forward/backward pass (0: the largest that fits --mem-limit). Results do not "
                   "depend on it (under --compute bf16: to within bf16's rounding noise).")
@click.option("--mem-limit", type=Size(), default=None, metavar="SIZE",
              help="Memory the run may use, e.g. 6G or 1500M (default: a safe share of available RAM). "
                   "The micro-batch is chosen to fit, and shrunk if RSS nears the limit.")
@threads_option()
@compute_option()
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
              help="Gradient checkpointing: keep each block's input and its attn_output/ffn_down outputs "
                   "and recompute the rest in backward (less memory, ~20% more compute).")
@click.option("--checkpoint-ffn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="With checkpointing, also keep each block's ffn_gate and ffn_up outputs (2 x ctx x n_ff floats "
                   "a layer a row), so the recompute skips those products too (~7% less work a step, the same "
                   "gradients). auto: when the step still fits the memory limit at the chosen micro-batch (and "
                   "they are dropped first if RSS nears it); off: the smallest checkpoints.")
@click.option("--eval-every", type=Int(min=0), default=0, show_default=True,
              help="Validation loss (and --sample-prompt continuations) every N steps (0: at the end only); "
                   "needs --val-data, --val-split or --sample-prompt.")
@click.option("--sample-prompt", "sample_prompts", type=Text(), multiple=True, metavar="TEXT",
              help="At every --eval-every (and at the end), print a greedy continuation of TEXT by the adapter "
                   "being trained and write it to train_log.jsonl, to watch it learn. Repeatable.")
@click.option("--sample-tokens", type=Int(min=1, max=4096), default=32, show_default=True,
              help="Tokens of each --sample-prompt continuation.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace an earlier run's results in --outdir: its adapters, checkpoints and train_log.jsonl "
                   "are removed before the first step (without it, a new run there is refused).")
@click.option("--keep-checkpoints", type=Int(min=0), default=3, show_default=True,
              help="Keep the N newest ITERATION checkpoints and adapters, removing older ones after each save "
                   "(0: keep all). LATEST is always kept.")
@click.option("--lora-in", type=PathType(exists=True, path_type=Path), default=None, metavar="ADAPTER",
              help="Start from this adapter (a GGUF LoRA file or a PEFT directory): its targets, ranks, alphas "
                   "and values instead of a fresh LoRA (--lora-r, --lora-alpha and --rank-* then do not apply).")
@click.option("--ollama", "write_ollama", is_flag=True, default=False,
              help="At the end, write an Ollama Modelfile (FROM the base, ADAPTER the adapter, its stop "
                   "tokens) as Modelfile in --outdir, and print the `ollama create` line.")
def finetune(model_path: Path | None, outdir: Path, lora_out: str | None, lora_out_type: str, checkpoint_out: str,
             checkpoint_in: Path | None, save_every: int, epochs: int | None, max_steps: int, batch: int,
             grad_acc: int, micro_batch: int, mem_limit: int | None, threads: int | None, compute: str, lora_r: int,
             lora_alpha: float, lora_dropout: float, lr: float, adam_beta1: float, adam_beta2: float,
             adam_eps: float, adam_decay: float, adam_gclip: float, warmup: int, cos_decay_steps: int,
             cos_decay_min: float, checkpointing: bool, checkpoint_ffn: str, eval_every: int, sample_prompts: tuple[str, ...],
             sample_tokens: int, overwrite: bool, keep_checkpoints: int, lora_in: Path | None, write_ollama: bool,
             **kw: Any) -> None:
    """Fine-tune a LoRA adapter on a quantized GGUF model.

    The base stays in its GGUF type; the adapter is written in llama.cpp's GGUF LoRA format
    (llama-cli --lora ADAPTER). Ctrl-C or SIGTERM saves a checkpoint; --checkpoint-in resumes it.
    """
    # Heavy imports (Numba kernels) here, so `ggtrain --help` stays quick.
    from tqdm import tqdm

    from ggtrain import kernels
    from ggtrain.dataset.batches import load_batches
    from ggtrain.gguf.arch import read_hparams
    from ggtrain.model.lora import DEFAULT_TARGETS, LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import Model, resolve_matmul
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.train.checkpoint import load_checkpoint
    from ggtrain.train.memory import check_fits, default_mem_limit, format_bytes
    from ggtrain.train.outputs import OutputPaths, RunOutputs
    from ggtrain.train.trainer import TrainConfig, Trainer, check_plan, data_digest

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    opts = data_options_from(kw)
    if opts.train_data is None:
        raise GGTrainError("--train-data FILE is required (see `ggtrain data --help` for the formats)")
    if batch % (micro_batch or batch):
        raise GGTrainError(f"--micro-batch {micro_batch} must divide --batch {batch}")
    if epochs is None:
        epochs = None if max_steps >= 0 else 1  # llama.cpp's finetune: --adam-iter alone decides
    lora_out = lora_out or f"ggml-lora-ITERATION-{lora_out_type}.gguf"
    checkpoint_in = resolve_checkpoint_in(checkpoint_in, outdir, say)

    # Outputs first: an unwritable --outdir, or one holding an earlier run's results, fails now,
    # before anything is loaded. A run that fails before its first step leaves nothing behind.
    out = OutputPaths(outdir, lora_out, checkpoint_out, lora_out_type, keep=keep_checkpoints)
    fresh = checkpoint_in is None
    outputs = RunOutputs(out, fresh=fresh, resume_from=checkpoint_in, overwrite=overwrite)
    click.get_current_context().call_on_close(outputs.release)
    n_threads = start_threads(threads)

    t0 = time.perf_counter()
    path, mf = open_model(model_path)
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
    if lora_in is not None:  # the adapter decides the LoRA's shape: flags that would too are refused
        from ggtrain.adapters.load import starting_adapter

        src = click.get_current_context().get_parameter_source
        given = [f"--{n.replace('_', '-')}" for n in ("lora_r", "lora_alpha")
                 if src(n) not in (None, click.core.ParameterSource.DEFAULT)]
        given += [f"--{k.replace('_', '-')}" for k, t in RANK_FLAGS.items() if t in ranks]
        if given:
            raise GGTrainError(f"--lora-in {lora_in}: the adapter sets the targets, ranks and alpha; drop "
                               f"{', '.join(given)}")
        start, lcfg = starting_adapter(lora_in, mf, lora_dropout)
    else:
        lcfg = LoraConfig.make(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=DEFAULT_TARGETS, ranks=ranks)
    limit = mem_limit or default_mem_limit()
    mode, why = resolve_matmul(compute, training=True)
    check_fits(batch, micro_batch, limit, hp, lcfg, opts.ctx, checkpointing, path.stat().st_size,
               limit_given=mem_limit is not None, threads=n_threads, compute=mode,
               keep_ffn=checkpointing and checkpoint_ffn == "on")

    model = Model(mf, hp, matmul=mode)
    tok = Tokenizer.from_model_file(mf)
    notice = kernels.first_run_notice()
    if notice:
        say(notice)
    train, val, prep = load_batches(opts, tok, batch, mf)
    for n in prep.train.notes:  # which template was used, how the file was read
        say(f"note: {n}")
    if not prep.train.samples:
        raise GGTrainError(f"{opts.train_data}: no usable training samples")
    if eval_every and val is None and not sample_prompts:
        raise GGTrainError(f"--eval-every {eval_every}: there is no validation data; give --val-data FILE "
                           "or --val-split F (e.g. 0.1) or --sample-prompt TEXT, or drop --eval-every")
    # The vocabulary and the samples live as long as the run: keep full garbage collections,
    # triggered by every step's array allocations, from walking them again and again.
    gc.collect()
    gc.freeze()

    if lora_in is not None:
        lora = start
    else:
        shapes = target_shapes(mf.tensors, lcfg, hp.n_layer, source=str(path))
        for warning in rank_warnings(shapes, {t: spec.rank for t, spec in lcfg.targets.items()}):
            say(f"warning: {warning}")
        lora = LoraWeights.init(lcfg, shapes, seed=opts.seed)

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch=batch, grad_acc=grad_acc, micro_batch=micro_batch,
                      lr=lr, beta1=adam_beta1, beta2=adam_beta2, eps=adam_eps, weight_decay=adam_decay,
                      grad_clip=adam_gclip, warmup=warmup, cos_decay_steps=cos_decay_steps,
                      cos_decay_min=cos_decay_min, checkpointing=checkpointing,
                      checkpoint_ffn=checkpoint_ffn, save_every=save_every,
                      eval_every=eval_every, seed=opts.seed, mem_limit=limit, lora=lcfg.to_dict(),
                      ctx=opts.ctx, train_data=str(opts.train_data), data_digest=data_digest(opts.train_data),
                      compute=mode)
    samples = None
    if sample_prompts:
        from ggtrain.generate.preview import sample_fn

        samples = sample_fn(tok, sample_prompts, sample_tokens)
    trainer = Trainer(model, lora, train, val, cfg, out, echo=say, samples=samples)
    micro = trainer.choose_micro_batch(hp, lcfg, opts.ctx, path.stat().st_size)

    if not fresh:
        ck = load_checkpoint(checkpoint_in, base=mf)
        changed = trainer.resume_differences(ck, str(checkpoint_in))
        trainer.restore(ck, checkpoint_in)
        trainer.trim_log()
        say(f"resuming from {checkpoint_in} at step {trainer.step} (epoch {train.epoch + 1})")
        for c in changed:
            say(f"note: resuming with {c}")
    check_plan(trainer, checkpoint_in)  # --grad-acc beyond the data, a resume with nothing left to do
    # Room for the largest save, now that the LoRA's size is known (the step's buffers are not
    # allocated yet); then --overwrite removes the earlier run's files, so nothing of it mixes in.
    outputs.check_space(lora.layout, trainer.step, trainer.total_steps, save_every)
    outputs.clear()

    n_params = lora.n_params
    say(f"model: {path.name} ({hp.arch}, {hp.n_layer} layers, {format_bytes(path.stat().st_size)}), "
        f"loaded in {time.perf_counter() - t0:.1f} s")
    say(f"data: {len(prep.train.samples)} samples, {prep.train.n_tokens} tokens, {prep.train.n_trained} trained; "
        f"{train.rows_in_epoch(0)} rows of {opts.ctx} per epoch"
        + (f"; validation {len(prep.val.samples)} samples" if prep.val is not None else ""))
    shape = f"from {lora_in}" if lora_in is not None else f"r {lora_r}, alpha {lora_alpha:g}"
    say(f"lora: {shape} on {', '.join(lcfg.targets)}: {n_params:,} parameters")
    say(f"training: {trainer.total_steps} steps, batch {batch} x grad-acc {grad_acc}, micro-batch {micro}, "
        f"{n_threads} threads, memory limit {format_bytes(limit)}")
    say(f"checkpointing: {checkpoint_line(checkpointing, checkpoint_ffn, trainer.keep_ffn)}")
    say(f"compute: {mode} products with the base weights ({why})")
    if epochs is not None and 0 <= max_steps and trainer.total_steps < max_steps:
        say(f"note: --epochs {epochs} ends the run after {trainer.total_steps} steps, before --adam-iter "
            f"{max_steps} (drop --epochs to let --adam-iter decide)")

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=None)
    step_seconds: list[float] = []

    def progress(r: Any, ema: float, tr: Trainer) -> None:
        step_seconds.append(r.seconds)
        post = {"epoch": r.epoch + 1, "loss": f"{ema:.4f}", "tok/s": f"{r.tokens / r.seconds:.0f}",
                "rss": format_bytes(tr.monitor.rss)}
        if tr.last_val is not None:
            post["val"] = f"{tr.last_val:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
        if bar.disable:  # no terminal: one line a step instead of a bar, with the bar's ETA
            recent = step_seconds[-20:]
            eta = (tr.total_steps - r.step) * sum(recent) / len(recent)
            say(f"step {r.step}/{tr.total_steps} epoch {r.epoch + 1} loss {r.loss:.4f} (smoothed {ema:.4f}) "
                f"lr {r.lr:.2e} tok/s {r.tokens / r.seconds:.0f} rss {format_bytes(tr.monitor.rss)} "
                f"eta {format_duration(eta)}")

    try:
        status = trainer.fit(progress)
    finally:
        bar.close()
        outputs.release()
    adapter = out.adapters(trainer.step)[-1]
    if status == "diverged":
        d = trainer.diverged
        assert d is not None
        kept = (f"the last good state (step {trainer.saved[0]}) is kept: checkpoint {trainer.saved[1]}, "
                f"adapter {out.adapters(trainer.saved[0])[-1]}" if trainer.saved else "nothing was saved")
        raise GGTrainError(f"training diverged at step {d.step}: loss {d.loss:.4g}, gradient norm "
                           f"{d.grad_norm:.4g}; {kept}. Try a lower --learning-rate (now {lr:g}) or --lora-alpha "
                           f"(now {lora_alpha:g}), a longer --warmup (now {warmup}) or --adam-gclip 1.0 (now "
                           f"{adam_gclip:g})")
    if status != "done":
        sig = trainer.interrupted_by or 2
        resume = trainer.saved[1] if trainer.saved else out.checkpoints(trainer.step)[-1]
        say(f"stopped at step {trainer.step}; resume with --checkpoint-in {resume}")
        sys.exit(128 + sig)

    val_part = f", validation loss {trainer.last_val:.4f}" if trainer.last_val is not None else ""
    click.echo(f"done: {trainer.step} steps; training loss: last step {last_logged_loss(out.log)}, "
               f"smoothed {trainer.ema:.4f}{val_part}" if trainer.ema is not None else
               f"done: {trainer.step} steps{val_part}")
    base, adapter = path.resolve(), adapter.resolve()
    click.echo(f"adapter:    {adapter}")
    click.echo(f"checkpoint: {out.checkpoints(trainer.step)[-1].resolve()}")
    click.echo(f"log:        {out.log.resolve()}")
    click.echo("")
    click.echo("try it here:")
    click.echo(f"  ggtrain chat -m {base} --lora {adapter}" + ("" if has_chat_template(mf, tok) else
                                                               " --chat-template FILE     (the model has none)"))
    click.echo(f"  ggtrain generate -m {base} --lora {adapter} -p PROMPT --compare     (base, then adapted)")
    click.echo("use it with llama.cpp:")
    click.echo(f"  llama-cli -m {base} --lora {adapter}     (or --lora-scaled {adapter}:0.5)")
    click.echo(f"  llama-server -m {base} --lora {adapter}")
    click.echo("    the server applies it at scale 1; change that live with POST /lora-adapters "
               '[{"id": 0, "scale": 0.5}], or per request with "lora": [{"id": 0, "scale": 0.5}].')
    click.echo("    (--lora-init-without-apply leaves it at scale 1 in current llama.cpp, not 0: POST scale 0 "
               "first)")
    click.echo(f"  one merged model: ggtrain merge -m {base} --lora {adapter} -o merged.gguf")
    if write_ollama:
        from ggtrain.adapters.ollama import modelfile_text, ollama_name, stop_texts, write_modelfile

        modelfile = write_modelfile(outdir.resolve() / "Modelfile",
                                    modelfile_text(base, adapter, stop_texts(tok)))
        name = ollama_name(base.stem + "-lora")
        click.echo(f"Ollama:     {modelfile}")
        click.echo(f"  ollama create {name} -f {modelfile}")
        click.echo(f"  ollama run {name}")
    else:
        click.echo("or with Ollama, a Modelfile of")
        click.echo(f"  FROM {base}")
        click.echo(f"  ADAPTER {adapter}")
        click.echo(f"  (`ggtrain ollama -m {base} --lora {adapter}` writes it with the stop tokens, as "
                   "finetune --ollama does)")


def has_chat_template(mf: Any, tok: Any) -> bool:
    """Whether `ggtrain chat` finds a chat template for this model without --chat-template."""
    from ggtrain.text.chat import ChatTemplate

    try:
        ChatTemplate.from_model_file(mf, None, tok)
    except GGTrainError:
        return False
    return True


def resolve_checkpoint_in(value: Path | None, outdir: Path, say: Any) -> Path | None:
    """--checkpoint-in: absolute as given; relative, in --outdir first (where --checkpoint-out writes),
    then the current directory. A LATEST name found in neither is a fresh start (the tutorial's
    command, re-run, resumes); any other missing name is an error."""
    if value is None:
        return None
    candidates = [value] if value.is_absolute() else [outdir / value, value]
    for c in candidates:
        if c.exists():
            return c
    if "LATEST" in value.name:
        say(f"--checkpoint-in {value}: not there yet ({' or '.join(map(str, dict.fromkeys(candidates)))}): "
            "starting a fresh run")
        return None
    raise GGTrainError(f"--checkpoint-in {value}: no such checkpoint (looked for "
                       f"{' and '.join(map(str, dict.fromkeys(candidates)))})")


def rank_warnings(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> list[str]:
    """A rank above a projection's smaller dimension adds parameters but no capacity: say so once
    per target (shapes: tensor name -> (out, in); ranks: target -> r)."""
    seen: dict[str, str] = {}
    for name, (n_out, n_in) in shapes.items():
        target = name.split(".")[-2]
        r = ranks.get(target, 0)
        if r > min(n_out, n_in) and target not in seen:
            seen[target] = (f"rank {r} on {target} is above its smaller dimension {min(n_out, n_in)} "
                            f"({n_out} x {n_in}): the extra rank adds parameters but no capacity")
    return list(seen.values())


def checkpoint_line(checkpointing: bool, mode: str, keep_ffn: bool) -> str:
    """What a block keeps for its backward, for the start-up lines (--use-checkpointing, --checkpoint-ffn)."""
    if not checkpointing:
        return "off (every block keeps what its backward reads)"
    kept = "each block's input and attn_output/ffn_down outputs"
    if keep_ffn:
        return kept + " and ffn_gate/ffn_up outputs" + (" (auto: they fit the memory limit)" if mode == "auto" else "")
    return kept + (" (auto: the ffn_gate/ffn_up outputs would not fit the memory limit)" if mode == "auto" else "")


def format_duration(seconds: float) -> str:
    """h:mm:ss or m:ss, as tqdm shows its ETA."""
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def last_logged_loss(log: Path) -> str:
    """The last step's training loss from train_log.jsonl, formatted."""
    import json

    last = None
    for line in log.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            last = rec["loss"]
    return f"{last:.4f}" if last is not None else "n/a"
