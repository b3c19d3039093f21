"""`ggtrain finetune` as a user runs it (subprocess), on a tiny Q8_0 llama written by the tests:
resume after SIGTERM, the memory limit, outputs, --config, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from loras import peak_rss, refused
from tinymodels import tiny_model

from ggtrain import kernels
from ggtrain.adapters.gguf_lora import read_gguf_adapter
from ggtrain.atomic import OutdirLock
from ggtrain.gguf.arch import read_hparams
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig
from ggtrain.train.checkpoint import load_checkpoint
from ggtrain.train.memory import estimate_step_memory

REPO = Path(__file__).resolve().parent.parent
TEXT = "/usr/share/common-licenses/GPL-3"
GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_model("llama", "Q8_0")


def finetune_args(model: Path, outdir: Path, *extra: str) -> list[str]:
    return [*GGTRAIN, "finetune", "-m", str(model), "--train-data", TEXT, "--format", "text",
            "--outdir", str(outdir), "-c", "128", "-b", "4", "-t", "2", "--seed", "3",
            "--lora-dropout", "0.1", *extra]


def run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def losses(outdir: Path) -> dict[int, float]:
    out = {}
    for line in (outdir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_sigterm_then_resume_matches_an_uninterrupted_run(model: Path, tmp_path: Path) -> None:
    steps = ["--adam-iter", "8", "--save-every", "0"]
    full = run(finetune_args(model, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr
    want = losses(tmp_path / "full")
    assert sorted(want) == list(range(1, 9))

    out = tmp_path / "cut"
    proc = subprocess.Popen(finetune_args(model, out, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "Traceback" not in err
    ck_path = out / "checkpoint-LATEST.npz"
    ck = load_checkpoint(ck_path)
    stopped_at = ck.step
    assert 3 <= stopped_at < 8
    assert (out / "ggml-lora-LATEST-f32.gguf").exists()

    resumed = run(finetune_args(model, out, *steps, "--checkpoint-in", str(ck_path)))
    assert resumed.returncode == 0, resumed.stderr
    got = losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):  # before and after the interruption: the uninterrupted run's losses
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])



# the compute paths this CPU trains on; f32 is exact, bf16 agrees to its rounding noise (2^-9 a rounded value,
# which micro-batches of other sizes meet at other sums)
COMPUTES = {"f32": 1e-5, **({"bf16": 1e-3} if kernels.bf16_available() else {})}


@pytest.mark.parametrize("compute", sorted(COMPUTES))
def test_mem_limit_picks_a_smaller_micro_batch_with_equal_losses(model: Path, tmp_path: Path, compute: str) -> None:
    batch, ctx = 8, 256
    hp = read_hparams(ModelFile(model))
    lcfg = LoraConfig.make(r=8, alpha=16)
    est = {mb: estimate_step_memory(hp, lcfg, ctx, mb, True, model.stat().st_size, compute=compute)
           for mb in (1, 2, 4, 8)}
    limit = (est[2] + est[4]) // 2  # micro-batch 8 and 4 do not fit, 2 does
    common = ["-c", str(ctx), "-b", str(batch), "--adam-iter", "3", "--save-every", "0", "--lora-dropout", "0",
              "--compute", compute]

    free = run(finetune_args(model, tmp_path / "free", *common, "--micro-batch", str(batch)))
    assert free.returncode == 0, free.stderr

    proc = subprocess.Popen(finetune_args(model, tmp_path / "tight", *common, "--mem-limit", str(limit)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_rss(proc, interval=0.02)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    recs = [json.loads(x) for x in (tmp_path / "tight" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["micro_batch"] == 2 for r in recs if "loss" in r)
    assert "micro-batch 2" in err
    assert peak < limit, (peak, limit)
    a, b = losses(tmp_path / "free"), losses(tmp_path / "tight")
    for step in a:
        assert abs(a[step] - b[step]) <= COMPUTES[compute] * abs(a[step]), (step, a[step], b[step])


def _two_steps_near_the_limit(model: Path, outdir: Path, near: bool, decide: bool) -> tuple:
    """In-process: a Trainer (batch 4 in micro-batches of 4, grad-acc 2, LoRA r 4) whose memory monitor
    says once, when `near`, that RSS nears the limit; decide: it chooses the checkpoints' FFN outputs
    first (choose_micro_batch). Two steps: (loss 1, loss 2, LoRA values, micro-batches, keep_ffn before
    and after, what it said)."""
    from ggtrain.dataset.batches import load_batches
    from ggtrain.dataset.samples import DataOptions
    from ggtrain.model.lora import LoraWeights, target_shapes
    from ggtrain.model.transformer import Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.train.trainer import OutputPaths, TrainConfig, Trainer

    mf = ModelFile(model)
    hp = read_hparams(mf)
    lcfg = LoraConfig.make(r=4, alpha=8)
    opts = DataOptions(train_data=Path(TEXT), format="text", ctx=64, seed=2)
    train, _, _ = load_batches(opts, Tokenizer.from_model_file(mf), 4, mf)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=2)
    cfg = TrainConfig(batch=4, grad_acc=2, micro_batch=4, max_steps=2, mem_limit=1 << 40, lora=lcfg.to_dict())
    said: list[str] = []
    tr = Trainer(Model(mf, hp), lora, train, None, cfg, OutputPaths(outdir), echo=said.append)
    if decide:
        tr.choose_micro_batch(hp, lcfg, 64, model.stat().st_size)
    kept_before = tr.keep_ffn
    answers = iter([near])
    tr.monitor.near_limit = lambda fraction=0.9, a=answers: next(a, False)  # type: ignore[method-assign]
    outdir.mkdir()
    r1 = tr.run_step()
    r2 = tr.run_step()
    return r1.loss, r2.loss, lora.flat.copy(), list(tr.micro_log), (kept_before, tr.keep_ffn), said


def test_monitor_near_limit_shrinks_micro_batch_within_the_step(model: Path, tmp_path: Path) -> None:
    """In-process: when RSS nears the limit mid-step, the rest of the step runs with a smaller
    micro-batch and the step's loss and update are those of the unconstrained step."""
    results = [_two_steps_near_the_limit(model, tmp_path / f"s{shrink}", shrink, decide=False)
               for shrink in (False, True)]
    assert results[0][3] == [4, 4] and results[1][3] == [2, 2]
    assert abs(results[0][0] - results[1][0]) <= 1e-6 * results[0][0]
    assert abs(results[0][1] - results[1][1]) <= 1e-5 * results[0][1]
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)


