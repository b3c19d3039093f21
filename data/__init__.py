"""Small sample datasets that ship with ggtrain (installed as ggtrain.samples)."""

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent


def sample_path(name: str) -> Path:
    """Path of a bundled sample file, e.g. sample_path("alpaca.json")."""
    return SAMPLES_DIR / name
