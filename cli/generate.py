"""`ggtrain generate`: llama-completion's text continuation on the quantized base plus LoRA adapters.

The prompt is tokenized as llama.cpp does (BOS as the model says, special tokens parsed), prefilled
once, then a token a step over the KV cache; tokens are written to stdout as they are sampled (bytes
decoded incrementally, so a character split across tokens is printed whole), until an
end-of-generation token, -n tokens or a full context. Diagnostics and llama.cpp's timing lines go to
stderr. --compare runs the base model, then the adapted one, on the same prompt and seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from ggtrain.cli.common import compute_option, model_option, open_model, start_threads, threads_option
from ggtrain.cli.options import Command, Int, LoraArg, PathType, Text
from ggtrain.cli.sampling import sampling_options

from ggtrain.errors import GGTrainError

if TYPE_CHECKING:
    from ggtrain.generate.sampling import SamplingParams
    from ggtrain.generate.stream import GenStats

DEFAULT_CTX = 4096  # llama.cpp's 0 takes the model's training context (32k for Gemma 3): too much KV for a laptop
MIB = 1 << 20


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def timing_lines(st: GenStats, prefix: str = "generate") -> list[str]:
    """llama.cpp's closing lines (common_perf_print) for one generation."""

    def rate(ms: float, n: int) -> str:
        per = ms / n if n else float("nan")
        tps = 1e3 / ms * n if ms > 0 else float("nan")
        return f"({per:8.2f} ms per token, {tps:8.2f} tokens per second)"

    p_ms, e_ms = st.prompt_seconds * 1e3, st.eval_seconds * 1e3
    return [f"{prefix}:    sampling time = {st.sample_seconds * 1e3:10.2f} ms",
            f"{prefix}: prompt eval time = {p_ms:10.2f} ms / {st.prompt_tokens:5d} tokens {rate(p_ms, st.prompt_tokens)}",
            f"{prefix}:        eval time = {e_ms:10.2f} ms / {st.eval_runs:5d} runs   {rate(e_ms, st.eval_runs)}",
            (f"{prefix}:       total time = {(st.prompt_seconds + st.gen_seconds) * 1e3:10.2f} ms / "
             f"{st.prompt_tokens + st.eval_runs:5d} tokens")]


def token_printer(piece: Callable[[int], bytes]) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(on_token, flush): write each token's bytes to stdout as soon as they form whole UTF-8 characters."""
    from ggtrain.generate.stream import Utf8Stream

    out = sys.stdout

    def emit(text: str) -> None:
        out.write(text)
        out.flush()

    stream = Utf8Stream(piece, emit)
    return stream.push, stream.flush


@click.command(cls=Command)
@model_option()
@click.option("--lora", "loras", type=LoraArg(), multiple=True, metavar="ADAPTER[:SCALE]",
              help="Apply a LoRA adapter (a GGUF file or a PEFT directory), optionally scaled (negative too), "
                   "as llama.cpp's --lora / --lora-scaled. Repeatable: the adapters add up.")
@click.option("-p", "--prompt", type=Text(), default=None, help="The text to continue.")
@click.option("-f", "--file", "prompt_file", type=PathType(dir_okay=False, path_type=Path), default=None,
              help="Read the prompt from this UTF-8 file instead.")
@click.option("-n", "--n-predict", "n_predict", type=Int(min=0, also={-1: "until an end-of-generation token or a "
                                                                             "full context"}),
              default=-1, show_default=True, help="Tokens to generate at most.")
@sampling_options
@click.option("-c", "--ctx-size", "n_ctx", type=Int(min=8), default=None,
              help=f"Context size in tokens: prompt plus generated; the KV cache is sized from it "
                   f"(default: {DEFAULT_CTX}, or the model's training context if smaller).")
@threads_option()
@compute_option(training=False, dest="matmul")
@click.option("--compare", is_flag=True,
              help="Print the base model's continuation, then the adapted model's (same prompt, same seed).")
@click.option("--display-prompt/--no-display-prompt", default=True, show_default=True,
              help="Print the prompt before its continuation (llama.cpp's flag).")
@click.option("-cnv", "--conversation", "conversation", is_flag=True,
              help="Chat through the model's chat template instead, turns read from stdin (as `ggtrain chat`).")
