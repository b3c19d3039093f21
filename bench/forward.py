"""Forward tokens/s of `ggtrain perplexity` against llama.cpp's `llama-perplexity`: same GGUF, text,
threads, ctx and chunks, measured in one run, and their ratio (target >= 0.5).

    python bench/forward.py [-m MODEL.gguf] [-t 2] [-c 512] [--chunks 8] [--rounds 1]

The text is licences from /usr/share/common-licenses laid end to end (a text nobody here wrote),
long enough for --chunks chunks. Each tool runs as its own process; the figure of each is the wall
time of its scoring phase only (model load and tokenization excluded): for ggtrain the
`perplexity: X tokens/s` line it prints, for llama-perplexity the log timestamps of its
"calculating perplexity" and "Final estimate" lines (chunks · ctx tokens between them). With
--rounds R the tools alternate R times (a load spike then hits both) and the best run of each counts.
The last line is `ratio: R` (ggtrain / llama.cpp).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# bench/tokenize.py would shadow the standard library's tokenize (numba, linecache import it): bench/
# goes to the end of the path, where only our helper module is looked up.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

from benchutil import load_average

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

LICENCES = Path("/usr/share/common-licenses")
# Licences in a fixed order, the long ones first; distinct texts (GPL is a link to GPL-3, etc.).
LICENCE_ORDER = ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-1.1", "GPL-2", "MPL-2.0", "Apache-2.0", "GFDL-1.2",
                 "GPL-1", "CC0-1.0", "Artistic", "LGPL-3", "BSD")
CHARS_PER_TOKEN = 3.0  # English licence text runs ~4.5 characters a token on Gemma's vocab: a margin

_STAMP_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) ")  # llama.cpp log timestamp: minutes.seconds.ms.us
_GG_RATE_RE = re.compile(r"perplexity: ([0-9.]+) tokens/s over ([0-9.]+) s")
_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)")


def bench_text(n_tokens: int, out: Path) -> Path:
    """Concatenate licences until the text surely holds n_tokens tokens."""
    parts: list[str] = []
    size = 0
    while size < n_tokens * CHARS_PER_TOKEN:
        for name in LICENCE_ORDER:
            p = LICENCES / name
            if p.is_file():
                parts.append(p.read_text(encoding="utf-8", errors="replace"))
                size += len(parts[-1])
            if size >= n_tokens * CHARS_PER_TOKEN:
                break
        if not parts:
            raise SystemExit(f"no licence texts in {LICENCES}")
    out.write_text("\n\n".join(parts), encoding="utf-8")
    return out


def _stamp_seconds(line: str) -> float | None:
    m = _STAMP_RE.match(line)
    if not m:
        return None
    mins, secs, ms, us = (int(g) for g in m.groups())
    return mins * 60 + secs + ms / 1e3 + us / 1e6


def run_llama(model: Path, text: Path, threads: int, ctx: int, chunks: int) -> tuple[float, float, float]:
    """(tokens/s, seconds, PPL) of llama-perplexity's scoring phase."""
    import llamacpp

    cmd = [str(llamacpp.binary("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
           "-b", str(ctx), "-t", str(threads), "-tb", str(threads), "--chunks", str(chunks),
           "--log-timestamps", "--log-prefix", "--log-colors", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"llama-perplexity failed ({proc.returncode}):\n{out[-3000:]}")
    t_start = t_end = None
    for line in out.splitlines():
        if "calculating perplexity over" in line:
            t_start = _stamp_seconds(line)
        elif "Final estimate" in line:
            t_end = _stamp_seconds(line)
    ppl = _FINAL_RE.search(out)
    if t_start is None or t_end is None or ppl is None:
        raise SystemExit("could not find the timed lines in llama-perplexity's log:\n" + out[-3000:])
    secs = t_end - t_start
    return chunks * ctx / secs, secs, float(ppl.group(1))


def run_ggtrain(model: Path, text: Path, threads: int, ctx: int, chunks: int) -> tuple[float, float, float]:
    """(tokens/s, seconds, PPL) of `ggtrain perplexity`'s scoring phase (the rate it prints)."""
    cmd = [sys.executable, "-m", "ggtrain.cli.main", "perplexity", "-m", str(model), "-f", str(text),
           "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--chunks", str(chunks)]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"ggtrain perplexity failed ({proc.returncode}):\n{out[-3000:]}")
    rate, ppl = _GG_RATE_RE.search(out), _FINAL_RE.search(out)
    if rate is None or ppl is None:
        raise SystemExit("could not find the rate and final PPL in ggtrain perplexity's output:\n" + out[-3000:])
    return float(rate.group(1)), float(rate.group(2)), float(ppl.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="GGUF model (default: the bundled Gemma 3 270M Q4_K_M)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads for both tools (default 2)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks scored per run (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of each tool; best counts")
    args = ap.parse_args()

    from ggtrain.gguf.defaults import default_model_path

    model = args.model or default_model_path()
    print(f"model {model.name}, threads {args.threads}, ctx {args.ctx}, {args.chunks} chunks "
          f"({args.chunks * args.ctx} tokens a run, batch = ctx), {load_average()}", flush=True)
    best = {"ggtrain": 0.0, "llama.cpp": 0.0}
    with tempfile.TemporaryDirectory(prefix="ggtrain-bench-") as tmp:
        text = bench_text((args.chunks + 1) * args.ctx, Path(tmp) / "licences.txt")
        for r in range(args.rounds):
            for name, fn in (("llama.cpp", run_llama), ("ggtrain", run_ggtrain)):
                rate, secs, ppl = fn(model, text, args.threads, args.ctx, args.chunks)
                best[name] = max(best[name], rate)
                print(f"round {r + 1} {name:9}: {rate:8.1f} tokens/s  ({args.chunks * args.ctx} tokens in "
                      f"{secs:6.1f} s, PPL {ppl:.4f})  {load_average()}", flush=True)
    print(f"best: ggtrain {best['ggtrain']:.1f} tokens/s, llama.cpp {best['llama.cpp']:.1f} tokens/s")
    print(f"ratio: {best['ggtrain'] / best['llama.cpp']:.3f}")


if __name__ == "__main__":
    main()
