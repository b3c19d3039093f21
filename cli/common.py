"""What the commands share: the -m/--model and -t/--threads options, and opening the model.

    @click.command(cls=Command)
    @model_option()                 # -m/--model MODEL.gguf -> model_path (None: the bundled model)
    @threads_option()               # -t/--threads N -> threads (None: physical cores)
    def cmd(model_path, threads):
        n = start_threads(threads)
        path, mf = open_model(model_path)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from ggtrain.cli.options import THREADS_MAX, Int, PathType

if TYPE_CHECKING:
    from ggtrain.gguf.modelfile import ModelFile

BUNDLED = "the bundled Gemma 3 270M Q4_K_M"


def model_option(*aliases: str, help: str | None = None, bundled_default: bool = True) -> Callable:
    """-m/--model (plus aliases such as --model-base) as `model_path`; help says what a missing one means."""
    text = help or "Base model GGUF, any supported quantization"
    if bundled_default:
        text += f" (default: {BUNDLED})."
    return click.option("-m", "--model", *aliases, "model_path", type=PathType(dir_okay=False, path_type=Path),
                        default=None, help=text)


def threads_option() -> Callable:
    return click.option("-t", "--threads", type=Int(min=1, max=THREADS_MAX), default=None,
                        help="Threads for every kernel: OpenMP, Numba and BLAS alike (default: physical cores).")


def start_threads(threads: int | None) -> int:
    """Set every thread pool from the one knob; returns the count used."""
    from ggtrain.threads import default_threads, set_threads

    return set_threads(threads or default_threads())


def open_model(model_path: Path | None, check_types: bool = True) -> tuple[Path, ModelFile]:
    """(path, ModelFile) of -m, or of the bundled model when -m is not given."""
    from ggtrain.gguf.defaults import default_model_path
    from ggtrain.gguf.modelfile import ModelFile

    path = model_path or default_model_path()
    return path, ModelFile(path, check_types=check_types)


def compute_option(training: bool = True, dest: str = "compute") -> Callable:
    """--compute: the type of the products with the frozen base weights (`--matmul` is its old name);
    ggtrain.model.transformer.resolve_matmul turns the value into the mode that runs."""
    if training:
        choices, text = ["auto", "bf16", "f32"], (
            "Products with the frozen base weights: bf16 rounds their inputs (activations, output gradients, the "
            "dequantized weight tiles) to bf16 and accumulates in f32; f32 keeps everything f32. LoRA weights, "
            "gradients, optimizer state, norms, softmax and the loss are f32 either way. auto: bf16 where the CPU "
            "has native bf16 dot products that beat f32 (AMX tiles; AVX512-BF16 on AMD), f32 elsewhere.")
    else:
        choices, text = ["auto", "int8", "bf16", "f32"], (
            "Products with the quantized weights: int8 quantizes activations as llama.cpp does (AVX512-VNNI), bf16 "
            "rounds them to bf16 (AVX512-BF16), f32 keeps them f32; auto picks int8 where the CPU has it.")
    return click.option("--compute", "--matmul", dest, type=click.Choice(choices), default="auto",
                        show_default=True, help=text)

