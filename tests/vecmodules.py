"""The NAME_vec.pyx kernels at one vector width, for the tests that run every width this CPU has."""

from types import ModuleType

import pytest

from ggtrain import kernels


def vec_module(stem: str, level: str) -> ModuleType:
    """ggtrain.kernels.<stem>_<level> (stem_vec.pyx built at that width); skips the test where this CPU
    (or GGTRAIN_AVX512=0) has no such level, so the module cannot run."""
    module = kernels.variant_module(f"{stem}_{level}")
    if module is None:
        pytest.skip(f"this CPU (or GGTRAIN_AVX512=0) has no {level}: {stem}_{level} cannot run here")
    return module
