"""`ggtrain tokenize`: the token ids of a text, printed exactly as llama.cpp's llama-tokenize does."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from ggtrain.cli.common import model_option, open_model
from ggtrain.cli.options import Command, PathType

from ggtrain.errors import GGTrainError
from ggtrain.text.tokenizer import Tokenizer

_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"',
            ord("\\"): b"\\"}


def _strtol2(two: bytes) -> int | None:
    """strtol(two, &end, 16) when it consumes both characters (leading space or sign allowed)."""
    hexd = b"0123456789abcdefABCDEF"
    if two[1] in hexd and (two[0] in hexd or two[0] in b" \t\n\v\f\r+-"):
        return -int(two[1:], 16) if two[:1] == b"-" else int(two.strip(b" \t\n\v\f\r+"), 16)
    return None


def process_escapes(raw: bytes) -> bytes:
    """\\n \\r \\t \\' \\" \\\\ and \\xHH turned into the bytes they name, as llama.cpp's
    string_process_escapes does; any other backslash stays as written."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x5C and i + 1 < n:
            i += 1
            e = raw[i]
            if e in _ESCAPES:
                out += _ESCAPES[e]
            elif e == ord("x") and i + 2 < n and (v := _strtol2(raw[i + 1:i + 3])) is not None:
                out.append(v & 0xFF)
                i += 2
            else:
                out += bytes([0x5C, e])
        else:
            out.append(c)
        i += 1
    return bytes(out)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@model_option(help="GGUF model whose tokenizer to use")
@click.option("-p", "--prompt", type=str, default=None, help="Text to tokenize.")
@click.option("-f", "--file", "file", type=PathType(dir_okay=False, path_type=Path), default=None,
              help="Read the text from FILE, byte for byte (a final newline is a token too).")
@click.option("--stdin", "use_stdin", is_flag=True, help="Read the text from standard input.")
@click.option("--ids", is_flag=True,
              help="Print only the ids, as a Python list on one line (like llama-tokenize --ids).")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token even if the model adds one.")
@click.option("--no-parse-special", is_flag=True,
              help="Do not turn control-token texts such as <start_of_turn> into their ids.")
@click.option("--no-escape", is_flag=True,
              help=r"Take \n, \t, \xHH ... in the text literally (by default they are processed).")
@click.option("--show-count", is_flag=True, help="Print the number of tokens at the end.")
def tokenize(model_path: Path | None, prompt: str | None, file: Path | None, use_stdin: bool, ids: bool,
             no_bos: bool, no_parse_special: bool, no_escape: bool, show_count: bool) -> None:
    """Tokenize a text with a GGUF model's tokenizer, as llama.cpp's llama-tokenize does.

    Without --ids, one line per token: its id and the text it stands for.
    """
    sources = [name for name, given in (("-p", prompt is not None), ("-f", file is not None),
                                        ("--stdin", use_stdin)) if given]
    if not sources:
        raise GGTrainError("give the text with -p TEXT, -f FILE or --stdin")
    if len(sources) > 1:
        raise GGTrainError(f"give the text only once (got {' and '.join(sources)})")
    if file is not None:
        if not file.is_file():
            raise GGTrainError(f"{file}: no such file")
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise GGTrainError(f"{file}: cannot read: {e.strerror or e}") from None
    elif use_stdin:
        raw = sys.stdin.buffer.read()
    else:
        assert prompt is not None
        raw = prompt.encode("utf-8", errors="surrogateescape")
    if not no_escape:
        raw = process_escapes(raw)
    # invalid UTF-8 (only possible through \xHH or a binary file) becomes U+FFFD
    text = raw.decode("utf-8", errors="replace")

    tok = Tokenizer.from_model_file(open_model(model_path, check_types=False)[1])
    add_special = tok.add_bos and not no_bos  # llama-tokenize passes add_bos as add_special
    tokens = tok.encode(text, add_special=add_special, parse_special=not no_parse_special)

    out = sys.stdout.buffer
    if ids:
        out.write(("[" + ", ".join(map(str, tokens)) + "]\n").encode())
    else:
        for t in tokens:
            piece = tok.piece_bytes(t).split(b"\0", 1)[0]  # llama-tokenize prints a C string
            out.write(f"{t:6d} -> '".encode() + piece + b"'\n")
    if show_count:
        out.write(f"Total number of tokens: {len(tokens)}\n".encode())
    out.flush()
