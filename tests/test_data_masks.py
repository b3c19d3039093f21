"""Tokens, loss masks, windows, packing and batches, on a byte-level stand-in tokenizer (one token a
byte, so every token's text span is known exactly). The same checks on Gemma 3's real tokenizer are
in test_data_real.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bytetok import BYTE0, ByteTokenizer, JinjaTemplate

from ggtrain.dataset.batches import Batches, data_stats
from ggtrain.dataset.formats import Example
from ggtrain.dataset.samples import (
    DataOptions,
    Sample,
    TokenData,
    load_file,
    prepare_data,
    tokenize_example,
)
from ggtrain.errors import GGTrainError

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id
OPTS = DataOptions()


def enc(s: str) -> list[int]:
    return [BYTE0 + b for b in s.encode()]


def write_jsonl(tmp_path, name, objs):
    p = tmp_path / name
    p.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return p


def token_spans(tok, ids) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (byte tokens are 1 char for ASCII)."""
    spans, pos = [], 0
    for i in ids:
        n = len(tok.piece(int(i)))
        spans.append((pos, pos + n))
        pos += n
    return spans


# --- one sample: ids and train flags --------------------------------------------------------------

def test_alpaca_only_response_and_eos_trained():
    ex = Example("line 1", prompt="### Instruction:\nSay hi.\n### Response:\n", response="Hi!")
    s = tokenize_example(ex, TOK, OPTS, "alpaca")
    assert s.ids.tolist() == [BOS] + enc(ex.prompt) + enc("Hi!") + [EOS]
    assert s.train.tolist() == [False] * (1 + len(ex.prompt)) + [True] * 4
    assert s.n_trained == 4
    s = tokenize_example(ex, TOK, replace(OPTS, train_on_prompt=True), "alpaca")
    assert s.train[1:].all()
    s = tokenize_example(ex, TOK, replace(OPTS, separate_with_eos=False, separate_with_bos=False), "alpaca")
    assert s.ids.tolist() == enc(ex.prompt) + enc("Hi!")


def test_completion_like_alpaca():
    s = tokenize_example(Example("line 1", prompt="2+2=", response=" 4"), TOK, OPTS, "completion")
    assert s.ids.tolist() == [BOS] + enc("2+2=") + enc(" 4") + [EOS]
    assert s.train.tolist() == [False] * 5 + [True] * 3


def test_text_all_trained_no_eos_by_default_and_special_text_not_parsed():
    s = tokenize_example(Example("line 1", text="a<eos>b"), TOK, OPTS, "text")
    assert s.ids.tolist() == [BOS] + enc("a<eos>b")  # plain text: "<eos>" stays text
    assert s.train[1:].all()
    s = tokenize_example(Example("line 1", text="ab"), TOK, replace(OPTS, separate_with_eos=True), "text")
    assert s.ids.tolist() == [BOS] + enc("ab") + [EOS] and s.train[-1]
    # BOS follows the model's add_bos unless the flag says otherwise.
    no_bos = ByteTokenizer(add_bos=False)
    assert tokenize_example(Example("l", text="ab"), no_bos, OPTS, "text").ids.tolist() == enc("ab")
    assert tokenize_example(Example("l", text="ab"), no_bos, replace(OPTS, separate_with_bos=True),
                            "text").ids.tolist() == [BOS] + enc("ab")


# --- chat masks, token by token against the assistant spans of the rendered template -----------------

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "  6.  "},
]


def assistant_spans_gemma(text: str) -> list[tuple[int, int]]:
    """Independent of the code under test: a model turn's content + its end-of-turn, found by regex."""
    pat = re.compile(r"<start_of_turn>model\n(.*?<end_of_turn>\n)", re.DOTALL)
    return [(m.start(1), m.end(1)) for m in pat.finditer(text)]


def check_chat_mask(tok, tmpl, s: Sample, messages) -> None:
    rendered = tmpl.render(messages, add_generation_prompt=False)
    assert tok.decode(s.ids.tolist()) == rendered
    spans = assistant_spans_gemma(rendered)
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    for (a, b), flag in zip(token_spans(tok, s.ids), s.train.tolist()):
        inside = any(sa <= a and b <= sb for sa, sb in spans)
        outside = all(b <= sa or a >= sb for sa, sb in spans)
        assert inside or outside, "a token straddles a turn boundary"
        assert flag == inside, (rendered[a:b], flag)


