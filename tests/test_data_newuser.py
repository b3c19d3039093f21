"""What a new user trips over in the data: '### Instruction / ### Response' text files (trained like
Alpaca, not as one stream), a CSV quote that is never closed, MLX-LM's train.jsonl / valid.jsonl
directories, and the bundled samples on the bundled model (whose GGUF has no chat template)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from bytetok import ByteTokenizer
from ggtrain.samples import SAMPLES_DIR

from ggtrain.dataset.batches import load_batches
from ggtrain.dataset.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, read_examples
from ggtrain.dataset.samples import DataOptions, load_file, prepare_data
from ggtrain.errors import GGTrainError

TOK = ByteTokenizer()
OPTS = DataOptions()
GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
# The old llama.cpp finetune tutorial (shared seeds 004): markdown showing the format in a fenced,
# tab-indented block.
TUTORIAL = """### 步骤 3：准备训练数据
  - 你的训练数据需要是很简单的格式，比如：
```
\t### Instruction:
\tTell me a joke.
\t### Response:
\tWhy don't scientists trust atoms? Because they make up everything!
\t### Instruction:
\tExplain what is quantum computing.
\t### Response:
\tQuantum computing is...
```

- 保存为 finetune-data.txt。
"""

PAIRS = [  # (instruction, input, output): multi-line outputs, '#' inside them, an Input field
    ("Tell me a joke.", "", "Why don't scientists trust atoms? Because they make up everything!"),
    ("Convert the temperature to Fahrenheit.", "25 °C", "77 °F.\n\nMultiply by 9/5 and add 32."),
    ("Write a markdown list.", "", "# Shopping\n- tea\n- milk #2"),
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


def alpaca_text(pairs, sep: str = "\n") -> str:
    """The pairs as llama.cpp's finetune tutorials write them (ALPACA_PROMPT, as Alpaca renders records)."""
    return sep.join((ALPACA_PROMPT_INPUT if i else ALPACA_PROMPT).format(instruction=q, input=i) + o
                    for q, i, o in pairs) + "\n"


def alpaca_jsonl(tmp_path: Path, pairs) -> Path:
    return write(tmp_path, "same.jsonl", "".join(json.dumps({"instruction": q, "input": i, "output": o}) + "\n"
                                                 for q, i, o in pairs))


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*GGTRAIN, *args], capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# --- '### Instruction / ### Response' text: Alpaca pairs, token by token ----------------------------

@pytest.mark.parametrize("flags", [{}, {"sample_start": "### Instruction", "include_sample_start": True},
                                   {"train_on_prompt": True}, {"separate_with_eos": False}])
@pytest.mark.parametrize("sep", ["\n", "\n\n\n"])  # samples back to back, or separated by blank lines
def test_instruction_text_is_the_alpaca_rendering_token_by_token(tmp_path, flags, sep):
    text = write(tmp_path, "pairs.txt", alpaca_text(PAIRS, sep))
    opts = replace(OPTS, **flags)
    data = load_file(text, TOK, opts)
    ref = load_file(alpaca_jsonl(tmp_path, PAIRS), TOK, opts)
    assert (data.container, data.schema, len(data.samples)) == ("text", "alpaca", 3)
    for s, r, (q, i, o) in zip(data.samples, ref.samples, PAIRS):
        assert s.ids.tolist() == r.ids.tolist()
        assert s.train.tolist() == r.train.tolist()
        prompt = (ALPACA_PROMPT_INPUT if i else ALPACA_PROMPT).format(instruction=q, input=i)
        n = 1 + len(prompt.encode())  # BOS + the prompt's bytes
        assert TOK.decode(s.ids[:n].tolist()) == "<bos>" + prompt
        trained = TOK.decode(s.ids[1:][s.train[1:]].tolist())  # the first token is never a target
        if opts.train_on_prompt:
            assert s.train[1:].all() and trained == prompt + o + "<eos>"
        else:
            assert not s.train[:n].any() and s.train[n:].all()
            assert trained == o + ("<eos>" if opts.separate_with_eos is not False else "")
    lines = alpaca_text(PAIRS, sep).split("\n")
    assert [s.where for s in data.samples] == [f"line {k + 1}" for k, x in enumerate(lines)
                                               if x.startswith("### Instruction")]


