"""SwiGLU and GeGLU(tanh): forward against float64 numpy references, backward against finite differences."""

import numpy as np
import pytest
from ggtrain.kernels import variants
from ggtrain.kernels.activation import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from vecmodules import vec_module


def ref_swiglu(g, u):
    return g / (1.0 + np.exp(-g)) * u


def ref_geglu(g, u):
    # ggml's gelu: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
    return 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * g * (1.0 + 0.044715 * g * g))) * u


CASES = [(swiglu_forward, swiglu_backward, ref_swiglu), (geglu_forward, geglu_backward, ref_geglu)]


@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_forward_matches_reference(fwd, bwd, ref):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((9, 33)) * 4.0
    g[0, :4] = [-80.0, 80.0, 0.0, -12.0]  # saturated tails must not produce nan/inf
    u = rng.standard_normal((9, 33))
    y = fwd(g, u)
    assert y.dtype == np.float64 and y.shape == g.shape
    np.testing.assert_allclose(y, ref(g, u), rtol=1e-12, atol=1e-14)
    y32 = fwd(g.astype(np.float32), u.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref(g, u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_backward_matches_finite_differences(fwd, bwd, ref):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((5, 13)) * 3.0
    u = rng.standard_normal((5, 13))
    r = rng.standard_normal((5, 13))
    dg, du = bwd(r, g, u)
    h = 1e-6
    # elementwise op: perturbing every entry at once gives every partial derivative in one shot
    num_dg = (ref(g + h, u) - ref(g - h, u)) / (2 * h) * r
    num_du = (ref(g, u + h) - ref(g, u - h)) / (2 * h) * r
    np.testing.assert_allclose(dg, num_dg, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(du, num_du, rtol=1e-7, atol=1e-9)
    dg32, du32 = bwd(r.astype(np.float32), g.astype(np.float32), u.astype(np.float32))
    assert dg32.dtype == np.float32
    np.testing.assert_allclose(dg32, num_dg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(du32, num_du, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_parallel_and_serial_paths_agree_across_blocks(fwd, bwd, ref, monkeypatch):
    from ggtrain.kernels import activation

    rng = np.random.default_rng(3)
    g = (rng.standard_normal((3, 5001)) * 5).astype(np.float32)  # several blocks, the last one partial
    u = rng.standard_normal((3, 5001)).astype(np.float32)
    dy = rng.standard_normal((3, 5001)).astype(np.float32)
    serial = fwd(g, u), *bwd(dy, g, u)
    monkeypatch.setattr(activation, "PARALLEL_MIN", 0)
    parallel = fwd(g, u), *bwd(dy, g, u)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(serial[0], ref(g.astype(np.float64), u.astype(np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_vector_forward_matches_reference_and_the_numba_kernel(fwd, bwd, ref, level, monkeypatch):
    from ggtrain.kernels import activation

    monkeypatch.setattr(activation, "_vec", vec_module("activation", level))
    rng = np.random.default_rng(4)
    g = (rng.standard_normal((7, 40001)) * 5).astype(np.float32)  # several parallel blocks, a ragged tail
    g[0, :4] = [-80.0, 80.0, 0.0, -12.0]
    u = rng.standard_normal((7, 40001)).astype(np.float32)
    y = fwd(g, u)
    np.testing.assert_allclose(y, ref(g.astype(np.float64), u.astype(np.float64)), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(activation, "_vec", None)
    np.testing.assert_allclose(y, fwd(g, u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_vector_backward_matches_finite_differences_and_the_numba_kernel(fwd, bwd, ref, level, monkeypatch):
    from ggtrain.kernels import activation

    monkeypatch.setattr(activation, "_vec", vec_module("activation", level))
    rng = np.random.default_rng(5)
    g = rng.standard_normal((7, 40001)) * 5  # several parallel blocks, a ragged tail
    g[0, :6] = [-80.0, 80.0, 0.0, -12.0, 12.0, -1e-3]  # saturated tails: no nan/inf, the right limits
    u, dy = rng.standard_normal((2, 7, 40001))
    g32, u32, dy32 = (a.astype(np.float32) for a in (g, u, dy))
    g64, u64, dy64 = (a.astype(np.float64) for a in (g32, u32, dy32))
    h = 1e-6
    num_dg = (ref(g64 + h, u64) - ref(g64 - h, u64)) / (2 * h) * dy64
    num_du = ref(g64, np.ones_like(u64)) * dy64  # y is linear in u
    monkeypatch.setattr(activation, "PARALLEL_MIN", 0)  # the threaded path too
    for nthreads_path in (True, False):
        if not nthreads_path:
            monkeypatch.setattr(activation, "PARALLEL_MIN", 1 << 40)
        dg, du = bwd(dy32, g32, u32)
        assert dg.dtype == np.float32 and np.all(np.isfinite(dg)) and np.all(np.isfinite(du))
        np.testing.assert_allclose(dg, num_dg, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(du, num_du, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(activation, "_vec", None)
    dg_numba, du_numba = bwd(dy32, g32, u32)
    np.testing.assert_allclose(dg, dg_numba, rtol=1e-5, atol=1e-5)  # both f32 near cancellation (g << 0)
    np.testing.assert_allclose(du, du_numba, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fwd,bwd,ref", CASES, ids=["swiglu", "geglu"])
def test_vector_levels_give_the_same_bits(fwd, bwd, ref, monkeypatch):
    # elementwise, the same operations lane by lane: 8 lanes (AVX2) or 16 (AVX512) cannot differ
    from ggtrain.kernels import activation

    rng = np.random.default_rng(6)
    g = (rng.standard_normal((3, 4099)) * 5).astype(np.float32)  # a tail shorter than either width
    u, dy = rng.standard_normal((2, 3, 4099)).astype(np.float32)
    results = []
    for level in variants.VECTOR_LEVELS:
        monkeypatch.setattr(activation, "_vec", vec_module("activation", level))
        results.append((fwd(g, u), *bwd(dy, g, u)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
