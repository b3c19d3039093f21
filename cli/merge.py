"""`ggtrain merge`: a standalone GGUF model with LoRA adapters folded in (llama-export-lora's job)."""

from __future__ import annotations

from pathlib import Path

import click
from ggtrain.cli.common import model_option, start_threads, threads_option
from ggtrain.cli.options import Command, LoraArg, PathType

OUTTYPE_HELP = ("Type of the merged tensors: f16 (the default, as llama-export-lora: F16, tensors that "
                "are F32 in the base stay F32), bf16 (likewise), f32, q8_0, q4_0, or same (each tensor's "
                "type in the base, re-quantized as llama-quantize does: the result keeps the base's size). "
                "Untouched tensors are always copied as they are.")


@click.command(cls=Command)
@model_option()
@click.option("--lora", "loras", type=LoraArg(), multiple=True, required=True, metavar="ADAPTER[:SCALE]",
              help="GGUF LoRA adapter to merge, optionally scaled as llama.cpp's --lora-scaled (default 1). "
                   "Repeatable: the updates add up.")
@click.option("-o", "--output", "out", required=True, type=PathType(dir_okay=False, path_type=Path),
              help="The merged model's GGUF file (written atomically: a failure leaves no partial file).")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "q8_0", "q4_0", "same"]), default="f16",
              show_default=True, help=OUTTYPE_HELP)
@threads_option()
def merge(model_path: Path | None, loras: tuple[str, ...], out: Path, outtype: str,
          threads: int | None) -> None:
    """Merge LoRA adapters into a GGUF model: W' = W + scale * (alpha / r) * B A.

    The result runs anywhere a GGUF model does (llama-cli -m OUT.gguf, Ollama FROM OUT.gguf), with
    every metadata key of the base (tokenizer, chat template, ...); general.base_model.* names the
    base and the adapters merged. Streams tensor by tensor: memory stays near one tensor.
    """
    from ggtrain.adapters.gguf_lora import parse_lora_arg
    from ggtrain.adapters.merge import merge as merge_model
    from ggtrain.gguf.defaults import default_model_path
    from ggtrain.train.memory import format_bytes

    start_threads(threads)
    base = model_path or default_model_path()  # merge opens it itself, reading by rows
    res = merge_model(base, [parse_lora_arg(a) for a in loras], out, outtype,
                      echo=lambda m: click.echo(m, err=True))
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(res.merged.items()))
    click.echo(f"merged:  {sum(res.merged.values())} tensors ({kinds}); {res.copied} copied as they are")
    click.echo(f"wrote:   {out.resolve()} ({format_bytes(res.size)}; the base is "
               f"{format_bytes(Path(base).stat().st_size)})")
    grew = format_bytes(max(0, res.rss_peak - res.rss_start))
    click.echo(f"memory:  peak RSS {format_bytes(res.rss_peak)}, {grew} more than at the start (the largest "
               f"merged tensor is {format_bytes(res.largest_f32)} at f32)")
    click.echo(f"time:    {res.seconds:.1f} s")
    click.echo(f"use it:  llama-cli -m {out.resolve()}    (Ollama: ggtrain ollama -m {out.resolve()})")
