"""The `ggtrain` command group: every command is one function in its own module."""

from __future__ import annotations

import sys

import click
from ggtrain.cli.options import Command

from ggtrain import __version__
from ggtrain.errors import GGTrainError

EXIT_BAD_INPUT = 2


class Group(click.Group):
    """Turns GGTrainError (bad input) into one line on stderr and exit code 2, no traceback."""

    command_class = Command

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except GGTrainError as e:
            click.echo(f"ggtrain: error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("ggtrain: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggtrain")
def main() -> None:
    """Fine-tune LoRA adapters directly on quantized GGUF models, on the CPU.

    Adapters are written in llama.cpp's GGUF LoRA format: llama-cli --lora loads them as they are.
    """


def _register() -> None:
    from ggtrain.cli.chat import chat
    from ggtrain.cli.data import data
    from ggtrain.cli.finetune import finetune
    from ggtrain.cli.generate import generate
    from ggtrain.cli.info import info
    from ggtrain.cli.merge import merge
    from ggtrain.cli.ollama import ollama
    from ggtrain.cli.peft import export_peft, import_peft
    from ggtrain.cli.perplexity import perplexity
    from ggtrain.cli.tokenize import tokenize

    main.add_command(finetune)
    main.add_command(generate)
    main.add_command(info)
    main.add_command(data)
    main.add_command(perplexity)
    main.add_command(tokenize)
    main.add_command(export_peft)
    main.add_command(import_peft)
    main.add_command(merge)
    main.add_command(ollama)
    main.add_command(chat)


_register()

if __name__ == "__main__":
    main()
