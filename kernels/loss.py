"""Chunked cross-entropy over a large vocabulary, forward/backward, without the (T, vocab) logits.

    logits_tv = h_t · W_v            (W the output head, (vocab, d), usually quantized)
    if final_softcap > 0: logits = final_softcap · tanh(logits / final_softcap)     (Gemma 2)
    loss_t = logsumexp_v(logits_t) - logits_t[target_t]
    loss   = Σ_t mask_t loss_t / Σ_t mask_t                 (mean over trained tokens)

The head is any object with `matmul(x, r0, r1) -> x @ W[r0:r1].T` and `matmul_t(dy, r0, r1) ->
dy @ W[r0:r1]` (and `rows(ids) -> W[ids]` for with_grad); the vocabulary is walked in chunks of
`chunk` rows, so memory is T × chunk. The loop over chunks is Python (each step is one big GEMM
through the head); the per-chunk row work is a parallel Numba kernel. On float32 logits the
exponentials go through vecmath.exp_shift_inplace (vectorised, float32-accurate); float64 keeps
math.exp.

Two ways to get dh, the same numbers:
- forward(with_grad=False) then backward: an online logsumexp per token across chunks (running max
  and sum, in f64), the target logit picked from its chunk; the backward recomputes each chunk's
  logits, dlogits = (softmax - onehot) · mask_t / n_trained through the softcap derivative, and
  dh += dlogits @ W_chunk. Three head GEMMs per chunk in a training step.
- forward(with_grad=True), for training: only the trained rows go through the head, and the
  gradient is accumulated in the same pass, in units of the running max (FlashAttention's rescale):
  acc_t = Σ_v exp(z_tv - M_t) z'_tv W_v, rescaled by exp(M_old - M_new) when the max moves; at the
  end dh_t = w_t (acc_t / S_t - z'_t,target W_target), with W_target from head.rows. Two head
  GEMMs per chunk; the backward just scales the kept dh by dloss.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import numba
import numpy as np
from ggtrain.kernels import get_num_threads, widest_module
from ggtrain.kernels.vecmath import exp_shift_inplace
from numba import njit, prange

_vec = widest_module("loss")  # the forward's and the fused pass's f32 row work in C on AVX2 / AVX512 CPUs

# Vocabulary rows per chunk: the loss holds a (T, CE_CHUNK) f32 block of logits at a time (512 tokens:
# 8 MiB); the one chunk size, which the model and the memory estimate use too. Small enough that a
# training chunk's logits stay in the last-level cache between the head's forward, the row kernel and
# the head's backward (16384 rows, 32 MiB, went through memory: a 1-thread step 3% slower, measured).
CE_CHUNK = 4096


class Head(Protocol):
    """Optionally also lse_chunk(h, r0, r1, targets, softcap, run_max, run_sum, tgt_logit) -> bool: the
    chunk's logits folded into the running stats without writing them (True if it did); and
    takes_bf16 (bool): matmul_t reads dy rounded to bf16 (uint16 bits, as kernels.to_bf16 rounds) too,
    and matmul its input as round_input(x) gives it."""

    shape: tuple[int, int]  # (vocab, d): only read when n_vocab is not given

    def matmul(self, x: np.ndarray, r0: int, r1: int) -> np.ndarray: ...  # (T, d) -> (T, r1-r0)

    def matmul_t(self, dy: np.ndarray, r0: int, r1: int) -> np.ndarray: ...  # (T, r1-r0) -> (T, d)

    def rows(self, ids: np.ndarray) -> np.ndarray: ...  # (k,) -> W[ids] (k, d); only with_grad uses it


@dataclass
class CrossEntropyStats:
    """What the forward keeps for the backward and for perplexity."""

    targets: np.ndarray  # (T,) int64, clipped to [0, vocab) where the mask is off
    weights: np.ndarray  # (T,) f64: mask_t / n_trained (0 everywhere when nothing is trained)
    lse: np.ndarray  # (T,) f64: logsumexp of each token's (capped) logits
    losses: np.ndarray  # (T,) f64: lse - target logit; every token with a valid target, or only the trained ones
    #                     under with_grad (0 elsewhere, like lse)
    n_trained: int  # Σ mask
    n_vocab: int
    final_softcap: float
    chunk: int
    dh: np.ndarray | None = None  # (T, d) d(loss)/dh computed by forward(with_grad=True)


@njit(cache=True, parallel=True, fastmath=True)
def _ce_fwd_chunk(logits, r0, targets, softcap, fast, kbuf, run_max, run_sum, tgt_logit):
    # logits (T, c) this chunk's raw logits, overwritten; run_max, run_sum, tgt_logit (T,) f64 updated
    # fast: f32 logits, exp through vecmath (kbuf (n_threads, >= c) int32 scratch)
    T, c = logits.shape
    for t in prange(T):
        row = logits[t]
        if softcap > 0.0:  # cap in place once, so the target and the sum read the capped value
            for v in range(c):
                row[v] = softcap * math.tanh(np.float64(row[v]) / softcap)
        m = -np.inf
        for v in range(c):
            m = max(m, np.float64(row[v]))
        j = targets[t] - r0
        if 0 <= j < c:
            tgt_logit[t] = row[j]
        if fast:
            s = exp_shift_inplace(row, m, kbuf[numba.get_thread_id()])
        else:
            s = 0.0
            for v in range(c):
                s += math.exp(np.float64(row[v]) - m)
        # merge (m, s) into the running pair
        mo = run_max[t]
        if m > mo:
            run_sum[t] = run_sum[t] * math.exp(mo - m) + s
            run_max[t] = m
        else:
            run_sum[t] += s * math.exp(m - mo)


@njit(cache=True, parallel=True, fastmath=True)
def _ce_bwd_chunk(logits, r0, targets, weights, lse, softcap, dloss, fast, kbuf):
    # logits (T, c) raw -> overwritten in place with dloss/dlogits_raw for this chunk
    T, c = logits.shape
    for t in prange(T):
        row = logits[t]
        w = weights[t] * dloss
        j = targets[t] - r0
        L = lse[t]
        if fast and softcap == 0.0:
            exp_shift_inplace(row, L, kbuf[numba.get_thread_id()])  # softmax: z - lse <= 0
            wf = np.float32(w)
            for v in range(c):
                row[v] *= wf
            if 0 <= j < c:
                row[j] -= wf
            continue
        for v in range(c):
            x = np.float64(row[v])
            if softcap > 0.0:
                th = math.tanh(x / softcap)
                g = math.exp(softcap * th - L)
                if v == j:
                    g -= 1.0
                row[v] = g * w * (1.0 - th * th)
            else:
                g = math.exp(x - L)
                if v == j:
                    g -= 1.0
                row[v] = g * w


@njit(cache=True, parallel=True, fastmath=True)
def _ce_fused_chunk(logits, r0, targets, softcap, fast, kbuf, fbuf, run_max, run_sum, tgt_logit, rescale):
    # logits (n, c) raw -> overwritten with exp(z - M_new)·z' (z' the softcap derivative);
    # run_max, run_sum, tgt_logit (n,) f64 updated; rescale (n,) = exp(M_old - M_new) for the accumulator
    n, c = logits.shape
    for t in prange(n):
        row = logits[t]
        tid = numba.get_thread_id()
        if softcap > 0.0:
            for v in range(c):
                z = softcap * math.tanh(np.float64(row[v]) / softcap)
                row[v] = z
                fbuf[tid, v] = 1.0 - (z / softcap) * (z / softcap)
        m = -np.inf
        for v in range(c):
            m = max(m, np.float64(row[v]))
        j = targets[t] - r0
        if 0 <= j < c:
            tgt_logit[t] = row[j]
        mo = run_max[t]
        M = max(mo, m)
        if fast:
            s = exp_shift_inplace(row, M, kbuf[tid])
        else:
            s = 0.0
            for v in range(c):
                e = math.exp(np.float64(row[v]) - M)
                row[v] = e
                s += e
        if softcap > 0.0:
            for v in range(c):
                row[v] *= fbuf[tid, v]
        sc = math.exp(mo - M)  # 0 on the first chunk (mo = -inf)
        run_sum[t] = run_sum[t] * sc + s
        run_max[t] = M
        rescale[t] = sc


def cross_entropy_forward(
    h: np.ndarray,
    head: Head,
    targets: np.ndarray,
    mask: np.ndarray,
    final_softcap: float = 0.0,
    chunk: int = CE_CHUNK,
    n_vocab: int | None = None,
    with_grad: bool = False,
) -> tuple[float, CrossEntropyStats]:
    """h (T, d), targets (T,) int, mask (T,) bool/float -> (mean loss over trained tokens, stats).

    n_vocab: rows of the head (default head.shape[0]). Tokens with mask 0 may carry any target (e.g. -1). With nothing
    trained the loss is 0.0 and the backward gives zeros. with_grad: also compute dh in this pass
    (training; needs head.rows), over the trained rows only — a third fewer head GEMMs."""
    T = h.shape[0]
    if n_vocab is None:
        n_vocab = int(head.shape[0])
    targets = np.asarray(targets).reshape(-1).astype(np.int64)
    mask = np.asarray(mask).reshape(-1).astype(np.float64)
    if targets.shape[0] != T or mask.shape[0] != T:
        raise ValueError(f"cross_entropy: h has {T} rows but targets {targets.shape}, mask {mask.shape}")
    valid = (targets >= 0) & (targets < n_vocab)
    if np.any((mask != 0) & ~valid):
        bad = targets[(mask != 0) & ~valid][0]
        raise ValueError(f"cross_entropy: trained target id {bad} outside the vocabulary [0, {n_vocab})")
    n_trained = int(np.count_nonzero(mask))
    total_w = float(mask.sum())
    tgt = np.where(valid, targets, 0)
    weights = mask / total_w if total_w > 0 else np.zeros(T)
    if with_grad:
        loss, lse, losses, dh = _fused(h, head, tgt, weights, n_vocab, float(final_softcap), int(chunk))
        return loss, CrossEntropyStats(tgt, weights, lse, losses, n_trained, int(n_vocab), float(final_softcap),
                                       int(chunk), dh)
    run_max = np.full(T, -np.inf)
    run_sum = np.zeros(T)
    tgt_logit = np.zeros(T)
    kbuf = np.empty((numba.get_num_threads(), min(chunk, n_vocab)), dtype=np.int32)
    fused = getattr(head, "lse_chunk", None)  # a head that folds its logits into the stats itself (int8)
    h_rows = np.ascontiguousarray(h, dtype=np.float32) if fused is not None else h
    for r0 in range(0, n_vocab, chunk):  # one GEMM per chunk through the (quantized) head
        r1 = min(n_vocab, r0 + chunk)
        if fused is not None and fused(h_rows, r0, r1, tgt, float(final_softcap), run_max, run_sum, tgt_logit):
            continue
        logits = np.ascontiguousarray(head.matmul(h, r0, r1))
        if _vec is not None and logits.dtype == np.float32:
            _vec.ce_forward_chunk(logits, r0, tgt, float(final_softcap), run_max, run_sum, tgt_logit,
                                     get_num_threads())
        else:
            _ce_fwd_chunk(logits, r0, tgt, float(final_softcap), logits.dtype == np.float32, kbuf, run_max,
                          run_sum, tgt_logit)
    lse = run_max + np.log(run_sum)
    losses = np.where(valid, lse - tgt_logit, 0.0)
    loss = float(np.dot(weights, losses))
    return loss, CrossEntropyStats(tgt, weights, lse, losses, n_trained, int(n_vocab), float(final_softcap), int(chunk))


def _fused(h: np.ndarray, head: Head, tgt: np.ndarray, weights: np.ndarray, n_vocab: int, softcap: float,
           chunk: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Loss, lse (T,), losses (T,) and dh (T, d) in one pass over the vocabulary, trained rows only."""
    T = h.shape[0]
    lse, losses = np.zeros(T), np.zeros(T)
    dh = np.zeros(h.shape, dtype=h.dtype)
    rows = np.flatnonzero(weights)
    if rows.shape[0] == 0:
        return 0.0, lse, losses, dh
    hs = np.ascontiguousarray(h[rows]) if rows.shape[0] < T else np.ascontiguousarray(h)
    hx = head.round_input(hs) if getattr(head, "takes_bf16", False) else hs  # rounded once, not per chunk
    n = rows.shape[0]
    tg = tgt[rows]
    run_max, run_sum, tgt_logit, rescale = np.full(n, -np.inf), np.zeros(n), np.zeros(n), np.zeros(n)
    c = min(chunk, n_vocab)
    native = _vec is not None and h.dtype == np.float32
    if native:  # a head whose backward rounds its input to bf16 gets e rounded here, in the same pass
        bf16 = getattr(head, "takes_bf16", False) and _vec.BF16_OUT
        e16 = np.empty(n * c, dtype=np.uint16) if bf16 else None
    else:
        kbuf = np.empty((numba.get_num_threads(), c), dtype=np.int32)
        fbuf = np.empty((numba.get_num_threads(), c), dtype=h.dtype)
    acc = np.zeros((n, h.shape[1]), dtype=h.dtype)  # Σ exp(z - M)·z'·W in units of the running max M
    for r0 in range(0, n_vocab, chunk):
        r1 = min(n_vocab, r0 + chunk)
        e = np.ascontiguousarray(head.matmul(hx, r0, r1))
        if native:
            out16 = e16[:e.size].reshape(e.shape) if e16 is not None else None
            _vec.ce_fused_chunk(e, r0, tg, softcap, run_max, run_sum, tgt_logit, rescale, out16, get_num_threads())
            e = e if out16 is None else out16
        else:
            _ce_fused_chunk(e, r0, tg, softcap, e.dtype == np.float32, kbuf, fbuf, run_max, run_sum, tgt_logit,
                            rescale)
        if (rescale != 1.0).any():  # the running max moved for some row (exp(0) is exactly 1 elsewhere)
            acc *= rescale.astype(h.dtype)[:, None]
        acc += head.matmul_t(e, r0, r1)
    lse_r = run_max + np.log(run_sum)
    loss_r = lse_r - tgt_logit
    dz_t = 1.0 - (tgt_logit / softcap) ** 2 if softcap > 0 else np.ones(n)
    w = weights[rows]
    g = acc * (w / run_sum)[:, None].astype(h.dtype) - head.rows(tg) * (w * dz_t)[:, None].astype(h.dtype)
    dh[rows] = g
    lse[rows], losses[rows] = lse_r, loss_r
    return float(np.dot(w, loss_r)), lse, losses, dh


