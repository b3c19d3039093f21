"""Ollama Modelfiles: a GGUF base plus one ggtrain adapter (or a merged model) for `ollama create`.

What Ollama reads (its parser/parser.go): one instruction per line, the keyword case-insensitive
(FROM, ADAPTER, PARAMETER, SYSTEM, TEMPLATE, MESSAGE, LICENSE, ...), its argument the rest of the
line. An argument that starts with " or \"\"\" runs to the matching close, across lines, and is taken
as it is (there are no escapes: an argument cannot hold a \"\"\" of its own). A # at the start of an
instruction makes the line a comment.

What ggtrain writes:
    FROM /abs/base.gguf            (or the merged model)
    ADAPTER /abs/adapter.gguf      Ollama takes one adapter per model: two are refused (merge them)
    PARAMETER stop "<eos>"         one per end-of-generation token of the GGUF (the tokenizer's EOG set)
    SYSTEM \"\"\"...\"\"\"               when given
No TEMPLATE: Ollama picks its template from the GGUF's own tokenizer.chat_template, and a Go
template written here could only be a guess at that one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from ggtrain import __version__
from ggtrain.atomic import atomic_write
from ggtrain.errors import GGTrainError
from ggtrain.text.tokenizer import Tokenizer

TRIPLE = '"""'


def quote(text: str, what: str) -> str:
    """An argument as Ollama reads it back unchanged: "..." for one line, \"\"\"...\"\"\" for several or
    for text holding a " (what: the instruction, for the refusal of text no quoting can carry)."""
    if TRIPLE in text:
        raise GGTrainError(f"{what}: the text holds {TRIPLE}, which an Ollama Modelfile cannot quote "
                           "(it would end the argument there)")
    if "\n" in text or "\r" in text or '"' in text:
        return TRIPLE + text + TRIPLE
    return f'"{text}"'


def stop_texts(tok: Tokenizer) -> list[str]:
    """The end-of-generation tokens as text, in id order (empty ones left out: no stop string)."""
    texts = [tok.piece(i, special=True) for i in sorted(tok.eog_ids)]
    return list(dict.fromkeys(t for t in texts if t.strip()))


def modelfile_text(model: Path, adapter: Path | None, stops: Iterable[str], system: str | None = None,
                   comments: Iterable[str] = ()) -> str:
    """The Modelfile: FROM model, ADAPTER adapter (if any), PARAMETER stop ..., SYSTEM (if given).
    Paths must be absolute: Ollama resolves relative ones against the Modelfile's directory."""
    for p in (model, adapter):
        if p is not None and not p.is_absolute():
            raise ValueError(f"{p}: a Modelfile path must be absolute")
        if p is not None and ("\n" in str(p) or "\r" in str(p)):  # it would split the instruction
            raise GGTrainError(f"{p!r}: a path with a line break cannot go in a Modelfile")
    lines = [f"# {c}" for c in (f"written by ggtrain {__version__}", *comments)]
    lines.append(f"FROM {model}")
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines += [f"PARAMETER stop {quote(s, 'PARAMETER stop')}" for s in stops]
    if system is not None:
        lines.append(f"SYSTEM {quote(system, '--system')}")
    return "\n".join(lines) + "\n"


def ollama_name(stem: str) -> str:
    """A model name `ollama create` takes (letters, digits, '.', '-', '_'), from a file's stem."""
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name or "ggtrain-model"


def write_modelfile(path: str | os.PathLike, text: str) -> Path:
    """Write the Modelfile atomically (an earlier one stays whole if this fails)."""
    path = Path(path)
    if path.is_dir():
        raise GGTrainError(f"{path}: is a directory; give the Modelfile's file name")
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    return path
