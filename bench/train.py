"""Training tokens/s and peak RSS of ggtrain against PyTorch + PEFT on the same model, data tokens
and settings, measured in one run, and their ratio.

    python bench/train.py [-m MODEL.gguf] [--train-data data/alpaca.json] [-c 256] [-b 2] [--steps 4]
        [-t 2] [--ggtrain-side auto|cli|library|both] [--compute auto[,f32,bf16]]
        [--baseline-python PATH] [--baseline-dtypes f32,bf16] [--no-checkpointing]

Defaults: Gemma 3 270M Q4_K_M, ctx 256 and 2 rows (512 tokens a step), LoRA r 8, alpha 16, dropout 0
on the 7 projections (attn_q/k/v/output, ffn_gate/up/down), AdamW lr 1e-4 (constant), gradient
clipping at 1, gradient checkpointing on both sides (--no-checkpointing: off on both). The data file
is read as plain text (--format text): one token stream cut into ctx windows, every target trained,
so each row is one sample and the PyTorch side needs no packing. The batches are made once by
ggtrain's data pipeline (load_batches, --seed) and the same tokens go to both sides.

ggtrain: `ggtrain finetune` (a subprocess; its train_log.jsonl gives each step's time) when the
command exists, else the library in a subprocess (Model.forward/backward + ggtrain.train.optim.AdamW, the
loop the trainer runs). --ggtrain-side both runs the two.
--compute runs `ggtrain finetune --compute C` once per value given (the start-up line it prints says which
kernel path ran). PyTorch + PEFT: bench/peft_baseline.py under --baseline-python (default: this
interpreter, when it imports torch, transformers and peft), the model dequantized by transformers' GGUF
loader to float32 and (--baseline-dtypes) to bfloat16, the LoRA weights float32 in both.

Model FLOPs a token (printed, with each side's achieved GFLOP/s): 2·in·out per base product and pass
(forward, the checkpoint recompute, the input gradient; the head forward and input gradient), the LoRA
products (forward, recompute, three backward products), and attention's q·k and p·v (causal: ctx/2
keys on average; backward twice the forward).

tokens/s: all tokens of the steps after the first (a warm-up: JIT, page-in, allocator) over their
time; with --rounds R the sides run in turn R times and each side's fastest run counts (a load
spike from another process then rarely hits one side only) and each side's least peak RSS (a first
run may include Numba compiling its kernel cache). Peak RSS: the whole ggtrain process (sampled VmHWM); for PyTorch the training steps' peak
(VmHWM reset after loading, as the GGUF loader's own dequantization peak is not training), its
whole-process peak printed beside it. Each side's first-step loss is printed: they agree when the
tokens and the model are the same (B = 0 at the start). The last line is
`ratio (ggtrain / PyTorch+PEFT): tokens/s X, peak RSS Y`.
"""

from __future__ import annotations

import argparse
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

from benchutil import MiB, cpu_model, load_average, run_sampled

REPO = BENCH.parent
INSTALL_HINT = ("pip install torch==2.13.0 transformers peft  (or a venv: python -m venv --system-site-packages "
                "~/.cache/ggtrain/peft-venv && ~/.cache/ggtrain/peft-venv/bin/pip install torch==2.13.0 "
                "transformers peft, then --baseline-python ~/.cache/ggtrain/peft-venv/bin/python)")


# -- data ---------------------------------------------------------------------------------------
def make_batches(args: argparse.Namespace, out: Path) -> dict:
    """The first --steps batches ggtrain's pipeline gives for these flags, saved as (steps, rows, ctx)."""
    import numpy as np

    from ggtrain.dataset.batches import load_batches
    from ggtrain.dataset.samples import DataOptions
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.text.tokenizer import Tokenizer

    mf = ModelFile(args.model)
    tok = Tokenizer.from_model_file(mf)
    opts = DataOptions(train_data=args.train_data, format="text", ctx=args.ctx, seed=args.seed)
    train, _, prep = load_batches(opts, tok, args.batch, mf)
    batches = []
    while len(batches) < args.steps:  # full batches only: an epoch's last one may have fewer rows
        b = train.next()
        if b.tokens.shape[0] == args.batch:
            batches.append(b)
    arrays = {k: np.stack([getattr(b, k) for b in batches]) for k in ("tokens", "targets", "mask", "positions",
                                                                          "segments")}
    np.savez(out, **arrays)
    # one sample per row: PyTorch's side has no packing (segment ids constant along each row)
    packed = not (arrays["segments"] == arrays["segments"][:, :, :1]).all()
    return {"file_tokens": prep.train.n_tokens, "trained": int(arrays["mask"].sum()), "packed": packed}


