"""Every option of every ggtrain command at its edges, as a user (or an adversary) types them.

The walker introspects the click commands (`main.commands[...].params`) and gives every option
0, -1, nan, ±inf, 1e30, a 31-digit integer, a wrong-type string and an empty string, path options
also a missing file, a directory and a binary file, flags a value they do not take. All the cases
run in ONE fresh interpreter (this file run as a script), each through the real `main` group
with click's CliRunner, on a tiny model and a tiny data file with one training step, so values
that are legitimately accepted do a little real work. Every case must end with exit code 0 or 2,
no traceback, and for 2 a message naming the option (or the file it was given); values that are
never valid for an option's type must be refused.

The other tests run `ggtrain` in a subprocess: --config values of the wrong type, --checkpoint-in
files that are not checkpoints, the hints for llama.cpp's flags, the memory refusal before
allocation, --grad-acc beyond the data and a resume with nothing left to train.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from loras import peak_rss, refused

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from ggtrain.cli.main import main
from ggtrain.cli.options import HINTS, Command, Float, Int, LoraArg, PathType, Size, Text

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e30", "1" + "0" * 30, "abc", ""]
NEVER_A_NUMBER = {"nan", "inf", "-inf", "abc", ""}  # every numeric option refuses these
# Values the brief singles out, refused whatever the walker's generic rules say.
MUST_REFUSE = {("finetune", "mem_limit", "0"), ("finetune", "max_steps", "0"), ("finetune", "lora_r", "0"),
               ("finetune", "epochs", "0"), ("finetune", "adam_eps", "0"), ("finetune", "seed", "-1"),
               ("perplexity", "n_chunks", "0"), ("data", "ctx", "0")}
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.\n"


# --- the world the cases run in -------------------------------------------------------------------

BINARY = bytes(range(256)) * 4 + b"\x00\xff" * 100


def make_world(root: Path) -> dict[str, str]:
    """Tiny model, data and text files, an adapter, and the bad files the other tests give options."""
    from tinymodels import tiny_model

    from ggtrain.adapters.gguf_lora import write_gguf_adapter
    from ggtrain.adapters.peft import export_peft
    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes

    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model("llama", "Q8_0")
    (root / "train.txt").write_text(TEXT * 2)
    (root / "ppl.txt").write_text(TEXT * 6)
    (root / "binary.bin").write_bytes(BINARY)
    mf = ModelFile(model)
    lcfg = LoraConfig.make(r=2, alpha=2)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, read_hparams(mf).n_layer), seed=1)
    adapter = write_gguf_adapter(root / "adapter.gguf", lora, mf)
    export_peft(adapter, root / "peft", mf)
    (root / "out").mkdir()
    (root / "chat.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return {"root": str(root), "model": str(model), "train": str(root / "train.txt"), "ppl": str(root / "ppl.txt"),
            "binary": str(root / "binary.bin"), "adapter": str(adapter), "peft": str(root / "peft"),
            "chat_template": str(root / "chat.jinja")}


def case_files(root: Path, cid: int) -> dict[str, str]:
    """A missing file, a directory and a binary file of the case's own: an accepted case may write
    where it is pointed (--outdir, --lora-out), and must not change what the next case is given."""
    d = root / "files" / str(cid)
    (d / "a-directory").mkdir(parents=True)
    (d / "binary.bin").write_bytes(BINARY)
    return {"@missing": str(d / "no-such-file.txt"), "@dir": str(d / "a-directory"), "@binary": str(d / "binary.bin")}


def base_values(w: dict[str, str]) -> dict[str, dict[str, str]]:
    """command -> {param name: value}: what every case of that command passes besides the walked
    option, so it gets past its required inputs and, when the value is accepted, does little work."""
    return {
        "finetune": {"model_path": w["model"], "train_data": w["train"], "data_format": "text", "ctx": "16",
                     "batch": "1", "epochs": "1", "max_steps": "1", "save_every": "0", "threads": "1",
                     "lora_r": "1", "outdir": "OUTDIR"},
        "data": {"model_path": w["model"], "train_data": w["train"], "data_format": "text", "ctx": "16", "show": "1"},
        "perplexity": {"model_path": w["model"], "text_file": w["ppl"], "n_ctx": "16", "n_batch": "32",
                       "n_chunks": "2", "threads": "1"},
        "tokenize": {"model_path": w["model"], "prompt": "hello"},
        "info": {"model": w["model"]},
        "export-peft": {"adapter": w["adapter"], "model_path": w["model"], "outdir": "OUTDIR"},
        "import-peft": {"peft_dir": w["peft"], "model_path": w["model"], "outfile": "OUTDIR.gguf"},
        "merge": {"model_path": w["model"], "loras": w["adapter"], "out": "merged.gguf", "threads": "1"},
        "ollama": {"model_path": w["model"], "loras": w["adapter"], "out": "Modelfile"},
        "chat": {"model_path": w["model"], "chat_template": w["chat_template"], "n_ctx": "16", "threads": "1"},
        "generate": {"model_path": w["model"], "prompt": "hello", "n_ctx": "16", "n_predict": "1", "threads": "1"},
    }


def _long(p: click.Parameter) -> str:
    return max(p.opts, key=len)


def _render(p: click.Parameter, value: str) -> list[str]:
    if isinstance(p, click.Argument):
        return ["--", value]
    return [f"{_long(p)}={value}"]


def values_for(p: click.Parameter, w: dict[str, str]) -> list[str]:
    """The edge values the walker gives parameter p (@missing, @dir, @binary: the case's own files)."""
    t = p.type
    paths = ["@missing", "@dir", "@binary"]
    if isinstance(p, click.Option) and p.is_flag:
        return ["abc"]  # --flag=abc: a flag takes no value
    vals = list(NUMBERS)
    if isinstance(t, click.Path) or (isinstance(t, Text) and p.name.endswith("_out")):
        vals += paths
    if isinstance(t, LoraArg):
        a = w["adapter"]
        vals += paths + [a, f"{a}:nan", f"{a}:inf", f"{a}:-inf", f"{a}:0", f"{a}:-1", ":0.5"]
    return vals


# (command, walked option) -> a base option to leave out, as the two exclude each other
EXCLUSIVE = {("tokenize", "file"): "prompt"}


def build_cases(w: dict[str, str]) -> list[dict[str, Any]]:
    base = base_values(w)
    root = Path(w["root"])
    cases: list[dict[str, Any]] = []
    for cmd_name, cmd in main.commands.items():
        params = {p.name: p for p in cmd.params}
        walked = [p for p in cmd.params if p.name != "help"]
        for p in [None, *walked]:  # None: the base case alone, which must succeed
            for value in ([None] if p is None else values_for(p, w)):
                cid = len(cases)
                if value is not None and value.startswith("@"):
                    value = case_files(root, cid)[value]
                args = [cmd_name]
                for name, v in base[cmd_name].items():
                    if p is not None and name in (p.name, EXCLUSIVE.get((cmd_name, p.name))):
                        continue
                    v = v.replace("OUTDIR", f"{w['root']}/out/{cid}")
                    args += [v] if isinstance(params[name], click.Argument) else [_long(params[name]), v]
                if p is not None:
                    args += [f"{_long(p)}={value}"] if (isinstance(p, click.Option) and p.is_flag) \
                        else _render(p, value)
                cases.append({"id": cid, "command": cmd_name, "param": p.name if p else None, "value": value,
                              "args": args})
    return cases


# --- the walker's interpreter ----------------------------------------------------------------------

def walk(cases_file: str, results_file: str) -> None:
    """Run every case through `main` in this process; write what each did."""
    from click.testing import CliRunner

    cases = json.loads(Path(cases_file).read_text())
    runner = CliRunner()
    results = []
    for c in cases:
        cwd = Path(cases_file).parent / "cwd" / str(c["id"])  # what a case writes to "." stays its own
        cwd.mkdir(parents=True)
        os.chdir(cwd)
        t0 = time.perf_counter()
        r = runner.invoke(main, c["args"])
        tb = None
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else repr(r.exception)
        secs = time.perf_counter() - t0
        results.append({"id": c["id"], "exit": r.exit_code, "output": r.output, "traceback": tb, "seconds": secs})
        if secs > 0.05:  # a case that got to real work: let the next one start from a clean heap
            gc.unfreeze()
            gc.collect()
    Path(results_file).write_text(json.dumps(results))


def names_it(p: click.Parameter, value: str | None, output: str) -> bool:
    """Whether an error message names the parameter (any of its flags) or the file it was given."""
    names = [*getattr(p, "opts", []), *getattr(p, "secondary_opts", []), p.human_readable_name]
    if isinstance(p, click.Argument):
        names.append(p.name.upper())
    if any(n in output for n in names):
        return True
    path = (value or "").split(":")[0]
    return bool(path) and (f"ggtrain: error: {path}" in output or (os.path.isabs(path) and path in output))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory.mktemp("edges"))


