"""What the bf16 compute path does to training: the same runs under --compute f32 and bf16, and the
f32 path's own run-to-run noise beside them.

    python bench/compute_quality.py [-m MODEL.gguf] [--train-data data/alpaca.json] [--steps 50] [-c 256]
        [-b 2] [--seeds 1,2] [-t 2]

Each seed runs `ggtrain finetune` once per path (same data order, LoRA init and dropout draws; 10% of
the data held out, its loss every 10 steps), then `ggtrain perplexity --compute f32` scores each
adapter on a text neither run saw (/usr/share/common-licenses/GPL-3, 4 chunks of 256). Printed: both
paths' training-loss curves (every 5th step) and held-out losses per seed; the largest gap between
the paths at a seed beside the largest gap between two f32 seeds (the run-to-run noise); and each
bf16 adapter's held-out perplexity against its f32 twin's (the target: within 0.5%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

from benchutil import cpu_model, load_average

REPO = BENCH.parent
GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
HELD_OUT = "/usr/share/common-licenses/GPL-3"


def finetune(args: argparse.Namespace, compute: str, seed: int, outdir: Path) -> list[dict]:
    cmd = [*GGTRAIN, "finetune", "--train-data", str(args.train_data), "--outdir", str(outdir), "-c",
           str(args.ctx), "-b", str(args.batch), "--micro-batch", str(args.batch), "--adam-iter", str(args.steps),
           "--val-split", "0.1", "--eval-every", "10", "--save-every", "0", "-t", str(args.threads), "--seed",
           str(seed), "--compute", compute, "--overwrite"]
    if args.model:
        cmd += ["-m", str(args.model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        raise SystemExit(f"finetune failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (outdir / "train_log.jsonl").read_text().splitlines() if x.strip()]


def held_out_ppl(args: argparse.Namespace, adapter: Path) -> float:
    cmd = [*GGTRAIN, "perplexity", "-f", HELD_OUT, "-c", "256", "--chunks", "4", "--compute", "f32", "-t",
           str(args.threads), "--lora", str(adapter)]
    if args.model:
        cmd += ["-m", str(args.model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"perplexity failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.split("Final estimate: PPL = ")[1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("--train-data", type=Path, default=REPO / "data" / "alpaca.json", help="training data")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default 50)")
    ap.add_argument("-c", "--ctx", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("-b", "--batch", type=int, default=2, help="rows per step (default 2)")
    ap.add_argument("--seeds", default="1,2", help="seeds, one run per path each (default 1,2)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"cpu {cpu_model()}; {args.steps} steps, ctx {args.ctx} x {args.batch}, seeds {seeds}; {load_average()}",
          flush=True)
    logs: dict[tuple[str, int], list[dict]] = {}
    ppl: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="ggtrain-bench-quality-") as tmp:
        for seed in seeds:
            for compute in ("f32", "bf16"):
                out = Path(tmp) / f"{compute}-{seed}"
                logs[compute, seed] = finetune(args, compute, seed, out)
                ppl[compute, seed] = held_out_ppl(args, out / "ggml-lora-LATEST-f32.gguf")
                last = [r for r in logs[compute, seed] if "loss" in r][-1]
                print(f"seed {seed} {compute:4}: last loss {last['loss']:.4f}, held-out PPL {ppl[compute, seed]:.4f}; "
                      f"{load_average()}", flush=True)

    def curve(key: tuple[str, int], field: str) -> dict[int, float]:
        return {r["step"]: r[field] for r in logs[key] if field in r}

    for field, every in (("loss", 5), ("val_loss", 10)):
        print(f"\n{field} by step" + "".join(f"  {c}/s{s}" for s in seeds for c in ("f32", "bf16")))
        steps = sorted(curve(("f32", seeds[0]), field))
        for st in steps:
            if st % every and st != steps[-1]:
                continue
            print(f"{st:>12}" + "".join(f"  {curve((c, s), field).get(st, float('nan')):8.4f}"
                                        for s in seeds for c in ("f32", "bf16")))
        gap = max(abs(curve(("bf16", s), field)[st] - curve(("f32", s), field)[st]) for s in seeds for st in steps)
        noise = max((abs(curve(("f32", a), field)[st] - curve(("f32", b), field)[st])
                     for i, a in enumerate(seeds) for b in seeds[i + 1:] for st in steps), default=float("nan"))
        print(f"{field}: largest bf16-vs-f32 gap at a seed {gap:.4f}; largest gap between f32 seeds {noise:.4f}")
    for s in seeds:
        r = ppl["bf16", s] / ppl["f32", s]
        print(f"held-out PPL seed {s}: f32 {ppl['f32', s]:.4f}, bf16 {ppl['bf16', s]:.4f}, ratio {r:.4f} "
              f"({(r - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