def test_instruction_text_variants(tmp_path):
    """Headers with or without colons, any case, ## or ###, blank lines around fields, text on the
    header line, CRLF, a copy of an indented tutorial block: the prompt is the text as written up
    to the line break after '### Response', the response the rest without trailing blank lines."""
    cases = {
        "### Instruction\n\nTell me a joke.\n\n### Input\n\nabout cats\n\n### Response\n\nCats purr.\n\nThey nap.\n\n\n"
        "### Instruction\nNext?\n### Response\nYes.\n":
            [("### Instruction\n\nTell me a joke.\n\n### Input\n\nabout cats\n\n### Response\n\n", "Cats purr.\n\nThey nap."),
             ("### Instruction\nNext?\n### Response\n", "Yes.")],
        "### Instruction: Say hi.\n### Response: Hi!\n\n## instruction: Say bye.\n## RESPONSE: Bye!\n":
            [("### Instruction: Say hi.\n### Response:", " Hi!"), ("## instruction: Say bye.\n## RESPONSE:", " Bye!")],
        "### Instruction:\r\nA?\r\n### Response:\r\nB.\r\n### Instruction:\r\nC?\r\n### Response:\r\nD.\r\n":
            [("### Instruction:\r\nA?\r\n### Response:\r\n", "B."), ("### Instruction:\r\nC?\r\n### Response:\r\n", "D.")],
        "\t### Instruction:\n\tTell me a joke.\n\t### Response:\n\tWhy?\n\t  Because.\n\t### Instruction:\n\tAnd?\n"
        "\t### Response:\n\tSo.\n":
            [("### Instruction:\nTell me a joke.\n### Response:\n", "Why?\n  Because."),
             ("### Instruction:\nAnd?\n### Response:\n", "So.")],
    }
    for k, (text, want) in enumerate(cases.items()):
        rr = read_examples(write(tmp_path, f"v{k}.txt", text))
        assert rr.schema == "alpaca", text
        assert [(e.prompt, e.response) for e in rr.examples] == want
        assert rr.notes[0].startswith(f"{len(want)} samples read as '### Instruction' / '### Response' pairs")
    # Stanford Alpaca's preamble before every sample belongs to each prompt, not to the previous response.
    pre = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    rr = read_examples(write(tmp_path, "stanford.txt", f"{pre}\n\n### Instruction:\nA?\n\n### Response:\nB.\n\n"
                                                       f"{pre}\n\n### Instruction:\nC?\n\n### Response:\nD.\n"))
    assert [(e.where, e.prompt, e.response) for e in rr.examples] == [
        ("line 1", f"{pre}\n\n### Instruction:\nA?\n\n### Response:\n", "B."),
        ("line 9", f"{pre}\n\n### Instruction:\nC?\n\n### Response:\n", "D.")]


def test_format_text_reads_pairs_as_plain_text(tmp_path):
    """--format text is the way back to llama.cpp's finetune: the file as one stream (or as its
    --sample-start samples), every token trained, no EOS added."""
    text = alpaca_text(PAIRS)
    p = write(tmp_path, "pairs.txt", text)
    rr = read_examples(p, fmt="text")
    assert (rr.schema, [e.text for e in rr.examples]) == ("text", [text])
    assert rr.notes == [("--format text: read as plain text, every token trained (without it, '### Instruction' "
                        "/ '### Response' pairs train their responses only)")]
    rr = read_examples(p, fmt="text", sample_start="### Instruction", include_sample_start=True)
    assert rr.schema == "text" and "".join(e.text for e in rr.examples) == text
    data = load_file(p, TOK, replace(OPTS, format="text"))
    assert TOK.decode(data.samples[0].ids.tolist()) == "<bos>" + text and data.samples[0].train[1:].all()


