"""ggtrain: LoRA fine-tuning directly on quantized GGUF models, on the CPU."""

import os

# Numba's compiled-kernel cache goes under the user's cache directory, not into the installed
# package: pip uninstall leaves files it did not install behind, and that leftover ggtrain/ folder
# turns the next install's package into a broken namespace package (site-packages may also be
# read-only). Set before anything imports numba; an explicit NUMBA_CACHE_DIR wins.
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ggtrain", "numba"))

__version__ = "0.1.0"
