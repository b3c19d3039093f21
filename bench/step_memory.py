"""Peak memory of one training step under each checkpointing setting, beside the memory estimate.

Settings: checkpointing, checkpointing with the FFN outputs kept (finetune's --checkpoint-ffn on), none;
the estimate is ggtrain.train.memory.estimate_step_memory.

    python bench/step_memory.py [-m MODEL.gguf] [-c 512] [-b 1] [-r 8] [-t 2]

The estimate is checked against `ggtrain finetune` itself (the process whose micro-batch it
chooses): each setting runs two steps of it on the same text, --micro-batch b, and its whole
peak RSS (sampled VmHWM) is set beside the estimate, with the difference in percent.

Each setting runs in a fresh process (python bench/step_memory.py --worker ...), which loads the
model, builds a ctx-token batch of real text (a licence from /usr/share/common-licenses), sets up a
rank-r LoRA (alpha 2r) on the 7 projections with its gradients and AdamW state, and runs two steps
(forward, backward, AdamW update). Before each step the kernel's peak-RSS mark (VmHWM) is reset to
the current RSS, so "peak" is the step's exact peak and "delta" = peak - RSS right before the step.
Step 1 is cold: the mmap'd weights are paged in by it (they count in its delta). Step 2 is warm.
The estimate is the whole process's peak as the memory monitor predicts it ("est. total"), and
that minus the weights, the runtime allowance and the margin ("est. step"), to set beside a delta.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize (numba, linecache import it): bench/
# goes to the end of the path, where only our helper module is looked up.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

from benchutil import MiB, PeakSampler, load_average, reset_peak_rss, run_sampled, vm_hwm

TEXT = Path("/usr/share/common-licenses/GPL-3")


def worker(args: argparse.Namespace) -> None:
    """One setting in this (fresh) process; prints a JSON line with the figures."""
    import numpy as np
    import psutil

    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import PROJECTIONS, Batch, Model
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.threads import set_threads
    from ggtrain.train.optim import AdamW

    set_threads(args.threads)
    proc = psutil.Process()
    t0 = time.perf_counter()
    mf = ModelFile(args.model)
    hp = read_hparams(mf)
    model = Model(mf, hp, matmul=args.compute)
    tok = Tokenizer.from_model_file(mf)
    n = args.ctx * args.batch
    ids = np.asarray(tok.encode(TEXT.read_text(encoding="utf-8"), add_special=True), dtype=np.int32)
    if len(ids) < n + 1:
        ids = np.tile(ids, (n + 1) // len(ids) + 1)
    del tok
    rows = ids[:n].reshape(args.batch, args.ctx)
    targets = ids[1:n + 1].reshape(args.batch, args.ctx)
    batch = Batch.from_rows(rows, targets, np.ones(rows.shape, np.float32))

    lcfg = LoraConfig.make(r=args.rank, alpha=2.0 * args.rank, targets=PROJECTIONS)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=0)
    model = model.with_trainable(lora)
    grads = lora.zeros_like()
    opt = AdamW({"lora": lora.flat}, lr=1e-4)
    load_s = time.perf_counter() - t0

    steps = []
    for i in range(2):
        grads.flat[...] = 0.0
        gc.collect()
        before = proc.memory_info().rss
        exact = reset_peak_rss()
        t0 = time.perf_counter()
        with PeakSampler(proc.pid, interval=0.005) as sampler:
            loss, state = model.forward(batch, train=True, checkpointing=args.checkpointing, step_seed=i,
                                        keep_ffn=args.keep_ffn)
            model.backward(state, grads)
            del state
            opt.step({"lora": grads.flat})
        secs = time.perf_counter() - t0
        peak = (vm_hwm() or 0) if exact else sampler.peak
        steps.append({"before": before, "peak": peak, "seconds": secs, "loss": loss, "exact": exact})
    print(json.dumps({"steps": steps, "load_s": load_s, "n_lora": lora.n_params}), flush=True)


# setting -> (checkpointing, checkpoints keep the FFN's outputs: finetune's --checkpoint-ffn on)
SETTINGS = {"checkpointing": (True, False), "checkpointing+ffn": (True, True), "no-checkpointing": (False, False)}


def finetune_peak(args: argparse.Namespace, checkpointing: bool, keep_ffn: bool, outdir: Path) -> int:
    """Peak RSS of `ggtrain finetune` running two steps of this setting."""
    cmd = [sys.executable, "-m", "ggtrain.cli.main", "finetune", "-m", str(args.model),
           "--train-data", str(TEXT), "--format", "text", "--outdir", str(outdir), "-c", str(args.ctx), "-b", str(args.batch),
           "--micro-batch", str(args.batch), "--lora-r", str(args.rank), "--lora-alpha", str(2 * args.rank),
           "--lora-dropout", "0", "--adam-iter", "2", "--save-every", "0", "-t", str(args.threads),
           "--use-checkpointing" if checkpointing else "--no-checkpointing",
           "--checkpoint-ffn", "on" if keep_ffn else "off", "--overwrite", "--compute", args.compute]
    proc, peak = run_sampled(cmd, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        raise SystemExit(f"ggtrain finetune failed ({proc.returncode}):\n{' '.join(cmd)}\n"
                         f"{proc.stderr[-3000:]}")
    return peak


def estimate(model: Path, ctx: int, batch: int, rank: int, checkpointing: bool, threads: int,
             compute: str = "f32", keep_ffn: bool = False) -> dict[str, int]:
    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig
    from ggtrain.model.transformer import PROJECTIONS
    from ggtrain.train.memory import estimate_step_memory, memory_breakdown

    hp = read_hparams(ModelFile(model))
    lcfg = LoraConfig.make(r=rank, alpha=2.0 * rank, targets=PROJECTIONS)
    size = model.stat().st_size
    kw = {"threads": threads, "compute": compute, "keep_ffn": keep_ffn}
    total = estimate_step_memory(hp, lcfg, ctx, batch, checkpointing, size, **kw)
    parts = memory_breakdown(hp, lcfg, ctx, batch, checkpointing, size, **kw)
    fixed = sum(v for k, v in parts.items() if k.startswith(("weights", "runtime", "safety")))
    return {"total": total, "step": parts["total"] - fixed, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("-b", "--batch", type=int, default=1, help="rows per step (default 1)")
    ap.add_argument("-r", "--rank", type=int, default=8, help="LoRA rank on the 7 projections (default 8)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads (default 2)")
    ap.add_argument("--compute", choices=("f32", "bf16"), default="f32", help="the base products' path (default f32)")
    ap.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from ggtrain.gguf.defaults import default_model_path
        args.model = default_model_path()
    if args.worker:
        args.checkpointing, args.keep_ffn = SETTINGS[args.worker]
        worker(args)
        return

    print(f"model {args.model.name} ({args.model.stat().st_size / MiB:.0f} MiB), ctx {args.ctx}, batch "
          f"{args.batch}, LoRA r {args.rank} on 7 projections, threads {args.threads}, compute {args.compute}, "
          f"{load_average()}")
    rows = []
    for setting, (checkpointing, keep_ffn) in SETTINGS.items():
        cmd = [sys.executable, __file__, "--worker", setting, "-m", str(args.model), "-c", str(args.ctx),
               "-b", str(args.batch), "-r", str(args.rank), "-t", str(args.threads), "--compute", args.compute]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        if proc.returncode:
            raise SystemExit(f"worker {setting} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        with tempfile.TemporaryDirectory() as tmp:
            res["finetune_peak"] = finetune_peak(args, checkpointing, keep_ffn, Path(tmp) / "out")
        est = estimate(args.model, args.ctx, args.batch, args.rank, checkpointing, args.threads, args.compute,
                       keep_ffn)
        rows.append((setting, res, est))

    def mib(x: float) -> str:
        return f"{x / MiB:8.0f}"

    print(f"{'setting':17} {'step':>4} {'secs':>6} {'RSS before':>10} {'peak':>8} {'delta':>8} "
          f"{'est.total':>9} {'est.step':>8}   (MiB)")
    for setting, res, est in rows:
        for i, s in enumerate(res["steps"]):
            print(f"{setting:17} {i + 1:4d} {s['seconds']:6.1f} {mib(s['before']):>10} {mib(s['peak'])} "
                  f"{mib(s['peak'] - s['before'])} {mib(est['total']):>9} {mib(est['step'])}"
                  + ("" if s["exact"] else "  (sampled)"))
    print(f"(LoRA parameters {rows[0][1]['n_lora']:,}; {load_average()})")
    for setting, _, est in rows:
        print(f"estimate, {setting}: " + ", ".join(f"{k} {v / MiB:.0f}" for k, v in est["parts"].items()))
    figures = []
    for setting, res, est in rows:
        peak = res["finetune_peak"]
        figures.append(f"{setting} {peak / MiB:.0f} MiB (estimate {est['total'] / MiB:.0f}, "
                       f"{100 * (est['total'] / peak - 1):+.0f}%)")
    print("ggtrain finetune peak RSS: " + ", ".join(figures))
    deltas = [max(s["peak"] - s["before"] for s in res["steps"]) for _, res, _ in rows]
    peaks = [max(s["peak"] for s in res["steps"]) for _, res, _ in rows]
    print("library step peak RSS: " + ", ".join(f"{setting} {p / MiB:.0f} MiB (step delta {d / MiB:.0f})"
                                                for (setting, _, _), p, d in zip(rows, peaks, deltas)))

if __name__ == "__main__":
    main()
