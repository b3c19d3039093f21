"""`ggtrain export-peft` and `ggtrain import-peft`: adapters to and from Hugging Face PEFT's format."""

from __future__ import annotations

from pathlib import Path

import click
from ggtrain.cli.common import model_option, open_model
from ggtrain.cli.options import Command, PathType, Text


@click.command("export-peft", cls=Command)
# No exists/dir checks on ADAPTER: the GGUF reader names the file and what is wrong with it.
@click.argument("adapter", type=PathType(path_type=Path))
@click.option("-o", "--outdir", required=True, type=PathType(file_okay=False, path_type=Path),
              help="Directory to write adapter_model.safetensors, adapter_config.json and README.md into.")
@model_option(help="The base model GGUF the adapter was trained on: the adapter is checked against it, its "
                   "name goes into the config, and a llama base's head counts put q/k back in Hugging "
                   "Face's row order (needed for llama adapters of attn_q/attn_k); none by default",
              bundled_default=False)
@click.option("--base-model-id", type=Text(), default=None, metavar="ORG/NAME",
              help="base_model_name_or_path for the config: the Hugging Face model the base GGUF was made "
                   "from (default: from the adapter's or the base's metadata).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace adapter files already in --outdir.")
def export_peft(adapter: Path, outdir: Path, model_path: Path | None, base_model_id: str | None,
                overwrite: bool) -> None:
    """Write a GGUF LoRA ADAPTER as a PEFT adapter directory (transformers, TGI, vLLM)."""
    from ggtrain.adapters.peft import export_peft as export
    from ggtrain.train.outputs import run_record

    base = open_model(model_path)[1] if model_path is not None else None
    files, config, notes = export(adapter, outdir, base, base_model_id, overwrite=overwrite, run_of=run_record)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    patterns = " (per-module ranks/alphas in rank_pattern/alpha_pattern)" \
        if config["rank_pattern"] or config["alpha_pattern"] else ""
    click.echo(f"wrote {outdir}: r {config['r']}, alpha {config['lora_alpha']}{patterns}, targets "
               f"{', '.join(config['target_modules'])}, base {config['base_model_name_or_path']}")
    for f in files:
        click.echo(f"  {f}")
    click.echo("load it with PEFT: PeftModel.from_pretrained(base_model, DIR); TGI: LORA_ADAPTERS=name=DIR; "
               "vLLM: --enable-lora --lora-modules name=DIR")


@click.command("import-peft", cls=Command)
@click.argument("peft_dir", metavar="DIR", type=PathType(path_type=Path))
@model_option(help="Base model GGUF the adapter is for")
@click.option("-o", "--outfile", required=True, type=PathType(dir_okay=False, path_type=Path),
              help="The GGUF LoRA adapter to write.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="Tensor type of the written adapter (convert_lora_to_gguf.py's --outtype).")
def import_peft(peft_dir: Path, model_path: Path | None, outfile: Path, outtype: str) -> None:
    """Convert a PEFT LoRA adapter DIR into a GGUF adapter for llama.cpp and ggtrain (as
    convert_lora_to_gguf.py does, plus rank_pattern/alpha_pattern and rsLoRA)."""
    from ggtrain.adapters.peft import import_peft as convert

    base_path, base = open_model(model_path)
    out, lora, alpha = convert(peft_dir, base, outfile, outtype)
    click.echo(f"wrote {out}: {len(lora)} adapted tensors, {lora.n_params:,} parameters, alpha {alpha:g}")
    click.echo(f"use it with llama.cpp: llama-cli -m {base_path} --lora {out}")
