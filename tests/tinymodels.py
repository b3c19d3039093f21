"""Small random-weight GGUF models that llama.cpp loads like real ones, for tests and benches.

    path = tiny_model("qwen3", "Q4_K")                      # cached, shared by every test
    path = write_tiny_model(tmp_path / "m.gguf", "llama", "Q8_0", n_layer=3, seed=1)  # a copy

Every quantization of one (arch, dims, seed) holds the same underlying float weights: the F32 model
is written first with gguf.GGUFWriter; other types are that model quantized, with gguf.quants where
gguf-py can quantize the type (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), otherwise with
`llama-quantize --pure` (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS). 1-D tensors (norms, biases)
stay F32, as llama.cpp's converter and quantizer keep them.

The vocabulary is a real one, copied from llama.cpp's models/ggml-vocab-*.gguf (SPM llama vocab of
32,000 tokens for llama/gemma, the 151,936-token BPE Qwen2 vocab for qwen2/qwen3), so llama.cpp
tokenizes text for these models exactly as for the real ones; token_embd has that many rows.

Files are cached under $GGTRAIN_CACHE/tinymodels/ (default ~/.cache/ggtrain), one per (generator
version, arch, type, dims, options, seed), written to a temp name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp

GENERATOR_VERSION = 3  # bump when the weights or metadata written for the same key change
ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")

VOCAB_FILE = {"llama": "ggml-vocab-llama-spm.gguf", "qwen2": "ggml-vocab-qwen2.gguf",
              "qwen3": "ggml-vocab-qwen2.gguf", "gemma2": "ggml-vocab-llama-spm.gguf",
              "gemma3": "ggml-vocab-llama-spm.gguf"}

# Dims whose rows are multiples of 256, so every K-quant applies to every matrix.
DEFAULT_DIMS: dict[str, Any] = {"n_embd": 256, "n_layer": 2, "n_head": 4, "n_head_kv": 2,
                                "head_dim": 64, "n_ff": 512, "n_ctx": 2048}

# Per-architecture defaults of the options below (as the real models of each family have them).
ARCH_OPTIONS: dict[str, dict[str, Any]] = {
    "llama": {"rope_freq_base": 10000.0, "norm_eps": 1e-5, "tied": False},
    "qwen2": {"rope_freq_base": 1000000.0, "norm_eps": 1e-6, "tied": True, "qkv_bias": True},
    "qwen3": {"rope_freq_base": 1000000.0, "norm_eps": 1e-6, "tied": True},
    # Gemma: small window and an explicit 2-layer pattern so a 2-layer model has a local and a
    # global layer and the window matters at ctx 128.
    "gemma2": {"rope_freq_base": 10000.0, "norm_eps": 1e-6, "tied": True, "n_swa": 32,
               "swa_pattern": 2, "attn_softcap": 50.0, "final_softcap": 30.0},
    "gemma3": {"rope_freq_base": 1000000.0, "rope_freq_base_swa": 10000.0, "norm_eps": 1e-6,
               "tied": True, "n_swa": 32, "swa_pattern": 2},
}
OPTION_NAMES = ("rope_freq_base", "rope_freq_base_swa", "norm_eps", "tied", "qkv_bias", "n_swa",
                "swa_pattern", "attn_softcap", "final_softcap", "rope_scaling_type",
                "rope_scaling_factor", "rope_scaling_orig_ctx")

GGUF_PY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Our type name -> llama-quantize's ftype name; with --pure every matrix gets exactly that type.
LLAMA_QUANTIZE_TYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M",
                        "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}
QTYPES = GGUF_PY_TYPES + tuple(LLAMA_QUANTIZE_TYPES)


def cache_dir() -> Path:
    d = llamacpp.cache_root() / "tinymodels"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    with open(cache_dir() / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def model_config(arch: str, **kw: Any) -> dict[str, Any]:
    """The full configuration (dims + options) a tiny model of arch is written with."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model architecture {arch!r} (have {ARCHS})")
    unknown = set(kw) - set(DEFAULT_DIMS) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown tiny-model options {sorted(unknown)}")
    # An option given as None is left out of the file (llama.cpp's default then applies).
    cfg = {**DEFAULT_DIMS, **ARCH_OPTIONS[arch], **kw}
    if arch == "qwen2":  # llama.cpp's qwen2 has no key_length: head dim is n_embd / n_head
        cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    if arch == "llama" and "head_dim" not in kw:
        cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    if cfg["n_head"] % cfg["n_head_kv"]:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if isinstance(cfg.get("swa_pattern"), (list, tuple)):
        cfg["swa_pattern"] = [bool(v) for v in cfg["swa_pattern"]]
    return cfg


