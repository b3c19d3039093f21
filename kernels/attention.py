"""Causal grouped-query attention, forward/backward, flash-attention style (no (H, T, T) tensor).

    s_ij = scale · q_i·k_j ;  if softcap > 0:  s_ij = softcap · tanh(s_ij / softcap)   (Gemma 2)
    p_i  = softmax_j(s_ij) over the visible keys j ;  o_i = Σ_j p_ij v_j

Key j is visible from query i iff lo[i] <= j <= i, where lo[i] is the larger of
- the start of i's segment (a maximal run of equal ids in `segments`, so packed samples never see
  each other), and
- i - n_swa + 1 when n_swa > 0 (llama.cpp's LLAMA_SWA_TYPE_STANDARD: is_masked_swa masks
  p1 - p0 >= n_swa, so a query sees itself and the n_swa - 1 keys before it).
This is ggml_flash_attn_ext's order (scale, then softcap); llama.cpp's non-flash path caps before
kq_scale, which is the same thing for Gemma 2 where kq_scale is 1 and q is pre-scaled.

q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv), Hq a multiple of Hkv: query head h reads kv head
h // (Hq / Hkv). The forward keeps lse (Hq, T), the per-row logsumexp, for the backward, which
recomputes the probabilities from it (FlashAttention-2):
    dv_j += p_ij do_i ;  dp_ij = do_i·v_j ;  ds_ij = p_ij (dp_ij - do_i·o_i) · (1 - (s_ij/softcap)²)
    dq_i += scale Σ_j ds_ij k_j ;  dk_j += scale Σ_i ds_ij q_i

Parallel: forward over heads × query blocks; backward over kv heads × key blocks (each task owns
its dk/dv rows; dq goes to one buffer per thread, summed at the end). Blocks are visited in
zig-zag order so causal work is balanced across threads. Memory: O(T) scratch per task.
Dtype-generic: dots and the softmax run in the input dtype (f32 for training; tests use f64).
"""

import math

import numba
import numpy as np
from numba import njit, prange

BLOCK_Q = 32  # query rows per forward task
BLOCK_K = 32  # key rows per backward task (its dk, dv rows stay in L1/L2)


@njit(cache=True)
def _zigzag(n, idx):
    # idx-th block of 0, n-1, 1, n-2, ...: neighbours in task order carry light and heavy causal work
    half = idx // 2
    return half if idx % 2 == 0 else n - 1 - half


@njit(cache=True)
def visible_range(segments, n_swa):
    """segments (T,) int -> lo (T,) int32: first visible key per query; hi (T,) int32: last query seeing key j."""
    T = segments.shape[0]
    lo = np.empty(T, np.int32)
    hi = np.empty(T, np.int32)
    start = 0
    for i in range(T):
        if i > 0 and segments[i] != segments[i - 1]:
            start = i
        lo[i] = start if n_swa <= 0 else max(start, i - n_swa + 1)
    end = T - 1
    for j in range(T - 1, -1, -1):
        if j < T - 1 and segments[j] != segments[j + 1]:
            end = j
        hi[j] = end if n_swa <= 0 else min(end, j + n_swa - 1)
    return lo, hi


@njit(cache=True, parallel=True, fastmath=True)
def _attn_fwd(q, k, v, lo, scale, softcap, bq, o, lse):
    # q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv), lo (T,) -> o (T, Hq, Dv), lse (Hq, T)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    Dv = v.shape[2]
    G = Hq // Hkv
    ft = q.dtype.type  # keep every scalar in the input dtype so the D-loops vectorise at its width
    nb = (T + bq - 1) // bq
    for task in prange(Hq * nb):
        h = task // nb
        qb = _zigzag(nb, task % nb)
        kh = h // G
        s = np.empty(T, q.dtype)
        acc = np.empty(Dv, q.dtype)
        for i in range(qb * bq, min(T, (qb + 1) * bq)):
            j0 = lo[i]
            m = ft(-np.inf)
            for j in range(j0, i + 1):
                dot = ft(0.0)
                for d in range(D):
                    dot += q[i, h, d] * k[j, kh, d]
                z = dot * scale
                if softcap > 0.0:
                    z = softcap * ft(math.tanh(z / softcap))
                s[j - j0] = z
                m = max(m, z)
            for d in range(Dv):
                acc[d] = 0.0
            den = ft(0.0)
            for j in range(j0, i + 1):
                p = ft(math.exp(s[j - j0] - m))
                den += p
                for d in range(Dv):
                    acc[d] += p * v[j, kh, d]
            inv = ft(1.0) / den
            for d in range(Dv):
                o[i, h, d] = acc[d] * inv
            lse[h, i] = m + ft(math.log(den))


