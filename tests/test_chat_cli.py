"""`ggtrain chat` as a user runs it (subprocess): a scripted conversation through a pipe on a tiny Qwen2
and on Gemma 3 270M, the rendered prompts against jinja2's rendering of the model's template, only the
new tokens evaluated in a later turn, /reset and /exit, seeded sampling, refusals, and the `> ` prompt
on a terminal only."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from ggtrain.samples import sample_path
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from loras import refused
from tinymodels import tiny_model

from ggtrain.gguf.defaults import default_model_path

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
TURN = re.compile(r"chat: turn (\d+) prompt \((\d+) tokens reused, (\d+) evaluated\):\n(.*?)\nchat: end of prompt\n",
                  re.DOTALL)
TIMING = re.compile(r"\[ prompt: (\d+) tokens \((\d+) cached\), \S+ t/s \| generation: (\d+) tokens, \S+ t/s \]")


def chat(model: Path, stdin: str, *flags: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*GGTRAIN, "chat", "-m", str(model), "-t", "2", *flags], input=stdin, capture_output=True,
                          text=True, timeout=timeout, check=False)


def turns(err: str) -> list[tuple[int, int, str]]:
    """(reused, evaluated, rendered prompt) of each turn, from --verbose-prompt's lines."""
    return [(int(r), int(e), p) for _, r, e, p in TURN.findall(err)]


def jinja_render(source: str, messages: list[dict], bos: str, eos: str) -> str:
    """What transformers' apply_chat_template renders (add_generation_prompt=True)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(source).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                          eos_token=eos)


@pytest.fixture(scope="module")
def qwen() -> Path:
    return tiny_model("qwen2", "Q8_0")


def test_two_turns_through_a_pipe_on_a_tiny_qwen2(qwen: Path):
    from ggtrain.gguf.modelfile import ModelFile

    r = chat(qwen, "Hello there\nWhat is two plus two?\n", "-n", "6", "--temp", "0", "--verbose-prompt",
             "-sys", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "> " not in r.stdout  # no prompt marker on a pipe
    (r1, e1, p1), (r2, e2, p2) = turns(r.stderr)
    timings = TIMING.findall(r.stderr)
    assert [(int(a), int(b), int(c)) for a, b, c in timings] == [(e1, 0, 6), (e2, r2, 6)]
    source = ModelFile(qwen).metadata["tokenizer.chat_template"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert p1 == jinja_render(source, msgs, "", "<|endoftext|>")
    # the reply as printed is the assistant message of the second rendering
    reply1 = p2[len(p1):p2.index("<|im_end|>", len(p1))]
    assert r.stdout.startswith(reply1 + "\n")
    msgs += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "What is two plus two?"}]
    assert p2 == jinja_render(source, msgs, "", "<|endoftext|>")
    # turn 2 evaluates only what follows the cached prompt + reply (the 6th reply token was never fed)
    assert r1 == 0 and r2 == e1 + 5
    assert e2 == len(tokens(qwen, p2)) - r2


def tokens(model: Path, rendered: str) -> list[int]:
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.text.tokenizer import Tokenizer

    tok = Tokenizer.from_model_file(ModelFile(model))
    bos = tok.piece(tok.bos_id) if tok.bos_id is not None else ""
    if tok.add_bos and bos and rendered.startswith(bos):  # the tokenizer adds it: as llama.cpp tokenizes a chat
        rendered = rendered[len(bos):]
    return tok.encode(rendered, add_special=True, parse_special=True)


def test_reset_and_exit(qwen: Path):
    r = chat(qwen, "Hello there\n/reset\nHello there\n/exit\nnever answered\n", "-n", "5", "--temp", "0",
             "--verbose-prompt")
    assert r.returncode == 0, r.stderr
    (_, e1, p1), (r2, e2, p2) = turns(r.stderr)  # /exit: the third line is never a turn
    assert "chat: conversation reset" in r.stderr
    assert (r2, e2, p2) == (0, e1, p1)  # after /reset the same first turn, from an empty cache
    half = len(r.stdout) // 2
    assert r.stdout[:half] == r.stdout[half:] and r.stdout.endswith("\n")  # greedy: the same reply twice


def test_end_of_input_ends_and_blank_lines_are_skipped(qwen: Path):
    r = chat(qwen, "\n\nHello there", "-n", "3", "--temp", "0")  # no newline at the end
    assert r.returncode == 0, r.stderr
    assert len(TIMING.findall(r.stderr)) == 1


def test_seeded_sampling_repeats(qwen: Path):
    script = "Hello there\nTell me more\n"
    a = chat(qwen, script, "-n", "8", "--seed", "42", "--temp", "1.5", "--top-k", "0", "--min-p", "0")
    b = chat(qwen, script, "-n", "8", "--seed", "42", "--temp", "1.5", "--top-k", "0", "--min-p", "0")
    c = chat(qwen, script, "-n", "8", "--seed", "43", "--temp", "1.5", "--top-k", "0", "--min-p", "0")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert "chat: seed 42" in a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout
    r = chat(qwen, "Hello there\n", "-n", "2")  # -1: a random seed, printed so the run can be repeated
    seed = re.search(r"chat: seed (\d+)", r.stderr).group(1)
    assert chat(qwen, "Hello there\n", "-n", "2", "--seed", seed).stdout == r.stdout


def test_a_turn_beyond_the_context_is_refused_and_the_chat_goes_on(qwen: Path):
    r = chat(qwen, "Hi\n" + "word " * 60 + "\nHi again\n", "-c", "48", "-n", "3", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert re.search(r"chat: this turn does not fit: the conversation would take \d+ tokens and the context "
                     r"holds 48 \(-c 48\); /reset to start over, or a larger -c", r.stderr), r.stderr
    assert len(TIMING.findall(r.stderr)) == 2


def test_bad_input_is_one_line_exit_2(qwen: Path, tmp_path: Path):
    llama = tiny_model("llama", "Q8_0")  # no chat template in its GGUF, and none ggtrain ships for it
    err = refused(chat(llama, "Hi\n"))
    assert "has no chat template (tokenizer.chat_template); give one with --chat-template FILE" in err
    r = chat(qwen, "Hi\n", "--chat-template", str(tmp_path / "missing.jinja"))
    assert r.returncode == 2 and "missing.jinja" in r.stderr and "does not exist" in r.stderr
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    assert "chat template does not parse" in refused(chat(qwen, "Hi\n", "--chat-template", str(bad)))
    for flag, value in [("--temp", "-1"), ("--top-p", "1.5"), ("--repeat-penalty", "0"), ("--seed", "-2"),
                        ("-c", "4"), ("-n", "0")]:
        r = chat(qwen, "Hi\n", flag, value)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, (flag, r.stderr)


def test_a_chat_template_file_is_used_with_a_llama_model(tmp_path: Path):
    llama = tiny_model("llama", "Q8_0")
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    r = chat(llama, "Hello there\n", "--chat-template", str(tmpl), "-n", "3", "--temp", "0", "--verbose-prompt")
    assert r.returncode == 0, r.stderr
    ((_, _, p),) = turns(r.stderr)
    assert p == "<s>[user] Hello there\n[assistant] "


def test_gemma3_two_turns_through_a_pipe():
    """The bundled Gemma 3 270M: ggtrain's Gemma 3 template, prompts as jinja2 renders it."""
    r = chat(default_model_path(), "What is the capital of France?\nAnd of Germany?\n", "-n", "16", "--temp", "0",
             "--verbose-prompt", "--system", "Answer in one short sentence.")
    assert r.returncode == 0, r.stderr
    assert "ggtrain's Gemma 3 template" in r.stderr
    (r1, e1, p1), (r2, e2, p2) = turns(r.stderr)
    source = sample_path("gemma3_chat_template.jinja").read_text()
    msgs = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
    assert p1 == jinja_render(source, msgs, "<bos>", "<eos>")
    head = "<start_of_turn>model\n"
    reply1 = p2[len(p1):p2.index("<end_of_turn>", len(p1))]  # as the template writes it back: trimmed
    assert reply1 and r.stdout.lstrip().startswith(reply1)
    msgs += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And of Germany?"}]
    assert p2 == jinja_render(source, msgs, "<bos>", "<eos>") and p2.endswith(head)
    assert r1 == 0 and 0 < r2 <= e1 + 15 and e2 == len(tokens(default_model_path(), p2)) - r2
    if reply1 == reply1.strip():  # nothing for the template's trim to take off: the whole cache is reused
        assert r2 == e1 + 15


