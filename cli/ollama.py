"""`ggtrain ollama`: an Ollama Modelfile for a GGUF base plus a ggtrain adapter (or a merged model)."""

from __future__ import annotations

import re
from pathlib import Path

import click
from ggtrain.cli.common import model_option, open_model
from ggtrain.cli.options import Command, LoraArg, PathType, Text

from ggtrain.errors import GGTrainError


@click.command(cls=Command)
@model_option()
@click.option("--lora", "loras", type=LoraArg(), multiple=True, metavar="ADAPTER",
              help="The GGUF LoRA adapter (Ollama's ADAPTER). Ollama takes one adapter per model: for "
                   "several, or a scale other than 1 (ADAPTER:SCALE), use --merged.")
@click.option("-o", "--output", "out", type=PathType(dir_okay=False, path_type=Path), default=None,
              help="The Modelfile to write [default: Modelfile beside the adapter (or the model)].")
@click.option("--system", type=Text(), default=None,
              help="System prompt (SYSTEM); several lines are kept as they are.")
@click.option("--merged", type=PathType(dir_okay=False, path_type=Path), default=None, metavar="OUT.gguf",
              help="Merge the adapter(s) into OUT.gguf first (as `ggtrain merge`) and make the Modelfile "
                   "FROM it, with no ADAPTER line.")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "q8_0", "q4_0", "same"]), default="same",
              show_default=True, help="With --merged: the merged tensors' type, as `ggtrain merge --outtype` "
                                      "(same: each tensor's type in the base, so the model keeps its size).")
@click.option("--name", type=Text(), default=None,
              help="Model name in the printed `ollama create` line [default: from the adapter's file name].")
def ollama(model_path: Path | None, loras: tuple[str, ...], out: Path | None, system: str | None,
           merged: Path | None, outtype: str, name: str | None) -> None:
    """Write an Ollama Modelfile: FROM the base, ADAPTER the adapter, its stop tokens, SYSTEM.

    Paths in it are absolute; PARAMETER stop lists the model's end-of-generation tokens. Ollama
    takes its chat template from the GGUF itself, so no TEMPLATE is written. Prints the
    `ollama create` and `ollama run` lines.
    """
    from ggtrain.adapters.gguf_lora import parse_lora_arg, read_gguf_adapter
    from ggtrain.adapters.ollama import modelfile_text, ollama_name, quote, stop_texts, write_modelfile
    from ggtrain.gguf.defaults import default_model_path
    from ggtrain.text.tokenizer import Tokenizer

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?", name, re.ASCII):
        raise GGTrainError(f"--name {name!r}: an Ollama model name is letters, digits, '.', '-' and '_' "
                           "(optionally NAMESPACE/NAME:TAG)")
    if system is not None:
        quote(system, "--system")  # text no quoting can carry: refused before any work
    given = model_path or default_model_path()  # messages name the file as the user gave it
    base = given.absolute()
    adapters = [parse_lora_arg(a) for a in loras]
    if len(adapters) > 1 and merged is None:
        raise GGTrainError(f"--lora given {len(adapters)} times: Ollama takes one adapter per model. Merge "
                           "them into one model with --merged OUT.gguf (or `ggtrain merge -m "
                           f"{base} --lora A --lora B -o OUT.gguf`, then `ggtrain ollama -m OUT.gguf`)")
    if merged is not None and not adapters:
        raise GGTrainError("--merged OUT.gguf: there is nothing to merge; give --lora ADAPTER")
    _, mf = open_model(given, check_types=False)
    try:
        for path, scale in adapters:  # the wrong base is caught here, not when Ollama runs it
            read_gguf_adapter(path, base=mf, scale=scale,  # (with --merged, the merge says the note)
                              warn=None if merged is not None else lambda m: click.echo(m, err=True))
            if scale != 1.0 and merged is None:
                raise GGTrainError(f"--lora {path}:{scale:g}: Ollama applies an ADAPTER at scale 1; bake the "
                                   "scale in with --merged OUT.gguf, or drop the :SCALE")
        stops = stop_texts(Tokenizer.from_model_file(mf))
    finally:
        mf.close()

    adapter = adapters[0][0].absolute() if adapters and merged is None else None
    if merged is not None:
        from ggtrain.adapters.merge import merge
        from ggtrain.train.memory import format_bytes

        res = merge(given, adapters, merged, outtype, echo=lambda m: click.echo(m, err=True))
        click.echo(f"merged:  {merged.absolute()} ({format_bytes(res.size)}, {outtype})")
        model = merged.absolute()
        comments = [f"{model.name}: {base.name} + " + " + ".join(f"{p.name}:{s:g}" for p, s in adapters)]
    else:
        model = base
        comments = []
    beside = adapter or model
    out = (out or beside.parent / "Modelfile").absolute()
    write_modelfile(out, modelfile_text(model, adapter, stops, system, comments))
    name = name or ollama_name((adapter or model).stem)
    click.echo(f"wrote:   {out}")
    click.echo("")
    click.echo("import it into Ollama and run it:")
    click.echo(f"  ollama create {name} -f {out}")
    click.echo(f"  ollama run {name}")
