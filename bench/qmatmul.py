"""GFLOPS of ggtrain.kernels.qmatmul (forward Y = X·Wᵀ) and qmatmul_backward_input (dX = dY·W) per
weight type, against numpy on the already dequantized f32 weight, measured in the same run.

    python bench/qmatmul.py [--threads N] [--repeat R] [--types Q4_K,Q8_0] [--compute f32|bf16]

Shapes: X (512×640)·W(2048×640)ᵀ and X (512×2048)·W(640×2048)ᵀ. Types with 256-element blocks
cannot have 640-wide rows, so for them the first shape uses 768 (printed). Each figure is the best
of --repeat runs (the machine is shared). "tile MiB" is the f32 tiles qmatmul allocates, one per
thread (its only memory besides the output). The last line is `min ratio: R` over all types and both directions.

--compute bf16: the bf16 path (X or dY and the dequantized W rounded to bf16, f32 accumulation)
beside our f32 path, numpy's f32 GEMM on the dequantized weight and, when torch imports, torch's
bf16 matmul on the same dequantized weight (torch.set_num_threads to the same count; oneDNN). Also
X (512×640)·W(1024×640)ᵀ (the q projection) and the output head's chunk of CE_CHUNK rows.
The bf16 figures are taken on every bf16 kernel this CPU runs, one block of rows each (first
column: vdpbf16ps, then amx where the CPU has AMX-BF16 and Linux grants the tile state; with
GGTRAIN_AMX set, only the kernel it forces); the lines before them say which ran, and why not AMX.
Each figure is the best of --repeat rounds that give the four a turn each (one column does not
get a quieter stretch of the machine than another). First the micro-kernel's peak: the bf16
micro-kernel alone on in-cache packed data, no packing or dequantization, on the same threads
(measured again at the end); "util" is each product's GFLOPS over that peak. The last line is
`min bf16/f32 (KERNEL): R` (the bf16 path over ours in f32) over the training shapes, per kernel.
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
from ggtrain.kernels import variants
from ggtrain.kernels.blas import blas_cores
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from ggtrain import kernels
from ggtrain.gguf.modelfile import SUPPORTED_TYPES
from ggtrain.threads import blas_threads, default_threads, set_numpy_blas_threads, set_threads

SHAPES = [(512, 640, 2048), (512, 2048, 640)]  # (T, n, rows)
BF16_SHAPES = [(512, 640, 1024), *SHAPES]  # the training step's block products (Gemma 3 270M)
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


def cpu_model() -> str:
    name = variants.cpuinfo_field("model name")
    if name:
        return name
    import platform
    return platform.processor() or platform.machine()


def torch_bf16():
    """torch, or None where it does not import (the torch column is then left out)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def best_interleaved(fns, repeat: int) -> list[float]:
    """Best time of each function over `repeat` rounds that give each a turn of 3 back-to-back
    calls after a warm-up call, so that every column samples the same stretch of a shared
    machine's load; the 0.2 s pause before each turn lets the previous library's idle threads
    stop spinning (see best_seconds)."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            time.sleep(0.2)
            fn()
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def micro_peak(threads: int, rounds: int = 30) -> float:
    """The running bf16 kernel's micro-kernel GFLOPS on `threads` threads at once (AMX tiles or
    vdpbf16ps, as kernels.bf16_kernel() says): the best of many ~2 ms runs (a run that the OS
    interrupts on a shared machine only lowers its own figure)."""
    bf = kernels._amx_module() or kernels._bf16_module()
    return max(bf.micro_peak(threads, 10000) for _ in range(rounds))


KERNEL_TEXT = {"vdpbf16ps": f"AVX512-BF16 vdpbf16ps, {kernels.BF16_ROWS}×{kernels.BF16_COLS} micro-kernel",
               "amx": "AMX-BF16 tdpbf16ps, 2×2 tiles of 16×16 (32×32) micro-kernel"}


def bf16_kernels_to_run() -> list[str]:
    """Every bf16 kernel this CPU runs (vdpbf16ps, and AMX where it runs), or only the one
    GGTRAIN_AMX forces when it is set."""
    if os.environ.get("GGTRAIN_AMX", "").strip():
        return [kernels.bf16_kernel()]
    return ["vdpbf16ps"] + (["amx"] if kernels.amx_available() else [])


def measure_bf16(qt: Q, T: int, n: int, rows: int, repeat: int, rng: np.random.Generator, peak: float,
                 torch, head: bool):
    """Yields (line, bf16/f32 ratio) for the forward and the input gradient at X (T×n)·W(rows×n)ᵀ:
    the bf16 path, ours in f32, numpy f32, torch bf16."""
    w = make_weight(qt, rows, n, rng)
    wf = quants.dequantize(w, qt).astype(np.float32)
    x = rng.standard_normal((T, n), dtype=np.float32)
    dy = rng.standard_normal((T, rows), dtype=np.float32)
    y, y_f32, y_ref = (np.empty((T, rows), np.float32) for _ in range(3))
    dx, dx_f32, dx_ref = (np.empty((T, n), np.float32) for _ in range(3))
    flops = 2.0 * T * n * rows
    if torch is not None:
        wt = torch.from_numpy(wf).to(torch.bfloat16)
        xt, dyt = torch.from_numpy(x).to(torch.bfloat16), torch.from_numpy(dy).to(torch.bfloat16)
        yt, dxt = torch.empty((T, rows), dtype=torch.bfloat16), torch.empty((T, n), dtype=torch.bfloat16)
    for direction, backward in (("fwd", False), ("bwd", True)):
        if backward:
            fns = [lambda: kernels.qmatmul_backward_input(dy, w, qt, out=dx, compute="bf16"),
                   lambda: kernels.qmatmul_backward_input(dy, w, qt, out=dx_f32),
                   lambda: np.matmul(dy, wf, out=dx_ref)]
            if torch is not None:
                fns.append(lambda: torch.matmul(dyt, wt, out=dxt))
        else:
            fns = [lambda: kernels.qmatmul(x, w, qt, out=y, compute="bf16"),
                   lambda: kernels.qmatmul(x, w, qt, out=y_f32),
                   lambda: np.matmul(x, wf.T, out=y_ref)]
            if torch is not None:
                fns.append(lambda: torch.matmul(xt, wt.T, out=yt))
        times = best_interleaved(fns, repeat)
        got, want = (dx, dx_ref) if backward else (y, y_ref)
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        if not err < 1e-2:  # bf16 inputs: ~1e-3 of the largest value; a fast wrong answer is no figure
            raise SystemExit(f"{qt.name} {direction}: bf16 result differs from numpy (max rel err {err:.2e})")
        gf = [flops / t / 1e9 for t in times]
        torch_cols = f"{gf[3]:9.1f} {gf[0] / gf[3]:7.3f}" if torch is not None else f"{'-':>9} {'-':>7}"
        tile = kernels.tile_bytes(backward, rows, n, T, qt, compute="bf16")
        shape = f"({T}×{n})·({rows}×{n})ᵀ" + (" head" if head else "")
        yield (f"{qt.name:7} {shape:27} {direction:4} {gf[0]:8.1f} {gf[1]:8.1f} {gf[2]:9.1f} {torch_cols} "
               f"{gf[0] / gf[1]:7.3f} {gf[0] / gf[2]:8.3f} {gf[0] / peak:5.2f} {tile / 2**20:8.2f}"), gf[0] / gf[1]


def main_bf16(args, types: list[Q]) -> None:
    from ggtrain.kernels.loss import CE_CHUNK
    if not kernels.bf16_available():
        raise SystemExit("--compute bf16: this machine has no bf16 path (kernels.bf16_available() is False)")
    torch = torch_bf16()
    if torch is not None:
        torch.set_num_threads(args.threads)
    print(f"CPU {cpu_model()}; threads {args.threads} (BLAS: {blas_threads()}), best of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.2f}")
    cores = ", ".join(f"{k} {v}" for k, v in blas_cores().items())
    run = bf16_kernels_to_run()
    amx_note = "" if "amx" in run else f" (not AMX: {kernels.amx_missing()})"
    print(f"bf16 kernels run: {', '.join(run)}{amx_note}; f32 = simd {kernels.simd_level} + sgemm; "
          f"OpenBLAS kernels: {cores}; torch {torch.__version__ if torch else 'not importable'}")
    rng = np.random.default_rng(0)
    for kernel in run:
        os.environ["GGTRAIN_AMX"] = "1" if kernel == "amx" else "0"  # this process only
        peak = micro_peak(args.threads)
        print(f"kernel {kernel}: bf16 = {KERNEL_TEXT[kernel]}")
        print(f"micro-kernel peak: {peak:.1f} GFLOPS on {args.threads} threads (in-cache packed data, "
              "no dequantization)")
        print(f"{'kernel':9} {'type':7} {'X (T×n)·W(rows×n)ᵀ':27} {'dir':4} {'bf16':>8} {'f32':>8} {'numpy':>9} "
              f"{'torch':>9} {'/torch':>7} {'/f32':>7} {'/numpy':>8} {'util':>5} {'tile MiB':>8}   "
              "(GFLOPS; ratios of bf16)")
        ratios = []
        for qt in types:
            block = GGML_QUANT_SIZES[qt][0]
            shapes = [(T, n, rows, False) for T, n, rows in BF16_SHAPES]
            if qt in (Q.Q8_0, Q.Q6_K):  # the output head's types in the quantized Gemma 3 files
                shapes.append((512, 640, CE_CHUNK, True))
            for T, n, rows, head in shapes:
                for line, ratio in measure_bf16(qt, T, -(-n // block) * block, rows, args.repeat, rng, peak, torch,
                                                head):
                    print(f"{kernel:9} {line}", flush=True)
                    if not head:
                        ratios.append(ratio)
        peak_end = micro_peak(args.threads)
        print(f"micro-kernel peak at the end: {peak_end:.1f} GFLOPS; load average {os.getloadavg()[0]:.2f}")
        print(f"min bf16/f32 ({kernel}): {min(ratios):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    ap.add_argument("--repeat", type=int, default=15, help="runs per figure; the best is reported")
    ap.add_argument("--types", default="", help="comma-separated type names (default: all supported)")
    ap.add_argument("--compute", choices=kernels.COMPUTE, default="f32",
                    help="f32: ours against numpy; bf16: the bf16 path against ours in f32, numpy and torch")
    args = ap.parse_args()
    set_threads(args.threads)
    set_numpy_blas_threads(args.threads)  # the baseline is numpy with as many threads as ours
    types = [Q[t] for t in args.types.split(",")] if args.types else sorted(SUPPORTED_TYPES, key=int)
    if args.compute == "bf16":
        return main_bf16(args, types)
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
