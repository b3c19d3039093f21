"""The whole model against llama.cpp itself: logits and perplexity on the same GGUF files.

Tiny random-weight models of every architecture (written by the tests, loaded by llama.cpp as
readily as real ones) and the real Gemma 3 270M Q4_K_M. llama.cpp quantizes activations to 8 bits
inside its quantized matmuls, so on quantized files its logits carry noise of ~1e-2 of their
scale; on F32 files the two forwards agree to float rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import llamacpp
import numpy as np
import pytest
from llamacpp_logits import llama_logits
from tinymodels import tiny_model

from ggtrain import kernels
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.model.perplexity import perplexity
from ggtrain.model.transformer import Batch, Model
from ggtrain.text.tokenizer import Tokenizer

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
LICENSE = "/usr/share/common-licenses/GPL-3"  # a text nobody here wrote


def our_last_logits(model: Model, ids: np.ndarray, n_last: int) -> np.ndarray:
    b = Batch.from_rows(ids[None], np.zeros((1, len(ids))), np.zeros((1, len(ids))))
    return model.logits(b, np.arange(len(ids) - n_last, len(ids)))


def assert_same_top1(ours: np.ndarray, ref: np.ndarray, noise: float) -> None:
    """Top-1 identical wherever llama.cpp's own winner leads by more than the two forwards' noise;
    in a near-tie (lead < noise) ours must pick one of llama.cpp's tied tokens."""
    for o, r in zip(ours, ref):
        top = r.max()
        if o.argmax() != r.argmax():
            assert r[o.argmax()] > top - noise, (
                f"top-1 differs: ours {o.argmax()} (llama.cpp logit {r[o.argmax()]:.4f}), "
                f"llama.cpp {r.argmax()} ({top:.4f}); noise {noise:.4f}")
            print(f"near-tie: ours {o.argmax()}, llama.cpp {r.argmax()}, lead {top - r[o.argmax()]:.4f}")


def our_perplexity(path, ctx: int, chunks: int, matmul: str = "f32") -> float:
    mf = ModelFile(path)
    tok = Tokenizer.from_model_file(mf)
    with open(LICENSE, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read(), add_special=True, parse_special=False), dtype=np.int32)
    ids = ids[:ctx * chunks]
    return perplexity(Model(mf, matmul=matmul), ids, ctx, 4 * ctx, tok.bos_id if tok.add_bos else None).ppl


