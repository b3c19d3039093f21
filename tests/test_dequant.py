"""ggtrain.kernels.dequantize is bit-identical to gguf.quants.dequantize for every supported type.

Both compiled variants (quant_base and quant_avx2) are checked on random blocks; the variant the CPU
selects is checked on every tensor of the real Gemma 3 270M file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import SUPPORTED_TYPES, ModelFile

ALL_TYPES = sorted(SUPPORTED_TYPES, key=int)
# Types gguf-py can quantize (the others get random bytes with finite scales).
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
# Byte offsets of the f16 scales (d, m/dmin) inside one block of each type.
F16_SCALES = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
    Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0],
}


def _impls() -> list:
    from ggtrain.kernels import quant_avx2, quant_base
    return [pytest.param(quant_base, id="base"), pytest.param(quant_avx2, id="avx2")]


@pytest.fixture(params=_impls())
def impl(request, monkeypatch):
    """Runs the test with kernels' compiled module swapped for one variant."""
    if request.param.__name__.endswith("avx2") and kernels._cpu_simd_level() != "avx2":
        pytest.skip("this CPU lacks AVX2/FMA/F16C: quant_avx2 cannot run here")
    monkeypatch.setattr(kernels, "_impl", request.param)
    return request.param


def random_rows(qt: Q, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw rows (rows, blocks * type_size): random bytes, with finite f16 scales of every
    magnitude (normal, subnormal, zero, negative) written over the scale fields."""
    type_size = GGML_QUANT_SIZES[qt][1]
    if qt == Q.F32:
        return rng.standard_normal((rows, blocks), dtype=np.float32).view(np.uint8)
    if qt == Q.F16:
        vals = rng.standard_normal((rows, blocks)).astype(np.float16)
        vals.flat[:3] = [np.float16(6e-8), np.float16(-65504), np.inf]  # subnormal, max, inf
        return vals.view(np.uint8)
    raw = rng.integers(0, 256, size=(rows * blocks, type_size), dtype=np.uint8)
    if qt == Q.BF16:
        return raw.reshape(rows, -1)
    for off in F16_SCALES[qt]:
        scales = (rng.standard_normal(rows * blocks) * 10.0 ** rng.integers(-9, 2, rows * blocks)).astype(np.float16)
        scales[:4] = [0.0, -0.0, 6e-8, -3e-5]
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def assert_bit_identical(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    a, b = ours.view(np.uint32), np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, (f"{bad.size} of {a.size} values differ, first at {bad[0]}: "
                           f"{ours.flat[bad[0]]!r} vs {ref.flat[bad[0]]!r}")


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_random_blocks_bit_identical(qt: Q, impl) -> None:
    rng = np.random.default_rng(int(qt))
    block = GGML_QUANT_SIZES[qt][0]
    data = random_rows(qt, 37, 2048 // block if block > 1 else 300, rng)
    assert_bit_identical(kernels.dequantize(data, qt), quants.dequantize(data, qt))


@pytest.mark.parametrize("qt", sorted(QUANTIZABLE, key=int), ids=lambda q: q.name)
def test_quantized_blocks_bit_identical(qt: Q, impl) -> None:
    """Blocks produced by gguf-py's own quantizer (real scale/offset relations)."""
    rng = np.random.default_rng(100 + int(qt))
    x = rng.standard_normal((19, 512)).astype(np.float32) * np.float32(3.0)
    x[0] = 0.0  # an all-zero row: d = 0
    data = np.ascontiguousarray(quants.quantize(x, qt)).view(np.uint8)
    assert_bit_identical(kernels.dequantize(data, qt), quants.dequantize(data, qt))


@pytest.mark.parametrize("qt", [Q.Q4_K, Q.Q8_0, Q.F16], ids=lambda q: q.name)
def test_shapes_and_views(qt: Q, impl) -> None:
    """Any leading shape (1-D, 3-D), one long row split across threads, non-contiguous rows, empty."""
    rng = np.random.default_rng(7)
    data = random_rows(qt, 24, 64, rng)
    ref = quants.dequantize(data, qt)
    assert_bit_identical(kernels.dequantize(data.reshape(2, 3, 4, -1), qt), ref.reshape(2, 3, 4, -1))
    assert_bit_identical(kernels.dequantize(data[5], qt), ref[5])
    long_row = data.reshape(1, -1)
    assert_bit_identical(kernels.dequantize(long_row, qt), quants.dequantize(long_row, qt))
    assert_bit_identical(kernels.dequantize(data[::3], qt), ref[::3])
    assert kernels.dequantize(data[:0], qt).shape == (0, ref.shape[1])


def test_every_tensor_of_the_real_model_bit_identical() -> None:
    mf = ModelFile(default_model_path())
    seen = set()
    for name, t in mf.tensors.items():
        for r0 in range(0, t.data.shape[0], 32768):  # token_embd is 262144 rows: compare in slices
            part = t.data[r0:r0 + 32768]
            try:
                assert_bit_identical(kernels.dequantize(part, t.qtype), quants.dequantize(part, t.qtype))
            except AssertionError as e:
                raise AssertionError(f"{name} ({t.type_name}) rows {r0}+: {e}") from None
        seen.add(t.type_name)
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"} <= seen  # the file's mix of types was covered


def test_get_rows_matches_dequantize() -> None:
    rng = np.random.default_rng(3)
    for qt in (Q.Q6_K, Q.Q5_0, Q.BF16):
        w = random_rows(qt, 50, 4 if GGML_QUANT_SIZES[qt][0] > 32 else 32, rng)
        ids = np.array([49, 0, 7, 7, 21], dtype=np.int64)
        assert_bit_identical(kernels.get_rows(w, qt, ids), quants.dequantize(w, qt)[ids])
        assert kernels.get_rows(w, qt, np.zeros(0, dtype=np.int32)).shape == (0, quants.dequantize(w, qt).shape[1])


def test_bad_input_raises_clear_errors() -> None:
    # our own code passing what the kernels cannot take: TypeError / ValueError (files are checked
    # at the boundary, by ModelFile, with GGTrainError)
    good = random_rows(Q.Q8_0, 2, 2, np.random.default_rng(0))
    with pytest.raises(TypeError, match="uint8"):
        kernels.dequantize(good.view(np.float32) if good.size % 4 == 0 else good.astype(np.int16), Q.Q8_0)
    with pytest.raises(ValueError, match="not a whole number of Q8_0 blocks"):
        kernels.dequantize(good[:, :-1], Q.Q8_0)
    with pytest.raises(ValueError, match="IQ2_XXS is not supported"):
        kernels.dequantize(good, Q.IQ2_XXS)
    with pytest.raises(ValueError, match="unknown tensor type 99"):
        kernels.dequantize(good, 99)
    with pytest.raises(ValueError, match="token ids out of range"):
        kernels.get_rows(good, Q.Q8_0, np.array([2]))
    with pytest.raises(TypeError, match="1-D integer"):
        kernels.get_rows(good, Q.Q8_0, np.array([0.5]))


def test_simd_choice_is_valid_and_overridable(monkeypatch) -> None:
    assert kernels.simd_level in ("base", "avx2")
    assert kernels._impl.__name__.endswith(kernels.simd_level)
    monkeypatch.setenv("GGTRAIN_SIMD", "base")
    assert kernels._cpu_simd_level() == "base"
    monkeypatch.setenv("GGTRAIN_SIMD", "sse9")
    with pytest.raises(GGTrainError, match="GGTRAIN_SIMD"):
        kernels._cpu_simd_level()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else None
    monkeypatch.delenv("GGTRAIN_SIMD")
    if flags is not None:  # numpy's runtime detection agrees with the kernel's own view of the CPU
        has = all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))
        assert kernels._cpu_simd_level() == ("avx2" if has else "base")
