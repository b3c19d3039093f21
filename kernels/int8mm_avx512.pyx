# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""int8 matmul Y = X·Wᵀ over GGUF weights on AVX512-VNNI (the math is in int8_util.h).

Built only for x86 with -mavx512f/bw/vl/vnni; ggtrain.kernels imports it only on a CPU that has
them. Work, in one parallel region: the tokens are quantized once (a prange over tokens); then
each work item is a panel of up to PANEL_ROWS weight rows, which its thread rewrites into int8 form in
its own buffers and multiplies with every token, K_BLOCK columns at a time: items write disjoint
columns of Y (or fold them into per-thread cross-entropy stats), dynamic hand-out, no barriers.
"""

import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "loss_util.h" nogil:
    void gg_ce_row(float *row, int64_t c, float softcap, double *m, double *s)
    void gg_lse_merge(double *mx, double *sm, double m, double s)

cdef extern from "quant_layout.h" nogil:
    enum:
        GG_TYPE_Q4_0, GG_TYPE_Q4_1, GG_TYPE_Q5_0, GG_TYPE_Q5_1, GG_TYPE_Q8_0, GG_TYPE_Q2_K, GG_TYPE_Q3_K
        GG_TYPE_Q4_K, GG_TYPE_Q5_K, GG_TYPE_Q6_K, GG_TYPE_IQ4_NL, GG_TYPE_IQ4_XS

cdef extern from "int8_util.h" nogil:
    int gg_i8_weight_row(int qtype, const uint8_t *b, int64_t nb, int8_t *q, float *s, float *o)
    void i8_group_sums(const int8_t *q, int32_t *c, int64_t n, int G)
    void gg_i8_quantize_token(const float *x, int64_t n, int G, int lane, uint8_t *u, float *xs,
                              float *xsum)
    void gg_i8_zero_token(int64_t n, int G, int lane, uint8_t *u, float *xs, float *xsum)
    void gg_i8_store_tile(const float *tile, int J, int rows, int64_t tokens, float *y, int64_t ldy)
    void gg_i8_tile(int G, int J, int64_t nk, int64_t qstride, int64_t gstride, const int8_t *q,
                    const float *s, const float *o, const int32_t *c, const uint8_t *u, const float *xs,
                    const float *xsum, int64_t ustride, int64_t fstride, int accumulate, float *out)
    int I8_R

# Weight rows a thread converts at a time: 64 rows of 2048 int8 = 128 KiB, L2-resident while every
# token passes over them.
DEF PANEL_ROWS = 64
# Columns a micro-tile runs over before the next row tile takes its turn: 32 tokens × 512 = 16 KiB
# of activations stay in L1 across the panel's row tiles (all of a 2048-wide row would not).
DEF K_BLOCK = 512


def group_size(int qtype):
    """Elements per scale group of qtype's int8 form (16 or 32); 0 if qtype has none."""
    if qtype == GG_TYPE_Q2_K or qtype == GG_TYPE_Q3_K or qtype == GG_TYPE_Q6_K:  # a scale per 16
        return 16
    if qtype in (GG_TYPE_Q4_0, GG_TYPE_Q4_1, GG_TYPE_Q5_0, GG_TYPE_Q5_1, GG_TYPE_Q8_0, GG_TYPE_Q4_K,
                 GG_TYPE_Q5_K, GG_TYPE_IQ4_NL, GG_TYPE_IQ4_XS):
        return 32
    return 0


def has_offset(int qtype):
    """Whether qtype's int8 form has an offset o (w = s·q + o), i.e. a min per group."""
    return qtype in (GG_TYPE_Q4_1, GG_TYPE_Q5_1, GG_TYPE_Q2_K, GG_TYPE_Q4_K, GG_TYPE_Q5_K)


