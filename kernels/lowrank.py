"""A LoRA term's two products with its output gradient dy, in one pass over dy.

    dh (T, r)    = s · dy · B          dy (T, out), B (out, r)
    dB (out, r) += s · dyᵀ · h         h (T, r): the forward's x·Aᵀ

Both are thin (r columns): two BLAS calls read dy, the widest array of the LoRA backward, twice at a
few FLOPs a byte. lowrank_avx2 / lowrank_avx512 read it once; elsewhere (and for float64, the tests'
references) numpy's `@` computes the same.
"""

from __future__ import annotations

import numpy as np
from ggtrain.kernels import PARALLEL_MIN, get_num_threads, widest_module

_vec = widest_module("lowrank")
RANK_STEP = 4  # lowrank_util.h's GG_LR_J
ROW_PAD = 16  # floats


def lowrank_dy_products(dy: np.ndarray, B: np.ndarray, h: np.ndarray, scale: float, dh: np.ndarray,
                        dB: np.ndarray) -> None:
    """dh[...] = scale · dy·B (T, r) and dB += scale · dyᵀ·h (out, r); dy (T, out), B (out, r), h (T, r)."""
    T, n = dy.shape
    r = B.shape[1]
    if B.shape != (n, r) or h.shape != (T, r) or dh.shape != (T, r) or dB.shape != (n, r):
        raise ValueError(f"lowrank_dy_products: dy {dy.shape}, B {B.shape}, h {h.shape}, dh {dh.shape}, "
                         f"dB {dB.shape}")
    sf = dy.dtype.type(scale)
    if _vec is None or not dy.dtype == B.dtype == h.dtype == dh.dtype == dB.dtype == np.float32:
        np.multiply(dy @ B, sf, out=dh)
        dB += (dy.T @ h) * sf
        return
    nth = get_num_threads() if dy.size >= PARALLEL_MIN // 8 else 1
    rp = -(-r // RANK_STEP) * RANK_STEP  # the kernel's passes take RANK_STEP rank columns: pad with zeros
    # Bt's and dBt's rows one cache line longer than n: at a power-of-two n their rows (and dy's)
    # would map to the same L1 sets and evict each other
    Bt = np.zeros((rp, n + ROW_PAD), np.float32)[:, :n]
    Bt[:r] = B.T
    hp = h if rp == r else np.pad(h, ((0, 0), (0, rp - r)))
    dhp = np.zeros((nth, T, rp), np.float32)
    dBt = np.zeros((rp, n + ROW_PAD), np.float32)[:, :n]
    _vec.dy_products(np.ascontiguousarray(dy), Bt, np.ascontiguousarray(hp), dhp, dBt, nth)
    np.multiply((dhp.sum(axis=0) if nth > 1 else dhp[0])[:, :r], sf, out=dh)
    dB += dBt[:r].T * sf
