"""Throughput of ggtrain.kernels.quantize per type against llama-quantize on the same F32 file.

    python bench/quantize.py [--threads N] [--rows 4096] [--cols 2048] [--repeat 2] [--types Q4_K,IQ4_XS]

One F32 GGUF holds a (rows × cols) weight-like matrix (N(0, 0.02²)); for each type llama-quantize
--pure turns it into that type with the same thread count, and our quantize() does the same rows.
Figures are MB/s of f32 input (and rows/s); llama-quantize's is its own "quantize time" line (which
also covers reading and writing the file, from the page cache here), ours the call alone. Each is
the best of --repeat runs; our bytes are checked equal to llama-quantize's before they count. The
CPU model and the load average come first (the cores are shared); the last line is `min ratio: R`
(ours / llama-quantize) over the types.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize: bench/ goes to the end of the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]
sys.path.insert(0, str(BENCH.parent / "tests"))

import llamacpp
import numpy as np
from benchutil import cpu_model, load_average
from ggtrain.kernels.quantize import quantize
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q
from test_quantize import FTYPE, TYPES, write_f32_gguf  # the test's F32 file and type names

from ggtrain.threads import default_threads, set_threads

_TIME_RE = re.compile(r"quantize time = +([0-9.]+) ms")


def llama_seconds(src: Path, dst: Path, qtype: str, threads: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        proc = llamacpp.run("llama-quantize", "--pure", src, dst, FTYPE[qtype], str(threads))
        m = _TIME_RE.search(proc.stdout + proc.stderr)
        if not m:
            raise SystemExit(f"no 'quantize time' line in llama-quantize's output:\n{proc.stderr[-2000:]}")
        best = min(best, float(m.group(1)) / 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048, help="a multiple of 256")
    ap.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is reported")
    ap.add_argument("--types", default="", help=f"comma-separated (default: {','.join(TYPES)})")
    args = ap.parse_args()
    set_threads(args.threads)
    types = args.types.split(",") if args.types else list(TYPES)
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32)
         * np.float32(0.02))
    mb = x.nbytes / 1e6
    print(f"cpu {cpu_model()}, threads {args.threads}, {args.rows}×{args.cols} f32 ({mb:.0f} MB), "
          f"best of {args.repeat}, {load_average()}")
    quantize(x[:1, :256], Q.Q4_K)  # compile (or load from the cache) before timing
    print(f"{'type':7} {'ours MB/s':>10} {'rows/s':>9} {'llama MB/s':>10} {'ratio':>6}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "bench-F32.gguf", Path(tmp) / "bench-out.gguf"
        write_f32_gguf(src, {"bench.weight": x})
        for qtype in types:
            t_llama = llama_seconds(src, dst, qtype, args.threads, args.repeat)
            theirs = np.asarray(GGUFReader(dst).tensors[0].data).view(np.uint8).reshape(args.rows, -1)
            t_ours = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ours = quantize(x, Q[qtype])
                t_ours = min(t_ours, time.perf_counter() - t0)
            if not np.array_equal(ours, theirs):  # a fast wrong answer is no figure
                raise SystemExit(f"{qtype}: our bytes differ from llama-quantize's")
            ratios.append(t_llama / t_ours)
            print(f"{qtype:7} {mb / t_ours:10.1f} {args.rows / t_ours:9.0f} {mb / t_llama:10.1f} "
                  f"{ratios[-1]:6.2f}", flush=True)
    print(f"min ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    main()
