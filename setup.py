"""Build: Cython kernels from kernels/ are compiled with OpenMP into ggtrain.kernels.

kernels/, cli/ and data/ (as ggtrain.samples) are installed under the one ggtrain namespace (package_dir), so nothing called
`kernels` or `cli` lands in site-packages.

Portable flags only: no -march=native. Which source is built with which flags comes from the table
in kernels/variants.py (the run-time dispatcher in ggtrain.kernels reads the same table): a
NAME_simd.pyx is built once per SIMD level (NAME_base, NAME_avx2) and a NAME_vec.pyx once per vector
level (NAME_avx2, NAME_avx512; x86 only), and ggtrain.kernels picks one at run time from the CPU's
flags; a NAME_<variant>.pyx (int8mm_avx512, bf16mm_avx512bf16) is built only with that row's flags
(bf16mm_amx also a second time against a C emulation of its tile instructions: EMULATED).
"""

import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent


def _load_variants():
    """kernels/variants.py, by path: the package it belongs to is not installed at build time."""
    spec = importlib.util.spec_from_file_location("_ggtrain_kernel_variants", HERE / "kernels" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


V = _load_variants()
# -ffp-contract=off: no silent fused multiply-add, so dequantization stays bit-identical to gguf-py's numpy.
BASE_ARGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-unused-function", "-Wno-unreachable-code"]
# The variants' flags are x86 flags: elsewhere every SIMD level is the same portable code, and code
# that exists only for an x86 variant (NAME_avx512.pyx, NAME_avx512bf16.pyx) is not built.
X86 = sys.platform != "darwin" and any(m in platform.machine().lower() for m in ("x86", "amd64"))


# Variant-only sources also built as an emulated twin: source -> (module, macro, the twin's variant).
# bf16mm_amx.pyx with GG_AMX_EMULATE runs its tile instructions as kernels/amx_emulate.h's C.
EMULATED = {"bf16mm_amx": ("bf16mm_amxemu_avx512bf16", "GG_AMX_EMULATE", "avx512bf16")}


def variant_flags(variant: str) -> list[str]:
    return list(V.VARIANTS[variant].flags) if X86 else []


def kernel_extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "kernels").glob("*.pyx")):
        name = pyx.stem
        variant = V.variant_of(name)
        common = {
            "include_dirs": [np.get_include(), str(HERE / "kernels")],
            "extra_link_args": ["-fopenmp"],
            "define_macros": [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        }
        if name.endswith(("_simd", "_vec")):
            # One source, one module per level: NAME_simd.pyx -> NAME_base, NAME_avx2 (every platform);
            # NAME_vec.pyx -> NAME_avx2, NAME_avx512 (x86 only: intrinsics at the level's width).
            stem, _, kind = name.rpartition("_")
            levels = V.SIMD_LEVELS if kind == "simd" else V.VECTOR_LEVELS if X86 else ()
            for level in levels:
                src = HERE / "build" / kind / f"{stem}_{level}.pyx"
                src.parent.mkdir(parents=True, exist_ok=True)
                text = f'include "{pyx.resolve()}"\n'
                if not src.exists() or src.read_text() != text:
                    src.write_text(text)
                exts.append(Extension(f"ggtrain.kernels.{stem}_{level}", [str(src)],
                                      extra_compile_args=BASE_ARGS + variant_flags(level), **common))
        elif variant is not None and variant not in V.SIMD_LEVELS:
            if X86:  # code for one variant only (imported only where the CPU runs it)
                exts.append(Extension(f"ggtrain.kernels.{name}", [str(pyx.relative_to(HERE))],
                                      extra_compile_args=BASE_ARGS + variant_flags(variant), **common))
            if X86 and name in EMULATED:
                # the same source against C emulations of the variant's instructions: its logic
                # runs (and is tested) on CPUs without them
                twin, macro, twin_variant = EMULATED[name]
                src = HERE / "build" / "emulated" / f"{twin}.pyx"
                src.parent.mkdir(parents=True, exist_ok=True)
                text = f'include "{pyx.resolve()}"\n'
                if not src.exists() or src.read_text() != text:
                    src.write_text(text)
                exts.append(Extension(f"ggtrain.kernels.{twin}", [str(src)],
                                      extra_compile_args=BASE_ARGS + variant_flags(twin_variant),
                                      **{**common, "define_macros": common["define_macros"] + [(macro, "1")]}))
        else:
            exts.append(Extension(f"ggtrain.kernels.{name}", [str(pyx.relative_to(HERE))],
                                  extra_compile_args=BASE_ARGS, **common))
    return exts


setup(
    packages=["ggtrain", "ggtrain.gguf", "ggtrain.text", "ggtrain.dataset", "ggtrain.model", "ggtrain.adapters", "ggtrain.train", "ggtrain.generate", "ggtrain.kernels", "ggtrain.cli", "ggtrain.samples"],
    package_dir={"ggtrain": "ggtrain", "ggtrain.kernels": "kernels", "ggtrain.cli": "cli", "ggtrain.samples": "data"},
    package_data={"ggtrain.kernels": ["*.pxd", "*.pyx", "*.pxi", "*.h"], "ggtrain.samples": ["*.txt", "*.json", "*.jsonl", "*.csv", "*.tsv", "*.jinja"]},
    ext_modules=cythonize(
        kernel_extensions(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        include_path=[str(HERE / "kernels")],
    ),
    zip_safe=False,
)
