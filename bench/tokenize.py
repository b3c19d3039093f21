"""Tokenizer throughput on English text, one thread: MB/s of UTF-8 input for the SentencePiece
family (Gemma 3 vocab) and byte-level BPE (llama-bpe and qwen2 vocabs from llama.cpp's models/).

    python bench/tokenize.py [--repeat 4] [--no-llamacpp]

The text is every file in /usr/share/common-licenses concatenated, repeated --repeat times.
When llama-tokenize is already built (tests/llamacpp.py caches it), the same text goes through it
too: its time is the run on the text minus a run on one word (model loading), so it includes
printing the ids; speed-up = llama.cpp's time / ours, and the ids are checked to be identical.
MB/s is wall time (best of 3); "MB/s cpu" uses this process's CPU time, steadier on a busy machine.
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib's `tokenize` (which linecache/inspect import): keep bench/
# off the import path so `import tokenize` still finds the stdlib one.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import ast
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llamacpp

from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.text.tokenizer import Tokenizer


def english_text(repeat: int) -> str:
    files = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file() and not p.is_symlink())
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in files) * repeat


def llama_tokenize_seconds(model: Path, text: str) -> tuple[float, list[int]] | None:
    exe = llamacpp.cache_dir() / "bin" / "llama-tokenize"
    if not exe.is_file():
        return None
    with tempfile.TemporaryDirectory() as d:
        full, tiny = Path(d) / "full.txt", Path(d) / "tiny.txt"
        full.write_text(text, encoding="utf-8")
        tiny.write_text("Hello", encoding="utf-8")
        times = {}
        for f in (tiny, full):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                out = llamacpp.run("llama-tokenize", "-m", model, "-f", f, "--ids", "--log-disable",
                                   "--no-escape").stdout
                best = min(best, time.perf_counter() - t0)
            times[f] = best
        return times[full] - times[tiny], ast.literal_eval(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=4, help="copies of the license texts (default 4)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama-tokenize comparison")
    args = ap.parse_args()
    try:
        from ggtrain.threads import set_threads
        set_threads(1)
    except ImportError:
        pass

    text = english_text(args.repeat)
    mb = len(text.encode("utf-8")) / 1e6
    models = [("SPM  gemma-3 (262144)", default_model_path()),
              ("BPE  llama-bpe", llamacpp.models_dir() / "ggml-vocab-llama-bpe.gguf"),
              ("BPE  qwen2", llamacpp.models_dir() / "ggml-vocab-qwen2.gguf")]
    print(f"text: {mb:.2f} MB of English (common-licenses x{args.repeat}), 1 thread")
    print(f"{'vocabulary':<24} {'load s':>7} {'encode s':>9} {'MB/s':>7} {'MB/s cpu':>8} {'tokens':>8} "
          f"{'llama.cpp s':>11} {'speed-up':>8} same")
    for label, path in models:
        t0 = time.perf_counter()
        tok = Tokenizer.from_model_file(ModelFile(path, check_types=False))
        load = time.perf_counter() - t0
        tok.encode("warm up: compile <s> once")
        best = cpu = float("inf")
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            ids = tok.encode(text)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        line = f"{label:<24} {load:>7.2f} {best:>9.3f} {mb / best:>7.2f} {mb / cpu:>8.2f} {len(ids):>8}"
        ref = None if args.no_llamacpp else llama_tokenize_seconds(path, text)
        if ref is not None:
            secs, ref_ids = ref
            line += f" {secs:>11.3f} {secs / best:>7.2f}x {'yes' if ref_ids == ids else 'NO'}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