def test_every_option_of_every_command_at_its_edges(tmp_path: Path) -> None:
    world = make_world(tmp_path)  # its own: accepted cases write over the files they are given (--lora-out)
    cases = build_cases(world)
    root = Path(world["root"])
    (root / "cases.json").write_text(json.dumps(cases))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(HERE), "walk", str(root / "cases.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=900, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    assert len(results) == len(cases)
    slow = sorted(results.values(), key=lambda r: -r["seconds"])[:5]
    print(f"{len(cases)} cases in {time.time() - t0:.0f} s; slowest:",
          [(round(r["seconds"], 2), *(cases[r["id"]][k] for k in ("command", "param", "value"))) for r in slow])

    problems = []
    for c in cases:
        r = results[c["id"]]
        cmd = main.commands[c["command"]]
        where = f"{' '.join(c['args'][:1])} {c['param']}={c['value']!r}: exit {r['exit']}: "
        if c["param"] is None:
            if r["exit"] != 0:
                problems.append(where + "the base case fails: " + r["output"][-500:])
            continue
        p = next(q for q in cmd.params if q.name == c["param"])
        if r["traceback"] or "Traceback" in r["output"]:
            problems.append(where + (r["traceback"] or r["output"])[-1500:])
            continue
        if r["exit"] not in (0, 2):
            problems.append(where + "exit code must be 0 or 2: " + r["output"][-500:])
            continue
        if r["exit"] == 2:
            if not names_it(p, c["value"], r["output"]):
                problems.append(where + "the message does not name the option: " + r["output"][-500:])
            if r["output"].count("ggtrain: error:") > 1:
                problems.append(where + "more than one error line: " + r["output"][-500:])
            continue
        # accepted (exit 0): only where the value is legitimately allowed
        numeric = isinstance(p.type, (click.types._NumberParamTypeBase, Size))
        if numeric and c["value"] in NEVER_A_NUMBER:
            problems.append(where + "a numeric option accepted it")
        if isinstance(p.type, PathType) and not c["value"].strip():
            problems.append(where + "a path option accepted an empty path")
        if isinstance(p, click.Option) and p.is_flag:
            problems.append(where + "a flag accepted a value")
        if isinstance(p.type, Int) and c["value"] in ("1e30", "1" + "0" * 30):
            problems.append(where + "an integer option accepted a huge value")
        if isinstance(p.type, LoraArg) and c["value"].rsplit(":", 1)[-1] in ("nan", "inf", "-inf"):
            problems.append(where + "a non-finite adapter scale was accepted")
        if (c["command"], c["param"], c["value"]) in MUST_REFUSE:
            problems.append(where + "must be refused")
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)


