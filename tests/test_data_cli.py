"""`ggtrain data` run as a user runs it (subprocess, the default model's tokenizer), and the shared
data flags' help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from ggtrain.cli.data import data as data_cmd
from ggtrain.cli.dataflags import DATA_FLAGS, data_options, data_options_from
from ggtrain.samples import sample_path

from ggtrain.dataset.samples import DataOptions

TEMPLATE = Path(__file__).with_name("gemma3_chat_template.jinja")


def run(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """ggtrain data ARGS in a fresh interpreter; `block` makes those modules unimportable in it."""
    code = ("import sys\n"
            + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
            + "from ggtrain.cli.main import main\nsys.argv = ['ggtrain', 'data', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=300)


_TOK_CACHE: dict = {}


@pytest.fixture
def cached_tokenizer(monkeypatch):
    """In-process runs reuse one Tokenizer (building Gemma's 262k-token tables takes a second)."""
    from ggtrain.text.tokenizer import Tokenizer

    orig = Tokenizer.from_model_file.__func__

    def cached(cls, mf):
        key = str(mf.path) if hasattr(mf, "path") else id(mf)
        if key not in _TOK_CACHE:
            _TOK_CACHE[key] = orig(cls, mf)
        return _TOK_CACHE[key]

    monkeypatch.setattr(Tokenizer, "from_model_file", classmethod(cached))


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """ggtrain data ARGS through the real `main` group (its GGTrainError handling), in this process."""
    from click.testing import CliRunner
    from ggtrain.cli.main import main

    r = CliRunner().invoke(main, ["data", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr
    return p.stdout


def bad(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_every_data_flag_has_help_and_round_trips():
    names = {p.name: p for p in data_cmd.params}
    for decls, kw in DATA_FLAGS:
        assert kw.get("help"), decls
    for p in data_cmd.params:
        assert isinstance(p, click.Option) and p.help, p.name
    assert {"train_data", "val_data", "val_split", "data_format", "text_column", "chat_template", "ctx",
            "sample_start", "include_sample_start", "escape", "separate_with_eos", "separate_with_bos",
            "fill_with_next_samples", "sample_random_offsets", "train_on_prompt", "truncate", "seed",
            "skip_bad_lines"} <= set(names)

    # The decorator as `ggtrain finetune` uses it: defaults give DataOptions() and flags reach it.
    seen = {}

    @click.command()
    @data_options
    def cmd(**kw):
        seen["opts"] = data_options_from(kw)
        seen["rest"] = kw

    from click.testing import CliRunner

    r = CliRunner().invoke(cmd, [], catch_exceptions=False)
    assert r.exit_code == 0 and seen["opts"] == DataOptions() and seen["rest"] == {}
    r = CliRunner().invoke(cmd, ["-c", "64", "--no-separate-with-bos", "--no-fill-with-next-samples",
                                 "--format", "alpaca", "--sample-start", "##", "--seed", "3"])
    assert r.exit_code == 0, r.output
    o = seen["opts"]
    assert (o.ctx, o.separate_with_bos, o.separate_with_eos, o.fill_with_next_samples, o.format,
            o.sample_start, o.seed) == (64, False, None, False, "alpaca", "##", 3)


def test_alpaca_sample_report():
    out = ok(run("--train-data", str(sample_path("alpaca.json")), "--show", "1", "--no-color"))
    assert "format:       json / alpaca (detected)" in out
    assert "samples:      40\n" in out
    assert "--- sample 1 (line 2):" in out
    assert "### Response:\n[[The capital of Australia is Canberra." in out
    assert "1927.<eos>]]" in out
    assert "--- sample 2" not in out


def test_text_sample_start_split_report(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("### Instruction:\nSay a lot.\n### Response:\n" + "word " * 300
                    + "\n### Instruction:\nShort.\n### Response:\nYes.\n")
    out = ok(run("--train-data", str(long), "--sample-start", "### Instruction", "--include-sample-start",
                 "-c", "128", "--no-color", "--show", "2"))
    assert "samples:      2\n" in out
    assert "split:        1 samples longer than --ctx 128 split into windows" in out
    out = ok(run("--train-data", str(long), "--sample-start", "### Instruction", "-c", "128", "--truncate",
                 "--no-color", "--show", "0"))
    assert "truncated:    1 samples longer than --ctx 128 cut to --ctx" in out


def test_chat_with_template_file_and_without():
    out = ok(run("--train-data", str(sample_path("chat.jsonl")), "--chat-template", str(TEMPLATE),
                 "--no-color", "--show", "3"))
    assert "format:       jsonl / chat (detected)" in out
    assert "<start_of_turn>user\nWhat's the capital of Japan?<end_of_turn>\n<start_of_turn>model\n" \
           "[[The capital of Japan is Tokyo.<end_of_turn>\n]]" in out
    # The system prompt goes into the first user turn (Gemma 3's template) and is not trained.
    assert "<start_of_turn>user\nYou are a concise, friendly assistant.\n\nHow many centimetres" in out
    # The bundled model's GGUF has no template: ggtrain's copy of Gemma 3's is used, and said so.
    out = ok(run("--train-data", str(sample_path("chat.jsonl")), "--no-color", "--show", "1"))
    assert ("note:         chat template: ggtrain's Gemma 3 template (gemma3_chat_template.jinja), as this "
            "Gemma 3 GGUF has none (tokenizer.chat_template)") in out
    assert "[[The capital of Japan is Tokyo.<end_of_turn>\n]]" in out


def test_csv_and_val_split():
    out = ok(run("--train-data", str(sample_path("conversions.csv")), "--val-split", "0.25", "--no-color"))
    assert "format:       csv / completion (detected)" in out
    assert "samples:      30\n" in out and "validation:   10 samples" in out
    assert "<bos>Convert" in out and "[[ 1" in out


@pytest.mark.parametrize("name,content,where,skippable", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "line 2: malformed JSON", True),
    ("col.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
     "line 2: missing column 'output'", True),
    ("type.json", '[{"text": "a"},\n {"text": 5}]', "line 2: field 'text' should be a string, not int", True),
    ("latin1.txt", b"ok\ncaf\xe9\n", "line 2: bytes that are not UTF-8 (0xe9)", True),
    ("empty_out.jsonl", '{"instruction": "x", "output": "a"}\n{"instruction": "x", "output": ""}\n',
     "line 2: no token to train on (the response is empty)", True),
    ("nocol.csv", "title\nx\n", "line 2: no field to train on", False),  # no schema to go on
    ("empty.jsonl", "", "line 1: the file is empty", False),
])
def test_bad_input_one_line_exit_2(tmp_path, cached_tokenizer, name, content, where, skippable):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["--train-data", str(p), "--no-separate-with-eos"]
    msg = bad(run_in_process(*args))
    assert msg.startswith(f"ggtrain: error: {p}: {where}"), msg
    if skippable:
        out = ok(run_in_process(*args, "--skip-bad-lines", "--no-color", "--show", "0"))
        assert "samples:      1  (1 bad records skipped)" in out and "skipped:      line 2:" in out
    else:
        assert bad(run_in_process(*args, "--skip-bad-lines")) == msg.replace(" (--skip-bad-lines skips such records)", "")


def test_skip_bad_lines_counts(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"text": "good one"}\n{"text": 1}\nnot json\n{"text": "caf\xe9"}\n{"text": "good two"}\n')
    out = ok(run("--train-data", str(p), "--skip-bad-lines", "--no-color", "--show", "0"))
    assert "samples:      2  (3 bad records skipped)" in out
    for line in ("line 2: field 'text'", "line 3: malformed JSON", "line 4: bytes that are not UTF-8"):
        assert f"skipped:      {line}" in out


def test_hf_dir_without_datasets_names_the_package(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "state.json").write_text("{}")
    msg = bad(run("--train-data", str(d), block=("datasets", "pyarrow")))
    assert "needs the 'datasets' package" in msg and "pip install datasets" in msg


def test_hf_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the HF path needs pyarrow or datasets (optional)")
    import pyarrow.parquet as pq

    rows = json.loads(sample_path("alpaca.json").read_text())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    out = ok(run("--train-data", str(tmp_path / "train.parquet"), "--no-color", "--show", "1"))
    assert "format:       hf / alpaca (detected)" in out and "samples:      40\n" in out
    assert "--- sample 1 (row 1)" in out


def test_bad_input_through_the_console_script(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "broken\n')
    msg = bad(run("--train-data", str(p)))
    assert msg.startswith(f"ggtrain: error: {p}: line 2: malformed JSON (Unterminated string")
