"""`ggtrain finetune` where users are surprised: llama.cpp's flag meanings (--adam-iter alone,
the first step's rate, --checkpoint-in resolution), divergence, Ctrl-C pressed once, twice, three
times, resuming with other settings, what the run says (subprocess as a user runs it, on a tiny
model; the Ctrl-C sequences in-process, with the signals sent at exact moments)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tinymodels import tiny_model

from ggtrain.adapters.gguf_lora import read_gguf_adapter
from ggtrain.train.checkpoint import load_checkpoint

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
TEXT = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model("llama", "Q8_0")


@pytest.fixture()
def three_rows(tmp_path: Path) -> Path:
    """Three short Alpaca records: a couple of rows of -c 64 per epoch."""
    p = tmp_path / "three.json"
    p.write_text(json.dumps([{"instruction": f"Say {w}", "input": "", "output": f"{w} {w} {w}."}
                             for w in ("apple", "pear", "plum")]))
    return p


def finetune(model: Path, data: Path | str, outdir: Path, *extra: str, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    args = [*GGTRAIN, "finetune", "-m", str(model), "--train-data", str(data), "--outdir", str(outdir),
            "-c", "64", "-b", "1", "-t", "2", "--seed", "5", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, check=False, cwd=cwd)


def log_records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "train_log.jsonl").read_text().splitlines()]


def step_records(outdir: Path) -> list[dict]:
    return [r for r in log_records(outdir) if "loss" in r]


def test_adam_iter_alone_runs_that_many_steps_over_several_epochs(model: Path, three_rows: Path,
                                                                 tmp_path: Path) -> None:
    r = finetune(model, three_rows, tmp_path / "o", "--adam-iter", "40", "--save-every", "0")
    assert r.returncode == 0, r.stderr
    steps = step_records(tmp_path / "o")
    assert [s["step"] for s in steps] == list(range(1, 41))
    epochs = [s["epoch"] for s in steps]
    assert epochs[0] == 1 and epochs[-1] > 3  # 1-based, as the bar and the step lines show them
    assert all(b - a in (0, 1) for a, b in itertools.pairwise(epochs))
    assert "training: 40 steps" in r.stderr and "Traceback" not in r.stderr
    # Without a terminal, every step line carries the ETA and labels the smoothed loss.
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("step ")]
    assert len(lines) == 40 and all(" eta " in ln and "(smoothed " in ln for ln in lines)
    assert f"epoch {epochs[-1]} " in lines[-1]
    assert "training loss: last step" in r.stdout and "smoothed" in r.stdout
    # --epochs given as well: the earlier limit wins, and the run says so.
    r = finetune(model, three_rows, tmp_path / "e", "--adam-iter", "40", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    n = len(step_records(tmp_path / "e"))
    assert n < 40 and f"--epochs 1 ends the run after {n} steps, before --adam-iter 40" in r.stderr


def test_first_step_runs_at_the_documented_rate(model: Path, three_rows: Path, tmp_path: Path) -> None:
    r = finetune(model, three_rows, tmp_path / "one", "--adam-iter", "1", "--learning-rate", "3e-4")
    assert r.returncode == 0, r.stderr
    assert step_records(tmp_path / "one")[0]["lr"] == pytest.approx(3e-4)
    r = finetune(model, three_rows, tmp_path / "five", "--adam-iter", "5", "--learning-rate", "3e-4")
    lrs = [s["lr"] for s in step_records(tmp_path / "five")]
    assert lrs[0] == pytest.approx(3e-4) and lrs[-1] == pytest.approx(3e-5)  # --cos-decay-min 0.1
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_default_adapter_name_follows_lora_out_type(model: Path, three_rows: Path, tmp_path: Path) -> None:
    r = finetune(model, three_rows, tmp_path / "h", "--adam-iter", "1", "--lora-out-type", "f16")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "h").glob("ggml-lora-*"))
    assert names == ["ggml-lora-1-f16.gguf", "ggml-lora-LATEST-f16.gguf"], names
    rd = gguf.GGUFReader(tmp_path / "h" / "ggml-lora-LATEST-f16.gguf")
    assert {t.tensor_type for t in rd.tensors} == {gguf.GGMLQuantizationType.F16}


def test_checkpoint_in_resolves_like_checkpoint_out_and_latest_starts_fresh(model: Path, three_rows: Path,
                                                                           tmp_path: Path) -> None:
    """The tutorial's command run twice: the first starts fresh, the second resumes."""
    cmd = ("--checkpoint-in", "checkpoint-LATEST.npz", "--save-every", "0")
    r = finetune(model, three_rows, tmp_path / "t", *cmd, "--adam-iter", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "checkpoint-LATEST.npz: not there yet" in r.stderr and "starting a fresh run" in r.stderr
    r = finetune(model, three_rows, tmp_path / "t", *cmd, "--adam-iter", "6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # Found in --outdir (where --checkpoint-out wrote it), not in the current directory.
    assert f"resuming from {tmp_path / 't' / 'checkpoint-LATEST.npz'} at step 3" in r.stderr
    assert [s["step"] for s in step_records(tmp_path / "t")] == list(range(1, 7))
    # The path the stop message prints (relative to the current directory) works too.
    r = finetune(model, three_rows, tmp_path / "t", "--checkpoint-in", "t/checkpoint-LATEST.npz",
                 "--adam-iter", "7", cwd=tmp_path)
    assert r.returncode == 0 and "at step 6" in r.stderr, r.stderr
    # A missing name without LATEST is a mistake, not a fresh start.
    r = finetune(model, three_rows, tmp_path / "t", "--checkpoint-in", "checkpoint-9.npz", cwd=tmp_path)
    assert r.returncode == 2 and "no such checkpoint" in r.stderr and "Traceback" not in r.stderr
    # Resuming past the end: nothing to train is said, not silently done.
    r = finetune(model, three_rows, tmp_path / "t", *cmd, "--adam-iter", "7", cwd=tmp_path)
    assert r.returncode == 2 and "nothing left to train" in r.stderr, r.stderr


def test_resume_with_other_settings_is_refused_or_named(model: Path, three_rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert finetune(model, three_rows, out, "--adam-iter", "2").returncode == 0
    ck = str(out / "checkpoint-LATEST.npz")
    r = finetune(model, three_rows, out, "--adam-iter", "4", "--checkpoint-in", ck, "-c", "96")
    assert r.returncode == 2 and "-c/--ctx 64" in r.stderr and "96" in r.stderr, r.stderr
    other = tmp_path / "other.json"
    other.write_text(three_rows.read_text().replace("apple", "cherry"))
    r = finetune(model, other, out, "--adam-iter", "4", "--checkpoint-in", ck)
    assert r.returncode == 2 and "--train-data" in r.stderr and "three.json" in r.stderr, r.stderr
    r = finetune(model, three_rows, out, "--adam-iter", "4", "--checkpoint-in", ck, "--lora-r", "4")
    assert r.returncode == 2 and "LoRA layout" in r.stderr
    r = finetune(model, three_rows, out, "--adam-iter", "4", "--checkpoint-in", ck, "--learning-rate", "1e-4")
    assert r.returncode == 0, r.stderr
    assert "note: resuming with --learning-rate 0.0001 (the checkpoint's run had 0.0002)" in r.stderr


def test_rank_above_a_projection_dimension_is_warned(model: Path, three_rows: Path, tmp_path: Path) -> None:
    r = finetune(model, three_rows, tmp_path / "w", "--adam-iter", "1", "--lora-r", "160")
    assert r.returncode == 0, r.stderr
    assert "warning: rank 160 on attn_k is above its smaller dimension" in r.stderr


def test_eval_every_without_validation_data_says_so(model: Path, three_rows: Path, tmp_path: Path) -> None:
    r = finetune(model, three_rows, tmp_path / "v", "--adam-iter", "2", "--eval-every", "1")
    assert r.returncode == 2 and "no validation data" in r.stderr and "--val-split" in r.stderr


def test_divergence_stops_with_the_last_good_adapter(model: Path, three_rows: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    # A LoRA scale of 1e11 (alpha / r) with no clipping: the first step is finite, the second overflows.
    r = finetune(model, three_rows, out, "--adam-iter", "20", "--learning-rate", "0.1", "--lora-alpha", "1e12",
                 "--adam-gclip", "0")
    assert r.returncode == 2, r.stderr
    assert "training diverged at step" in r.stderr and "--learning-rate" in r.stderr
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr
    steps = step_records(out)
    assert steps and all(np.isfinite(s["loss"]) for s in steps)  # the bad step is not logged as done
    adapters = sorted(out.glob("ggml-lora-*.gguf"))
    assert adapters
    for p in adapters:  # every adapter written is finite and loads
        lora, _, _ = read_gguf_adapter(p)
        assert np.isfinite(lora.flat).all()
    ck = load_checkpoint(out / "checkpoint-LATEST.npz")
    assert ck.step == steps[-1]["step"] and np.isfinite(ck.lora.flat).all()

    # An adapter holding NaN (written by something else) is named, not divided by.
    bad = tmp_path / "nan.gguf"
    rd = gguf.GGUFReader(adapters[0])
    w = gguf.GGUFWriter(bad, "llama")
    for f in rd.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in rd.tensors:
        a = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("lora_b"):
            a[0, 0] = np.nan
        w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = subprocess.run([*GGTRAIN, "perplexity", "-m", str(model), "-f", TEXT, "-c", "64", "--chunks", "2",
                        "--lora", str(bad)], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 2 and "NaN" in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr


# -- Ctrl-C, in-process: the presses arrive exactly where the test wants them ----------------------
def _trainer(model: Path, outdir: Path, steps: int, save_every: int = 0):
    from ggtrain.dataset.batches import load_batches
    from ggtrain.dataset.samples import DataOptions
    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.train.trainer import OutputPaths, TrainConfig, Trainer

    mf = ModelFile(model)
    hp = read_hparams(mf)
    lcfg = LoraConfig.make(r=4, alpha=8)
    train, _, _ = load_batches(DataOptions(train_data=Path(TEXT), format="text", ctx=64, seed=1),
                               Tokenizer.from_model_file(mf), 2, mf)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=1)
    cfg = TrainConfig(batch=2, max_steps=steps, save_every=save_every, lora=lcfg.to_dict())
    outdir.mkdir(parents=True, exist_ok=True)
    return Trainer(Model(mf, hp), lora, train, None, cfg, OutputPaths(outdir), echo=lambda m: None)


def _press(n: int = 1) -> None:
    for _ in range(n):
        os.kill(os.getpid(), signal.SIGINT)


def test_one_ctrl_c_finishes_the_step_then_saves(model: Path, tmp_path: Path, capfd) -> None:
    tr = _trainer(model, tmp_path / "c1", steps=6)
    real_step = tr.run_step

    def step_with_press(signals=None):
        if tr.step == 2:
            _press()  # during step 3
        return real_step(signals)

    tr.run_step = step_with_press
    assert tr.fit() == "interrupted"
    err = capfd.readouterr().err
    assert "SIGINT received: finishing step 3, then saving" in err
    assert tr.step == 3 and load_checkpoint(tmp_path / "c1" / "checkpoint-LATEST.npz").step == 3


def test_second_ctrl_c_mid_step_drops_the_step_and_saves_now(model: Path, tmp_path: Path, capfd) -> None:
    tr = _trainer(model, tmp_path / "c2", steps=6)
    real_forward = tr.model.forward
    calls = {"n": 0}

    def forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # inside step 2 (one forward per step here... two presses now)
            _press(2)
        return real_forward(*a, **k)

    tr.model.forward = forward
    position_before = None
    real_step = tr.run_step

    def run_step(signals=None):
        nonlocal position_before
        position_before = tr.train.state()
        return real_step(signals)

    tr.run_step = run_step
    assert tr.fit() == "interrupted"
    err = capfd.readouterr().err
    assert "dropping step" in err
    ck = load_checkpoint(tmp_path / "c2" / "checkpoint-LATEST.npz")
    assert ck.step == tr.step and ck.data_position == position_before  # the dropped step runs again


def test_ctrl_c_during_the_save_does_not_abandon_it_and_a_third_skips_it(model: Path, tmp_path: Path,
                                                                         capfd) -> None:
    # Pressed once during a step, then once more while the checkpoint is written: still saved.
    tr = _trainer(model, tmp_path / "s2", steps=6)
    real_save, real_step = tr.save, tr.run_step

    def step(signals=None):
        if tr.step == 1:
            _press()
        return real_step(signals)

    def save():
        _press()  # the second press, while saving
        return real_save()

    tr.run_step, tr.save = step, save
    assert tr.fit() == "interrupted"
    err = capfd.readouterr().err
    assert "still saving, please wait" in err
    assert load_checkpoint(tmp_path / "s2" / "checkpoint-LATEST.npz").step == 2

    # A third press skips the save and says which checkpoint is left.
    tr = _trainer(model, tmp_path / "s3", steps=8, save_every=2)
    real_save, real_step = tr.save, tr.run_step

    def step3(signals=None):
        if tr.step == 3:
            _press()
        return real_step(signals)

    def save3():
        if tr.step == 4:
            _press(2)  # second and third presses, before anything is written
        return real_save()

    tr.run_step, tr.save = step3, save3
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    err = capfd.readouterr().err
    assert "quitting without saving" in err and "checkpoint-2.npz (step 2)" in err
    assert load_checkpoint(tmp_path / "s3" / "checkpoint-LATEST.npz").step == 2  # intact
    assert not list((tmp_path / "s3").glob("*.tmp*"))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_learning_rate_is_refused_and_writes_nothing(model: Path, three_rows: Path, tmp_path: Path,
                                                                value: str) -> None:
    out = tmp_path / "nan"
    r = finetune(model, three_rows, out, "--adam-iter", "2", "--learning-rate", value)
    assert r.returncode == 2 and "--learning-rate" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # no adapter, no checkpoint, no empty outdir


def test_the_trainer_leaves_the_model_it_is_given_as_it_is(model: Path, tmp_path: Path) -> None:
    tr = _trainer(model, tmp_path / "o", steps=1)
    assert tr.model.trainable is tr.lora
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.transformer import Model
    from ggtrain.train.trainer import Trainer

    given = Model(ModelFile(model))
    tr2 = Trainer(given, tr.lora, tr.train, None, tr.cfg, tr.out, echo=lambda m: None)
    assert given.trainable is None and tr2.model is not given and tr2.model.trainable is tr.lora
    assert tr2.model.layers is given.layers
