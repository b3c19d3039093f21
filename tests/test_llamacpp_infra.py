"""The reference itself: llama.cpp's source, its built tools, and tiny models it loads."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import llamacpp
import pytest
import tinymodels
from gguf.constants import GGMLQuantizationType as QT

ARCHS = tinymodels.ARCHS
QTYPES = ("F32", "Q8_0", "Q4_K")


def test_source_tree_has_models_folder(llamacpp_models):
    src = llamacpp.source_dir()
    assert (src / "CMakeLists.txt").is_file()
    assert (src / "src" / "models" / "gemma3.cpp").is_file()
    vocabs = sorted(llamacpp_models.glob("ggml-vocab-*.gguf"))
    assert len(vocabs) >= 10
    for name in ("llama-spm", "llama-bpe", "qwen2", "gpt-2"):
        assert (llamacpp_models / f"ggml-vocab-{name}.gguf").is_file()
        assert (llamacpp_models / f"ggml-vocab-{name}.gguf.inp").is_file()
        assert (llamacpp_models / f"ggml-vocab-{name}.gguf.out").is_file()
    assert len(list((llamacpp_models / "templates").glob("*.jinja"))) > 10
    # The vocab GGUFs are real files (not LFS pointers): gguf-py reads their token lists.
    r = gguf.GGUFReader(llamacpp_models / "ggml-vocab-llama-spm.gguf")
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 32000


@pytest.mark.parametrize("name", llamacpp.TARGETS)
def test_binary_runs(name):
    path = llamacpp.binary(name)
    assert path.is_file() and path.stat().st_mode & 0o111
    if name == "llama-quantize":  # no --version; --help prints usage
        proc = llamacpp.run(name, "--help", check=False)
        assert "usage:" in proc.stdout + proc.stderr
    else:
        proc = llamacpp.run(name, "--version")
        assert "version:" in proc.stdout + proc.stderr


def test_run_reports_failure():
    with pytest.raises(RuntimeError, match="exited with"):
        llamacpp.run("llama-perplexity", "-m", "/nonexistent/model.gguf", "-f", "/dev/null",
                     timeout=60)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_perplexity(arch, qtype, license_text):
    path = tinymodels.tiny_model(arch, qtype)
    cfg = tinymodels.model_config(arch)
    proc = llamacpp.run("llama-perplexity", "-m", path, "-f", license_text, "-c", "128", "-b", "128",
                        "-t", "2", "--chunks", "4", "-v")
    out = proc.stdout + proc.stderr
    # llama.cpp's loader: every matrix in the requested type (no llama-quantize mixture), the
    # 1-D tensors (norms, biases) F32.
    types = {t: int(n) for t, n in re.findall(r"llama_model_loader: - type +(\w+): +(\d+) tensors", out)}
    n_matrix = 2 + 7 * cfg["n_layer"] - (1 if cfg["tied"] or arch == "gemma2" else 0)
    n_vector = len(tinymodels.float_weights(arch)) - n_matrix
    assert types == ({"f32": n_matrix + n_vector} if qtype == "F32"
                     else {"f32": n_vector, qtype.lower().replace("q4_k", "q4_K"): n_matrix}), types
    n_vocab = int(re.search(r"print_info: n_vocab += (\d+)", out).group(1))
    assert n_vocab == (151936 if arch.startswith("qwen") else 32000)

    final, _err, chunks = llamacpp.parse_perplexity(out)
    assert len(chunks) == 4
    assert all(math.isfinite(c) and c > 1 for c in chunks)
    assert chunks[-1] == pytest.approx(final, rel=1e-6)
    # Random weights, logits of std ~1: a spread-out but not uniform distribution.
    assert n_vocab / 20 < final < n_vocab * 20, final
    # The helper the model tests use gives the same figures.
    assert llamacpp.perplexity(path, license_text, ctx=128, threads=2, chunks=4) == (final, chunks)


def test_quantized_models_share_weights():
    """Q8_0 is the F32 model quantized: the same weights within Q8_0's error."""
    f32 = gguf.GGUFReader(tinymodels.tiny_model("llama", "F32"))
    q8 = gguf.GGUFReader(tinymodels.tiny_model("llama", "Q8_0"))
    a = {t.name: t for t in f32.tensors}
    for t in q8.tensors:
        ref = a[t.name].data.reshape(-1)
        got = gguf.quants.dequantize(t.data, QT(t.tensor_type)).reshape(-1)
        assert got.shape == ref.shape
        assert abs(got - ref).max() <= abs(ref).max() / 100, t.name


