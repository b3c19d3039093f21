"""ggtrain.kernels: dequantization and quantized matmul over GGUF weights.

    dequantize(data, qtype)                       uint8 (..., row_bytes) -> f32 (..., n)
    qmatmul(x, w, qtype, out=None)                Y = X·Wᵀ   x f32 (T, n), w uint8 (rows, row_bytes) -> (T, rows)
    qmatmul_backward_input(dy, w, qtype, out=None, accumulate=False)
                                                  dX = dY·W  dy f32 (T, rows) -> (T, n)  (+= if accumulate)
    get_rows(w, qtype, ids)                       embedding lookup: ids int (k,) -> f32 (k, n)

Bad input (dtype, shape, unsupported type) raises GGTrainError with a message saying what is wrong.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from ggtrain.errors import GGTrainError
from ggtrain.modelfile import SUPPORTED_TYPES, type_name

__all__ = [
    "SUPPORTED_TYPES",
    "dequantize",
    "get_num_threads",
    "get_rows",
    "qmatmul",
    "qmatmul_backward_input",
    "set_num_threads",
]

_num_threads = 1

_TILE_ROWS = 256  # rows of W dequantized at a time: extra memory is _TILE_ROWS × n floats


def _qtype(qtype: int) -> GGMLQuantizationType:
    try:
        qt = GGMLQuantizationType(int(qtype))
    except ValueError:
        raise GGTrainError(f"unknown tensor type {qtype!r}") from None
    if qt not in SUPPORTED_TYPES:
        raise GGTrainError(f"tensor type {type_name(qt)} is not supported by ggtrain.kernels "
                           f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
    return qt


def _check_weight(w: np.ndarray, qt: GGMLQuantizationType) -> int:
    """Validates a weight w uint8 (rows, row_bytes); returns n (elements per row)."""
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2:
        raise GGTrainError(f"weight must be a uint8 array (rows, row_bytes), got "
                           f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', '')}")
    block, type_size = GGML_QUANT_SIZES[qt]
    if w.shape[1] % type_size:
        raise GGTrainError(f"weight row of {w.shape[1]} bytes is not a whole number of {qt.name} blocks "
                           f"({type_size} bytes each)")
    return w.shape[1] // type_size * block


def _check_f32_2d(a: np.ndarray, name: str, cols: int) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2:
        raise GGTrainError(f"{name} must be a float32 array (tokens, {cols}), got "
                           f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if a.shape[1] != cols:
        raise GGTrainError(f"{name} has {a.shape[1]} columns, the weight needs {cols}")


def _check_out(out: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        raise GGTrainError(f"out must be a float32 array of shape {shape}, got "
                           f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    if not out.flags.writeable:
        raise GGTrainError("out is read-only")
    return out


def dequantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Raw GGUF rows uint8 (..., row_bytes) -> float32 (..., n); bit-identical to gguf.quants.dequantize."""
    qt = _qtype(qtype)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 1:
        raise GGTrainError(f"data must be a uint8 array (..., row_bytes), got "
                           f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    _check_weight(data.reshape(-1, data.shape[-1]), qt)
    return np.array(_gguf_dequantize(data, qt), dtype=np.float32, copy=True)


def qmatmul(x: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray | None = None) -> np.ndarray:
    """Y = X·Wᵀ: x f32 (T, n), w uint8 (rows, row_bytes) of type qtype -> f32 (T, rows)."""
    qt = _qtype(qtype)
    n = _check_weight(w, qt)
    _check_f32_2d(x, "x", n)
    out = _check_out(out, (x.shape[0], w.shape[0]))
    for r0 in range(0, w.shape[0], _TILE_ROWS):
        tile = _gguf_dequantize(w[r0:r0 + _TILE_ROWS], qt)
        np.matmul(x, tile.T, out=out[:, r0:r0 + _TILE_ROWS])
    return out


def qmatmul_backward_input(dy: np.ndarray, w: np.ndarray, qtype: int, out: np.ndarray | None = None,
                           accumulate: bool = False) -> np.ndarray:
    """dX = dY·W: dy f32 (T, rows), w uint8 (rows, row_bytes) -> f32 (T, n); adds into out if accumulate."""
    qt = _qtype(qtype)
    n = _check_weight(w, qt)
    _check_f32_2d(dy, "dy", w.shape[0])
    if accumulate and out is None:
        raise GGTrainError("accumulate=True needs out")
    out = _check_out(out, (dy.shape[0], n))
    if not accumulate:
        out[...] = 0
    for r0 in range(0, w.shape[0], _TILE_ROWS):
        tile = _gguf_dequantize(w[r0:r0 + _TILE_ROWS], qt)
        out += dy[:, r0:r0 + _TILE_ROWS] @ tile
    return out


def get_rows(w: np.ndarray, qtype: int, ids: np.ndarray) -> np.ndarray:
    """Embedding lookup: rows ids (k,) of w, dequantized -> f32 (k, n)."""
    qt = _qtype(qtype)
    _check_weight(w, qt)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise GGTrainError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise GGTrainError(f"ids out of range [0, {w.shape[0]}): min {ids.min()}, max {ids.max()}")
    return dequantize(w[ids], qt)


def set_num_threads(n: int) -> None:
    """Threads of the kernels' OpenMP loops (use ggtrain.threads.set_threads, which sets every pool)."""
    global _num_threads
    _num_threads = max(1, int(n))


def get_num_threads() -> int:
    return _num_threads
