"""ggtrain.kernels: dequantization and quantized matmul over GGUF weights.

    dequantize(data, qtype)                       uint8 (..., row_bytes) -> f32 (..., n)
    qmatmul(x, w, qtype, out=None, compute="f32") Y = X·Wᵀ   x f32 (T, n), w uint8 (rows, row_bytes) -> (T, rows)
    qmatmul_backward_input(dy, w, qtype, out=None, accumulate=False, compute="f32")
                                                  dX = dY·W  dy f32 (T, rows) -> (T, n)  (+= if accumulate)
        compute="bf16" (where bf16_available()): X (dY) and the dequantized W rounded to bf16 (to
        nearest even), products and sums in f32; x / dy may then also be uint16 bf16 bits from
        to_bf16 (rounded once for several products with the same input)
    to_bf16(x, out=None)                          f32 (T, n) -> uint16 (T, n) bf16 bits, round to nearest even
    get_rows(w, qtype, ids)                       embedding lookup: ids int (k,) -> f32 (k, n)
    qmatmul_int8(x, w, qtype, out=None)           Y ≈ X·Wᵀ with X quantized to int8 (llama.cpp's way),
                                                  on AVX512-VNNI CPUs (int8_available()) for the types
                                                  int8_supported() accepts: inference only
    qmatmul_int8_lse(x, w, qtype, r0, targets, softcap, run_max, run_sum, tgt_logit)
                                                  the same product folded into cross-entropy stats

w may be any row slice (or block-aligned column slice) of a tensor's uint8 view: rows need not be
adjacent, only each row's bytes. x, dy and out may be row-strided views with contiguous rows.
Arguments the kernels cannot take raise TypeError (wrong dtype) or ValueError (shape, strides,
type id): callers pass what they validated at the boundary (ggtrain.gguf.modelfile refuses a file with
an unsupported tensor type, naming it, before any kernel sees it).

The compiled code lives in quant_base / quant_avx2 (one source, kernels/quant_simd.pyx), on a
CPU with AVX512-VNNI int8mm_avx512 and with AVX512-BF16 bf16mm_avx512bf16; which variant runs comes
from kernels/variants.py's table (GGTRAIN_SIMD=base|avx2 overrides the SIMD level, GGTRAIN_AVX512=0
turns the AVX512 code off, GGTRAIN_BF16=0 the bf16 path alone). On a CPU with AMX-BF16 whose kernel
grants the tile state, the bf16 products run on tiles instead (bf16mm_amx; bf16_kernel() says which,
amx_missing() why not; GGTRAIN_AMX=0 forces vdpbf16ps, GGTRAIN_AMX=1 requires AMX).
They are imported on first use, not with this package: the tokenizer's kernels (bpe, pretok) live
here too, and `ggtrain tokenize` or `--help` never load the matmul code or scipy's BLAS.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
from types import ModuleType

import numpy as np
from ggtrain.kernels import variants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ggtrain.errors import GGTrainError

__all__ = [
    "COMPUTE",
    "PARALLEL_MIN",
    "SUPPORTED_TYPES",
    "amx_available",
    "amx_missing",
    "bf16_available",
    "bf16_kernel",
    "bf16_missing",
    "bf16_slower",
    "dequantize",
    "first_run_notice",
    "get_num_threads",
    "get_rows",
    "int8_available",
    "int8_supported",
    "plan",
    "qmatmul",
    "qmatmul_backward_input",
    "qmatmul_int8",
    "qmatmul_int8_lse",
    "set_num_threads",
    "simd_level",
    "tile_bytes",
    "to_bf16",
    "variant_module",
    "widest_module",
]

# Tensor types the kernels dequantize and multiply by: the types kernels/quant_layout.h lays out
# (ggtrain.gguf.modelfile refuses the others when it loads a model).
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    )
)

# Elements below which a kernel runs on the calling thread: waking the thread pool costs more than
# these memory-bound loops save, the more so on a busy machine. The one threshold for going
# parallel: dequantize / get_rows here, and norm, rope and activation (which import it) ask it;
# attention, the cross-entropy and the matmuls always have enough work and always run parallel.
# Measured at load 5–6 on 2 cores: rmsnorm of (512, 640) 0.04 ms on one thread, 12 ms median on two
# (the region waits for a descheduled thread); quiet, two threads save 0.02 ms. So a training step's
# (T, d) and (T, ff) loops run on one thread up to 4 Mi elements (≈ 1.5 ms of GeGLU backward).
PARALLEL_MIN = 1 << 22

# Floats in each thread's dequantization tile: 512 Ki floats = 2 MiB per thread, whatever the size
# of W (bigger tiles re-pack X less often; measured, bench/qmatmul.py). qmatmul allocates nothing
# else besides its output.
TILE_BUDGET = 512 * 1024
# Forward tiles are at most this many columns wide, then as many rows as the budget allows: every
# tile re-reads (re-packs) X, so fewer, taller tiles cost less. Backward tiles span whole rows
# when they can (every tile re-reads its slice of dY).
FORWARD_TILE_COLS = 512
MIN_TILE_ROWS = 16

# Precisions of the products with a frozen weight: "f32" everywhere, "bf16" where bf16_available().
COMPUTE = ("f32", "bf16")
# The bf16 micro-kernel's shape (bf16mm_util.h's GG_BF_NR, GG_BF_KC, GG_BF_MR; checked when the
# module loads): BF16_ROWS tokens × BF16_COLS output columns, k in tiles of a multiple of BF16_K
# (a multiple of every block size).
BF16_COLS = 64
BF16_K = 256
BF16_ROWS = 6
# Values of k per packed bf16 tile: all of K rounded up to BF16_K, at most BF16_MAX_TILE_K
# (forward, backward). Few tiles mean each output is written once or twice: adding partial sums
# tile after tile into an output whose rows are a power of two apart (the head chunk's 64 KiB)
# thrashes the caches (the head's forward ran at 0.55x with tiles of 256); and at K = 2048 one
# tile beat 8 tiles by 11% on one thread even though the weight tile then lives in L2, not L1.
BF16_MAX_TILE_K = (2048, 1024)
# Bytes of packed weight tiles a forward item holds (its panels of one k tile), at most: L2's half.
BF16_ITEM_BYTES = 512 * 1024
# Columns of dX a backward item covers at most (6 panels): wider items re-read dY less often, and
# equal ranges, as many as threads, need no split by tokens (which packs each range twice): for
# n = 640 on 2 threads, 2 × 320 ran 5% faster than 3 × 256 split by tokens (measured).
BF16_BACKWARD_COLS = 384


# ---- which compiled variants run here (the table: kernels/variants.py) ---------------------------

def _cpu_features() -> frozenset[str]:
    """The CPU's features, less every AVX512 one when GGTRAIN_AVX512=0 (read at each call)."""
    features = variants.cpu_features()
    if os.environ.get("GGTRAIN_AVX512", "").strip() == "0":
        return frozenset(f for f in features if not f.startswith("avx512"))
    return features