def _key(arch: str, qtype: str, seed: int, cfg: dict[str, Any]) -> str:
    blob = json.dumps([GENERATOR_VERSION, arch, qtype, seed, cfg], sort_keys=True)
    return f"{arch}-{qtype}-s{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def tiny_model(arch: str, qtype: str = "F32", seed: int = 0, **kw: Any) -> Path:
    """Cached path of a tiny arch model in qtype (write it on first use). kw: dims and options."""
    qtype = qtype.upper()
    if qtype not in QTYPES:
        raise ValueError(f"unsupported tiny-model type {qtype!r} (have {QTYPES})")
    cfg = model_config(arch, **kw)
    name = _key(arch, qtype, seed, cfg)
    path = cache_dir() / f"{name}.gguf"
    if path.is_file():
        return path
    with _locked(name):
        if path.is_file():
            return path
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            if qtype in LLAMA_QUANTIZE_TYPES:
                src = tiny_model(arch, "F32", seed, **kw)
                llamacpp.run("llama-quantize", "--pure", src, tmp, LLAMA_QUANTIZE_TYPES[qtype], "2",
                             timeout=900)
            else:
                _write(tmp, arch, qtype, seed, cfg)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def write_tiny_model(path: str | os.PathLike | None, arch: str, qtype: str = "F32", seed: int = 0,
                     **kw: Any) -> Path:
    """Write a tiny model to path (a copy of the cached one) and return path.

    path=None returns the cached file itself (do not modify it). kw: any of DEFAULT_DIMS (n_embd,
    n_layer, n_head, n_head_kv, head_dim, n_ff, n_ctx) and OPTION_NAMES (rope_freq_base, norm_eps,
    tied, qkv_bias, n_swa, swa_pattern (int or per-layer bools), attn_softcap, final_softcap,
    rope_scaling_type/factor/orig_ctx, rope_freq_base_swa).
    """
    cached = tiny_model(arch, qtype, seed, **kw)
    if path is None:
        return cached
    path = Path(path)
    shutil.copyfile(cached, path)
    return path


def write_uncached(path: str | os.PathLike, arch: str, qtype: str = "F32", seed: int = 0,
                   **kw: Any) -> Path:
    """Write a tiny model of a type gguf-py quantizes (GGUF_PY_TYPES) to path, outside the cache."""
    if qtype not in GGUF_PY_TYPES:
        raise ValueError(f"write_uncached writes only {GGUF_PY_TYPES}, not {qtype!r}")
    _write(Path(path), arch, qtype, seed, model_config(arch, **kw))
    return Path(path)


# -- writing ------------------------------------------------------------------------------------
def _vocab_fields(arch: str) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """tokenizer.* metadata of the arch's vocab GGUF as (key, value, type, array element type).

    Read with gguf.GGUFReader (slow on a 150k-token vocab: ~30 s), then kept in a pickle.
    """
    src = llamacpp.models_dir() / VOCAB_FILE[arch]
    cached = cache_dir() / f"{src.stem}-{llamacpp.VERSION}.fields.pkl"
    if cached.is_file():
        with open(cached, "rb") as f:
            return pickle.load(f)
    with _locked(src.stem):
        if cached.is_file():
            with open(cached, "rb") as f:
                return pickle.load(f)
        reader = gguf.GGUFReader(src)
        out = []
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
            val = field.contents()
            if sub is not None and sub != gguf.GGUFValueType.STRING:
                val = list(val)
            out.append((key, val, vtype, sub))
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cached)
        return out


def _n_vocab(fields: list) -> int:
    for key, val, _, _ in fields:
        if key == "tokenizer.ggml.tokens":
            return len(val)
    raise RuntimeError("vocab GGUF without tokenizer.ggml.tokens")


