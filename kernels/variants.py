"""Build variants of the compiled kernels: the compiler flags of each and the CPU features it needs.

One table read at both ends: setup.py builds the modules from it (loading this file by path, as the
package is not installed yet: it imports the standard library only), and ggtrain.kernels picks at
run time what this CPU can run. cpu_features() is the one place that asks the CPU.

How sources map to variants:
- NAME_simd.pyx is built at every SIMD level (SIMD_LEVELS) as NAME_<level>, the same source each
  time; at run time the best level the CPU runs is imported (GGTRAIN_SIMD overrides the choice).
- NAME_vec.pyx is built at every vector level (VECTOR_LEVELS) as NAME_avx2 and NAME_avx512, the
  same source each time, on x86 only: C kernels written once against simd_math.h, whose vector width
  follows the level's flags (8 or 16 floats); at run time the widest level the CPU runs is imported.
- NAME_<variant>.pyx, for a variant outside SIMD_LEVELS (int8mm_avx512.pyx), is code that exists
  for that variant only: built once with its flags, on x86 only, imported only on a CPU with all
  its features (GGTRAIN_AVX512=0 turns off every variant that needs AVX512).
- any other NAME.pyx is built with the common flags alone.
The bf16 kernels are the "avx512bf16" row: the avx512 row's flags plus -mavx512bf16, its features
plus "avx512_bf16" (bf16mm_avx512bf16.pyx: vdpbf16ps). The AMX kernel is one more row the same way:
"amx", those flags plus -mamx-tile -mamx-bf16 and features plus "amx_tile", "amx_bf16"
(bf16mm_amx.pyx; Linux also wants arch_prctl(ARCH_REQ_XCOMP_PERM) before the first tile
instruction, which ggtrain.kernels asks for). setup.py builds that source a second time against a C
emulation of the tile instructions, as bf16mm_amxemu_avx512bf16 (the avx512bf16 row): the tests run
the AMX kernel's logic on a CPU without AMX.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple


class Variant(NamedTuple):
    flags: tuple[str, ...]  # compiler flags on top of setup.py's common ones (x86 builds only)
    cpu: tuple[str, ...]  # CPU features those flags let the compiler use, named as in /proc/cpuinfo


_AVX2 = Variant(("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c"))
_AVX512 = Variant(_AVX2.flags + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"),
                  _AVX2.cpu + ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))

_AVX512BF16 = Variant(_AVX512.flags + ("-mavx512bf16",), _AVX512.cpu + ("avx512_bf16",))

VARIANTS: dict[str, Variant] = {
    "base": Variant((), ()),
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512bf16": _AVX512BF16,
    "amx": Variant(_AVX512BF16.flags + ("-mamx-tile", "-mamx-bf16"), _AVX512BF16.cpu + ("amx_tile", "amx_bf16")),
}

SIMD_LEVELS = ("base", "avx2")  # the levels every NAME_simd.pyx is built at, lowest first
VECTOR_LEVELS = ("avx2", "avx512")  # the levels every NAME_vec.pyx is built at (x86), narrowest first

# numpy's name of a feature where it is not the /proc/cpuinfo name upper-cased without "_"
_NUMPY_NAMES = {"fma": "FMA3"}


def numpy_name(feature: str) -> str:
    """numpy's name (its __cpu_features__ key) of a /proc/cpuinfo feature: 'FMA3' for 'fma'."""
    return _NUMPY_NAMES.get(feature, feature.upper().replace("_", ""))


def variant_of(module: str) -> str | None:
    """The variant a module name is built for: 'avx512' for int8mm_avx512, 'avx2' for quant_avx2;
    None for a module with the common flags only."""
    suffix = module.rpartition("_")[2]
    return suffix if "_" in module and suffix in VARIANTS else None


def cpuinfo_field(key: str) -> str | None:
    """The value of the first CPU's `key` line in /proc/cpuinfo ("flags", "vendor_id", "model name"),
    None without that file or line (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


@cache
def cpu_features() -> frozenset[str]:
    """This CPU's features, as Linux names them in /proc/cpuinfo's flags (the kernel lists only what
    programs may use: no AVX512 where the OS does not save its registers). Without that file (not
    Linux), numpy's own run-time detection, for the features VARIANTS names."""
    flags = cpuinfo_field("flags")
    if flags is not None:
        return frozenset(flags.split())
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    wanted = {f for v in VARIANTS.values() for f in v.cpu}
    return frozenset(f for f in wanted if __cpu_features__.get(numpy_name(f)))


@cache
def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where there is none."""
    return cpuinfo_field("vendor_id") or ""


def runs_on(variant: str, features: frozenset[str]) -> bool:
    """Whether a CPU with these features runs code built as `variant`."""
    return set(VARIANTS[variant].cpu) <= features


def best_simd_level(features: frozenset[str]) -> str:
    """The highest of SIMD_LEVELS a CPU with these features runs."""
    return [level for level in SIMD_LEVELS if runs_on(level, features)][-1]
