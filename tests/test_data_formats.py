"""Reading training files: containers, schemas, --format, plain-text flags, and every kind of bad input."""

from __future__ import annotations

import json
import sys

import pytest

from ggtrain.dataset.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_INPUT,
    detect_container,
    process_escapes,
    read_examples,
)
from ggtrain.errors import GGTrainError


def write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def jsonl(*objs) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


# --- containers and schemas ------------------------------------------------------------------------

def test_detect_container(tmp_path):
    assert detect_container(write(tmp_path, "a.jsonl", "{}")) == "jsonl"
    assert detect_container(write(tmp_path, "a.json", '  [{"text": "x"}]')) == "json"
    assert detect_container(write(tmp_path, "b.json", '{"text": "x"}\n{"text": "y"}\n')) == "jsonl"
    assert detect_container(write(tmp_path, "a.csv", "text\nx\n")) == "csv"
    assert detect_container(write(tmp_path, "a.tsv", "text\nx\n")) == "tsv"
    assert detect_container(write(tmp_path, "a.txt", "hello")) == "text"
    assert detect_container(write(tmp_path, "a.md", "[not json]")) == "text"
    assert detect_container(write(tmp_path, "a.parquet", b"PAR1")) == "hf"
    assert detect_container(tmp_path) == "hf"


def test_json_array_lines_and_text_column(tmp_path):
    p = write(tmp_path, "d.json", '[\n  {"text": "first"},\n\n  {"text": "second\\nline"}\n]\n')
    rr = read_examples(p)
    assert (rr.container, rr.schema) == ("json", "text")
    assert [(e.where, e.text) for e in rr.examples] == [("line 2", "first"), ("line 4", "second\nline")]


def test_jsonl_custom_text_column_wins(tmp_path):
    # --text-column names the field even when Alpaca fields are present.
    rec = {"instruction": "i", "output": "o", "body": "the body"}
    p = write(tmp_path, "d.jsonl", jsonl(rec, rec))
    assert read_examples(p).schema == "alpaca"
    rr = read_examples(p, text_column="body")
    assert rr.schema == "text" and [e.text for e in rr.examples] == ["the body", "the body"]


def test_csv_quoted_multiline_and_line_numbers(tmp_path):
    p = write(tmp_path, "d.csv", 'text,other\n"a, with comma",1\n"two\nlines",2\n\nlast,3\n')
    rr = read_examples(p)
    assert rr.schema == "text"
    assert [(e.where, e.text) for e in rr.examples] == [
        ("line 2", "a, with comma"), ("line 3", "two\nlines"), ("line 6", "last")]


def test_tsv(tmp_path):
    p = write(tmp_path, "d.tsv", "prompt\tcompletion\nQ: 2+2?\t 4\n")
    rr = read_examples(p)
    assert (rr.container, rr.schema) == ("tsv", "completion")
    assert (rr.examples[0].prompt, rr.examples[0].response) == ("Q: 2+2?", " 4")


def test_alpaca_prompt_with_and_without_input(tmp_path):
    p = write(tmp_path, "a.json", json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "No input key.", "output": "ok"},
    ]))
    rr = read_examples(p)
    assert rr.schema == "alpaca"
    e0, e1, e2 = rr.examples
    assert e0.prompt == ALPACA_PROMPT_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert e0.prompt == "### Instruction:\nAdd the numbers.\n### Input:\n2 and 3\n### Response:\n"
    assert e0.response == "5"
    assert e1.prompt == ALPACA_PROMPT.format(instruction="Say hi.") and e1.response == "Hi!"
    assert e2.prompt == "### Instruction:\nNo input key.\n### Response:\n"


def test_chat_and_content_parts(tmp_path):
    p = write(tmp_path, "c.jsonl", jsonl(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}]}))
    rr = read_examples(p)
    assert rr.schema == "chat"
    assert rr.examples[1].messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]