def _cpu_simd_level() -> str:
    """The SIMD level of the quant module to run: GGTRAIN_SIMD when set, else the best this CPU runs."""
    forced = os.environ.get("GGTRAIN_SIMD", "").strip().lower()
    if forced:
        if forced not in variants.SIMD_LEVELS:
            expected = " or ".join(repr(level) for level in variants.SIMD_LEVELS)
            raise GGTrainError(f"GGTRAIN_SIMD={forced!r}: expected {expected}")
        return forced
    return variants.best_simd_level(_cpu_features())


def variant_module(name: str) -> ModuleType | None:
    """ggtrain.kernels.NAME, a module built for one variant only (NAME_avx512), or None when this
    CPU cannot run that variant (GGTRAIN_AVX512=0 counts as no AVX512) or it was not built here."""
    variant = variants.variant_of(name)
    if variant is None or not variants.runs_on(variant, _cpu_features()):
        return None
    full = f"ggtrain.kernels.{name}"
    module = sys.modules.get(full)  # (asked before every product: import_module's lookup costs more)
    if module is not None:
        return module
    try:
        return importlib.import_module(full)
    except ImportError:  # not built (non-x86)
        return None


def widest_module(stem: str) -> ModuleType | None:
    """ggtrain.kernels.STEM_<level> (built from STEM_vec.pyx) at the widest of variants.VECTOR_LEVELS
    this CPU runs (GGTRAIN_AVX512=0: avx2), or None where it runs none of them or none was built."""
    for level in reversed(variants.VECTOR_LEVELS):
        module = variant_module(f"{stem}_{level}")
        if module is not None:
            return module
    return None


# ---- the compiled modules, imported on first use -------------------------------------------------
# `_impl` (the quant module), `simd_level` and `_int8` are module attributes that appear when first
# needed (module __getattr__ below); tests may replace `_impl` with another variant.

def _quant() -> ModuleType:
    """quant_base or quant_avx2, imported the first time a kernel needs it."""
    impl = globals().get("_impl")
    if impl is None:
        level = _cpu_simd_level()
        impl = importlib.import_module(f"ggtrain.kernels.quant_{level}")
        # It calls scipy's OpenBLAS (which it has just loaded) from inside its OpenMP threads:
        # that BLAS must not start threads of its own.
        from ggtrain.kernels.blas import set_kernel_blas_single_threaded
        set_kernel_blas_single_threaded()
        globals().update(_impl=impl, simd_level=level)
    return impl


def _int8_module() -> ModuleType | None:
    """int8mm_avx512, or None on a CPU without AVX512-VNNI; looked up once."""
    if "_int8" not in globals():
        globals()["_int8"] = variant_module("int8mm_avx512")
    return globals()["_int8"]


# What the bf16 lookups found, by what decides them: the switches' values and the CPU's features
# (the function, which tests replace). Asked before every product: re-deciding cost ~20 Python
# calls a product, 10k a training step.
_bf16_memo: dict[tuple, tuple] = {}


