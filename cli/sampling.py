"""The sampling flags, shared by `ggtrain generate` and `ggtrain chat`: one decorator, one SamplingParams.

    @click.command(cls=Command)
    @sampling_options
    def generate(..., sampling: SamplingParams):   # the seven flags arrive as one SamplingParams

Names, defaults and meanings are llama.cpp's (common/arg.cpp, 0.3.36): --temp 0.8, --top-k 40,
--top-p 0.95, --min-p 0.05, --repeat-penalty 1.0, --repeat-last-n 64, -s/--seed -1 (random).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
from ggtrain.cli.options import UINT32_MAX, Float, Int

# (param declarations, keyword arguments) in the order --help lists them.
SAMPLING_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--temp", "--temperature", "temp"), {"type": Float(min=0.0), "default": 0.8, "show_default": True, "metavar": "T",
     "help": "Temperature: logits are divided by it before the draw; 0 is greedy, always the most "
          "likely token."}),
    (("--top-k", "top_k"), {"type": Int(min=0), "default": 40, "show_default": True,
     "metavar": "K", "help": "Keep only the K most likely tokens (0: off)."}),
    (("--top-p", "top_p"), {"type": Float(0.0, 1.0), "default": 0.95, "show_default": True, "metavar": "P",
     "help": "Keep the most likely tokens whose probabilities add up to P (1.0: off)."}),
    (("--min-p", "min_p"), {"type": Float(0.0, 1.0), "default": 0.05, "show_default": True, "metavar": "P",
     "help": "Drop tokens less likely than P times the most likely one (0.0: off)."}),
    (("--repeat-penalty", "repeat_penalty"), {"type": Float(min=0.0, min_open=True), "default": 1.0,
     "show_default": True, "metavar": "R",
     "help": "Penalise tokens among the last --repeat-last-n: positive logits divided by R, negative ones "
          "multiplied (1.0: off)."}),
    (("--repeat-last-n", "repeat_last_n"), {"type": Int(min=0), "default": 64, "show_default": True,
     "metavar": "N", "help": "How many recent tokens --repeat-penalty looks at (0: off)."}),
    (("-s", "--seed", "seed"), {"type": Int(min=0, max=UINT32_MAX, also={-1: "a random seed"}), "default": -1,
     "show_default": True, "metavar": "S",
     "help": "Seed of the draw: the same seed gives the same text (-1: a random one, printed)."}),
]
_KEYS = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


def sampling_options(f: Callable) -> Callable:
    """Add the sampling flags to a click command; it receives them as one `sampling: SamplingParams`."""

    @functools.wraps(f)
    def command(*args: Any, **kw: Any) -> Any:
        from ggtrain.generate.sampling import SamplingParams

        kw["sampling"] = SamplingParams(**{k: kw.pop(k) for k in _KEYS})
        return f(*args, **kw)

    for decls, opts in reversed(SAMPLING_FLAGS):
        command = click.option(*decls, **opts)(command)
    return command
