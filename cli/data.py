"""`ggtrain data`: what the trainer would see from a data file, before training on it."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from ggtrain.cli.common import model_option, open_model
from ggtrain.cli.dataflags import data_options, data_options_from
from ggtrain.cli.options import Command, Int

from ggtrain.dataset.batches import data_stats
from ggtrain.dataset.samples import Sample, TokenData, prepare_data
from ggtrain.errors import GGTrainError

OPEN, CLOSE = "[[", "]]"  # trained text, when there is no colour


def render_sample(tok, s: Sample, color: bool) -> str:
    """The sample's text with the trained tokens marked: green with colour, else [[between brackets]].

    A token's flag is whether it is trained as a target; the first token is only ever an input.
    """
    flags = s.train.copy()
    if len(flags):
        flags[0] = False
    out = []
    i = 0
    n = len(s.ids)
    while i < n:
        j = i
        while j < n and flags[j] == flags[i]:
            j += 1
        text = tok.decode(s.ids[i:j].tolist())
        if flags[i]:
            out.append(click.style(text, fg="green", bold=True) if color else f"{OPEN}{text}{CLOSE}")
        else:
            out.append(text)
        i = j
    return "".join(out)


def _report(name: str, data: TokenData, opts, tok, show: int, color: bool) -> None:
    st = data_stats(data, opts)
    click.echo(f"{name} file:   {data.path}")
    click.echo(f"format:       {data.container} / {data.schema}"
               + (" (forced with --format)" if opts.format != "auto" else " (detected)"))
    click.echo(f"samples:      {st.n_samples:,}"
               + (f"  ({len(data.bad)} bad records skipped)" if data.bad else ""))
    click.echo(f"tokens:       {st.n_tokens:,}  (mean {st.n_tokens / st.n_samples:.1f}, "
               f"longest {st.max_len:,} a sample)")
    pct = 100.0 * st.n_trained / max(st.n_tokens, 1)
    n_context = st.n_tokens - st.n_trained
    if opts.train_on_prompt or data.schema == "text":
        split = "  (prompts too: --train-on-prompt)" if opts.train_on_prompt and data.schema != "text" else ""
    else:
        what = "assistant turns" if data.schema in ("chat", "sharegpt") else "responses"
        split = f"  ({what} only; {n_context:,} prompt tokens are context: --train-on-prompt trains all)"
    click.echo(f"trained:      {st.n_trained:,} tokens ({pct:.1f}%){split}")
    longer = f"{st.n_split:,} samples longer than --ctx {opts.ctx}"
    if opts.truncate:
        click.echo(f"truncated:    {longer} cut to --ctx ({st.n_cut_tokens:,} tokens dropped)")
    else:
        click.echo(f"split:        {longer} split into windows")
    if st.n_dropped:
        click.echo(f"dropped:      {st.n_dropped:,} windows with no trained token")
    fill = st.n_positions_used / max(st.n_rows * opts.ctx, 1)
    click.echo(f"rows:         {st.n_rows:,} rows of {opts.ctx} tokens from {st.n_windows:,} windows, "
               f"{'packed' if opts.fill_with_next_samples else 'one a row'}, {100 * (1 - fill):.1f}% padding; "
               f"{st.n_trained_in_rows:,} trained targets an epoch")
    for b in data.bad[:5]:
        click.echo(f"skipped:      {b}")
    if len(data.bad) > 5:
        click.echo(f"skipped:      ... and {len(data.bad) - 5} more")
    for note in data.notes:
        click.echo(f"note:         {note}")
    for k, s in enumerate(data.samples[:show], 1):
        click.echo("")
        click.echo(f"--- sample {k} ({s.where}): {len(s.ids)} tokens, {s.n_trained} trained "
                   + ("(green)" if color else f"(marked {OPEN} {CLOSE})") + " ---")
        click.echo(render_sample(tok, s, color), color=color)


@click.command(cls=Command)
@model_option(help="GGUF model whose tokenizer (and chat template) is used")
@data_options
@click.option("--show", type=Int(min=0), default=3, show_default=True,
              help="How many samples to print with their trained tokens marked.")
@click.option("--color/--no-color", default=None,
              help="Mark trained tokens in colour (default: when stdout is a terminal), else [[like this]].")
def data(model_path: Path | None, show: int, color: bool | None, **kw) -> None:
    """Check training data before training: the detected format, counts of samples, tokens and
    trained tokens, how samples fit --ctx, and the first samples with trained tokens marked."""
    from ggtrain.text.tokenizer import Tokenizer

    opts = data_options_from(kw)
    if opts.train_data is None:
        raise GGTrainError("no training data: pass --train-data FILE (or a directory)")
    _, mf = open_model(model_path)
    tok = Tokenizer.from_model_file(mf)
    prep = prepare_data(opts, tok, mf)
    if color is None:
        color = sys.stdout.isatty()
    _report("train", prep.train, opts, tok, show, color)
    if prep.val is not None:
        click.echo("")
        vs = data_stats(prep.val, opts)
        click.echo(f"validation:   {vs.n_samples:,} samples, {vs.n_tokens:,} tokens, {vs.n_trained:,} trained, "
                   f"{vs.n_rows:,} rows ({prep.val_source})")
