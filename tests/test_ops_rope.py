"""RoPE (ggml semantics): forward against a float64 numpy reference written from the formulas,
backward against central finite differences and as the transpose of the forward."""

import math

import numpy as np
import pytest
from ggtrain.kernels.rope import rope_backward, rope_cache, rope_forward, yarn_corr_dims


def ref_angles(pos, n_rot, base, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0,
               n_ctx_orig=0, freq_factors=None):
    """(T, n_rot/2) angles and the magnitude scale, in float64, straight from the definitions."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    ff = np.ones(n_rot // 2) if freq_factors is None else np.asarray(freq_factors, np.float64)
    theta_extrap = pos[:, None].astype(np.float64) * base ** (-2.0 * i / n_rot) / ff
    theta = freq_scale * theta_extrap
    mscale = attn_factor
    if ext_factor != 0.0:
        def corr_dim(beta):  # the pair index whose wavelength fits `beta` times into n_ctx_orig
            return n_rot * math.log(n_ctx_orig / (beta * 2 * math.pi)) / (2 * math.log(base))
        lo = max(0.0, math.floor(corr_dim(beta_fast)))
        hi = min(n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
        ramp = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)
        mix = ramp * ext_factor
        theta = theta * (1 - mix) + theta_extrap * mix
        mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return theta, mscale


def ref_rope(x, theta, mscale, neox):
    x = x.astype(np.float64)
    y = x.copy()
    n_half = theta.shape[1]
    if neox:
        a, b = np.arange(n_half), np.arange(n_half) + n_half
    else:
        a, b = 2 * np.arange(n_half), 2 * np.arange(n_half) + 1
    c, s = np.cos(theta)[:, None, :] * mscale, np.sin(theta)[:, None, :] * mscale
    y[..., a] = x[..., a] * c - x[..., b] * s
    y[..., b] = x[..., a] * s + x[..., b] * c
    return y


CASES = {
    "normal": {"n_rot": 16, "hd": 16, "neox": False, "kw": {"base": 10000.0}},
    "neox": {"n_rot": 16, "hd": 16, "neox": True, "kw": {"base": 10000.0}},
    "normal_partial": {"n_rot": 8, "hd": 20, "neox": False, "kw": {"base": 10000.0}},
    "neox_partial": {"n_rot": 12, "hd": 16, "neox": True, "kw": {"base": 1e6}},
    "linear_scale": {"n_rot": 16, "hd": 16, "neox": True, "kw": {"base": 10000.0, "freq_scale": 0.25}},
    "yarn": {"n_rot": 32, "hd": 32, "neox": True, "kw": {"base": 10000.0, "freq_scale": 0.25, "ext_factor": 1.0, "attn_factor": 0.9,
                                                    "beta_fast": 32.0, "beta_slow": 1.0, "n_ctx_orig": 256}},
    "yarn_half": {"n_rot": 16, "hd": 24, "neox": False, "kw": {"base": 500000.0, "freq_scale": 0.5, "ext_factor": 0.5,
                                                         "beta_fast": 16.0, "beta_slow": 2.0, "n_ctx_orig": 128}},
    "llama3_freq_factors": {"n_rot": 16, "hd": 16, "neox": False, "kw": {"base": 500000.0, "freq_factors": np.array(
        [1, 1, 1, 1, 1.5, 2, 4, 8], np.float32)}},
}


def _cache(pos, n_rot, kw):
    kw = dict(kw)
    base = kw.pop("base")
    return rope_cache(pos, n_rot, freq_base=base, **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_forward_matches_reference(name):
    c = CASES[name]
    rng = np.random.default_rng(0)
    pos = np.concatenate([np.arange(11), np.arange(7), np.arange(40, 49)]).astype(np.int32)  # packed: restarts
    x = rng.standard_normal((pos.shape[0], 3, c["hd"]))
    cache = _cache(pos, c["n_rot"], c["kw"])
    theta, mscale = ref_angles(pos, c["n_rot"], **c["kw"])
    ref = ref_rope(x, theta, mscale, c["neox"])
    y = rope_forward(x, cache, c["neox"])
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5)  # table in f32 like ggml: angles to ~1e-6
    y32 = rope_forward(x.astype(np.float32), cache, c["neox"])
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref, rtol=0, atol=3e-5)
    np.testing.assert_array_equal(y[..., c["n_rot"]:], x[..., c["n_rot"]:])  # unrotated tail passes through
    # restarted positions rotate exactly like the same positions at the start
    np.testing.assert_array_equal(y[11:18], rope_forward(x[11:18], _cache(pos[11:18], c["n_rot"], c["kw"]), c["neox"]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rope_backward_matches_finite_differences(name):
    c = CASES[name]
    rng = np.random.default_rng(1)
    pos = np.array([0, 1, 2, 3, 0, 1, 17], np.int32)
    x = rng.standard_normal((pos.shape[0], 2, c["hd"]))
    r = rng.standard_normal(x.shape)
    cache = _cache(pos, c["n_rot"], c["kw"])
    dx = rope_backward(r, cache, c["neox"])
    num = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (np.sum(rope_forward(xp, cache, c["neox"]) * r) - np.sum(rope_forward(xm, cache, c["neox"]) * r)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    # the backward of the f64 reference map (a rotation by theta, scaled) agrees too
    theta, mscale = ref_angles(pos, c["n_rot"], **c["kw"])
    num_ref = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = 1.0
        num_ref[idx] = np.sum(ref_rope(e, theta, mscale, c["neox"]) * r)  # linear: exact column of Jᵀr
    np.testing.assert_allclose(dx, num_ref, rtol=0, atol=5e-5)


def test_rope_roundtrip_and_corr_dims():
    rng = np.random.default_rng(2)
    pos = np.arange(9, dtype=np.int32)
    x = rng.standard_normal((9, 2, 16))
    cache = rope_cache(pos, 16, freq_base=10000.0, attn_factor=1.5)
    np.testing.assert_allclose(rope_backward(rope_forward(x, cache, True), cache, True), 1.5**2 * x, atol=1e-5)
    lo, hi = yarn_corr_dims(64, 4096, 10000.0, 32.0, 1.0)
    f = lambda beta: 64 * math.log(4096 / (beta * 2 * math.pi)) / (2 * math.log(10000.0))
    assert (lo, hi) == (max(0.0, math.floor(f(32.0))), min(63.0, math.ceil(f(1.0))))
    with pytest.raises(ValueError, match="n_ctx_orig"):
        rope_cache(pos, 16, ext_factor=1.0)


def test_parallel_and_serial_paths_agree(monkeypatch):
    from ggtrain.kernels import rope

    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 3, 24)).astype(np.float32)
    cache = rope_cache(np.arange(33, dtype=np.int32), 16, freq_base=1e4)
    y, dx = rope_forward(x, cache, False), rope_backward(x, cache, True)
    monkeypatch.setattr(rope, "PARALLEL_MIN", 0)
    np.testing.assert_array_equal(rope_forward(x, cache, False), y)
    np.testing.assert_array_equal(rope_backward(x, cache, True), dx)
