"""Adapters with trained-looking weights (B no longer zero), written with ggtrain's own writer, and the
CLI run in a subprocess as a user runs it. Importable as a plain module from tests/."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
import psutil

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
    """The one error line of a refused run: exit 2, no traceback (click's usage errors end with theirs)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith(("Error:", "ggtrain: error:"))]
    assert len(lines) == 1, r.stderr
    return lines[0]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r


def write_base(path, arch="llama", n_layer=2, d=64, ff=96, kv=32, output=True, name="tiny base",
               metadata: Callable[[gguf.GGUFWriter], None] | None = None) -> ModelFile:
    """A minimal GGUF with the tensors an adapter refers to (no tokenizer: ModelFile needs none);
    `metadata(writer)` adds keys of its own."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    if metadata is not None:
        metadata(w)
    w.add_tensor("token_embd.weight", rng.standard_normal((50, d)).astype(np.float32))
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
              "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    for il in range(n_layer):
        w.add_tensor(f"blk.{il}.attn_norm.weight", np.ones(d, np.float32))
        for t, s in shapes.items():
            w.add_tensor(f"blk.{il}.{t}.weight", rng.standard_normal(s).astype(np.float32))
    if output:
        w.add_tensor("output.weight", rng.standard_normal((50, d)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ModelFile(path)


def random_lora(base: ModelFile, config: LoraConfig, n_layer: int, seed=0, b_std=0.05) -> LoraWeights:
    lw = LoraWeights.init(config, target_shapes(base.tensors, config, n_layer), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for e in lw.entries.values():  # a trained-looking adapter: B is no longer zero
        e.B[...] = rng.standard_normal(e.B.shape).astype(np.float32) * np.float32(b_std)
    return lw


def peak_rss(proc: subprocess.Popen, interval: float = 0.01) -> int:
    """Peak RSS of a running child, sampled until it exits."""
    p, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(interval)
    return peak
