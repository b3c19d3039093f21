"""Where one training step's wall time goes, measured without a profiler: each kernel entry point the
model calls is wrapped in a perf_counter pair (a few hundred calls a step, so the wrappers cost
nothing measurable), nested calls counted once, for the outermost op; "the rest" is the step minus
them (Python, numpy glue). bench/profile_step.py gives the same table through cProfile, whose
per-call overhead inflates the Python share.

    python -P bench/step_ops.py [-c 256] [-b 2] [-s 4] [-t 2] [--compute auto|bf16|f32] [--keep-ffn]

Real text (the GPL from /usr/share/common-licenses, every token trained), LoRA r 8 / alpha 16 on the
7 projections, checkpointing on, one warm-up step, then the mean of -s steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize: bench/ goes to the end of the path,
# where only our helper module is looked up (as in bench/profile_step.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

import argparse
import os
import time

import numpy as np
from benchutil import text_training_step

MODEL_OPS = ("geglu_forward", "geglu_backward", "swiglu_forward", "swiglu_backward", "attention_forward",
             "attention_backward", "cross_entropy_forward", "cross_entropy_backward", "rmsnorm_forward",
             "rmsnorm_backward", "rope_forward", "rope_backward", "lora_shared_addends", "lora_input_cache",
             "lora_shared_backward", "lora_linear_forward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-c", "--ctx", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("-b", "--batch", type=int, default=2, help="rows (default 2)")
    ap.add_argument("-s", "--steps", type=int, default=4, help="measured steps after the warm-up (default 4)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    ap.add_argument("--compute", default="auto", choices=("auto", "bf16", "f32"), help="as finetune's --compute")
    ap.add_argument("--keep-ffn", action="store_true", help="checkpoints keep the FFN outputs (--checkpoint-ffn on)")
    ap.add_argument("--by-shape", action="store_true",
                    help="also the base products' time and GFLOP/s per (direction, type, shape)")
    args = ap.parse_args()

    from gguf.constants import GGMLQuantizationType

    import ggtrain.model.transformer as model_module
    from ggtrain import kernels

    seconds: dict[str, float] = {}
    depth = [0]

    def wrap(module: object, name: str) -> None:
        f = getattr(module, name, None)
        if f is None:
            return

        def timed(*a: object, **k: object) -> object:
            if depth[0]:
                return f(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                depth[0] -= 1
        setattr(module, name, timed)

    for name in MODEL_OPS:
        wrap(model_module, name)
    shapes: dict[tuple, list[float]] = {}  # (op, type, T, K, N) -> [seconds, calls]

    def wrap_product(name: str) -> None:
        f = getattr(kernels, name)

        def timed(a: np.ndarray, w: np.ndarray, qtype: int, *rest: object, **k: object) -> np.ndarray:
            t0 = time.perf_counter()
            out = f(a, w, qtype, *rest, **k)
            key = (name, GGMLQuantizationType(qtype).name, a.shape[0], a.shape[1], out.shape[1])  # T, K, N
            acc = shapes.setdefault(key, [0.0, 0])
            acc[0] += time.perf_counter() - t0
            acc[1] += 1
            return out
        setattr(kernels, name, timed)

    for name in ("qmatmul", "qmatmul_backward_input"):
        if args.by_shape:
            wrap_product(name)
        wrap(kernels, name)

    step, n, compute, why = text_training_step(args.model, args.ctx, args.batch, 8, args.threads, args.compute,
                                               keep_ffn=args.keep_ffn)
    step(0)
    seconds.clear()
    times = [step(i + 1) for i in range(args.steps)]
    wall = sum(times) / len(times)
    print(f"compute: {compute} ({why}); {n} tokens, FFN outputs {'kept' if args.keep_ffn else 'recomputed'}, "
          f"threads {args.threads}; {os.getloadavg()[0]:.2f} load")
    print(f"steps {' '.join(f'{t:.3f}' for t in times)} s: mean {wall:.3f} s, {n / wall:.1f} tokens/s")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{name:28s} {s / len(times) * 1e3:8.1f} ms  {s / len(times) / wall:6.1%}")
    rest = wall - sum(seconds.values()) / len(times)
    print(f"{'the rest (Python, numpy)':28s} {rest * 1e3:8.1f} ms  {rest / wall:6.1%}")
    if args.by_shape:
        print(f"{'product':24s} {'type':6s} {'T x K -> N':>22s} {'calls':>6s} {'ms/step':>8s} {'GFLOP/s':>8s}")
        for (name, qt, t, k, m), (s_, calls) in sorted(shapes.items(), key=lambda kv: -kv[1][0]):
            gflops = 2.0 * t * k * m * calls / s_ / 1e9
            print(f"{name:24s} {qt:6s} {f'{t} x {k} -> {m}':>22s} {calls // len(times):6d} "
                  f"{s_ / len(times) * 1e3:8.1f} {gflops:8.1f}")


if __name__ == "__main__":
    main()