def cross_entropy_backward(h: np.ndarray, head: Head, stats: CrossEntropyStats, dloss: float = 1.0) -> np.ndarray:
    """h (T, d) as in the forward, stats from it -> dh (T, d) (same dtype as h) of dloss · loss."""
    if stats.dh is not None:  # forward(with_grad=True) already has it
        return (stats.dh * dloss).astype(h.dtype, copy=False)
    dh = np.zeros(h.shape, dtype=h.dtype)
    if stats.n_trained == 0:
        return dh
    rows = np.flatnonzero(stats.weights)  # only trained tokens carry gradient: skip the others' GEMM rows
    hs = np.ascontiguousarray(h[rows]) if rows.shape[0] < h.shape[0] else h
    tg, wt, ls = stats.targets[rows], stats.weights[rows], stats.lse[rows]
    acc = np.zeros((rows.shape[0], h.shape[1]), dtype=h.dtype)
    kbuf = np.empty((numba.get_num_threads(), min(stats.chunk, stats.n_vocab)), dtype=np.int32)
    for r0 in range(0, stats.n_vocab, stats.chunk):
        r1 = min(stats.n_vocab, r0 + stats.chunk)
        g = np.ascontiguousarray(head.matmul(hs, r0, r1))
        _ce_bwd_chunk(g, r0, tg, wt, ls, stats.final_softcap, float(dloss), g.dtype == np.float32, kbuf)
        acc += head.matmul_t(g, r0, r1)
    dh[rows] = acc
    return dh
