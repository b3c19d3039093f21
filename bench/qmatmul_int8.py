"""GOPS of ggtrain.kernels.qmatmul_int8 (Y ≈ X·Wᵀ, activations quantized to int8, AVX512-VNNI)
against qmatmul (f32 tiles) and numpy on the dequantized f32 weight, measured in the same run.

    python bench/qmatmul_int8.py [--threads N] [--repeat R] [--types Q4_K,Q8_0]

Shapes: bench/qmatmul.py's two, plus Gemma 3's output head for one perplexity chunk (256 scored
tokens × 640 × 16384 vocabulary rows, Q8_0 only). Each figure is the best of --repeat runs. "err"
is int8's max relative difference from the exact product (its quantization of X). The last line is
`min ratio: R`, int8 over f32 qmatmul, over all types and shapes.
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (tokenize.py): it goes to the end of the path,
# where only bench/qmatmul.py's helpers are looked up.
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != BENCH] + [BENCH]

import argparse

import numpy as np
from ggtrain.kernels.loss import CE_CHUNK
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from qmatmul import SHAPES, best_seconds, make_weight

from ggtrain import kernels
from ggtrain.threads import blas_threads, default_threads, set_numpy_blas_threads, set_threads

HEAD = (256, 640, CE_CHUNK)  # (T, n, rows): Gemma 3's tied head, one cross-entropy vocabulary chunk


def measure(qt: Q, T: int, n: int, rows: int, repeat: int, rng: np.random.Generator) -> tuple[str, float]:
    """(line, int8/f32 speed ratio) at X (T×n)·W(rows×n)ᵀ."""
    w = make_weight(qt, rows, n, rng)
    wf = quants.dequantize(w, qt).astype(np.float32)
    x = rng.standard_normal((T, n), dtype=np.float32)
    y8, y32, yref = (np.empty((T, rows), np.float32) for _ in range(3))
    t8, t32, tref = best_seconds([lambda: kernels.qmatmul_int8(x, w, qt, out=y8),
                                  lambda: kernels.qmatmul(x, w, qt, out=y32),
                                  lambda: np.matmul(x, wf.T, out=yref)], repeat)
    err = float(np.max(np.abs(y8 - yref)) / np.max(np.abs(yref)))
    if not err < 3e-2:  # a fast wrong answer is no figure
        raise SystemExit(f"{qt.name}: int8 result differs from numpy by {err:.2e}")
    ops = 2.0 * T * n * rows
    return (f"{qt.name:7} {f'({T}×{n})·({rows}×{n})ᵀ':24} {ops / t8 / 1e9:9.1f} {ops / t32 / 1e9:8.1f} "
            f"{ops / tref / 1e9:10.1f} {t32 / t8:8.2f} {err:8.1e}"), t32 / t8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    ap.add_argument("--repeat", type=int, default=15, help="runs per figure; the best is reported")
    ap.add_argument("--types", default="", help="comma-separated type names (default: all with an int8 form)")
    args = ap.parse_args()
    if not kernels.int8_available():
        raise SystemExit("this CPU has no AVX512-VNNI: qmatmul_int8 cannot run here")
    set_threads(args.threads)
    set_numpy_blas_threads(args.threads)
    types = ([Q[t] for t in args.types.split(",")] if args.types
             else [q for q in sorted(Q, key=int) if kernels.int8_supported(q)])
    rng = np.random.default_rng(0)
    print(f"threads {args.threads} (BLAS: {blas_threads()}), best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'type':7} {'X (T×n)·W(rows×n)ᵀ':24} {'int8 GOPS':>9} {'f32 GF/s':>8} {'numpy GF/s':>10} "
          f"{'int8/f32':>8} {'err':>8}")
    ratios = []
    for qt in types:
        block = GGML_QUANT_SIZES[qt][0]
        shapes = [(T, -(-n // block) * block, rows) for T, n, rows in SHAPES]
        if qt == Q.Q8_0:
            shapes.append(HEAD)
        for T, n, rows in shapes:
            line, ratio = measure(qt, T, n, rows, args.repeat, rng)
            print(line, flush=True)
            ratios.append(ratio)
    print(f"min ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
