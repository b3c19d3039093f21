"""Prompt-processing and generation tokens/s of `ggtrain generate` against llama.cpp's `llama-completion`:
same GGUF, threads, context, prompt and number of tokens, in one run, and the ratios (target for
generation >= 0.7).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/generate.py [-m MODEL.gguf] [-t 2]
        [-n 128] [-c 1024] [--prompt-words 300] [--rounds 3]

The prompt is the opening of the GPL-3 (a text nobody here wrote), cut to --prompt-words words; both
tools decode greedily (--temp 0) for -n tokens (a run that stops early at an end-of-generation token is
an error), KV cache f32 on both sides (-ctk/-ctv f32).
Each tool runs as its own process and reports its own timings in llama.cpp's format: "prompt eval time"
(the batched prefill) and "eval time" (the one-token steps); load and warm-up are outside both. With
--rounds R the tools alternate R times and the best run of each counts (a load spike then hits both
alike). Printed first: the CPU (lscpu's model name), the matmul path ggtrain takes, the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

from benchutil import load_average

REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

_PROMPT_RE = re.compile(r"prompt eval time = +([0-9.]+) ms / +(\d+) tokens")
_EVAL_RE = re.compile(r"\beval time = +([0-9.]+) ms / +(\d+) runs")
_MATMUL_RE = re.compile(r"generate: (int8|f32) matmul")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return m.group(1).strip() if m else "unknown"


def prompt_text(words: int) -> str:
    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
    return " ".join(text.split()[:words])


def rates(out: str, what: str) -> tuple[float, int, float, int]:
    """(prompt tokens/s, prompt tokens, generation tokens/s, eval runs) from llama.cpp-style timing lines."""
    p, e = _PROMPT_RE.search(out), _EVAL_RE.search(out)
    if p is None or e is None:
        raise SystemExit(f"no timing lines in {what}'s output:\n{out[-3000:]}")
    pm, pn, em, en = float(p.group(1)), int(p.group(2)), float(e.group(1)), int(e.group(2))
    return pn / pm * 1e3, pn, en / em * 1e3, en


def run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False,
                          env=dict(os.environ, LLAMA_LOG_COLORS="0"))
    if proc.returncode:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr + proc.stdout


def run_llama(model: Path, prompt: str, threads: int, ctx: int, n: int) -> tuple[tuple[float, int, float, int], str]:
    import llamacpp

    cmd = [str(llamacpp.binary("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0",
           "-no-cnv", "--no-display-prompt", "-c", str(ctx), "-t", str(threads), "-ctk", "f32", "-ctv", "f32"]
    out = run(cmd, "llama-completion")
    return rates(out, "llama-completion"), ""


def run_ggtrain(model: Path, prompt: str, threads: int, ctx: int, n: int) -> tuple[tuple[float, int, float, int], str]:
    cmd = [sys.executable, "-m", "ggtrain.cli.main", "generate", "-m", str(model), "-p", prompt, "-n", str(n),
           "--temp", "0", "--no-display-prompt", "-c", str(ctx), "-t", str(threads)]
    out = run(cmd, "ggtrain generate")
    m = _MATMUL_RE.search(out)
    return rates(out, "ggtrain generate"), m.group(1) if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads for both tools (default 2)")
    ap.add_argument("-n", "--n-predict", type=int, default=128, help="tokens generated per run (default 128)")
    ap.add_argument("-c", "--ctx", type=int, default=1024, help="context size of both (default 1024)")
    ap.add_argument("--prompt-words", type=int, default=300, help="words of GPL-3 in the prompt (default 300)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each tool; the best counts")
    args = ap.parse_args()

    from ggtrain.gguf.defaults import default_model_path

    model = args.model or default_model_path()
    prompt = prompt_text(args.prompt_words)
    print(f"CPU {cpu_model()}, {os.cpu_count()} logical cores; model {model.name}; threads {args.threads}, "
          f"ctx {args.ctx}, {args.n_predict} tokens generated after a {args.prompt_words}-word prompt; "
          f"{load_average()}", flush=True)
    best = {"ggtrain": [0.0, 0.0], "llama.cpp": [0.0, 0.0]}
    for r in range(args.rounds):
        for name, fn in (("llama.cpp", run_llama), ("ggtrain", run_ggtrain)):
            (pp, pn, tg, en), path = fn(model, prompt, args.threads, args.ctx, args.n_predict)
            if en != args.n_predict - 1:
                raise SystemExit(f"{name} stopped after {en + 1} tokens, not {args.n_predict}")
            best[name] = [max(best[name][0], pp), max(best[name][1], tg)]
            extra = f", {path} matmul" if path else ""
            print(f"round {r + 1} {name:9}: prompt {pp:8.1f} tokens/s ({pn} tokens), generation {tg:7.2f} "
                  f"tokens/s ({en} runs){extra}  {load_average()}", flush=True)
    g, lc = best["ggtrain"], best["llama.cpp"]
    print(f"best: ggtrain prompt {g[0]:.1f} / generation {g[1]:.2f} tokens/s; llama.cpp prompt {lc[0]:.1f} / "
          f"generation {lc[1]:.2f} tokens/s")
    print(f"ratio: prompt {g[0] / lc[0]:.3f}, generation {g[1] / lc[1]:.3f}")


if __name__ == "__main__":
    main()
