"""qmatmul_int8 (Y ≈ X·Wᵀ with X quantized to int8, AVX512-VNNI) against float64 numpy.

Two separate claims, each against an outside reference:
- the int8 form of every quant type is exact: s·q + o per group equals gguf.quants.dequantize bit
  for bit, so the weights lose nothing;
- the product is exactly the documented approximation: X quantized per group of G (scale
  max|x|/127, round half to even, as numpy's rint) times the dequantized W, in float64, to f32
  rounding (rel 1e-5); and it stays within int8's error of the exact f32 product.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from ggtrain.kernels import variants
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from test_qmatmul import make_weight

from ggtrain import kernels
from ggtrain.threads import get_threads, set_threads

pytestmark = pytest.mark.skipif(not kernels.int8_available(),
                                reason="this CPU has no AVX512-VNNI: the int8 path cannot run here")

INT8_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
              Q.IQ4_XS]
GROUP = {Q.Q2_K: 16, Q.Q3_K: 16, Q.Q6_K: 16}  # scale per 16 elements; the others per 32


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def quantized_x(x: np.ndarray, G: int) -> np.ndarray:
    """x (T, n) f32 as the int8 path sees it, back in float64: per group of G, d = max|x|/127,
    q = rint(x · (1/d)) in f32 arithmetic, value q·d."""
    T, n = x.shape
    xg = x.reshape(T, n // G, G)
    d = (np.abs(xg).max(axis=-1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0).astype(np.float32)
    q = np.rint(xg * inv[..., None])
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d[..., None].astype(np.float64)).reshape(T, n)


def reference(x: np.ndarray, w: np.ndarray, qt: Q) -> np.ndarray:
    return quantized_x(x, GROUP.get(qt, 32)) @ quants.dequantize(w, qt).astype(np.float64).T


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda q: q.name)
def test_int8_form_is_exact(qt: Q) -> None:
    from ggtrain.kernels import int8mm_avx512 as m

    w = make_weight(qt, 9, 512, np.random.default_rng(int(qt)))
    block, type_size = GGML_QUANT_SIZES[qt]
    q, s, o, c = m.weight_rows(int(qt), block, type_size, w)
    G = GROUP.get(qt, 32)
    assert m.group_size(int(qt)) == G and m.has_offset(int(qt)) == bool(np.any(o))
    rebuilt = q.reshape(9, -1, G).astype(np.float32) * s[..., None]
    if m.has_offset(int(qt)):  # (+ 0 would turn dequantize's -0.0 into +0.0)
        rebuilt = rebuilt + o[..., None]
    rebuilt = rebuilt.reshape(9, -1)
    ref = quants.dequantize(w, qt).astype(np.float32)
    assert np.array_equal(rebuilt.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(c, 128 * q.reshape(9, -1, G).astype(np.int32).sum(axis=-1))


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda q: q.name)
def test_matches_quantized_reference(qt: Q) -> None:
    rng = np.random.default_rng(100 + int(qt))
    w = make_weight(qt, 70, 512, rng)
    x = rng.standard_normal((37, 512), dtype=np.float32)
    y = kernels.qmatmul_int8(x, w, qt)
    assert y.shape == (37, 70) and y.dtype == np.float32
    assert rel_err(y, reference(x, w, qt)) < 1e-5
    # and int8 activations cost ~1% against the exact product
    exact = x.astype(np.float64) @ quants.dequantize(w, qt).astype(np.float64).T
    assert rel_err(y, exact) < 2e-2


@pytest.mark.parametrize("T, rows", [(1, 1), (15, 5), (16, 64), (17, 67), (33, 130), (48, 4), (300, 129)])
def test_awkward_shapes(T: int, rows: int) -> None:
    # token groups of 16 (pairs of them), micro-tiles of 4 rows and panels of 64: every edge
    rng = np.random.default_rng(T * 1000 + rows)
    for qt in (Q.Q8_0, Q.Q4_K):
        w = make_weight(qt, rows, 256, rng)
        x = rng.standard_normal((T, 256), dtype=np.float32)
        assert rel_err(kernels.qmatmul_int8(x, w, qt), reference(x, w, qt)) < 1e-5


def test_strided_views_and_out() -> None:
    rng = np.random.default_rng(5)
    w = make_weight(Q.Q5_0, 80, 640, rng)
    xs = rng.standard_normal((40, 700), dtype=np.float32)
    x = xs[::2, 30:670]  # row-strided tokens
    wv = w[1::2]  # every other weight row
    out = np.full((20, 60), np.nan, dtype=np.float32)
    y = kernels.qmatmul_int8(x, wv, Q.Q5_0, out=out[:, 10:50])
    assert y.base is out or y is out[:, 10:50] or np.shares_memory(y, out)
    assert rel_err(out[:, 10:50], reference(np.ascontiguousarray(x), wv, Q.Q5_0)) < 1e-5
    assert np.isnan(out[:, :10]).all() and np.isnan(out[:, 50:]).all()


def test_zero_rows_and_tokens() -> None:
    x = np.zeros((3, 64), dtype=np.float32)  # all-zero groups: scale 0, no division by zero
    w = make_weight(Q.Q8_0, 5, 64, np.random.default_rng(0))
    assert np.array_equal(kernels.qmatmul_int8(x, w, Q.Q8_0), np.zeros((3, 5), np.float32))
    assert kernels.qmatmul_int8(np.zeros((0, 64), np.float32), w, Q.Q8_0).shape == (0, 5)


def test_thread_count_does_not_change_the_result() -> None:
    rng = np.random.default_rng(9)
    w = make_weight(Q.Q6_K, 200, 512, rng)
    x = rng.standard_normal((70, 512), dtype=np.float32)
    before = get_threads()
    try:
        set_threads(1)
        one = kernels.qmatmul_int8(x, w, Q.Q6_K)
        set_threads(2)
        two = kernels.qmatmul_int8(x, w, Q.Q6_K)
    finally:
        set_threads(before)
    assert np.array_equal(one, two)  # each output is one thread's fixed-order sum


def test_types_without_int8_form_are_refused() -> None:
    assert not kernels.int8_supported(Q.F16) and not kernels.int8_supported(Q.F32)
    w = np.zeros((4, 64 * 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="F16 has no int8 form"):
        kernels.qmatmul_int8(np.zeros((2, 64), np.float32), w, Q.F16)


def test_avx512_paths_can_be_turned_off() -> None:
    # the C kernels of attention, loss and activation fall back to their AVX2 builds, not to Numba
    # (the attention backward alone to Numba: the AVX2 build of it is slower, see kernels/attention.py)
    code = ("from ggtrain import kernels; from ggtrain.kernels import attention, loss, activation; "
            "print(kernels.int8_available(), *(getattr(m._vec, '__name__', None) for m in (attention, loss, activation)), "
            "attention._vec_backward)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GGTRAIN_AVX512="0"),
                       capture_output=True, text=True, check=True)
    avx2 = variants.runs_on("avx2", variants.cpu_features())
    assert r.stdout.split() == ["False"] + [f"ggtrain.kernels.{op}_avx2" if avx2 else "None"
                                            for op in ("attention", "loss", "activation")] + ["None"]


def test_training_refuses_the_int8_matmul() -> None:
    from tinymodels import tiny_model

    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.transformer import Batch, Model

    model = Model(ModelFile(tiny_model("llama", "Q8_0")), matmul="int8")
    ids = np.arange(10, 26, dtype=np.int32)[None]
    batch = Batch.from_rows(ids, ids, np.ones(ids.shape))
    with pytest.raises(ValueError, match="training needs the f32 or bf16 matmul"):
        model.forward(batch, train=True)
    loss_int8, _ = model.forward(batch, train=False)
    model.set_matmul("f32")
    loss_f32, _ = model.forward(batch, train=False)
    assert loss_int8 == pytest.approx(loss_f32, rel=2e-2) and loss_int8 != loss_f32


def test_perplexity_cli_int8_without_avx512_is_a_clear_error(tmp_path) -> None:
    from tinymodels import tiny_model

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cmd = [sys.executable, "-m", "ggtrain.cli.main", "perplexity", "-m", str(tiny_model("llama", "Q8_0")),
           "-f", str(text), "-c", "64", "--chunks", "2"]
    r = subprocess.run(cmd + ["--matmul", "int8"], env=dict(os.environ, GGTRAIN_AVX512="0"),
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "int8 matmul needs a CPU with AVX512-VNNI" in r.stderr
    auto = subprocess.run(cmd, env=dict(os.environ, GGTRAIN_AVX512="0"), capture_output=True, text=True, check=False)
    assert auto.returncode == 0 and "f32 matmul" in auto.stderr
    fast = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert fast.returncode == 0 and "int8 matmul" in fast.stderr
    ppl = [float(p.stdout.split("Final estimate: PPL = ")[1].split()[0]) for p in (auto, fast)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-2)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_lse_fused_head_matches_written_logits(softcap: float) -> None:
    # the cross-entropy stats folded inside the kernel equal those of qmatmul_int8's logits, chunk
    # by chunk, merged in float64 (targets inside and outside each chunk, ragged last panel)
    rng = np.random.default_rng(11)
    V, n, T = 1000, 256, 37
    w = make_weight(Q.Q8_0, V, n, rng)
    x = rng.standard_normal((T, n), dtype=np.float32)
    targets = rng.integers(0, V, T).astype(np.int64)
    logits = kernels.qmatmul_int8(x, w, Q.Q8_0).astype(np.float64)
    if softcap > 0:
        logits = softcap * np.tanh(logits / softcap)
    m = logits.max(axis=1)
    lse_ref = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    run_max, run_sum, tgt = np.full(T, -np.inf), np.zeros(T), np.zeros(T)
    for r0 in range(0, V, 300):
        kernels.qmatmul_int8_lse(x, w[r0:r0 + 300], Q.Q8_0, r0, targets, softcap, run_max, run_sum, tgt)
    np.testing.assert_allclose(run_max + np.log(run_sum), lse_ref, rtol=1e-6)
    np.testing.assert_allclose(tgt, logits[np.arange(T), targets], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="targets must be a contiguous int64"):
        kernels.qmatmul_int8_lse(x, w, Q.Q8_0, 0, targets.astype(np.int32), softcap, run_max, run_sum, tgt)
