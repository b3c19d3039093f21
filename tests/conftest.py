"""Shared fixtures: the real model, a text nobody here wrote, llama.cpp's models/ folder.

tests/ has no __init__.py: pytest puts this folder on sys.path, so tests (and bench scripts, after
`sys.path.insert(0, "<repo>/tests")`) import the helpers as plain modules: `import llamacpp`,
`import tinymodels`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp

# A text nobody on this project wrote, present on every Debian/Ubuntu machine.
LICENSE_TEXT = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (the default model, from its PyPI package)."""
    from ggtrain.gguf.defaults import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def license_text() -> Path:
    if not LICENSE_TEXT.is_file():
        raise FileNotFoundError(f"{LICENSE_TEXT} is missing: install the base-files package")
    return LICENSE_TEXT


@pytest.fixture(scope="session")
def llamacpp_models() -> Path:
    """llama.cpp's models/ folder (vocab-only GGUFs, .inp/.out vectors, templates/)."""
    return llamacpp.models_dir()