def generate(model_path: Path | None, loras: tuple[str, ...], prompt: str | None, prompt_file: Path | None,
             n_predict: int, sampling: SamplingParams, n_ctx: int | None, threads: int | None, matmul: str,
             compare: bool, display_prompt: bool, conversation: bool) -> None:
    """Continue a prompt with a model (plus adapters), streaming tokens as llama-completion does."""
    if conversation:  # llama.cpp's -cnv: the chat loop over stdin (`ggtrain chat`)
        if prompt is not None or prompt_file is not None or compare:
            raise GGTrainError("-cnv is a conversation read from stdin: -p/-f/--compare do not apply "
                               "(`ggtrain chat --system TEXT` for a system message)")
        from ggtrain.cli.chat import start_chat

        start_chat(model_path, loras, sampling, n_predict, n_ctx, threads, matmul)
        return
    if prompt is not None and prompt_file is not None:
        raise GGTrainError("give the prompt once: -p PROMPT or -f FILE, not both")
    if prompt is None and prompt_file is None:
        raise GGTrainError("no prompt: give -p PROMPT or -f FILE")
    if compare and not loras:
        raise GGTrainError("--compare shows what adapters change: give at least one --lora")
    if prompt_file is not None:
        from ggtrain.cli.perplexity import read_text

        prompt = read_text(prompt_file)
    assert prompt is not None
    # Heavy imports (Numba kernels) here, so `ggtrain --help` stays quick.
    import gc

    from ggtrain import kernels
    from ggtrain.adapters.load import load_adapter_arg
    from ggtrain.generate.decoder import Decoder
    from ggtrain.generate.kvcache import KVCache
    from ggtrain.generate.sampling import Sampler
    from ggtrain.generate.stream import generate_tokens
    from ggtrain.model.transformer import Adapter, Model, require_matmul, resolve_matmul
    from ggtrain.text.tokenizer import Tokenizer

    n_threads = start_threads(threads)
    notice = kernels.first_run_notice()
    if notice:
        echo_err(f"generate: {notice}")
    _, mf = open_model(model_path)
    model = Model(mf)
    adapters = [Adapter(load_adapter_arg(arg, mf)) for arg in loras]
    tok = Tokenizer.from_model_file(mf)
    gc.collect()
    gc.freeze()  # the vocabulary's objects live as long as the run: keep them out of every collection
    hp = model.hp
    n_ctx = n_ctx or min(DEFAULT_CTX, hp.n_ctx_train)
    if n_ctx > hp.n_ctx_train:
        echo_err(f"generate: warning: the model was trained on only {hp.n_ctx_train} context tokens "
                 f"({n_ctx} specified)")
    ids = tok.encode(prompt, add_special=True, parse_special=True)
    if len(ids) > n_ctx - 4:  # llama.cpp's limit: room for a few generated tokens
        raise GGTrainError(f"the prompt is too long ({len(ids)} tokens, max {n_ctx - 4} with -c {n_ctx}): "
                           "raise -c/--ctx-size or shorten the prompt")
    if not ids:
        raise GGTrainError("the prompt is empty: there is nothing to continue")
    mode, why = resolve_matmul(matmul)
    require_matmul(mode)
    echo_err(f"generate: n_ctx = {n_ctx} (the model's training context: {hp.n_ctx_train}), KV cache "
             f"{KVCache.bytes_for(hp, n_ctx) / MIB:.1f} MiB (f32), n_threads = {n_threads}")
    echo_err(f"generate: {mode} matmul ({why})")
    runs = [("base model", [])] if compare else []
    runs.append(("with " + ", ".join(loras), adapters) if compare else ("", adapters))
    stop = tok.eog_ids
    status = 0
    for label, ads in runs:
        model.adapters = list(ads)
        decoder = Decoder(model, n_ctx, mode)
        decoder.warmup()
        sampler = Sampler(sampling)
        echo_err(f"generate: sampler seed: {sampler.seed}, n_predict = {n_predict}, prompt {len(ids)} tokens")
        if label:
            click.echo(f"--- {label} ---")
        if display_prompt:
            click.echo(prompt, nl=False)  # as given (llama.cpp echoes its tokens: the same text)
            sys.stdout.flush()
        on_token, flush = token_printer(lambda t: tok.piece_bytes(t, special=False))
        st = generate_tokens(decoder, sampler, ids, n_predict, stop, on_token)
        flush()
        click.echo(" [end of text]" if st.stopped_by == "eog" else "")
        if st.stopped_by == "ctx":
            echo_err(f"generate: context full ({n_ctx} tokens, -c) => stopping")
        for line in timing_lines(st):
            echo_err(line)
        if st.stopped_by == "interrupt":
            echo_err("generate: interrupted")
            status = 130
            break
        del decoder
    if status:
        sys.exit(status)