# -- ggtrain, through the library ---------------------------------------------------------------
def library_worker(args: argparse.Namespace) -> None:
    """Runs in a subprocess: the training loop on the saved batches; prints a JSON line."""
    import numpy as np

    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import PROJECTIONS, Batch, Model
    from ggtrain.threads import set_threads
    from ggtrain.train.memory import choose_keep_ffn, default_mem_limit
    from ggtrain.train.optim import AdamW, clip_grad_norm

    set_threads(args.threads)
    mf = ModelFile(args.model)
    hp = read_hparams(mf)
    model = Model(mf, hp)
    lcfg = LoraConfig.make(r=args.rank, alpha=args.alpha, dropout=0.0, targets=PROJECTIONS)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=args.seed)
    model = model.with_trainable(lora)
    grads = lora.zeros_like()
    opt = AdamW({"lora": lora.flat}, lr=args.lr, weight_decay=0.0)
    data = np.load(args.worker_batches)
    rows, ctx = data["tokens"].shape[1:]  # finetune's rule: the FFN outputs if they fit the default limit
    keep_ffn = choose_keep_ffn(args.checkpoint_ffn, default_mem_limit(), hp, lcfg, ctx, rows, args.checkpointing,
                               args.model.stat().st_size)
    seconds, losses = [], []
    for s in range(data["tokens"].shape[0]):
        t0 = time.perf_counter()
        batch = Batch.from_rows(data["tokens"][s], data["targets"][s], data["mask"][s], data["positions"][s],
                                data["segments"][s])
        grads.flat[...] = 0.0
        loss, state = model.forward(batch, train=True, checkpointing=args.checkpointing, step_seed=s,
                                    keep_ffn=keep_ffn)
        model.backward(state, grads)
        del state
        if args.grad_clip > 0:
            clip_grad_norm({"lora": grads.flat}, args.grad_clip)
        opt.step({"lora": grads.flat})
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    print(json.dumps({"seconds": seconds, "losses": losses, "n_lora": lora.n_params}), flush=True)


