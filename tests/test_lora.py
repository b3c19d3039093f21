"""ggtrain.model.lora: config, PEFT init, flat layout, LoRA linear forward (float64 reference) and backward
(central finite differences in float64), dropout semantics."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ggtrain.errors import GGTrainError
from ggtrain.model.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    LoraWeights,
    dropout_mask,
    lora_linear_backward,
    lora_linear_forward,
    target_of,
    target_shapes,
)


def fake_tensors(n_layer=2, d=64, ff=96, kv=32, vocab=0):
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
              "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    t = {f"blk.{i}.{k}.weight": SimpleNamespace(shape=s) for i in range(n_layer) for k, s in shapes.items()}
    if vocab:
        t["output.weight"] = SimpleNamespace(shape=(vocab, d))
    return t


def test_config_make_and_overrides():
    c = LoraConfig.make(r=8)
    assert list(c.targets) == list(DEFAULT_TARGETS)
    assert all(s.rank == 8 and s.alpha == 8 and s.scale == 1.0 for s in c.targets.values())
    c = LoraConfig.make(r=4, alpha=16, dropout=0.1, ranks={"attn_k": 0, "ffn_down": 2, "output": 3},
                        alphas={"attn_q": 2.0})
    assert "attn_k" not in c.targets
    assert c.targets["ffn_down"].rank == 2 and c.targets["ffn_down"].scale == 8.0
    assert c.targets["attn_q"].alpha == 2.0 and c.targets["attn_q"].scale == 0.5
    assert c.targets["output"].rank == 3 and c.targets["output"].dropout == 0.1
    assert LoraConfig.from_dict(c.to_dict()) == c
    with pytest.raises(GGTrainError, match="unknown LoRA target 'attn_qkv'"):
        LoraConfig.make(targets=["attn_qkv"])
    with pytest.raises(GGTrainError, match="dropout"):
        LoraConfig.make(dropout=1.0)
    with pytest.raises(GGTrainError, match="adapts no tensor"):
        LoraConfig.make(ranks={t: 0 for t in DEFAULT_TARGETS})


def test_target_names_and_shapes():
    assert target_of("blk.12.ffn_down.weight") == (12, "ffn_down")
    assert target_of("output.weight") == (None, "output")
    with pytest.raises(GGTrainError, match="token_embd.weight"):
        target_of("token_embd.weight")
    c = LoraConfig.make(r=4, targets=["attn_q", "ffn_down"])
    shapes = target_shapes(fake_tensors(), c, n_layer=2)
    assert shapes == {"blk.0.attn_q.weight": (64, 64), "blk.0.ffn_down.weight": (64, 96),
                      "blk.1.attn_q.weight": (64, 64), "blk.1.ffn_down.weight": (64, 96)}
    with pytest.raises(GGTrainError, match="no tensor 'output.weight'.*ties its output"):
        target_shapes(fake_tensors(), LoraConfig.make(targets=["output"]), n_layer=2, source="m.gguf")
    assert target_shapes(fake_tensors(vocab=100), LoraConfig.make(targets=["output"]), 2) == \
        {"output.weight": (100, 64)}


def test_peft_init_and_determinism():
    c = LoraConfig.make(r=16, alpha=32)
    shapes = target_shapes(fake_tensors(d=256, ff=384, kv=128), c, n_layer=2)
    lw = LoraWeights.init(c, shapes, seed=1)
    assert lw.n_params == sum(16 * (o + i) for o, i in shapes.values())
    for name, e in lw.entries.items():
        o, i = shapes[name]
        assert e.A.shape == (16, i) and e.B.shape == (o, 16) and e.A.dtype == np.float32
        assert np.all(e.B == 0) and e.scale == 2.0
        # torch.nn.init.kaiming_uniform_(a=sqrt(5)), fan_in = in: bound = sqrt(3) * gain / sqrt(fan_in)
        gain = math.sqrt(2.0 / (1 + 5.0))
        bound = math.sqrt(3.0) * gain / math.sqrt(i)
        assert np.abs(e.A).max() <= bound
        assert np.abs(e.A).max() > 0.98 * bound  # really uniform over the whole range
        assert abs(e.A.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/sqrt(3)
    again = LoraWeights.init(c, shapes, seed=1)
    np.testing.assert_array_equal(lw.flat, again.flat)
    other = LoraWeights.init(c, shapes, seed=2)
    assert not np.array_equal(lw.flat, other.flat)
    # one stream per tensor: dropping targets leaves the remaining tensors' init unchanged
    c2 = LoraConfig.make(r=16, alpha=32, targets=["attn_v"])
    lw2 = LoraWeights.init(c2, target_shapes(fake_tensors(d=256, ff=384, kv=128), c2, 2), seed=1)
    np.testing.assert_array_equal(lw2["blk.1.attn_v.weight"].A, lw["blk.1.attn_v.weight"].A)


def test_flat_layout_views():
    c = LoraConfig.make(r=4)
    lw = LoraWeights.init(c, target_shapes(fake_tensors(), c, 2), seed=0)
    e = lw["blk.0.attn_k.weight"]
    e.B[...] = 3.0
    assert np.shares_memory(e.B, lw.flat) and (lw.flat == 3.0).sum() == e.B.size
    g = lw.zeros_like()
    assert g.layout == lw.layout and not np.any(g.flat) and not np.shares_memory(g.flat, lw.flat)
    back = LoraWeights.from_layout_dict(lw.layout_dict(), lw.flat.copy())
    np.testing.assert_array_equal(back["blk.0.attn_k.weight"].B, e.B)
    d = lw.delta("blk.0.attn_k.weight")
    np.testing.assert_allclose(d, e.scale * e.B.astype(np.float64) @ e.A.astype(np.float64))


def make_case(rng, T=7, n_in=24, n_out=20, r=4, dtype=np.float64):
    x = rng.standard_normal((T, n_in)).astype(dtype)
    W = rng.standard_normal((n_out, n_in)).astype(dtype)
    A = rng.standard_normal((r, n_in)).astype(dtype)
    B = rng.standard_normal((n_out, r)).astype(dtype)  # non-zero B: the init's zeros would hide bugs
    return x, W, A, B


def test_forward_against_float64_reference():
    rng = np.random.default_rng(0)
    x, W, A, B = make_case(rng, T=33, n_in=64, n_out=48, r=8, dtype=np.float32)
    scale = 2.5
    base = x @ W.T
    y, cache = lora_linear_forward(x, base.copy(), A, B, scale)
    x64, W64, A64, B64 = (a.astype(np.float64) for a in (x, W, A, B))
    ref = x64 @ W64.T + scale * (x64 @ A64.T) @ B64.T  # = x (W + scale·B·A)ᵀ
    ref_merged = x64 @ (W64 + scale * B64 @ A64).T
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ref, ref_merged, rtol=1e-10, atol=1e-9)
    assert cache.xd is x and cache.mask is None  # no copy of x without dropout
    # base_y is updated in place
    base2 = base.copy()
    y2, _ = lora_linear_forward(x, base2, A, B, scale)
    assert y2 is base2


def loss_of(x, W, A, B, scale, G, mask=None):
    xd = x * mask if mask is not None else x
    return float(np.sum((x @ W.T + scale * (xd @ A.T) @ B.T) * G))


@pytest.mark.parametrize("with_dropout", [False, True])
def test_backward_against_finite_differences(with_dropout):
    rng = np.random.default_rng(1)
    x, W, A, B = make_case(rng)
    scale = 1.7
    G = rng.standard_normal((x.shape[0], W.shape[0]))  # L = sum(y * G): dL/dy = G
    mask = dropout_mask(rng, x.shape, 0.3).astype(np.float64) if with_dropout else None
    _, cache = lora_linear_forward(x, x @ W.T, A, B, scale, mask)
    dA, dB, dx_lora = lora_linear_backward(G, x, A, B, scale, cache)
    dx = dx_lora + G @ W  # the base part, as qmatmul_backward_input gives it

    eps = 1e-6

    def fd(arr):
        g = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            lp = loss_of(x, W, A, B, scale, G, mask)
            arr[idx] = old - eps
            lm = loss_of(x, W, A, B, scale, G, mask)
            arr[idx] = old
            g[idx] = (lp - lm) / (2 * eps)
        return g

    np.testing.assert_allclose(dA, fd(A), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dB, fd(B), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, fd(x), rtol=1e-6, atol=1e-6)
    if with_dropout:
        assert np.all(dx_lora[mask == 0] == 0)


def test_backward_accumulates_into_buffers():
    rng = np.random.default_rng(2)
    x, W, A, B = make_case(rng, dtype=np.float32)
    dy = rng.standard_normal((x.shape[0], W.shape[0])).astype(np.float32)
    _, cache = lora_linear_forward(x, x @ W.T, A, B, 0.5)
    dA1, dB1, _ = lora_linear_backward(dy, x, A, B, 0.5, cache)
    accA, accB = np.ones_like(A), np.full_like(B, 2.0)
    dA, dB, _ = lora_linear_backward(dy, x, A, B, 0.5, cache, dA_out=accA, dB_out=accB)
    assert dA is accA and dB is accB
    np.testing.assert_allclose(accA, 1.0 + dA1, rtol=1e-6)
    np.testing.assert_allclose(accB, 2.0 + dB1, rtol=1e-6)


def test_dropout_semantics():
    rng = np.random.default_rng(3)
    assert dropout_mask(rng, (4, 4), 0.0) is None
    p = 0.25
    m = dropout_mask(rng, (400, 500), p)
    assert m.dtype == np.float32
    assert set(np.unique(m).tolist()) == {0.0, np.float32(1 / (1 - p))}
    assert abs((m == 0).mean() - p) < 0.01
    assert abs(m.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation
    # the base path never sees the mask: with B = 0 output is the base output whatever the mask
    x, W, A, B = make_case(rng, dtype=np.float32)
    y, cache = lora_linear_forward(x, x @ W.T, A, np.zeros_like(B), 1.0, dropout_mask(rng, x.shape, 0.5))
    np.testing.assert_array_equal(y, x @ W.T)
    # and with a mask, the LoRA branch sees exactly x * mask
    mask = dropout_mask(rng, x.shape, 0.5)
    y, cache = lora_linear_forward(x, x @ W.T, A, B, 1.0, mask)
    np.testing.assert_array_equal(cache.xd, x * mask)
    np.testing.assert_allclose(y, x @ W.T + ((x * mask) @ A.T) @ B.T, rtol=1e-5, atol=1e-5)


# -- the LoRA layer: a base weight with its terms ------------------------------------------------
def f32_weight(W):
    from gguf.constants import GGMLQuantizationType

    from ggtrain.model.linear import QWeight

    W = np.ascontiguousarray(W, dtype=np.float32)
    return QWeight(W.view(np.uint8), int(GGMLQuantizationType.F32), W.shape)


def test_lora_linear_serves_every_product_of_the_merged_weight():
    from ggtrain.model.linear import LoraLinear, LoraTerm
    from ggtrain.model.lora import LoraEntry

    rng = np.random.default_rng(5)
    x, W, A1, B1 = make_case(rng, T=9, n_in=32, n_out=48, r=4, dtype=np.float32)
    _, _, A2, B2 = make_case(rng, T=9, n_in=32, n_out=48, r=2, dtype=np.float32)
    _, _, A3, B3 = make_case(rng, T=9, n_in=32, n_out=48, r=3, dtype=np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    fixed = [LoraTerm(A1, B1, 0.7), LoraTerm(A2, B2, 1.5)]
    trained = LoraTerm(A3, B3, 2.0, trainable=True)
    f64 = [a.astype(np.float64) for a in (x, W, A1, B1, A2, B2, A3, B3)]
    x64, W64 = f64[0], f64[1]
    merged = W64 + 0.7 * f64[3] @ f64[2] + 1.5 * f64[5] @ f64[4]  # W' of the fixed terms
    head = LoraLinear(f32_weight(W), fixed)

    # merge, the cross-entropy's chunks and target rows: all the same W'
    np.testing.assert_allclose(head.merged_rows(5, 20), merged[5:20], rtol=1e-5, atol=1e-5)
    assert head.merged_rows(0, 48).dtype == np.float32
    np.testing.assert_allclose(head.matmul(x, 5, 20), x64 @ merged[5:20].T, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal((9, 15)).astype(np.float32)
    np.testing.assert_allclose(head.matmul_t(dy, 5, 20), dy.astype(np.float64) @ merged[5:20], rtol=1e-4, atol=1e-4)
    ids = np.array([3, 7, 7, 40])
    np.testing.assert_allclose(head.rows(ids), merged[ids], rtol=1e-5, atol=1e-5)
    args = (np.zeros(9, np.int64), 0.0, np.zeros(9), np.zeros(9), np.zeros(9))
    assert head.lse_chunk(x, 0, 48, *args) is False  # the terms change the logits: no fused int8 path

    # forward and backward with a trainable term beside the fixed ones
    lin = LoraLinear(f32_weight(W), [*fixed, trained], bias)
    y, cache = lin.forward(x, keep=True)
    full = merged + 2.0 * f64[7] @ f64[6]
    np.testing.assert_allclose(y, x64 @ full.T + bias, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal((9, 48)).astype(np.float32)
    grad = LoraEntry("w", np.zeros_like(A3), np.zeros_like(B3), 6.0, 0.0)
    out = np.full((9, 32), np.nan, np.float32)
    dx = lin.backward(dy, cache, grad, out=out)
    assert dx is out
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(dx, dy64 @ full, rtol=1e-4, atol=1e-4)  # every term's input gradient
    np.testing.assert_allclose(grad.B, 2.0 * dy64.T @ (x64 @ f64[6].T), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad.A, 2.0 * (dy64 @ f64[7]).T @ x64, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache"):
        lin.backward(dy, None, grad)
    with pytest.raises(ValueError, match="at most one trainable"):
        LoraLinear(f32_weight(W), [trained, trained])


def test_lora_term_of_an_entry():
    from ggtrain.model.linear import LoraTerm

    cfg = LoraConfig.make(r=4, alpha=8, dropout=0.2, targets=["attn_q"])
    lw = LoraWeights.init(cfg, target_shapes(fake_tensors(1), cfg, 1))
    e = lw["blk.0.attn_q.weight"]
    fixed, trained = LoraTerm.of(e, 0.5), LoraTerm.of(e, trainable=True)
    assert fixed.scale == 1.0 and fixed.dropout == 0.0 and not fixed.trainable  # inference adapters never drop
    assert trained.scale == 2.0 and trained.dropout == 0.2 and trained.trainable
    assert fixed.A is e.A and trained.B is e.B