# int8 (activations quantized as llama.cpp does) needs AVX512-VNNI; f32 runs everywhere
MATMULS = ["f32", pytest.param("int8", marks=pytest.mark.skipif(
    not kernels.int8_available(), reason="this CPU has no AVX512-VNNI: the int8 matmul cannot run here"))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_logits_match_llamacpp(arch: str, qtype: str) -> None:
    path = tiny_model(arch, qtype)
    model = Model(ModelFile(path))
    ids = np.random.default_rng(1).integers(10, 1000, 96).astype(np.int32)
    ref = llama_logits(path, ids, n_last=4)
    ours = our_last_logits(model, ids, 4)
    diff = np.abs(ref - ours).max()
    scale = np.abs(ref).max()
    print(f"{arch} {qtype}: max |logit diff| {diff:.5f} (logits up to {scale:.2f})")
    # F32: both compute in f32 (llama.cpp rounds some attention products to f16).
    # Quantized: llama.cpp's 8-bit activations dominate the difference.
    tol = (2e-3 if qtype == "F32" else 4e-2) * scale
    assert diff < tol
    assert_same_top1(ours, ref, noise=2 * diff)


@pytest.mark.parametrize("matmul", MATMULS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_perplexity_matches_llamacpp(arch: str, qtype: str, matmul: str) -> None:
    path = tiny_model(arch, qtype)
    ref, _ = llamacpp.perplexity(path, LICENSE, ctx=128, chunks=4)
    ours = our_perplexity(path, 128, 4, matmul)
    print(f"{arch} {qtype} {matmul}: PPL ours {ours:.4f} llama.cpp {ref:.4f}")
    assert abs(ours - ref) / ref < 0.01


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.skipif(not kernels.int8_available(), reason="this CPU has no AVX512-VNNI: the int8 matmul cannot run here")
def test_int8_logits_match_llamacpp_and_f32(arch: str, qtype: str) -> None:
    # llama.cpp quantizes activations too: int8 lands as close to it as f32 does (or closer), and
    # within int8's rounding of our own f32 forward
    path = tiny_model(arch, qtype)
    ids = np.random.default_rng(1).integers(10, 1000, 96).astype(np.int32)
    ref = llama_logits(path, ids, n_last=4)
    mf = ModelFile(path)
    f32 = our_last_logits(Model(mf), ids, 4)
    int8 = our_last_logits(Model(mf, matmul="int8"), ids, 4)
    scale = np.abs(ref).max()
    d_int8, d_f32, d_self = np.abs(int8 - ref).max(), np.abs(f32 - ref).max(), np.abs(int8 - f32).max()
    print(f"{arch} {qtype}: max |logit diff| int8 vs llama.cpp {d_int8:.5f}, f32 vs llama.cpp {d_f32:.5f}, "
          f"int8 vs f32 {d_self:.5f} (logits up to {scale:.2f})")
    assert d_int8 < 4e-2 * scale and d_self < 4e-2 * scale
    assert_same_top1(int8, ref, noise=2 * d_int8)


@pytest.mark.parametrize("matmul", MATMULS)
def test_gemma3_270m_perplexity_matches_llamacpp(matmul: str) -> None:
    path = default_model_path()
    ref, _ = llamacpp.perplexity(path, LICENSE, ctx=256, chunks=3)
    ours = our_perplexity(path, 256, 3, matmul)
    print(f"Gemma 3 270M Q4_K_M {matmul}: PPL ours {ours:.4f} llama.cpp {ref:.4f}")
    assert abs(ours - ref) / ref < 0.01


def test_gemma3_270m_logits_match_llamacpp() -> None:
    path = default_model_path()

    mf = ModelFile(path)
    tok = Tokenizer.from_model_file(mf)
    with open(LICENSE, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read()[:2000]), dtype=np.int32)[:160]
    ref_logits = llama_logits(path, ids, n_last=1)
    ours_logits = our_last_logits(Model(mf), ids, 1)
    err = np.abs(ref_logits - ours_logits)[0]
    scale = np.abs(ref_logits).max()
    rms = float(np.sqrt(np.mean(np.square(err))))
    print(f"Gemma 3 270M Q4_K_M: last-position |logit diff| max {err.max():.4f}, rms {rms:.4f} "
          f"(logits up to {scale:.2f})")
    # llama.cpp rounds activations to 8 bits inside its quantized matmuls: ~2% of the scale.
    assert rms < 0.03 * scale
    assert_same_top1(ours_logits, ref_logits, noise=2 * err.max())

    # The same weights without that rounding: llama.cpp on its own F32 dequantization of the file
    # (llama-quantize --allow-requantize ... F32) computes in f32 as we do.
    exact = llama_logits(dequantized_f32(path), ids, n_last=1)
    err32 = np.abs(exact - ours_logits).max()
    print(f"Gemma 3 270M, llama.cpp on the dequantized F32 copy: max |logit diff| {err32:.5f}")
    assert err32 < 1e-3 * np.abs(exact).max()
    assert ours_logits.argmax() == exact.argmax()


def dequantized_f32(path: Path) -> Path:
    """llama.cpp's F32 copy of a quantized GGUF (its own dequantization), cached."""
    out = llamacpp.cache_dir() / f"{path.stem}-{path.stat().st_size}-F32.gguf"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        llamacpp.run("llama-quantize", "--allow-requantize", path, tmp, "F32", "2", timeout=900)
        os.replace(tmp, out)
    return out
