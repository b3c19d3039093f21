"""The data pipeline on the real thing: the default model's tokenizer (Gemma 3 270M), the bundled
sample files, chat masks token by token on a real chat template, and token ids cross-checked with
llama.cpp's llama-tokenize."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ggtrain.samples import sample_path

from ggtrain.dataset.batches import Batches, data_stats
from ggtrain.dataset.formats import ALPACA_PROMPT, ALPACA_PROMPT_INPUT
from ggtrain.dataset.samples import DataOptions, prepare_data
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.text.tokenizer import Tokenizer

TEMPLATE = Path(__file__).with_name("gemma3_chat_template.jinja")


@pytest.fixture(scope="module")
def mf():
    return ModelFile(default_model_path())


@pytest.fixture(scope="module")
def tok(mf):
    return Tokenizer.from_model_file(mf)


@pytest.fixture(scope="module")
def tmpl(mf):
    from ggtrain.text.chat import ChatTemplate

    return ChatTemplate.from_model_file(mf, override_path=TEMPLATE)


def byte_spans(tok, ids) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for i in ids:
        n = len(tok.piece_bytes(int(i)))
        spans.append((pos, pos + n))
        pos += n
    return spans


def llama_tokenize(tmp_path: Path, text: str) -> list[int]:
    from llamacpp import binary

    f = tmp_path / "prompt.txt"
    f.write_text(text, encoding="utf-8")
    out = subprocess.run([str(binary("llama-tokenize")), "-m", str(default_model_path()), "-f", str(f),
                          "--ids", "--no-bos", "--log-disable"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_alpaca_file(tok, tmp_path):
    opts = DataOptions(train_data=sample_path("alpaca.json"))
    data = prepare_data(opts, tok).train
    records = json.loads(sample_path("alpaca.json").read_text())
    assert len(data.samples) == len(records) == 40
    for s, r in zip(data.samples, records):
        prompt = (ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT).format(**r)
        p = tok.encode(prompt, add_special=True)  # what inference feeds before generating
        n = len(p)
        assert s.ids[:n].tolist() == p
        assert not s.train[:n].any() and s.train[n:].all()
        assert s.ids[-1] == tok.eos_id
        assert tok.decode(s.ids[n:].tolist()) == r["output"] + "<eos>"
        assert s.ids[:-1].tolist() == tok.encode(prompt + r["output"], add_special=True)
    # The same ids as llama.cpp's tokenizer gives for the whole text.
    for s, r in list(zip(data.samples, records))[:3]:
        text = (ALPACA_PROMPT_INPUT if r["input"] else ALPACA_PROMPT).format(**r) + r["output"]
        assert s.ids[1:-1].tolist() == llama_tokenize(tmp_path, text)


def test_instruction_text_file_is_the_alpaca_rendering(tok, tmp_path):
    """The bundled '### Instruction / ### Response' text file gives, token for token, the ids and
    masks of the same pairs as Alpaca records: prompt context, response + EOS trained."""
    text = sample_path("instructions.txt").read_text()
    pairs = re.findall(r"### Instruction:\n(.*?)\n### Response:\n(.*?)(?:\n(?=### Instruction)|\n?$)", text, re.DOTALL)
    assert len(pairs) == 32
    alpaca = tmp_path / "same.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": i, "output": o}) + "\n" for i, o in pairs))
    for flags in ({}, {"sample_start": "### Instruction", "include_sample_start": True}):
        data = prepare_data(DataOptions(train_data=sample_path("instructions.txt"), **flags), tok).train
        ref = prepare_data(DataOptions(train_data=alpaca), tok).train
        assert (data.schema, len(data.samples)) == ("alpaca", 32)
        for s, r, (i, o) in zip(data.samples, ref.samples, pairs):
            assert s.ids.tolist() == r.ids.tolist() and s.train.tolist() == r.train.tolist()
            p = tok.encode(ALPACA_PROMPT.format(instruction=i), add_special=True)
            assert s.ids[:len(p)].tolist() == p and not s.train[:len(p)].any() and s.train[len(p):].all()
            assert tok.decode(s.ids[s.train].tolist()) == o + "<eos>"


def test_conversions_csv(tok):
    data = prepare_data(DataOptions(train_data=sample_path("conversions.csv")), tok).train
    assert data.schema == "completion" and len(data.samples) == 40
    s = data.samples[0]
    p = tok.encode("Convert 1 inch to centimetres.", add_special=True)
    assert s.ids[:len(p)].tolist() == p and not s.train[:len(p)].any()
    assert tok.decode(s.ids[s.train].tolist()) == " 1 inch is exactly 2.54 centimetres.<eos>"


def test_chat_file_masks_token_by_token(tok, tmpl, tmp_path):
    data = prepare_data(DataOptions(train_data=sample_path("chat.jsonl")), tok, tmpl=tmpl).train
    convs = [json.loads(x)["messages"] for x in sample_path("chat.jsonl").read_text().splitlines()]
    assert len(data.samples) == len(convs) == 30
    pat = re.compile(rb"<start_of_turn>model\n(.*?<end_of_turn>\n)", re.DOTALL)
    for s, conv in zip(data.samples, convs):
        rendered = tmpl.render(conv, add_generation_prompt=False).encode()
        assert b"".join(tok.piece_bytes(int(i)) for i in s.ids) == rendered
        spans = [(m.start(1), m.end(1)) for m in pat.finditer(rendered)]
        assert len(spans) == sum(m["role"] == "assistant" for m in conv)
        for (a, b), flag in zip(byte_spans(tok, s.ids), s.train.tolist()):
            inside = any(sa <= a and b <= sb for sa, sb in spans)
            assert inside or all(b <= sa or a >= sb for sa, sb in spans)
            assert flag == inside
        # The prompt before the first answer is exactly the generation prompt's tokens.
        first = conv[:next(i for i, m in enumerate(conv) if m["role"] == "assistant")]
        gen = tok.encode(tmpl.render(first, add_generation_prompt=True), add_special=False)
        assert s.ids[:len(gen)].tolist() == gen and not s.train[:len(gen)].any() and s.train[len(gen)]
    assert data.samples[2].ids.tolist() == llama_tokenize(tmp_path, tmpl.render(convs[2], False))


def test_batches_over_an_epoch_train_every_trained_token_once(tok):
    opts = DataOptions(train_data=sample_path("alpaca.json"), ctx=48)
    data = prepare_data(opts, tok).train
    st = data_stats(data, opts)
    assert st.n_split > 0  # the longest samples exceed 48 tokens
    b = Batches(data, 4, opts)
    total = 0.0
    for x in b.epoch_batches(0):
        total += x.mask.sum()
        assert (x.tokens[:, 0] == tok.bos_id).all()  # every row starts with BOS
        assert ((x.targets < tok.n_vocab) & (x.targets >= 0)).all()
    assert total == st.n_trained_in_rows == data.n_trained
    packed = Batches(data, 4, replace(opts, ctx=256))
    padded = Batches(data, 4, replace(opts, ctx=256, fill_with_next_samples=False))
    assert packed.rows_in_epoch() * 3 < padded.rows_in_epoch()  # packing: far fewer rows
    assert np.isclose(sum(x.mask.sum() for x in packed.epoch_batches()),
                      sum(x.mask.sum() for x in padded.epoch_batches()))


def test_chat_conversation_the_template_refuses(tok, tmpl, tmp_path):
    p = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    twice = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"},
                          {"role": "assistant", "content": "Hello."}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps(twice) + "\n")
    from ggtrain.errors import GGTrainError

    with pytest.raises(GGTrainError, match=r"c.jsonl: line 2: the chat template cannot render this "
                                           r"conversation: .*roles must alternate"):
        prepare_data(DataOptions(train_data=p), tok, tmpl=tmpl)
    data = prepare_data(DataOptions(train_data=p, skip_bad_lines=True), tok, tmpl=tmpl).train
    assert len(data.samples) == 1 and data.bad[0].startswith("line 2: the chat template cannot render")
