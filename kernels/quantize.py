"""Quantization of f32 rows to GGUF types, byte for byte what llama-quantize writes (no imatrix).

    quantize(rows, qtype)       f32 (..., n) -> uint8 (..., row_bytes)     the inverse shape of dequantize
                                n a multiple of the type's block (32, or 256 for K-quants and IQ4_XS)

    type     block  bytes  what llama-quantize runs for it (ggml_quantize_chunk, quant_weights NULL)
    F32        1      4    a copy
    F16        1      2    ggml_compute_fp32_to_fp16 (round to nearest even; NaN -> 0x7E00)
    BF16       1      2    ggml_compute_fp32_to_bf16 (round to nearest even; NaN quieted)
    Q4_0      32     18    quantize_row_q4_0_ref     d = max/-8, q = min(15, trunc(x/d + 8.5))
    Q4_1      32     20    quantize_row_q4_1_ref     d = (max-min)/15, m = min
    Q5_0      32     22    quantize_row_q5_0_ref     d = max/-16, 5th bits in qh
    Q5_1      32     24    quantize_row_q5_1_ref     d = (max-min)/31, m = min, 5th bits in qh
    Q8_0      32     34    quantize_row_q8_0_ref     d = amax/127, q = roundf(x/d)
    Q2_K     256     84    quantize_row_q2_K_ref     make_qkx2_quants (MAD) per 16, 4-bit scales/mins
    Q3_K     256    110    quantize_row_q3_K_ref     make_q3_quants per 16, 6-bit signed scales
    Q4_K     256    144    quantize_row_q4_K_ref     make_qkx2_quants per 32, 6-bit scales/mins
    Q5_K     256    176    quantize_row_q5_K_ref     make_qkx2_quants per 32, 6-bit scales/mins
    Q6_K     256    210    quantize_row_q6_K_ref     make_qx_quants per 16, int8 scales
    IQ4_NL    32     18    quantize_row_iq4_nl_impl  ntry 7 (quantize_iq4_nl; not the _ref's -1)
    IQ4_XS   256    136    quantize_row_iq4_nl_impl  ntry 7, 6-bit scales per 32

Bit-exact means the same float32 operations in the same order as ggml-quants.c: every value here
is np.float32 and every int is converted to float32 before it meets one (Numba would otherwise
promote to float64); no fastmath, so LLVM neither reassociates nor fuses a*b+c into an FMA. The
reference agrees: ggml-base (ggml-quants.c) is compiled for baseline x86-64 without -mfma, so the
llama-quantize binary has no FMA in these functions either (checked with objdump), and ours has
no double-precision operation and no FMA (checked in _quantize_rows' LLVM IR and assembly). nearest_int is
ggml's own trick (add 1.5·2²³, keep the mantissa bits), reproduced on the float's bits, so ties
round to even and out-of-range values give the same garbage the C code then clamps. error_model
"numpy": a float division by zero gives inf/NaN as in C instead of raising.

Rows are independent (llama-quantize quantizes the whole tensor as one run of blocks for the types
above, and no block looks at another), so rows run in parallel (one compiled variant only: this
runs once per tensor, where waking the thread pool costs nothing that matters). The first call
compiles for ~40 s; later processes load it from NUMBA_CACHE_DIR. Bad input (dtype, shape, type)
raises GGTrainError. Values are taken as finite: for NaN/inf the bytes are whatever the same
arithmetic gives (llama-quantize refuses such rows when it validates its output).
"""

# The C code's `if (v < min) min = v` keeps the first of equal values (0.0 before -0.0, whose sign
# reaches the f16 bytes); min()/max() need not, so ruff's rewrite into them is off here.
# ruff: noqa: PLR1730, FURB136

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ggtrain.errors import GGTrainError

__all__ = ["QUANTIZE_TYPES", "quantize", "row_bytes"]

_T = GGMLQuantizationType
QUANTIZE_TYPES = frozenset((_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0,
                            _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL, _T.IQ4_XS))

