"""llama.cpp's logits for a token sequence, from a small C++ tool linked against the cached build.

The tool (tests/c/llama_logits.cpp) is compiled once per source version into the llama.cpp cache,
against the static libraries the tool build leaves behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import llamacpp
import numpy as np

SOURCE = Path(__file__).parent / "c" / "llama_logits.cpp"


def tool() -> Path:
    """Path of the compiled llama_logits tool (built on first use, cached by source hash)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    exe = llamacpp.cache_dir() / "tools" / f"llama_logits-{digest}-{llamacpp.BUILD_KEY}"
    if exe.is_file():
        return exe
    llamacpp.bin_dir()  # the libraries come with the tools' build
    src, build = llamacpp.source_dir(), llamacpp.build_dir()
    libs = [build / "src" / "libllama.a", build / "ggml" / "src" / "libggml.a",
            build / "ggml" / "src" / "libggml-cpu.a", build / "ggml" / "src" / "libggml-base.a"]
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(".tmp")
    subprocess.run(["g++", "-O2", "-std=c++17", "-I", str(src / "include"), "-I", str(src / "ggml" / "include"),
                    str(SOURCE), *map(str, libs), "-fopenmp", "-lpthread", "-ldl", "-lm", "-o", str(tmp)],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, exe)
    return exe


def llama_logits(model: str | os.PathLike, tokens: np.ndarray, n_last: int = 1, threads: int = 2,
                 loras: list[tuple[str | os.PathLike, float]] = ()) -> np.ndarray:
    """f32 (n_last, n_vocab): llama.cpp's logits at the last n_last positions of `tokens` (one sequence)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok_file, out_file = Path(tmp) / "tokens.i32", Path(tmp) / "logits.f32"
        np.asarray(tokens, dtype="<i4").tofile(tok_file)
        args = [str(tool()), str(model), str(tok_file), str(out_file), str(n_last), str(threads)]
        for path, scale in loras:
            args += [str(path), str(scale)]
        proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"llama_logits failed ({proc.returncode}): {proc.stderr[-3000:]}")
        return np.fromfile(out_file, dtype="<f4").reshape(n_last, -1)
