"""Chunked cross-entropy: forward against full-logits float64 numpy, backward against central finite
differences, with masks (float weights, all-masked-but-one, all masked), soft-cap and chunk sizes that
do not divide the vocabulary."""

import numpy as np
import pytest
from ggtrain.kernels import variants
from ggtrain.kernels.loss import cross_entropy_backward, cross_entropy_forward
from vecmodules import vec_module


class DenseHead:
    """The head interface over a plain numpy W (vocab, d); counts calls to check the chunking."""

    def __init__(self, w):
        self.w = w
        self.shape = w.shape
        self.calls = []

    def matmul(self, x, r0, r1):
        self.calls.append(("matmul", r0, r1, x.shape[0]))
        return x @ self.w[r0:r1].T

    def matmul_t(self, dy, r0, r1):
        self.calls.append(("matmul_t", r0, r1, dy.shape[0]))
        return dy @ self.w[r0:r1]

    def rows(self, ids):
        return self.w[ids]


def ref_loss(h, w, targets, mask, softcap=0.0):
    """(mean over trained tokens, per-token losses) from the full (T, V) logits in float64."""
    z = h.astype(np.float64) @ w.astype(np.float64).T
    if softcap > 0:
        z = softcap * np.tanh(z / softcap)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    t = np.where((targets >= 0) & (targets < w.shape[0]), targets, 0)
    losses = lse - z[np.arange(len(t)), t]
    mask = np.asarray(mask, np.float64)
    return float((losses * mask).sum() / mask.sum()), losses


def _problem(T=9, d=12, V=301, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, d)), rng.standard_normal((V, d)) * 0.7, rng.integers(0, V, T)


MASKS = {
    "all": lambda T: np.ones(T, bool),
    "some": lambda T: np.arange(T) % 3 != 0,
    "one": lambda T: np.arange(T) == T - 2,
    "float": lambda T: np.linspace(0.0, 2.0, T),
}


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("chunk", [64, 1000])
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_forward_matches_full_logits(mask_name, chunk, softcap):
    h, w, t = _problem()
    mask = MASKS[mask_name](len(t))
    head = DenseHead(w)
    loss, st = cross_entropy_forward(h, head, t, mask, final_softcap=softcap, chunk=chunk)
    ref, ref_losses = ref_loss(h, w, t, mask, softcap)
    assert loss == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(st.losses, ref_losses, rtol=1e-12)
    assert st.n_trained == np.count_nonzero(mask)
    # the vocabulary is covered chunk by chunk, never all at once (unless it fits one chunk)
    spans = [(c[1], c[2]) for c in head.calls]
    assert spans[0] == (0, min(chunk, 301)) and spans[-1][1] == 301 and all(b - a <= chunk for a, b in spans)
    # f32 activations and head: same loss to f32 precision
    loss32, _st32 = cross_entropy_forward(h.astype(np.float32), DenseHead(w.astype(np.float32)), t, mask,
                                         final_softcap=softcap, chunk=chunk)
    assert loss32 == pytest.approx(ref, rel=1e-5)


def test_masked_tokens_may_have_invalid_targets_and_nothing_trained_gives_zero():
    h, w, t = _problem()
    t[[0, 4]] = -1
    mask = np.ones(len(t))
    mask[[0, 4]] = 0
    loss, st = cross_entropy_forward(h, DenseHead(w), t, mask, chunk=100)
    ref, _ = ref_loss(h[mask > 0], w, t[mask > 0], mask[mask > 0])
    assert loss == pytest.approx(ref, rel=1e-12) and st.losses[0] == 0.0
    loss0, st0 = cross_entropy_forward(h, DenseHead(w), t, np.zeros(len(t)), chunk=100)
    assert loss0 == 0.0 and st0.n_trained == 0
    assert not cross_entropy_backward(h, DenseHead(w), st0).any()
    mask[0] = 1  # a trained token with target -1 is an error
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy_forward(h, DenseHead(w), t, mask)