def test_monitor_near_limit_first_drops_the_kept_ffn_outputs(model: Path, tmp_path: Path) -> None:
    """In-process: under --checkpoint-ffn auto, RSS near the limit first drops the FFN outputs the
    checkpoints keep (the micro-batch stays), and the steps are the very steps of the run that kept them."""
    kept, dropped = (_two_steps_near_the_limit(model, tmp_path / f"n{near}", near, decide=True)
                     for near in (False, True))
    assert kept[3] == dropped[3] == [4, 4]
    assert kept[4] == (True, True) and dropped[4] == (True, False)  # auto kept them: a limit all fits in
    assert any("no longer keep the FFN's outputs" in m for m in dropped[5]) and not kept[5]
    assert kept[:2] == dropped[:2]
    np.testing.assert_array_equal(kept[2], dropped[2])


def test_checkpoint_ffn_keeps_the_ffn_outputs_when_they_fit_with_the_same_losses(model: Path,
                                                                                  tmp_path: Path) -> None:
    """--checkpoint-ffn auto keeps the gate/up outputs under a limit they fit in and not under one they
    do not; on, off and auto train to the very same losses; on is refused where it cannot fit."""
    hp = read_hparams(ModelFile(model))
    lcfg = LoraConfig.make(r=8, alpha=16)
    lean, kept = (estimate_step_memory(hp, lcfg, 128, 4, True, model.stat().st_size, compute="f32", keep_ffn=k)
                  for k in (False, True))
    assert kept > lean
    between = str((lean + kept) // 2)
    common = ("--adam-iter", "2", "--save-every", "0", "--compute", "f32", "--micro-batch", "4", "--lora-dropout", "0")
    runs = {"auto": ("auto", "8G", "and ffn_gate/ffn_up outputs (auto: they fit the memory limit)"),
            "auto-tight": ("auto", between, "(auto: the ffn_gate/ffn_up outputs would not fit the memory limit)"),
            "on": ("on", "8G", "attn_output/ffn_down outputs and ffn_gate/ffn_up outputs"),
            "off": ("off", "8G", "attn_output/ffn_down outputs")}
    got = {}
    for name, (mode, limit, said) in runs.items():
        r = run(finetune_args(model, tmp_path / name, *common, "--checkpoint-ffn", mode, "--mem-limit", limit))
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith("checkpointing:"))
        assert line.endswith(said), line
        got[name] = losses(tmp_path / name)
    assert got["auto"] == got["auto-tight"] == got["on"] == got["off"]
    line = refused(run(finetune_args(model, tmp_path / "no", *common, "--checkpoint-ffn", "on", "--mem-limit",
                                     between)))
    assert "is too small" in line


