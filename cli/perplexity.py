"""`ggtrain perplexity`: llama-perplexity's measurement, on the quantized base plus LoRA adapters."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import click
from ggtrain.cli.common import (
    compute_option,
    model_option,
    open_model,
    start_threads,
    threads_option,
)
from ggtrain.cli.options import Command, Int, LoraArg, PathType

from ggtrain.errors import GGTrainError


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise GGTrainError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise GGTrainError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise GGTrainError(f"{path}: cannot read: {e.strerror or e}") from None


@click.command(cls=Command)
@model_option()
@click.option("-f", "--file", "text_file", required=True, type=PathType(dir_okay=False, path_type=Path),
              help="Text file to measure perplexity on.")
@click.option("-c", "--ctx-size", "n_ctx", default=512, show_default=True, type=Int(min=4),
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("-b", "--batch-size", "n_batch", default=2048, show_default=True, type=Int(min=1),
              help="Tokens per forward pass: batch-size // ctx-size chunks are evaluated together.")
@threads_option()
@click.option("--chunks", "n_chunks", default=-1, show_default=True, type=Int(min=1, also={-1: "all"}),
              help="Stop after this many chunks (-1: all).")
@click.option("--lora", "loras", type=LoraArg(), multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter (a GGUF file or a PEFT directory), optionally scaled (llama.cpp's --lora / "
                   "--lora-scaled). Repeatable.")
@compute_option(training=False)
def perplexity(model_path: Path | None, text_file: Path, n_ctx: int, n_batch: int, threads: int | None,
               n_chunks: int, loras: tuple[str, ...], compute: str) -> None:
    """Perplexity of a model (plus adapters) on a text file, exactly as llama-perplexity measures it."""
    # Heavy imports (Numba kernels) here, so `ggtrain --help` stays quick.
    import numpy as np
    from tqdm import tqdm

    from ggtrain import kernels
    from ggtrain.adapters.load import load_adapter_arg
    from ggtrain.model.perplexity import perplexity_chunks
    from ggtrain.model.transformer import Adapter, Model, resolve_matmul
    from ggtrain.text.tokenizer import Tokenizer

    start_threads(threads)
    notice = kernels.first_run_notice()
    if notice:
        click.echo(f"perplexity: {notice}", err=True)
    _, mf = open_model(model_path)
    matmul, why = resolve_matmul(compute)
    model = Model(mf, matmul=matmul)
    for arg in loras:
        model.adapters.append(Adapter(load_adapter_arg(arg, mf)))
    tok = Tokenizer.from_model_file(mf)
    # The vocabulary's ~10^5 Python objects would be walked by every full garbage collection that
    # the forward's array allocations trigger: they live as long as the run, so set them aside.
    gc.collect()
    gc.freeze()
    text = read_text(text_file)
    t0 = time.perf_counter()
    tokens = np.asarray(tok.encode(text, add_special=True, parse_special=False), dtype=np.int32)
    click.echo(f"perplexity: tokenizing the input .. {len(tokens)} tokens in "
               f"{(time.perf_counter() - t0) * 1e3:.0f} ms", err=True)
    bos = tok.bos_id if tok.add_bos else None
    n_total = len(tokens) // n_ctx if n_chunks < 0 else min(n_chunks, len(tokens) // n_ctx)
    click.echo(f"perplexity: {matmul} matmul ({why})", err=True)
    model.warmup()
    click.echo(f"perplexity: calculating perplexity over {n_total} chunks, n_ctx={n_ctx}, "
               f"batch_size={n_batch}, n_seq={max(1, n_batch // n_ctx)}", err=True)
    last = None
    t0 = time.perf_counter()
    with tqdm(total=n_total * n_ctx, unit="tok", unit_scale=True, file=sys.stderr, leave=False,
              disable=None) as bar:
        for r in perplexity_chunks(model, tokens, n_ctx, n_batch, bos, n_chunks):
            click.echo(f"[{r.index}]{r.ppl:.4f},", nl=False)
            sys.stdout.flush()
            bar.update(n_ctx)
            bar.set_postfix(ppl=f"{r.ppl:.4f}")
            last = r
    click.echo("")
    assert last is not None
    secs = time.perf_counter() - t0
    click.echo(f"perplexity: {last.index * n_ctx / secs:.1f} tokens/s over {secs:.1f} s", err=True)
    click.echo(f"Final estimate: PPL = {last.ppl:.4f} +/- {last.error:.5f}")
