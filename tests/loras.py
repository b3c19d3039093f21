"""Adapters with trained-looking weights (B no longer zero), written with ggtrain's own writer, and the
CLI run in a subprocess as a user runs it. Importable as a plain module from tests/."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ggtrain.adapters.gguf_lora import write_gguf_adapter
from ggtrain.gguf.arch import read_hparams
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes

GGTRAIN = [sys.executable, "-m", "ggtrain.cli.main"]
TEXT = Path("/usr/share/common-licenses/GPL-3")


def random_adapter(base: str | Path, out: str | Path,
                   targets: Sequence[str] = ("attn_q", "attn_v", "ffn_down"), r: int = 4, alpha: float = 8.0,
                   b_std: float = 0.05, seed: int = 0,
                   ranks: dict[str, int] | None = None, extra_meta: dict | None = None) -> Path:
    """A LoRA for `base` (PEFT init for A, B ~ N(0, b_std²)), written as ggtrain writes adapters."""
    mf = ModelFile(base)
    try:
        cfg = LoraConfig.make(r=r, alpha=alpha, targets=targets, ranks=ranks)
        lw = LoraWeights.init(cfg, target_shapes(mf.tensors, cfg, read_hparams(mf).n_layer), seed=seed)
        rng = np.random.default_rng(seed + 1000)
        for e in lw.entries.values():
            e.B[...] = rng.standard_normal(e.B.shape).astype(np.float32) * np.float32(b_std)
        return write_gguf_adapter(out, lw, mf, extra_meta=extra_meta)
    finally:
        mf.close()


def ggtrain(*args: str | Path, timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GGTRAIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, check=False)


def refused(r: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run: exit 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith(("Error:", "ggtrain: error:"))]
    assert len(lines) == 1, r.stderr
    return lines[0]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r