def test_impossible_mem_limit_is_refused_before_training(model: Path, tmp_path: Path) -> None:
    t0 = time.time()
    r = run(finetune_args(model, tmp_path / "o", "--mem-limit", "100M"))
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--mem-limit 100.00 MiB is too small" in lines[0] and "needs about" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "train_log.jsonl").exists()
    assert time.time() - t0 < 120


def test_unwritable_outdir_fails_at_once(model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    t0 = time.time()
    r = run(finetune_args(model, blocker / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(blocker) in r.stderr and "cannot create output directory" in r.stderr
    assert time.time() - t0 < 30


def test_second_run_on_the_same_outdir_is_refused(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with OutdirLock(out):
        r = run(finetune_args(model, out, "--adam-iter", "1"))
    assert r.returncode == 2 and "another ggtrain run" in r.stderr and str(os.getpid()) in r.stderr


def test_config_toml_sets_flags_and_adapter_loads_back(model: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('lora-r = 4\nlora_alpha = 8.0\nadam-iter = 2\nctx = 64\nrank-wo = 0\nlora-out = "mine.gguf"\n'
                   'val-split = 0.2\n')
    out = tmp_path / "cfg"
    r = run([*GGTRAIN, "finetune", "--config", str(cfg), "-m", str(model), "--train-data", TEXT, "--format", "text",
             "--outdir", str(out), "--seed", "1"])
    assert r.returncode == 0, r.stderr
    assert sorted(losses(out)) == [1, 2]
    mf = ModelFile(model)
    lora, alpha, meta = read_gguf_adapter(out / "mine.gguf", base=mf)
    assert alpha == 8.0
    assert {e.rank for e in lora.entries.values()} == {4}
    assert not any("attn_output" in n for n in lora.names)
    assert "blk.0.attn_q.weight" in lora

    # The validation loss logged at the end is reproduced from the written adapter alone.
    logged = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    val_logged = [x["val_loss"] for x in logged if "val_loss" in x][-1]
    from ggtrain.dataset.batches import load_batches
    from ggtrain.dataset.samples import DataOptions
    from ggtrain.model.transformer import Adapter, Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.train.trainer import mean_loss

    m = Model(mf, matmul=meta["training.compute"])  # the run's own path (bf16 where the CPU has it)
    m.adapters.append(Adapter(lora))
    opts = DataOptions(train_data=Path(TEXT), format="text", ctx=64, val_split=0.2, seed=1)
    _, val, _ = load_batches(opts, Tokenizer.from_model_file(mf), 4, mf)
    reloaded = mean_loss(m, val.epoch_batches(0))
    assert abs(reloaded - val_logged) <= 1e-5 * val_logged


def test_bad_config_and_missing_data_give_one_line(model: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("no-such-flag = 3\n")
    r = run([*GGTRAIN, "finetune", "--config", str(cfg), "-m", str(model), "--train-data", TEXT])
    assert r.returncode == 2 and "unknown setting 'no-such-flag'" in r.stderr and "Traceback" not in r.stderr
    r = run([*GGTRAIN, "finetune", "-m", str(model), "--outdir", str(tmp_path / "x")])
    assert r.returncode == 2 and "--train-data" in r.stderr and "Traceback" not in r.stderr
