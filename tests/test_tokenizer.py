"""Tokenizer against llama.cpp itself: its own test vectors (models/ggml-vocab-*.gguf + .inp/.out),
llama-tokenize on mixed and randomised texts for every vocabulary, and the real Gemma 3 vocab."""

from __future__ import annotations

import ast
import itertools
import random
import subprocess
import sys

import llamacpp
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.text.tokenizer import Tokenizer
from ggtrain.text.vocab import ATTR_CONTROL, ATTR_USER_DEFINED, Vocab

VOCABS = ["llama-spm", "llama-bpe", "qwen2", "phi-3", "gpt-2", "deepseek-llm", "deepseek-coder",
          "command-r", "falcon", "starcoder", "refact", "mpt", "qwen35"]
_cache: dict[str, Tokenizer] = {}


def vocab_path(name: str):
    return llamacpp.models_dir() / f"ggml-vocab-{name}.gguf"


def vocab(name: str) -> Tokenizer:
    if name not in _cache:
        _cache[name] = Tokenizer.from_model_file(ModelFile(vocab_path(name), check_types=False))
    return _cache[name]


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return Tokenizer.from_model_file(ModelFile(default_model_path()))


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """The .inp cases (split on the separator as test-tokenizer-0.cpp does) and .out id lines."""
    base = vocab_path(name)
    raw = base.with_name(base.name + ".inp").read_bytes()
    sep = b"\n__ggml_vocab_test__\n"
    cases, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            cases.append(raw[pos:])
            break
        cases.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = base.with_name(base.name + ".out").read_bytes().split(b"\n")
    lines = lines[:len(cases)]
    assert len(cases) == len(lines) > 30
    return [(c.decode(), [int(x) for x in o.split()]) for c, o in zip(cases, lines)]


@pytest.mark.parametrize("name", VOCABS)
def test_llamacpp_vectors(name):
    """Every vector as test-tokenizer-0 checks it: add_special=false, parse_special=false."""
    tok = vocab(name)
    bad = [(text, exp, tok.encode(text, add_special=False, parse_special=False))
           for text, exp in read_vectors(name)
           if tok.encode(text, add_special=False, parse_special=False) != exp]
    assert not bad, f"{len(bad)} vectors differ, first: {bad[0]!r}"


@pytest.mark.parametrize("name", VOCABS)
def test_round_trip_vectors(name):
    """decode(encode(x)) == x: every vector input is representable in these vocabularies."""
    tok = vocab(name)
    for text, _ in read_vectors(name):
        ids = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(ids, clean_up=False) == text


# ---- against llama-tokenize on texts mixing every kind of character and special tokens ----------

POOL = [
    "the", "The", "quick", "HELLO", "world", "naïve", "café", "e\u0301", "Ünïcödé", "'s", "'S", "'ll", "'LL",
    "'re", "'ve", "'d", "'m", "'t", "'x", "1", "12", "123", "1234", "12345678", "3.14", "1,000", "٣٤", "½",
    "²", "Ⅻ", " ", "  ", "   ", "     ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028",
    "\x0b", "\x0c", "\x1c", "\x85", " \n ", "  \n\n  ", ".", ",", "!", "?", "...", "--", "(", ")", "[", "]",
    "{", "}", "<", ">", "<<", "/*", "*/", "#", "$", "%", "^", "&", "*", "_", "=", "+", "|", "\\", "`", "~",
    "@", ";", ":", '"', "中文", "你好", "北京", "日本語", "ひらがな", "カタカナ", "한국어", "русский",
    "Ελληνικά", "عربى", "हिन्दी", "ภาษาไทย", "עברית", "😀", "🤖", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "✅", "🚀",
    "\u0378", "\ue000", "\U0010fffd", "\u200d", "\ufeff", "\x00", "\x07", "def", "return", "():", "=>", "!=",
    "==", "->", "x_1", "camelCase", "snake_case", "URL:http://a.b/c?d=e",
    "<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>", "<|end|>", "<|user|>",
    "<|assistant|>", "<|fim_prefix|>", "<fim_prefix>", "<｜begin▁of▁sentence｜>", "[INST]",
    "<|START_OF_TURN_TOKEN|>", "\U0001fa75", "\U00031350", "\U00011f00", "\u0cf3", "\U0001e4d0\U0001e4d1",
]


