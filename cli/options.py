"""What every ggtrain command's options are made of: validated click types and the Command class.

click's own FloatRange lets `nan` through (every comparison with it is false) and `inf` through a
`min=` bound, IntRange turns 4.5 from a config file into 4, and a huge integer reaches a kernel
or a loop unchecked. The types here refuse all of that with a message naming the option:
    Int(min=1)                  an integer in range (at most INT32_MAX unless told), optional sentinels
    Float(min=0, min_open=True) a finite number that a float32 holds
    Size()                      a memory size such as 6G or 1500M, more than 0
    PathType(...)               click.Path that refuses an empty string
    Text()                      a string that may not be empty
    LoraArg()                   ADAPTER[:SCALE] with a finite scale
Each type also says which TOML value types a --config file may give it (`toml_types`).

Command is the class of every command: a flag from llama.cpp's trainers that ggtrain does not have
gets a hint naming the equivalent (or saying it is not supported) after click's "No such option".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import click

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
F32_MAX = 3.4028234663852886e38  # numpy.finfo(np.float32).max
F32_TINY = 1.401298464324817e-45  # the smallest subnormal float32: anything nonzero below is 0
THREADS_MAX = 512  # llama.cpp's GGML_MAX_N_THREADS: OpenMP would try to start every one asked for
BATCH_MAX = 1 << 16  # rows of a batch: the micro-batch search walks its divisors
EPOCHS_MAX = 100_000  # the run's plan visits every epoch
SEED_REFUSALS = {-1: "llama.cpp's -1 (a random seed) is not taken: runs are reproducible, pick any seed"}
EPOCHS_REFUSALS = {-1: "llama.cpp's -1 (no limit) is not taken: give the number of passes "
                       "(--adam-iter N stops after N steps)"}


class Int(click.IntRange):
    """An integer in [min, max] or one of the sentinels `also` ({-1: "no limit"}).

    `max` defaults to INT32_MAX: counts flow into int32 arrays and loops, where a value like
    10**30 would overflow or never end. `refusals` explains particular refused values (e.g.
    llama.cpp's -1 meaning "unlimited" or "random"). Floats and bools are refused, not truncated.
    """

    name = "integer"
    toml_types: tuple[type, ...] = (int,)

    def __init__(self, min: int | None = None, max: int | None = INT32_MAX,
                 also: Mapping[int, str] | None = None, refusals: Mapping[int, str] | None = None) -> None:
        super().__init__(min=min, max=max)
        self.also = dict(also or {})
        self.refusals = dict(refusals or {})

    def allowed(self) -> str:
        """What the option takes, in words: 'at least 1, or -1 for no limit'."""
        if self.min is not None and self.max is not None and self.max != INT32_MAX:
            s = f"from {self.min} to {self.max}"
        elif self.min is not None:
            s = f"at least {self.min}"
        elif self.max is not None:
            s = f"at most {self.max}"
        else:
            s = "any integer"
        return s + "".join(f", or {v} for {what}" for v, what in self.also.items())

    def _describe_range(self) -> str:  # shown in --help
        return self.allowed()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(f"{value!r} is not an integer ({self.allowed()})", param, ctx)
        try:
            v = int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer ({self.allowed()})", param, ctx)
        if v in self.also:
            return v
        if v in self.refusals:
            self.fail(f"{v}: {self.refusals[v]} ({self.allowed()})", param, ctx)
        if self.min is not None and v < self.min:
            self.fail(f"{v} is too small: {self.allowed()}", param, ctx)
        if self.max is not None and v > self.max:
            self.fail(f"{v} is too large: {self.allowed()}", param, ctx)
        return v


class Float(click.FloatRange):
    """A finite number in the range (click's bounds and open ends), that a float32 holds: the
    training math is float32, where 1e39 is inf and a nonzero 1e-50 is 0 (an epsilon of 0 is a
    0/0 in AdamW)."""

    name = "number"
    toml_types: tuple[type, ...] = (int, float)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            v = float(value)
        except (ValueError, OverflowError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if abs(v) > F32_MAX:
            self.fail(f"{value!r} is too large (a 32-bit float holds at most {F32_MAX:.4g})", param, ctx)
        if v != 0 and abs(v) < F32_TINY:
            self.fail(f"{value!r} is too close to 0 (a 32-bit float rounds it to 0)", param, ctx)
        return super().convert(v, param, ctx)


class Size(click.ParamType):
    """A memory size in bytes: 6G, 1500M, 1.5GiB or a plain number of bytes; more than 0."""

    name = "size"
    toml_types: tuple[type, ...] = (str, int)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from ggtrain.errors import GGTrainError
        from ggtrain.train.memory import parse_size

        if isinstance(value, bool) or not isinstance(value, (int, str)):
            self.fail(f"{value!r} is not a memory size (examples: 8G, 512M, 1.5GiB)", param, ctx)
        try:
            n = parse_size(value)
        except GGTrainError as e:
            self.fail(str(e), param, ctx)
        if n <= 0:
            self.fail("the limit must be more than 0 bytes (examples: 8G, 512M)", param, ctx)
        return n


class PathType(click.Path):
    """click.Path that refuses an empty string (an unset shell variable) instead of taking it as '.'."""

    toml_types: tuple[type, ...] = (str,)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, (str, os.PathLike)):
            self.fail(f"{value!r} is not a path", param, ctx)
        if not str(value).strip():
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


class Text(click.ParamType):
    """A string; with nonempty (the default), an empty one is refused."""

    name = "text"
    toml_types: tuple[type, ...] = (str,)

    def __init__(self, nonempty: bool = True) -> None:
        self.nonempty = nonempty

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not isinstance(value, str):
            self.fail(f"{value!r} is not a string", param, ctx)
        if self.nonempty and not value.strip():
            self.fail("an empty string", param, ctx)
        return value


class LoraArg(click.ParamType):
    """ADAPTER[:SCALE] (llama.cpp's --lora / --lora-scaled): a non-empty path and a finite scale.
    The value stays the string: ggtrain.adapters.gguf_lora.parse_lora_arg splits it where it is used."""

    name = "adapter"
    toml_types: tuple[type, ...] = (str,)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ggtrain.adapters.gguf_lora import parse_lora_arg

        if not isinstance(value, str) or not value.strip():
            self.fail("expected ADAPTER.gguf or ADAPTER.gguf:SCALE, got an empty string", param, ctx)
        path, scale = parse_lora_arg(value)
        if value.startswith(":") or not str(path).strip():
            self.fail(f"{value!r}: no adapter file before the ':'", param, ctx)
        if not math.isfinite(scale) or abs(scale) > F32_MAX:
            self.fail(f"{value!r}: the scale {scale} is not a finite number", param, ctx)
        return value


def toml_types(param: click.Parameter) -> tuple[type, ...]:
    """The Python types a TOML --config value may have for this parameter."""
    if isinstance(param, click.Option) and param.is_flag:
        return (bool,)
    own = getattr(param.type, "toml_types", None)
    if own is not None:
        return own
    if isinstance(param.type, click.types.BoolParamType):
        return (bool,)
    return (str,)  # Choice, click.Path, STRING


# --- flags of the trainers users come from ------------------------------------------------------

_NOT_ON_CPU = "not needed: ggtrain runs on the CPU; drop it"
_FROM_GGUF = "not supported: ggtrain reads it from the model's GGUF metadata; drop it"
_PROMPT = ("for a sample of the adapter while it trains use --sample-prompt TEXT (at every --eval-every); "
           "afterwards try it with `ggtrain chat --lora ADAPTER` (for the batch size use -b/--batch)")
_NO_CONVERGENCE = "not supported: ggtrain has no convergence test (--adam-iter and --epochs end a run)"
_CHAT_INPUT = ("the messages come from stdin, one a line: `echo 'Hello' | ggtrain chat ...` "
               "(to continue a text use `ggtrain generate -p PROMPT`)")
_NO_AFFIXES = "not supported: the chat template frames each turn (--chat-template FILE to change it)"
_RANKS_TO_ZERO = ("set --rank-wq/--rank-wk/--rank-wv/--rank-wo/--rank-ffn-gate/--rank-ffn-up/--rank-ffn-down "
                  "to 0 for the projections not to train")

# flag as typed -> hint, for the flags of llama.cpp's old finetune and export-lora, llama-finetune(-lora),
# the QLoRA PR, MLX-LM and the tutorials built on them (shared/REFERENCE.md, shared/seeds/004).
# Single-dash long forms (-ngl) are matched on the raw argument: click reads them as short options.
EVERY_COMMAND = {"-ngl": _NOT_ON_CPU, "--n-gpu-layers": _NOT_ON_CPU, "--gpu-layers": _NOT_ON_CPU}
DATA_FLAGS = {  # ggtrain data and finetune
    "-f": "use --train-data FILE",
    "--file": "use --train-data FILE",
    "--data": "use --train-data (a file, or a directory with train.jsonl / valid.jsonl)",
    "-s": "use --seed",
    "--mask-prompt": "not needed: prompts are masked by default (--train-on-prompt trains them too)",
    "--overlapping-samples": "not supported: a sample ends where the next begins; drop it",
    "--force-reshuffle": "not needed: every epoch is shuffled from --seed; drop it",
}
FINETUNE_FLAGS = {
    "--save-path": "use --outdir DIR (and --lora-out NAME for the adapter's file name)",
    "-p": _PROMPT,
    "--prompt": _PROMPT,
    "--model-out": "use --outdir DIR and --lora-out NAME (ggtrain finetune writes an adapter, not a model)",
    "--output-adapter": "use --outdir DIR and --lora-out NAME",
    "--adapter-path": "use --outdir DIR",
    "--lora-adapter": "that is llama-server's flag; to start from an adapter use --lora-in ADAPTER, to continue "
                      "an earlier run --checkpoint-in",
    "--lora": "to start from an adapter (GGUF or PEFT) use --lora-in ADAPTER; to continue an earlier run "
              "--checkpoint-in CHECKPOINT.npz",
    "--only-write-lora": "not needed: ggtrain always writes only the LoRA adapter; drop it",
    "--lora-rank": "use --lora-r",
    "--rank": "use --lora-r",
    "--rank-out": "use --rank-output",
    "--rank-w1": "use --rank-ffn-gate",
    "--rank-w2": "use --rank-ffn-down",
    "--rank-w3": "use --rank-ffn-up",
    "--rank-att-norm": "not supported: norms are not trained; drop it",
    "--rank-ffn-norm": "not supported: norms are not trained; drop it",
    "--rank-out-norm": "not supported: norms are not trained; drop it",
    "--rank-tok-embd": "not supported: the token embeddings are not trained; drop it",
    "--lora-targets": _RANKS_TO_ZERO,
    "--lora-modules": _RANKS_TO_ZERO,
    "--norm-rms-eps": _FROM_GGUF,
    "--rope-freq-base": _FROM_GGUF,
    "--rope-freq-scale": _FROM_GGUF,
    "-ub": "use --micro-batch (rows per forward/backward pass; 0 chooses it from --mem-limit)",
    "--ubatch-size": "use --micro-batch (rows per forward/backward pass; 0 chooses it from --mem-limit)",
    "--resume": "use --checkpoint-in CHECKPOINT.npz (from an earlier run's --outdir)",
    "--resume-adapter-file": "use --lora-in ADAPTER (or --checkpoint-in CHECKPOINT.npz to resume a ggtrain run)",
    "--pattern-fn-it": "not needed: ITERATION in --lora-out / --checkpoint-out becomes the step number",
    "--fn-latest": "not needed: LATEST in --lora-out / --checkpoint-out names the newest copy",
    "-lr": "use --learning-rate (or --adam-alpha)",
    "--lr": "use --learning-rate (or --adam-alpha)",
    "--adam-epsf": "use --adam-eps (AdamW's epsilon; ggtrain has no convergence test)",
    "--adam-min-alpha": "use --cos-decay-min (the rate's floor, as a multiplier of --learning-rate)",
    "--adam-decay-min-ndim": "not supported: --adam-decay applies to every LoRA matrix; drop it",
    "--warmup-steps": "use --warmup",
    "--lr-scheduler": "cosine decay is the default (--cos-decay-steps, --cos-decay-min); "
                      "--cos-decay-steps 0 keeps the rate constant",
    "--cos-decay-restart": "not supported: the cosine decay has no restarts; drop it",
    "--enable-restart": "not supported: the cosine decay has no restarts; drop it",
    "--disable-restart": "not needed: the cosine decay has no restarts; drop it",
    "--grad-checkpoint": "use --use-checkpointing (the default)",
    "-epochs": "use --epochs",
    "--iters": "use --adam-iter",
    "--num-epochs": "use --epochs",
    "--opt-past": _NO_CONVERGENCE,
    "--opt-delta": _NO_CONVERGENCE,
    "--opt-max-no-improvement": _NO_CONVERGENCE,
    "--use-flash": "not needed: attention needs no flag; drop it",
    "--no-flash": "not needed: attention needs no flag; drop it",
    "--use-adam": "not needed: ggtrain always uses AdamW; drop it",
    "--use-lbfgs": "not supported: ggtrain only has AdamW",
    "--print-details-interval": "not supported: the progress line shows the loss of every step",
    "--predict": "use --sample-tokens N (with --sample-prompt TEXT), or try the adapter with "
                 "`ggtrain generate --lora ADAPTER -p PROMPT`",
    "--freeze-layers": "not supported: every layer gets a LoRA",
    "--num-layers": "not supported: every layer gets a LoRA",
    "--fine-tune-type": "not supported: ggtrain trains LoRA adapters only",
}
HINTS: dict[str, dict[str, str]] = {
    "finetune": {**EVERY_COMMAND, **DATA_FLAGS, **FINETUNE_FLAGS},
    "data": {**EVERY_COMMAND, **DATA_FLAGS,
             "-p": "ggtrain data shows samples of the training data itself (--show N)",
             "--prompt": "ggtrain data shows samples of the training data itself (--show N)"},
    "perplexity": {**EVERY_COMMAND, "--lora-scaled": "use --lora ADAPTER:SCALE",
                   "--lora-init-without-apply": "not needed: ggtrain perplexity applies the --lora adapters given",
                   "-p": "the text comes from -f FILE", "--prompt": "the text comes from -f FILE",
                   "--ctx": "use -c/--ctx-size", "--batch": "use -b/--batch-size",
                   "-ub": "not needed: -b/--batch-size decides the tokens of a forward pass"},
    "tokenize": {**EVERY_COMMAND, "--text": "use -p/--prompt TEXT"},
    "chat": {**EVERY_COMMAND, **{f: _CHAT_INPUT for f in ("-p", "--prompt", "-f", "--file")},
             **{f: "not needed: ggtrain chat is always interactive (lines from the terminal or a pipe)"
                for f in ("-i", "--interactive", "-if", "--interactive-first")},
             "--lora-scaled": "use --lora ADAPTER:SCALE", "--in-prefix": _NO_AFFIXES, "--in-suffix": _NO_AFFIXES,
             "-r": "not needed: a reply ends at the chat template's end-of-turn token",
             "--reverse-prompt": "not needed: a reply ends at the chat template's end-of-turn token"},
    "info": {**EVERY_COMMAND},
}


def old_flag_hint(command: str, args: list[str], option_name: str, known: set[str]) -> str | None:
    """What to use instead of the unknown option click stopped at: looked up as click named it, then
    as the user typed it (click reads -ngl as -n -g -l), then with - for _ (old llama.cpp took both)."""
    table = HINTS.get(command, EVERY_COMMAND)
    typed = [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "--"]
    for c in [option_name] + [a for a in typed if a.startswith(option_name) and a != option_name]:
        where = "" if c == option_name else f" (in {c})"
        if c in table:
            return where + ": " + table[c]
        dashed = "--" + c.lstrip("-").replace("_", "-")
        if "_" in c and dashed in known:
            return f"{where}: use {dashed} (with dashes)"
    return None


class Command(click.Command):
    """A ggtrain command: click's Command plus the hint for flags of the trainers users come from."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, list(args))
        except click.NoSuchOption as e:
            known = {o for p in self.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
            hint = old_flag_hint(self.name or "", list(args), e.option_name, known)
            if hint is not None:
                e.message = e.message.rstrip(".") + hint
                e.possibilities = None  # type: ignore[misc]  # the hint replaces click's "Did you mean"
            raise
