"""RMSNorm: forward against a float64 numpy reference, backward against central finite differences."""

import numpy as np
import pytest
from ggtrain.kernels.norm import rmsnorm_backward, rmsnorm_forward


def ref_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("shape", [(7, 48), (5, 3, 16), (1, 640)])
def test_rmsnorm_forward_matches_reference(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3.0
    w = rng.standard_normal(shape[-1])
    eps = 1e-6
    y64, rstd = rmsnorm_forward(x, w, eps)
    assert y64.dtype == np.float64 and y64.shape == shape and rstd.shape == shape[:-1]
    np.testing.assert_allclose(y64, ref_rmsnorm(x, w, eps), rtol=1e-12, atol=1e-12)
    y32, _ = rmsnorm_forward(x.astype(np.float32), w.astype(np.float32), eps)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref_rmsnorm(x, w, eps), rtol=1e-5, atol=1e-5)


def test_rmsnorm_eps_matters_for_small_rows():
    x = np.full((2, 8), 1e-3)
    w = np.ones(8)
    y, _ = rmsnorm_forward(x, w, 1e-2)
    np.testing.assert_allclose(y, ref_rmsnorm(x, w, 1e-2), rtol=1e-12)
    assert y[0, 0] < 0.02  # eps dominates: far from the eps-free value 1.0


@pytest.mark.parametrize("shape", [(6, 24), (4, 2, 8)])
def test_rmsnorm_backward_matches_finite_differences(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    w = rng.standard_normal(shape[-1])
    r = rng.standard_normal(shape)  # L = Σ y·r
    eps = 1e-5
    _, rstd = rmsnorm_forward(x, w, eps)
    dx = rmsnorm_backward(r, x, w, rstd)
    num = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (np.sum(ref_rmsnorm(xp, w, eps) * r) - np.sum(ref_rmsnorm(xm, w, eps) * r)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    # the f32 kernel agrees with the f64 gradient
    _, rstd32 = rmsnorm_forward(x.astype(np.float32), w.astype(np.float32), eps)
    dx32 = rmsnorm_backward(r.astype(np.float32), x.astype(np.float32), w.astype(np.float32), rstd32)
    assert dx32.dtype == np.float32
    np.testing.assert_allclose(dx32, num, rtol=1e-4, atol=1e-5)


def test_parallel_and_serial_paths_agree(monkeypatch):
    from ggtrain.kernels import norm

    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, 4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, r = rmsnorm_forward(x, w, 1e-6)
    dx = rmsnorm_backward(dy, x, w, r)
    monkeypatch.setattr(norm, "PARALLEL_MIN", 0)
    y2, r2 = rmsnorm_forward(x, w, 1e-6)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(r2, r)
    np.testing.assert_array_equal(rmsnorm_backward(dy, x, w, r2), dx)
