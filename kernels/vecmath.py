"""A vectorisable float32 exp for the softmax-shaped loops (cross-entropy over 262k logits, attention).

math.exp inside a Numba loop is a scalar libm call (no SVML here), ~10 ns per element; the loss
takes 2 × T × vocab of them per step. This is Cephes' expf (range reduction by ln 2, degree-5
minimax polynomial, then 2^k put into the exponent bits), written as plain loops over a row so
LLVM vectorises them: relative error ~1e-7, i.e. float32 rounding. Only used on float32 data;
the float64 paths (the tests' finite differences) keep math.exp.
"""

import numpy as np
from numba import njit

_LOG2E = np.float32(1.44269504088896341)
_C1 = np.float32(0.693359375)  # ln 2 split in two so k·C1 is exact
_C2 = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_LO = np.float32(-86.0)  # exp(-86) ≈ 4e-38: smaller inputs (and -inf) give that, not 0; 2^k stays a normal float


@njit(cache=True, fastmath=True)
def exp_shift_inplace(x, m, kbuf):
    """x (n,) f32 -> x[i] = exp(x[i] - m) in place, for x[i] - m <= 0; kbuf (>= n,) int32 scratch.
    Returns Σ x[i] after the update, accumulated in f64."""
    n = x.shape[0]
    mf = np.float32(m)
    for i in range(n):
        t = max(x[i] - mf, _LO)
        k = np.floor(t * _LOG2E + np.float32(0.5))
        r = t - k * _C1 - k * _C2
        p = _P0
        p = p * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        x[i] = p * r * r + r + np.float32(1.0)
        kbuf[i] = np.int32(k) << 23
    bits = x.view(np.int32)
    for i in range(n):
        bits[i] += kbuf[i]  # multiply by 2^k through the exponent field
    s = 0.0
    for i in range(n):
        s += np.float64(x[i])
    return s