def random_text(seed: int, n: int = 3000) -> str:
    r = random.Random(seed)
    return "".join(r.choice(POOL) + (" " if r.random() < 0.4 else "") for _ in range(n))


def llama_tokenize_ids(model, text: str, parse_special: bool, tmp_path, no_bos: bool = False) -> list[int]:
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    args = ["-m", model, "-f", f, "--ids", "--log-disable", "--no-escape"]
    if not parse_special:
        args.append("--no-parse-special")
    if no_bos:
        args.append("--no-bos")
    out = llamacpp.run("llama-tokenize", *args).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", VOCABS)
def test_random_texts_match_llama_tokenize(name, tmp_path):
    tok = vocab(name)
    for seed, parse_special in ((len(name), True), (len(name) + 100, False)):
        text = random_text(seed)
        exp = llama_tokenize_ids(vocab_path(name), text, parse_special, tmp_path)
        got = tok.encode(text, add_special=tok.add_bos, parse_special=parse_special)
        assert got == exp, f"{name} parse_special={parse_special}: first difference at " \
                           f"{next(i for i, (a, b) in enumerate(zip([*got, -1], [*exp, -1])) if a != b)}"


# ---- the real Gemma 3 270M vocabulary -----------------------------------------------------------

MIXED = """The quick brown fox jumps over the lazy dog. It's 2024; prices rose 3.5% (roughly $1,234.56)!
Mr. O'Neil said: "Don't panic" -- and they'd all agreed, weren't they?

中文测试：我们今天去北京的天安门广场，天气很好。日本語もあります。한국어도 있어요.

def tokenize(text):
\tfor i in range(10):
\t\tif i % 2 == 0:          # long run of spaces
\t\t\tprint(i,    "even")
    return {"key": [1, 2, 3]}                                                              

Emoji: 😀😃🤖🚀 👨‍👩‍👧‍👦 🏳️‍🌈 ✅ ❤️
<start_of_turn>user
What is 2+2?<end_of_turn>
<start_of_turn>model
4<end_of_turn>
<bos>tail <eos> <pad> <unused5> <mask>   trailing spaces   
Ünïcödé àccents, ﬁ ligature, Ελληνικά, русский, عربى, हिन्दी.
"""


@pytest.mark.parametrize("parse_special", [True, False])
@pytest.mark.parametrize("no_bos", [False, True])
def test_gemma_mixed_text_matches_llama_tokenize(gemma, tmp_path, parse_special, no_bos):
    exp = llama_tokenize_ids(default_model_path(), MIXED, parse_special, tmp_path, no_bos=no_bos)
    got = gemma.encode(MIXED, add_special=not no_bos, parse_special=parse_special)
    assert got == exp
    # the markers are single control tokens only when parsed
    sot = gemma.token_to_id["<start_of_turn>"]
    assert (sot in got) == parse_special


def test_gemma_random_text_matches_llama_tokenize(gemma, tmp_path):
    text = random_text(7, 6000)
    for parse_special in (True, False):
        exp = llama_tokenize_ids(default_model_path(), text, parse_special, tmp_path)
        assert gemma.encode(text, parse_special=parse_special) == exp


def test_gemma_round_trip(gemma):
    for parse_special in (True, False):
        ids = gemma.encode(MIXED, add_special=False, parse_special=parse_special)
        assert gemma.decode(ids) == MIXED
    ids = gemma.encode(MIXED)
    assert ids[0] == gemma.bos_id
    assert gemma.decode(ids) == "<bos>" + MIXED
    assert gemma.decode(ids, special=False) == MIXED.replace("<start_of_turn>", "").replace(
        "<end_of_turn>", "").replace("<bos>", "").replace("<eos>", "").replace("<pad>", "").replace(
        "<unused5>", "").replace("<mask>", "")


def test_gemma_metadata(gemma):
    assert gemma.n_vocab == 262144
    assert (gemma.bos_id, gemma.eos_id) == (2, 1)
    assert gemma.add_bos and not gemma.add_eos and not gemma.add_space_prefix
    assert gemma.piece(gemma.bos_id) == "<bos>"
    sot = gemma.token_to_id["<start_of_turn>"]
    assert gemma.is_control(sot) and gemma.attr[sot] & ATTR_CONTROL
    assert gemma.is_byte(gemma.token_to_id["<0x41>"]) and gemma.piece_bytes(gemma.token_to_id["<0x41>"]) == b"A"
    assert gemma.is_user_defined(gemma.token_to_id["\n"]) and gemma.attr[gemma.token_to_id["\n"]] & ATTR_USER_DEFINED
    assert gemma.eot_id == gemma.token_to_id["<end_of_turn>"] and gemma.is_eog(gemma.eot_id)
    assert gemma.encode("") == [gemma.bos_id] and gemma.encode("", add_special=False) == []


