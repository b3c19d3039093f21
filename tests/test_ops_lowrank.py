"""kernels.lowrank: a LoRA term's dy·B and dyᵀ·h in one pass over dy, at every vector width this CPU
has, against float64 references (ragged columns, odd token counts, ranks across the 8-column passes,
threads splitting the columns), and the LoRA backward that calls it against finite differences
(tests/test_lora.py)."""

import numpy as np
import pytest
from ggtrain.kernels import lowrank, variants
from vecmodules import vec_module


def _case(rng, T, n, r):
    dy = rng.standard_normal((T, n)).astype(np.float32)
    B = rng.standard_normal((n, r)).astype(np.float32)
    h = rng.standard_normal((T, r)).astype(np.float32)
    return dy, B, h


@pytest.mark.parametrize("level", variants.VECTOR_LEVELS)
@pytest.mark.parametrize("T,n,r", [(1, 5, 1), (7, 33, 3), (64, 256, 8), (33, 1000, 12), (512, 640, 16),
                                   (300, 2048, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_dy_products_match_float64(level, T, n, r, threads, monkeypatch):
    monkeypatch.setattr(lowrank, "_vec", vec_module("lowrank", level))
    monkeypatch.setattr(lowrank, "PARALLEL_MIN", 0 if threads > 1 else 1 << 40)
    monkeypatch.setattr(lowrank, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(T * n + r)
    dy, B, h = _case(rng, T, n, r)
    dh = np.full((T, r), np.nan, np.float32)  # written, not added to
    dB0 = rng.standard_normal((n, r)).astype(np.float32)
    dB = dB0.copy()
    lowrank.lowrank_dy_products(dy, B, h, 0.75, dh, dB)
    dy64, B64, h64 = (a.astype(np.float64) for a in (dy, B, h))
    ref_dh = 0.75 * dy64 @ B64
    ref_dB = dB0 + 0.75 * dy64.T @ h64
    # f32 sums of n (dh) or T (dB) products of unit normals: error ~ eps · sqrt(terms) of each sum's scale
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-5 * np.sqrt(n))
    np.testing.assert_allclose(dB, ref_dB, rtol=1e-5, atol=1e-5 * np.sqrt(T))


def test_numpy_fallback_and_views_give_the_same(monkeypatch):
    """float64 goes through numpy; a strided dh (a column range of a wider array, as the LoRA backward
    passes it) is written in place."""
    rng = np.random.default_rng(5)
    dy, B, h = _case(rng, 40, 96, 4)
    wide = np.zeros((40, 10), np.float32)
    dB = np.zeros((96, 4), np.float32)
    lowrank.lowrank_dy_products(dy, B, h, 2.0, wide[:, 3:7], dB)
    d64 = np.zeros((40, 4))
    dB64 = np.zeros((96, 4))
    lowrank.lowrank_dy_products(dy.astype(np.float64), B.astype(np.float64), h.astype(np.float64), 2.0, d64, dB64)
    np.testing.assert_allclose(wide[:, 3:7], d64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dB, dB64, rtol=1e-5, atol=1e-4)
    assert not wide[:, :3].any() and not wide[:, 7:].any()
    with pytest.raises(ValueError, match="lowrank_dy_products"):
        lowrank.lowrank_dy_products(dy, B[:5], h, 1.0, wide[:, 3:7], dB)
