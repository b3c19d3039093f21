"""ggtrain: LoRA fine-tuning directly on quantized GGUF models, on the CPU."""

import os

# Numba's compiled-kernel cache goes under the user's cache directory, not into the installed
# package: pip uninstall leaves files it did not install behind, and that leftover ggtrain/ folder
# turns the next install's package into a broken namespace package (site-packages may also be
# read-only). Set before anything imports numba; an explicit NUMBA_CACHE_DIR wins.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ggtrain", "numba"))

# OpenMP (libgomp: our kernels and Numba's pool) spins 300k rounds at every barrier before sleeping.
# On a shared machine the spinning threads take the cores the others need and every parallel region
# waits for a descheduled one: at load 5-6 on 2 cores a training step ran at 41 tokens/s by default,
# 68-71 with GOMP_SPINCOUNT=10000 (and 70-75 with OMP_WAIT_POLICY=passive); a short spin still keeps
# back-to-back regions cheap on a quiet machine. Before libgomp loads; the user's settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
