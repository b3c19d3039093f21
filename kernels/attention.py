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
its dk/dv rows; dq goes to one buffer per thread, summed at the end, at most DQ_BUFFERS_BYTES of
them: past that the backward runs on fewer threads). Blocks are visited in
zig-zag order so causal work is balanced across threads. Inside a task the products are GEMMs on
head-major (H, T, D) copies through Numba's np.dot, i.e. scipy's BLAS: this module makes that BLAS
single-threaded when it loads (ggtrain.threads.set_threads keeps it so) so it does not oversubscribe
the prange threads. Scratch per task is
one (block, span) score tile (span <= T): O(T) memory per task, never (H, T, T).
Dtype-generic: f32 for training (f32 GEMMs, softmax in f32 with vecmath's vectorised exp, lse kept
in f32); f64 (math.exp) in the tests.
"""

import math

import numba
import numpy as np
from ggtrain.kernels import get_num_threads, widest_module
from ggtrain.kernels.blas import set_kernel_blas_single_threaded
from ggtrain.kernels.vecmath import exp_shift_inplace
from numba import njit, prange

# f32 forward and backward in C on AVX2 / AVX512 CPUs (own register-blocked products: on AVX512 twice
# what BLAS's AVX2 kernels give for the forward; no BLAS call per task and no dq buffers either way)
_vec = widest_module("attention")
# Its backward recomputes the scores and dp (7 products where the Numba kernel's BLAS calls do 5): with
# AVX512's 16 lanes that still wins (T 512, Gemma 3 shapes, one thread: 7.6 ms against 10.3), with
# AVX2's 8 it does not (14.0 ms): there the backward stays the Numba kernel.
_vec_backward = _vec if _vec is not None and _vec.VECTOR_FLOATS >= 16 else None
# The Numba kernels below call scipy's BLAS (np.dot) inside their prange: one thread each.
set_kernel_blas_single_threaded()

BLOCK_Q = 64  # query rows per forward task
BLOCK_K = 64  # key rows per backward task (it owns their dk, dv rows)
DQ_BUFFERS_BYTES = 512 << 20  # cap on the backward's per-thread dq buffers (n_threads × Hq × T × D)


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
def _attn_fwd(qh, kh, vh, lo, scale, softcap, bq, fast, oh, lse):
    # head-major: qh (Hq, T, D), kh (Hkv, T, D), vh (Hkv, T, Dv), lo (T,) -> oh (Hq, T, Dv), lse (Hq, T)
    # fast: f32 data, exponentials through vecmath
    Hq, T, _ = qh.shape
    G = Hq // kh.shape[0]
    ft = qh.dtype.type  # every scalar in the input dtype
    nb = (T + bq - 1) // bq
    for task in prange(Hq * nb):
        h = task // nb
        qb = _zigzag(nb, task % nb)
        g = h // G
        i0 = qb * bq
        i1 = min(T, i0 + bq)
        jlo = lo[i0]  # lo is non-decreasing: the block's first row sees furthest back
        kbuf = np.empty(i1 - jlo, np.int32)
        # S = Q_blk K_span^T through BLAS (a few MB at most), then the masked softmax in place
        S = np.dot(qh[h, i0:i1], kh[g, jlo:i1].T)  # (rows, keys)
        nk = i1 - jlo
        for r in range(i1 - i0):
            i = i0 + r
            a = lo[i] - jlo
            b = i - jlo + 1  # visible columns [a, b)
            m = ft(-np.inf)
            for c in range(a, b):
                z = S[r, c] * scale
                if softcap > 0.0:
                    z = softcap * ft(math.tanh(z / softcap))
                S[r, c] = z
                m = max(m, z)
            if fast:
                den = ft(exp_shift_inplace(S[r, a:b], m, kbuf))
            else:
                den = ft(0.0)
                for c in range(a, b):
                    p = ft(math.exp(S[r, c] - m))
                    S[r, c] = p
                    den += p
            inv = ft(1.0) / den
            for c in range(a, b):
                S[r, c] *= inv
            for c in range(a):
                S[r, c] = 0.0
            for c in range(b, nk):
                S[r, c] = 0.0
            lse[h, i] = m + ft(math.log(den))
        oh[h, i0:i1] = np.dot(S, vh[g, jlo:i1])


@njit(cache=True, parallel=True, fastmath=True)
def _attn_bwd(qh, kh, vh, doh, lse, dsum, lo, hi, scale, softcap, bk, fast, dq_part, dkh, dvh):
    # head-major inputs as in the forward; doh (Hq, T, Dv); dsum (Hq, T) = do_i·o_i;
    # dq_part (n_threads, Hq, T, D) zeroed; dkh (Hkv, T, D), dvh (Hkv, T, Dv) out
    Hq, T, D = qh.shape
    Hkv = kh.shape[0]
    G = Hq // Hkv
    ft = qh.dtype.type
    nb = (T + bk - 1) // bk
    for task in prange(Hkv * nb):
        g = task // nb
        kb = _zigzag(nb, task % nb)
        j0 = kb * bk
        j1 = min(T, j0 + bk)
        i1 = hi[j1 - 1] + 1  # hi is non-decreasing: queries j0 .. i1-1 see some key of the block
        dqp = dq_part[numba.get_thread_id()]
        Kb = kh[g, j0:j1]
        Vb = vh[g, j0:j1]
        dKb = np.zeros((j1 - j0, D), qh.dtype)
        dVb = np.zeros((j1 - j0, vh.shape[2]), qh.dtype)
        kbuf = np.empty(j1 - j0, np.int32)
        for h in range(g * G, (g + 1) * G):
            Qs = qh[h, j0:i1]
            dOs = doh[h, j0:i1]
            P = np.dot(Qs, Kb.T)  # (queries, keys): scores, then probabilities
            dS = np.dot(dOs, Vb.T)  # (queries, keys): dp, then the score gradient
            for r in range(i1 - j0):
                i = j0 + r
                a = max(j0, lo[i]) - j0
                b = min(j1, i + 1) - j0  # visible columns [a, b)
                L = lse[h, i]
                Di = dsum[h, i]
                for c in range(a):
                    P[r, c] = 0.0
                    dS[r, c] = 0.0
                for c in range(max(a, b), j1 - j0):
                    P[r, c] = 0.0
                    dS[r, c] = 0.0
                for c in range(a, b):
                    z = P[r, c] * scale
                    dz = ft(1.0)
                    if softcap > 0.0:
                        t = ft(math.tanh(z / softcap))
                        z = softcap * t
                        dz = ft(1.0) - t * t
                    P[r, c] = z
                    dS[r, c] = (dS[r, c] - Di) * dz * scale  # times p below
                if fast:
                    exp_shift_inplace(P[r, a:b], L, kbuf)  # z - lse <= 0
                else:
                    for c in range(a, b):
                        P[r, c] = ft(math.exp(P[r, c] - L))
                for c in range(a, b):
                    dS[r, c] *= P[r, c]
            dVb += np.dot(P.T, dOs)
            dKb += np.dot(dS.T, Qs)
            dqp[h, j0:i1] += np.dot(dS, Kb)
        dkh[g, j0:j1] = dKb
        dvh[g, j0:j1] = dVb


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


def _heads(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    # (T, H, D) -> head-major (H, T, D) contiguous, so each head's rows are one BLAS operand
    return np.ascontiguousarray(np.asarray(a, dtype=dt).transpose(1, 0, 2))


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
    T, Hq, _ = q.shape
    lo, _ = visible_range(_segments(segments, T), int(n_swa))
    if _vec is not None and dt == np.float32 and v.shape[2] % 16 == 0:
        o = np.empty((T, Hq, v.shape[2]), dtype=dt)
        lse = np.empty((Hq, T), dtype=dt)
        _vec.attention_forward(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), lo,
                               float(scale), float(softcap), o, lse, get_num_threads())
        return o, lse
    oh = np.empty((Hq, T, v.shape[2]), dtype=dt)
    lse = np.empty((Hq, T), dtype=dt)
    _attn_fwd(_heads(q, dt), _heads(k, dt), _heads(v, dt), lo, dt.type(scale), dt.type(softcap), BLOCK_Q,
              dt == np.float32, oh, lse)
    return oh.transpose(1, 0, 2).copy(), lse


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
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    lo, hi = visible_range(_segments(segments, T), int(n_swa))
    if _vec_backward is not None and dt == np.float32:  # no dq buffers: its dq pass owns the rows it writes
        dq = np.empty((T, Hq, D), dtype=dt)
        dk = np.empty((T, Hkv, D), dtype=dt)
        dv = np.empty((T, Hkv, v.shape[2]), dtype=dt)
        _vec_backward.attention_backward(*(np.ascontiguousarray(a, dtype=dt) for a in (do, q, k, v, o)),
                                         np.ascontiguousarray(lse, dtype=dt), lo, hi, float(scale), float(softcap),
                                         dq, dk, dv, get_num_threads())
        return dq, dk, dv
    doh = _heads(do, dt)
    dsum = np.einsum("htd,thd->ht", doh, np.asarray(o, dtype=dt))  # (Hq, T): do_i·o_i, the softmax-backward row term
    # one dq buffer per thread; on many cores cap their memory by running this kernel on fewer threads
    all_threads = numba.get_num_threads()
    n_threads = max(1, min(all_threads, DQ_BUFFERS_BYTES // (Hq * T * D * dt.itemsize)))
    dq_part = np.zeros((n_threads, Hq, T, D), dtype=dt)
    dkh = np.empty((Hkv, T, D), dtype=dt)
    dvh = np.empty((Hkv, T, v.shape[2]), dtype=dt)
    numba.set_num_threads(n_threads)
    try:
        _attn_bwd(_heads(q, dt), _heads(k, dt), _heads(v, dt), doh, np.ascontiguousarray(lse, dtype=dt), dsum, lo,
                  hi, dt.type(scale), dt.type(softcap), BLOCK_K, dt == np.float32, dq_part, dkh, dvh)
    finally:
        numba.set_num_threads(all_threads)
    if n_threads == 1:
        dqh = dq_part[0]
    else:
        dqh = np.empty((Hq, T, D), dtype=dt)
        _sum_parts(dq_part.reshape(n_threads, -1), dqh.reshape(-1))
    return dqh.transpose(1, 0, 2).copy(), dkh.transpose(1, 0, 2).copy(), dvh.transpose(1, 0, 2).copy()
