"""Where one training step's time goes: cProfile of forward + backward + AdamW steps after a warm-up
step, grouped by op (kernels are called from Python, so each kernel is one row).

    python bench/profile_step.py [-m MODEL.gguf] [-c 512] [-b 1] [-r 8] [-t 2] [-s 3] [--no-checkpointing]
                                 [--top 25]

The batch is real text (a licence from /usr/share/common-licenses), LoRA rank r (alpha 2r) on the
7 projections. Prints the CPU and the load, then a table of the time per op over the profiled steps
(the base-weight products qmatmul / qmatmul_backward_input first, apart from the rest, which is also
given as a share of the step without them), then with --top N the top functions by own time.
A numpy call (or any helper without an op of its own) counts for the op of the function calling it.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize (pstats, numba, linecache import it):
# bench/ goes to the end of the path, where only our helper module is looked up.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

import argparse
import cProfile
import io
import os
import pstats
import resource

from benchutil import load_average, text_training_step

# (file, function) -> op; a function of a file listed with "*" is that file's op. The rest inherit
# their callers' op (numpy's built-ins, small helpers), and model code is "Python: model code".
BASE_OPS = ("qmatmul (base forward)", "qmatmul_backward_input (base dX)")
OPS = {
    ("__init__.py", "qmatmul"): BASE_OPS[0],
    ("__init__.py", "qmatmul_backward_input"): BASE_OPS[1],
    ("attention.py", "attention_forward"): "attention forward",
    ("attention.py", "attention_backward"): "attention backward",
    ("lora.py", "lora_linear_forward"): "LoRA products forward",
    ("lora.py", "lora_linear_backward"): "LoRA products backward",
    ("lora.py", "lora_shared_addends"): "LoRA products forward",
    ("lora.py", "lora_input_cache"): "LoRA products forward",
    ("lora.py", "lora_shared_backward"): "LoRA products backward",
    ("norm.py", "*"): "rmsnorm",
    ("rope.py", "*"): "rope",
    ("activation.py", "*"): "gated activation",
    ("loss.py", "*"): "cross-entropy (besides head products)",
    ("optim.py", "*"): "AdamW",
}
MODEL_CODE = "Python: model code"
INHERITED_FILES = {"__init__.py", "attention.py", "vecmath.py", "blas.py", "lora.py", "linear.py", "~"}


def op_table(stats: pstats.Stats, steps: int, step_secs: float) -> str:
    """Seconds per step by op (from cProfile's own times; a helper's time goes to its callers' ops)."""
    raw = stats.stats  # type: ignore[attr-defined]
    memo: dict = {}

    def shares(func: tuple, depth: int = 0) -> dict[str, float]:
        # func -> {op: fraction of its time}; direct entry, else its callers' ops weighted by calls' time
        if func in memo:
            return memo[func]
        file, _, name = func
        base = Path(file).name
        op = OPS.get((base, name)) or OPS.get((base, "*"))
        if op is None and (base in INHERITED_FILES or file == "~") and depth < 20:
            callers = raw[func][4]
            total = sum(c[2] for c in callers.values()) or 1.0
            out: dict[str, float] = {}
            for caller, c in callers.items():
                for o, f in shares(caller, depth + 1).items():
                    out[o] = out.get(o, 0.0) + f * (c[2] / total if total else 1.0 / len(callers))
            memo[func] = out or {MODEL_CODE: 1.0}
        else:
            memo[func] = {op or MODEL_CODE: 1.0}
        return memo[func]

    secs: dict[str, float] = {}
    calls: dict[str, int] = {}
    for func, (_, nc, tt, _, _) in raw.items():
        for o, f in shares(func).items():
            secs[o] = secs.get(o, 0.0) + tt * f
            base_name = Path(func[0]).name
            if (base_name, func[2]) in OPS or ((base_name, "*") in OPS and not func[2].startswith("_")):
                calls[o] = calls.get(o, 0) + nc  # the op's entry points: its calls from the model
    base = sum(secs.get(o, 0.0) for o in BASE_OPS)
    rest = step_secs * steps - base
    lines = [f"{'op':<40} {'s/step':>8} {'% step':>7} {'% rest':>7} {'calls/step':>10}"]
    order = list(BASE_OPS) + sorted((o for o in secs if o not in BASE_OPS), key=lambda o: -secs[o])
    for o in order:
        s = secs.get(o, 0.0)
        share = "" if o in BASE_OPS else f"{100 * s / rest:6.1f}%"
        lines.append(f"{o:<40} {s / steps:8.3f} {100 * s / (step_secs * steps):6.1f}% {share:>7} "
                     f"{calls.get(o, 0) // steps:>10}")
    lines.append(f"{'all but the base products':<40} {rest / steps:8.3f} "
                 f"{100 * rest / (step_secs * steps):6.1f}%")
    lines.append(f"{'step (wall)':<40} {step_secs:8.3f}; Python function calls per step: "
                 f"{stats.total_calls // steps}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def cpu_line() -> str:
    """lscpu's model name and the SIMD features the kernels choose between."""
    from ggtrain.kernels import variants
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    have = variants.cpu_features()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in have]
    return f"CPU: {model}, {os.cpu_count()} logical CPUs, {' '.join(simd) or 'no AVX2'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("-b", "--batch", type=int, default=1, help="rows (default 1)")
    ap.add_argument("-r", "--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("-s", "--steps", type=int, default=3, help="profiled steps after the warm-up (default 3)")
    ap.add_argument("--top", type=int, default=0, help="also the top N functions by own time (default 0)")
    ap.add_argument("--compute", default="auto", choices=("auto", "bf16", "f32"),
                    help="compute path of the base products, as finetune's --compute (default auto)")
    args = ap.parse_args()

    step, n, compute, why = text_training_step(args.model, args.ctx, args.batch, args.rank, args.threads,
                                               args.compute, args.checkpointing)
    warm = step(0)
    prof = cProfile.Profile()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(args.steps):
        prof.enable()
        times.append(step(1 + i))
        prof.disable()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // args.steps
    secs = sum(times) / len(times)
    print(cpu_line())
    print(f"compute: {compute} ({why})")
    print(f"{n} tokens, checkpointing {'on' if args.checkpointing else 'off'}, threads {args.threads}: warm-up "
          f"step {warm:.1f} s, profiled steps {' '.join(f'{t:.2f}' for t in times)} s (mean {n / secs:.1f} "
          f"tokens/s); {load_average()}")
    print(f"minor page faults per step: {faults} (fresh memory the allocator maps and the kernel zeroes)")
    print(op_table(pstats.Stats(prof), len(times), secs))
    if args.top:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(args.top)
        text = buf.getvalue()
        print(text[text.index("ncalls"):] if "ncalls" in text else text)


if __name__ == "__main__":
    main()