def test_sharegpt_roles(tmp_path):
    p = write(tmp_path, "s.json", json.dumps([{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    rr = read_examples(p)
    assert rr.schema == "sharegpt"
    assert rr.examples[0].messages == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_format_forcing(tmp_path):
    # A .txt of JSON lines read as Alpaca; a .json read as plain text; a .txt read as jsonl.
    rec = {"instruction": "i", "output": "o"}
    p = write(tmp_path, "a.txt", jsonl(rec))
    assert read_examples(p).schema == "text"  # auto: a .txt is plain text
    rr = read_examples(p, fmt="alpaca")
    assert (rr.container, rr.schema) == ("jsonl", "alpaca")
    assert read_examples(p, fmt="jsonl").schema == "alpaca"
    rr = read_examples(write(tmp_path, "b.json", '[{"text": "x"}]'), fmt="text")
    assert rr.schema == "text" and rr.examples[0].text == '[{"text": "x"}]'
    with pytest.raises(GGTrainError, match="--format 'xml'"):
        read_examples(p, fmt="xml")


def test_forced_schema_reports_missing_field(tmp_path):
    p = write(tmp_path, "d.jsonl", jsonl({"text": "x"}))
    with pytest.raises(GGTrainError, match=r"d.jsonl: line 1: missing column 'messages'"):
        read_examples(p, fmt="chat")


# --- plain text, llama.cpp finetune flags ------------------------------------------------------------

DOC = "junk before\n### Instruction:\nA\n### Response:\nB\n### Instruction:\nC\n### Response:\nD\n"


def test_text_one_stream_without_sample_start(tmp_path):
    rr = read_examples(write(tmp_path, "t.txt", DOC))
    assert len(rr.examples) == 1 and rr.examples[0].text == DOC


def test_sample_start_split_and_include(tmp_path):
    # Samples begin at --sample-start (removed unless --include-sample-start, as in llama.cpp); ones
    # with a '### Response' line are pairs whose prompt ends after that line.
    p = write(tmp_path, "t.txt", DOC)
    rr = read_examples(p, sample_start="### Instruction:")
    assert rr.schema == "alpaca"
    assert [(e.where, e.prompt, e.response) for e in rr.examples] == [
        ("line 2", "\nA\n### Response:\n", "B"), ("line 6", "\nC\n### Response:\n", "D")]
    assert any("before the first --sample-start" in n for n in rr.notes)
    assert any("'### Instruction:' is removed from each prompt" in n for n in rr.notes)
    rr = read_examples(p, sample_start="### Instruction:", include_sample_start=True)
    assert [(e.prompt, e.response) for e in rr.examples] == [("### Instruction:\nA\n### Response:\n", "B"),
                                                             ("### Instruction:\nC\n### Response:\n", "D")]
    # Samples without '### Response' lines stay text, as before.
    rr = read_examples(write(tmp_path, "u.txt", "x\n--\nfirst\n--\nsecond"), sample_start="--\n")
    assert rr.schema == "text" and [e.text for e in rr.examples] == ["first\n", "second"]


def test_escape(tmp_path):
    p = write(tmp_path, "t.txt", "x\n\nfirst\n\nsecond")
    # Without --escape the backslash-n is literal and never found: one sample, with a note.
    rr = read_examples(p, sample_start=r"\n\n")
    assert len(rr.examples) == 1 and "not found" in rr.notes[0]
    rr = read_examples(p, sample_start=r"\n\n", escape=True)
    assert [e.text for e in rr.examples] == ["first", "second"]
    assert process_escapes(r"a\tb\\n\x41\'\"\q") == "a\tb\\nA'\"\\q"


# --- bad input: one message naming the file and the line, or skipped and counted ----------------

def test_malformed_jsonl_line(tmp_path):
    p = write(tmp_path, "d.jsonl", jsonl({"text": "a"}) + '{"text": "b",,}\n' + jsonl({"text": "c"}))
    with pytest.raises(GGTrainError) as e:
        read_examples(p)
    assert str(e.value).startswith(f"{p}: line 2: malformed JSON")
    rr = read_examples(p, skip_bad_lines=True)
    assert [x.text for x in rr.examples] == ["a", "c"] and len(rr.bad) == 1 and rr.bad[0].startswith("line 2")


def test_malformed_json_array(tmp_path):
    p = write(tmp_path, "d.json", '[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(GGTrainError, match=r"d.json: line 4: malformed JSON"):
        read_examples(p)
    with pytest.raises(GGTrainError, match="line 4"):  # a syntax error cannot be skipped in an array
        read_examples(p, skip_bad_lines=True)


def test_missing_column(tmp_path):
    p = write(tmp_path, "d.csv", "title,body\nx,y\n")
    with pytest.raises(GGTrainError, match=r"d.csv: line 2: no field to train on: found fields body, title"):
        read_examples(p)
    p = write(tmp_path, "e.jsonl", jsonl({"content": "x"}, {"other": 1}))
    with pytest.raises(GGTrainError, match=r"e.jsonl: line 2: missing column 'content'"):
        read_examples(p, text_column="content")
    p2 = write(tmp_path, "f.jsonl", jsonl({"instruction": "i", "output": "o"}, {"instruction": "i"}))
    with pytest.raises(GGTrainError, match=r"f.jsonl: line 2: missing column 'output'"):
        read_examples(p2)
    assert len(read_examples(p2, skip_bad_lines=True).examples) == 1


def test_wrong_type(tmp_path):
    p = write(tmp_path, "d.jsonl", jsonl({"text": "ok"}, {"text": 12}, {"text": ["a"]}))
    with pytest.raises(GGTrainError, match=r"d.jsonl: line 2: field 'text' should be a string, not int"):
        read_examples(p)
    rr = read_examples(p, skip_bad_lines=True)
    assert len(rr.examples) == 1 and len(rr.bad) == 2
    p = write(tmp_path, "c.jsonl", jsonl({"messages": "hello"}))
    with pytest.raises(GGTrainError, match=r"line 1: field 'messages' should be a non-empty list"):
        read_examples(p)
    p = write(tmp_path, "r.jsonl", jsonl({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(GGTrainError, match=r"line 1: messages\[0\] has role 'robot'"):
        read_examples(p)
    p = write(tmp_path, "n.json", "[1, 2]")
    with pytest.raises(GGTrainError, match=r"line 1: records should be JSON objects"):
        read_examples(p)


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.json", "e.csv"])
def test_empty_file(tmp_path, name):
    p = write(tmp_path, name, "  \n\n")
    with pytest.raises(GGTrainError, match=rf"{name}: line 1: the file is empty"):
        read_examples(p)
    with pytest.raises(GGTrainError, match="the file is empty"):
        read_examples(p, skip_bad_lines=True)


def test_not_utf8(tmp_path):
    good = b'{"text": "ok"}\n'
    p = write(tmp_path, "d.jsonl", good + b'{"text": "caf\xe9"}\n' + good)
    with pytest.raises(GGTrainError, match=r"d.jsonl: line 2: bytes that are not UTF-8 \(0xe9\)"):
        read_examples(p)
    assert len(read_examples(p, skip_bad_lines=True).examples) == 2
    p = write(tmp_path, "d.csv", b"text\nok\n\xff\xfe bad\nok\n")
    with pytest.raises(GGTrainError, match=r"d.csv: line 3: bytes that are not UTF-8 \(0xff\)"):
        read_examples(p)
    rr = read_examples(p, skip_bad_lines=True)
    assert [e.text for e in rr.examples] == ["ok", "ok"]
    p = write(tmp_path, "t.txt", b"line one\nline \x80two\nline three\n")
    with pytest.raises(GGTrainError, match=r"t.txt: line 2: bytes that are not UTF-8 \(0x80\)"):
        read_examples(p)
    assert read_examples(p, skip_bad_lines=True).examples[0].text == "line one\nline three\n"
    p = write(tmp_path, "a.json", b'[{"text": "a"},\n {"text": "\xc3("}]')
    with pytest.raises(GGTrainError, match=r"a.json: line 2: bytes that are not UTF-8"):
        read_examples(p)


def test_csv_field_count(tmp_path):
    p = write(tmp_path, "d.csv", "prompt,completion\nWhat is 2+2?, 4\nOne, two, three\n")
    with pytest.raises(GGTrainError, match=r"d.csv: line 3: has 3 fields, the header has 2"):
        read_examples(p)


def test_missing_file(tmp_path):
    with pytest.raises(GGTrainError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")


# --- Hugging Face datasets on disk ---------------------------------------------------------------------

def test_hf_missing_package_message(tmp_path, monkeypatch):
    # Neither datasets nor pyarrow importable: one message naming the package to install.
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    with pytest.raises(GGTrainError, match=r"ds: .*needs the 'datasets' package.*pip install datasets"):
        read_examples(tmp_path / "ds")


def _hf_rows():
    return [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Name a fruit.", "input": "", "output": "Apple."}]


def test_hf_parquet_and_save_to_disk_layout_with_pyarrow(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="the HF path needs pyarrow or datasets (optional)")
    import pyarrow.parquet as pq

    monkeypatch.setitem(sys.modules, "datasets", None)  # the pyarrow-only reader
    table = pa.Table.from_pylist(_hf_rows())
    pq.write_table(table, tmp_path / "one.parquet")
    rr = read_examples(tmp_path / "one.parquet")
    assert (rr.container, rr.schema) == ("hf", "alpaca") and rr.examples[1].response == "Apple."
    assert rr.examples[1].where == "row 2"
    # A directory of parquet shards, read in name order.
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "pq" / "train-00000.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "pq" / "train-00001.parquet")
    assert [e.response for e in read_examples(tmp_path / "pq").examples] == ["Blue.", "Apple."]
    # save_to_disk's layout: Arrow IPC stream files listed in state.json; a DatasetDict above it.
    d = tmp_path / "saved" / "train"
    d.mkdir(parents=True)
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert [e.response for e in read_examples(tmp_path / "saved").examples] == ["Blue.", "Apple."]
    (tmp_path / "empty").mkdir()
    with pytest.raises(GGTrainError, match="empty: a data directory should hold train.jsonl .* or a Hugging Face "
                                           "dataset .*; it holds nothing"):
        read_examples(tmp_path / "empty")
    (tmp_path / "nohf" / "train").mkdir(parents=True)  # a DatasetDict's split dir without its files
    (tmp_path / "nohf" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(GGTrainError, match="not a Hugging Face dataset"):
        read_examples(tmp_path / "nohf")


def test_hf_save_to_disk_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets", reason="optional: the datasets package is not installed")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_hf_rows()),
                               "test": datasets.Dataset.from_list(_hf_rows()[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    rr = read_examples(tmp_path / "dd")
    assert rr.schema == "alpaca" and len(rr.examples) == 2
    datasets.Dataset.from_list(_hf_rows()).to_parquet(str(tmp_path / "x.parquet"))
    assert len(read_examples(tmp_path / "x.parquet").examples) == 2