# Type codes as the compiled code sees them (ggml's numbers; globals are compile-time constants).
F32, F16, BF16 = int(_T.F32), int(_T.F16), int(_T.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(_T.Q4_0), int(_T.Q4_1), int(_T.Q5_0), int(_T.Q5_1), int(_T.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(_T.Q2_K), int(_T.Q3_K), int(_T.Q4_K), int(_T.Q5_K), int(_T.Q6_K)
IQ4_NL, IQ4_XS = int(_T.IQ4_NL), int(_T.IQ4_XS)

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int32)
f32 = np.float32


# -- float bits -----------------------------------------------------------------------------------
@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float32, as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, b):
    """The float32 whose IEEE bits are the low 32 bits of the integer b."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if b.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif b.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(b), codegen


@njit(cache=True, error_model="numpy")
def nearest_int(v):
    # ggml's nearest_int: v + 12582912 has the rounded integer in its low mantissa bits
    b = np.int64(_bits(np.float32(v + f32(12582912.0))))
    return (b & 0x007FFFFF) - 0x00400000


@njit(cache=True, error_model="numpy")
def fp32_to_fp16(v):
    # ggml_compute_fp32_to_fp16: scale to push the rounding bit into place, add, take the bits
    base = np.float32(np.float32(abs(v) * f32(2.0 ** 112)) * f32(2.0 ** -110))
    w = np.int64(_bits(v))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = np.float32(_from_bits((bias >> 1) + 0x07800000) + base)
    bits = np.int64(_bits(base))
    nonsign = ((bits >> 13) & 0x00007C00) + (bits & 0x00000FFF)
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return (sign >> 16) | nonsign


@njit(cache=True, error_model="numpy")
def fp16_to_fp32(h):
    # exact: every half is a float32
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(np.float32(m) * f32(2.0 ** -24))
        return -v if sign else v
    if e == 31:
        return _from_bits(sign | 0x7F800000 | (m << 13))
    return _from_bits(sign | ((e + 112) << 23) | (m << 13))


@njit(cache=True, error_model="numpy")
def _fp32_to_bf16(v):
    u = np.int64(_bits(v))
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN: keep it quiet
        return ((u >> 16) | 64) & 0xFFFF
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


@njit(cache=True, error_model="numpy")
def _put_f16(out, off, v):
    h = fp32_to_fp16(v)
    out[off] = h & 0xFF
    out[off + 1] = h >> 8


@njit(cache=True, error_model="numpy")
def _f16_at(out, off):
    # the float32 value of the f16 just written at out[off] (GGML_FP16_TO_FP32(y.d))
    return fp16_to_fp32(np.int64(out[off]) | (np.int64(out[off + 1]) << 8))


@njit(cache=True, error_model="numpy")
def _round_away(v):
    # C roundf: halves away from zero (v - trunc(v) is exact for |v| < 2**23)
    t = np.float32(np.trunc(v))
    if abs(np.float32(v - t)) >= f32(0.5):
        t = np.float32(t + (f32(1.0) if v > 0 else f32(-1.0)))
    return t


# -- Q4_0 Q4_1 Q5_0 Q5_1 Q8_0: 32 values a block ---------------------------------------------------
@njit(cache=True, error_model="numpy")
def _absmax_signed(x):
    # the value of largest magnitude (first one on ties), and that magnitude
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(x.shape[0]):
        a = abs(x[j])
        if amax < a:
            amax = a
            mx = x[j]
    return mx, amax


@njit(cache=True, error_model="numpy")
def _min_max(x):
    mn = f32(3.4028234663852886e38)
    mx = f32(-3.4028234663852886e38)
    for j in range(x.shape[0]):
        if x[j] < mn:
            mn = x[j]
        if x[j] > mx:
            mx = x[j]
    return mn, mx


@njit(cache=True, error_model="numpy")
def _q4_0_block(x, out):
    # x (32,) f32 -> out (18,): d f16, qs[16] (low nibble: x[j], high nibble: x[j+16])
    mx, _ = _absmax_signed(x)
    d = np.float32(mx / f32(-8.0))
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    _put_f16(out, 0, d)
    for j in range(16):
        x0 = np.float32(x[j] * idv)
        x1 = np.float32(x[j + 16] * idv)
        q0 = min(15, int(np.float32(x0 + f32(8.5))))
        q1 = min(15, int(np.float32(x1 + f32(8.5))))
        out[2 + j] = q0 | (q1 << 4)


@njit(cache=True, error_model="numpy")
def _q4_1_block(x, out):
    # x (32,) -> out (20,): d f16, m f16, qs[16]
    mn, mx = _min_max(x)
    d = np.float32(np.float32(mx - mn) / f32(15.0))
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    _put_f16(out, 0, d)
    _put_f16(out, 2, mn)
    for j in range(16):
        x0 = np.float32(np.float32(x[j] - mn) * idv)
        x1 = np.float32(np.float32(x[j + 16] - mn) * idv)
        q0 = min(15, int(np.float32(x0 + f32(0.5))))
        q1 = min(15, int(np.float32(x1 + f32(0.5))))
        out[4 + j] = q0 | (q1 << 4)


@njit(cache=True, error_model="numpy")
def _put_qh(out, off, qh):
    for k in range(4):
        out[off + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy")
def _q5_0_block(x, out):
    # x (32,) -> out (22,): d f16, qh[4] (bit j: 5th bit of value j), qs[16]
    mx, _ = _absmax_signed(x)
    d = np.float32(mx / f32(-16.0))
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    _put_f16(out, 0, d)
    qh = 0
    for j in range(16):
        x0 = np.float32(x[j] * idv)
        x1 = np.float32(x[j + 16] * idv)
        q0 = min(31, int(np.float32(x0 + f32(16.5))))
        q1 = min(31, int(np.float32(x1 + f32(16.5))))
        out[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + 16)
    _put_qh(out, 2, qh)


@njit(cache=True, error_model="numpy")
def _q5_1_block(x, out):
    # x (32,) -> out (24,): d f16, m f16, qh[4], qs[16]
    mn, mx = _min_max(x)
    d = np.float32(np.float32(mx - mn) / f32(31.0))
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    _put_f16(out, 0, d)
    _put_f16(out, 2, mn)
    qh = 0
    for j in range(16):
        x0 = np.float32(np.float32(x[j] - mn) * idv)
        x1 = np.float32(np.float32(x[j + 16] - mn) * idv)
        q0 = int(np.float32(x0 + f32(0.5))) & 0xFF  # (uint8_t), no clamp in the C code
        q1 = int(np.float32(x1 + f32(0.5))) & 0xFF
        out[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
        qh |= ((q0 & 0x10) >> 4) << j
        qh |= ((q1 & 0x10) >> 4) << (j + 16)
    _put_qh(out, 4, qh)


@njit(cache=True, error_model="numpy")
def _q8_0_block(x, out):
    # x (32,) -> out (34,): d f16, qs[32] int8
    amax = f32(0.0)
    for j in range(32):
        a = abs(x[j])
        amax = amax if amax > a else a  # MAX(amax, fabsf(v))
    d = np.float32(amax / f32(127.0))
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    _put_f16(out, 0, d)
    for j in range(32):
        out[2 + j] = int(_round_away(np.float32(x[j] * idv))) & 0xFF


# -- K-quant helpers ------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _make_qx_quants(x, L, nmax):
    # make_qx_quants with rmse_type 1 and no quant weights (w = x²); L[i] = l + nmax; returns the scale
    n = x.shape[0]
    mx, amax = _absmax_signed(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    fnmax = f32(nmax)
    iscale = np.float32(f32(-nmax) / mx)
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
        L[i] = l + nmax
        w = np.float32(x[i] * x[i])
        fl = f32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    scale = np.float32(sumlx / suml2) if suml2 != 0 else f32(0.0)
    best = np.float32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = np.float32(-np.float32(fnmax + np.float32(f32(0.1) * f32(step))) / mx)
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
            w = np.float32(x[i] * x[i])
            fl = f32(l)
            sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(cache=True, error_model="numpy")
def _make_q3_quants(x, L, nmax):
    # make_q3_quants with do_rmse: w = x², then up to 5 rounds of coordinate moves; L[i] = l + nmax
    n = x.shape[0]
    mx, amax = _absmax_signed(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = np.float32(f32(-nmax) / mx)
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
        L[i] = l
        w = np.float32(x[i] * x[i])
        fl = f32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = np.float32(x[i] * x[i])
            fli = f32(L[i])
            slx = np.float32(sumlx - np.float32(np.float32(w * x[i]) * fli))
            if slx > 0:
                sl2 = np.float32(suml2 - np.float32(np.float32(w * fli) * fli))
                new_l = nearest_int(np.float32(np.float32(x[i] * sl2) / slx))
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnl = f32(new_l)
                    slx = np.float32(slx + np.float32(np.float32(w * x[i]) * fnl))
                    sl2 = np.float32(sl2 + np.float32(np.float32(w * fnl) * fnl))
                    if sl2 > 0 and (np.float32(np.float32(slx * slx) * suml2)
                                    > np.float32(np.float32(sumlx * sumlx) * sl2)):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return np.float32(sumlx / suml2) if suml2 > 0 else f32(0.0)


@njit(cache=True, error_model="numpy")
def _make_qkx2_quants(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    # make_qkx2_quants: L[i] in [0, nmax] with x ≈ scale·L - the_min; returns (scale, the_min)
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = np.float32(sum_w + w[i])
        sum_x = np.float32(sum_x + np.float32(w[i] * x[i]))
    if mn > 0:
        mn = f32(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return f32(0.0), np.float32(-mn)
    iscale = np.float32(f32(nmax) / np.float32(mx - mn))
    scale = np.float32(f32(1.0) / iscale)
    best_error = f32(0.0)
    for i in range(n):
        l = nearest_int(np.float32(iscale * np.float32(x[i] - mn)))
        L[i] = max(0, min(nmax, l))
        diff = np.float32(np.float32(np.float32(scale * f32(L[i])) + mn) - x[i])
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best_error = np.float32(best_error + np.float32(w[i] * diff))
    if nstep < 1:
        return scale, np.float32(-mn)
    for step in range(nstep + 1):
        # min moves when a step wins, and later steps scale from the new min (as in the C code)
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * f32(step))) + f32(nmax))
                            / np.float32(mx - mn))
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(np.float32(iscale * np.float32(x[i] - mn)))))
            Laux[i] = l
            fl = f32(l)
            wl = np.float32(w[i] * fl)
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * fl))
            sum_xl = np.float32(sum_xl + np.float32(wl * x[i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > 0:
            this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
            this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = f32(0.0)
                this_scale = np.float32(sum_xl / sum_l2)
            cur_error = f32(0.0)
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * f32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur_error = np.float32(cur_error + np.float32(w[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, np.float32(-mn)


@njit(cache=True, error_model="numpy")
def _pack_2bit(L, out, off):
    # 4 values of 2 bits a byte: byte l of each 128-group holds L[l], L[l+32], L[l+64], L[l+96]
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[off + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                     | (L[j + l + 96] << 6)) & 0xFF


# -- Q2_K Q3_K Q4_K Q5_K Q6_K: 256 values a block --------------------------------------------------
@njit(cache=True, error_model="numpy")
def _q2_k_block(x, out, L, Laux, wts, scales, mins):
    # x (256,) -> out (84,): scales[16] (low nibble scale, high nibble min), qs[64], d f16, dmin f16
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            wts[l] = abs(xs[l])
        s, m = _make_qkx2_quants(xs, wts[:16], L[16 * j:16 * j + 16], Laux[:16], 3, f32(-0.5), f32(0.1),
                                 15, True)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    sc = out[0:16]
    if max_scale > 0:
        iscale = np.float32(f32(15.0) / max_scale)
        for j in range(16):
            sc[j] = nearest_int(np.float32(iscale * scales[j])) & 0xFF
        _put_f16(out, 80, np.float32(max_scale / f32(15.0)))
    else:
        for j in range(16):
            sc[j] = 0
        _put_f16(out, 80, f32(0.0))
    if max_min > 0:
        iscale = np.float32(f32(15.0) / max_min)
        for j in range(16):
            sc[j] = (np.int64(sc[j]) | (nearest_int(np.float32(iscale * mins[j])) << 4)) & 0xFF
        _put_f16(out, 82, np.float32(max_min / f32(15.0)))
    else:
        _put_f16(out, 82, f32(0.0))
    dd = _f16_at(out, 80)
    dmin = _f16_at(out, 82)
    for j in range(16):
        d = np.float32(dd * f32(np.int64(sc[j]) & 0xF))
        if d == 0:
            continue
        dm = np.float32(dmin * f32(np.int64(sc[j]) >> 4))
        for ii in range(16):
            l = nearest_int(np.float32(np.float32(x[16 * j + ii] + dm) / d))
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, out, 16)


@njit(cache=True, error_model="numpy")
def _q3_k_block(x, out, L, scales):
    # x (256,) -> out (110,): hmask[32], qs[64] (low 2 bits), scales[12] (6-bit, +32), d f16
    max_scale = f32(0.0)
    amax = f32(0.0)
    for j in range(16):
        s = _make_q3_quants(x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 4)
        scales[j] = s
        a = abs(s)
        if a > amax:
            amax = a
            max_scale = s
    sc = out[96:108]
    for k in range(12):
        sc[k] = 0
    if max_scale != 0:
        iscale = np.float32(f32(-32.0) / max_scale)
        for j in range(16):
            l = nearest_int(np.float32(iscale * scales[j]))
            l = ((l + 128) & 0xFF) - 128  # (int8_t)
            l = max(-32, min(31, l)) + 32
            if j < 8:
                sc[j] = l & 0xF
            else:
                sc[j - 8] |= (l & 0xF) << 4
            sc[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        _put_f16(out, 108, np.float32(f32(1.0) / iscale))
    else:
        _put_f16(out, 108, f32(0.0))
    dd = _f16_at(out, 108)
    for j in range(16):
        ls = (np.int64(sc[j]) & 0xF) if j < 8 else (np.int64(sc[j - 8]) >> 4)
        ls = (ls | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = np.float32(dd * f32(ls))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(np.float32(x[16 * j + ii] / d))
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    hmask = out[0:32]
    for k in range(32):
        hmask[k] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            hmask[m] |= hm
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hm <<= 1
    _pack_2bit(L, out, 32)


@njit(cache=True, error_model="numpy")
def _pack_k4_scales(out, off, scales, mins, max_scale, max_min):
    # the 8 (scale, min) pairs of Q4_K/Q5_K as 6-bit numbers in 12 bytes (get_scale_min_k4's layout)
    inv_scale = np.float32(f32(63.0) / max_scale) if max_scale > 0 else f32(0.0)
    inv_min = np.float32(f32(63.0) / max_min) if max_min > 0 else f32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(np.float32(inv_scale * scales[j])) & 0xFF)  # (uint8_t) then MIN
        lm = min(63, nearest_int(np.float32(inv_min * mins[j])) & 0xFF)
        if j < 4:
            out[off + j] = ls
            out[off + j + 4] = lm
        else:
            out[off + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[off + j - 4] |= (ls >> 4) << 6
            out[off + j] |= (lm >> 4) << 6


@njit(cache=True, error_model="numpy")
def _scale_min_k4(q, off, j):
    # get_scale_min_k4
    a = np.int64(q[off + j])
    b = np.int64(q[off + j + 4])
    if j < 4:
        return a & 63, b & 63
    c = np.int64(q[off + j - 4])
    return (b & 0xF) | ((c >> 6) << 4), (b >> 4) | ((a >> 6) << 4)


@njit(cache=True, error_model="numpy")
def _qk_scales_mins(x, L, Laux, wts, scales, mins, nmax, rmin, nstep):
    # Q4_K/Q5_K first pass: per 32 values weights av_x + |x| and make_qkx2_quants
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = f32(0.0)
        for l in range(32):
            sum_x2 = np.float32(sum_x2 + np.float32(xs[l] * xs[l]))
        av_x = np.float32(np.sqrt(np.float32(sum_x2 / f32(32.0))))
        for l in range(32):
            wts[l] = np.float32(av_x + abs(xs[l]))
        s, m = _make_qkx2_quants(xs, wts, L[32 * j:32 * j + 32], Laux, nmax, rmin, f32(0.1), nstep, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    return max_scale, max_min


@njit(cache=True, error_model="numpy")
def _qk_requantize(x, out, L, nmax):
    # L from the stored 6-bit scales and f16 d/dmin at out[0:4], out[4:16]
    dd = _f16_at(out, 0)
    dmin = _f16_at(out, 2)
    for j in range(8):
        s, m = _scale_min_k4(out, 4, j)
        d = np.float32(dd * f32(s))
        if d == 0:
            continue
        dm = np.float32(dmin * f32(m))
        for ii in range(32):
            l = nearest_int(np.float32(np.float32(x[32 * j + ii] + dm) / d))
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(cache=True, error_model="numpy")
def _q4_k_block(x, out, L, Laux, wts, scales, mins):
    # x (256,) -> out (144,): d f16, dmin f16, scales[12], qs[128] (nibbles of 32-value pairs)
    max_scale, max_min = _qk_scales_mins(x, L, Laux, wts, scales, mins, 15, f32(-1.0), 20)
    _pack_k4_scales(out, 4, scales, mins, max_scale, max_min)
    _put_f16(out, 0, np.float32(max_scale / f32(63.0)))
    _put_f16(out, 2, np.float32(max_min / f32(63.0)))
    _qk_requantize(x, out, L, 15)
    for j in range(0, QK_K, 64):
        for l in range(32):
            out[16 + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)


@njit(cache=True, error_model="numpy")
def _q5_k_block(x, out, L, Laux, wts, scales, mins):
    # x (256,) -> out (176,): d f16, dmin f16, scales[12], qh[32], qs[128]
    max_scale, max_min = _qk_scales_mins(x, L, Laux, wts, scales, mins, 31, f32(-0.5), 15)
    _pack_k4_scales(out, 4, scales, mins, max_scale, max_min)
    _put_f16(out, 0, np.float32(max_scale / f32(63.0)))
    _put_f16(out, 2, np.float32(max_min / f32(63.0)))
    _qk_requantize(x, out, L, 31)
    qh = out[16:48]
    for k in range(32):
        qh[k] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            out[48 + n // 2 + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2


@njit(cache=True, error_model="numpy")
def _q6_k_block(x, out, L, scales):
    # x (256,) -> out (210,): ql[128], qh[64], scales[16] int8, d f16
    max_scale = f32(0.0)
    max_abs_scale = f32(0.0)
    for ib in range(16):
        s = _make_qx_quants(x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 32)
        scales[ib] = s
        a = abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            out[k] = 0
        return
    iscale = np.float32(f32(-128.0) / max_scale)
    _put_f16(out, 208, np.float32(f32(1.0) / iscale))
    sc = out[192:208]
    for ib in range(16):
        sc[ib] = min(127, nearest_int(np.float32(iscale * scales[ib]))) & 0xFF
    dd = _f16_at(out, 208)
    for j in range(16):
        ls = ((np.int64(sc[j]) + 128) & 0xFF) - 128  # int8
        d = np.float32(dd * f32(ls))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(np.float32(x[16 * j + ii] / d))
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for j in range(0, QK_K, 128):
        ql = j // 2
        qh = 128 + j // 4
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            out[ql + l] = q1 | (q3 << 4)
            out[ql + l + 32] = q2 | (q4 << 4)
            out[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                           | ((L[j + l + 96] >> 4) << 6)) & 0xFF


# -- IQ4_NL IQ4_XS: the 16 non-linear levels of kvalues_iq4nl ---------------------------------------
@njit(cache=True, error_model="numpy")
def _best_index(values, v):
    # best_index_int8: the level nearest to v (binary search; ties to the upper level)
    n = values.shape[0]
    if v <= f32(values[0]):
        return 0
    if v >= f32(values[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < f32(values[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(v - f32(values[mu - 1])) < np.float32(f32(values[mu]) - v) else mu


@njit(cache=True, error_model="numpy")
def _iq4_scale(xb, Lb, values, ntry):
    # quantize_row_iq4_nl_impl's search for one group of 32 without quant weights (w = x²)
    mx, amax = _absmax_signed(xb)
    if amax < GROUP_MAX_EPS:
        return f32(0.0)  # Lb left as it was, as in the C code
    v0 = f32(values[0])
    d = np.float32(-mx / v0) if ntry > 0 else np.float32(mx / v0)
    idv = np.float32(f32(1.0) / d)
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for j in range(32):
        l = _best_index(values, np.float32(idv * xb[j]))
        Lb[j] = l
        q = f32(values[l])
        w = np.float32(xb[j] * xb[j])
        wq = np.float32(w * q)
        sumqx = np.float32(sumqx + np.float32(wq * xb[j]))
        sumq2 = np.float32(sumq2 + np.float32(wq * q))
    d = np.float32(sumqx / sumq2) if sumq2 > 0 else f32(0.0)
    best = np.float32(d * sumqx)
    for itry in range(-ntry, ntry + 1):
        idv = np.float32(f32(itry + values[0]) / mx)
        sumqx = f32(0.0)
        sumq2 = f32(0.0)
        for j in range(32):
            q = f32(values[_best_index(values, np.float32(idv * xb[j]))])
            w = np.float32(xb[j] * xb[j])
            wq = np.float32(w * q)
            sumqx = np.float32(sumqx + np.float32(wq * xb[j]))
            sumq2 = np.float32(sumq2 + np.float32(wq * q))
        if sumq2 > 0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
            d = np.float32(sumqx / sumq2)
            best = np.float32(d * sumqx)
    return d


@njit(cache=True, error_model="numpy")
def _pack_iq4(L, out, off, n):
    for i in range(n // 32):
        for j in range(16):
            out[off + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(cache=True, error_model="numpy")
def _iq4_nl_block(x, out, L, values):
    # x (32,) -> out (18,): d f16, qs[16]
    s = _iq4_scale(x, L, values, 7)
    _put_f16(out, 0, s)
    idv = np.float32(f32(1.0) / s) if s != 0 else f32(0.0)
    for j in range(32):
        L[j] = _best_index(values, np.float32(idv * x[j]))
    _pack_iq4(L, out, 2, 32)


@njit(cache=True, error_model="numpy")
def _iq4_xs_block(x, out, L, values, scales):
    # x (256,) -> out (136,): d f16, scales_h u16 (2 high bits a group), scales_l[4] (nibbles), qs[128]
    max_scale = f32(0.0)
    amax_scale = f32(0.0)
    for ib in range(8):
        s = _iq4_scale(x[32 * ib:32 * ib + 32], L[32 * ib:32 * ib + 32], values, 7)
        scales[ib] = s
        a = abs(s)
        if a > amax_scale:
            amax_scale = a
            max_scale = s
    d = np.float32(-max_scale / f32(32.0))
    _put_f16(out, 0, d)
    idv = np.float32(f32(1.0) / d) if d != 0 else f32(0.0)
    scales_h = 0
    for ib in range(8):
        l = max(-32, min(31, nearest_int(np.float32(idv * scales[ib]))))
        dl = np.float32(d * f32(l))
        idl = np.float32(f32(1.0) / dl) if dl != 0 else f32(0.0)
        for j in range(32):
            L[32 * ib + j] = _best_index(values, np.float32(idl * x[32 * ib + j]))
        l += 32
        if ib % 2 == 0:
            out[4 + ib // 2] = l & 0xF
        else:
            out[4 + ib // 2] |= (l & 0xF) << 4
        scales_h |= (l >> 4) << (2 * ib)
    out[2] = scales_h & 0xFF
    out[3] = (scales_h >> 8) & 0xFF
    _pack_iq4(L, out, 8, QK_K)


# -- rows -------------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def _quantize_row(code, x, out, values):
    # one row: x (n,) f32 -> out (row_bytes,) u8; scratch is per row
    n = x.shape[0]
    if code == F16 or code == BF16:
        for i in range(n):
            h = fp32_to_fp16(x[i]) if code == F16 else _fp32_to_bf16(x[i])
            out[2 * i] = h & 0xFF
            out[2 * i + 1] = h >> 8
        return
    L = np.zeros(QK_K, np.int64)
    Laux = np.zeros(32, np.int64)
    wts = np.zeros(32, np.float32)
    scales = np.zeros(16, np.float32)
    mins = np.zeros(16, np.float32)
    if code == Q4_0 or code == Q4_1 or code == Q5_0 or code == Q5_1 or code == Q8_0 or code == IQ4_NL:
        size = 18 if code == Q4_0 or code == IQ4_NL else (20 if code == Q4_1 else (
            22 if code == Q5_0 else (24 if code == Q5_1 else 34)))
        for b in range(n // 32):
            xb = x[32 * b:32 * b + 32]
            ob = out[size * b:size * b + size]
            if code == Q4_0:
                _q4_0_block(xb, ob)
            elif code == Q4_1:
                _q4_1_block(xb, ob)
            elif code == Q5_0:
                _q5_0_block(xb, ob)
            elif code == Q5_1:
                _q5_1_block(xb, ob)
            elif code == Q8_0:
                _q8_0_block(xb, ob)
            else:
                _iq4_nl_block(xb, ob, L, values)
        return
    size = 84 if code == Q2_K else (110 if code == Q3_K else (144 if code == Q4_K else (
        176 if code == Q5_K else (210 if code == Q6_K else 136))))
    for b in range(n // QK_K):
        xb = x[QK_K * b:QK_K * b + QK_K]
        ob = out[size * b:size * b + size]
        if code == Q2_K:
            _q2_k_block(xb, ob, L, Laux, wts, scales, mins)
        elif code == Q3_K:
            _q3_k_block(xb, ob, L, scales)
        elif code == Q4_K:
            _q4_k_block(xb, ob, L, Laux, wts, scales, mins)
        elif code == Q5_K:
            _q5_k_block(xb, ob, L, Laux, wts, scales, mins)
        elif code == Q6_K:
            _q6_k_block(xb, ob, L, scales)
        else:
            _iq4_xs_block(xb, ob, L, values, scales)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(code, x, out, values):
    # x (rows, n) f32 -> out (rows, row_bytes) u8, rows in parallel
    for r in prange(x.shape[0]):
        _quantize_row(code, x[r], out[r], values)


def row_bytes(n: int, qtype: int) -> int:
    """Bytes of one quantized row of n values (n a multiple of the type's block size)."""
    block, size = GGML_QUANT_SIZES[_T(int(qtype))]
    return n // block * size


def quantize(rows: np.ndarray, qtype: int) -> np.ndarray:
    """f32 rows (..., n) -> uint8 (..., row_bytes) of GGUF type qtype, exactly as llama-quantize writes
    them without an importance matrix."""
    try:
        qt = _T(int(qtype))
    except (ValueError, TypeError):
        raise GGTrainError(f"quantize: unknown tensor type {qtype!r}") from None
    if qt not in QUANTIZE_TYPES:
        have = ", ".join(t.name for t in sorted(QUANTIZE_TYPES))
        raise GGTrainError(f"quantize: cannot quantize to {qt.name}; supported: {have}")
    if not isinstance(rows, np.ndarray) or rows.dtype != np.float32 or rows.ndim < 1:
        what = (f"{rows.dtype} array of shape {rows.shape}" if isinstance(rows, np.ndarray)
                else type(rows).__name__)
        raise GGTrainError(f"quantize: expected a float32 array (..., n), got {what}")
    n = rows.shape[-1]
    block = GGML_QUANT_SIZES[qt][0]
    if n % block:
        raise GGTrainError(f"quantize: rows of {n} values cannot be {qt.name}: "
                           f"the row length must be a multiple of {block}")
    x = np.ascontiguousarray(rows).reshape(-1, n)
    out = np.empty((x.shape[0], row_bytes(n, qt)), dtype=np.uint8)
    if qt == _T.F32:
        out[:] = x.view(np.uint8)
    elif x.shape[0]:
        _quantize_rows(int(qt), x, out, KVALUES_IQ4NL)
    return out.reshape(*rows.shape[:-1], out.shape[1])