@pytest.mark.parametrize("with_grad", [False, True], ids=["recompute", "fused"])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_backward_matches_finite_differences(mask_name, softcap, with_grad):
    h, w, t = _problem(T=7, d=10, V=203, seed=1)
    mask = MASKS[mask_name](len(t))
    trained = np.asarray(mask) != 0
    head = DenseHead(w)
    loss, st = cross_entropy_forward(h, head, t, mask, final_softcap=softcap, chunk=50, with_grad=with_grad)
    ref, ref_losses = ref_loss(h, w, t, mask, softcap)
    assert loss == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(st.losses[trained], ref_losses[trained], rtol=1e-12)
    dh = cross_entropy_backward(h, head, st, dloss=1.7)
    assert dh.shape == h.shape and dh.dtype == np.float64
    num = np.zeros_like(h)
    eps = 1e-6
    for idx in np.ndindex(h.shape):
        hp, hm = h.copy(), h.copy()
        hp[idx] += eps
        hm[idx] -= eps
        num[idx] = 1.7 * (ref_loss(hp, w, t, mask, softcap)[0] - ref_loss(hm, w, t, mask, softcap)[0]) / (2 * eps)
    np.testing.assert_allclose(dh, num, rtol=1e-6, atol=1e-9)
    assert not dh[~trained].any()  # untrained rows get exactly zero gradient
    # only trained rows go through the head when the gradient is computed; the fused pass needs
    # two GEMMs per chunk (5 chunks here), the recompute three
    grad_calls = head.calls if with_grad else [c for c in head.calls if c[0] == "matmul_t"]
    assert all(c[3] == np.count_nonzero(mask) for c in grad_calls)
    assert len(head.calls) == (10 if with_grad else 15)
    h32, w32 = h.astype(np.float32), w.astype(np.float32)
    _, st32 = cross_entropy_forward(h32, DenseHead(w32), t, mask, final_softcap=softcap, chunk=50,
                                    with_grad=with_grad)
    dh32 = cross_entropy_backward(h32, DenseHead(w32), st32, dloss=1.7)
    assert dh32.dtype == np.float32
    np.testing.assert_allclose(dh32, num, rtol=1e-4, atol=1e-5)


def test_fused_gradient_survives_a_late_large_logit():
    # the running max jumps in the last chunk: the accumulated gradient must be rescaled, not overflow
    h, w, t = _problem(T=5, d=6, V=120, seed=3)
    w[117] = h.sum(axis=0) * 4.0  # a huge logit for every token, in the last chunk
    for dt in (np.float64, np.float32):
        head = DenseHead(w.astype(dt))
        _, st_f = cross_entropy_forward(h.astype(dt), head, t, np.ones(5), chunk=40, with_grad=True)
        _, st_r = cross_entropy_forward(h.astype(dt), head, t, np.ones(5), chunk=40)
        a = cross_entropy_backward(h.astype(dt), head, st_f)
        b = cross_entropy_backward(h.astype(dt), head, st_r)
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-4 if dt == np.float32 else 1e-10, atol=1e-6)


