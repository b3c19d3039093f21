"""The data flags, shared by `ggtrain data` and `ggtrain finetune`: one decorator, one DataOptions.

    @click.command()
    @data_options
    def finetune(..., **kw):
        opts = data_options_from(kw)     # pops the data flags out of kw -> DataOptions

Flag names and meanings follow llama.cpp's finetune where it had them (--sample-start, --escape,
--separate-with-eos/bos, --fill-with-next-samples, --sample-random-offsets, -c/--ctx, --seed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from ggtrain.cli.options import SEED_REFUSALS, UINT32_MAX, Float, Int, PathType, Text

from ggtrain.dataset.formats import FORMATS
from ggtrain.dataset.samples import DEFAULT_CTX, DEFAULT_SEED, DataOptions

_FILE = PathType(exists=True, path_type=Path)

# (param declarations, keyword arguments) in the order --help lists them.
DATA_FLAGS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--train-data",), {"type": _FILE, "default": None, "metavar": "FILE",
     "help": "Training data: a text file (plain, or '### Instruction / ### Response' pairs), JSON "
          "array, JSONL, CSV/TSV, a local Hugging Face dataset directory (save_to_disk output or "
          "parquet files), or an MLX-LM data directory (train.jsonl, valid.jsonl)."}),
    (("--val-data",), {"type": _FILE, "default": None, "metavar": "FILE",
     "help": "Held-out data for validation loss, read with the same flags as --train-data."}),
    (("--val-split",), {"type": Float(0.0, 1.0, max_open=True), "default": 0.0, "show_default": True,
     "metavar": "F", "help": "Hold out this fraction of the training samples (chosen with --seed) for "
                       "validation; a single text stream is split at its last F of tokens."}),
    (("--format", "data_format"), {"type": click.Choice(FORMATS), "default": "auto", "show_default": True,
     "help": "Force the file format (text, json, jsonl, csv, tsv, hf) or the record schema (alpaca, "
          "chat, sharegpt, completion); auto detects the format from the file name and the schema "
          "from the fields of the first record. text reads a text file as one plain stream, "
          "every token trained, even when it holds instruction pairs."}),
    (("--text-column",), {"type": Text(), "default": None, "metavar": "NAME",
     "help": "Field holding the text to train on in JSON/CSV/HF data (default: text). Naming it "
          "makes that field win over Alpaca/chat fields."}),
    (("--chat-template",), {"type": PathType(exists=True, dir_okay=False, path_type=Path), "default": None,
     "metavar": "FILE", "help": "Jinja chat template for chat/ShareGPT data, instead of the model's own "
                          "(needed when the GGUF has none)."}),
    (("--train-on-prompt",), {"is_flag": True, "default": False,
     "help": "Train on every token. By default only responses (Alpaca output, completion, assistant "
          "turns) are trained and prompts are context."}),
    (("--sample-start",), {"type": Text(nonempty=False), "default": None, "metavar": "STR",
     "help": "Plain text: a sample begins at every occurrence of STR (e.g. '### Instruction'); a "
          "sample with a '### Response' line trains only its response. Without it, a file of "
          "instruction pairs is read as pairs, any other text as one stream cut into --ctx windows."}),
    (("--include-sample-start",), {"is_flag": True, "default": False,
     "help": "Keep the --sample-start string at the beginning of each sample (it is removed by default)."}),
    (("--escape",), {"is_flag": True, "default": False,
     "help": r"Process escapes (\n, \r, \t, \', \", \\, \xHH) in --sample-start."}),
    (("--separate-with-eos/--no-separate-with-eos",), {"default": None,
     "help": "End every sample with EOS, trained, so the model learns to stop (default: on for "
          "Alpaca and prompt/completion, off for text and chat, whose templates end turns "
          "themselves)."}),
    (("--separate-with-bos/--no-separate-with-bos",), {"default": None,
     "help": "Begin every sample with BOS (default: as the model's tokenizer adds BOS at inference)."}),
    (("--fill-with-next-samples/--no-fill-with-next-samples",), {"default": True, "show_default": True,
     "help": "Pack several samples into one --ctx row, each with its own positions and no attention "
          "across samples; --no-fill-with-next-samples pads each sample to a row of its own."}),
    (("--sample-random-offsets",), {"is_flag": True, "default": False,
     "help": "Each epoch, split samples longer than --ctx (or cut them, with --truncate) at a random "
          "offset, so window boundaries vary between epochs."}),
    (("-c", "--ctx"), {"type": Int(min=2), "default": DEFAULT_CTX, "show_default": True,
     "help": "Context length of a training row, in tokens."}),
    (("--truncate",), {"is_flag": True, "default": False,
     "help": "Cut samples longer than --ctx to their first --ctx tokens instead of splitting them "
          "into several windows."}),
    (("--seed",), {"type": Int(min=0, max=UINT32_MAX, refusals=SEED_REFUSALS), "default": DEFAULT_SEED, "show_default": True,
     "help": "Seed for shuffling, random offsets and the validation split."}),
    (("--skip-bad-lines",), {"is_flag": True, "default": False,
     "help": "Skip (and count) malformed or unusable records instead of stopping at the first one."}),
]

_KEYS = ("train_data", "val_data", "val_split", "data_format", "text_column", "chat_template",
         "train_on_prompt", "sample_start", "include_sample_start", "escape", "separate_with_eos",
         "separate_with_bos", "fill_with_next_samples", "sample_random_offsets", "ctx", "truncate",
         "seed", "skip_bad_lines")


def data_options(f: Callable) -> Callable:
    """Add every data flag to a click command."""
    for decls, kw in reversed(DATA_FLAGS):
        f = click.option(*decls, **kw)(f)
    return f


def data_options_from(kw: dict[str, Any]) -> DataOptions:
    """Pop the data flags out of a command's keyword arguments into a DataOptions."""
    v = {k: kw.pop(k) for k in _KEYS if k in kw}
    v["format"] = v.pop("data_format", "auto")
    return DataOptions(**v)