def test_chat_mask_token_by_token_gemma3_template():
    tmpl = JinjaTemplate.gemma3()
    s = tokenize_example(Example("line 1", messages=CONV), TOK, OPTS, "chat", tmpl)
    assert s.ids[0] == BOS and (s.ids == BOS).sum() == 1  # the template's own <bos>, not doubled
    assert s.ids[-1] != EOS  # chat: the template's end-of-turn ends the sample
    check_chat_mask(TOK, tmpl, s, CONV)
    trained = TOK.decode(s.ids[s.train].tolist())
    assert trained == "4.<end_of_turn>\n6.<end_of_turn>\n"
    s = tokenize_example(Example("line 1", messages=CONV), TOK, replace(OPTS, train_on_prompt=True), "chat", tmpl)
    assert s.train[1:].all()


def test_chat_mask_with_llamacpp_gemma2_template():
    """The Gemma 2 template as shipped in llama.cpp's models/templates (an outside reference)."""
    from llamacpp import models_dir

    tmpl = JinjaTemplate((models_dir() / "templates" / "google-gemma-2-2b-it.jinja").read_text())
    conv = CONV[1:]  # this template refuses a system turn
    s = tokenize_example(Example("line 1", messages=conv), TOK, OPTS, "chat", tmpl)
    check_chat_mask(TOK, tmpl, s, conv)


def test_chat_template_not_prefix_stable_falls_back_to_content():
    # Renders "<END>" after the whole conversation only: history rendered alone is not a prefix.
    tmpl = JinjaTemplate("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% else %}<END>{% endif %}")
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    s = tokenize_example(Example("line 1", messages=conv), TOK, OPTS, "chat", tmpl)
    text = TOK.decode(s.ids.tolist())
    assert text == "<bos>[user]a[assistant]a[user]c[assistant]d<END>"  # BOS added: add_bos
    flags = "".join("^" if f else "." for f in s.train.tolist())
    # Turn 1 falls back to its content: the "a" after [assistant], not the user's "a". The last turn
    # is prefix-stable (the whole conversation), so it includes the template's closing <END>.
    assert flags == "." * len("B[user]a[assistant]") + "^" + "." * len("[user]c[assistant]") + "^" * 6


def test_chat_bad_conversations(tmp_path):
    tmpl = JinjaTemplate.gemma3()
    p = write_jsonl(tmp_path, "c.jsonl", [
        {"messages": CONV},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ])
    with pytest.raises(GGTrainError, match=r"c.jsonl: line 2: no token to train on \(no assistant turn"):
        load_file(p, TOK, OPTS, tmpl=tmpl)
    data = load_file(p, TOK, replace(OPTS, skip_bad_lines=True), tmpl=tmpl)
    assert len(data.samples) == 1 and len(data.bad) == 2
    assert "line 3: the chat template cannot render this conversation: Conversation roles must alternate" \
        in data.bad[1]


def test_sample_without_trainable_token(tmp_path):
    p = write_jsonl(tmp_path, "a.jsonl", [{"instruction": "x", "output": "y"},
                                          {"instruction": "x", "output": ""}])
    opts = replace(OPTS, separate_with_eos=False)
    with pytest.raises(GGTrainError, match=r"a.jsonl: line 2: no token to train on \(the response is empty\)"):
        load_file(p, TOK, opts)
    assert len(load_file(p, TOK, replace(opts, skip_bad_lines=True)).samples) == 1
    t = tmp_path / "t.txt"
    t.write_text("##A##B####C")
    with pytest.raises(GGTrainError, match=r"t.txt: line 1: no token to train on \(the sample is empty\)"):
        load_file(t, TOK, replace(OPTS, sample_start="##"))
    data = load_file(t, TOK, replace(OPTS, sample_start="##", skip_bad_lines=True))
    assert [TOK.decode(s.ids[1:].tolist()) for s in data.samples] == ["A", "B", "C"]


# --- windows, packing, batches ------------------------------------------------------------------------

