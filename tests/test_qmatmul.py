"""qmatmul (Y = X·Wᵀ) and qmatmul_backward_input (dX = dY·W) against float64 numpy on the
dequantized weight, for every supported type and for awkward shapes.

Error measure: max|ours - ref| / max|ref| (ref in float64) must stay below 1e-5; an f32 GEMM with
k ≤ 4096 lands around 1e-7..1e-6.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggtrain import kernels
from ggtrain.gguf.modelfile import SUPPORTED_TYPES
from ggtrain.threads import default_threads, get_threads, set_threads

ALL_TYPES = sorted(SUPPORTED_TYPES, key=int)
RTOL = 1e-5
# f16 scale fields inside a block of the types gguf-py cannot quantize
F16_SCALES = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
              Q.IQ4_NL: [0], Q.IQ4_XS: [0]}


def make_weight(qt: Q, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes): quantized by gguf-py where it can, else random bytes with sane scales."""
    if qt not in F16_SCALES:
        x = rng.standard_normal((rows, n), dtype=np.float32)
        return np.ascontiguousarray(quants.quantize(x, qt)).view(np.uint8).reshape(rows, -1)
    block, type_size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows * n // block, type_size), dtype=np.uint8)
    for off in F16_SCALES[qt]:
        raw[:, off:off + 2] = (rng.random(raw.shape[0]) * 0.1 + 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check_both(w: np.ndarray, qt: Q, T: int, rng: np.random.Generator) -> None:
    wf = quants.dequantize(w, qt).astype(np.float64)  # (rows, n)
    x = rng.standard_normal((T, wf.shape[1]), dtype=np.float32)
    dy = rng.standard_normal((T, wf.shape[0]), dtype=np.float32)
    y = kernels.qmatmul(x, w, qt)
    assert y.shape == (T, wf.shape[0]) and y.dtype == np.float32
    assert rel_err(y, x.astype(np.float64) @ wf.T) < RTOL
    dx = kernels.qmatmul_backward_input(dy, w, qt)
    assert dx.shape == (T, wf.shape[1]) and dx.dtype == np.float32
    assert rel_err(dx, dy.astype(np.float64) @ wf) < RTOL


@pytest.fixture(params=["base", "avx2"])
def impl(request, monkeypatch):
    """Runs the test with the kernels' compiled module swapped for one SIMD variant."""
    if request.param == "avx2" and kernels._cpu_simd_level() != "avx2":
        pytest.skip("this CPU lacks AVX2/FMA/F16C: quant_avx2 cannot run here")
    from ggtrain.kernels import quant_avx2, quant_base
    monkeypatch.setattr(kernels, "_impl", quant_avx2 if request.param == "avx2" else quant_base)


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_every_type_against_float64(qt: Q, impl) -> None:
    rng = np.random.default_rng(int(qt))
    n = 512 if GGML_QUANT_SIZES[qt][0] > 32 else 320
    check_both(make_weight(qt, 203, n, rng), qt, 37, rng)


@pytest.mark.parametrize("T", [1, 2, 4, 5, 31, 33, 129])
def test_token_counts(T: int) -> None:
    """A single token and up to 4 (sgemv per token), 5 (sgemm), odd counts, enough to split."""
    rng = np.random.default_rng(T)
    check_both(make_weight(Q.Q4_K, 77, 768, rng), Q.Q4_K, T, rng)


def test_rows_not_a_multiple_of_the_tile(monkeypatch) -> None:
    """Tiny tile budget: many tiles in both directions, the last ones partial in rows and columns."""
    monkeypatch.setattr(kernels, "TILE_BUDGET", 3000)
    monkeypatch.setattr(kernels, "MIN_TILE_ROWS", 4)
    rng = np.random.default_rng(5)
    for qt, rows, n, fwd_cols in ((Q.Q8_0, 101, 352, 96), (Q.Q6_K, 47, 1280, 600)):
        monkeypatch.setattr(kernels, "FORWARD_TILE_COLS", fwd_cols)
        tr, tc, _ = kernels.plan(False, rows, n, 67, qt)
        assert rows % tr and n % tc, (tr, tc)  # really partial tiles
        tr, tc, _ = kernels.plan(True, rows, n, 67, qt)
        assert rows % tr and tr * tc <= 3000, (tr, tc)
        check_both(make_weight(qt, rows, n, rng), qt, 67, rng)


@pytest.mark.parametrize("qt, n", [(Q.Q4_K, 768), (Q.Q8_0, 640), (Q.Q6_K, 2048)], ids=["3blocks", "20blocks", "8blocks"])
def test_backward_plans_split_evenly(qt: Q, n: int) -> None:
    """Backward work items (column range x token range) share out evenly between 2 threads, and
    each thread's tile stays within the budget."""
    rng = np.random.default_rng(6)
    tr, tc, tp = kernels.plan(True, 300, n, 512, qt, threads=2)
    assert (-(-n // tc) * tp) % 2 == 0 and tr * tc <= kernels.TILE_BUDGET
    try:
        set_threads(2)
        check_both(make_weight(qt, 300, n, rng), qt, 512, rng)
    finally:
        set_threads(default_threads())


def test_out_accumulate_and_views() -> None:
    rng = np.random.default_rng(11)
    qt = Q.Q5_0
    w = make_weight(qt, 300, 640, rng)
    wf = quants.dequantize(w, qt).astype(np.float64)
    x = rng.standard_normal((20, 640), dtype=np.float32)
    dy = rng.standard_normal((20, 300), dtype=np.float32)
    # out= is filled and returned; its previous contents do not leak in
    out = np.full((20, 300), np.nan, dtype=np.float32)
    assert kernels.qmatmul(x, w, qt, out=out) is out
    assert rel_err(out, x.astype(np.float64) @ wf.T) < RTOL
    # accumulate=True adds into out
    acc = rng.standard_normal((20, 640), dtype=np.float32)
    ref = acc.astype(np.float64) + dy.astype(np.float64) @ wf
    assert kernels.qmatmul_backward_input(dy, w, qt, out=acc, accumulate=True) is acc
    assert rel_err(acc, ref) < RTOL
    # accumulate=False overwrites
    junk = np.full((20, 640), 1e30, dtype=np.float32)
    kernels.qmatmul_backward_input(dy, w, qt, out=junk)
    assert rel_err(junk, dy.astype(np.float64) @ wf) < RTOL
    # a row slice of w (as tensor.data[r0:r1]), a block-aligned column slice, strided x / dy / out
    ws = w[100:250]
    assert rel_err(kernels.qmatmul(x, ws, qt), x.astype(np.float64) @ wf[100:250].T) < RTOL
    wc = w[:, 22 * 5:22 * 12]  # Q5_0 blocks 5..11: columns 160..384
    assert rel_err(kernels.qmatmul(x[:, 160:384], wc, qt), x[:, 160:384].astype(np.float64) @ wf[:, 160:384].T) < RTOL
    big = np.zeros((20, 1000), dtype=np.float32)
    kernels.qmatmul(x, w, qt, out=big[:, 500:800])
    assert rel_err(big[:, 500:800], x.astype(np.float64) @ wf.T) < RTOL and not big[:, :500].any()
    kernels.qmatmul_backward_input(np.ascontiguousarray(big[:, 500:800]) * 0 + dy, w, qt, out=big[:, 100:740])
    assert rel_err(big[:, 100:740], dy.astype(np.float64) @ wf) < RTOL
    xt = np.asfortranarray(x)  # column-major input is copied to contiguous rows
    assert rel_err(kernels.qmatmul(xt, w, qt), x.astype(np.float64) @ wf.T) < RTOL
    # broadcast (row stride 0), reversed rows, one token from a 1-D vector, a one-row out view
    xb = np.broadcast_to(x[3], (5, 640))
    assert rel_err(kernels.qmatmul(xb, w, qt), xb.astype(np.float64) @ wf.T) < RTOL
    assert rel_err(kernels.qmatmul(x[::-1], w, qt), x[::-1].astype(np.float64) @ wf.T) < RTOL
    one = np.zeros((3, 300), np.float32)[1:2, ::1]
    kernels.qmatmul(x[7][None], w, qt, out=one)
    assert rel_err(one, x[7:8].astype(np.float64) @ wf.T) < RTOL
    wb = np.broadcast_to(w[5], (4, w.shape[1]))  # every row the same: stride 0 is fine for W
    assert rel_err(kernels.qmatmul_backward_input(dy[:, :4].copy(), wb, qt), dy[:, :4].astype(np.float64) @ wf[[5] * 4]) < RTOL


def test_threads_give_the_same_result() -> None:
    rng = np.random.default_rng(2)
    w = make_weight(Q.Q4_0, 500, 1024, rng)
    x = rng.standard_normal((100, 1024), dtype=np.float32)
    try:
        set_threads(1)
        y1 = kernels.qmatmul(x, w, Q.Q4_0)
        assert kernels.get_num_threads() == 1 and get_threads() == 1
        set_threads(3)  # more threads than cores must still be right
        y3 = kernels.qmatmul(x, w, Q.Q4_0)
    finally:
        set_threads(default_threads())
    wf = quants.dequantize(w, Q.Q4_0).astype(np.float64)
    assert rel_err(y1, x @ wf.T) < RTOL and rel_err(y3, x @ wf.T) < RTOL


def test_get_rows_matches_dequantize() -> None:
    rng = np.random.default_rng(4)
    w = make_weight(Q.Q8_0, 1000, 640, rng)
    ids = rng.integers(0, 1000, 300)
    assert np.array_equal(kernels.get_rows(w, Q.Q8_0, ids), kernels.dequantize(w, Q.Q8_0)[ids])


def test_extra_memory_is_bounded() -> None:
    """A weight of 256 MiB when dequantized: the peak RSS of the first forward + backward, and of
    further calls, grows by about the tiles (2 MiB per thread), nowhere near the f32 weight. A fresh
    process gives a clean peak."""
    code = textwrap.dedent("""
        import resource, numpy as np
        from ggtrain import kernels
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows, n = 16384, 4096                      # 64 Mi elements: 256 MiB as f32, 36 MiB as Q4_0
        w = np.ones((rows, n // 32 * 18), np.uint8)
        w[:, 0::18] = 0; w[:, 1::18] = 0x20        # d = f16 0x2000 (small, finite)
        x = np.ones((2, n), np.float32); dy = np.ones((2, rows), np.float32)
        y = np.zeros((2, rows), np.float32); dx = np.zeros((2, n), np.float32)
        base = peak()
        kernels.qmatmul(x, w, 2, out=y); kernels.qmatmul_backward_input(dy, w, 2, out=dx)
        first = peak() - base
        for _ in range(3):
            kernels.qmatmul(x, w, 2, out=y); kernels.qmatmul_backward_input(dy, w, 2, out=dx)
        again = peak() - base - first
        tile = max(kernels.tile_bytes(bw, rows, n, 2, 2) for bw in (False, True))
        print(first, again, tile, bool(np.isfinite(y).all() and np.isfinite(dx).all() and y.any()))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, again, tile, finite = res.stdout.split()
    assert finite == "True"
    assert int(tile) <= kernels.TILE_BUDGET * 4 * kernels.get_num_threads()
    assert int(first) < 16 * 2**20, f"first calls grew the peak RSS by {int(first) / 2**20:.1f} MiB"
    assert int(again) < 2 * 2**20, f"repeated calls grew the peak RSS by {int(again) / 2**20:.1f} MiB"


def test_bad_input_raises_clear_errors() -> None:
    # programming errors inside the kernels: TypeError (dtype) / ValueError (shape, strides, type)
    rng = np.random.default_rng(0)
    w = make_weight(Q.Q8_0, 8, 64, rng)
    x = np.zeros((3, 64), np.float32)
    with pytest.raises(TypeError, match="x must be a float32 array"):
        kernels.qmatmul(x.astype(np.float64), w, Q.Q8_0)
    with pytest.raises(ValueError, match="x has 32 columns, the weight needs 64"):
        kernels.qmatmul(x[:, :32].copy(), w, Q.Q8_0)
    with pytest.raises(TypeError, match="weight must be a uint8 array"):
        kernels.qmatmul(x, w.view(np.int8), Q.Q8_0)
    with pytest.raises(ValueError, match="weight must be a uint8 array"):
        kernels.qmatmul(x, w.reshape(-1), Q.Q8_0)
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        kernels.qmatmul(x, w[:, :40], Q.Q8_0)
    with pytest.raises(ValueError, match="Q4_K"):
        kernels.qmatmul(x, w, Q.Q4_K)  # 68-byte rows are not whole Q4_K blocks
    with pytest.raises(ValueError, match="TQ1_0 is not supported"):
        kernels.qmatmul(x, w, Q.TQ1_0)
    with pytest.raises(ValueError, match="out must be a float32 array of shape"):
        kernels.qmatmul(x, w, Q.Q8_0, out=np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError, match="dy has 7 columns, the weight needs 8"):
        kernels.qmatmul_backward_input(np.zeros((3, 7), np.float32), w, Q.Q8_0)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        kernels.qmatmul_backward_input(np.zeros((3, 8), np.float32), w, Q.Q8_0, accumulate=True)
    ro = np.zeros((3, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.qmatmul(x, w, Q.Q8_0, out=ro)
    with pytest.raises(ValueError, match="contiguous, non-overlapping rows"):
        kernels.qmatmul(x, w, Q.Q8_0, out=np.zeros((8, 3), np.float32).T)


def test_empty_shapes() -> None:
    w = make_weight(Q.Q8_0, 8, 64, np.random.default_rng(0))
    assert kernels.qmatmul(np.zeros((0, 64), np.float32), w, Q.Q8_0).shape == (0, 8)
    assert kernels.qmatmul(np.ones((2, 64), np.float32), w[:0], Q.Q8_0).shape == (2, 0)
    dx = kernels.qmatmul_backward_input(np.ones((2, 0), np.float32), w[:0], Q.Q8_0)
    assert dx.shape == (2, 64) and not dx.any()
