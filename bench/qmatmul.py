"""GFLOPS of ggtrain.kernels.qmatmul (forward Y = X·Wᵀ) and qmatmul_backward_input (dX = dY·W) per
weight type, against numpy on the already dequantized f32 weight, measured in the same run.

    python bench/qmatmul.py [--threads N] [--repeat R] [--types Q4_K,Q8_0]

Shapes: X (512×640)·W(2048×640)ᵀ and X (512×2048)·W(640×2048)ᵀ. Types with 256-element blocks
cannot have 640-wide rows, so for them the first shape uses 768 (printed). Each figure is the best
of --repeat runs (the machine is shared). "tile MiB" is the f32 tiles qmatmul allocates, one per
thread (its only memory besides the output). The last line is `min ratio: R` over all types and both directions.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path; bench/ holds scripts named like stdlib
# modules (tokenize.py) that would shadow them. Nothing here is imported from bench/.
if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import time

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggtrain import kernels
from ggtrain.gguf.modelfile import SUPPORTED_TYPES
from ggtrain.threads import blas_threads, default_threads, set_numpy_blas_threads, set_threads

SHAPES = [(512, 640, 2048), (512, 2048, 640)]  # (T, n, rows)
# f16 scale fields inside a block of the types gguf-py cannot quantize
F16_SCALES = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
              Q.IQ4_NL: [0], Q.IQ4_XS: [0]}


def make_weight(qt: Q, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (rows, row_bytes) of type qt with values of a trained weight's size (no denormals)."""
    if qt not in F16_SCALES:
        x = rng.standard_normal((rows, n), dtype=np.float32) * np.float32(0.02)
        return np.ascontiguousarray(quants.quantize(x, qt)).view(np.uint8).reshape(rows, -1)
    block, type_size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows * n // block, type_size), dtype=np.uint8)
    for off in F16_SCALES[qt]:
        raw[:, off:off + 2] = (rng.random(raw.shape[0]) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def best_seconds(fns, repeat: int) -> list[float]:
    """Best time of each function over `repeat` back-to-back calls. Before each function's turn
    the script sleeps: the other side's idle thread pool keeps spinning for a while after its last
    call (OpenBLAS's workers ~0.1 s, OpenMP's a few ms) and would steal a core from this one."""
    best = []
    for fn in fns:
        time.sleep(0.2)
        fn()  # warm up (page faults)
        t = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        best.append(t)
    return best


def measure(qt: Q, T: int, n: int, rows: int, repeat: int, rng: np.random.Generator):
    """Yields (line, ratio) for the forward and the input gradient at X (T×n)·W(rows×n)ᵀ."""
    w = make_weight(qt, rows, n, rng)
    wf = quants.dequantize(w, qt).astype(np.float32)
    x = rng.standard_normal((T, n), dtype=np.float32)
    dy = rng.standard_normal((T, rows), dtype=np.float32)
    y, y_ref = np.empty((T, rows), np.float32), np.empty((T, rows), np.float32)
    dx, dx_ref = np.empty((T, n), np.float32), np.empty((T, n), np.float32)
    flops = 2.0 * T * n * rows
    for direction, ours, ref, backward in (
        ("fwd", lambda: kernels.qmatmul(x, w, qt, out=y), lambda: np.matmul(x, wf.T, out=y_ref), False),
        ("bwd", lambda: kernels.qmatmul_backward_input(dy, w, qt, out=dx),
         lambda: np.matmul(dy, wf, out=dx_ref), True),
    ):
        t_ours, t_ref = best_seconds([ours, ref], repeat)
        got, want = (dx, dx_ref) if backward else (y, y_ref)
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        if not err < 1e-4:  # a fast wrong answer is no figure
            raise SystemExit(f"{qt.name} {direction}: result differs from numpy (max rel err {err:.2e})")
        tile = kernels.tile_bytes(backward, rows, n, T, qt)
        ratio = t_ref / t_ours
        yield (f"{qt.name:7} {f'({T}×{n})·({rows}×{n})ᵀ':22} {direction:4} {flops / t_ours / 1e9:9.1f} "
               f"{flops / t_ref / 1e9:10.1f} {ratio:6.3f} {tile / 2**20:8.2f}"), ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    ap.add_argument("--repeat", type=int, default=15, help="runs per figure; the best is reported")
    ap.add_argument("--types", default="", help="comma-separated type names (default: all supported)")
    args = ap.parse_args()
    set_threads(args.threads)
    set_numpy_blas_threads(args.threads)  # the baseline is numpy with as many threads as ours
    types = [Q[t] for t in args.types.split(",")] if args.types else sorted(SUPPORTED_TYPES, key=int)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads} (BLAS: {blas_threads()}), simd {kernels.simd_level}, best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'type':7} {'X (T×n)·W(rows×n)ᵀ':22} {'dir':4} {'ours GF/s':>9} {'numpy GF/s':>10} {'ratio':>6} {'tile MiB':>8}")
    ratios = []
    for qt in types:
        block = GGML_QUANT_SIZES[qt][0]
        for T, n, rows in SHAPES:
            for line, ratio in measure(qt, T, -(-n // block) * block, rows, args.repeat, rng):
                print(line, flush=True)
                ratios.append(ratio)
    print(f"min ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