def test_every_option_uses_the_validated_types() -> None:
    """No plain click number, path or string type is left for a NaN, an inf or '' to slip through."""
    loose = []
    for cmd_name, cmd in main.commands.items():
        assert isinstance(cmd, Command), f"{cmd_name}: use @click.command(cls=Command) (the old-flag hints)"
        for p in cmd.params:
            t = p.type
            if isinstance(t, click.types._NumberParamTypeBase) and not isinstance(t, (Int, Float)):
                loose.append(f"{cmd_name} {p.name}: {t!r}")
            if isinstance(t, click.Path) and not isinstance(t, PathType):
                loose.append(f"{cmd_name} {p.name}: {t!r}")
    assert not loose, "use the types of ggtrain.cli.options: " + ", ".join(loose)


# --- the same, as a user runs it -------------------------------------------------------------------

def run(args: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GGTRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)



def finetune_args(w: dict[str, str], outdir: Path, *extra: str) -> list[str]:
    return ["finetune", "-m", w["model"], "--train-data", w["train"], "--format", "text", "-c", "16", "-b", "1",
            "--adam-iter", "1", "--save-every", "0", "-t", "1", "--lora-r", "1", "--outdir", str(outdir), *extra]


@pytest.mark.parametrize("line, want", [
    ("lora-r = 4.5", "lora-r = 4.5: expected an integer, not a float"),
    ('lora-r = "8"', "lora-r = '8': expected an integer, not a string"),
    ("lora-alpha = true", "lora-alpha = true: expected a number, not a boolean"),
    ("use-checkpointing = 1", "use-checkpointing = 1: expected true or false, not an integer"),
    ("lora-out = 3", "lora-out = 3: expected a string, not an integer"),
    ("ctx = [64, 128]", "ctx = [64, 128]: expected an integer, not an array"),
    ("lora-dropout = nan", "lora-dropout = nan: nan is not a finite number"),
    ("adam-iter = 0", "adam-iter = 0: 0 is too small: at least 1, or -1 for no limit"),
    ("mem-limit = 0", "mem-limit = 0: the limit must be more than 0 bytes"),
    ("seed = 1979-05-27", "seed = 1979-05-27: expected an integer, not a date"),
    ("[lora-r]\nx = 1", "lora-r = {'x': 1}: expected an integer, not a table"),
])
def test_config_value_of_the_wrong_type_names_file_and_key(world: dict[str, str], tmp_path: Path, line: str,
                                                          want: str) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"eval-every = 0\n{line}\n")  # a right value first: the wrong one is still found
    err = refused(run(["finetune", "--config", str(cfg), *finetune_args(world, tmp_path / "o")[1:]]))
    assert f"{cfg}: {want}" in err and "--config" in err
    assert not (tmp_path / "o").exists()  # refused while parsing, before anything is written