def test_sample_start_samples_that_are_pairs(tmp_path):
    """The old tutorial's --sample-start keeps llama.cpp's meaning (where samples begin, the string
    removed unless --include-sample-start); a sample with a '### Response' line trains the response."""
    p = write(tmp_path, "t.txt", alpaca_text(PAIRS[:2]))
    rr = read_examples(p, sample_start="### Instruction")
    assert rr.schema == "alpaca"
    assert [(e.prompt, e.response) for e in rr.examples] == [
        (":\nTell me a joke.\n### Response:\n", PAIRS[0][2]),
        (":\nConvert the temperature to Fahrenheit.\n### Input:\n25 °C\n### Response:\n", PAIRS[1][2])]
    assert "'### Instruction' is removed from each prompt, as llama.cpp's finetune did" in rr.notes[0]
    data = load_file(p, TOK, replace(OPTS, sample_start="### Instruction"))
    assert [TOK.decode(s.ids[s.train].tolist()) for s in data.samples] == [o + "<eos>" for _, _, o in PAIRS[:2]]
    # The tutorial's block copied with its tab indentation: read without it.
    p = write(tmp_path, "tab.txt", "".join("\t" + x + "\n" for x in alpaca_text(PAIRS[:1]).splitlines()) * 2)
    rr = read_examples(p, sample_start="### Instruction", include_sample_start=True)
    assert [(e.prompt, e.response) for e in rr.examples] == [(ALPACA_PROMPT.format(instruction=PAIRS[0][0]),
                                                              PAIRS[0][2])] * 2
    assert rr.notes[0].endswith("pairs; the indentation all lines share is removed")
    # Samples that are not pairs keep their text as it is, indentation included (llama.cpp's finetune).
    p = write(tmp_path, "plain.txt", "\t<s>one\n\t<s>two\n")
    assert [e.text for e in read_examples(p, sample_start="<s>").examples] == ["one\n\t", "two\n"]
    # Samples separated by a blank-line marker (--escape), each a pair.
    p = write(tmp_path, "b.txt", "===\n" + alpaca_text(PAIRS[:1]) + "===\n" + alpaca_text(PAIRS[2:]))
    rr = read_examples(p, sample_start=r"===\n", escape=True)
    assert [e.response for e in rr.examples] == [PAIRS[0][2], PAIRS[2][2]]
    # One sample without its '### Response': named by its line, or skipped and counted.
    p = write(tmp_path, "c.txt", "<s>### Instruction:\nA?\n### Response:\nB.\n<s>### Instruction:\nC?\n<s>Q\n### Response:\nR\n")
    with pytest.raises(GGTrainError, match=r"c.txt: line 5: no '### Response' line in this sample"):
        read_examples(p, sample_start="<s>")
    rr = read_examples(p, sample_start="<s>", skip_bad_lines=True)
    assert [e.response for e in rr.examples] == ["B.", "R"] and rr.bad[0].startswith("line 5: no '### Response'")


