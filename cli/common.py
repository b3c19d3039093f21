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