def _check_offsets(tok: Tokenizer, text: str, parse_special: bool) -> None:
    """Tokens sharing a start byte, decoded, are exactly the text up to the next start."""
    import numpy as np

    ids, start = tok.encode_offsets(text, add_special=False, parse_special=parse_special)
    ids2, byte_pos, _ = tok._encode_fragments(text, parse_special)  # starts in (escaped) UTF-8 bytes
    assert ids.tolist() == ids2.tolist() == tok.encode(text, add_special=False, parse_special=parse_special)
    spm = tok.kind == "spm"
    chars = [c.replace(" ", "\u2581") if spm else c for c in text]
    char_at = np.cumsum([0] + [len(c.encode("utf-8", "surrogatepass")) for c in chars])
    assert start.tolist() == (np.searchsorted(char_at, byte_pos, side="right") - 1).tolist()
    data = "".join(chars).encode("utf-8", "surrogatepass")
    bounds = [*np.unique(byte_pos).tolist(), len(data)]
    for s, e in itertools.pairwise(bounds):
        exp = data[s:e].replace("\u2581".encode(), b" ") if spm else data[s:e]
        assert b"".join(tok.piece_bytes(int(t)) for t in ids[byte_pos == s]) == exp


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "gpt-2", "qwen35", "deepseek-coder"])
def test_offsets_bpe(name):
    for seed, parse_special in ((1, False), (2, True)):
        _check_offsets(vocab(name), random_text(seed, 800), parse_special)


def test_offsets_gemma(gemma):
    for text, parse_special in ((MIXED, True), (MIXED, False), (random_text(5, 3000), True)):
        _check_offsets(gemma, text, parse_special)
    text = "Q: hi<end_of_turn>\n<start_of_turn>model\nA: yes"
    ids, start = gemma.encode_offsets(text)
    assert ids[0] == gemma.bos_id and start[0] == 0
    a = text.index("A: yes")
    answer = [int(t) for t, s0 in zip(ids, start) if s0 >= a]
    assert gemma.decode(answer) == "A: yes"


def test_fragment_groups_do_not_change_results(gemma, monkeypatch):
    """Kernels see a few MB of fragments at a time; tiny groups must give the same ids/offsets."""
    import numpy as np

    import ggtrain.text.tokenizer as tokenizer_module

    toks = [gemma, vocab("qwen2"), vocab("llama-spm")]
    texts = [MIXED, random_text(11, 1500)]
    ref = [t.encode_offsets(x, True, ps) for t in toks for x in texts for ps in (True, False)]
    monkeypatch.setattr(tokenizer_module, "_GROUP_CHARS", 37)
    new = [t.encode_offsets(x, True, ps) for t in toks for x in texts for ps in (True, False)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(ref, new))


# ---- the CLI against llama-tokenize -----------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggtrain.cli.main", "tokenize", *args],
                          check=False, capture_output=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--ids"], ["--ids", "--no-parse-special"], ["--no-bos", "--show-count"]])
def test_cli_output_identical_to_llama_tokenize(tmp_path, extra):
    f = tmp_path / "mixed.txt"
    f.write_text(MIXED + "escapes \\n \\t \\x41 \\x00 \\q", encoding="utf-8")
    model = str(default_model_path())
    ours = run_cli("-m", model, "-f", str(f), *extra)
    assert ours.returncode == 0, ours.stderr
    theirs = llamacpp.run("llama-tokenize", "-m", model, "-f", f, "--log-disable", *extra)
    assert ours.stdout.decode("utf-8", errors="replace") == theirs.stdout


@pytest.mark.parametrize("name", ["qwen2", "phi-3"])
def test_cli_pieces_identical_other_vocabs(tmp_path, name):
    """Byte-level BPE pieces (partial UTF-8 included) and SentencePiece with RSTRIP specials."""
    f = tmp_path / "mixed.txt"
    f.write_text(MIXED + random_text(3, 300), encoding="utf-8")
    ours = run_cli("-m", str(vocab_path(name)), "-f", str(f))
    assert ours.returncode == 0, ours.stderr
    theirs = llamacpp.run("llama-tokenize", "-m", vocab_path(name), "-f", f, "--log-disable")
    # llamacpp.run reads text mode, which turns \r\n and \r into \n: do the same to ours
    mine = ours.stdout.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    assert mine == theirs.stdout


