"""`ggtrain ollama` and `finetune --ollama` as a user runs them: the Modelfile read back with Ollama's
own parser (tests/ollama_parser.py, a port of parser.go, first checked on Ollama's own test cases),
every path in it absolute and existing, the stop tokens llama.cpp's end-of-generation set, and the
refusals (two adapters, a scale Ollama cannot apply, text no quoting can carry)."""

from __future__ import annotations

import re
from pathlib import Path

import llamacpp
import pytest
from loras import TEXT, ggtrain, ok, random_adapter, refused
from ollama_parser import ParseError, parse
from tinymodels import tiny_model

from ggtrain.gguf.modelfile import ModelFile

SYSTEM = '  You are "terse".\nAnswer in one line, ""quoted"" if you must.\n\tTabs and "quotes" stay.  '


@pytest.fixture(scope="module")
def base() -> Path:
    return tiny_model("llama", "Q8_0")


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(base, tmp_path_factory.mktemp("ollama") / "my-adapter.gguf")


# Ollama's own cases (parser_test.go: TestParseFileFile, ...TrimSpace, ...From, ...Quoted, ...Parameters,
# ...Comments, ...Messages): the port must read them exactly as Ollama does.
OLLAMA_CASES = [
    (('FROM model1\nADAPTER adapter1\nLICENSE MIT\nPARAMETER param1 value1\nTEMPLATE """{{ .System }}\n\n'
      '{{ .Prompt }}"""    \n'),
     [("model", "model1"), ("adapter", "adapter1"), ("license", "MIT"), ("param1", "value1"),
      ("template", "{{ .System }}\n\n{{ .Prompt }}")]),
    ('FROM "     model 1"\nADAPTER      adapter3\nLICENSE "MIT       "\nPARAMETER param1        value1\n',
     [("model", "     model 1"), ("adapter", "adapter3"), ("license", "MIT       "), ("param1", "value1")]),
    ("FROM /what/is/the path ", [("model", "/what/is/the path")]),
    ("PARAMETER what the \nFROM lemons make lemonade ", [("what", "the"), ("model", "lemons make lemonade")]),
    ('FROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n',
     [("model", "foo"), ("system", "\nThis is a\nmultiline system.\n")]),
    ('FROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     [("model", "foo"), ("system", '\nThis is a multiline system with "quotes".\n')]),
    ('FROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
     [("model", "foo"), ("system", "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'")]),
    ('FROM foo\nSYSTEM """"""\n', [("model", "foo"), ("system", "")]),
    ("FROM foo\nPARAMETER stop ### User: \n", [("model", "foo"), ("stop", "### User:")]),
    ('FROM foo\nPARAMETER stop "### User: "\n', [("model", "foo"), ("stop", "### User: ")]),
    ('FROM foo\nPARAMETER stop """### User:\n"""\n', [("model", "foo"), ("stop", "### User:\n")]),
    ("FROM foo\nPARAMETER stop <|eot_id|>\n", [("model", "foo"), ("stop", "<|eot_id|>")]),
    ("\n# comment\nFROM foo\n\t", [("model", "foo")]),
    ("from foo\nsystem hello there\n", [("model", "foo"), ("system", "hello there")]),  # keywords: any case
    ('FROM foo\nMESSAGE system """\nYou are a multiline file parser.\n"""\n\t\t\t',
     [("model", "foo"), ("message", "system: \nYou are a multiline file parser.\n")]),
]
OLLAMA_ERRORS = ["", "PARAMETER param1 value1", "FROM foo\nBADCOMMAND param1 value1\n",
                 'FROM foo\nSYSTEM """This is a multiline system.""\n', 'FROM foo\nSYSTEM "\n',
                 "FROM foo\nPARAMETER param1\n", "FROM foo\nMESSAGE badguy I'm a bad guy!\n",
                 "FROM foo\nMESSAGE system"]


@pytest.mark.parametrize("text, want", OLLAMA_CASES)
def test_the_parser_port_reads_ollamas_own_cases(text: str, want: list[tuple[str, str]]) -> None:
    assert parse(text) == want


@pytest.mark.parametrize("text", OLLAMA_ERRORS)
def test_the_parser_port_refuses_what_ollama_refuses(text: str) -> None:
    with pytest.raises(ParseError):
        parse(text)


def read_modelfile(path: Path) -> list[tuple[str, str]]:
    """The Modelfile's instructions as Ollama reads them; every path absolute and existing."""
    cmds = parse(path.read_text(encoding="utf-8"))
    for name, arg in cmds:
        if name in ("model", "adapter"):
            assert Path(arg).is_absolute() and Path(arg).is_file(), (name, arg)
    assert not any(n == "template" for n, _ in cmds)  # Ollama takes the GGUF's own chat template
    return cmds


def printed_lines(stdout: str, modelfile: Path) -> str:
    """The model name of the printed `ollama create NAME -f MODELFILE` / `ollama run NAME` lines."""
    m = re.search(rf"^  ollama create (\S+) -f {re.escape(str(modelfile))}$", stdout, re.MULTILINE)
    assert m, stdout
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", m[1]), m[1]
    assert f"\n  ollama run {m[1]}\n" in stdout
    return m[1]


def test_modelfile_for_base_and_adapter(base: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "Modelfile"
    out.parent.mkdir()
    r = ok(ggtrain("ollama", "-m", base, "--lora", adapter, "--system", SYSTEM, "-o", out))
    cmds = read_modelfile(out)
    assert cmds == [("model", str(base)), ("adapter", str(adapter)), ("stop", "</s>"), ("system", SYSTEM)]
    assert printed_lines(r.stdout, out) == "my-adapter"
    assert f"wrote:   {out}" in r.stdout


def test_relative_paths_become_absolute_and_the_default_is_beside_the_adapter(base: Path, adapter: Path,
                                                                              tmp_path: Path) -> None:
    local = tmp_path / "work"
    local.mkdir()
    (local / "base.gguf").symlink_to(base)
    (local / "a.gguf").write_bytes(adapter.read_bytes())
    r = ok(ggtrain("ollama", "-m", "base.gguf", "--lora", "a.gguf", "--name", "team/tiny:v1", cwd=local))
    cmds = read_modelfile(local / "Modelfile")
    assert cmds[:2] == [("model", str(local / "base.gguf")), ("adapter", str(local / "a.gguf"))]
    assert "ollama create team/tiny:v1 -f " in r.stdout
    assert "--name" in refused(ggtrain("ollama", "-m", "base.gguf", "--lora", "a.gguf", "--name", "no spaces",
                                       cwd=local))


def test_stop_tokens_are_llamacpps_end_of_generation_set(gemma_path: Path, tmp_path: Path) -> None:
    adapter = random_adapter(gemma_path, tmp_path / "g.gguf", targets=("attn_q",), r=2)
    ok(ggtrain("ollama", "-m", gemma_path, "--lora", adapter, "-o", tmp_path / "Modelfile"))
    stops = [a for n, a in read_modelfile(tmp_path / "Modelfile") if n == "stop"]
    proc = llamacpp.run("llama-completion", "-m", gemma_path, "-p", "hi", "-n", "1", "-no-cnv", "--no-warmup",
                        "-c", "64", "-t", "2", "-v", "--log-colors", "off", input="")
    # "printing all EOG tokens: - 1 ('<eos>') ..." (once per load: the model may be loaded twice)
    eog = dict(re.findall(r"load: +- (\d+) \('(.*)'\)$", proc.stdout + proc.stderr, re.MULTILINE))
    assert eog and stops == [eog[i] for i in sorted(eog, key=int)], (stops, eog)
    assert "<end_of_turn>" in stops


def test_more_than_one_adapter_is_refused_with_a_pointer_to_merge(base: Path, adapter: Path,
                                                                  tmp_path: Path) -> None:
    other = random_adapter(base, tmp_path / "b.gguf", seed=5)
    err = refused(ggtrain("ollama", "-m", base, "--lora", adapter, "--lora", other, "-o", tmp_path / "M"))
    assert "one adapter per model" in err and "ggtrain merge" in err and "--merged" in err
    assert not (tmp_path / "M").exists()


def test_a_scale_needs_merged_and_merged_bakes_it_in(base: Path, adapter: Path, tmp_path: Path) -> None:
    err = refused(ggtrain("ollama", "-m", base, "--lora", f"{adapter}:0.5", "-o", tmp_path / "M"))
    assert "--merged" in err and "scale 1" in err
    other = random_adapter(base, tmp_path / "b.gguf", seed=5)
    merged = tmp_path / "merged.gguf"
    r = ok(ggtrain("ollama", "-m", base, "--lora", f"{adapter}:0.5", "--lora", other, "--merged", merged))
    cmds = read_modelfile(tmp_path / "Modelfile")  # beside the merged model
    assert cmds == [("model", str(merged)), ("stop", "</s>")]
    m = ModelFile(merged)
    assert m.get("general.base_model.count") == 3 and m.get("ggtrain.adapters.merge.scales").tolist() == [0.5, 1.0]
    assert m.get("ggtrain.adapters.merge.outtype") == "same" and m.get("general.file_type") == ModelFile(base).get(
        "general.file_type")
    assert printed_lines(r.stdout, tmp_path / "Modelfile") == "merged"


def test_text_no_quoting_can_carry_is_refused(base: Path, adapter: Path, tmp_path: Path) -> None:
    err = refused(ggtrain("ollama", "-m", base, "--lora", adapter, "--system", 'say """ hi',
                          "-o", tmp_path / "M"))
    assert "--system" in err and '"""' in err
    assert not (tmp_path / "M").exists()


def test_finetune_ollama_writes_the_modelfile_beside_the_adapter(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = ok(ggtrain("finetune", "-m", base, "--train-data", TEXT, "--format", "text", "-c", "32", "-b", "1",
                   "--adam-iter", "1", "--save-every", "0", "-t", "2", "--lora-r", "2", "--outdir", out,
                   "--ollama"))
    adapter = Path(re.search(r"^adapter: +(\S+)$", r.stdout, re.MULTILINE)[1])
    cmds = read_modelfile(out / "Modelfile")
    assert cmds == [("model", str(base)), ("adapter", str(adapter)), ("stop", "</s>")]
    assert adapter.parent == out.resolve()
    printed_lines(r.stdout, (out / "Modelfile").resolve())
