"""`ggtrain finetune --sample-prompt` as a user runs it (subprocess, tiny Q8_0 llama): a greedy continuation
of each prompt at every --eval-every and at the end, printed and logged to train_log.jsonl; the text
moves as the adapter trains, and the last one is what the saved adapter continues with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from loras import refused
from tinymodels import tiny_model

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
TEXT = "/usr/share/common-licenses/GPL-3"
PROMPTS = ["The GNU General Public License is", "Everyone is permitted to copy"]


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model("llama", "Q8_0")


def finetune(model: Path, outdir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*GGTRAIN, "finetune", "-m", str(model), "--train-data", TEXT, "--format", "text", "--outdir", str(outdir),
            "-c", "64", "-b", "2", "-t", "2", "--seed", "3", "--learning-rate", "0.005", "--save-every", "0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)


def logged_samples(outdir: Path) -> dict[int, list[dict]]:
    recs = [json.loads(x) for x in (outdir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["samples"] for r in recs if "samples" in r}


def test_samples_at_every_evaluation_printed_logged_and_moving(model: Path, tmp_path: Path):
    out = tmp_path / "run"
    flags = [x for p in PROMPTS for x in ("--sample-prompt", p)]
    # with dropout on: a sample uses the adapter as it stands, never a dropped-out branch
    r = finetune(model, out, "--adam-iter", "8", "--eval-every", "3", "--sample-tokens", "6", "--lora-dropout", "0.1",
                 *flags)
    assert r.returncode == 0, r.stderr
    samples = logged_samples(out)
    assert sorted(samples) == [3, 6, 8]  # every --eval-every, then the end (8 is not a multiple of 3)
    for step, recs in samples.items():
        assert [s["prompt"] for s in recs] == PROMPTS
        for s in recs:
            assert 0 < s["tokens"] <= 6 and isinstance(s["text"], str)
            # printed as the log has it
            assert (f"sample at step {step}: {json.dumps(s['prompt'], ensure_ascii=False)} -> "
                    f"{json.dumps(s['text'], ensure_ascii=False)}") in r.stderr
    texts = {step: [s["text"] for s in recs] for step, recs in samples.items()}
    assert texts[3] != texts[8], texts  # training moved the adapter, and the samples show it
    # the last sample is what the saved adapter writes (ggtrain generate, greedy, same length)
    adapter = out / "ggml-lora-LATEST-f32.gguf"
    for s in samples[8]:
        g = subprocess.run([*GGTRAIN, "generate", "-m", str(model), "--lora", str(adapter), "-p", s["prompt"], "-n",
                            str(s["tokens"]), "--temp", "0", "--no-display-prompt", "-t", "2"],
                           capture_output=True, text=True, timeout=600, check=False)
        assert g.returncode == 0, g.stderr
        assert g.stdout.rstrip("\n") == s["text"].rstrip("\n"), (g.stdout, s["text"])


def losses(outdir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (outdir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_samples_without_validation_data_leave_training_as_it_was(model: Path, tmp_path: Path):
    common = ["--adam-iter", "3", "--lora-dropout", "0.1"]
    r = finetune(model, tmp_path / "end", *common, "--sample-prompt", PROMPTS[0], "--sample-tokens", "4")
    assert r.returncode == 0, r.stderr
    samples = logged_samples(tmp_path / "end")
    assert list(samples) == [3] and samples[3][0]["prompt"] == PROMPTS[0]  # no --eval-every: at the end
    assert "sample at step 3: " in r.stderr
    every = finetune(model, tmp_path / "every", *common, "--eval-every", "1", "--sample-prompt", PROMPTS[0],
                     "--sample-tokens", "4")
    assert every.returncode == 0, every.stderr
    assert list(logged_samples(tmp_path / "every")) == [1, 2, 3]
    plain = finetune(model, tmp_path / "plain", *common)
    assert plain.returncode == 0, plain.stderr
    # sampling between steps touches nothing training uses: the same losses to the last bit
    assert losses(tmp_path / "every") == losses(tmp_path / "end") == losses(tmp_path / "plain")


def test_sample_flags_are_checked(model: Path, tmp_path: Path):
    err = refused(finetune(model, tmp_path / "x", "--adam-iter", "2", "--eval-every", "1"))
    assert "--sample-prompt TEXT" in err  # named among what --eval-every needs
    r = finetune(model, tmp_path / "y", "--sample-prompt", "")
    assert r.returncode == 2 and "--sample-prompt" in r.stderr and "empty" in r.stderr
    r = finetune(model, tmp_path / "z", "--sample-prompt", "Hi", "--sample-tokens", "0")
    assert r.returncode == 2 and "--sample-tokens" in r.stderr


def test_sample_prompts_from_a_config_file(model: Path, tmp_path: Path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('adam-iter = 1\nsample-tokens = 3\nsample-prompt = ["Hello there", "Bye"]\n')
    r = finetune(model, tmp_path / "a", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert [s["prompt"] for s in logged_samples(tmp_path / "a")[1]] == ["Hello there", "Bye"]
    cfg.write_text('adam-iter = 1\nsample-tokens = 3\nsample-prompt = "Hello there"\n')  # one, as a string
    r = finetune(model, tmp_path / "b", "--config", str(cfg), "--sample-prompt", "From the command line")
    assert r.returncode == 0, r.stderr
    assert [s["prompt"] for s in logged_samples(tmp_path / "b")[1]] == ["From the command line"]  # flags win
    cfg.write_text("sample-prompt = [1, 2]\n")
    assert "sample-prompt = 1: expected a string, not an integer" in refused(finetune(model, tmp_path / "c",
                                                                                       "--config", str(cfg)))