def test_cli_prompt_and_default_model():
    ours = run_cli("-p", "Hello\\nworld <start_of_turn>", "--ids")
    assert ours.returncode == 0, ours.stderr
    theirs = llamacpp.run("llama-tokenize", "-m", default_model_path(), "-p", "Hello\\nworld <start_of_turn>",
                          "--ids", "--log-disable")
    assert ours.stdout.decode("utf-8", errors="replace") == theirs.stdout


@pytest.mark.parametrize("args, message", [
    ([], "-p TEXT, -f FILE or --stdin"),
    (["-p", "x", "-f", "y"], "only once"),
    (["-f", "/nonexistent/file.txt"], "/nonexistent/file.txt: no such file"),
    (["-m", "/nonexistent/model.gguf", "-p", "x"], "/nonexistent/model.gguf: no such file"),
])
def test_cli_errors(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_unicode_categories_equal_llamacpp_tables():
    """Our per-code-point category flags and whitespace set are llama.cpp's (src/unicode-data.cpp)."""
    import re

    import numpy as np

    from ggtrain.text.pretokenize import FLAG_WHITESPACE, cpt_flags

    src = (llamacpp.source_dir() / "src" / "unicode-data.cpp").read_text(encoding="utf-8")
    body = src[src.index("unicode_ranges_flags"):]
    pairs = [(int(a, 16), int(b, 16))
             for a, b in re.findall(r"\{0x([0-9A-Fa-f]+), 0x([0-9A-Fa-f]+)\}", body[:body.index("};")])]
    ref = np.zeros(0x110000, dtype=np.uint16)
    for (c0, f), (c1, _) in itertools.pairwise(pairs):
        ref[c0:c1] = f
    ours = cpt_flags(np.arange(0x110000, dtype=np.int64))
    assert np.array_equal(ours & 0xFF, ref)
    ws = src[src.index("unicode_set_whitespace"):]
    ws_ref = {int(x, 16) for x in re.findall(r"0x([0-9A-Fa-f]+)", ws[:ws.index("};")])}
    assert set(np.flatnonzero(ours & FLAG_WHITESPACE).tolist()) == ws_ref


# ---- bad metadata and the space clean-up ----------------------------------------------------------

def test_bad_metadata():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(GGTrainError, match="unsupported tokenizer.ggml.model 'bert'"):
        Vocab.from_metadata({**base, "tokenizer.ggml.model": "bert"}, "m.gguf")
    with pytest.raises(GGTrainError, match="tokenizer.ggml.pre = 'nonesuch'"):
        Vocab.from_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nonesuch"}, "m.gguf")
    with pytest.raises(GGTrainError, match="no tokenizer"):
        Vocab.from_metadata({}, "m.gguf")
    with pytest.raises(GGTrainError, match="without tokenizer.ggml.merges"):
        Vocab.from_metadata({"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2"},
                            "m.gguf")


def _clean_spaces_reference(b: bytes) -> bytes:
    """llama_detokenize's three clean-up passes, written out character by character."""
    t = bytearray(b)
    total1 = len(t)
    total = 1 if total1 else 0
    for i in range(1, total1):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    total2, total = total, (1 if total else 0)
    i = 1
    while i < total2:
        x = t[i]
        if x == 0x27 and i + 1 < total2 and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    total3, total = total, (1 if total else 0)
    for i in range(1, total3):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < total3:
            x1 = t[i + 1]
            if x1 in b"sm" or (i + 2 < total3 and bytes(t[i + 1:i + 3]) in (b"re", b"ve")):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


def test_clean_spaces_matches_reference():
    tok = vocab("gpt-2")
    assert tok.clean_spaces
    r = random.Random(0)
    alphabet = [" ", "'", "s", "m", "r", "e", "v", "l", "t", "d", ".", ",", "?", "!", "a"]
    for _ in range(2000):
        text = "".join(r.choice(alphabet) for _ in range(r.randint(0, 12)))
        ids = tok.encode(text, add_special=False)
        assert tok.decode_bytes(ids) == _clean_spaces_reference(text.encode()), repr(text)