def _bf16_key(what: str) -> tuple:
    env = os.environ
    return (what, env.get("GGTRAIN_AVX512"), env.get("GGTRAIN_BF16"), env.get("GGTRAIN_AMX"),
            id(variants.cpu_features), id(_tile_state))


def _bf16_module() -> ModuleType | None:
    """bf16mm_avx512bf16, or None on a CPU without AVX512-BF16, when GGTRAIN_AVX512=0 or
    GGTRAIN_BF16=0 (both read at each call)."""
    key = _bf16_key("bf16")
    if key not in _bf16_memo:
        _bf16_memo[key] = (_find_bf16_module(),)
    return _bf16_memo[key][0]


def _find_bf16_module() -> ModuleType | None:
    if os.environ.get("GGTRAIN_BF16", "").strip() == "0":
        return None
    bf = variant_module("bf16mm_avx512bf16")
    if bf is not None and (bf.MICRO_COLS, bf.TILE_K, bf.MICRO_ROWS) != (BF16_COLS, BF16_K, BF16_ROWS):
        raise RuntimeError("ggtrain.kernels: bf16mm_avx512bf16 was built with other tile sizes; rebuild")
    return bf


def bf16_missing() -> str | None:
    """Why compute="bf16" does not run here, for messages; None when it does."""
    if _bf16_module() is not None:
        return None
    if "avx512_bf16" not in variants.cpu_features():
        return "this CPU has no native bf16 dot products (AVX512-BF16)"
    if os.environ.get("GGTRAIN_AVX512", "").strip() == "0":
        return "GGTRAIN_AVX512=0 turns the AVX512 kernels off"
    if os.environ.get("GGTRAIN_BF16", "").strip() == "0":
        return "GGTRAIN_BF16=0 turns the bf16 kernels off"
    return "the bf16 kernels were not built here"


def bf16_available() -> bool:
    """Whether compute="bf16" runs here: a CPU with AVX512-BF16 (x86 build), not turned off by
    GGTRAIN_AVX512=0 or GGTRAIN_BF16=0."""
    return _bf16_module() is not None


# ---- the AMX-BF16 kernel: the same products on tiles where the CPU has them -------------------------
# compute="bf16" multiplies on AMX tiles (bf16mm_amx) where they run, else on vdpbf16ps. GGTRAIN_AMX:
# unset picks at run time, "0" forces vdpbf16ps, "1" requires AMX (a GGTrainError where it does not
# run); read at each call, like GGTRAIN_BF16.
AMX_MODULE = "bf16mm_amx"
AMX_EMULATED_MODULE = "bf16mm_amxemu_avx512bf16"  # the same kernel on amx_emulate.h's C tiles (tests)
_tile_state: dict[str, int] = {}  # Linux's answer to the tile-state request: asked once a process


def _amx_env() -> str:
    value = os.environ.get("GGTRAIN_AMX", "").strip()
    if value not in ("", "0", "1"):
        raise GGTrainError(f"GGTRAIN_AMX={value!r}: expected 0 (the vdpbf16ps kernel) or 1 (the AMX kernel; "
                           "an error where it does not run), or unset (AMX where it runs)")
    return value


def _tile_state_errno(amx: ModuleType) -> int:
    """0 when Linux granted this process the AMX tile state, else the errno of its refusal."""
    if "errno" not in _tile_state:
        _tile_state["errno"] = int(amx.request_tile_state())
    return _tile_state["errno"]


def amx_missing() -> str | None:
    """Why the bf16 products do not run on AMX tiles here, for messages; None when they do."""
    if _amx_env() == "0":
        return "GGTRAIN_AMX=0 turns the AMX kernel off"
    if os.environ.get("GGTRAIN_AVX512", "").strip() == "0":
        return "GGTRAIN_AVX512=0 turns the AVX512 and AMX kernels off"
    if _bf16_module() is None:
        return bf16_missing()
    features = variants.cpu_features()
    absent = [f for f in variants.VARIANTS["amx"].cpu if f not in features]
    if absent:
        return f"this CPU has no AMX-BF16 tiles ({', '.join(absent)} missing)"
    amx = variant_module(AMX_MODULE)
    if amx is None:
        return "the AMX kernel was not built here"
    err = _tile_state_errno(amx)
    if err:
        return (f"Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: "
                f"{os.strerror(err)})")
    return None


def amx_available() -> bool:
    """Whether compute="bf16" multiplies on AMX-BF16 tiles here (else on vdpbf16ps)."""
    return amx_missing() is None


def _amx_module() -> ModuleType | None:
    """bf16mm_amx where the AMX kernel runs (the tile state granted), else None; GGTrainError when
    GGTRAIN_AMX=1 asks for it where it does not run."""
    key = _bf16_key("amx")
    if key not in _bf16_memo:
        _bf16_memo[key] = (amx_missing(),)
    why = _bf16_memo[key][0]
    if why is not None:
        if _amx_env() == "1":
            raise GGTrainError(f"GGTRAIN_AMX=1: the AMX-BF16 kernel does not run here ({why})")
        return None
    amx = variant_module(AMX_MODULE)
    if (amx.MICRO_COLS, amx.TILE_K) != (BF16_COLS, BF16_K):
        raise RuntimeError(f"ggtrain.kernels: {AMX_MODULE} was built with other tile sizes; rebuild")
    return amx


