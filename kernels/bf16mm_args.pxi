# The parts of a bf16 qmatmul call that do not depend on the micro-kernel, included (Cython
# `include`) by both bf16 kernels, bf16mm_avx512bf16.pyx (vdpbf16ps) and bf16mm_amx.pyx (AMX tiles),
# after their cimports and their `cdef extern from "bf16mm_util.h"` (gg_bf_dequant, GG_BF_NR, GG_BF_KC).

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)


cdef inline void *alloc64(size_t n) noexcept nogil:
    return aligned_alloc(64, (n + 63) // 64 * 64)


cdef struct Addend:
    # the f32 low-rank U (T, ur) · V (ur, columns of C) added to the output (ur = 0: none)
    const float *u
    const float *v
    Py_ssize_t ldu, ldv
    int ur


cdef struct ATiles:
    # the rounded activations, k tile kb at a + kb * tstride, rows ld apart (ld_last in the last
    # tile), in the layout of the kernel that filled them
    const uint16_t *a
    Py_ssize_t tstride, ld, ld_last, n_tiles


cdef inline Py_ssize_t a_ld(const ATiles *A, Py_ssize_t kb) noexcept nogil:
    return A.ld_last if kb == A.n_tiles - 1 else A.ld


def supports(int qtype):
    """Whether the packers know qtype (every type of ggtrain.kernels.SUPPORTED_TYPES)."""
    cdef float y[1]
    cdef uint8_t b[1]
    return gg_bf_dequant(qtype, b, y, 0) == 0


cdef int check_call(bint backward, int qtype, int block, Py_ssize_t tile_rows, Py_ssize_t tile_cols) except -1:
    """The planned tiles fit the micro-kernel (k per tile a multiple of GG_BF_KC; forward items whole
    panels of weight rows; backward column ranges whole panels and blocks) and the packers know qtype."""
    cdef Py_ssize_t tile_k = tile_rows if backward else tile_cols
    if (tile_k <= 0 or tile_k % GG_BF_KC or (not backward and tile_rows % GG_BF_NR)
            or (backward and (tile_cols % GG_BF_NR or tile_cols % block))):
        raise ValueError(f"bf16 tiles {tile_rows}x{tile_cols} do not fit the micro-kernel")
    if not supports(qtype):
        raise ValueError(f"tensor type {qtype} is not supported by the bf16 kernels")
    return 0


cdef int addend_of(u, v, Addend *L) except -1:
    """L = the addend u (T, r) · v (r, columns of C), f32 with inner strides 1 (checked by the caller);
    none (ur 0) for u None or r 0."""
    cdef const float[:, :] um, vm
    L.ur = 0
    L.u = L.v = NULL
    L.ldu = L.ldv = 0
    if u is not None:
        um, vm = u, v
        L.ur = <int>um.shape[1]
        if L.ur:
            L.u, L.v = &um[0, 0], &vm[0, 0]
            L.ldu = um.strides[0] // 4 if um.shape[0] > 1 else L.ur
            L.ldv = vm.strides[0] // 4 if vm.shape[0] > 1 else vm.shape[1]
    return 0


cdef int empty_call(Py_ssize_t T, Py_ssize_t R, Py_ssize_t n, const Addend *L, float[:, :] c,
                    bint accumulate) except -1:
    """1 when there is nothing to multiply (no tokens; or an empty weight: c zeroed unless it
    accumulates), else 0."""
    cdef Py_ssize_t i, j
    if T == 0:
        return 1
    if R == 0 or n == 0:
        if L.ur:
            raise ValueError("an addend needs a weight with rows and columns")
        if not accumulate:
            for i in range(T):
                for j in range(c.shape[1]):
                    c[i, j] = 0
        return 1
    return 0
