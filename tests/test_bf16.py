"""The bf16 compute path (compute="bf16": AVX512-BF16, kernels/bf16mm_avx512bf16.pyx) and to_bf16.

What is proven, for every supported type, forward (Y = X·Wᵀ) and backward (dX = dY·W, also += ):
- the rounding, bit-exactly: with X = I the forward returns the dequantized W rounded to bf16 (the
  weight side), with an F32 identity weight it returns X rounded (the activation side); the
  rounding is this file's own round-to-nearest-even in numpy, the dequantization gguf-py's;
- (a) against float64 on the bf16-rounded inputs: only f32 accumulation error is left. The kernel
  sums a tile of k (at most 2048 values) in order (vdpbf16ps rounds twice per pair of k), then
  the tiles (at most K/256) in order, so |error| ≤ (min(K, 2048) + K/256 + 2)·u·Σ|a||b| with
  u = 2⁻²⁴ (the classic bound for recursive summation, per output element);
- (b) against the float64 product of the unrounded inputs: each rounded input is off by at most
  2⁻⁸ of itself, independently, so the sum's error has a standard deviation of about
  0.82·2⁻⁸·sqrt(Σ a²b²), which is the sqrt(K)·|x|·|w| scale of a dot product of random-signed
  terms (not the K·|x|·|w| of a worst case: the errors do not line up). The bound is
  6·2⁻⁸·sqrt(Σ a²b²) per element (7 standard deviations) plus the f32 part.
Odd shapes (tokens not a multiple of the 6-row micro-tile, rows not a multiple of the 64-wide
tile, odd K, one block wide), row-strided views, uint16 input equal to f32 input, 1 and 2 threads
bit-identical, the head's 16384-row chunk, the off switches and the refusals.
On a CPU without AVX512-BF16 each test checks the refusal instead (compute="bf16" -> ValueError).
Every test runs on each bf16 kernel this CPU has (BF16_KERNELS: vdpbf16ps, and the AMX tiles where
they run); tests/test_amx.py runs the AMX kernel's logic on emulated tiles where the CPU has none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ggtrain.kernels import variants
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from test_qmatmul import make_weight

from ggtrain import kernels
from ggtrain.threads import default_threads, set_threads

ALL_TYPES = sorted(kernels.SUPPORTED_TYPES, key=int)
U32 = 2.0 ** -24  # f32 unit roundoff
U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)
HERE = kernels.bf16_available()
# The bf16 kernels this CPU runs, each forced in turn (GGTRAIN_AMX=0: vdpbf16ps, =1: AMX tiles)
BF16_KERNELS = ["vdpbf16ps"] + (["amx"] if kernels.amx_available() else [])


@pytest.fixture(autouse=True, params=BF16_KERNELS)
def bf16_kernel(request, monkeypatch) -> str:
    monkeypatch.setenv("GGTRAIN_AMX", "1" if request.param == "amx" else "0")
    return request.param


def rne(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits, round to nearest even, NaN kept NaN (quiet): the test's own reference."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def widen(b: np.ndarray) -> np.ndarray:
    """bf16 bits -> float64."""
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def dequant(w: np.ndarray, qt: Q) -> np.ndarray:
    return quants.dequantize(w, qt).astype(np.float32).reshape(w.shape[0], -1)


def refused() -> None:
    """Without the bf16 path: compute="bf16" is refused by name, and to_bf16 too."""
    w = make_weight(Q.Q8_0, 4, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="compute='bf16' is not available"):
        kernels.qmatmul(np.zeros((1, 32), np.float32), w, Q.Q8_0, compute="bf16")
    with pytest.raises(ValueError, match="compute='bf16' is not available"):
        kernels.qmatmul_backward_input(np.zeros((1, 4), np.float32), w, Q.Q8_0, compute="bf16")
    with pytest.raises(ValueError, match="compute='bf16' is not available"):
        kernels.to_bf16(np.zeros((1, 32), np.float32))


def check_product(got: np.ndarray, a: np.ndarray, b: np.ndarray, what: str, acc: np.ndarray | None = None) -> None:
    """got ≈ acc + a·b for f32 a (M, K), b (K, N): (a) exact on the rounded inputs up to f32
    summation, (b) within the bf16 tolerance of the unrounded product (the module docstring says
    why). With acc (accumulate=True), each tile's sum is added to it: one more rounding a tile."""
    K = a.shape[1]
    tiles = -(-K // kernels.BF16_K)  # at most
    acc64 = np.zeros(got.shape) if acc is None else acc.astype(np.float64)
    ar, br = widen(rne(a)), widen(rne(b))
    abs_sum = np.abs(ar) @ np.abs(br)
    run = min(K, max(kernels.BF16_MAX_TILE_K))  # the longest run summed in order
    f32_bound = (run + tiles + 2) * U32 * (abs_sum + np.abs(acc64))
    err = np.abs(got.astype(np.float64) - acc64 - ar @ br)
    assert (err <= f32_bound).all(), \
        f"{what}: off the rounded product by {np.max(err / np.maximum(abs_sum, 1e-300)):.2e}·Σ|ab|"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = np.sqrt((a64 * a64) @ (b64 * b64))
    err = np.abs(got.astype(np.float64) - acc64 - a64 @ b64)
    assert (err <= 6 * U_BF16 * scale + f32_bound).all(), \
        f"{what}: off the f32 product by {np.max(err / np.maximum(scale, 1e-300)):.2f}·sqrt(Σa²b²)"


def check_both(w: np.ndarray, qt: Q, T: int, rng: np.random.Generator, x_stride: int = 0) -> None:
    """Forward and backward (overwrite and accumulate) of w with T tokens; x_stride > 0 makes the
    activations row-strided views."""
    wf = dequant(w, qt)
    rows, n = wf.shape

    def acts(cols: int) -> np.ndarray:
        a = rng.standard_normal((T, cols + x_stride), dtype=np.float32)
        return a[:, x_stride // 2: x_stride // 2 + cols] if x_stride else a

    x, dy = acts(n), acts(rows)
    check_product(kernels.qmatmul(x, w, qt, compute="bf16"), x, wf.T, f"{qt.name} forward T={T}")
    check_product(kernels.qmatmul_backward_input(dy, w, qt, compute="bf16"), dy, wf, f"{qt.name} backward T={T}")
    acc = rng.standard_normal((T, n), dtype=np.float32)
    out = acc.copy()
    assert kernels.qmatmul_backward_input(dy, w, qt, out=out, accumulate=True, compute="bf16") is out
    check_product(out, dy, wf, f"{qt.name} backward += T={T}", acc=acc)


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_every_type_against_float64(qt: Q, threads: int) -> None:
    """Rows not a multiple of the 64-wide tile, 13 tokens (two 6-row micro-tiles and one row),
    K over a tile boundary, and a weight one block wide."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(int(qt) + 100 * threads)
    block = GGML_QUANT_SIZES[qt][0]
    n = 512 if block == 256 else 320 if block == 32 else 301
    try:
        set_threads(threads)
        check_both(make_weight(qt, 70, n, rng), qt, 13, rng)
        check_both(make_weight(qt, 3, max(block, 1), rng), qt, 7, rng)  # one block wide, 3 rows
    finally:
        set_threads(default_threads())


@pytest.mark.parametrize("qt, n, rows", [(Q.Q4_K, 2560, 1101), (Q.Q8_0, 2080, 1100), (Q.F32, 2051, 1025)],
                         ids=["Q4_K", "Q8_0", "F32-odd"])
def test_k_in_several_tiles(qt: Q, n: int, rows: int) -> None:
    """K above BF16_MAX_TILE_K, forward and backward: several tiles of k, the last one short (and
    odd: 2051 columns, 1101 rows); the activations as f32 or as to_bf16's uint16 (read in place,
    row-strided too, with an even K; copied into the tiled layout with an odd one) give the same
    floats. 2 threads."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(n)
    w = make_weight(qt, rows, n, rng)
    assert kernels.plan(False, rows, n, 50, qt, compute="bf16")[1] < n
    assert kernels.plan(True, rows, n, 50, qt, compute="bf16")[0] < rows
    try:
        set_threads(2)
        check_both(w, qt, 50, rng)
        x = rng.standard_normal((50, n), dtype=np.float32)
        dy = rng.standard_normal((50, rows), dtype=np.float32)
        assert np.array_equal(kernels.qmatmul(kernels.to_bf16(x), w, qt, compute="bf16"),
                              kernels.qmatmul(x, w, qt, compute="bf16"))
        assert np.array_equal(kernels.qmatmul_backward_input(kernels.to_bf16(dy), w, qt, compute="bf16"),
                              kernels.qmatmul_backward_input(dy, w, qt, compute="bf16"))
        xs = np.zeros((50, n + 40), np.uint16)[:, 18:18 + n]  # rows 2n + 80 bytes apart
        kernels.to_bf16(x, out=xs)
        assert np.array_equal(kernels.qmatmul(xs, w, qt, compute="bf16"), kernels.qmatmul(x, w, qt, compute="bf16"))
    finally:
        set_threads(default_threads())


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_weights_are_rounded_to_nearest_even_bit_exactly(qt: Q) -> None:
    """X = I: Y = bf16(W)ᵀ exactly (one non-zero term per output); dY = I: dX = bf16(W) exactly."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(7 + int(qt))
    block = GGML_QUANT_SIZES[qt][0]
    n = 512 if block == 256 else 96 if block == 32 else 67
    w = make_weight(qt, 67, n, rng)
    want = widen(rne(dequant(w, qt))).astype(np.float32)
    y = kernels.qmatmul(np.eye(n, dtype=np.float32), w, qt, compute="bf16")
    assert np.array_equal(y, want.T)
    dx = kernels.qmatmul_backward_input(np.eye(67, dtype=np.float32), w, qt, compute="bf16")
    assert np.array_equal(dx, want)


def test_denormal_f32_weights_round_up_to_normal() -> None:
    """An f32 denormal just under the smallest normal rounds (to nearest even) up to the smallest normal
    bf16, which the dot products do not flush; vcvtneps2bf16 (the quantized types' packer, whose values
    are never denormal) would flush it to zero, so F32 weights take the integer rounding and keep it."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(11)
    n = 64
    bits = rng.integers(0x007F8000, 0x00800000, size=(40, n), dtype=np.uint32)  # round up to 0x0080
    bits[:, ::3] |= 0x80000000
    w = bits.view(np.float32)
    want = widen(rne(w)).astype(np.float32)
    assert np.all(np.abs(want) == np.float32(2.0 ** -126))
    y = kernels.qmatmul(np.eye(n, dtype=np.float32), w.view(np.uint8), Q.F32, compute="bf16")
    assert np.array_equal(y.view(np.uint32), want.T.view(np.uint32))
    dx = kernels.qmatmul_backward_input(np.eye(40, dtype=np.float32), w.view(np.uint8), Q.F32, compute="bf16")
    assert np.array_equal(dx.view(np.uint32), want.view(np.uint32))


def test_activations_are_rounded_to_nearest_even_bit_exactly() -> None:
    """An F32 identity weight: Y = bf16(X) exactly, for values at, beside and away from ties."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(3)
    n = 130
    bits = rng.integers(0, 1 << 32, size=(9, n), dtype=np.uint64).astype(np.uint32)
    # ±[1, 2): every rounding case of the low half, no overflow, and no denormal (which vdpbf16ps
    # reads as zero; to_bf16 rounds them, tested below)
    bits = (bits & np.uint32(0x807FFFFF)) | np.uint32(0x3F800000)
    bits[:, ::3] = (bits[:, ::3] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact ties
    x = bits.view(np.float32)
    eye = np.eye(n, dtype=np.float32).view(np.uint8)  # F32 rows: 4 bytes per element
    y = kernels.qmatmul(x, eye, Q.F32, compute="bf16")
    assert np.array_equal(y, widen(rne(x)).astype(np.float32))
    assert np.array_equal(kernels.qmatmul_backward_input(x, eye, Q.F32, compute="bf16"), y)


def test_to_bf16_special_values() -> None:
    """Ties to even, NaN kept NaN (also a NaN whose payload is only in the dropped half), ±inf,
    ±0, denormals rounded like any value, overflow past the largest bf16 to inf; then 2^20
    random bit patterns against the numpy reference."""
    if not HERE:
        return refused()
    cases = {
        0x3F808000: 0x3F80,  # tie, even below: stays
        0x3F818000: 0x3F82,  # tie, odd below: up to even
        0x3F807FFF: 0x3F80, 0x3F808001: 0x3F81,  # beside a tie
        0xBF818000: 0xBF82,  # negative tie
        0x7F800000: 0x7F80, 0xFF800000: 0xFF80,  # ±inf
        0x00000000: 0x0000, 0x80000000: 0x8000,  # ±0
        0x00000001: 0x0000, 0x00008000: 0x0000, 0x00018000: 0x0002,  # denormals, ties to even
        0x007FFFFF: 0x0080,  # the largest denormal rounds up to the smallest normal
        0x80400000: 0x8040,  # a negative denormal that is already bf16
        0x7F7FFFFF: 0x7F80, 0x7F7F8000: 0x7F80, 0xFF7FFFFF: 0xFF80,  # overflow to ±inf
        0x7F7F7FFF: 0x7F7F,  # the largest f32 that stays finite
    }
    src = np.array([list(cases)], dtype=np.uint32).view(np.float32)
    assert kernels.to_bf16(src)[0].tolist() == list(cases.values())
    nans = np.array([[0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F80FFFF, 0xFFC12345]], np.uint32).view(np.float32)
    got = kernels.to_bf16(nans)
    assert np.isnan(widen(got)).all() and np.array_equal(got, rne(nans))
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, size=(1024, 1024 + 40), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)[:, 17:1041]  # a row-strided view, 1024 columns
    out = np.zeros((1024, 2048), np.uint16)[:, 3:1027]
    assert kernels.to_bf16(x, out=out) is out
    assert np.array_equal(out, rne(x))
    with pytest.raises(TypeError):
        kernels.to_bf16(np.zeros((2, 2)))
    with pytest.raises(ValueError):
        kernels.to_bf16(x, out=np.zeros((3, 3), np.uint16))


@pytest.mark.parametrize("T", [1, 2, 5, 6, 7, 16])
def test_small_batches_and_odd_k(T: int) -> None:
    """1..16 tokens; an F32 weight with an odd number of columns (forward K odd) and an odd row
    count (backward K odd): the pad half of the last pair is zero on both sides."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(T)
    check_both(make_weight(Q.Q4_K, 77, 768, rng), Q.Q4_K, T, rng)
    check_both(make_weight(Q.F32, 33, 45, rng), Q.F32, T, rng)


def test_uint16_input_equals_f32_input_and_views() -> None:
    """x / dy as to_bf16's uint16 give the same floats as f32 input (rounded once in the caller
    instead of in each call), strided or not, with odd K (copied with a pad) or even (used in
    place); row-strided out, a row slice of w, a block-aligned column slice."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(11)
    qt = Q.Q5_0
    w = make_weight(qt, 301, 640, rng)
    x = rng.standard_normal((20, 700), dtype=np.float32)[:, 30:670]
    dy = rng.standard_normal((20, 301), dtype=np.float32)
    y = kernels.qmatmul(x, w, qt, compute="bf16")
    assert np.array_equal(kernels.qmatmul(kernels.to_bf16(x), w, qt, compute="bf16"), y)
    xb = np.zeros((20, 800), np.uint16)[:, 100:740]
    kernels.to_bf16(x, out=xb)
    assert np.array_equal(kernels.qmatmul(xb, w, qt, compute="bf16"), y)
    dx = kernels.qmatmul_backward_input(dy, w, qt, compute="bf16")  # K = 301: odd
    assert np.array_equal(kernels.qmatmul_backward_input(kernels.to_bf16(dy), w, qt, compute="bf16"), dx)
    big = np.full((20, 1000), 7, np.float32)
    kernels.qmatmul(x, w, qt, out=big[:, 500:801], compute="bf16")
    assert np.array_equal(big[:, 500:801], y) and (big[:, :500] == 7).all() and (big[:, 801:] == 7).all()
    wf = dequant(w, qt)
    check_product(kernels.qmatmul(x, w[100:250], qt, compute="bf16"), x, wf[100:250].T, "row slice")
    wc = w[:, 22 * 5:22 * 12]  # Q5_0 blocks 5..11: columns 160..384
    check_product(kernels.qmatmul(x[:, 160:384], wc, qt, compute="bf16"), x[:, 160:384], wf[:, 160:384].T,
                  "column slice")
    check_both(w, qt, 9, rng, x_stride=24)
    with pytest.raises(TypeError):  # uint16 only means bf16 with compute="bf16"
        kernels.qmatmul(xb, w, qt)
    with pytest.raises(ValueError, match="compute must be one of"):
        kernels.qmatmul(x, w, qt, compute="fp16")


def test_threads_give_identical_results() -> None:
    """Every output element is summed in the same order whatever the split between threads (the
    items are disjoint blocks of the output): 1 and 2 threads agree bit for bit, forward and
    backward, with the backward also split by tokens (3 column ranges of a K-quant)."""
    if not HERE:
        return refused()
    rng = np.random.default_rng(2)
    results = []
    for qt, rows, n in ((Q.Q4_0, 500, 1024), (Q.Q4_K, 300, 768)):
        w = make_weight(qt, rows, n, rng)
        x = rng.standard_normal((100, n), dtype=np.float32)
        dy = rng.standard_normal((100, rows), dtype=np.float32)
        results.append((w, qt, x, dy))
    assert kernels.plan(True, 300, 768, 100, Q.Q4_K, threads=2, compute="bf16")[2] == 2  # token split
    out = {}
    try:
        for th in (1, 2):
            set_threads(th)
            out[th] = [(kernels.qmatmul(x, w, qt, compute="bf16"),
                        kernels.qmatmul_backward_input(dy, w, qt, compute="bf16")) for w, qt, x, dy in results]
    finally:
        set_threads(default_threads())
    for (y1, dx1), (y2, dx2) in zip(out[1], out[2]):
        assert np.array_equal(y1, y2) and np.array_equal(dx1, dx2)


@pytest.mark.parametrize("qt, n", [(Q.Q8_0, 640), (Q.Q6_K, 768)], ids=["Q8_0", "Q6_K"])
def test_head_chunk(qt: Q, n: int) -> None:
    """A chunk of the output head (CE_CHUNK rows), forward into logits and the input gradient back
    through it (K = CE_CHUNK: several tiles of k), 2 threads."""
    if not HERE:
        return refused()
    from ggtrain.kernels.loss import CE_CHUNK
    rng = np.random.default_rng(5)
    w = make_weight(qt, CE_CHUNK, n, rng)
    try:
        set_threads(2)
        check_both(w, qt, 40, rng)
    finally:
        set_threads(default_threads())


@pytest.mark.parametrize("var", ["GGTRAIN_BF16", "GGTRAIN_AVX512"])
def test_off_switches(var: str, monkeypatch) -> None:
    """GGTRAIN_BF16=0 (the bf16 path alone) and GGTRAIN_AVX512=0 (every AVX512 kernel) turn it off,
    read at each call; the f32 path keeps working."""
    monkeypatch.setenv(var, "0")
    assert not kernels.bf16_available()
    refused()
    with pytest.raises(ValueError, match=f"{var}=0 turns the (bf16|AVX512) kernels off"):
        kernels.qmatmul(np.zeros((1, 32), np.float32), make_weight(Q.Q8_0, 4, 32, np.random.default_rng(0)),
                        Q.Q8_0, compute="bf16")
    w = make_weight(Q.Q8_0, 4, 32, np.random.default_rng(0))
    assert kernels.qmatmul(np.ones((1, 32), np.float32), w, Q.Q8_0).shape == (1, 4)
    monkeypatch.delenv(var)
    # back on wherever the table's avx512bf16 row runs (so an x86 build cannot have left the module out)
    assert kernels.bf16_available() == variants.runs_on("avx512bf16", variants.cpu_features())


def test_extra_memory_is_bounded() -> None:
    """A weight of 256 MiB as f32 (36 MiB as Q4_0), forward and backward in bf16: the peak RSS
    grows by about tile_bytes (small per-thread tiles and the rounded activations), nowhere near
    a copy of W. A fresh process gives a clean peak."""
    if not HERE:
        return refused()
    code = textwrap.dedent("""
        import resource, numpy as np
        from ggtrain import kernels
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rows, n = 16384, 4096
        w = np.ones((rows, n // 32 * 18), np.uint8)
        w[:, 0::18] = 0; w[:, 1::18] = 0x20        # d = f16 0x2000 (small, finite)
        x = np.ones((2, n), np.float32); dy = np.ones((2, rows), np.float32)
        y = np.zeros((2, rows), np.float32); dx = np.zeros((2, n), np.float32)
        base = peak()
        for _ in range(3):
            kernels.qmatmul(x, w, 2, out=y, compute="bf16")
            kernels.qmatmul_backward_input(dy, w, 2, out=dx, compute="bf16")
        grew = peak() - base
        tile = max(kernels.tile_bytes(bw, rows, n, 2, 2, compute="bf16") for bw in (False, True))
        f32_tile = max(kernels.tile_bytes(bw, rows, n, 2, 2) for bw in (False, True))
        print(grew, tile, f32_tile, bool(np.isfinite(y).all() and np.isfinite(dx).all() and y.any()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GGTRAIN_BF16", "GGTRAIN_AVX512")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    grew, tile, f32_tile, finite = res.stdout.split()
    assert finite == "True"
    # the bf16 tiles: half the bytes a value, and fewer values; besides them the rounded activations,
    # which the AMX kernel pads to 32 tokens and to 32 values of k plus 32 a tile (both k tiles of 2048)
    pad = 32 * (4096 + 2 * 32) * 2
    assert int(tile) < int(f32_tile) / 2 + pad, (tile, f32_tile)
    assert int(grew) < int(tile) + (8 << 20), (grew, tile)  # 8 MiB: allocator and page-table slack


@pytest.mark.parametrize("compute", ["bf16", "f32"])
@pytest.mark.parametrize("qt, rows, n, T", [(Q.Q4_K, 200, 2560, 37), (Q.Q8_0, 130, 640, 7), (Q.Q5_0, 64, 2080, 13)],
                         ids=["Q4_K-k-tiles", "Q8_0-col-tail", "Q5_0"])
def test_low_rank_addend_joins_the_product(compute: str, qt: Q, rows: int, n: int, T: int) -> None:
    """addend (u, v): the product plus u·v in f32 (a LoRA branch), forward and backward, overwrite
    and accumulate, several tiles of k, token and column tails; u a column slice (row-strided) as
    the LoRA code passes it. Against float64, to f32 summation over the rounded inputs plus u·v."""
    if compute == "bf16" and not HERE:
        return refused()
    rng = np.random.default_rng(rows)
    w = make_weight(qt, rows, n, rng)
    wf = dequant(w, qt)
    rd = (lambda a: widen(rne(a))) if compute == "bf16" else (lambda a: a.astype(np.float64))
    x = rng.standard_normal((T, n), dtype=np.float32)
    h = rng.standard_normal((T, 11), dtype=np.float32)
    u, v = h[:, 3:8], rng.standard_normal((5, rows), dtype=np.float32)
    y = kernels.qmatmul(x, w, qt, compute=compute, addend=(u, v))
    ref = rd(x) @ rd(wf).T + u.astype(np.float64) @ v
    bound = (n + 5) * 4 * U32 * (np.abs(rd(x)) @ np.abs(rd(wf)).T + np.abs(u) @ np.abs(v)) + 1e-30
    assert (np.abs(y - ref) <= bound).all()
    dy = rng.standard_normal((T, rows), dtype=np.float32)
    v2 = rng.standard_normal((5, n), dtype=np.float32)
    dx = kernels.qmatmul_backward_input(dy, w, qt, compute=compute, addend=(u, v2))
    ref = rd(dy) @ rd(wf) + u.astype(np.float64) @ v2
    bound = (rows + 5) * 4 * U32 * (np.abs(rd(dy)) @ np.abs(rd(wf)) + np.abs(u) @ np.abs(v2)) + 1e-30
    assert (np.abs(dx - ref) <= bound).all()
    acc = rng.standard_normal((T, n), dtype=np.float32)
    got = acc.copy()
    kernels.qmatmul_backward_input(dy, w, qt, out=got, accumulate=True, compute=compute, addend=(u, v2))
    assert (np.abs(got - (ref + acc)) <= bound + 8 * U32 * np.abs(acc)).all()
    with pytest.raises(ValueError, match="does not give the output"):
        kernels.qmatmul(x, w, qt, compute=compute, addend=(u, v[:, 1:]))