def bf16_kernel() -> str | None:
    """The kernel compute="bf16" runs here: "amx" (AMX-BF16 tiles), "vdpbf16ps" (AVX512-BF16), or
    None where the bf16 path does not run. GGTrainError for GGTRAIN_AMX=1 where AMX does not run."""
    if _amx_module() is not None:
        return "amx"
    return "vdpbf16ps" if _bf16_module() is not None else None


def bf16_slower() -> str | None:
    """Why the bf16 path, though it runs here, is slower than f32 (so compute "auto" keeps f32), or
    None. On Intel CPUs vdpbf16ps issues on one port where f32 FMAs issue on two: the same FLOP rate at
    best, and the bf16 kernel ran at 0.61x our f32 products on a Sapphire Rapids Xeon (bench/README.md);
    on AMD Zen 4/5 it is twice the f32 rate. AMX tiles are faster everywhere they run."""
    if bf16_kernel() == "vdpbf16ps" and variants.cpu_vendor() == "GenuineIntel":
        return (f"vdpbf16ps is no faster than f32 FMAs on Intel CPUs and AMX does not run here "
                f"({amx_missing()}); --compute bf16 forces it")
    return None


def _bf16_for(what: str, compute: str) -> ModuleType | None:
    """The bf16 module for compute="bf16", None for "f32"; ValueError for anything else, or for
    "bf16" where it does not run. Its products run on _amx_module() where that is not None."""
    if compute not in COMPUTE:
        raise ValueError(f"{what}: compute must be one of {', '.join(map(repr, COMPUTE))}, got {compute!r}")
    if compute == "f32":
        return None
    bf = _bf16_module()
    if bf is None:
        raise ValueError(f"{what}: compute='bf16' is not available ({bf16_missing()})")
    return bf


def _int8_mv_module() -> ModuleType | None:
    """int8mv_avx512 (qmatmul_int8 for a few tokens), or None where int8mm_avx512 is absent; looked up once."""
    if "_int8_mv" not in globals():
        globals()["_int8_mv"] = variant_module("int8mv_avx512") if _int8_module() is not None else None
    return globals()["_int8_mv"]


def __getattr__(name: str) -> object:
    if name in ("_impl", "simd_level"):
        _quant()
    elif name == "_int8":
        _int8_module()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


def set_num_threads(n: int) -> None:
    """Threads of the kernels' OpenMP loops (ggtrain.threads.set_threads sets every pool at once)."""
    _quant().set_num_threads(int(n))


def get_num_threads() -> int:
    return _quant().get_num_threads()


