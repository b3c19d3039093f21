"""Build: Cython kernels from kernels/ are compiled with OpenMP into ggtrain.kernels.

kernels/, cli/ and data/ (as ggtrain.samples) are installed under the one ggtrain namespace (package_dir), so nothing called
`kernels` or `cli` lands in site-packages.

Portable flags only: no -march=native. A kernel that wants wider SIMD is built twice from one
source, as `NAME_base` (baseline x86-64) and `NAME_avx2` (AVX2+FMA+F16C), and ggtrain.kernels
picks one at import time from the CPU's flags.
"""

import sys
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
# -ffp-contract=off: no silent fused multiply-add, so dequantization stays bit-identical to gguf-py's numpy.
BASE_ARGS = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-unused-function", "-Wno-unreachable-code"]
SIMD_VARIANTS = {"base": [], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
X86 = sys.platform != "darwin" and any(m in __import__("platform").machine().lower() for m in ("x86", "amd64"))
if not X86:
    SIMD_VARIANTS = {"base": [], "avx2": []}  # non-x86: both names, same portable code
# NAME_avx512.pyx: code that exists only for AVX512-VNNI CPUs (x86 only; imported only where it runs).
AVX512_ARGS = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]


def kernel_extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "kernels").glob("*.pyx")):
        name = pyx.stem
        common = {
            "include_dirs": [np.get_include(), str(HERE / "kernels")],
            "extra_link_args": ["-fopenmp"],
            "define_macros": [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        }
        if name.endswith("_simd"):
            # One source, one module per SIMD level: NAME_simd.pyx -> NAME_base, NAME_avx2.
            stem = name[: -len("_simd")]
            for level, flags in SIMD_VARIANTS.items():
                src = HERE / "build" / "simd" / f"{stem}_{level}.pyx"
                src.parent.mkdir(parents=True, exist_ok=True)
                text = f'include "{pyx.resolve()}"\n'
                if not src.exists() or src.read_text() != text:
                    src.write_text(text)
                exts.append(Extension(f"ggtrain.kernels.{stem}_{level}", [str(src)],
                                      extra_compile_args=BASE_ARGS + flags, **common))
        elif name.endswith("_avx512"):
            if X86:
                exts.append(Extension(f"ggtrain.kernels.{name}", [str(pyx.relative_to(HERE))],
                                      extra_compile_args=BASE_ARGS + AVX512_ARGS, **common))
        else:
            exts.append(Extension(f"ggtrain.kernels.{name}", [str(pyx.relative_to(HERE))],
                                  extra_compile_args=BASE_ARGS, **common))
    return exts


setup(
    packages=["ggtrain", "ggtrain.gguf", "ggtrain.text", "ggtrain.dataset", "ggtrain.model", "ggtrain.adapters", "ggtrain.train", "ggtrain.kernels", "ggtrain.cli", "ggtrain.samples"],
    package_dir={"ggtrain": "ggtrain", "ggtrain.kernels": "kernels", "ggtrain.cli": "cli", "ggtrain.samples": "data"},
    package_data={"ggtrain.kernels": ["*.pxd", "*.pyx", "*.h"], "ggtrain.samples": ["*.txt", "*.json", "*.jsonl", "*.csv", "*.tsv", "*.jinja"]},
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
