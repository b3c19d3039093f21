"""`ggtrain info`: what a GGUF model holds, before you train on it; what a LoRA adapter is."""

from __future__ import annotations

import re
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

    Given a LoRA adapter, shows its base model (name and fingerprint), targets and ranks, alpha and
    the resulting scale, tensor type, size and the figures of the run that trained it.
    With no MODEL, the default model (Gemma 3 270M Q4_K_M) is shown.
    """
    path = model or default_model_path()
    mf = ModelFile(path, check_types=False)
    if mf.get("general.type") == "adapter":
        describe_adapter(path, mf)
        return
    mf.check_tensor_types()
    hp = read_hparams(mf)
    meta = mf.metadata
    name = meta.get("general.name", path.stem)
    total = sum(t.nbytes for t in mf.tensors.values())
    n_params = sum(t.n_elements for t in mf.tensors.values())

    click.echo(f"file:           {path}")
    click.echo(f"name:           {name}")
    n_parents = meta.get("general.base_model.count")
    if isinstance(n_parents, int) and n_parents > 0:
        parents = [str(meta.get(f"general.base_model.{i}.name", "?")) for i in range(n_parents)]
        click.echo(f"derived from:   {' + '.join(parents)}"
                   + (f" (merged by ggtrain, --outtype {meta['ggtrain.adapters.merge.outtype']})"
                      if "ggtrain.adapters.merge.outtype" in meta else ""))
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


def describe_adapter(path: Path, mf: ModelFile) -> None:
    """The adapter's lines (keys: ggtrain.adapters.gguf_lora's docstring); older adapters and llama.cpp's
    converter's lack ggtrain's keys, and get what the tensors and llama.cpp's keys say."""
    from ggtrain.adapters.gguf_lora import KEY_BASE_FILE, KEY_BASE_FINGERPRINT, KEY_VERSION, LINEAGE_FIELDS
    from ggtrain.model.lora import TARGETS

    meta = mf.metadata
    pairs: dict[str, dict[str, object]] = {}
    for tname, t in mf.tensors.items():
        base_name, _, suffix = tname.rpartition(".")
        if suffix in ("lora_a", "lora_b"):
            pairs.setdefault(base_name, {})[suffix] = t
    # target -> ranks of its tensors; any tensor name counts (another tool's adapter may adapt others)
    found: dict[str, list[int]] = {}
    layers = set()
    for name, ab in pairs.items():
        m = re.match(r"blk\.(\d+)\.(.+)\.weight$", name)
        if m:
            layers.add(int(m[1]))
        if "lora_b" in ab:  # numpy shape (out, r)
            target = m[2] if m else name.removesuffix(".weight")
            found.setdefault(target, []).append(int(ab["lora_b"].shape[-1]))
    order = {t: i for i, t in enumerate(TARGETS)}
    ranks = {t: found[t] for t in sorted(found, key=lambda t: order.get(t, len(TARGETS)))}
    total = sum(t.nbytes for t in mf.tensors.values())
    n_params = sum(t.n_elements for t in mf.tensors.values())
    alpha = float(meta.get("adapter.lora.alpha", 0.0) or 0.0)

    click.echo(f"file:           {path}")
    click.echo(f"type:           LoRA adapter ({meta.get('adapter.type', '?')}), llama.cpp GGUF")
    click.echo(f"name:           {meta.get('general.name', path.stem)}")
    click.echo(f"architecture:   {meta.get('general.architecture', '?')}")
    base = meta.get("general.base_model.0.name")
    fp = meta.get(KEY_BASE_FINGERPRINT)
    file = meta.get(KEY_BASE_FILE)
    if base or fp or file:
        extra = [f"file {file}" if file else "", f"fingerprint {fp}" if fp else "no fingerprint"]
        click.echo(f"base model:     {base or '?'} ({', '.join(e for e in extra if e)})")
        more = [f"{f} {meta[k]}" for f in LINEAGE_FIELDS[1:] if (k := f"general.base_model.0.{f}") in meta]
        if more:
            click.echo(f"                {'; '.join(more)}")
    else:
        click.echo("base model:     not recorded")
    parts = []
    for t, rs in ranks.items():
        r = sorted(set(rs))
        parts.append(f"{t} r{r[0]}" if len(r) == 1 else f"{t} r{r[0]}-{r[-1]} (ranks differ by layer)")
    click.echo(f"targets:        {', '.join(parts)}" + (f" ({len(layers)} layers)" if layers else ""))
    all_ranks = sorted({r for rs in ranks.values() for r in rs})
    if alpha and all_ranks:
        scales = ", ".join(f"{alpha / r:g} at r{r}" for r in all_ranks)
        click.echo(f"alpha:          {alpha:g}: scale alpha / r = {scales} (times --lora-scaled)")
    else:
        click.echo("alpha:          none: the scale is the --lora-scaled factor alone")
    by_type: dict[str, int] = {}
    for t in mf.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + 1
    click.echo(f"tensor type:    {', '.join(f'{k} ({v} tensors)' for k, v in sorted(by_type.items()))}")
    click.echo(f"size:           {n_params:,} parameters in {len(pairs)} pairs, {_human(total)} of tensors, "
               f"{_human(mf.file_size)} file")
    _training_lines(meta)
    if meta.get(KEY_VERSION):
        click.echo(f"written by:     ggtrain {meta[KEY_VERSION]}")


def _training_lines(meta: dict) -> None:
    """The run's figures (training.*), where the adapter has them."""
    if "training.steps" not in meta:
        click.echo("training:       not recorded")
        return
    parts = [f"{meta['training.steps']} steps"]
    if "training.epochs" in meta:
        parts.append(f"{meta['training.epochs']} epochs completed")
    if "training.tokens" in meta:
        trained = meta.get("training.trained_tokens", 0)
        parts.append(f"{meta['training.tokens']:,} tokens ({trained:,} trained)")
    click.echo(f"training:       {', '.join(parts)}")
    losses = [f"{label} {meta[k]:.4f}" for k, label in (("training.loss", "last step"),
                                                         ("training.loss_smoothed", "smoothed"),
                                                         ("training.val_loss", "validation")) if k in meta]
    if losses:
        click.echo(f"loss:           {', '.join(losses)}")
    if "training.data" in meta:
        sha = meta.get("training.data_sha256")
        click.echo(f"data:           {meta['training.data']}" + (f" (sha256 {sha})" if sha else ""))