def run_library(args: argparse.Namespace, batches: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker-batches", str(batches), *common_flags(args)]
    proc, peak = run_sampled(cmd)
    if proc.returncode:
        raise SystemExit(f"ggtrain library worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["peak"] = peak
    return res


# -- ggtrain, through `ggtrain finetune` --------------------------------------------------------
def finetune_available() -> bool:
    proc = subprocess.run([sys.executable, "-m", "ggtrain.cli.main", "finetune", "--help"], capture_output=True,
                          text=True, check=False)
    return proc.returncode == 0 and "--train-data" in proc.stdout


def run_cli(args: argparse.Namespace, outdir: Path, compute: str = "") -> dict:
    cmd = [sys.executable, "-m", "ggtrain.cli.main", "finetune", "-m", str(args.model),
           "--train-data", str(args.train_data), "--format", "text", "--outdir", str(outdir),
           "-c", str(args.ctx), "-b", str(args.batch), "--micro-batch", str(args.batch), "--grad-acc", "1",
           "--lora-r", str(args.rank), "--lora-alpha", str(args.alpha), "--lora-dropout", "0",
           "--learning-rate", str(args.lr), "--cos-decay-steps", "0", "--adam-decay", "0",
           "--adam-gclip", str(args.grad_clip), "--adam-iter", str(args.steps), "--epochs", "1000",
           "--save-every", "0", "-t", str(args.threads), "--seed", str(args.seed),
           "--use-checkpointing" if args.checkpointing else "--no-checkpointing",
           "--checkpoint-ffn", args.checkpoint_ffn, "--overwrite"]  # every round replaces the previous round's outputs
    if compute:
        cmd += ["--compute", compute]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc, peak = run_sampled(cmd, env=env)
    if proc.returncode:
        raise SystemExit(f"ggtrain finetune failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in (outdir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in log if "tokens_per_s" in r]
    if len(steps) != args.steps:
        raise SystemExit(f"ggtrain finetune logged {len(steps)} steps, expected {args.steps}")
    path = next((line.strip() for line in proc.stderr.splitlines() if line.startswith("compute:")), "")
    kept = next((line.strip() for line in proc.stderr.splitlines() if line.startswith("checkpointing:")), "")
    return {"seconds": [r["tokens"] / r["tokens_per_s"] for r in steps], "losses": [r["loss"] for r in steps],
            "path": path, "kept": kept,
            "peak": peak, "log_peak": max(r.get("peak_rss_bytes", 0) for r in steps),
            "tokens": [r["tokens"] for r in steps]}


# -- PyTorch + PEFT -----------------------------------------------------------------------------
def baseline_python(args: argparse.Namespace) -> str | None:
    """The interpreter that runs the baseline, or None (with the reason printed) when it cannot."""
    py = args.baseline_python or sys.executable
    proc = subprocess.run([py, "-c", "import torch, transformers, peft"], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        why = (proc.stderr.strip().splitlines() or ["cannot run"])[-1]
        print(f"PyTorch+PEFT baseline NOT measured: {py} cannot import torch, transformers and peft ({why}). "
              f"To measure it: {INSTALL_HINT}")
        return None
    return py


def run_peft(args: argparse.Namespace, py: str, batches: Path, dtype: str = "f32") -> dict:
    cmd = [py, str(BENCH / "peft_baseline.py"), "--model", str(args.model), "--batches", str(batches),
           "--dtype", dtype,
           "--threads", str(args.threads), "--lr", str(args.lr), "--rank", str(args.rank), "--alpha",
           str(args.alpha), "--grad-clip", str(args.grad_clip)]
    if not args.checkpointing:
        cmd.append("--no-checkpointing")
    proc, peak = run_sampled(cmd)
    if proc.returncode:
        raise SystemExit(f"PyTorch+PEFT baseline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_peak"] = max(peak, res["load_peak"], res["train_peak"])
    res["peak"] = res["train_peak"]
    return res


# -- model FLOPs ---------------------------------------------------------------------------------
def flops_per_token(args: argparse.Namespace) -> float:
    """The model FLOPs of one trained token at these settings (see the module docstring)."""
    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.saved import PROJECTIONS, projection_shapes

    hp = read_hparams(ModelFile(args.model))
    shapes = projection_shapes(hp)
    passes = 3 if args.checkpointing else 2  # forward (+ recompute) + input gradient
    block = sum(2 * o * i * passes for o, i in (shapes[t] for t in PROJECTIONS))
    lora = sum(2 * args.rank * (o + i) * (passes + 1) for o, i in (shapes[t] for t in PROJECTIONS))
    attn = 0.0
    for il in range(hp.n_layer):  # q·k and p·v over the keys a query sees: causal, ctx/2 on average
        window = hp.n_swa if hp.n_swa and hp.swa_layers and hp.swa_layers[il] else args.ctx
        attn += 2 * min(args.ctx, window) / 2 * hp.n_head * (hp.head_dim + hp.head_dim_v) * (passes + 1)
    head_rows, d = shapes["output"]
    return hp.n_layer * (block + lora) + attn + 2 * 2 * head_rows * d


# -- report -------------------------------------------------------------------------------------
def rate(res: dict, tokens_per_step: int) -> float:
    """Tokens/s over the steps after the warm-up step."""
    secs = res["seconds"][1:] or res["seconds"]
    return tokens_per_step * len(secs) / sum(secs)


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["-m", str(args.model), "--train-data", str(args.train_data), "-c", str(args.ctx), "-b",
             str(args.batch), "--steps", str(args.steps), "-t", str(args.threads), "--rank", str(args.rank),
             "--alpha", str(args.alpha), "--lr", str(args.lr), "--grad-clip", str(args.grad_clip),
             "--seed", str(args.seed), "--checkpoint-ffn", args.checkpoint_ffn]
    return flags + ([] if args.checkpointing else ["--no-checkpointing"])


# The peak of a compute path's own product kernel on in-cache data, in a fresh process on the run's
# threads: the bf16 micro-kernel that runs here (AMX or vdpbf16ps: its micro_peak), or for f32 the
# tiles' sgemm (kernels/gemm, OpenBLAS on one thread per tile) on a tile-sized in-cache product.
PEAK_CODE = r"""
import sys, time
import numpy as np
from ggtrain import kernels
from ggtrain.threads import set_threads
compute, nth = sys.argv[1], int(sys.argv[2])
set_threads(nth)
if compute == "bf16":
    mod = kernels._amx_module() or kernels._bf16_module()
    mod.micro_peak(nth, 2000)
    print(max(mod.micro_peak(nth, 100000) for _ in range(3)), kernels.bf16_kernel() + " micro-kernel")
else:  # nth threads, each its own one-thread sgemm on its own in-cache tile, as the f32 tiles run
    import threading
    from ggtrain.kernels.gemm import gemm
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((512, 256), dtype=np.float32) for _ in range(nth)]
    b = [rng.standard_normal((256, 256), dtype=np.float32) for _ in range(nth)]
    c = [np.empty((512, 256), np.float32) for _ in range(nth)]
    reps = 200
    def work(i):
        for _ in range(reps):
            gemm(a[i], b[i], c[i], 1.0, 0.0, False, False, 1)
    best = 1e9
    for _ in range(5):
        ts = [threading.Thread(target=work, args=(i,)) for i in range(nth)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    print(2 * 512 * 256 * 256 * reps * nth / best / 1e9, "f32 sgemm (one-thread sgemm a thread, in-cache tiles)")
"""


def path_peak(compute: str, threads: int) -> tuple[float, str]:
    """(GFLOP/s, kernel name) of PEAK_CODE for --compute `compute`."""
    out = subprocess.run([sys.executable, "-c", PEAK_CODE, compute, str(threads)], capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    return float(out[0]), out[1].strip()


# environment variables that narrow a side's SIMD paths, printed when set (the AVX2 simulation)
SIMD_LIMITS = ("GGTRAIN_AVX512", "GGTRAIN_AMX", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
               "MKL_ENABLE_INSTRUCTIONS")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("--train-data", type=Path, default=REPO / "data" / "alpaca.json",
                    help="text to train on, read as plain text (default: data/alpaca.json)")
    ap.add_argument("-c", "--ctx", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("-b", "--batch", type=int, default=2, help="rows per step (default 2: 512 tokens a step)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, the first a warm-up (default 4)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads on both sides (default 2)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default 1)")
    ap.add_argument("--seed", type=int, default=42, help="data order and LoRA init seed (default 42)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="no gradient checkpointing on either side")
    ap.add_argument("--checkpoint-ffn", choices=("auto", "on", "off"), default="auto",
                    help="ggtrain's --checkpoint-ffn (default auto, as finetune's)")
    ap.add_argument("--ggtrain-side", choices=("auto", "cli", "library", "both"), default="auto",
                    help="auto: `ggtrain finetune` when it exists, else the library loop")
    ap.add_argument("--baseline-python", help="interpreter with torch, transformers, peft (default: this one)")
    ap.add_argument("--baseline-dtypes", default="f32,bf16",
                    help="PyTorch+PEFT runs, one per dtype: f32, bf16 or both (default f32,bf16)")
    ap.add_argument("--compute", default="",
                    help="ggtrain finetune --compute values to run, comma-separated (default: finetune's own)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the sides in turn this many times; each side's fastest run counts (shared machine)")
    ap.add_argument("--worker-batches", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from ggtrain.gguf.defaults import default_model_path
        args.model = default_model_path()
    if args.worker_batches:
        library_worker(args)
        return

    tokens_per_step = args.ctx * args.batch
    print(f"model {args.model.name}, data {args.train_data.name} as text, ctx {args.ctx} x {args.batch} rows = "
          f"{tokens_per_step} tokens a step, {args.steps} steps (first = warm-up), LoRA r {args.rank} alpha "
          f"{args.alpha:g} on 7 projections, AdamW lr {args.lr:g}, clip {args.grad_clip:g}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, threads {args.threads}", flush=True)
    print(f"cpu {cpu_model()}; {load_average()}", flush=True)
    limits = [f"{k}={os.environ[k]}" for k in SIMD_LIMITS if k in os.environ]
    if limits:
        print(f"SIMD limits from the environment: {' '.join(limits)}", flush=True)
    if os.environ.get("ATEN_CPU_CAPABILITY") and "MKL_ENABLE_INSTRUCTIONS" not in os.environ:
        # torch's f32 GEMM is MKL's, which ignores ATEN/oneDNN limits: on Intel it keeps AVX512
        print("note: MKL_ENABLE_INSTRUCTIONS is unset, so torch's MKL GEMMs are not limited "
              "(set MKL_ENABLE_INSTRUCTIONS=AVX2 for the AVX2 case)", flush=True)
    fpt = flops_per_token(args)
    print(f"model FLOPs a token: {fpt / 1e9:.3f} GFLOP", flush=True)
    side = args.ggtrain_side
    if side == "auto":
        side = "cli" if finetune_available() else "library"
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ggtrain-bench-train-") as tmp:
        batches = Path(tmp) / "batches.npz"
        info = make_batches(args, batches)
        print(f"data: {info['file_tokens']} tokens in the file; {info['trained']} trained targets in the "
              f"{args.steps} steps' batches (same tokens on every side)", flush=True)
        runs = []
        if side in ("cli", "both"):
            for c in [c.strip() for c in args.compute.split(",") if c.strip()] or [""]:
                runs.append((f"ggtrain finetune{' --compute ' + c if c else ''}",
                             lambda c=c: run_cli(args, Path(tmp) / "out", c)))
        if side in ("library", "both"):
            runs.append(("ggtrain (library)", lambda: run_library(args, batches)))
        dtypes = [d.strip() for d in args.baseline_dtypes.split(",") if d.strip()]
        py = baseline_python(args) if dtypes else None
        if py is not None and info["packed"]:
            print("PyTorch+PEFT baseline NOT measured: the batches pack several samples into a row, which the "
                  "PyTorch side cannot take (another --ctx or data)")
            py = None
        if py is not None:
            for dt in dtypes:
                runs.append((f"PyTorch+PEFT {dt}", lambda dt=dt: run_peft(args, py, batches, dt)))
        for r in range(args.rounds):
            for name, fn in runs:
                print(f"round {r + 1}: running {name} ... {load_average()}", flush=True)
                res = fn()
                res["rate"] = rate(res, tokens_per_step)
                best = results.get(name)
                if best is None or res["rate"] > best["rate"]:
                    results[name] = res
                if best is not None:  # a first run may include Numba filling its kernel cache: least peak
                    results[name]["peak"] = min(best["peak"], res["peak"])
                extra = ""
                if "process_peak" in res:
                    extra = (f" (training steps; whole process incl. GGUF load/dequantize "
                             f"{res['process_peak'] / MiB:.0f} MiB; torch {res['versions']['torch']}, transformers "
                             f"{res['versions']['transformers']}, peft {res['versions']['peft']})")
                if res.get("path"):
                    extra += f"; {res['path']}"
                if res.get("kept"):
                    extra += f"; {res['kept']}"
                print(f"{name:18}: {res['rate']:8.1f} tokens/s ({res['rate'] * fpt / 1e9:.0f} GFLOP/s), peak RSS "
                      f"{res['peak'] / MiB:6.0f} MiB{extra}; "
                      f"step seconds {', '.join(f'{s:.1f}' for s in res['seconds'])}; first-step loss "
                      f"{res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}; {load_average()}", flush=True)
    if args.rounds > 1:
        for name, res in results.items():
            print(f"best of {args.rounds} {name:18}: {res['rate']:8.1f} tokens/s, peak RSS {res['peak'] / MiB:6.0f} MiB")
    ours = {k: v for k, v in results.items() if k.startswith("ggtrain")}
    for name, res in ours.items():
        compute = res.get("path", "").removeprefix("compute:").split()[:1]
        if compute and compute[0] in ("bf16", "f32"):
            peak, kernel = path_peak(compute[0], args.threads)
            achieved = res["rate"] * fpt / 1e9
            print(f"utilisation ({name}): {achieved:.0f} GFLOP/s of model FLOPs over the {kernel} peak of "
                  f"{peak:.0f} GFLOP/s measured now on {args.threads} threads = {achieved / peak:.1%}")
    peft = {k: v for k, v in results.items() if k.startswith("PyTorch")}
    if not peft:
        why = "--baseline-dtypes is empty" if not args.baseline_dtypes.strip() else f"no baseline: {INSTALL_HINT}"
        print(f"ratio (ggtrain / PyTorch+PEFT): not measured ({why})")
        return
    for o_name, o in ours.items():
        for p_name, p in peft.items():
            print(f"ratio ({o_name} / {p_name}): tokens/s {o['rate'] / p['rate']:.3f}, "
                  f"peak RSS {o['peak'] / p['peak']:.3f}")


if __name__ == "__main__":
    main()