@njit(cache=True, parallel=True, fastmath=True)
def _attn_bwd(q, k, v, do, lse, dsum, lo, hi, scale, softcap, bk, dq_part, dk, dv):
    # dsum (Hq, T) = do_i·o_i; dq_part (n_threads, T, Hq, D) zeroed; dk (T, Hkv, D), dv (T, Hkv, Dv) out
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    Dv = v.shape[2]
    G = Hq // Hkv
    ft = q.dtype.type
    nb = (T + bk - 1) // bk
    for task in prange(Hkv * nb):
        kh = task // nb
        kb = _zigzag(nb, task % nb)
        j0 = kb * bk
        j1 = min(T, j0 + bk)
        dqp = dq_part[numba.get_thread_id()]
        for j in range(j0, j1):
            for d in range(D):
                dk[j, kh, d] = 0.0
            for d in range(Dv):
                dv[j, kh, d] = 0.0
        imax = hi[j1 - 1]  # hi is non-decreasing: the last key of the block is seen longest
        for h in range(kh * G, (kh + 1) * G):
            for i in range(j0, imax + 1):
                ja = max(j0, lo[i])
                jb = min(j1, i + 1)
                L = lse[h, i]
                Di = dsum[h, i]
                for j in range(ja, jb):
                    dot = ft(0.0)
                    for d in range(D):
                        dot += q[i, h, d] * k[j, kh, d]
                    z = dot * scale
                    dz = ft(1.0)
                    if softcap > 0.0:
                        t = ft(math.tanh(z / softcap))
                        z = softcap * t
                        dz = ft(1.0) - t * t
                    p = ft(math.exp(z - L))
                    dp = ft(0.0)
                    for d in range(Dv):
                        dp += do[i, h, d] * v[j, kh, d]
                    ds = p * (dp - Di) * dz * scale
                    for d in range(Dv):
                        dv[j, kh, d] += p * do[i, h, d]
                    for d in range(D):
                        dk[j, kh, d] += ds * q[i, h, d]
                        dqp[i, h, d] += ds * k[j, kh, d]


@njit(cache=True, parallel=True)
def _sum_parts(parts, out):
    # parts (P, N) -> out (N,) = Σ_p parts[p]
    P, N = parts.shape
    for n in prange(N):
        acc = parts[0, n]
        for p in range(1, P):
            acc += parts[p, n]
        out[n] = acc


def _segments(segments: np.ndarray | None, T: int) -> np.ndarray:
    if segments is None:
        return np.zeros(T, dtype=np.int32)
    seg = np.ascontiguousarray(segments, dtype=np.int32).reshape(-1)
    if seg.shape[0] != T:
        raise ValueError(f"attention: segments has {seg.shape[0]} entries for T = {T}")
    return seg


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("attention: q, k, v must be (T, H, head_dim)")
    T, Hq, D = q.shape
    if k.shape[0] != T or v.shape[0] != T or k.shape[2] != D or v.shape[1] != k.shape[1] or Hq % k.shape[1]:
        raise ValueError(f"attention: shapes q {q.shape}, k {k.shape}, v {v.shape} do not fit GQA")


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    scale: float,
    softcap: float = 0.0,
    n_swa: int = 0,
    segments: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, Dv) -> o (T, Hq, Dv), lse (Hq, T).

    scale multiplies q·k; softcap > 0 caps the logits; n_swa > 0 is a sliding window; segments (T,)
    ids keep packed samples apart (None = one sequence)."""
    _check(q, k, v)
    dt = q.dtype
    q, k, v = (np.ascontiguousarray(a, dtype=dt) for a in (q, k, v))
    T, Hq, _ = q.shape
    lo, _ = visible_range(_segments(segments, T), int(n_swa))
    o = np.empty((T, Hq, v.shape[2]), dtype=dt)
    lse = np.empty((Hq, T), dtype=dt)
    _attn_fwd(q, k, v, lo, dt.type(scale), dt.type(softcap), BLOCK_Q, o, lse)
    return o, lse


def attention_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    scale: float,
    softcap: float = 0.0,
    n_swa: int = 0,
    segments: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """do (T, Hq, Dv), q, k, v, o, lse as in/out of the forward -> dq (T, Hq, D), dk (T, Hkv, D), dv (T, Hkv, Dv)."""
    _check(q, k, v)
    dt = q.dtype
    q, k, v, o, do = (np.ascontiguousarray(a, dtype=dt) for a in (q, k, v, o, do))
    T, Hq, D = q.shape
    lo, hi = visible_range(_segments(segments, T), int(n_swa))
    dsum = np.einsum("thd,thd->ht", do, o)  # (Hq, T): do_i·o_i, the softmax backward's row term
    n_threads = numba.get_num_threads()
    dq_part = np.zeros((n_threads, T, Hq, D), dtype=dt)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    _attn_bwd(q, k, v, do, np.ascontiguousarray(lse, dtype=dt), dsum, lo, hi, dt.type(scale), dt.type(softcap),
              BLOCK_K, dq_part, dk, dv)
    if n_threads == 1:
        dq = dq_part[0]
    else:
        dq = np.empty((T, Hq, D), dtype=dt)
        _sum_parts(dq_part.reshape(n_threads, -1), dq.reshape(-1))
    return dq, dk, dv