def test_config_that_is_binary_or_not_utf8(world: dict[str, str], tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("sample-start = \"Réponse\"\n".encode("latin-1"))
    err = refused(run(["finetune", "--config", str(latin1), "-m", world["model"]]))
    assert f"{latin1}: not a TOML file (not UTF-8 text: bad byte at offset 17)" in err
    err = refused(run(["finetune", "--config", world["binary"], "-m", world["model"]]))
    assert f"{world['binary']}: not a TOML file" in err
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b"lora-r = 4\x00\x00\x00")
    assert f"{nul}: not valid TOML" in refused(run(["finetune", "--config", str(nul)]))
    good = tmp_path / "good.toml"  # and a right one still works: an integer for a number is fine
    good.write_text('lora-alpha = 4\nmem-limit = "4G"\nuse-checkpointing = false\n')
    r = run(["finetune", "--config", str(good), *finetune_args(world, tmp_path / "ok")[1:]])
    assert r.returncode == 0, r.stderr
    assert "lora: r 1, alpha 4 " in r.stderr and "memory limit 4.00 GiB" in r.stderr


def test_checkpoint_in_that_is_not_a_checkpoint(world: dict[str, str], tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("this is not a checkpoint\n")
    zip_path = tmp_path / "random.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        z.writestr("readme.txt", "hello")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"format": "ggtrain-checkpoint"}], dtype=object), lora=np.zeros(3))
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    cases = {text: "it is a text file", Path(world["model"]): "it is a GGUF file",
             Path(world["adapter"]): "it is a GGUF file", zip_path: "a zip archive without ggtrain's 'meta' member",
             pickled: "member 'meta' holds pickled Python objects, which ggtrain never loads", npy: ".npy array",
             Path(world["binary"]): "it is binary data"}
    for i, (path, want) in enumerate(cases.items()):
        err = refused(run(finetune_args(world, tmp_path / f"o{i}", "--checkpoint-in", str(path))))
        assert f"{path}: not a ggtrain checkpoint" in err and want in err, err
        assert "allow_pickle" not in err and "pickle.load" not in err  # numpy's own advice never leaks


@pytest.mark.parametrize("cmd, flags, want", [
    ("finetune", ["--save-path", "./lora-adapter.bin"], "No such option '--save-path': use --outdir DIR"),
    ("finetune", ["-p", "32"], "use --sample-prompt TEXT (at every --eval-every); afterwards try it with `ggtrain"),
    ("finetune", ["--prompt", "Tell me a joke"], "(for the batch size use -b/--batch)"),
    ("finetune", ["-ngl", "99"], "No such option '-n' (in -ngl): not needed: ggtrain runs on the CPU"),
    ("finetune", ["--train_data", "x.txt"], "No such option '--train_data': use --train-data (with dashes)"),
    ("finetune", ["-lr", "1e-4"], "(in -lr): use --learning-rate"),
    ("finetune", ["--lora-rank", "16"], "use --lora-r"),
    ("finetune", ["--rank-w1", "4"], "use --rank-ffn-gate"),
    ("finetune", ["--resume"], "use --checkpoint-in"),
    ("finetune", ["--opt-past", "3"], "not supported: ggtrain has no convergence test"),
    ("finetune", ["--rank-tok-embd", "4"], "not supported: the token embeddings are not trained"),
    ("perplexity", ["--lora-scaled", "a.gguf", "0.5"], "use --lora ADAPTER:SCALE"),
    ("data", ["-f", "x.txt"], "use --train-data FILE"),
])
def test_flags_of_llama_cpp_trainers_get_a_hint(cmd: str, flags: list[str], want: str) -> None:
    err = refused(run([cmd, *flags]))
    assert want in err, err


def test_seed_tutorial_command_is_answered_flag_by_flag(world: dict[str, str], tmp_path: Path) -> None:
    """shared/seeds/004's command: each flag ggtrain lacks is named with its equivalent in turn."""
    cmd = ["finetune", "-m", world["model"], "-t", "1", "-p", "32", "--train-data", world["train"],
           "--save-path", str(tmp_path / "lora-adapter.bin")]
    assert "-p" in refused(run(cmd)) and "-b/--batch" in refused(run(cmd))
    cmd = [a for a in cmd if a not in ("-p", "32")]
    assert "--save-path': use --outdir DIR" in refused(run(cmd))


def test_hint_table_is_consistent() -> None:
    """Every hinted flag is one the command lacks (else the hint is dead), and every flag a hint tells
    the user to use is one the command has."""
    for cmd_name, table in HINTS.items():
        cmd = main.commands[cmd_name]
        known = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        for flag, hint in table.items():
            assert flag not in known, f"{cmd_name} {flag}: the command has it"
            for named in re.findall(r"use (--?[a-z][a-z0-9-]*)", hint):
                assert named in known, f"{cmd_name} {flag}: the hint names {named}, which it does not have"



@pytest.mark.parametrize("extra, want", [
    (["--lora-r", "100000", "--mem-limit", "1G"], "LoRA rank 100000 needs about"),
    (["-c", "2000000", "--mem-limit", "4G"], "at --ctx 2000000, micro-batch 1"),
    (["-c", "2000000", "--micro-batch", "1", "--mem-limit", "4G"], "at --ctx 2000000, --micro-batch 1"),
    (["--rank-wq", "3000000"], "the memory limit"),  # the default limit: a share of the RAM available
])
def test_rank_or_context_too_big_is_refused_before_allocation(world: dict[str, str], tmp_path: Path,
                                                              extra: list[str], want: str) -> None:
    t0 = time.time()
    proc = subprocess.Popen([*GGTRAIN, *finetune_args(world, tmp_path / "o", *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = peak_rss(proc)
    out, err = proc.communicate(timeout=300)
    line = refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert want in line and "is too small" in line and "GiB" in line, line
    assert "LoRA params, grads, Adam state" in line  # the estimate's breakdown is in the message
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB: something big was allocated before the refusal"
    assert time.time() - t0 < 120
    assert not any((tmp_path / "o").glob("*.gguf"))


def test_grad_acc_beyond_the_data_and_a_step_limit_of_0(world: dict[str, str], tmp_path: Path) -> None:
    err = refused(run(finetune_args(world, tmp_path / "a", "--grad-acc", "50")))
    m = re.search(r"--grad-acc 50 asks for 50 batches a step, but an epoch of the training data has (\d+) "
                  r"batches of --batch 1 \((\d+) rows of --ctx 16\): use --grad-acc (\d+) or less", err)
    assert m and m[1] == m[2] == m[3] and 1 < int(m[1]) < 50, err
    r = run(finetune_args(world, tmp_path / "a2", "--grad-acc", m[1]))  # the bound is the data's, exactly
    assert r.returncode == 0, r.stderr
    err = refused(run(finetune_args(world, tmp_path / "b", "--adam-iter", "0")))
    assert "'--adam-iter': 0 is too small: at least 1, or -1 for no limit" in err
    err = refused(run(["perplexity", "-m", world["model"], "-f", world["ppl"], "--chunks", "0"]))
    assert "'--chunks': 0 is too small: at least 1, or -1 for all" in err
    for bad in ("0", "0.5", "lots", "-1G", "nan"):
        assert "--mem-limit" in refused(run(finetune_args(world, tmp_path / "c", "--mem-limit", bad)))


def test_resume_with_nothing_left_to_train(world: dict[str, str], tmp_path: Path) -> None:
    r = run(finetune_args(world, tmp_path / "run", "--adam-iter", "2"))
    assert r.returncode == 0, r.stderr
    ck = next(line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("checkpoint:"))
    err = refused(run(finetune_args(world, tmp_path / "run", "--adam-iter", "2", "--checkpoint-in", ck)))
    assert "the checkpoint is at step 2, and this run has 2 steps, so there is nothing left to train" in err
    r = run(finetune_args(world, tmp_path / "run", "--adam-iter", "3", "--epochs", "2", "--checkpoint-in", ck))
    assert r.returncode == 0, r.stderr  # with a step left, the same resume trains it


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "walk":
        walk(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} walk CASES.json RESULTS.json")
