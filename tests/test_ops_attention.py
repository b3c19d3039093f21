"""Causal GQA attention: forward against a dense float64 numpy reference (explicit mask), backward
against central finite differences, across GQA/MQA, sliding window, soft-cap, packed segments,
T not a multiple of the block size, and T = 1."""

import numpy as np
import pytest
from ggtrain.kernels import attention as A
from ggtrain.kernels import variants
from ggtrain.kernels.attention import attention_backward, attention_forward
from vecmodules import vec_module


def ref_attention(q, k, v, scale, softcap=0.0, n_swa=0, segments=None):
    """Dense (T, T) scores per head with the mask written out from llama.cpp's rules."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    seg = np.zeros(T, int) if segments is None else np.asarray(segments)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) & (seg[:, None] == seg[None, :])
    if n_swa > 0:
        visible &= ~(i - j >= n_swa)  # is_masked_swa(STANDARD): p1 - p0 >= n_swa is masked
    o = np.zeros((T, Hq, v.shape[2]))
    for h in range(Hq):
        s = scale * (q[:, h].astype(np.float64) @ k[:, h // G].astype(np.float64).T)
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        o[:, h] = p @ v[:, h // G].astype(np.float64)
    return o


def _inputs(T, Hq, Hkv, D, Dv, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, Hq, D)), rng.standard_normal((T, Hkv, D)), rng.standard_normal((T, Hkv, Dv))


CASES = {  # T, Hq, Hkv, D, Dv, scale, softcap, n_swa, segment lengths
    "gqa": (37, 4, 2, 16, 16, 0.25, 0.0, 0, None),
    "mqa_dv": (45, 3, 1, 8, 12, 0.35, 0.0, 0, None),
    "mha_one_block": (9, 2, 2, 8, 8, 0.3, 0.0, 0, None),
    "swa": (70, 2, 1, 8, 8, 0.3, 0.0, 5, None),
    "swa_wide": (41, 4, 2, 8, 8, 0.3, 0.0, 33, None),
    "softcap": (37, 4, 2, 16, 16, 0.8, 2.0, 0, None),
    "segments": (70, 4, 2, 8, 8, 0.3, 0.0, 0, (10, 25, 1, 34)),
    "all": (67, 4, 1, 8, 8, 0.6, 1.5, 7, (30, 3, 34)),
    "t1": (1, 2, 1, 8, 8, 0.3, 0.0, 0, None),
}


def _seg(T, lens):
    return None if lens is None else np.repeat(np.arange(len(lens)) * 3 + 5, lens).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_forward_matches_reference(name):
    T, Hq, Hkv, D, Dv, scale, cap, n_swa, lens = CASES[name]
    q, k, v = _inputs(T, Hq, Hkv, D, Dv)
    seg = _seg(T, lens)
    ref = ref_attention(q, k, v, scale, cap, n_swa, seg)
    o, lse = attention_forward(q, k, v, scale, softcap=cap, n_swa=n_swa, segments=seg)
    assert o.shape == (T, Hq, Dv) and lse.shape == (Hq, T) and o.dtype == np.float64
    np.testing.assert_allclose(o, ref, rtol=1e-11, atol=1e-12)
    o32, _ = attention_forward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale,
                               softcap=cap, n_swa=n_swa, segments=seg)
    assert o32.dtype == np.float32
    np.testing.assert_allclose(o32, ref, rtol=1e-4, atol=1e-5)


def test_attention_lse_is_the_row_logsumexp():
    q, k, v = _inputs(40, 2, 1, 8, 8)
    _, lse = attention_forward(q, k, v, 0.5, n_swa=6)
    s = 0.5 * q[:, 1] @ k[:, 0].T
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    s = np.where((j <= i) & (i - j < 6), s, -np.inf)
    np.testing.assert_allclose(lse[1], np.log(np.exp(s).sum(axis=1)), rtol=1e-12)


def test_segments_are_isolated():
    # changing one sample's keys/values never changes the other sample's outputs
    q, k, v = _inputs(50, 2, 1, 8, 8)
    seg = np.repeat([0, 1], [20, 30]).astype(np.int32)
    o1, _ = attention_forward(q, k, v, 0.3, segments=seg)
    k2, v2 = k.copy(), v.copy()
    k2[:20] += 5.0
    v2[:20] -= 3.0
    o2, _ = attention_forward(q, k2, v2, 0.3, segments=seg)
    np.testing.assert_array_equal(o1[20:], o2[20:])
    assert np.abs(o1[:20] - o2[:20]).max() > 0.1


def ref_attention_backward(r, q, k, v, scale, softcap=0.0, n_swa=0, segments=None):
    """Dense float64 gradients of L = Σ o·r, by the chain rule written out per head."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    seg = np.zeros(T, int) if segments is None else np.asarray(segments)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) & (seg[:, None] == seg[None, :])
    if n_swa > 0:
        visible &= i - j < n_swa
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h in range(Hq):
        kh, vh = k[:, h // G], v[:, h // G]
        z = scale * q[:, h] @ kh.T
        s = softcap * np.tanh(z / softcap) if softcap > 0 else z
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dv[:, h // G] += p.T @ r[:, h]
        dp = r[:, h] @ vh.T
        ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
        if softcap > 0:
            ds *= 1.0 - np.tanh(z / softcap) ** 2
        dq[:, h] = scale * ds @ kh
        dk[:, h // G] += scale * ds.T @ q[:, h]
    return dq, dk, dv


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_backward_matches_reference_and_finite_differences(name):
    T, Hq, Hkv, D, Dv, scale, cap, n_swa, lens = CASES[name]
    q, k, v = _inputs(T, Hq, Hkv, D, Dv, seed=1)
    seg = _seg(T, lens)
    rng = np.random.default_rng(2)
    r = rng.standard_normal((T, Hq, Dv))  # L = Σ o·r
    kw = {"softcap": cap, "n_swa": n_swa, "segments": seg}
    o, lse = attention_forward(q, k, v, scale, **kw)
    grads = attention_backward(r, q, k, v, o, lse, scale, **kw)
    # every entry against the dense chain rule
    for g, ref in zip(grads, ref_attention_backward(r, q, k, v, scale, **kw)):
        np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-12)

    # central finite differences of the kernel's own forward: random coordinates and random directions
    def loss(q_, k_, v_):
        return np.sum(attention_forward(q_, k_, v_, scale, **kw)[0] * r)

    h = 1e-6
    for which, (x, dx) in enumerate(zip((q, k, v), grads)):
        def shifted(delta, which=which):
            args = [q, k, v]
            args[which] = args[which] + delta
            return loss(*args)

        flat = rng.choice(x.size, size=min(x.size, 25), replace=False)
        for n in flat:
            e = np.zeros(x.size)
            e[n] = h
            e = e.reshape(x.shape)
            assert (shifted(e) - shifted(-e)) / (2 * h) == pytest.approx(dx.reshape(-1)[n], rel=1e-6, abs=1e-8)
        for _ in range(5):
            u = rng.standard_normal(x.shape)
            assert (shifted(h * u) - shifted(-h * u)) / (2 * h) == pytest.approx(np.sum(dx * u), rel=1e-6, abs=1e-8)
    # the f32 kernels give the same gradients to f32 precision
    f = [a.astype(np.float32) for a in (q, k, v)]
    o32, lse32 = attention_forward(*f, scale, **kw)
    g32 = attention_backward(r.astype(np.float32), *f, o32, lse32, scale, **kw)
    for a, b in zip(g32, grads):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)


def test_block_sizes_do_not_change_results(monkeypatch):
    q, k, v = _inputs(53, 4, 2, 8, 8, seed=3)
    seg = np.repeat([0, 1], [17, 36]).astype(np.int32)
    r = np.random.default_rng(4).standard_normal((53, 4, 8))
    o, lse = attention_forward(q, k, v, 0.4, n_swa=9, segments=seg)
    g = attention_backward(r, q, k, v, o, lse, 0.4, n_swa=9, segments=seg)
    monkeypatch.setattr(A, "BLOCK_Q", 5)
    monkeypatch.setattr(A, "BLOCK_K", 3)
    o2, lse2 = attention_forward(q, k, v, 0.4, n_swa=9, segments=seg)
    g2 = attention_backward(r, q, k, v, o2, lse2, 0.4, n_swa=9, segments=seg)
    np.testing.assert_allclose(o2, o, rtol=1e-12, atol=1e-13)
    for a, b in zip(g2, g):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_bad_shapes_are_rejected():
    q, k, v = _inputs(5, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="GQA"):
        attention_forward(q, k, v, 0.3)


def test_sliding_window_boundary_is_llama_cpp_standard():
    # is_masked_swa(STANDARD) masks p1 - p0 >= n_swa: n_swa = 1 leaves each token only itself,
    # n_swa = 2 exactly itself and the one before
    q, k, v = _inputs(12, 2, 1, 8, 8, seed=6)
    o1, _ = attention_forward(q, k, v, 0.3, n_swa=1)
    np.testing.assert_allclose(o1, np.repeat(v, 2, axis=1), rtol=1e-13, atol=1e-14)
    o2, _ = attention_forward(q, k, v, 0.3, n_swa=2)
    s = 0.3 * np.einsum("thd,td->th", q[1:], k[:-1, 0]), 0.3 * np.einsum("thd,td->th", q[1:], k[1:, 0])
    p_prev = 1.0 / (1.0 + np.exp(s[1] - s[0]))
    expect = p_prev[..., None] * v[:-1, None, 0] + (1 - p_prev)[..., None] * v[1:, None, 0]
    np.testing.assert_allclose(o2[1:], expect, rtol=1e-12, atol=1e-13)


def test_dq_buffer_cap_runs_on_fewer_threads_with_the_same_result(monkeypatch):
    import numba

    q, k, v = _inputs(70, 4, 2, 8, 8, seed=7)
    r = np.random.default_rng(8).standard_normal((70, 4, 8))
    o, lse = attention_forward(q, k, v, 0.3, n_swa=20)
    g = attention_backward(r, q, k, v, o, lse, 0.3, n_swa=20)
    before = numba.get_num_threads()
    monkeypatch.setattr(A, "DQ_BUFFERS_BYTES", 1)  # room for a single buffer: one thread
    g1 = attention_backward(r, q, k, v, o, lse, 0.3, n_swa=20)
    assert numba.get_num_threads() == before  # the thread count is restored
    for a, b in zip(g1, g):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


VEC_CASES = {  # T, Hq, Hkv, D, Dv, scale, softcap, n_swa, segment lengths (Dv a multiple of 16)
    "gemma_like": (300, 4, 1, 256, 256, 0.0625, 0.0, 0, None),
    "gqa_swa_segments": (133, 4, 2, 40, 32, 0.2, 0.0, 17, (50, 3, 80)),
    "softcap_dv48": (77, 6, 3, 64, 48, 0.125, 5.0, 0, None),
    "t1": (1, 2, 1, 16, 16, 0.3, 0.0, 0, None),
}


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("name", sorted(VEC_CASES))
def test_vector_forward_matches_reference_and_the_numba_kernel(name, level, monkeypatch):
    monkeypatch.setattr(A, "_vec", vec_module("attention", level))
    T, Hq, Hkv, D, Dv, scale, cap, n_swa, lens = VEC_CASES[name]
    q, k, v = _inputs(T, Hq, Hkv, D, Dv, seed=7)
    seg = _seg(T, lens)
    f = [a.astype(np.float32) for a in (q, k, v)]
    o, lse = attention_forward(*f, scale, softcap=cap, n_swa=n_swa, segments=seg)  # the C kernel
    np.testing.assert_allclose(o, ref_attention(q, k, v, scale, cap, n_swa, seg), rtol=1e-4, atol=1e-5)
    _, lse64 = attention_forward(q, k, v, scale, softcap=cap, n_swa=n_swa, segments=seg)
    np.testing.assert_allclose(lse, lse64, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(A, "_vec", None)
    o_nb, lse_nb = attention_forward(*f, scale, softcap=cap, n_swa=n_swa, segments=seg)
    np.testing.assert_allclose(o, o_nb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, lse_nb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("name", sorted(VEC_CASES) + ["d8_dv12", "all"])
@pytest.mark.parametrize("threads", [1, 2])
def test_vector_backward_matches_reference_and_the_numba_kernel(name, threads, level, monkeypatch):
    """Ragged key blocks (T not a multiple of 16 or 8), head dims that are not whole vectors, GQA,
    windows, segments, soft-cap and T = 1; on one thread and on two."""
    import numba

    monkeypatch.setattr(A, "_vec_backward", vec_module("attention", level))  # the C backward (training runs it on AVX512)
    extra = {"d8_dv12": (45, 3, 1, 8, 12, 0.35, 0.0, 0, None), "all": CASES["all"]}
    T, Hq, Hkv, D, Dv, scale, cap, n_swa, lens = {**VEC_CASES, **extra}[name]
    q, k, v = _inputs(T, Hq, Hkv, D, Dv, seed=11)
    seg = _seg(T, lens)
    r = np.random.default_rng(12).standard_normal((T, Hq, Dv))
    kw = {"softcap": cap, "n_swa": n_swa, "segments": seg}
    ref = ref_attention_backward(r, q, k, v, scale, **kw)
    f = [a.astype(np.float32) for a in (q, k, v)]
    o, lse = attention_forward(*f, scale, **kw)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        g = attention_backward(r.astype(np.float32), *f, o, lse, scale, **kw)  # the C kernel
        again = attention_backward(r.astype(np.float32), *f, o, lse, scale, **kw)
    finally:
        numba.set_num_threads(before)
    for a, b, c in zip(g, ref, again):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)
        np.testing.assert_array_equal(a, c)  # the same from run to run (training is reproducible)
    monkeypatch.setattr(A, "_vec_backward", None)
    g_nb = attention_backward(r.astype(np.float32), *f, o, lse, scale, **kw)
    for a, b in zip(g, g_nb):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
def test_vector_backward_matches_finite_differences(level, monkeypatch):
    # the C backward's own gradients of L = Σ o·r against central differences of the C forward (f32,
    # so a coarse step and a loose bound; the float64 chain-rule reference above is the tight check)
    monkeypatch.setattr(A, "_vec", vec_module("attention", level))
    monkeypatch.setattr(A, "_vec_backward", vec_module("attention", level))
    T, Hq, Hkv, D, Dv, scale, cap = 37, 2, 1, 24, 16, 0.3, 4.0
    q, k, v = (a.astype(np.float32) for a in _inputs(T, Hq, Hkv, D, Dv, seed=21))
    r = np.random.default_rng(22).standard_normal((T, Hq, Dv)).astype(np.float32)
    o, lse = attention_forward(q, k, v, scale, softcap=cap, n_swa=9)
    grads = attention_backward(r, q, k, v, o, lse, scale, softcap=cap, n_swa=9)
    rng = np.random.default_rng(23)
    for which, x in enumerate((q, k, v)):
        for idx in [tuple(rng.integers(0, s) for s in x.shape) for _ in range(6)]:
            h = 1e-2
            loss = []
            for sign in (1, -1):
                xp = x.copy()
                xp[idx] += sign * h
                args = [q, k, v]
                args[which] = xp
                loss.append(float(np.sum(attention_forward(*args, scale, softcap=cap, n_swa=9)[0].astype(np.float64) * r)))
            assert grads[which][idx] == pytest.approx((loss[0] - loss[1]) / (2 * h), rel=2e-2, abs=2e-3)
