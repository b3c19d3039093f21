"""The kernels' shared tables: build variants (kernels/variants.py, read by setup.py and the
dispatcher), block layouts (kernels/quant_layout.h), the one parallel threshold, and start-up: the
light commands load no matmul code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ggtrain.kernels import variants
from gguf.constants import GGML_QUANT_SIZES

from ggtrain import kernels

REPO = Path(__file__).resolve().parent.parent
# Modules that hold or load the matmul code: the quantized matmul (and scipy's BLAS behind it), the
# int8 matmul, and every AVX512-only kernel.
MATMUL_MODULE_PREFIXES = ("ggtrain.kernels.quant_", "ggtrain.kernels.int8mm_")


def _matmul_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith(MATMUL_MODULE_PREFIXES)
            or (m.startswith("ggtrain.kernels.") and variants.variant_of(m.rpartition(".")[2]) is not None)]


# Runs the CLI in this (fresh) process, then prints every imported module's name as JSON on stderr.
_RUN_CLI = ("import json, sys\n"
            "from ggtrain.cli.main import main\n"
            "try:\n"
            "    main(sys.argv[1:], prog_name='ggtrain')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")


def _modules_after(*args: str) -> tuple[str, list[str]]:
    r = subprocess.run([sys.executable, "-c", _RUN_CLI, *args], capture_output=True, text=True, timeout=300,
                       check=True)
    return r.stdout, json.loads(r.stderr.strip().splitlines()[-1])


def test_help_loads_no_matmul_module_and_no_blas() -> None:
    out, modules = _modules_after("--help")
    assert "tokenize" in out and "finetune" in out
    assert _matmul_modules(modules) == []
    assert not [m for m in modules if m.startswith("scipy.linalg")]
    assert "ggtrain.threads" not in modules  # nothing set any BLAS's thread count


def test_tokenize_loads_no_matmul_module() -> None:
    out, modules = _modules_after("tokenize", "-p", "Hello", "--ids")
    assert out.strip() == "[2, 9259]"  # Gemma 3's BOS and "Hello"
    assert "ggtrain.kernels.bpe" in modules  # the tokenizer's own kernels did run
    assert _matmul_modules(modules) == []
    assert "ggtrain.threads" not in modules
    # (scipy.linalg itself is loaded here by Numba, whose CPU target looks for a BLAS at start-up)


def test_matmul_module_loads_on_first_use() -> None:
    code = ("import sys, numpy as np, ggtrain.kernels as k\n"
            "before = [m for m in sys.modules if m.startswith('ggtrain.kernels.quant_')]\n"
            "k.dequantize(np.zeros((1, 4), np.uint8), 0)\n"
            "print(before, [m for m in sys.modules if m.startswith('ggtrain.kernels.quant_')], k.simd_level)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert r.stdout.split() == ["[]", f"['ggtrain.kernels.quant_{kernels.simd_level}']", kernels.simd_level]


def test_setup_reads_the_same_variant_table_by_path() -> None:
    # setup.py loads kernels/variants.py by path, before the package exists: it must need nothing else
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('v', {str(REPO / 'kernels' / 'variants.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['v'] = m; spec.loader.exec_module(m)\n"
            "print(sorted(k for k in sys.modules if k.startswith(('ggtrain', 'numpy'))), "
            "{k: list(v.flags) for k, v in m.VARIANTS.items()})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == f"[] {({k: list(v.flags) for k, v in variants.VARIANTS.items()})}"


def test_every_built_module_is_a_row_of_the_table() -> None:
    package = Path(kernels.__file__).parent
    built = {p.name.split(".")[0] for p in package.glob("*.so")} | {p.name.split(".")[0] for p in package.glob("*.pyd")}
    assert {f"quant_{level}" for level in variants.SIMD_LEVELS} <= built
    for name in built:
        variant = variants.variant_of(name)
        if variant is not None:
            assert variant in variants.VARIANTS
    # the row a variant-only module is built for is what decides whether it runs here
    for name in ("int8mm_avx512", "attention_avx512", "loss_avx512", "activation_avx512"):
        if name in built:
            runs = variants.runs_on("avx512", variants.cpu_features())
            assert (kernels.variant_module(name) is not None) == runs


def test_vector_kernels_are_built_at_every_vector_level_and_the_widest_runs(monkeypatch) -> None:
    package = Path(kernels.__file__).parent
    built = {p.name.split(".")[0] for p in package.glob("*.so")} | {p.name.split(".")[0] for p in package.glob("*.pyd")}
    stems = sorted(p.stem[: -len("_vec")] for p in (REPO / "kernels").glob("*_vec.pyx"))
    assert stems == ["activation", "attention", "loss", "lowrank"]
    features = variants.cpu_features()
    for stem in stems:
        assert {f"{stem}_{level}" for level in variants.VECTOR_LEVELS} <= built  # x86 builds every level
        widest = [level for level in variants.VECTOR_LEVELS if variants.runs_on(level, features)]
        assert getattr(kernels.widest_module(stem), "__name__", None) == (
            f"ggtrain.kernels.{stem}_{widest[-1]}" if widest else None)
    monkeypatch.setenv("GGTRAIN_AVX512", "0")
    expected = "ggtrain.kernels.attention_avx2" if variants.runs_on("avx2", features) else None
    assert getattr(kernels.widest_module("attention"), "__name__", None) == expected


def test_avx512_off_switch_hides_the_avx512_rows(monkeypatch) -> None:
    monkeypatch.setenv("GGTRAIN_AVX512", "0")
    assert kernels.variant_module("int8mm_avx512") is None
    assert not any(f.startswith("avx512") for f in kernels._cpu_features())
    assert kernels._cpu_simd_level() == variants.best_simd_level(variants.cpu_features())  # AVX2 untouched


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo: the numpy fallback is what runs")
def test_cpu_features_agree_with_numpy() -> None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    features = variants.cpu_features()
    for name in {f for v in variants.VARIANTS.values() for f in v.cpu}:
        if variants.numpy_name(name) not in __cpu_features__:  # numpy does not detect AMX (amx_tile, amx_bf16)
            continue
        assert (name in features) == bool(__cpu_features__.get(variants.numpy_name(name))), name


def test_layout_header_matches_gguf() -> None:
    """quant_layout.h's type ids and block sizes, in both SIMD builds, against gguf-py; and the
    header lays out exactly the types the kernels say they support."""
    want = {int(t): GGML_QUANT_SIZES[t] for t in kernels.SUPPORTED_TYPES}
    for level in variants.SIMD_LEVELS:
        module = importlib.import_module(f"ggtrain.kernels.quant_{level}")
        assert module.type_table() == want


def test_one_parallel_threshold() -> None:
    from ggtrain.kernels import activation, norm, rope
    assert activation.PARALLEL_MIN is norm.PARALLEL_MIN is rope.PARALLEL_MIN is kernels.PARALLEL_MIN
    for path in (REPO / "kernels").glob("*.py*"):
        text = path.read_text()
        assert "PARALLEL_MIN = " not in text or path.name == "__init__.py", path.name