def test_vectorised_exp_is_float32_accurate():
    from ggtrain.kernels.vecmath import exp_shift_inplace

    rng = np.random.default_rng(5)
    x = rng.uniform(-85.0, 0.0, 5000).astype(np.float32)
    x[:4] = [0.0, -1e-7, -0.6931472, -np.inf]
    m = np.float32(1.25)
    y = x + m  # exp(y - m) = exp(x)
    s = exp_shift_inplace(y, m, np.empty(5000, np.int32))
    ref = np.exp(x.astype(np.float64))
    ok = np.isfinite(x)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=5e-7, atol=0)
    assert 0.0 <= y[3] < 1e-37  # -inf clamps to a negligible value, never nan
    assert s == pytest.approx(ref.sum(), rel=1e-6)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_vector_chunk_kernel_matches_the_reference_and_the_numba_kernel(softcap, level, monkeypatch):
    from ggtrain.kernels import loss

    monkeypatch.setattr(loss, "_vec", vec_module("loss", level))
    h, w, t = _problem(T=40, d=16, V=3001, seed=2)  # chunks of 1000 and a last one of 1: ragged tails
    mask = np.arange(40) % 4 != 0
    h32, w32 = h.astype(np.float32), w.astype(np.float32)
    l_vec, st_vec = cross_entropy_forward(h32, DenseHead(w32), t, mask, final_softcap=softcap, chunk=1000)
    ref, ref_losses = ref_loss(h, w, t, mask, softcap)
    assert l_vec == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(st_vec.losses, ref_losses, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(loss, "_vec", None)
    l_nb, st_nb = cross_entropy_forward(h32, DenseHead(w32), t, mask, final_softcap=softcap, chunk=1000)
    assert l_vec == pytest.approx(l_nb, rel=1e-5)
    np.testing.assert_allclose(st_vec.lse, st_nb.lse, rtol=1e-6)



def _bf16_bits(x):
    """numpy's own f32 -> bf16 round to nearest even (finite values), the reference for the kernel's."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class RecordingHead(DenseHead):
    """A head whose backward products record what they were handed; bf16 bits are widened back."""

    def __init__(self, w, takes_bf16):
        super().__init__(w)
        self.takes_bf16 = takes_bf16
        self.dys = []

    def round_input(self, x):
        return x  # (its forward products are f32)

    def matmul_t(self, dy, r0, r1):
        self.dys.append(dy.copy())
        if dy.dtype == np.uint16:
            dy = (dy.astype(np.uint32) << 16).view(np.float32)
        return super().matmul_t(dy, r0, r1)


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_vector_fused_kernel_matches_the_references_and_the_numba_kernel(softcap, level, monkeypatch):
    from ggtrain.kernels import loss

    monkeypatch.setattr(loss, "_vec", vec_module("loss", level))
    h, w, t = _problem(T=30, d=16, V=2501, seed=4)
    mask = np.arange(30) % 5 != 0
    h32, w32 = h.astype(np.float32), w.astype(np.float32)
    l_avx, st_avx = cross_entropy_forward(h32, DenseHead(w32), t, mask, final_softcap=softcap, chunk=700,
                                          with_grad=True)
    _, st_64 = cross_entropy_forward(h, DenseHead(w), t, mask, final_softcap=softcap, chunk=700, with_grad=True)
    assert l_avx == pytest.approx(ref_loss(h, w, t, mask, softcap)[0], rel=1e-5)
    np.testing.assert_allclose(st_avx.dh, st_64.dh, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(loss, "_vec", None)
    l_nb, st_nb = cross_entropy_forward(h32, DenseHead(w32), t, mask, final_softcap=softcap, chunk=700,
                                        with_grad=True)
    assert l_avx == pytest.approx(l_nb, rel=1e-6)
    np.testing.assert_allclose(st_avx.dh, st_nb.dh, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_fused_pass_hands_a_bf16_head_its_gradient_rounded_once(softcap):
    # a head whose backward reads bf16 gets exp(z - M)·z' rounded to nearest even by the same pass,
    # bit for bit what rounding the f32 values would give; the loss does not move
    from ggtrain.kernels import loss

    if loss._vec is None or not loss._vec.BF16_OUT:
        pytest.skip("this CPU (or GGTRAIN_AVX512=0) has no AVX512: the bf16 output is the AVX512 build's")
    h, w, t = _problem(T=13, d=8, V=1000, seed=6)
    h32, w32 = h.astype(np.float32), w.astype(np.float32)
    f32_head, bf16_head = RecordingHead(w32, False), RecordingHead(w32, True)
    l32, st32 = cross_entropy_forward(h32, f32_head, t, np.ones(13), final_softcap=softcap, chunk=300,
                                      with_grad=True)
    l16, st16 = cross_entropy_forward(h32, bf16_head, t, np.ones(13), final_softcap=softcap, chunk=300,
                                      with_grad=True)
    assert [d.dtype for d in bf16_head.dys] == [np.uint16] * 4 and [d.shape[1] for d in bf16_head.dys] == [
        300, 300, 300, 100]
    for d16, d32 in zip(bf16_head.dys, f32_head.dys):
        np.testing.assert_array_equal(d16, _bf16_bits(d32))
    assert l16 == l32
    np.testing.assert_allclose(st16.dh, st32.dh, rtol=2e-2, atol=1e-3)  # bf16's 2^-9 on each e