def float_weights(arch: str, seed: int = 0, **kw: Any) -> dict[str, np.ndarray]:
    """The float32 weights of a tiny model by GGUF tensor name, shapes in numpy order (out, in).

    Scaled so activations stay O(1): matrices ~ N(0, 1/in), norms 1 + N(0, 0.1²), token
    embeddings ~ N(0, 1/n_embd) so logits through the head have std ≈ 1 (Gemma, which scales
    its input embeddings by √n_embd: N(0, 0.25/n_embd), else the tied head mostly predicts the
    current token again).
    """
    cfg = model_config(arch, **kw)
    rng = np.random.default_rng(seed)
    n_vocab = _n_vocab(_vocab_fields(arch))
    d, hd, nh, nkv, ff = cfg["n_embd"], cfg["head_dim"], cfg["n_head"], cfg["n_head_kv"], cfg["n_ff"]

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(cols)))

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    embd_std = (0.5 if arch.startswith("gemma") else 1.0) / math.sqrt(d)
    w["token_embd.weight"] = (rng.standard_normal((n_vocab, d), dtype=np.float32)
                              * np.float32(embd_std))
    for il in range(cfg["n_layer"]):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(d)
        w[p + "attn_q.weight"] = mat(nh * hd, d)
        w[p + "attn_k.weight"] = mat(nkv * hd, d)
        w[p + "attn_v.weight"] = mat(nkv * hd, d)
        if cfg.get("qkv_bias"):
            for n, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[p + f"attn_{n}.bias"] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
        if arch in ("qwen3", "gemma3"):
            w[p + "attn_q_norm.weight"] = norm(hd)
            w[p + "attn_k_norm.weight"] = norm(hd)
        w[p + "attn_output.weight"] = mat(d, nh * hd)
        if arch in ("gemma2", "gemma3"):
            w[p + "post_attention_norm.weight"] = norm(d)
        w[p + "ffn_norm.weight"] = norm(d)
        w[p + "ffn_gate.weight"] = mat(ff, d)
        w[p + "ffn_up.weight"] = mat(ff, d)
        w[p + "ffn_down.weight"] = mat(d, ff)
        if arch in ("gemma2", "gemma3"):
            w[p + "post_ffw_norm.weight"] = norm(d)
    w["output_norm.weight"] = norm(d)
    if not cfg["tied"] and arch != "gemma2":  # gemma2 always ties its head in llama.cpp
        w["output.weight"] = (rng.standard_normal((n_vocab, d), dtype=np.float32)
                              * np.float32(1.0 / math.sqrt(d)))
    return w


def _write(path: Path, arch: str, qtype: str, seed: int, cfg: dict[str, Any]) -> None:
    fields = _vocab_fields(arch)
    weights = float_weights(arch, seed, **cfg)
    n_vocab = weights["token_embd.weight"].shape[0]
    qt = QT[qtype]

    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}-s{seed}")  # the quantized copies keep it: no type in the name
    a = arch + "."
    w.add_uint32(a + "context_length", cfg["n_ctx"])
    w.add_uint32(a + "embedding_length", cfg["n_embd"])
    w.add_uint32(a + "block_count", cfg["n_layer"])
    w.add_uint32(a + "feed_forward_length", cfg["n_ff"])
    w.add_uint32(a + "attention.head_count", cfg["n_head"])
    w.add_uint32(a + "attention.head_count_kv", cfg["n_head_kv"])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg["norm_eps"])
    if cfg.get("rope_freq_base") is not None:
        w.add_float32(a + "rope.freq_base", cfg["rope_freq_base"])
    if arch == "llama":
        w.add_uint32(a + "vocab_size", n_vocab)
        w.add_uint32(a + "rope.dimension_count", cfg["head_dim"])
    if arch in ("qwen3", "gemma2", "gemma3") or cfg["head_dim"] != cfg["n_embd"] // cfg["n_head"]:
        w.add_uint32(a + "attention.key_length", cfg["head_dim"])
        w.add_uint32(a + "attention.value_length", cfg["head_dim"])
    if cfg.get("n_swa") is not None:
        w.add_uint32(a + "attention.sliding_window", cfg["n_swa"])
    pat = cfg.get("swa_pattern")
    if isinstance(pat, list):
        w.add_array(a + "attention.sliding_window_pattern", pat)
    elif pat is not None:
        w.add_uint32(a + "attention.sliding_window_pattern", int(pat))
    if cfg.get("rope_freq_base_swa") is not None:
        w.add_float32(a + "rope.freq_base_swa", cfg["rope_freq_base_swa"])
    if cfg.get("attn_softcap") is not None:
        w.add_float32(a + "attn_logit_softcapping", cfg["attn_softcap"])
    if cfg.get("final_softcap") is not None:
        w.add_float32(a + "final_logit_softcapping", cfg["final_softcap"])
    if cfg.get("rope_scaling_type"):
        w.add_string(a + "rope.scaling.type", cfg["rope_scaling_type"])
    if cfg.get("rope_scaling_factor"):
        w.add_float32(a + "rope.scaling.factor", float(cfg["rope_scaling_factor"]))
    if cfg.get("rope_scaling_orig_ctx"):
        w.add_uint32(a + "rope.scaling.original_context_length", cfg["rope_scaling_orig_ctx"])
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                     "BF16": 32}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, val, vtype, sub in fields:
        w.add_key_value(key, val, vtype, sub_type=sub)

    for name, arr in weights.items():
        if arr.ndim == 1 or qt == QT.F32:
            w.add_tensor(name, arr)
        elif qt == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":  # python tests/tinymodels.py llama Q4_K  -> prints the cached path
    print(tiny_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "F32"))