def test_prose_and_markdown_stay_text(tmp_path):
    """'###' in ordinary text is not a pair: markdown headings, a '### Response time' heading, the
    format shown inside code fences (the seeds' tutorial itself), a file that does not begin with
    '### Instruction', instruction headers with no response anywhere."""
    md = ("# Notes\n\nSome text.\n\n### Heading one\nBody.\n### Response time\nFast.\n"
          "```\n### Instruction:\nA\n### Response:\nB\n```\n")
    texts = {
        "md.md": md,
        "fenced.txt": "```\n### Instruction:\nA\n### Response:\nB\n```\n~~~\n### Instruction:\nC\n### Response:\nD\n~~~\n",
        "inline.txt": "Write '### Instruction:' and then '### Response:' on lines of their own.\n",
        "noresp.txt": "### Instruction:\nA\n### Instruction:\nB\n",
        "title.txt": "My data\n\n" + alpaca_text(PAIRS[:2]),
        "tutorial.md": TUTORIAL,
    }
    for name, text in texts.items():
        rr = read_examples(write(tmp_path, name, text))
        assert (rr.schema, len(rr.examples), rr.examples[0].text) == ("text", 1, text), name
    # The text before the first '### Instruction' is named, and --format alpaca reads the pairs anyway.
    rr = read_examples(tmp_path / "title.txt")
    assert rr.notes == [("read as plain text: 2 '### Instruction' headers, but the file does not begin with one "
                         "(the first is on line 3); remove the text before it, or pass --format alpaca to read "
                         "the pairs")]
    rr = read_examples(tmp_path / "title.txt", fmt="alpaca")
    assert rr.schema == "alpaca" and [e.where for e in rr.examples] == ["line 3", "line 7"]
    assert "7 characters before the first '### Instruction' (line 3) are not part of any sample" in rr.notes
    with pytest.raises(GGTrainError, match=r"md.md: line 1: no '### Instruction' / '### Response' pairs"):
        read_examples(tmp_path / "md.md", fmt="alpaca")
    # --format alpaca on a .txt of JSON lines still reads JSON lines.
    p = write(tmp_path, "j.txt", json.dumps({"instruction": "i", "output": "o"}) + "\n")
    assert read_examples(p, fmt="alpaca").container == "jsonl"


@pytest.mark.parametrize("text,where,msg", [
    ("### Instruction:\nA?\n### Response:\nB.\n### Instruction:\nC?\n### Instruction:\nE?\n### Response:\nF.\n",
     "line 5", ("no '### Response' line in this sample, while other samples of the file have one (each sample "
               "needs its '### Response')")),
    ("### Instruction:\nA?\n### Response:\nB.\n### Instruction:\nC?\n### Response:\nD.\n### Response:\nD again.\n",
     "line 9", "a second '### Response' in the sample that starts at line 5"),
    ("### Instruction:\nA?\n### Response:\nB.\n\n### Instruction:\nC?\n### Response:\nD.\n### Input:\nX\n",
     "line 10", "'### Input' after '### Response' (the order is ### Instruction, ### Input, ### Response)"),
    ("### Instruction:\nA?\n### Response:\nB.\n### Instruction:\nC?\n### Response:\n\n",
     "line 7", "nothing after '### Response' (the response is empty)"),
])
def test_a_block_that_is_not_a_pair_names_its_line(tmp_path, text, where, msg):
    p = write(tmp_path, "d.txt", text)
    with pytest.raises(GGTrainError) as e:
        read_examples(p)
    assert str(e.value) == f"{p}: {where}: {msg} (--skip-bad-lines skips such records)"
    rr = read_examples(p, skip_bad_lines=True)
    assert rr.bad == [f"{where}: {msg}"] and rr.examples[0].response == "B."
    r = cli("data", "--train-data", str(p))
    assert one_line_error(r) == f"ggtrain: error: {p}: {where}: {msg} (--skip-bad-lines skips such records)"