def test_the_prompt_marker_shows_on_a_terminal(qwen: Path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([*GGTRAIN, "chat", "-m", str(qwen), "-t", "2", "-n", "3", "--temp", "0"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, b"Hello there\n/exit\n")
    out, err = proc.communicate(timeout=600)
    os.close(master)
    assert proc.returncode == 0, err
    assert out.startswith(b"\n> ") and out.count(b"> ") == 2, out
    assert b"/reset to start over" in err


@pytest.mark.parametrize("flags, want", [
    (["-p", "Hello"], "No such option '-p': the messages come from stdin, one a line"),
    (["-i"], "not needed: ggtrain chat is always interactive"),
    (["--lora-scaled", "a.gguf", "0.5"], "use --lora ADAPTER:SCALE"),
    (["-r", "User:"], "a reply ends at the chat template's end-of-turn token"),
])
def test_llama_cli_flags_get_a_hint(qwen: Path, flags: list[str], want: str):
    assert want in refused(chat(qwen, "Hi\n", *flags))


def test_llama_cli_conversation_switches_are_taken(qwen: Path):
    r = chat(qwen, "Hello there\n", "-cnv", "--jinja", "-n", "2", "--temp", "0")
    assert r.returncode == 0 and len(TIMING.findall(r.stderr)) == 1, r.stderr


def test_a_program_can_drive_it_turn_by_turn_through_pipes(qwen: Path):
    """The reply is on stdout (flushed) while the chat waits for the next line: a driver can read it
    before it writes the next turn."""
    proc = subprocess.Popen([*GGTRAIN, "chat", "-m", str(qwen), "-t", "2", "-n", "4", "--temp", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Hello there\n")
        proc.stdin.flush()
        got = b""
        while not got.endswith(b"\n"):  # the reply (or its first line)
            ready, _, _ = select.select([proc.stdout], [], [], 300)
            assert ready, "no reply within 300 s"
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read().decode()
            got += chunk
        assert proc.poll() is None  # still there, waiting for the next turn
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert got.strip() and err.count(b"[ prompt: ") == 1  # the one turn's text came before /exit was sent