def weight_rows(int qtype, int block, int type_size, const uint8_t[:, :] w):
    """The int8 form of w's rows: (q int8 (R, n), s f32 (R, n/G), o f32 (R, n/G), c int32 (R, n/G));
    w = s·q + o per group of G. For tests: qmatmul never materializes it."""
    cdef int G = group_size(qtype)
    cdef Py_ssize_t R = w.shape[0], nb = w.shape[1] // type_size, n = nb * block, i
    q = np.zeros((R, n), dtype=np.int8)
    s = np.zeros((R, n // G), dtype=np.float32)
    o = np.zeros((R, n // G), dtype=np.float32)
    c = np.zeros((R, n // G), dtype=np.int32)
    cdef int8_t[:, ::1] qv = q
    cdef float[:, ::1] sv = s
    cdef float[:, ::1] ov = o
    cdef int32_t[:, ::1] cv = c
    for i in range(R):
        if gg_i8_weight_row(qtype, &w[i, 0], nb, &qv[i, 0], &sv[i, 0], &ov[i, 0]) != 0:
            raise ValueError(f"type {qtype} has no int8 form")
        i8_group_sums(&qv[i, 0], &cv[i, 0], n, G)
    return q, s, o, c


cdef struct LseOut:
    # instead of writing Y: cross-entropy row stats of Y's rows as vocabulary rows vocab_r0.. (see
    # qmatmul_int8_lse); stats: per thread (running max, Σexp) of every token, 2·T doubles
    const int64_t *targets
    int64_t vocab_r0
    float softcap
    double *stats
    double *tgt_logit


cdef int i8_forward(int qtype, int G, bint off, int block, int type_size, const uint8_t *w,
                    Py_ssize_t wstride, Py_ssize_t R, Py_ssize_t n, const float *x, Py_ssize_t ldx,
                    Py_ssize_t T, float *y, Py_ssize_t ldy, int nth, LseOut *lse) noexcept nogil:
    """y (T, R) = x · Wᵀ; with lse given, y is not written: each token's logits over W's rows are
    folded into lse's per-thread stats (and its target logit picked) panel by panel."""
    cdef Py_ssize_t ng = n // G, nb = n // block, ntg = (T + 15) // 16
    cdef Py_ssize_t ustride = n * 16, fstride = ng * 16
    cdef uint8_t *u = <uint8_t *>aligned_alloc(64, ntg * ustride + 64)
    cdef float *xs = <float *>aligned_alloc(64, (ntg * fstride * 4 + 64) // 64 * 64)
    cdef float *xsum = <float *>aligned_alloc(64, (ntg * fstride * 4 + 64) // 64 * 64)
    # per thread: q (PANEL_ROWS, n) int8, s/o (PANEL_ROWS, ng) f32, c (PANEL_ROWS, ng) int32, the
    # panel's micro-tile sums for 32 tokens, acc (PANEL_ROWS / I8_R, I8_R, 32) f32, and the same
    # token-major, pbuf (32, PANEL_ROWS) f32 (copied to y a row at a time)
    cdef Py_ssize_t per_thread = (PANEL_ROWS * n + 3 * PANEL_ROWS * ng * 4 + 2 * 32 * PANEL_ROWS * 4
                                  + 256) // 64 * 64
    cdef uint8_t *bufs = <uint8_t *>aligned_alloc(64, (nth * per_thread + 64) // 64 * 64)
    if u == NULL or xs == NULL or xsum == NULL or bufs == NULL:
        free(u)
        free(xs)
        free(xsum)
        free(bufs)
        return -1
    cdef Py_ssize_t t, item, r0, rows, i, tg, rt, j, J, k0, nk, tq, tgq, lane
    # panels of up to PANEL_ROWS rows, at least 4 per thread when R allows (a 256-row k/v projection
    # in 4 panels left a thread idle at the end)
    cdef Py_ssize_t prows = min(PANEL_ROWS, max(I8_R, ((R + 4 * nth - 1) // (4 * nth) + I8_R - 1) // I8_R * I8_R))
    cdef Py_ssize_t n_items = (R + prows - 1) // prows
    cdef int8_t *q
    cdef float *s
    cdef float *o
    cdef int32_t *c
    cdef float *tile
    cdef float *pbuf
    cdef int tid
    cdef double m, ssum
    cdef float *prow
    with parallel(num_threads=nth):
        q = <int8_t *>(bufs + threadid() * per_thread)
        s = <float *>(<uint8_t *>q + PANEL_ROWS * n)
        o = s + PANEL_ROWS * ng
        c = <int32_t *>(o + PANEL_ROWS * ng)
        tile = <float *>(c + PANEL_ROWS * ng)
        pbuf = tile + PANEL_ROWS * 32
        tid = threadid()
        # token group tgq (one thread writes all 16 lanes of its cache lines): token tq -> lane
        # tq % 16 of u, xs, xsum; padding tokens quantize to 0
        for tgq in prange(ntg, schedule="static"):
            for lane in range(16):
                tq = tgq * 16 + lane
                if tq < T:
                    gg_i8_quantize_token(x + tq * ldx, n, G, lane, u + tgq * ustride, xs + tgq * fstride + lane,
                                         xsum + tgq * fstride + lane)
                else:
                    gg_i8_zero_token(n, G, lane, u + tgq * ustride, xs + tgq * fstride + lane,
                                     xsum + tgq * fstride + lane)
        # (each prange ends in a barrier: every token is quantized before any panel starts)
        for item in prange(n_items, schedule="dynamic", chunksize=1):
            r0 = item * prows
            rows = min(prows, R - r0)
            for i in range(rows):
                gg_i8_weight_row(qtype, w + (r0 + i) * wstride, nb, q + i * n, s + i * ng, o + i * ng)
                i8_group_sums(q + i * n, c + i * ng, n, G)
            i = rows
            while i % I8_R:  # pad to whole micro-tiles with zero rows (never written out)
                memset(q + i * n, 0, n)
                memset(s + i * ng, 0, ng * 4)
                memset(o + i * ng, 0, ng * 4)
                memset(c + i * ng, 0, ng * 4)
                i = i + 1
            tg = 0
            while tg < ntg:
                J = 2 if tg + 1 < ntg else 1
                k0 = 0
                while k0 < n:  # K blocks outside, row tiles inside: the block's activations stay in L1
                    nk = min(K_BLOCK, n - k0)
                    rt = 0
                    while rt < rows:
                        gg_i8_tile(G, J, nk, n, ng, q + rt * n + k0, s + rt * ng + k0 // G,
                                   o + rt * ng + k0 // G if off else NULL, c + rt * ng + k0 // G,
                                   u + tg * ustride + k0 * 16, xs + tg * fstride + (k0 // G) * 16,
                                   xsum + tg * fstride + (k0 // G) * 16, ustride, fstride, k0 > 0,
                                   tile + rt * 32)
                        rt = rt + I8_R
                    k0 = k0 + nk
                rt = 0
                while rt < rows:
                    gg_i8_store_tile(tile + rt * 32, <int>J, <int>min(I8_R, rows - rt), min(J * 16, T - tg * 16),
                                     pbuf + rt, PANEL_ROWS)
                    rt = rt + I8_R
                for t in range(tg * 16, min(T, (tg + J) * 16)):
                    prow = pbuf + (t - tg * 16) * PANEL_ROWS
                    if lse == NULL:
                        memcpy(y + t * ldy + r0, prow, rows * sizeof(float))
                    else:
                        m = 0
                        ssum = 0
                        gg_ce_row(prow, rows, lse.softcap, &m, &ssum)  # caps prow in place
                        j = lse.targets[t] - lse.vocab_r0 - r0
                        if 0 <= j < rows:
                            lse.tgt_logit[t] = prow[j]
                        gg_lse_merge(lse.stats + tid * 2 * T + t, lse.stats + tid * 2 * T + T + t, m, ssum)
                tg = tg + J
    free(u)
    free(xs)
    free(xsum)
    free(bufs)
    return 0


def qmatmul_int8(int qtype, int block, int type_size, const uint8_t[:, :] w, const float[:, :] x,
                 float[:, :] y, int nth):
    """y (T, R) = x (T, n) · Wᵀ through the int8 form (inner strides 1, checked by the caller)."""
    cdef Py_ssize_t R = w.shape[0], n = w.shape[1] // type_size * block, T = x.shape[0], i, j
    cdef int G = group_size(qtype)
    if G == 0:
        raise ValueError(f"type {qtype} has no int8 form")
    if T == 0 or R == 0:
        return
    if n == 0:
        for i in range(T):
            for j in range(R):
                y[i, j] = 0
        return
    cdef Py_ssize_t ldx = x.strides[0] // 4 if T > 1 else n
    cdef Py_ssize_t ldy = y.strides[0] // 4 if T > 1 else R
    cdef int rc
    cdef bint off = has_offset(qtype)
    with nogil:
        rc = i8_forward(qtype, G, off, block, type_size, &w[0, 0], w.strides[0], R, n,
                        &x[0, 0], ldx, T, &y[0, 0], ldy, nth, NULL)
    if rc != 0:
        raise MemoryError("cannot allocate the int8 matmul buffers")


def qmatmul_int8_lse(int qtype, int block, int type_size, const uint8_t[:, :] w, const float[:, :] x,
                     int64_t vocab_r0, const int64_t[::1] targets, float softcap, double[::1] run_max,
                     double[::1] run_sum, double[::1] tgt_logit, int nth):
    """The head's chunk W (vocabulary rows vocab_r0.. of the head) times x, folded straight into the
    cross-entropy's running stats, as loss.py's chunk kernels do with written-out logits: logits
    capped (softcap > 0), each token's (max, Σexp) merged into run_max/run_sum, its target logit
    picked when the target lies in the chunk. The (T, rows) logits never reach memory."""
    cdef Py_ssize_t R = w.shape[0], n = w.shape[1] // type_size * block, T = x.shape[0], t, k
    cdef int G = group_size(qtype)
    if G == 0:
        raise ValueError(f"type {qtype} has no int8 form")
    if T == 0 or R == 0 or n == 0:
        raise ValueError("qmatmul_int8_lse needs tokens, rows and columns")
    cdef Py_ssize_t ldx = x.strides[0] // 4 if T > 1 else n
    cdef double[::1] stats = np.empty(nth * 2 * T)
    for k in range(nth):
        stats[k * 2 * T:k * 2 * T + T] = -np.inf
        stats[k * 2 * T + T:(k + 1) * 2 * T] = 0.0
    cdef LseOut lse
    lse.targets = &targets[0]
    lse.vocab_r0 = vocab_r0
    lse.softcap = softcap
    lse.stats = &stats[0]
    lse.tgt_logit = &tgt_logit[0]
    cdef bint off = has_offset(qtype)
    cdef int rc
    with nogil:
        rc = i8_forward(qtype, G, off, block, type_size, &w[0, 0], w.strides[0], R, n, &x[0, 0], ldx, T,
                        NULL, 0, nth, &lse)
    if rc != 0:
        raise MemoryError("cannot allocate the int8 matmul buffers")
    for k in range(nth):
        for t in range(T):
            if stats[k * 2 * T + t] > -np.inf:
                gg_lse_merge(&run_max[t], &run_sum[t], stats[k * 2 * T + t], stats[k * 2 * T + T + t])