def make_data(lengths, seed=0, trained=None) -> TokenData:
    """Samples with distinct token values so windows can be traced back to their sample and offset."""
    samples = []
    nxt = 1000 + seed
    for k, n in enumerate(lengths):
        ids = np.concatenate([[BOS], np.arange(nxt, nxt + n - 1)]).astype(np.int32)  # unique ids
        nxt += n
        tr = np.ones(n, bool) if trained is None else trained(k, n)
        tr[0] = False
        samples.append(Sample(ids, tr, f"line {k + 1}"))
    return TokenData(Path("mem"), "jsonl", "text", samples, BOS)


def collect_targets(data: TokenData, batches: list) -> list[tuple[int, int]]:
    """(sample, target index) of every trained position, traced by matching windows back to samples."""
    out = []
    for b in batches:
        for r in range(b.n_rows):
            seg = b.segments[r]
            for k in np.unique(seg[seg > 0]):
                pos = np.flatnonzero(seg == k)
                assert (np.diff(pos) == 1).all()  # a window is contiguous in its row
                assert (b.positions[r, pos] == np.arange(len(pos))).all()  # positions restart at 0
                tgt = b.targets[r, pos]
                found = None
                for si, s in enumerate(data.samples):
                    for j in range(1, len(s.ids) - len(tgt) + 1):
                        if np.array_equal(s.ids[j:j + len(tgt)], tgt):
                            found = (si, j)
                            break
                    if found:
                        break
                assert found is not None
                si, j = found
                s = data.samples[si]
                # inputs: the previous tokens of the sample, except a continuation window's first (BOS)
                inp = b.tokens[r, pos]
                assert np.array_equal(inp[1:], s.ids[j:j + len(tgt) - 1])
                assert inp[0] == (s.ids[j - 1] if j == 1 else BOS)
                assert np.array_equal(b.mask[r, pos], s.train[j:j + len(tgt)].astype(np.float32))
                out += [(si, j + q) for q in range(len(tgt)) if s.train[j + q]]
            pad = seg == 0
            assert (b.mask[r, pad] == 0).all()
    return out


def all_trained(data: TokenData) -> list[tuple[int, int]]:
    return sorted((si, j) for si, s in enumerate(data.samples) for j in np.flatnonzero(s.train[1:]) + 1)


