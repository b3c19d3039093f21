"""`ggtrain info`: what a GGUF model holds, before you train on it."""

from __future__ import annotations

from pathlib import Path

import click
from ggtrain.cli.options import Command, PathType

from ggtrain.gguf.arch import ROPE_NEOX, read_hparams
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@click.command(cls=Command)
# No exists/dir checks here: ModelFile reports those as one line naming the file, like any bad input.
@click.argument("model", required=False, type=PathType(path_type=Path))
def info(model: Path | None) -> None:
    """Show MODEL.gguf's architecture, hyper-parameters, tensor types and tokenizer.

    With no MODEL, the default model (Gemma 3 270M Q4_K_M) is shown.
    """
    path = model or default_model_path()
    mf = ModelFile(path)
    hp = read_hparams(mf)
    meta = mf.metadata
    name = meta.get("general.name", path.stem)
    total = sum(t.nbytes for t in mf.tensors.values())
    n_params = sum(t.n_elements for t in mf.tensors.values())

    click.echo(f"file:           {path}")
    click.echo(f"name:           {name}")
    click.echo(f"architecture:   {hp.arch}")
    click.echo(f"parameters:     {n_params / 1e6:.1f} M in {len(mf.tensors)} tensors, {_human(total)}")
    click.echo(f"train context:  {hp.n_ctx_train}")
    click.echo(f"n_embd:         {hp.n_embd}")
    click.echo(f"n_layer:        {hp.n_layer}")
    click.echo(f"n_head:         {hp.n_head} (kv heads {hp.n_head_kv}, head dim {hp.head_dim})")
    click.echo(f"n_ff:           {hp.n_ff}")
    rope = "neox" if hp.rope_type == ROPE_NEOX else "normal"
    click.echo(f"rope:           {rope}, base {hp.rope_freq_base:g}, dims {hp.n_rot}, "
               f"scaling {hp.rope_scaling_type}"
               + (f" (factor {1 / hp.rope_freq_scale:g})" if hp.rope_freq_scale != 1.0 else ""))
    click.echo(f"norm eps:       {hp.norm_eps:g}")
    if hp.n_swa:
        n_local = sum(hp.swa_layers)
        click.echo(f"sliding window: {hp.n_swa} on {n_local} of {hp.n_layer} layers "
                   f"(local rope base {hp.rope_freq_base_swa:g})")
    else:
        click.echo("sliding window: none")
    if hp.attn_softcap or hp.final_softcap:
        click.echo(f"soft-capping:   attention {hp.attn_softcap:g}, final {hp.final_softcap:g}")
    click.echo(f"output head:    {'tied to token_embd' if hp.tied_output else 'separate'}")
    click.echo(f"feed-forward:   {'GeGLU (tanh)' if hp.ffn_act == 'gelu_tanh' else 'SwiGLU'}")

    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if tokens is not None else hp.n_vocab
    tok_model = meta.get("tokenizer.ggml.model", "none")
    tok_pre = meta.get("tokenizer.ggml.pre")
    click.echo(f"vocab:          {n_vocab} tokens, tokenizer '{tok_model}'"
               + (f", pre-tokenizer '{tok_pre}'" if tok_pre else ""))
    click.echo(f"chat template:  {'yes' if meta.get('tokenizer.chat_template') else 'no'}")

    by_type: dict[str, list[int]] = {}
    for t in mf.tensors.values():
        row = by_type.setdefault(t.type_name, [0, 0, 0])
        row[0] += 1
        row[1] += t.n_elements
        row[2] += t.nbytes
    click.echo("")
    click.echo(f"{'type':<8} {'tensors':>8} {'elements':>14} {'bytes':>14} {'size':>10}")
    for tname, (count, elems, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        click.echo(f"{tname:<8} {count:>8} {elems:>14,} {nbytes:>14,} {_human(nbytes):>10}")
    click.echo(f"{'total':<8} {len(mf.tensors):>8} {n_params:>14,} {total:>14,} {_human(total):>10}")
