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
