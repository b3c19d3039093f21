# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""C = alpha · op(A) · op(B) + beta · C on f32 row-major views, split across the OpenMP threads.

For the thin products of the LoRA terms (rank r beside T tokens and a projection's in/out sizes),
where numpy's `@` runs on one thread, allocates its result and needs a second pass to add it:
here the result is written (beta = 0) or added (beta = 1) in place, into any view with unit column
stride (a column slice of a wider array, e.g. one term's columns of the q/k/v terms' joint (T, R)
projection), and the work is split over C's rows (or, when C has few rows, its columns) in blocks,
one single-threaded sgemm (scipy's OpenBLAS, which ggtrain keeps at one thread) per block;
a small product (under PARALLEL_WORK multiply-adds) is one sgemm on the calling thread.
"""

from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport sgemm

# Rows (or columns) of C per task: enough that one sgemm amortises its packing.
DEF SPLIT = 64
# Multiply-adds below which the product runs on the calling thread alone: a parallel region costs
# little on a quiet machine, but on a busy one it waits for a descheduled thread (measured: a LoRA
# forward at T 512 took 2–9 ms on 2 threads at load 4–7 against 0.6 ms on one). At this size a
# product takes ~0.3 ms on one core, which such a wait no longer dwarfs.
DEF PARALLEL_WORK = 1 << 25


cdef inline Py_ssize_t _ld(const float[:, :] a, str name) except -1:
    # leading dimension (row stride in floats) of a view with unit column stride
    if a.shape[0] > 0 and a.shape[1] > 0 and a.strides[1] != sizeof(float):
        raise ValueError(f"gemm: {name} needs unit column stride, got strides {a.strides[0]}, {a.strides[1]}")
    if a.strides[0] % sizeof(float):
        raise ValueError(f"gemm: {name}'s row stride is not a whole number of floats")
    return max(a.strides[0] // <Py_ssize_t>sizeof(float), a.shape[1], 1)


def gemm(const float[:, :] a, const float[:, :] b, float[:, :] c, float alpha=1.0, float beta=0.0,
         bint trans_a=False, bint trans_b=False, int nth=1):
    """c = alpha · op(a) · op(b) + beta · c, op(x) = x.T if trans_x else x; c (M, N), op(a) (M, K),
    op(b) (K, N). beta = 0 never reads c (it may hold anything). On up to nth threads (one below
    PARALLEL_WORK multiply-adds)."""
    cdef Py_ssize_t M = c.shape[0], N = c.shape[1]
    cdef Py_ssize_t K = a.shape[0] if trans_a else a.shape[1]
    if (a.shape[1] if trans_a else a.shape[0]) != M or (b.shape[1] if trans_b else b.shape[0]) != K \
            or (b.shape[0] if trans_b else b.shape[1]) != N:
        raise ValueError(f"gemm: op(a) {a.shape[0]}x{a.shape[1]}{' T' if trans_a else ''}, "
                         f"op(b) {b.shape[0]}x{b.shape[1]}{' T' if trans_b else ''} do not give c {M}x{N}")
    if M == 0 or N == 0:
        return
    cdef Py_ssize_t lda = _ld(a, "a"), ldb = _ld(b, "b"), ldc = _ld(c, "c")
    cdef const float *pa = &a[0, 0] if a.shape[0] and a.shape[1] else NULL
    cdef const float *pb = &b[0, 0] if b.shape[0] and b.shape[1] else NULL
    cdef float *pc = &c[0, 0]
    cdef bint by_rows = M >= N or M >= SPLIT * nth  # split the longer side of C
    cdef Py_ssize_t length = M if by_rows else N
    if M * N * K < PARALLEL_WORK:
        nth = 1
    cdef Py_ssize_t split = SPLIT if nth > 1 else length  # one thread: one sgemm over all of C
    cdef Py_ssize_t ntask = (length + split - 1) // split, task, s0
    cdef int n_threads = <int>max(1, min(<Py_ssize_t>nth, ntask))
    if K == 0:  # op(a) · op(b) is zero: c = beta · c
        for s0 in range(M):
            for task in range(N):
                c[s0, task] = 0.0 if beta == 0.0 else c[s0, task] * beta
        return
    for task in prange(ntask, nogil=True, num_threads=n_threads, schedule="static"):
        s0 = task * split
        _block(by_rows, trans_a, trans_b, M, N, K, s0, min(length, s0 + split), alpha, pa, lda, pb, ldb,
               beta, pc, ldc)


cdef void _block(bint by_rows, bint trans_a, bint trans_b, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                 Py_ssize_t s0, Py_ssize_t s1, float alpha, const float *pa, Py_ssize_t lda, const float *pb,
                 Py_ssize_t ldb, float beta, float *pc, Py_ssize_t ldc) noexcept nogil:
    # Row-major C (M, N) is column-major Cᵀ (N, M) = op(B)ᵀ op(A)ᵀ: sgemm gets B first.
    cdef char tb = b'T' if trans_b else b'N'
    cdef char ta = b'T' if trans_a else b'N'
    cdef int m_ = <int>N, n_ = <int>M, k_ = <int>K, lda_ = <int>lda, ldb_ = <int>ldb, ldc_ = <int>ldc
    if by_rows:  # rows s0..s1 of C = rows of op(A)
        n_ = <int>(s1 - s0)
        pa = pa + (s0 if trans_a else s0 * lda)
        pc = pc + s0 * ldc
    else:  # columns s0..s1 of C = columns of op(B)
        m_ = <int>(s1 - s0)
        pb = pb + (s0 * ldb if trans_b else s0)
        pc = pc + s0
    sgemm(&tb, &ta, &m_, &n_, &k_, &alpha, <float *>pb, &ldb_, <float *>pa, &lda_, &beta, pc, &ldc_)
