"""`ggtrain generate` as a user runs it, in a subprocess: streamed output, the stop at the model's
end-of-generation token, -n, llama.cpp's timing lines, --compare, Ctrl-C, and the refusals."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import tinymodels
from loras import GGTRAIN, ggtrain, ok, random_adapter, refused

from ggtrain.generate.decoder import Decoder
from ggtrain.generate.sampling import GREEDY, Sampler
from ggtrain.generate.stream import generate_tokens
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.transformer import Model
from ggtrain.text.tokenizer import Tokenizer

PROMPT = "The history of the city"
TIMING = {
    "prompt": re.compile(r"^generate: prompt eval time = +[0-9.]+ ms / +(\d+) tokens \( +[0-9.]+ ms per token, +"
                         r"[0-9.]+ tokens per second\)$", re.MULTILINE),
    "eval": re.compile(r"^generate:        eval time = +[0-9.]+ ms / +(\d+) runs   \( +[0-9.]+ ms per token, +"
                       r"[0-9.]+ tokens per second\)$", re.MULTILINE),
    "total": re.compile(r"^generate:       total time = +[0-9.]+ ms / +(\d+) tokens$", re.MULTILINE),
}


@pytest.fixture(scope="module")
def model() -> Path:
    return tinymodels.tiny_model("llama", "Q8_0")


@pytest.fixture(scope="module")
def adapter(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(model, tmp_path_factory.mktemp("ad") / "a.gguf", r=4, alpha=8, b_std=0.5, seed=4,
                          targets=("attn_q", "attn_v", "ffn_up", "ffn_down"))


def greedy_ids(path: Path, prompt: str, n: int) -> list[int]:
    """The greedy continuation in-process (what the CLI must print)."""
    mf = ModelFile(path)
    tok = Tokenizer.from_model_file(mf)
    got: list[int] = []
    generate_tokens(Decoder(Model(mf), 256), Sampler(GREEDY), tok.encode(prompt), n, tok.eog_ids, got.append)
    return got


def timings(stderr: str) -> dict[str, int]:
    found = {k: r.findall(stderr) for k, r in TIMING.items()}
    assert all(len(v) == 1 for v in found.values()), stderr
    return {k: int(v[0]) for k, v in found.items()}


def test_greedy_output_counts_and_timing_lines(model: Path) -> None:
    r = ok(ggtrain("generate", "-m", model, "-p", PROMPT, "-n", "12", "--temp", "0", "-c", "128", "-t", "1"))
    mf = ModelFile(model)
    tok = Tokenizer.from_model_file(mf)
    ids = greedy_ids(model, PROMPT, 12)
    assert len(ids) == 12
    assert r.stdout == PROMPT + tok.decode(ids, special=False) + "\n"
    n_prompt = len(tok.encode(PROMPT))
    assert timings(r.stderr) == {"prompt": n_prompt, "eval": 11, "total": n_prompt + 11}
    assert "generate: n_ctx = 128" in r.stderr and re.search(r"KV cache [0-9.]+ MiB", r.stderr)
    assert re.search(r"^generate: (int8|f32) matmul", r.stderr, re.MULTILINE)


def test_prompt_file_and_no_display_prompt(model: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(PROMPT, encoding="utf-8")
    a = ok(ggtrain("generate", "-m", model, "-f", tmp_path / "p.txt", "-n", "6", "--temp", "0", "-c", "64",
                   "--no-display-prompt"))
    tok = Tokenizer.from_model_file(ModelFile(model))
    assert a.stdout == tok.decode(greedy_ids(model, PROMPT, 6), special=False) + "\n"


def test_stops_at_the_models_end_of_generation_token(model: Path, tmp_path: Path) -> None:
    # a copy of the model whose EOS is the token greedy decoding produces third: generation must end
    # there, that token unprinted, with llama.cpp's " [end of text]"
    ids = greedy_ids(model, PROMPT, 8)
    stop = ids[2]
    assert stop not in ids[:2]
    copy = shutil.copyfile(model, tmp_path / "eos.gguf")
    reader = gguf.GGUFReader(copy, "r+")
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = stop
    reader.data.flush()
    del reader
    tok = Tokenizer.from_model_file(ModelFile(copy))
    assert stop in tok.eog_ids
    r = ok(ggtrain("generate", "-m", copy, "-p", PROMPT, "-n", "50", "--temp", "0", "-c", "128"))
    assert r.stdout == PROMPT + tok.decode(ids[:2], special=False) + " [end of text]\n"
    assert timings(r.stderr)["eval"] == 2


def test_compare_prints_base_then_adapted_with_the_same_seed(model: Path, adapter: Path) -> None:
    common = ["-m", model, "-p", PROMPT, "-n", "16", "--temp", "0.9", "--seed", "1234", "-c", "128",
              "--no-display-prompt"]
    both = ok(ggtrain("generate", *common, "--lora", adapter, "--compare")).stdout
    base = ok(ggtrain("generate", *common)).stdout
    adapted = ok(ggtrain("generate", *common, "--lora", adapter)).stdout
    assert both == f"--- base model ---\n{base}--- with {adapter} ---\n{adapted}"
    assert base != adapted  # the adapter changes the sampled text; the seed makes each side repeatable


def test_seeded_sampling_is_reproducible_and_the_seed_is_printed(model: Path) -> None:
    common = ["-m", model, "-p", PROMPT, "-n", "20", "-c", "128", "--no-display-prompt"]
    a, b = (ok(ggtrain("generate", *common, "--seed", "77")) for _ in range(2))
    assert a.stdout == b.stdout and "sampler seed: 77" in a.stderr
    c = ok(ggtrain("generate", *common))  # -1: a fresh seed, printed
    seed = re.search(r"sampler seed: (\d+)", c.stderr)
    assert seed and ok(ggtrain("generate", *common, "--seed", seed.group(1))).stdout == c.stdout


# ggtrain with Ctrl-C raising KeyboardInterrupt, as in a terminal: a suite started in the background (nohup,
# `&`) hands its children SIGINT ignored, and Python then installs no handler for it
AS_IN_A_TERMINAL = [sys.executable, "-c", ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                                           "signal.default_int_handler); sys.argv[0] = 'ggtrain'; "
                                           "runpy.run_module('ggtrain.cli.main', run_name='__main__')")]


def test_tokens_stream_and_ctrl_c_stops_with_the_timings(model: Path) -> None:
    # -c 16384 (beyond the tiny model's 2048: a warning): ~10 s of generation, so the interrupt lands
    # during it even when this reader is descheduled for a second or two (2048 tokens take ~1.2 s)
    proc = subprocess.Popen([*AS_IN_A_TERMINAL, "generate", "-m", str(model), "-p", PROMPT, "-n", "-1", "-c",
                             "16384", "--temp", "0.8", "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 120
    while len(seen) < len(PROMPT) + 40 and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 4096)
    assert len(seen) >= len(PROMPT) + 40
    assert proc.poll() is None  # text arrives while generation goes on: streamed, not printed at the end
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err_text = err.decode()
    assert proc.returncode == 130, err_text[-2000:]
    assert "Traceback" not in err_text and "generate: interrupted" in err_text
    t = timings(err_text)
    assert 0 < t["eval"] < 16000  # stopped by the interrupt, not by the context (16384)


def test_a_character_split_across_tokens_is_printed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from ggtrain.cli.generate import token_printer

    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    pieces = {1: "日本".encode()[:2], 2: "日本".encode()[2:4], 3: "日本".encode()[4:] + b" ok"}
    on_token, flush = token_printer(pieces.__getitem__)
    on_token(1)
    assert out.getvalue() == ""  # half a character is held back, not printed as U+FFFD
    on_token(2)
    assert out.getvalue() == "日"
    on_token(3)
    flush()
    assert out.getvalue() == "日本 ok"


def test_refusals(model: Path, tmp_path: Path) -> None:
    assert "no prompt" in refused(ggtrain("generate", "-m", model, "-n", "4"))
    assert "not both" in refused(ggtrain("generate", "-m", model, "-p", "a", "-f", model))
    line = refused(ggtrain("generate", "-m", model, "-p", " ".join(["word"] * 80), "-c", "32"))
    assert "prompt is too long" in line and "-c" in line
    line = refused(ggtrain("generate", "-m", tmp_path / "missing.gguf", "-p", "a"))
    assert "missing.gguf" in line
    assert "--lora" in refused(ggtrain("generate", "-m", model, "-p", "a", "--compare"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    assert "bad.gguf" in refused(ggtrain("generate", "-m", model, "-p", "a", "--lora", bad))


def test_cnv_is_the_chat_loop() -> None:
    # `generate -cnv` is `ggtrain chat` (the bundled Gemma 3 270M, whose template ggtrain ships)
    args = ["-n", "6", "--temp", "0", "-c", "128", "-t", "1"]
    turns = "Hello\nWhat is two plus two?\n/exit\n"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return ok(subprocess.run([*GGTRAIN, *cmd, *args], input=turns, capture_output=True, text=True,
                                 timeout=600, check=False))

    cnv, chat = run("generate", "-cnv"), run("chat")
    assert cnv.stdout == chat.stdout and cnv.stdout.count("\n") >= 2
    assert "-cnv" in refused(ggtrain("generate", "-cnv", "-p", "Hi"))


def test_a_peft_directory_is_the_same_adapter(model: Path, adapter: Path, tmp_path: Path) -> None:
    # --lora takes PEFT directories as perplexity does: the exported adapter continues as the GGUF one,
    # at a negative scale too
    peft_dir = tmp_path / "peft"
    ok(ggtrain("export-peft", adapter, "-o", peft_dir, "-m", model))
    common = ["-m", model, "-p", PROMPT, "-n", "10", "--temp", "0", "-c", "64", "--no-display-prompt"]
    from_gguf = ok(ggtrain("generate", *common, "--lora", f"{adapter}:-0.5")).stdout
    from_peft = ok(ggtrain("generate", *common, "--lora", f"{peft_dir}:-0.5")).stdout
    tok = Tokenizer.from_model_file(ModelFile(model))
    assert from_gguf == from_peft != tok.decode(greedy_ids(model, PROMPT, 10), special=False) + "\n"
