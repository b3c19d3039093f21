"""Reading training files: detect the container (text, JSON, JSONL, CSV/TSV, HF dir) and the schema
(plain text, Alpaca, chat, ShareGPT, prompt/completion), and turn every record into an `Example`.
A text file in the "### Instruction: / ### Response:" form is read as Alpaca pairs (see
`_instruction_pairs`); a directory in MLX-LM's layout names its files with `data_dir_files`.

Nothing here tokenises: an Example says which text is trained (response, assistant turns) and
which is context (prompt); ggtrain.dataset.samples turns it into tokens and a loss mask.

Bad input (a malformed JSON line, a missing column, a field of the wrong type, an empty file,
bytes that are not UTF-8) raises GGTrainError naming the file and the line, or with
skip_bad_lines=True is skipped and counted in `ReadResult.bad`.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggtrain.errors import GGTrainError

CONTAINERS = ("text", "json", "jsonl", "csv", "tsv", "hf")
SCHEMAS = ("alpaca", "chat", "sharegpt", "completion")
FORMATS = ("auto",) + CONTAINERS + SCHEMAS

# ShareGPT speaker names -> OpenAI roles (the spellings found in the wild).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant",
    "system": "system",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")

# Prompt layout of Alpaca records: the "### Instruction / ### Response" format of llama.cpp's finetune
# examples, so an Alpaca JSON and the same data as a text file teach the model one prompt format.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"

_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"


@dataclass
class Example:
    """One training sample before tokenisation. Exactly one of text / (prompt, response) / messages."""

    where: str                              # "line 12" / "row 3": where it starts in its file
    text: str | None = None                 # plain text: every token trained
    prompt: str | None = None               # Alpaca / completion: context, not trained by default
    response: str | None = None             # Alpaca / completion: trained
    messages: list[dict] | None = None      # chat: {"role", "content"}; assistant turns trained


@dataclass
class ReadResult:
    path: Path
    container: str                          # one of CONTAINERS
    schema: str                             # "text" or one of SCHEMAS
    examples: list[Example]
    bad: list[str] = field(default_factory=list)   # "line 7: ..." for each skipped record
    notes: list[str] = field(default_factory=list)  # things the user should know (ignored text, ...)


def process_escapes(s: str) -> str:
    r"""llama.cpp's process_escapes: \n \r \t \' \" \\ and \xHH; other backslashes are kept."""
    out, i = [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt in simple:
                out.append(simple[nxt])
                i += 2
                continue
            if nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", s[i + 2:i + 4] or ""):
                out.append(chr(int(s[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


class _Reader:
    """Shared state of one file's reading: the path, and whether bad records are skipped."""

    def __init__(self, path: Path, skip_bad_lines: bool):
        self.path = path
        self.skip = skip_bad_lines
        self.bad: list[str] = []
        self.notes: list[str] = []

    def fail(self, where: str, msg: str) -> None:
        """A bad record: raise, or note it and let the caller skip it."""
        if not self.skip:
            raise GGTrainError(f"{self.path}: {where}: {msg}"
                               + ("" if "--skip-bad-lines" in msg else " (--skip-bad-lines skips such records)"))
        self.bad.append(f"{where}: {msg}")

    def fatal(self, where: str, msg: str) -> GGTrainError:
        return GGTrainError(f"{self.path}: {where}: {msg}")

    def read_text(self) -> str:
        """The file as str; undecodable bytes stay as lone surrogates for the per-line check."""
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise GGTrainError(f"{self.path}: cannot read: {e.strerror or e}") from None
        if not raw.strip():
            raise self.fatal("line 1", "the file is empty")
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors)
            raw = raw[3:]
        return raw.decode("utf-8", errors="surrogateescape")

    def check_utf8(self, s: str, where: str) -> bool:
        """True if s came from valid UTF-8; otherwise report the bad bytes at `where`."""
        m = _SURROGATE.search(s)
        if m is None:
            return True
        byte = ord(m.group()) - 0xDC00
        self.fail(where, f"bytes that are not UTF-8 (0x{byte:02x}); re-save the file as UTF-8")
        return False


class _Lines:
    """Line numbers of many offsets into one text (bisect over its newlines, not a count each time)."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def of(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1


MLX_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")  # MLX-LM's data directory (mlx_lm.lora --data)


@dataclass
class DataDir:
    """A directory in MLX-LM's layout: its training file, and its validation and test files if present."""

    path: Path
    train: Path
    valid: Path | None
    test: Path | None


def data_dir(path: Path) -> DataDir | None:
    """A --train-data directory: None for a Hugging Face dataset (read by hfdata), a DataDir for
    MLX-LM's train.jsonl / valid.jsonl / test.jsonl; anything else is an error saying what is expected."""
    from ggtrain.dataset import hfdata

    if hfdata.is_hf_dir(path):
        return None
    train, valid, test = (path / n for n in MLX_FILES)
    if train.is_file():
        return DataDir(path, train, valid if valid.is_file() else None, test if test.is_file() else None)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "") or "nothing"
    raise GGTrainError(f"{path}: a data directory should hold train.jsonl (with valid.jsonl and test.jsonl "
                       f"if you have them: MLX-LM's layout) or a Hugging Face dataset (save_to_disk output "
                       f"with dataset_dict.json or state.json, or .parquet files); it holds {shown}")


def detect_container(path: Path) -> str:
    """The container from the path: directory/.parquet/.arrow -> hf, .json/.jsonl/.csv/.tsv, else text."""
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return "hf"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        # A .json file holding one object per line is JSONL; an array is JSON.
        try:
            with open(path, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        except OSError as e:
            raise GGTrainError(f"{path}: cannot read: {e.strerror or e}") from None
        return "jsonl" if head.startswith(b"{") else "json"
    if suffix == ".csv":
        return "csv"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    return "text"


def detect_schema(keys: set[str], text_column: str | None) -> str | None:
    """The schema a record's fields say; an explicit --text-column wins over field names."""
    if text_column is not None and text_column in keys:
        return "text"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    return None


def _schema_help(keys: set[str], text_column: str | None) -> str:
    found = ", ".join(sorted(map(str, keys))) or "none"
    col = text_column or "text"
    return (f"no field to train on: found fields {found}; expected '{col}' (--text-column), "
            f"instruction/input/output (Alpaca), messages (chat), conversations (ShareGPT) "
            f"or prompt/completion")


# --- records -> Examples, one function per schema ------------------------------------------------

def _text_example(rd: _Reader, rec: dict, where: str, column: str) -> Example | None:
    if column not in rec or rec[column] is None:
        rd.fail(where, f"missing column '{column}'")
        return None
    v = rec[column]
    if not isinstance(v, str):
        rd.fail(where, f"field '{column}' should be a string, not {type(v).__name__}")
        return None
    return Example(where, text=v)


def _str_field(rd: _Reader, rec: dict, where: str, name: str, required: bool) -> tuple[bool, str]:
    v = rec.get(name)
    if v is None:
        if required:
            rd.fail(where, f"missing column '{name}'")
            return False, ""
        return True, ""
    if not isinstance(v, str):
        rd.fail(where, f"field '{name}' should be a string, not {type(v).__name__}")
        return False, ""
    return True, v


def _alpaca_example(rd: _Reader, rec: dict, where: str, column: str) -> Example | None:
    ok1, instruction = _str_field(rd, rec, where, "instruction", True)
    ok2, inp = _str_field(rd, rec, where, "input", False) if ok1 else (False, "")
    ok3, output = _str_field(rd, rec, where, "output", True) if ok2 else (False, "")
    if not (ok1 and ok2 and ok3):
        return None
    tmpl = ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT
    return Example(where, prompt=tmpl.format(instruction=instruction, input=inp), response=output)


def _completion_example(rd: _Reader, rec: dict, where: str, column: str) -> Example | None:
    ok1, prompt = _str_field(rd, rec, where, "prompt", True)
    ok2, completion = _str_field(rd, rec, where, "completion", True) if ok1 else (False, "")
    if not (ok1 and ok2):
        return None
    return Example(where, prompt=prompt, response=completion)


def _content_text(content: Any) -> str | None:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _chat_example(rd: _Reader, rec: dict, where: str, column: str) -> Example | None:
    msgs = rec.get("messages")
    if msgs is None:
        rd.fail(where, "missing column 'messages'")
        return None
    if not isinstance(msgs, list) or not msgs:
        rd.fail(where, "field 'messages' should be a non-empty list of {role, content} objects")
        return None
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            rd.fail(where, f"messages[{i}] should be an object with 'role' and 'content'")
            return None
        role, content = m["role"], _content_text(m["content"])
        if role not in CHAT_ROLES:
            rd.fail(where, f"messages[{i}] has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
            return None
        if content is None:
            rd.fail(where, f"messages[{i}].content should be a string, not {type(m['content']).__name__}")
            return None
        out.append({"role": role, "content": content})
    return Example(where, messages=out)


def _sharegpt_example(rd: _Reader, rec: dict, where: str, column: str) -> Example | None:
    conv = rec.get("conversations")
    if conv is None:
        rd.fail(where, "missing column 'conversations'")
        return None
    if not isinstance(conv, list) or not conv:
        rd.fail(where, "field 'conversations' should be a non-empty list of {from, value} objects")
        return None
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            rd.fail(where, f"conversations[{i}] should be an object with 'from' and 'value'")
            return None
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            rd.fail(where, f"conversations[{i}] is from {m['from']!r}; expected human, gpt or system")
            return None
        if not isinstance(m["value"], str):
            rd.fail(where, f"conversations[{i}].value should be a string, not {type(m['value']).__name__}")
            return None
        out.append({"role": role, "content": m["value"]})
    return Example(where, messages=out)


_CONVERTERS: dict[str, Callable[[_Reader, dict, str, str], Example | None]] = {
    "text": _text_example, "alpaca": _alpaca_example, "completion": _completion_example,
    "chat": _chat_example, "sharegpt": _sharegpt_example,
}


def _examples_from_records(rd: _Reader, records: list[tuple[str, Any]], schema: str | None,
                           text_column: str | None) -> tuple[str, list[Example]]:
    """Records (where, parsed object) -> Examples; the schema is detected from the first object."""
    if schema is None:
        first = next((r for _, r in records if isinstance(r, dict)), None)
        if first is None:
            where = records[0][0] if records else "line 1"
            raise rd.fatal(where, "records should be JSON objects ({...}) with named fields")
        schema = detect_schema(set(first), text_column)
        if schema is None:
            where = next(w for w, r in records if r is first)
            raise rd.fatal(where, _schema_help(set(first), text_column))
    conv = _CONVERTERS[schema]
    column = text_column or "text"
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            rd.fail(where, f"record should be a JSON object, not {type(rec).__name__}")
            continue
        ex = conv(rd, rec, where, column)
        if ex is not None:
            out.append(ex)
    return schema, out


# --- containers ------------------------------------------------------------------------------------

def _records_jsonl(rd: _Reader, text: str) -> list[tuple[str, Any]]:
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {i}"
        if not rd.check_utf8(line, where):
            continue
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            rd.fail(where, f"malformed JSON ({e.msg} at column {e.colno})")
    return out


def _records_json_array(rd: _Reader, text: str) -> list[tuple[str, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    lines = _Lines(text)
    m = _SURROGATE.search(text)
    if m is not None:
        raise rd.fatal(f"line {lines.of(m.start())}",
                       f"bytes that are not UTF-8 (0x{ord(m.group()) - 0xDC00:02x}); re-save the file as UTF-8")
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise rd.fatal(f"line {lines.of(pos)}", "expected a JSON array ([{...}, ...]) or one object a line")

    def syntax(e_pos: int, msg: str) -> GGTrainError:
        return rd.fatal(f"line {lines.of(e_pos)}",
                        f"malformed JSON ({msg}); a JSON array cannot be read past a syntax error "
                        f"(--skip-bad-lines works on JSONL files)")

    out: list[tuple[str, Any]] = []
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return out
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise syntax(e.pos, f"{e.msg} at column {e.colno}") from None
        out.append((f"line {lines.of(pos)}", obj))
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            rest = ws.match(text, pos + 1).end()
            if rest != len(text):
                raise syntax(rest, "extra data after the array")
            return out
        raise syntax(pos, "expected ',' or ']' after an element")


def _unterminated_quote(text: str, start: int, delimiter: str) -> int | None:
    """Offset of the opening quote of a quoted field that is never closed, scanning the records from
    offset `start` (the last record's start: an unclosed quote runs to the end of the file), or None.

    csv's reader, as it is used here (not strict), reads such a field silently to the end of the
    file, turning the rest of it into one value; its quoting rules are followed: a quote opens a
    field only as its first character, and "" inside quotes is a literal quote.
    """
    field_start, opened, in_quote = start, -1, False
    marks = re.compile(f'["{re.escape(delimiter)}\n]').finditer(text, start)
    for m in marks:
        c, pos = m.group(), m.start()
        if in_quote:
            if c == '"':
                if text.startswith('"', pos + 1):
                    next(marks, None)  # the second quote of ""
                else:
                    in_quote = False
        elif c == '"':
            if pos == field_start:
                in_quote, opened = True, pos
        else:
            field_start = pos + 1  # after a delimiter or a newline a new field starts
    return opened if in_quote else None


def _records_csv(rd: _Reader, text: str, delimiter: str) -> list[tuple[str, Any]]:
    kind = "CSV" if delimiter == "," else "TSV"
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB per field is too small for long documents
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    lines = _Lines(text)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as e:
        raise rd.fatal("line 1", f"cannot read the header: {e}") from None
    # Every record first (with the line it starts on), so an unclosed quote in the last one is
    # reported as what it is before any of its symptoms (one huge field, too few fields).
    raw: list[tuple[int, list[str] | csv.Error]] = []
    start = reader.line_num + 1
    while True:
        try:
            raw.append((start, next(reader)))
        except StopIteration:
            break
        except csv.Error as e:
            raw.append((start, e))
        start = reader.line_num + 1
    last = raw[-1][0] if raw else 1
    q = _unterminated_quote(text, lines.newlines[last - 2] + 1 if last > 1 else 0, delimiter)
    if q is not None:
        raise rd.fatal(f"line {lines.of(q)}", "a quoted field starts here and its closing quote is missing, "
                                              "so the rest of the file would be read as one field; close it "
                                              "(a quote inside a quoted field is written \"\")")
    if not rd.check_utf8(delimiter.join(header), "line 1"):
        raise rd.fatal("line 1", "the header has bytes that are not UTF-8")
    header = [h.strip() for h in header]
    out: list[tuple[str, Any]] = []
    for line, row in raw:
        where = f"line {line}"
        if isinstance(row, csv.Error):
            rd.fail(where, f"malformed {kind} ({row})")
            continue
        if not any(c.strip() for c in row):
            continue  # blank line
        if not rd.check_utf8(delimiter.join(row), where):
            continue
        if len(row) != len(header):
            sep = "a comma" if delimiter == "," else "a tab"
            rd.fail(where, f"has {len(row)} fields, the header has {len(header)} "
                           f"({f'a field with {sep} needs quotes' if len(row) > len(header) else 'missing fields'})")
            continue
        out.append((where, dict(zip(header, row))))
    return out


def _records_hf(rd: _Reader, path: Path) -> list[tuple[str, Any]]:
    """A local Hugging Face dataset: save_to_disk output (a Dataset or DatasetDict dir) or parquet files."""
    from ggtrain.dataset import hfdata

    rows = hfdata.read_rows(path)
    return [(f"row {i}", r) for i, r in enumerate(rows, 1)]


# --- plain text: one stream, --sample-start samples, or "### Instruction / ### Response" pairs ---------

# A header line of the Alpaca text form: "### Instruction:", "## Response", "### Input: text" (the
# colon may carry the field's first line). "### Response time" is a heading, not a header.
_PAIR_HEADER = re.compile(r"^#{2,4}[ \t]*(instruction|input|response)\b[ \t]*(:?)([^\n]*)$", re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)  # headers inside fenced code are text (a markdown doc)
_PAIR_NAME = "'### Instruction' / '### Response'"


@dataclass
class _Header:
    kind: str        # instruction / input / response
    line_start: int  # offset of its line
    end: int         # offset just after it: after the colon, or at the end of its line


def _pair_headers(text: str) -> list[_Header]:
    fences = [m.start() for m in _FENCE.finditer(text)]
    out = []
    for m in _PAIR_HEADER.finditer(text):
        if (not m.group(2) and m.group(3).strip()) or bisect.bisect_right(fences, m.start()) % 2:
            continue
        out.append(_Header(m.group(1).lower(), m.start(), m.end(2) if m.group(2) else m.end()))
    return out


def _common_indent(text: str) -> str:
    """The indentation every non-blank line shares: a file copied from a tutorial's indented code block."""
    return os.path.commonprefix(re.findall(r"^([ \t]*)\S", text, re.MULTILINE))


def _dedent(text: str, indent: str) -> str:
    return re.sub(f"^{re.escape(indent)}", "", text, flags=re.MULTILINE) if indent else text


def _pair_example(rd: _Reader, text: str, first_line: int) -> Example | None:
    """One sample in the Alpaca text form -> Example(prompt, response), as an Alpaca record becomes.

    The prompt is the sample's text up to its '### Response' header and the line break after it,
    as written; the response is the rest without trailing blank lines (the end of a sample is the
    EOS that tokenisation appends, as for Alpaca).
    """
    def line(pos: int) -> str:
        return f"line {first_line + text.count(chr(10), 0, pos)}"

    heads = _pair_headers(text)
    resp = [h for h in heads if h.kind == "response"]
    if not resp:
        rd.fail(f"line {first_line}", "no '### Response' line in this sample, while other samples of the "
                                      "file have one (each sample needs its '### Response')")
        return None
    r = resp[0]
    late = [h for h in heads if h.line_start > r.line_start]
    if late:
        h = late[0]
        what = (f"a second '### Response' in the sample that starts at line {first_line}" if h.kind == "response"
                else f"'### {h.kind.capitalize()}' after '### Response' (the order is ### Instruction, "
                     f"### Input, ### Response)")
        rd.fail(line(h.line_start), what)
        return None
    rest = text[r.end:]
    lead = rest[:len(rest) - len(rest.lstrip())]
    k = lead.rfind("\n") + 1  # line breaks after the header belong to the prompt; inline text does not
    response = rest[k:].rstrip()
    if not response:
        rd.fail(line(r.line_start), "nothing after '### Response' (the response is empty)")
        return None
    return Example(f"line {first_line}", prompt=text[:r.end + k], response=response)


def _shared_preamble(text: str, starts: list[int]) -> list[int] | None:
    """Sample starts moved back to a preamble that precedes every '### Instruction' (Stanford Alpaca's
    "Below is an instruction that describes a task. ..."), or None if the text before the first one
    is not repeated before each."""
    pre = text[:starts[0]].strip()
    if len(starts) < 2:
        return None
    out = [text.index(pre)]
    for a, b in itertools.pairwise(starts):
        f = text.rfind(pre, a, b)
        if f < 0 or text[f + len(pre):b].strip():
            return None
        out.append(f)
    return out


def _instruction_pairs(rd: _Reader, text: str, forced: bool) -> list[Example] | None:
    """The text cut into '### Instruction' samples read as pairs, or None when it is not in that form
    (forced: --format alpaca, the text must be).

    It is in that form when it has '### Instruction' and '### Response' header lines outside code
    fences and begins with its first '### Instruction' (or with a preamble repeated before each):
    ordinary prose or markdown with '###' headings stays plain text.
    """
    heads = _pair_headers(text)
    starts = [h.line_start for h in heads if h.kind == "instruction"]
    if not starts or all(h.kind != "response" for h in heads):
        if forced:
            raise rd.fatal("line 1", f"no {_PAIR_NAME} pairs in the text (what --format alpaca reads in a "
                                     f"text file; JSON lines start with '{{')")
        return None
    lines = _Lines(text)
    lead = text[:starts[0]].strip()
    if lead:
        moved = _shared_preamble(text, starts)
        if moved is not None:
            starts = moved
            rd.notes.append(f"the text before each '### Instruction' ({lead[:40]!r}...) is part of its prompt")
        elif forced:
            rd.notes.append(f"{len(lead)} characters before the first '### Instruction' (line "
                            f"{lines.of(starts[0])}) are not part of any sample")
        else:
            rd.notes.append(f"read as plain text: {len(starts)} '### Instruction' headers, but the file does "
                            f"not begin with one (the first is on line {lines.of(starts[0])}); remove the text "
                            f"before it, or pass --format alpaca to read the pairs")
            return None
    out = []
    for k, a in enumerate(starts):
        b = starts[k + 1] if k + 1 < len(starts) else len(text)
        ex = _pair_example(rd, text[a:b], lines.of(a))
        if ex is not None:
            out.append(ex)
    return out


def _examples_text(rd: _Reader, text: str, sample_start: str | None, include_sample_start: bool,
                   pairs: bool | None) -> tuple[str, list[Example]]:
    """Plain text, llama.cpp finetune style: one stream, or samples that begin at each sample_start.
    Samples in the '### Instruction: ... ### Response: ...' form are Alpaca pairs (schema "alpaca"):
    the whole file cut at its '### Instruction' lines, or each --sample-start sample that has a
    '### Response' line. pairs: None detects them, True (--format alpaca) requires them, False
    (--format text) reads plain text only."""
    # Undecodable lines: an error, or with --skip-bad-lines dropped (counted) from the text.
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not rd.check_utf8(line, f"line {i + 1}"):
            lines[i] = None  # type: ignore[call-overload]
    text = "\n".join(ln for ln in lines if ln is not None)
    # Pairs are read without the indentation all lines share; plain text stays as it is.
    indent = _common_indent(text)
    dedented = "; the indentation all lines share is removed" if indent else ""
    forced_pairs = pairs is True
    if pairs is False:
        if {h.kind for h in _pair_headers(_dedent(text, indent))} >= {"instruction", "response"}:
            rd.notes.append(f"--format text: read as plain text, every token trained (without it, "
                            f"{_PAIR_NAME} pairs train their responses only)")
    elif not sample_start:
        found = _instruction_pairs(rd, _dedent(text, indent), forced_pairs)
        if found is not None:
            rd.notes.insert(0, f"{len(found)} samples read as {_PAIR_NAME} pairs{dedented}")
            return "alpaca", found
    if not sample_start:
        return "text", [Example("line 1", text=text)]
    starts = [m.start() for m in re.finditer(re.escape(sample_start), text)]
    if not starts:
        if forced_pairs:
            raise rd.fatal("line 1", f"--sample-start {sample_start!r} not found")
        rd.notes.append(f"--sample-start {sample_start!r} not found: the whole file is one sample")
        return "text", [Example("line 1", text=text)]
    at = _Lines(text)
    if text[:starts[0]].strip():
        rd.notes.append(f"{len(text[:starts[0]].strip())} characters before the first --sample-start "
                        f"are not part of any sample (as in llama.cpp's finetune)")
    skip = 0 if include_sample_start else len(sample_start)
    samples = [(at.of(s), text[s + skip:(starts[k + 1] if k + 1 < len(starts) else len(text))])
               for k, s in enumerate(starts)]
    flat = [(ln, _dedent(t, indent)) for ln, t in samples]
    n_pairs = 0 if pairs is False else sum(any(h.kind == "response" for h in _pair_headers(t)) for _, t in flat)
    if not n_pairs and not forced_pairs:
        return "text", [Example(f"line {ln}", text=t) for ln, t in samples]
    if not n_pairs:
        raise rd.fatal(f"line {samples[0][0]}", "no --sample-start sample has a '### Response' line "
                                                "(what --format alpaca reads in a text file)")
    out = [ex for ln, t in flat if (ex := _pair_example(rd, t, ln)) is not None]
    note = f"{len(out)} --sample-start samples read as {_PAIR_NAME} pairs{dedented}"
    if skip and re.match(r"#+\s*instruction", sample_start.strip(), re.IGNORECASE):
        note += (f"; {sample_start!r} is removed from each prompt, as llama.cpp's finetune did "
                 f"(--include-sample-start keeps it)")
    rd.notes.insert(0, note)
    return "alpaca", out


def read_examples(path: str | Path, fmt: str = "auto", text_column: str | None = None,
                  sample_start: str | None = None, include_sample_start: bool = False,
                  escape: bool = False, skip_bad_lines: bool = False) -> ReadResult:
    """Read one training file into Examples. fmt: one of FORMATS (a container, a schema, or auto).
    A directory in MLX-LM's layout is read as its train.jsonl (ggtrain.dataset.samples takes its valid.jsonl)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise GGTrainError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise GGTrainError(f"{path}: no such file or directory")
    if path.is_dir() and fmt != "hf":
        layout = data_dir(path)  # a directory that is neither kind is an error saying what is expected
        if layout is not None:
            path = layout.train
    rd = _Reader(path, skip_bad_lines)
    container = fmt if fmt in CONTAINERS else detect_container(path)
    schema = fmt if fmt in SCHEMAS else None
    text = rd.read_text() if container != "hf" else ""
    if schema is not None and container == "text" and (schema != "alpaca" or text.lstrip().startswith("{")):
        # --format chat (or alpaca) on a .txt file of JSON lines: read them as JSONL.
        container = "jsonl"

    if container == "text":
        if sample_start and escape:
            sample_start = process_escapes(sample_start)
        pairs = {"alpaca": True, "text": False}.get(fmt)  # --format forces pairs or plain text; auto detects
        schema, examples = _examples_text(rd, text, sample_start, include_sample_start, pairs)
        return ReadResult(path, container, schema, examples, rd.bad, rd.notes)

    if container == "hf":
        records = _records_hf(rd, path)
        if not records:
            raise rd.fatal("row 1", "the dataset has no rows")
    else:
        if container == "jsonl":
            records = _records_jsonl(rd, text)
        elif container == "json":
            records = _records_json_array(rd, text)
        else:
            records = _records_csv(rd, text, "," if container == "csv" else "\t")
        if not records:
            raise rd.fatal("line 1", "no records in the file" + (f" ({len(rd.bad)} bad ones skipped)"
                                                                 if rd.bad else ""))
    schema, examples = _examples_from_records(rd, records, schema, text_column)
    return ReadResult(path, container, schema, examples, rd.bad, rd.notes)