def _qtype(qtype: int) -> GGMLQuantizationType:
    try:
        qt = GGMLQuantizationType(int(qtype))
    except (ValueError, TypeError):
        raise ValueError(f"unknown tensor type {qtype!r}") from None
    if qt not in SUPPORTED_TYPES:
        raise ValueError(f"tensor type {qt.name} is not supported by ggtrain.kernels "
                         f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    return qt


def _describe(a: object) -> str:
    return f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def _check_array(a: object, dtype: type, ndim: int, what: str) -> None:
    """TypeError unless a is an ndarray of dtype, ValueError unless it has ndim dimensions."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(f"{what}, got {_describe(a)}")
    if a.ndim != ndim:
        raise ValueError(f"{what}, got {_describe(a)}")


def _check_weight(w: np.ndarray, qt: GGMLQuantizationType, name: str = "weight") -> int:
    """Validates w uint8 (rows, row_bytes) with contiguous rows; returns n (elements per row)."""
    _check_array(w, np.uint8, 2, f"{name} must be a uint8 array (rows, row_bytes)")
    block, type_size = GGML_QUANT_SIZES[qt]
    if w.shape[1] % type_size:
        raise ValueError(f"{name} row of {w.shape[1]} bytes is not a whole number of {qt.name} blocks "
                         f"({type_size} bytes each)")
    if w.shape[1] > 1 and w.strides[1] != 1:
        raise ValueError(f"{name}: the bytes of each row must be contiguous (strides {w.strides})")
    return w.shape[1] // type_size * block


def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """a (rows, cols) with contiguous, non-overlapping rows in ascending order, as BLAS needs (a
    view when it already is, else a copy: broadcast, reversed or column-major input)."""
    rows, cols = a.shape
    if (cols > 1 and a.strides[1] != a.itemsize) or (rows > 1 and a.strides[0] < cols * a.itemsize):
        return np.ascontiguousarray(a)
    return a


def _check_f32_2d(a: np.ndarray, name: str, cols: int) -> np.ndarray:
    _check_array(a, np.float32, 2, f"{name} must be a float32 array (tokens, {cols})")
    if a.shape[1] != cols:
        raise ValueError(f"{name} has {a.shape[1]} columns, the weight needs {cols}")
    return _rows_contiguous(a)


def _check_out(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    what = f"out must be a float32 array of shape {shape}"
    _check_array(out, np.float32, len(shape), what)
    if out.shape != shape:
        raise ValueError(f"{what}, got {_describe(out)}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if (shape[1] > 1 and out.strides[1] != 4) or (shape[0] > 1 and (out.strides[0] < shape[1] * 4
                                                                      or out.strides[0] % 4)):
        raise ValueError(f"out must have contiguous, non-overlapping rows (strides {out.strides})")
    return out


def _even_rows(rows: int, most: int, multiple_of: int = 1) -> int:
    """Tile height <= most that cuts rows into near-equal tiles (a count that is a multiple of
    `multiple_of` when rows allow): a last tile of a few rows would run a thin, slow GEMM."""
    n_tiles = -(-rows // most)
    if rows >= multiple_of * MIN_TILE_ROWS:
        n_tiles = -(-n_tiles // multiple_of) * multiple_of
    return max(1, min(most, rows, (-(-rows // n_tiles) + 15) // 16 * 16))


def _plan_bf16(backward: bool, rows: int, n: int, tokens: int, block: int, threads: int) -> tuple[int, int, int]:
    """The bf16 kernels' tiles; k (n forward, rows backward) in tiles as BF16_MAX_TILE_K says.
    Forward: items of tile_rows weight rows (panels of BF16_COLS), as many as 4 panels (the
    activations' k tile is then read from L2 once a panel, not fetched again) while the items
    still share out evenly and their tiles fit BF16_ITEM_BYTES; tile_cols = k per tile. Backward: tile_rows = k per tile; items of up
    to BF16_BACKWARD_COLS columns (a multiple of the block), split by tokens when the column
    ranges alone would leave a thread idle."""
    k = rows if backward else n
    tile_k = min(-(-max(k, 1) // BF16_K) * BF16_K, BF16_MAX_TILE_K[backward])
    if not backward:
        panels = -(-max(rows, 1) // BF16_COLS)
        for per_item in (4, 2, 1):
            items = -(-panels // per_item)
            fits = per_item * BF16_COLS * tile_k * 2 <= BF16_ITEM_BYTES
            if per_item == 1 or (fits and (items % threads == 0 or items >= 8 * threads)):
                return per_item * BF16_COLS, tile_k, 1
    unit = BF16_COLS * block // math.gcd(BF16_COLS, block)
    units, most = -(-max(n, block) // unit), max(1, BF16_BACKWARD_COLS // unit)
    # the widest items that cut the columns into equal ranges, a multiple of threads of them
    per = next((u for u in range(most, 0, -1) if units % u == 0 and units // u % threads == 0), min(most, units))
    cols = per * unit
    n_col = -(-max(n, block) // cols)
    uneven = n_col % threads and n_col < 4 * threads
    return tile_k, cols, threads if threads > 1 and uneven and tokens >= 2 * BF16_ROWS * threads else 1


def plan(backward: bool, rows: int, n: int, tokens: int, qtype: int, threads: int | None = None,
         compute: str = "f32") -> tuple[int, int, int]:
    """(tile_rows, tile_cols, token_parts) of a qmatmul on W (rows, n) with `tokens` tokens.

    Each of the threads dequantizes into its own tile_rows × tile_cols f32 buffer (at most
    TILE_BUDGET floats, or one row of one block if that is bigger): extra memory is
    threads × that, whatever W's size. Forward work items are tiles of rows; backward items are
    (column range, token range) blocks of dX, planned so that they split evenly between the threads.
    compute="bf16": the bf16 kernels' tiles (_plan_bf16).
    """
    block = GGML_QUANT_SIZES[_qtype(qtype)][0]
    threads = threads or get_num_threads()
    if compute == "bf16":
        return _plan_bf16(backward, rows, n, tokens, block, threads)
    rows, n = max(rows, 1), max(n, block)
    if not backward:
        n_blocks = n // block
        col_parts = min(n_blocks, max(1, (2 * n + FORWARD_TILE_COLS) // (2 * FORWARD_TILE_COLS)))
        cols = -(-n_blocks // col_parts) * block  # even ranges near FORWARD_TILE_COLS (no thin last one)
        return _even_rows(rows, max(1, TILE_BUDGET // cols), threads), cols, 1
    n_blocks = n // block
    col_parts = -(-n // max(block, (TILE_BUDGET // MIN_TILE_ROWS) // block * block))
    token_parts = 1
    if threads > 1:
        even = -(-col_parts // threads) * threads
        if even <= n_blocks and (n_blocks % even == 0 or n_blocks >= 4 * even):
            col_parts = even  # column ranges alone share out evenly
        elif tokens >= 32 * threads:
            token_parts = threads  # few, wide blocks per row (K-quants): split the tokens instead
    cols = -(-n_blocks // col_parts) * block
    return _even_rows(rows, max(1, TILE_BUDGET // cols)), cols, token_parts


def tile_bytes(backward: bool, rows: int, n: int, tokens: int, qtype: int, threads: int | None = None,
               compute: str = "f32") -> int:
    """Bytes a qmatmul allocates besides its output: the f32 tile buffers, one per thread; with
    compute="bf16", the bf16 tiles (half the bytes a value) and their f32 scratch per thread, plus
    the activations rounded to bf16 (not allocated by vdpbf16ps when the caller passes them as
    to_bf16 made them, with an even K; where the AMX kernel runs, they are always copied into
    tiles padded to 32 tokens and 32 values of k, and each thread has a 4 KiB block more)."""
    threads = threads or get_num_threads()
    tile_rows, tile_cols, _ = plan(backward, rows, n, tokens, qtype, threads, compute)
    if compute != "bf16":
        return threads * tile_rows * tile_cols * 4
    scratch = 2 * (tile_cols + BF16_COLS) * 4 if backward else 16 * BF16_K * 4
    k = rows if backward else n
    if amx_missing() is None:  # rows of k padded to 32 values, and 32 more a tile (bf16mm_amx's gg_amx_lda)
        padded_k = -(-k // 32) * 32 + 32 * -(-max(k, 1) // (tile_rows if backward else tile_cols))
        return threads * (tile_rows * tile_cols * 2 + scratch + 4096) + -(-tokens // 32) * 32 * padded_k * 2
    return threads * (tile_rows * tile_cols * 2 + scratch) + tokens * (k + k % 2) * 2


def _threads_for(n_elements: int) -> int:
    """All the kernels' threads, or 1 below PARALLEL_MIN elements."""
    return get_num_threads() if n_elements >= PARALLEL_MIN else 1


def _round_threads(n_values: int) -> int:
    """Threads that round n_values f32 to bf16: rounding costs about an eighth of what an element
    of the loops PARALLEL_MIN was set for costs (512 × 640 values: 0.03 ms on one thread, while a
    second thread on a busy machine could wait a time slice to wake)."""
    return _threads_for(n_values // 8)


def dequantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Raw GGUF rows uint8 (..., row_bytes) -> float32 (..., n); bit-identical to gguf.quants.dequantize."""
    qt = _qtype(qtype)
    what = "data must be a uint8 array (..., row_bytes)"
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise TypeError(f"{what}, got {_describe(data)}")
    if data.ndim < 1:
        raise ValueError(f"{what}, got {_describe(data)}")
    block, type_size = GGML_QUANT_SIZES[qt]
    if data.shape[-1] % type_size:
        raise ValueError(f"row of {data.shape[-1]} bytes is not a whole number of {qt.name} blocks "
                         f"({type_size} bytes each)")
    rows = data.reshape(-1, data.shape[-1]) if data.size else data.reshape(-1, data.shape[-1] or 1)
    rows = _rows_contiguous(rows)
    n = data.shape[-1] // type_size * block
    out = np.empty((rows.shape[0], n), dtype=np.float32)
    _quant().dequantize_rows(rows, int(qt), block, type_size, out, _threads_for(out.size))
    return out.reshape(*data.shape[:-1], n)


def _check_activations(a: np.ndarray, name: str, cols: int, bf16: bool) -> np.ndarray:
    """f32 (tokens, cols), or with the bf16 path also uint16 bf16 bits (tokens, cols)."""
    if bf16 and isinstance(a, np.ndarray) and a.dtype == np.uint16:
        _check_array(a, np.uint16, 2, f"{name} must be a float32 or bf16 (uint16) array (tokens, {cols})")
        if a.shape[1] != cols:
            raise ValueError(f"{name} has {a.shape[1]} columns, the weight needs {cols}")
        return _rows_contiguous(a)
    return _check_f32_2d(a, name, cols)


def _check_addend(addend: tuple[np.ndarray, np.ndarray] | None, out: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(u f32 (T, r), v f32 (r, columns of out)) with contiguous rows, or None for no addend."""
    if addend is None:
        return None
    u, v = addend
    _check_array(u, np.float32, 2, "addend u must be a float32 array (tokens, r)")
    _check_array(v, np.float32, 2, "addend v must be a float32 array (r, columns)")
    if u.shape[0] != out.shape[0] or v.shape != (u.shape[1], out.shape[1]):
        raise ValueError(f"addend u {u.shape} · v {v.shape} does not give the output's {out.shape}")
    return _rows_contiguous(u), _rows_contiguous(v)


def _add_addend(addend: tuple[np.ndarray, np.ndarray] | None, out: np.ndarray) -> None:
    """out += u·v after an f32 product (the bf16 kernels add it in their own pass)."""
    if addend is not None and addend[0].shape[1]:
        from ggtrain.kernels.gemm import gemm  # on first use: it loads scipy's BLAS

        gemm(addend[0], addend[1], out, 1.0, 1.0, False, False, get_num_threads())


def _qmatmul_bf16(bf: ModuleType, backward: bool, qt: GGMLQuantizationType, w: np.ndarray, a: np.ndarray,
                  out: np.ndarray, accumulate: bool, addend: tuple[np.ndarray, np.ndarray] | None) -> None:
    """The product on bf, a module with the bf16 kernels' qmatmul (vdpbf16ps or AMX): same tiles. The
    addend joins the product in the kernel where it takes one (TAKES_ADDEND), else after it."""
    block, type_size = GGML_QUANT_SIZES[qt]
    nth = get_num_threads()
    n = w.shape[1] // type_size * block
    tr, tc, tp = plan(backward, w.shape[0], n, a.shape[0], qt, nth, "bf16")
    a_f32, a_bf16 = (None, a) if a.dtype == np.uint16 else (a, None)
    fuse = addend is not None and w.shape[0] > 0 and n > 0 and getattr(bf, "TAKES_ADDEND", False)
    bf.qmatmul(backward, int(qt), block, type_size, w, a_f32, a_bf16, out, accumulate, tr, tc, tp, nth,
               _round_threads(a.size), *(addend if fuse else ()))
    if not fuse:
        _add_addend(addend, out)


def to_bf16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x f32 (T, n) -> uint16 (T, n): bf16 bits, rounded to nearest even (ties to even, NaN kept
    NaN, ±inf kept, denormals rounded like any value, overflow past the largest bf16 to inf), as
    the bf16 products round their inputs. Needs the bf16 path (bf16_available(), else ValueError)."""
    bf = _bf16_for("to_bf16", "bf16")
    _check_array(x, np.float32, 2, "x must be a float32 array (tokens, n)")
    x = _rows_contiguous(x)
    shape = x.shape
    if out is None:
        out = np.empty(shape, dtype=np.uint16)
    else:
        what = f"out must be a uint16 array of shape {shape}"
        _check_array(out, np.uint16, 2, what)
        if out.shape != shape:
            raise ValueError(f"{what}, got {_describe(out)}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        if (shape[1] > 1 and out.strides[1] != 2) or (shape[0] > 1 and out.strides[0] < shape[1] * 2):
            raise ValueError(f"out must have contiguous, non-overlapping rows (strides {out.strides})")
    bf.to_bf16_rows(x, out, _round_threads(x.size))
    return out


def qmatmul(x: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray | None = None,
            compute: str = "f32", addend: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Y = X·Wᵀ: x f32 (T, n), w uint8 (rows, row_bytes) of type qtype -> f32 (T, rows) (into out if given).
    compute="bf16": X and the dequantized W rounded to bf16, f32 accumulation; x may be to_bf16's uint16.
    addend (u (T, r), v (r, rows), f32): Y + u·v, in f32 (a LoRA branch; bf16 adds it as it stores Y)."""
    bf = _bf16_for("qmatmul", compute)
    qt = _qtype(qtype)
    n = _check_weight(w, qt)
    x = _check_activations(x, "x", n, bf is not None)
    out = _check_out(out, (x.shape[0], w.shape[0]))
    addend = _check_addend(addend, out)
    if bf is not None:
        _qmatmul_bf16(_amx_module() or bf, False, qt, w, x, out, False, addend)
        return out
    block, type_size = GGML_QUANT_SIZES[qt]
    nth = get_num_threads()
    tr, tc, tp = plan(False, w.shape[0], n, x.shape[0], qt, nth)
    _quant().qmatmul(False, int(qt), block, type_size, w, x, out, False, tr, tc, tp, nth)
    _add_addend(addend, out)
    return out


def qmatmul_backward_input(dy: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray | None = None,
                           accumulate: bool = False, compute: str = "f32",
                           addend: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """dX = dY·W: dy f32 (T, rows), w uint8 (rows, row_bytes) -> f32 (T, n); out += dX if accumulate.
    compute="bf16": dY and the dequantized W rounded to bf16, f32 accumulation; dy may be uint16.
    addend (u (T, r), v (r, n), f32): dX + u·v, as qmatmul's."""
    bf = _bf16_for("qmatmul_backward_input", compute)
    qt = _qtype(qtype)
    n = _check_weight(w, qt)
    dy = _check_activations(dy, "dy", w.shape[0], bf is not None)
    if accumulate and out is None:
        raise ValueError("qmatmul_backward_input: accumulate=True needs out")
    out = _check_out(out, (dy.shape[0], n))
    addend = _check_addend(addend, out)
    if bf is not None:
        _qmatmul_bf16(_amx_module() or bf, True, qt, w, dy, out, bool(accumulate), addend)
        return out
    block, type_size = GGML_QUANT_SIZES[qt]
    nth = get_num_threads()
    tr, tc, tp = plan(True, w.shape[0], n, dy.shape[0], qt, nth)
    _quant().qmatmul(True, int(qt), block, type_size, w, dy, out, bool(accumulate), tr, tc, tp, nth)
    _add_addend(addend, out)
    return out


def get_rows(w: np.ndarray, qtype: int, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: rows ids (k,) of w, dequantized -> f32 (k, n)."""
    qt = _qtype(qtype)
    n = _check_weight(w, qt)
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be a 1-D integer array, got {_describe(ids)}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D integer array, got {_describe(ids)}")
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"token ids out of range [0, {w.shape[0]}): min {ids.min()}, max {ids.max()}")
    out = np.empty((ids.shape[0], n), dtype=np.float32)
    block, type_size = GGML_QUANT_SIZES[qt]
    _quant().get_rows(w, int(qt), block, type_size, np.ascontiguousarray(ids, dtype=np.int64), out,
                      _threads_for(out.size))
    return out


def int8_available() -> bool:
    """Whether qmatmul_int8 runs on this machine (CPU with AVX512-VNNI, x86 build)."""
    return _int8_module() is not None


def int8_supported(qtype: int) -> bool:
    """Whether qtype has an exact int8 form (w = s·q + o per group of 16 or 32) on this machine;
    F32, F16 and BF16 do not."""
    int8 = _int8_module()
    return int8 is not None and int8.group_size(int(qtype)) > 0


def qmatmul_int8(x: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray | None = None) -> np.ndarray:
    """Y ≈ X·Wᵀ as llama.cpp computes it: each token's x quantized to int8 per group of 16/32 (scale
    max|x|/127, round half to even), W's quants used as they are, integer dot products (VNNI).
    x f32 (T, n), w uint8 (rows, row_bytes) -> f32 (T, rows). For inference: there is no backward."""
    qt = _qtype(qtype)
    int8 = _int8_module()
    if not int8_supported(qt):
        why = "this CPU lacks AVX512-VNNI" if int8 is None else f"{qt.name} has no int8 form"
        raise ValueError(f"qmatmul_int8: {why}")
    n = _check_weight(w, qt)
    x = _check_f32_2d(x, "x", n)
    out = _check_out(out, (x.shape[0], w.shape[0]))
    block, type_size = GGML_QUANT_SIZES[qt]
    mv = _int8_mv_module()
    if mv is not None and x.shape[0] <= mv.MAX_TOKENS:  # decoding: the matrix-vector kernel, no 16-token tiles
        mv.qmatmul_int8_mv(int(qt), int8.group_size(int(qt)), int8.has_offset(int(qt)), block, type_size, w, x,
                           out, get_num_threads())
        return out
    int8.qmatmul_int8(int(qt), block, type_size, w, x, out, get_num_threads())
    return out


def qmatmul_int8_lse(x: np.ndarray, w: np.ndarray, qtype: int, r0: int, targets: np.ndarray, softcap: float,
                     run_max: np.ndarray, run_sum: np.ndarray, tgt_logit: np.ndarray) -> None:
    """Cross-entropy over a vocabulary chunk without writing its logits: w holds the head's rows
    r0.. (uint8 (rows, row_bytes)); the int8 logits x·wᵀ (capped if softcap > 0) of each token t
    are merged into run_max[t], run_sum[t] (running max and Σexp, f64) and tgt_logit[t] is set when
    targets[t] (int64) falls in the chunk. What loss.py does with qmatmul_int8's logits, fused."""
    qt = _qtype(qtype)
    if not int8_supported(qt):
        raise ValueError(f"qmatmul_int8_lse: {qt.name} has no int8 form on this machine")
    n = _check_weight(w, qt)
    x = _check_f32_2d(x, "x", n)
    T = x.shape[0]
    for name, a, dt in (("targets", targets, np.int64), ("run_max", run_max, np.float64),
                        ("run_sum", run_sum, np.float64), ("tgt_logit", tgt_logit, np.float64)):
        what = f"qmatmul_int8_lse: {name} must be a contiguous {np.dtype(dt)} array of shape ({T},)"
        if not (isinstance(a, np.ndarray) and a.dtype == dt):
            raise TypeError(what)
        if not (a.shape == (T,) and a.flags.c_contiguous):
            raise ValueError(what)
    if T == 0 or w.shape[0] == 0:
        return
    block, type_size = GGML_QUANT_SIZES[qt]
    _int8_module().qmatmul_int8_lse(int(qt), block, type_size, w, x, int(r0), targets, float(softcap), run_max,
                                    run_sum, tgt_logit, get_num_threads())


def first_run_notice() -> str | None:
    """A line to print before the Numba kernels' first use when none of them is compiled yet (the
    first run compiles them for ~30 s, then they load from NUMBA_CACHE_DIR); None when cached."""
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        return None
    # Numba keeps each source folder's cache in <cache>/<folder name>_<sha1 of its path>.
    here = os.path.dirname(os.path.abspath(__file__))
    sub = os.path.join(cache, f"{os.path.basename(here)}_{hashlib.sha1(here.encode()).hexdigest()}")
    if os.path.isdir(sub) and any(f.endswith(".nbi") for f in os.listdir(sub)):
        return None
    return (f"first run: compiling the Numba kernels (about 30 s, once; they are cached in {cache})")