def test_data_command_shows_the_split_of_instruction_text(tmp_path):
    p = write(tmp_path, "pairs.txt", alpaca_text(PAIRS))
    r = cli("data", "--train-data", str(p), "--no-color", "--show", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "format:       text / alpaca (detected)" in out and "samples:      3\n" in out
    assert "note:         3 samples read as '### Instruction' / '### Response' pairs" in out
    line = next(x for x in out.splitlines() if x.startswith("trained:"))
    trained, total = (int(x.replace(",", "")) for x in (line.split()[1], out.split("tokens:")[1].split()[0]))
    assert f"responses only; {total - trained:,} prompt tokens are context: --train-on-prompt trains all" in line
    assert ("--- sample 1 (line 1)" in out and "<bos>### Instruction:\nTell me a joke.\n### Response:\n"
            "[[Why don't scientists trust atoms? Because they make up everything!<eos>]]" in out)
    assert "### Input:\n25 °C\n### Response:\n[[77 °F.\n\nMultiply by 9/5 and add 32.<eos>]]" in out
    out = cli("data", "--train-data", str(p), "--no-color", "--show", "1", "--train-on-prompt").stdout
    assert "(prompts too: --train-on-prompt)" in out and "<bos>[[### Instruction:\nTell me a joke." in out


# --- CSV / TSV: a quote that is never closed ----------------------------------------------------------

@pytest.mark.parametrize("name,text,line", [
    # the fields still add up: csv alone would silently merge the rest of the file into one value
    ("merge.csv", ('prompt,completion\nConvert 1 inch., 2.54 cm.\nConvert 1 foot.,"0.3048 m.\nConvert 1 yard., '
                   '0.9144 m.\nConvert 1 mile., 1.609 km.\n'), 3),
    ("first.csv", 'prompt,completion\na,b\n"Convert 1 foot., 0.3048 m.\nc,d\n', 3),
    ("after_multiline.csv", 'prompt,completion\n"two\nlines",fine\nx,"never ""closed\ny,z\n', 4),
    ("one_column.csv", 'text\nfine\n"broken\nrest\n', 3),
    ("header.csv", '"prompt,completion\na,b\n', 1),
    ("tabs.tsv", 'prompt\tcompletion\na\tb\nc\t"d\ne\tf\n', 3),
])
def test_unclosed_csv_quote_is_an_error_at_its_line(tmp_path, name, text, line):
    p = write(tmp_path, name, text)
    want = (f"{p}: line {line}: a quoted field starts here and its closing quote is missing, so the rest of "
            f"the file would be read as one field; close it (a quote inside a quoted field is written \"\")")
    for skip in (False, True):  # not skippable: nothing after it can be read
        with pytest.raises(GGTrainError) as e:
            read_examples(p, skip_bad_lines=skip)
        assert str(e.value) == want
    assert one_line_error(cli("data", "--train-data", str(p))) == f"ggtrain: error: {want}"


def test_csv_quoting_that_is_closed_is_read(tmp_path):
    p = write(tmp_path, "ok.csv", 'prompt,completion\n"Say ""hi""",Hi\n"multi\nline",ok\nlast,"one ""two"""\n'
                                  'it is "quoted" inside,fine\n')
    rr = read_examples(p)
    assert [(e.where, e.prompt, e.response) for e in rr.examples] == [
        ("line 2", 'Say "hi"', "Hi"), ("line 3", "multi\nline", "ok"), ("line 5", "last", 'one "two"'),
        ("line 6", 'it is "quoted" inside', "fine")]


# --- MLX-LM's data directory ----------------------------------------------------------------------------

def mlx_dir(tmp_path: Path, n_train: int = 6, n_valid: int | None = 2, test: bool = True) -> Path:
    d = tmp_path / "mlx"
    d.mkdir()

    def rows(k0: int, n: int) -> str:
        return "".join(json.dumps({"prompt": f"Q{k}?", "completion": f" A{k}."}) + "\n" for k in range(k0, k0 + n))

    (d / "train.jsonl").write_text(rows(0, n_train))
    if n_valid is not None:
        (d / "valid.jsonl").write_text(rows(100, n_valid))
    if test:
        (d / "test.jsonl").write_text(rows(200, 1))
    return d


def test_mlx_directory_train_and_valid(tmp_path):
    d = mlx_dir(tmp_path)
    opts = replace(OPTS, train_data=d)
    prep = prepare_data(opts, TOK)
    assert prep.train.path == d / "train.jsonl" and len(prep.train.samples) == 6
    assert prep.val is not None and prep.val.path == d / "valid.jsonl" and len(prep.val.samples) == 2
    assert TOK.decode(prep.val.samples[0].ids[prep.val.samples[0].train].tolist()) == " A100.<eos>"
    assert prep.val_source == str(d / "valid.jsonl")
    assert prep.train.notes == [(f"{d} is an MLX-LM data directory: train.jsonl for training, valid.jsonl for "
                                 f"validation; test.jsonl is not read (MLX-LM keeps it for testing)")]
    # What finetune gets from load_batches: validation batches over valid.jsonl.
    _, val, _ = load_batches(opts, TOK, 2)
    assert val is not None and sum(b.n_trained for b in val.epoch_batches(0)) == prep.val.n_trained
    # --val-data or --val-split given: they win, and the note says valid.jsonl is not used.
    other = write(tmp_path, "v.jsonl", json.dumps({"text": "held out"}) + "\n")
    prep = prepare_data(replace(opts, val_data=other), TOK)
    assert prep.val.path == other and "valid.jsonl is not used (--val-data given)" in prep.train.notes[0]
    prep = prepare_data(replace(opts, val_split=0.5), TOK)
    assert (len(prep.train.samples), len(prep.val.samples)) == (3, 3)
    assert "valid.jsonl is not used (--val-split given)" in prep.train.notes[0]
    # A --val-data directory in the layout gives its valid.jsonl.
    prep = prepare_data(replace(OPTS, train_data=write(tmp_path, "t.jsonl", json.dumps({"text": "x"})),
                                val_data=d), TOK)
    assert prep.val.path == d / "valid.jsonl"


def test_mlx_directory_without_valid_and_a_directory_of_neither_kind(tmp_path):
    d = mlx_dir(tmp_path, n_valid=None, test=False)
    prep = prepare_data(replace(OPTS, train_data=d), TOK)
    assert prep.val is None
    assert prep.train.notes == [f"{d} is an MLX-LM data directory: train.jsonl for training, it has no valid.jsonl"]
    with pytest.raises(GGTrainError, match="a --val-data directory needs a valid.jsonl"):
        prepare_data(replace(OPTS, train_data=d, val_data=d), TOK)
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "data.txt").write_text("x")
    (junk / "valid.jsonl").write_text("{}\n")
    r = cli("data", "--train-data", str(junk))
    assert one_line_error(r) == (
        f"ggtrain: error: {junk}: a data directory should hold train.jsonl (with valid.jsonl and test.jsonl if "
        f"you have them: MLX-LM's layout) or a Hugging Face dataset (save_to_disk output with dataset_dict.json "
        f"or state.json, or .parquet files); it holds data.txt, sub/, valid.jsonl")


