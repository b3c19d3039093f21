"""Small helpers shared by bench/forward.py, bench/train.py and bench/step_memory.py."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from typing_extensions import Self

MiB = 1 << 20


def load_average() -> str:
    """The machine's load, printed beside every figure (the cores are shared)."""
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f}"


def cpu_model() -> str:
    """lscpu's model name with the matrix/vector features that decide the kernel paths, e.g.
    'AMD EPYC (avx512, avx512_bf16, no amx)': figures from different CPUs of this machine kind stay apart."""
    name, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    feats = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(feats) or 'no AVX2'}{'' if 'amx_bf16' in flags else ', no amx'})"


def vm_hwm(pid: int | str = "self") -> int | None:
    """The kernel's exact peak RSS (VmHWM) of a live process, in bytes; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Samples a process's RSS (psutil) and its VmHWM in a thread; .peak is the larger seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.proc = psutil.Process(pid)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            rss = self.proc.memory_info().rss
        except psutil.Error:
            return
        self.peak = max(self.peak, rss, vm_hwm(self.pid) or 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_sampled(cmd: list[str], env: dict | None = None, cwd: str | None = None,
                timeout: float | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd, capturing its output, and return it with the process's peak RSS in bytes."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                         env=env, cwd=cwd)
    with p, PeakSampler(p.pid) as s:
        out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), s.peak


def text_training_step(model_path: Path | None, ctx: int, rows: int, rank: int, threads: int, compute: str,
                       checkpointing: bool = True, keep_ffn: bool = False):
    """One training step of the library on real text (the GPL from /usr/share/common-licenses, every
    token trained, tiled to ctx · rows tokens), LoRA r `rank` / alpha 2r on the 7 projections, AdamW:
    returns (step(seed) -> seconds, tokens a step, the compute path, why it runs) for
    bench/profile_step.py and bench/step_ops.py. Imports ggtrain when called (after a caller's patches)."""
    import numpy as np

    from ggtrain.gguf.arch import read_hparams
    from ggtrain.gguf.defaults import default_model_path
    from ggtrain.gguf.modelfile import ModelFile
    from ggtrain.model.lora import LoraConfig, LoraWeights, target_shapes
    from ggtrain.model.transformer import PROJECTIONS, Batch, Model, resolve_matmul
    from ggtrain.text.tokenizer import Tokenizer
    from ggtrain.threads import set_threads
    from ggtrain.train.optim import AdamW

    set_threads(threads)
    mf = ModelFile(model_path or default_model_path())
    hp = read_hparams(mf)
    mode, why = resolve_matmul(compute, training=True)
    model = Model(mf, hp, matmul=mode)
    n = ctx * rows
    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
    ids = np.asarray(Tokenizer.from_model_file(mf).encode(text), dtype=np.int32)
    ids = np.tile(ids, (n + 1) // len(ids) + 1)
    batch = Batch.from_rows(ids[:n].reshape(rows, ctx), ids[1:n + 1].reshape(rows, ctx),
                            np.ones((rows, ctx), np.float32))
    lcfg = LoraConfig.make(r=rank, alpha=2.0 * rank, targets=PROJECTIONS)
    lora = LoraWeights.init(lcfg, target_shapes(mf.tensors, lcfg, hp.n_layer), seed=0)
    model = model.with_trainable(lora)
    grads = lora.zeros_like()
    opt = AdamW({"lora": lora.flat}, lr=1e-4)

    def step(seed: int) -> float:
        grads.flat[...] = 0.0
        t0 = time.perf_counter()
        _, state = model.forward(batch, train=True, checkpointing=checkpointing, step_seed=seed, keep_ffn=keep_ffn)
        model.backward(state, grads)
        opt.step({"lora": grads.flat})
        return time.perf_counter() - t0

    return step, n, mode, why
