"""`ggtrain chat`: a conversation with a model (plus LoRA adapters) through its chat template.

The loop is ggtrain.generate.chat.run_chat; `start_chat` (model, adapters, template, sampler, then the
loop) is what `ggtrain generate -cnv` calls too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from ggtrain.cli.common import compute_option, model_option, open_model, start_threads, threads_option
from ggtrain.cli.generate import DEFAULT_CTX
from ggtrain.cli.options import Command, Int, LoraArg, PathType, Text
from ggtrain.cli.sampling import sampling_options

if TYPE_CHECKING:
    from ggtrain.generate.decoder import Decoder
    from ggtrain.generate.sampling import SamplingParams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.text.tokenizer import Tokenizer


@click.command(cls=Command)
@model_option()
@click.option("--lora", "loras", type=LoraArg(), multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter (a GGUF file or a PEFT directory), optionally scaled, negative "
                   "scales included (llama.cpp's --lora / --lora-scaled). Repeatable.")
@click.option("-sys", "--system-prompt", "--system", "system", type=Text(), default=None, metavar="TEXT",
              help="System message the conversation starts with (llama.cpp's -sys).")
@click.option("--chat-template", "--chat-template-file", "chat_template",
              type=PathType(exists=True, dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Jinja chat template instead of the model's own (needed when the GGUF has none and "
                   "ggtrain ships none for its family).")
@sampling_options
@click.option("-n", "--n-predict", "n_predict", type=Int(min=1, also={-1: "until the end of the turn"}),
              default=-1, show_default=True, help="Most tokens a reply may have (-1: until the model ends its "
                                                  "turn or the context is full).")
@click.option("-c", "--ctx-size", "n_ctx", type=Int(min=8), default=None,
              help=f"Context of the whole conversation, in tokens: the KV cache is sized from it (default: "
                   f"{DEFAULT_CTX}, or the model's training context if smaller).")
@threads_option()
@compute_option(training=False, dest="matmul")
# llama.cpp's switches for what ggtrain chat always does: taken, and nothing to do
@click.option("-cnv", "--conversation", "--jinja", is_flag=True, expose_value=False, hidden=True)
@click.option("--verbose-prompt", is_flag=True, default=False,
              help="Print each turn's rendered prompt and how many of its tokens were evaluated, on stderr.")
def chat(model_path: Path | None, loras: tuple[str, ...], system: str | None, chat_template: Path | None,
         sampling: SamplingParams, n_predict: int, n_ctx: int | None, threads: int | None, matmul: str,
         verbose_prompt: bool) -> None:
    """Chat with a model: lines from the terminal or a pipe, each one a user turn.

    Only the new turn is evaluated: the conversation so far stays in the KV cache. /reset starts over,
    /exit (or the end of input) quits.
    """
    start_chat(model_path, loras, sampling, n_predict, n_ctx, threads, matmul, system, chat_template,
               verbose_prompt)


def start_chat(model_path: Path | None, loras: tuple[str, ...], sampling: SamplingParams, n_predict: int,
               n_ctx: int | None, threads: int | None, matmul: str, system: str | None = None,
               chat_template: Path | None = None, verbose_prompt: bool = False) -> None:
    """The chat with these options, until /exit or the end of input (`ggtrain chat`, `generate -cnv`)."""
    import gc

    from ggtrain import kernels
    from ggtrain.generate.chat import ChatSession, run_chat
    from ggtrain.generate.sampling import Sampler
    from ggtrain.text.chat import ChatTemplate

    start_threads(threads)
    notice = kernels.first_run_notice()
    if notice:
        click.echo(f"chat: {notice}", err=True)
    _, mf = open_model(model_path)
    decoder, tok = open_decoder(mf, loras, n_ctx, matmul)
    template = ChatTemplate.from_model_file(mf, chat_template, tok)
    if template.note:
        click.echo(f"chat: {template.note}", err=True)
    sampler = Sampler(sampling)
    click.echo(f"chat: seed {sampler.seed}", err=True)
    gc.collect()
    gc.freeze()  # the vocabulary's objects live as long as the session: keep collections off them
    run_chat(ChatSession(decoder, tok, template, sampler, system, n_predict), verbose_prompt=verbose_prompt)


def open_decoder(mf: ModelFile, loras: tuple[str, ...], n_ctx: int | None, matmul: str) -> tuple[Decoder, Tokenizer]:
    """The Decoder over mf with the --lora adapters, and the model's tokenizer; the KV cache's size
    and the matmul path go to stderr."""
    from ggtrain.adapters.load import load_adapter_arg
    from ggtrain.generate.decoder import Decoder
    from ggtrain.model.transformer import Adapter, Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.train.memory import format_bytes

    model = Model(mf)
    for arg in loras:
        model.adapters.append(Adapter(load_adapter_arg(arg, mf)))
    n_ctx = n_ctx or min(DEFAULT_CTX, model.hp.n_ctx_train)
    decoder = Decoder(model, n_ctx, matmul=matmul)
    adapters = f", adapters {', '.join(loras)}" if loras else ""
    click.echo(f"chat: {mf.path.name}{adapters}; {decoder.matmul} matmul; KV cache {format_bytes(decoder.kv_bytes)} "
               f"for -c {n_ctx}", err=True)
    return decoder, Tokenizer.from_model_file(mf)
