"""Attention of new queries over a KV cache (decoding): the forward of kernels/attention.py with an offset.

    q (n, Hq, D) are the queries of positions p0 .. p0+n-1; kc (L, Hkv, D), vc (L, Hkv, Dv) hold
    the keys and values of positions 0 .. p0+n-1 (L >= p0+n). Query i sees keys lo .. p0+i, where
    lo = max(0, p0+i - n_swa + 1) with a sliding window (n_swa > 0), else 0.
    s_ij = scale · q_i·k_j ; softcap > 0: s_ij = softcap · tanh(s_ij / softcap) ; o_i = softmax(s_i)·V

The same masks, order (scale, then cap) and f32 softmax as attention_forward, so the logits of a
step equal a full recompute's within f32 rounding. One task per (query, head); scores of a task
live in a (keys,) scratch row: O(n · L) work, never an (n, L) tensor per head. The dot products
are plain loops over head_dim, which LLVM vectorises (fastmath); one decoding step is Hq tasks, run
on the calling thread unless the context is long.
"""

import math

import numpy as np
from ggtrain.kernels import PARALLEL_MIN
from ggtrain.kernels.vecmath import exp_shift_inplace
from numba import njit, prange


@njit(cache=True, fastmath=True)
def _attend_one(q, kc, vc, i, h, g, p0, n_swa, scale, softcap, s, kbuf, out):
    # query i of head h (kv head g) -> out[i, h]; s, kbuf: scratch rows of >= p0+n entries
    D = q.shape[2]
    Dv = vc.shape[2]
    pos = p0 + i
    lo = 0 if n_swa <= 0 else max(0, pos - n_swa + 1)
    m = np.float32(-np.inf)
    for j in range(lo, pos + 1):
        acc = np.float32(0.0)
        for d in range(D):
            acc += q[i, h, d] * kc[j, g, d]
        z = acc * scale
        if softcap > 0.0:
            z = softcap * np.float32(math.tanh(z / softcap))
        s[j - lo] = z
        m = max(m, z)
    nk = pos + 1 - lo
    den = np.float32(exp_shift_inplace(s[:nk], m, kbuf))
    inv = np.float32(1.0) / den
    for d in range(Dv):
        out[i, h, d] = 0.0
    for j in range(nk):
        p = s[j] * inv
        for d in range(Dv):
            out[i, h, d] += p * vc[lo + j, g, d]


@njit(cache=True)
def _attend_serial(q, kc, vc, p0, n_swa, scale, softcap, out):
    n, Hq = q.shape[0], q.shape[1]
    G = Hq // kc.shape[1]
    s = np.empty(p0 + n, np.float32)
    kbuf = np.empty(p0 + n, np.int32)
    for task in range(n * Hq):
        _attend_one(q, kc, vc, task // Hq, task % Hq, (task % Hq) // G, p0, n_swa, scale, softcap, s, kbuf, out)


@njit(cache=True, parallel=True)
def _attend_parallel(q, kc, vc, p0, n_swa, scale, softcap, out):
    n, Hq = q.shape[0], q.shape[1]
    G = Hq // kc.shape[1]
    L = p0 + n
    for task in prange(n * Hq):
        i = task // Hq
        h = task % Hq
        s = np.empty(L, np.float32)
        kbuf = np.empty(L, np.int32)
        _attend_one(q, kc, vc, i, h, h // G, p0, n_swa, scale, softcap, s, kbuf, out)


def attention_cached(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int, scale: float, softcap: float = 0.0,
                     n_swa: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """q (n, Hq, D) f32 at positions p0.., caches kc (L, Hkv, D), vc (L, Hkv, Dv) f32 holding positions
    0 .. p0+n-1 -> o (n, Hq, Dv) (written into `out` when given)."""
    n, Hq, D = q.shape
    if kc.ndim != 3 or vc.ndim != 3 or kc.shape[2] != D or Hq % kc.shape[1] or vc.shape[1] != kc.shape[1]:
        raise ValueError(f"attention_cached: q {q.shape}, k cache {kc.shape}, v cache {vc.shape} do not fit GQA")
    if p0 < 0 or p0 + n > min(kc.shape[0], vc.shape[0]):
        raise ValueError(f"attention_cached: positions {p0}..{p0 + n - 1} beyond a cache of {kc.shape[0]}")
    if out is None:
        out = np.empty((n, Hq, vc.shape[2]), np.float32)
    # a decoding step over a short context is a few hundred microseconds of work: waking the thread
    # pool (and, on a busy machine, waiting for its threads to be scheduled) would cost more
    run = _attend_parallel if n * Hq * (p0 + n) * D >= PARALLEL_MIN * 4 else _attend_serial
    run(q, kc, vc, int(p0), int(n_swa), np.float32(scale), np.float32(softcap), out)
    return out