def test_mlx_directory_in_the_data_summary(tmp_path):
    d = mlx_dir(tmp_path)
    r = cli("data", "--train-data", str(d), "--no-color", "--show", "0")
    assert r.returncode == 0, r.stderr
    assert f"train file:   {d / 'train.jsonl'}\n" in r.stdout
    assert f"note:         {d} is an MLX-LM data directory: train.jsonl for training, valid.jsonl for validation" \
           in r.stdout
    assert "validation:   2 samples" in r.stdout and f"({d / 'valid.jsonl'})" in r.stdout


# --- the bundled samples on the bundled model ----------------------------------------------------------

SAMPLES = sorted(p.name for p in SAMPLES_DIR.iterdir() if p.suffix in (".txt", ".json", ".jsonl", ".csv", ".tsv"))


def test_the_samples_are_there():
    assert {"instructions.txt", "alpaca.json", "chat.jsonl", "conversions.csv"} <= set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_bundled_sample_on_the_bundled_model(name):
    """`ggtrain data` on every file in data/ with no -m and no other flag: no error, every sample
    usable, responses (not prompts) trained where the file has prompts."""
    r = cli("data", "--train-data", str(SAMPLES_DIR / name), "--no-color", "--show", "1")
    assert r.returncode == 0, r.stderr
    assert "skipped" not in r.stdout and "bad records" not in r.stdout
    fmt = r.stdout.split("format:")[1].split("\n")[0]
    assert "/ text" not in fmt, f"{name} read as plain text: {fmt}"  # every bundled sample has prompts
    assert "prompt tokens are context" in r.stdout


def test_finetune_on_the_bundled_chat_sample_with_no_model_or_template(tmp_path):
    out = tmp_path / "out"
    r = cli("finetune", "--train-data", str(SAMPLES_DIR / "chat.jsonl"), "--adam-iter", "2", "-c", "64", "-b", "1",
            "--outdir", str(out), timeout=1200)
    assert r.returncode == 0, r.stderr
    assert (out / "ggml-lora-LATEST-f32.gguf").is_file()