@pytest.mark.parametrize("fill", [True, False])
def test_epoch_trains_every_target_exactly_once(fill):
    data = make_data([5, 30, 9, 17, 3, 64, 12, 8, 40, 2])
    opts = replace(OPTS, ctx=16, fill_with_next_samples=fill)
    b = Batches(data, 3, opts)
    batches = list(b.epoch_batches(0))
    assert sorted(collect_targets(data, batches)) == all_trained(data)
    st = data_stats(data, opts)
    assert st.n_split == 3  # 30, 64, 40 tokens have more than 16 targets (17 tokens: exactly 16)
    n_windows = sum(max(1, -(-(n - 1) // 16)) for n in [5, 30, 9, 17, 3, 64, 12, 8, 40, 2])
    assert st.n_windows == n_windows
    assert b.rows_in_epoch(0) == (n_windows if not fill else b.rows_in_epoch(0))
    if fill:
        assert b.rows_in_epoch(0) < n_windows  # packing saves rows
        # No row could have taken the next row's first window (next-fit packing).
        p = b.plan(0)
        lens = p.win_stop - p.win_start
        for k in range(p.n_rows - 1):
            used = lens[p.row_ptr[k]:p.row_ptr[k + 1]].sum()
            assert used <= 16 and used + lens[p.row_ptr[k + 1]] > 16


def test_batch_shapes_dtypes_and_last_short_batch():
    data = make_data([10] * 7)
    b = Batches(data, 2, replace(OPTS, ctx=9, fill_with_next_samples=False))
    got = list(b.epoch_batches(0))
    assert [x.n_rows for x in got] == [2, 2, 2, 1]
    x = got[0]
    for a, dt in ((x.tokens, np.int32), (x.targets, np.int32), (x.mask, np.float32),
                  (x.positions, np.int32), (x.segments, np.int32)):
        assert a.dtype == dt and a.shape == (2, 9)
    parts = x.split(1)
    assert [p.n_rows for p in parts] == [1, 1] and np.array_equal(parts[1].tokens[0], x.tokens[1])


def test_batch_split_is_the_rows_in_order():
    """Micro-batches (the trainer's unit) are the batch's rows [i, i + k), every array alike, and
    carry the data position of their first row."""
    data = make_data([10] * 7)
    x = Batches(data, 7, replace(OPTS, ctx=9, fill_with_next_samples=False)).next()
    parts = x.split(3)
    assert [p.n_rows for p in parts] == [3, 3, 1]
    for i, p in zip((0, 3, 6), parts):
        for name in ("tokens", "targets", "mask", "positions", "segments"):
            assert np.array_equal(getattr(p, name), getattr(x, name)[i:i + 3])
        assert (p.epoch, p.index) == (x.epoch, x.index + i)
    assert sum(p.n_trained for p in parts) == x.n_trained
    assert [p.n_rows for p in x.split(7)] == [7] and [p.n_rows for p in x.split(100)] == [7]


def test_continuation_windows_start_with_bos_and_truncate():
    data = make_data([40])
    s = data.samples[0]
    x = next(Batches(data, 8, replace(OPTS, ctx=16, fill_with_next_samples=False), shuffle=False).epoch_batches())
    assert x.n_rows == 3  # 39 targets: 16 + 16 + 7
    assert np.array_equal(x.tokens[0], s.ids[:16]) and np.array_equal(x.targets[0], s.ids[1:17])
    assert x.tokens[1, 0] == BOS and np.array_equal(x.tokens[1, 1:], s.ids[17:32])
    assert np.array_equal(x.targets[1], s.ids[17:33])
    assert x.mask[2].sum() == 7 and (x.segments[2, 7:] == 0).all()
    opts = replace(OPTS, ctx=16, truncate=True)
    x = next(Batches(data, 8, opts).epoch_batches())
    assert x.n_rows == 1 and np.array_equal(x.targets[0], s.ids[1:17])
    st = data_stats(data, opts)
    assert (st.n_split, st.n_cut_tokens, st.n_trained_in_rows) == (1, 23, 16)


def test_prompt_only_windows_are_dropped():
    # A long prompt: its first two windows have no trained target and are dropped.
    data = make_data([50], trained=lambda k, n: np.arange(n) >= 40)
    st = data_stats(data, replace(OPTS, ctx=16))
    assert (st.n_windows, st.n_dropped, st.n_trained_in_rows) == (2, 2, 10)


def test_packed_rows_segments():
    data = make_data([4, 5, 6])
    x = next(Batches(data, 1, replace(OPTS, ctx=16), shuffle=False).epoch_batches())
    assert x.segments[0].tolist() == [1] * 3 + [2] * 4 + [3] * 5 + [0] * 4
    assert x.positions[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert x.tokens[0, 3] == BOS and x.tokens[0, 7] == BOS  # each packed sample starts with its BOS
    assert x.mask[0].tolist() == [1] * 12 + [0] * 4


def test_deterministic_shuffle_and_exact_resume():
    data = make_data([7, 12, 3, 25, 9, 14, 5, 30, 11, 6, 8, 19])
    opts = replace(OPTS, ctx=16, seed=7, sample_random_offsets=True)
    a = Batches(data, 2, opts)
    run = [a.next() for _ in range(15)]  # crosses epoch boundaries
    assert run[-1].epoch >= 2
    b = Batches(data, 2, opts)
    for x, y in zip(run, (b.next() for _ in range(15))):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask)
    # Resume from a saved position in a fresh object (as after a restart).
    c = Batches(data, 2, opts)
    for _ in range(6):
        c.next()
    state = json.loads(json.dumps(c.state()))
    d = Batches(data, 2, opts)
    d.load_state(state)
    for x in run[6:]:
        y = d.next()
        assert (x.epoch, x.index) == (y.epoch, y.index)
        for f in ("tokens", "targets", "mask", "positions", "segments"):
            assert np.array_equal(getattr(x, f), getattr(y, f))
    e = Batches(data, 2, replace(opts, seed=8))
    assert any(not np.array_equal(x.tokens, e.next().tokens) for x in run[:4])
    with pytest.raises(GGTrainError, match="seed"):
        e.load_state(state)


def test_epochs_reshuffle():
    data = make_data([5] * 12)
    b = Batches(data, 1, replace(OPTS, ctx=8, fill_with_next_samples=False))
    assert not np.array_equal(b.plan(0).win_sample, b.plan(1).win_sample)
    assert sorted(b.plan(0).win_sample.tolist()) == sorted(b.plan(1).win_sample.tolist()) == list(range(12))


def test_random_offsets_move_the_split_grid():
    data = make_data([200])
    b = Batches(data, 4, replace(OPTS, ctx=16, sample_random_offsets=True))
    starts = {tuple(b.plan(e).win_start.tolist()) for e in range(6)}
    assert len(starts) > 1  # different grids in different epochs
    for e in range(3):
        assert sorted(collect_targets(data, list(b.epoch_batches(e)))) == all_trained(data)
    # Without the flag the grid is the same every epoch.
    b = Batches(data, 4, replace(OPTS, ctx=16))
    assert sorted(b.plan(0).win_start.tolist()) == sorted(b.plan(3).win_start.tolist())
    # With --truncate: one window of ctx at a random offset.
    b = Batches(data, 4, replace(OPTS, ctx=16, truncate=True, sample_random_offsets=True))
    offs = {int(b.plan(e).win_start[0]) for e in range(8)}
    assert len(offs) > 1 and all((b.plan(e).win_stop - b.plan(e).win_start)[0] == 16 for e in range(8))


# --- files end to end: text stream, sample start, validation ------------------------------------------

def test_text_stream_cut_into_ctx_windows(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 10)  # 100 bytes + BOS = 100 targets
    prep = prepare_data(replace(OPTS, train_data=p, ctx=32), TOK)
    assert len(prep.train.samples) == 1
    b = Batches(prep.train, 8, replace(OPTS, ctx=32, fill_with_next_samples=False), shuffle=False)
    x = next(b.epoch_batches())
    assert x.n_rows == 4 and (x.tokens[:, 0] == BOS).all()
    assert TOK.decode(x.targets[1].tolist()) == ("abcdefghij" * 10)[32:64]


def test_sample_start_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("### Instruction:\nQ1\n### Response:\nA1\n### Instruction:\nQ2\n### Response:\nA2\n")
    opts = replace(OPTS, train_data=p, sample_start="### Instruction", include_sample_start=True)
    data = prepare_data(opts, TOK).train
    assert [TOK.decode(s.ids.tolist()) for s in data.samples] == [
        "<bos>### Instruction:\nQ1\n### Response:\nA1<eos>", "<bos>### Instruction:\nQ2\n### Response:\nA2<eos>"]
    assert [TOK.decode(s.ids[s.train].tolist()) for s in data.samples] == ["A1<eos>", "A2<eos>"]
    # Without pairs in it, a --sample-start file is text, every token trained (llama.cpp's finetune).
    p.write_text("<s>first one\n<s>second one\n")
    data = prepare_data(replace(opts, sample_start="<s>", include_sample_start=False), TOK).train
    assert [TOK.decode(s.ids[s.train].tolist()) for s in data.samples] == ["first one\n", "second one\n"]


def test_val_split_and_val_data(tmp_path):
    p = write_jsonl(tmp_path, "d.jsonl", [{"text": f"sample {i}"} for i in range(20)])
    prep = prepare_data(replace(OPTS, train_data=p, val_split=0.25, seed=3), TOK)
    assert (len(prep.train.samples), len(prep.val.samples)) == (15, 5)
    again = prepare_data(replace(OPTS, train_data=p, val_split=0.25, seed=3), TOK)
    key = [s.ids.tobytes() for s in prep.val.samples]
    assert key == [s.ids.tobytes() for s in again.val.samples]
    assert not set(key) & {s.ids.tobytes() for s in prep.train.samples}
    other = prepare_data(replace(OPTS, train_data=p, val_split=0.25, seed=4), TOK)
    assert key != [s.ids.tobytes() for s in other.val.samples]
    v = write_jsonl(tmp_path, "v.jsonl", [{"text": "held out"}])
    prep = prepare_data(replace(OPTS, train_data=p, val_data=v), TOK)
    assert len(prep.train.samples) == 20 and TOK.decode(prep.val.samples[0].ids.tolist()) == "<bos>held out"
    with pytest.raises(GGTrainError, match="either --val-data FILE or --val-split"):
        prepare_data(replace(OPTS, train_data=p, val_data=v, val_split=0.1), TOK)
    # One text stream: its last fraction of tokens, with BOS in front.
    t = tmp_path / "t.txt"
    t.write_text("x" * 99)
    prep = prepare_data(replace(OPTS, train_data=t, val_split=0.1), TOK)
    assert (len(prep.train.samples[0].ids), len(prep.val.samples[0].ids)) == (90, 11)
    assert prep.val.samples[0].ids[0] == BOS


# --- token boundaries between prompt and response -------------------------------------------------------

class MergingTokenizer(ByteTokenizer):
    """Byte tokens, but "\\nH" is one token (300) and every encode call starts with a prefix-space
    token (301), like SentencePiece's add_space_prefix: the two ways separate tokenisation goes wrong."""

    def encode(self, text, add_special=True, parse_special=True):
        ids = [301] + super().encode(text, False, parse_special)
        out = []
        for i in ids:
            if out and out[-1] == BYTE0 + ord("\n") and i == BYTE0 + ord("H"):
                out[-1] = 300
            else:
                out.append(i)
        return ([self.bos_id] if add_special and self.add_bos else []) + out


def test_prompt_response_boundary_clean_and_straddling():
    tok = MergingTokenizer()
    opts = replace(OPTS, separate_with_eos=False)
    # Clean boundary: the whole text is tokenised once, so the response gets no second prefix space,
    # and the prompt's tokens are exactly encode(prompt).
    s = tokenize_example(Example("l", prompt="Q:", response="ok"), tok, opts, "completion")
    assert s.ids.tolist() == tok.encode("Q:ok") and s.ids[:-2].tolist() == tok.encode("Q:")
    assert s.train.tolist() == [False, False, False, False, True, True]
    # "\nH" merges across the boundary: that token holds response text, so it is trained.
    s = tokenize_example(Example("l", prompt="Q\n", response="Hi"), tok, opts, "completion")
    assert s.ids.tolist() == [BOS, 301, BYTE0 + ord("Q"), 300, BYTE0 + ord("i")]
    assert s.train.tolist() == [False, False, False, True, True]
    # The same at the end of a trained part followed by an untrained one (chat: "...\n" + "H...").
    parts_tok = MergingTokenizer(add_bos=False)
    from ggtrain.dataset.samples import _encode_parts

    ids, train = _encode_parts(parts_tok, [("a", False), ("b\n", True), ("Hc", False)], False)
    assert ids.tolist() == [301, BYTE0 + 97, BYTE0 + 98, 300, BYTE0 + 99]
    assert train.tolist() == [False, False, True, True, False]


def test_load_batches_train_and_val(tmp_path):
    from ggtrain.dataset.batches import load_batches

    p = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"Q{i}: ", "completion": "A" * (i + 1)} for i in range(30)])
    opts = replace(OPTS, train_data=p, val_split=0.2, ctx=20)
    train, val, prep = load_batches(opts, TOK, 4)
    assert (len(prep.train.samples), len(prep.val.samples)) == (24, 6)
    assert train.total_steps(3) == sum(train.steps_in_epoch(e) for e in range(3)) > 0
    v1 = [x.tokens.copy() for x in val.epoch_batches(0)]
    v2 = [x.tokens.copy() for x in val.epoch_batches(0)]
    assert all(np.array_equal(a, b) for a, b in zip(v1, v2))  # validation: same batches every time
    assert sum(x.mask.sum() for x in val.epoch_batches(0)) == prep.val.n_trained


def test_sharegpt_gives_the_same_samples_as_chat(tmp_path):
    tmpl = JinjaTemplate.gemma3()
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    chat = write_jsonl(tmp_path, "c.jsonl", [{"messages": CONV}])
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                    for m in CONV]}]))
    a = load_file(chat, TOK, OPTS, tmpl=tmpl)
    b = load_file(share, TOK, OPTS, tmpl=tmpl)
    assert (a.schema, b.schema) == ("chat", "sharegpt")
    assert np.array_equal(a.samples[0].ids, b.samples[0].ids)
    assert np.array_equal(a.samples[0].train, b.samples[0].train)


def test_long_csv_field(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text\n"' + "word " * 40000 + '"\n')  # 200 kB in one field
    data = load_file(p, TOK, OPTS)
    assert len(data.samples[0].ids) == 200001
