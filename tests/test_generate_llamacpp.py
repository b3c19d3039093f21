"""Greedy continuations of Gemma 3 270M equal llama.cpp's (`llama-completion --temp 0`), with no adapter,
one, and two at once (one at a negative scale), on texts nobody here wrote (the opening sentences of
licence texts in /usr/share/common-licenses).

Both sides run int8 activations (ggtrain's VNNI path, llama.cpp's q8 dot products) and both keep the
KV cache in f32 (-ctk/-ctv f32), so the continuations agree token for token except where two
candidates are so close that activation rounding can order them either way. The two sides quantize
activations differently (ggtrain per 32 or 16 elements, llama.cpp per 32 or per 256 for K-quants),
so such a step is where they may part. A difference is accepted only at a step where llama.cpp's
token is a candidate of ours within INT8_NOISE of our top logit; the test then feeds llama.cpp's
token on (so all 64 steps of every continuation are compared, not just those before the first
near-tie), and such steps must stay rare (at most 5%). INT8_NOISE: int8 activations move the gap
between the top logit and a runner-up, against ggtrain's own f32 path, by 0.08 on average, 0.29 at
the 99th percentile and 0.39 at most (Gemma 3 270M, these prompts, 40 steps each, with and without
the adapters); llama.cpp's rounding is another draw of the same size, so two int8 paths may differ by
twice that: 0.8. Anything else (a wrong position, mask, rope, adapter scale) moves logits by whole
units and fails at the first token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from llamacpp import run
from loras import random_adapter

from ggtrain.adapters.load import load_adapter_arg
from ggtrain.generate.decoder import Decoder
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.transformer import Adapter, Model
from ggtrain.text.tokenizer import Tokenizer
from ggtrain.threads import get_threads, set_threads

N_PREDICT = 64
CTX = 256
INT8_NOISE = 0.8
LICENSES = Path("/usr/share/common-licenses")
# (file, the sentence the prompt starts at): the prompt is the 30 words from there
OPENINGS = [("GPL-3", "The GNU General Public License is"), ("Apache-2.0", '"License" shall mean the terms'),
            ("GFDL-1.3", "The purpose of this License"), ("Artistic", "The intent of this document"),
            ("MPL-2.0", "means each individual or legal entity")]


def opening(name: str, anchor: str) -> str:
    text = (LICENSES / name).read_text(encoding="utf-8")
    return " ".join(text[text.index(anchor):].split()[:30])


def follow(dec: Decoder, tok: Tokenizer, prompt: str, theirs: bytes, what: str) -> tuple[list[int], int]:
    """Walk llama.cpp's continuation token by token with our greedy choices: at each step our first
    choice must be the text llama.cpp printed next, or, at a near-tie, a candidate of ours within
    INT8_NOISE of our top logit must be; that one is fed on, so every one of the N_PREDICT steps is
    compared. Returns (the tokens, how many steps were near-ties decided the other way)."""
    dec.truncate(0)
    logits = dec.eval(tok.encode(prompt))
    text, ids, ties = b"", [], 0
    for k in range(N_PREDICT):
        a = int(np.argmax(logits))
        rest = theirs[len(text):]
        if a in tok.eog_ids:
            assert rest.strip() == b"[end of text]", f"{what}: we stop at step {k}, llama.cpp goes on {rest[:40]!r}"
            return ids, ties
        pick = a
        if not rest.startswith(tok.piece_bytes(a, special=False)):
            # a near-tie: llama.cpp's token must be one of ours within INT8_NOISE of the top
            close = [int(i) for i in np.flatnonzero(logits >= logits[a] - INT8_NOISE) if i != a]
            match = [i for i in close if rest.startswith(tok.piece_bytes(i, special=False))]
            assert match, (f"{what}: step {k}: ours {tok.piece_bytes(a)!r}, llama.cpp {rest[:40]!r}; within "
                           f"{INT8_NOISE}: {[(tok.piece_bytes(i), float(logits[a] - logits[i])) for i in close]}")
            pick, ties = max(match, key=lambda i: len(tok.piece_bytes(i, special=False))), ties + 1
        text += tok.piece_bytes(pick, special=False)
        ids.append(pick)
        if k + 1 < N_PREDICT:
            logits = dec.eval([pick])
    assert theirs[len(text):].strip() in (b"", b"[end of text]"), f"{what}: llama.cpp went on {theirs[len(text):]!r}"
    return ids, ties


def llama_text(model: Path, prompt: str, loras: list[tuple[Path, float]]) -> bytes:
    args = ["-m", model, "-p", prompt, "-n", N_PREDICT, "--temp", 0, "-no-cnv", "--no-display-prompt", "-c", CTX,
            "-t", 1, "-ctk", "f32", "-ctv", "f32", "--no-warmup"]
    if loras:
        args += ["--lora-scaled", ",".join(f"{p}:{s}" for p, s in loras)]
    out = run("llama-completion", *map(str, args), timeout=300).stdout
    return out.encode("utf-8")  # the continuation, then its closing newline (or " [end of text]")


@pytest.fixture(scope="module")
def adapters(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("adapters")
    a = random_adapter(gemma_path, d / "a.gguf", targets=("attn_q", "attn_v", "ffn_down"), r=4, alpha=8,
                       b_std=0.05, seed=1)
    b = random_adapter(gemma_path, d / "b.gguf", targets=("attn_k", "attn_output", "ffn_up"), r=8, alpha=8,
                       b_std=0.05, seed=2)
    return a, b


@pytest.fixture
def one_thread() -> Iterator[None]:
    # the machine is shared: one thread each for llama.cpp and for us keeps both off a busy core's barrier
    before = get_threads()
    set_threads(1)
    yield
    set_threads(before)


def test_greedy_continuations_equal_llama_completion(gemma_path: Path, adapters: tuple[Path, Path],
                                                     one_thread: None) -> None:
    mf = ModelFile(gemma_path)
    tok = Tokenizer.from_model_file(mf)
    model = Model(mf)
    a, b = adapters
    gpl, apache, gfdl = OPENINGS[:3]
    runs = [([], [gpl, apache, gfdl]), ([(a, 1.0)], [gfdl, gpl]), ([(a, 0.8), (b, -1.5)], [apache, gpl])]
    base: dict[str, bytes] = {}
    ties: list[int] = []
    steps = 0
    for loras, openings in runs:
        model.adapters = [Adapter(load_adapter_arg(f"{p}:{s}", mf)) for p, s in loras]
        dec = Decoder(model, CTX)
        for name, anchor in openings:
            prompt = opening(name, anchor)
            what = f"{name} with {[(p.name, s) for p, s in loras]}"
            theirs = llama_text(gemma_path, prompt, loras)
            ids, n = follow(dec, tok, prompt, theirs, what)
            assert len(ids) == N_PREDICT or theirs.strip().endswith(b"[end of text]")
            ties.append(n)
            steps += len(ids)
            if not loras:
                base[name] = theirs
            else:  # the adapters' effect is visible: not the base model's continuation
                assert theirs != base[name], f"{what}: the adapters change nothing"
    # near-ties decided the other way are rare (13 of the 448 steps when this was written, gaps 0.006-0.32)
    assert steps == 7 * N_PREDICT and sum(ties) <= 0.05 * steps, ties