def test_parse_perplexity_reads_the_final_line(license_text):
    path = tinymodels.tiny_model("gemma3", "Q8_0")
    proc = llamacpp.run("llama-perplexity", "-m", path, "-f", license_text, "-c", "128",
                        "-b", "128", "-t", "2", "--chunks", "3")
    out = proc.stdout + proc.stderr
    final, err, chunks = llamacpp.parse_perplexity(out)
    line = next(ln for ln in out.splitlines() if "Final estimate" in ln)
    assert f"PPL = {final:.4f}" in line and f"+/- {err:.5f}" in line
    assert len(chunks) == 3 and chunks[-1] == pytest.approx(final, rel=1e-6)
    with pytest.raises(ValueError, match="Final estimate"):
        llamacpp.parse_perplexity(out.replace("Final estimate", "x"))


def test_write_tiny_model_copies_the_cached_file(tmp_path):
    cached = tinymodels.tiny_model("gemma3", "Q8_0")
    assert tinymodels.write_tiny_model(None, "gemma3", "Q8_0") == cached
    out = tinymodels.write_tiny_model(tmp_path / "m.gguf", "gemma3", "Q8_0")
    assert out == tmp_path / "m.gguf" and out.read_bytes() == cached.read_bytes()
    with pytest.raises(TypeError, match="unknown tiny-model options"):
        tinymodels.tiny_model("llama", n_embed=64)
    with pytest.raises(ValueError, match="unsupported tiny-model type"):
        tinymodels.tiny_model("llama", "Q8_1")


def test_concurrent_writers_share_one_file(tmp_path):
    """Two processes asking for the same new model: one writes it (under the lock), both get it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    # The llama.cpp tree and tools come from the real cache; only the tiny models are new.
    (cache / f"llama.cpp-{llamacpp.VERSION}").symlink_to(llamacpp.cache_dir())
    code = ("import tinymodels; print(tinymodels.tiny_model('gemma3', 'Q8_0', seed=7, n_embd=64, "
            "n_head=2, n_head_kv=1, head_dim=32, n_ff=128))")
    env = {**os.environ, "GGTRAIN_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    path = Path(paths.pop())
    assert path.parent == cache / "tinymodels"
    assert [p.name for p in path.parent.glob("*.gguf*")] == [path.name]  # no temp files left
    r = gguf.GGUFReader(path)
    assert r.fields["gemma3.embedding_length"].contents() == 64


def test_cache_lock_nests_in_one_process_and_excludes_others(tmp_path):
    """bin_dir's build fetches the source under the lock it holds: the nested hold must not wait for
    itself (a second flock on a new open file would, forever), and other processes must still wait."""
    probe = ("import fcntl, sys\n"
             "f = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
    holder = ("import subprocess, sys, llamacpp\n"
              "with llamacpp._locked():\n"
              "    with llamacpp._locked():\n"
              "        pass\n"
              "    lock = llamacpp.cache_root() / f'llama.cpp-{llamacpp.VERSION}.lock'\n"
              f"    print(subprocess.run([sys.executable, '-c', {probe!r}, str(lock)], check=False).returncode)\n")
    out = subprocess.run([sys.executable, "-c", holder], cwd=Path(__file__).parent, capture_output=True, text=True,
                         env={**os.environ, "GGTRAIN_CACHE": str(tmp_path)}, timeout=120, check=False)
    assert out.returncode == 0, out.stderr  # a self-deadlock ends in TimeoutExpired
    assert out.stdout.strip() == "3"  # the outer hold, after the inner one ended, still locks another process out


def _flags(text: str) -> frozenset[str]:
    return frozenset(text.split())


def test_reference_build_names_the_cpu_levels_and_never_amx():
    """No -march=native / GGML_NATIVE: explicit levels from the CPU's flags, AMX always off."""
    xeon = _flags("sse2 sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512vl avx512dq avx512bw "
                  "avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")
    opts = llamacpp.simd_options(xeon)
    assert "-DGGML_NATIVE=OFF" in opts and "-DGGML_NATIVE=ON" not in opts
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX2=ON"} <= set(opts)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(opts)
    laptop = _flags("sse2 sse4_2 avx avx2 fma f16c bmi2")
    opts = llamacpp.simd_options(laptop)
    assert "-DGGML_AVX2=ON" in opts and "-DGGML_AVX512=OFF" in opts and "-DGGML_AVX512_VNNI=OFF" in opts
    # AVX512F without the rest of ggml's AVX512 set is not enough.
    assert "-DGGML_AVX512=OFF" in llamacpp.simd_options(laptop | {"avx512f"})
    assert llamacpp.simd_options(frozenset()) == ("-DGGML_NATIVE=OFF",)
    # The real build follows this CPU, and its cache is keyed by those options.
    assert set(llamacpp.simd_options()) <= set(llamacpp.CMAKE_OPTIONS)
    assert llamacpp.bin_dir().name == f"bin-{llamacpp.BUILD_KEY}"
    assert not any("march=native" in o or "NATIVE=ON" in o for o in llamacpp.CMAKE_OPTIONS)
