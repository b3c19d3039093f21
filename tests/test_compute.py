"""--compute: which path the products with the frozen base take, as a user picks it, and what bf16
does to a whole training step against the f32 path (the per-op bounds are tests/test_bf16.py's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ggtrain.kernels import variants
from loras import refused
from tinymodels import tiny_model

from ggtrain import kernels
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import DEFAULT_TARGETS, LoraConfig, LoraWeights, target_shapes
from ggtrain.model.transformer import Batch, Model, resolve_matmul

TEXT = "/usr/share/common-licenses/GPL-3"
GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
needs_bf16 = pytest.mark.skipif(not kernels.bf16_available(),
                                reason="this CPU has no AVX512-BF16: the bf16 path cannot run here")

# Whole-model LoRA gradients, bf16 against f32: every base product's inputs carry a relative rounding
# of 2^-9 (bf16's 8-bit significand), independent across the K terms of each dot product, so a
# product's error is ~2^-9 of its size, and it passes through ~3 products per block and 2 blocks
# (forward, backward). The norm of the difference stays within a few percent of the gradient's
# norm, its direction within a degree or so: measured 1-2.5% on these models, bound 6% / cos 0.998.
GRAD_REL = 0.06
GRAD_COS = 0.998


def finetune(model: Path, outdir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*GGTRAIN, "finetune", "-m", str(model), "--train-data", TEXT, "--format", "text", "--outdir",
           str(outdir), "-c", "64", "-b", "2", "-t", "2", "--adam-iter", "2", "--save-every", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, **(env or {})))


def step_gradients(path: Path, mode: str, seed: int = 0) -> tuple[float, np.ndarray]:
    """(loss, flat LoRA gradient) of one training step under `mode` on a random LoRA (B != 0)."""
    mf = ModelFile(path)
    model = Model(mf, matmul=mode)
    cfg = LoraConfig.make(r=4, alpha=8, dropout=0.0, targets=DEFAULT_TARGETS)
    lora = LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, model.hp.n_layer), seed=1)
    lora.flat[:] = np.random.default_rng(seed).standard_normal(lora.flat.shape).astype(np.float32) * 0.05
    trained = model.with_trainable(lora)
    ids = np.random.default_rng(seed + 1).integers(0, model.hp.n_vocab, (2, 48)).astype(np.int32)
    batch = Batch.from_rows(ids[:, :-1], ids[:, 1:], np.ones((2, 47), np.float32))
    grads = lora.zeros_like()
    loss, state = trained.forward(batch, train=True)
    trained.backward(state, grads)
    return loss, grads.flat.copy()


@needs_bf16
@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_K"), ("gemma3", "Q8_0"), ("qwen3", "Q6_K")])
def test_bf16_step_gradients_stay_near_the_f32_path(arch: str, qtype: str) -> None:
    path = tiny_model(arch, qtype)
    loss32, g32 = step_gradients(path, "f32")
    loss16, g16 = step_gradients(path, "bf16")
    rel = float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32))
    cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
    print(f"{arch} {qtype}: loss f32 {loss32:.6f} bf16 {loss16:.6f}; grad rel diff {rel:.4f}, cos {cos:.6f}")
    assert abs(loss16 - loss32) <= 5e-3 * abs(loss32)
    assert rel <= GRAD_REL and cos >= GRAD_COS
    assert rel > 0  # the bf16 path did round: it is not the f32 path under another name


@needs_bf16
def test_bf16_training_is_deterministic_and_shares_the_qkv_rounding() -> None:
    path = tiny_model("llama", "Q4_K")
    a = step_gradients(path, "bf16")
    b = step_gradients(path, "bf16")
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    # q, k, v read one rounding of their input: the uint16 array is what the base product takes
    w = Model(ModelFile(path), matmul="bf16").layers[0].w["attn_q"]
    x = np.random.default_rng(0).standard_normal((5, w.shape[1])).astype(np.float32)
    xb = w.round_input(x)
    assert xb.dtype == np.uint16 and np.array_equal(w.matmul(xb), w.matmul(x))


def test_bf16_refused_where_it_cannot_run() -> None:
    code = ("import sys\nfrom ggtrain.gguf.modelfile import ModelFile\nfrom ggtrain.model.transformer import Model\n"
            "from ggtrain.errors import GGTrainError\n"
            f"try:\n    Model(ModelFile({str(tiny_model('llama', 'Q8_0'))!r}), matmul='bf16')\n"
            "except GGTrainError as e:\n    print(e); sys.exit(3)\n")
    for env in ({"GGTRAIN_BF16": "0"}, {"GGTRAIN_AVX512": "0"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                           env=dict(os.environ, **env))
        assert r.returncode == 3, r.stderr
        assert "bf16 compute needs a CPU with AVX512-BF16" in r.stdout
    with pytest.raises(ValueError, match="matmul mode"):
        Model(ModelFile(tiny_model("llama", "Q8_0")), matmul="fp8")


def test_auto_keeps_f32_where_the_bf16_kernel_is_slower(monkeypatch) -> None:
    """auto trains in bf16 on AMX tiles and on AMD's vdpbf16ps, and keeps f32 on an Intel CPU whose bf16
    kernel would be vdpbf16ps (no faster than its f32 FMAs); --compute bf16 still forces it there."""
    monkeypatch.setattr(kernels, "amx_missing", lambda: "this CPU has no AMX-BF16")
    for kernel, vendor, want in (("vdpbf16ps", "GenuineIntel", "f32"), ("vdpbf16ps", "AuthenticAMD", "bf16"),
                                 ("amx", "GenuineIntel", "bf16")):
        monkeypatch.setattr(kernels, "bf16_kernel", lambda k=kernel: k)
        monkeypatch.setattr(variants, "cpu_vendor", lambda v=vendor: v)
        mode, why = resolve_matmul("auto", training=True)
        assert mode == want, (kernel, vendor, why)
        if want == "f32":
            assert why == ("auto: vdpbf16ps is no faster than f32 FMAs on Intel CPUs and AMX does not run here "
                           "(this CPU has no AMX-BF16); --compute bf16 forces it")
        else:
            assert why.startswith("auto: this CPU has AVX512-BF16 dot products; kernel: ")
    monkeypatch.setattr(kernels, "bf16_kernel", lambda: "vdpbf16ps")
    monkeypatch.setattr(variants, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_matmul("bf16", training=True)[0] == "bf16"


def test_finetune_says_which_path_runs_and_why(tmp_path: Path) -> None:
    model = tiny_model("llama", "Q8_0")
    auto = finetune(model, tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr
    line = next(ln for ln in auto.stderr.splitlines() if ln.startswith("compute:"))
    if kernels.bf16_available() and kernels.bf16_slower() is None:
        assert line.startswith("compute: bf16") and "AVX512-BF16" in line
    elif kernels.bf16_available():  # an Intel CPU without AMX: its vdpbf16ps is slower than f32
        assert line == f"compute: f32 products with the base weights (auto: {kernels.bf16_slower()})"
    else:
        assert line.startswith("compute: f32") and "auto:" in line
    off = finetune(model, tmp_path / "off", env={"GGTRAIN_BF16": "0"})
    assert off.returncode == 0, off.stderr
    assert "compute: f32 products with the base weights (auto: GGTRAIN_BF16=0" in off.stderr or \
        not kernels.bf16_available()
    forced = finetune(model, tmp_path / "f32", "--compute", "f32")
    assert forced.returncode == 0 and "compute: f32 products with the base weights (--compute f32)" in forced.stderr
    line = refused(finetune(model, tmp_path / "no", "--compute", "bf16", env={"GGTRAIN_AVX512": "0"}))
    assert "bf16 compute needs a CPU with AVX512-BF16" in line
    assert not (tmp_path / "no").exists()  # refused before anything was written
