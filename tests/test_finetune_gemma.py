"""The main job on the real model: `ggtrain finetune` on Gemma 3 270M Q4_K_M learns, and llama.cpp
loads the adapter it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import llamacpp
import pytest

from ggtrain.adapters.gguf_lora import read_gguf_adapter
from ggtrain.dataset.batches import load_batches
from ggtrain.dataset.samples import DataOptions
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.transformer import Adapter, Model
from ggtrain.text.tokenizer import Tokenizer
from ggtrain.train.trainer import mean_loss

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "instructions.txt"
CTX, SEED = 128, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma-run")
    r = subprocess.run([sys.executable, "-m", "ggtrain.cli.main", "finetune", "--train-data", str(DATA),
                        "--format", "text", "-c", str(CTX), "-b", "2", "--epochs", "10", "--adam-iter", "30",
                        "--val-split", "0.2", "--seed", str(SEED), "--learning-rate", "2e-4",
                        "--outdir", str(out), "-t", "2"],
                       capture_output=True, text=True, timeout=3600, check=False)
    assert r.returncode == 0, r.stderr
    assert "adapter:" in r.stdout and "llama-cli" in r.stdout and "ADAPTER" in r.stdout
    return out


def held_out_loss(model: Model, mf: ModelFile) -> float:
    opts = DataOptions(train_data=DATA, format="text", ctx=CTX, val_split=0.2, seed=SEED)
    _, val, _ = load_batches(opts, Tokenizer.from_model_file(mf), 2, mf)
    return mean_loss(model, val.epoch_batches(0))


def test_thirty_steps_lower_training_and_held_out_loss(run: Path) -> None:
    recs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    print(f"training loss: first 3 steps {first:.4f}, last 3 steps {last:.4f}")
    assert last < 0.8 * first

    mf = ModelFile(default_model_path())
    base_val = held_out_loss(Model(mf), mf)
    val_logged = [r["val_loss"] for r in recs if "val_loss" in r][-1]
    print(f"held-out loss: base {base_val:.4f}, after 30 steps {val_logged:.4f}")
    assert val_logged < base_val - 0.2

    # The saved adapter, loaded back, gives the same held-out loss.
    lora, _, meta = read_gguf_adapter(run / "ggml-lora-LATEST-f32.gguf", base=mf)
    m = Model(mf, matmul=meta["training.compute"])  # the run's own path (bf16 where the CPU has it)
    m.adapters.append(Adapter(lora))
    reloaded = held_out_loss(m, mf)
    # f32: the same sums up to the order BLAS takes for another batch shape. bf16: a last-bit difference
    # of that kind in an activation can move its bf16 rounding by 2^-9, and 18 layers carry such flips
    # on, so the bound is bf16's noise on this mean: measured up to 5.9e-4 (the adapter applied after
    # the base product against the trained LoRA fused into it; either within 6e-4 of the f32 path's).
    rel = 1e-5 if meta["training.compute"] == "f32" else 1e-3
    assert abs(reloaded - val_logged) <= rel * val_logged
    if meta["training.compute"] != "f32":  # and on the f32 path, which rounds nothing, the same loss
        m32 = Model(mf, matmul="f32")
        m32.adapters.append(Adapter(lora))
        assert abs(held_out_loss(m32, mf) - val_logged) <= 1e-3 * val_logged


def test_llamacpp_loads_the_adapter_and_it_lowers_perplexity(run: Path) -> None:
    model = default_model_path()
    adapter = run / "ggml-lora-LATEST-f32.gguf"
    base, _ = llamacpp.perplexity(model, DATA, ctx=CTX)
    tuned, _ = llamacpp.perplexity(model, DATA, ctx=CTX, lora=[adapter])
    print(f"llama-perplexity on the training file: base {base:.4f}, with the adapter {tuned:.4f}")
    assert tuned < 0.8 * base

    # ggtrain's own perplexity with the adapter agrees with llama.cpp's.
    r = subprocess.run([sys.executable, "-m", "ggtrain.cli.main", "perplexity", "-f", str(DATA), "-c", str(CTX),
                        "--lora", str(adapter), "-t", "2"], capture_output=True, text=True, timeout=1800,
                       check=False)
    assert r.returncode == 0, r.stderr
    ours = float(r.stdout.split("Final estimate: PPL = ")[1].split()[0])
    print(f"ggtrain perplexity with the adapter: {ours:.4f}")
    assert abs(ours - tuned) / tuned < 0.01
