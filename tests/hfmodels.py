"""Small random Hugging Face models, and their GGUF made by llama.cpp's own converter, for the PEFT tests.

    hf_dir = hf_model_dir("llama")        # config.json (with `architectures`), model.safetensors, tokenizer.model
    gguf = hf_gguf("llama")               # convert_hf_to_gguf.py hf_dir --outtype f32, cached
    model = load_hf_model("llama")        # transformers' model of hf_dir, float32, eval mode

One (architecture, seed) gives the same weights in both: the GGUF is the HF model run through
convert_hf_to_gguf.py of the llama.cpp tree the tests fetch (tests/llamacpp.py), so whatever the
converter does to the weights (llama's q/k row permutation, Gemma's norm + 1) is done to them.
The HF side is written from transformers' config classes (LlamaConfig, Qwen2Config, Qwen3Config,
Gemma2Config, Gemma3TextConfig) and save_pretrained; its weights are redrawn so activations stay
O(1) (transformers' 0.02-std init makes every logit ~0 and every LoRA effect invisible).

The tokenizer is a small SentencePiece BPE model trained on a text nobody here wrote (the GPL):
convert_hf_to_gguf reads tokenizer.model for all five architectures, and the vocabulary (1024
tokens) keeps the models tiny. Everything is cached under $GGTRAIN_CACHE/hfmodels/ (default
~/.cache/ggtrain), keyed by a hash of what it is made from, written to a temp name and renamed
when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp
from tinymodels import _locked

GENERATOR_VERSION = 1  # bump when what is written for the same key changes
ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
TEXT = Path("/usr/share/common-licenses/GPL-3")
N_VOCAB = 1024
DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}
HEAD_DIM = 16
# Per architecture: the config class, the HF architecture name, and what differs from DIMS. Gemma's
# window (16) is shorter than the tests' contexts, so the sliding-window layers differ from global.
ARCH_CONFIG: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              {"rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
               "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
               "head_dim": HEAD_DIM, "use_sliding_window": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "head_dim": HEAD_DIM,
                "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 16, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"rms_norm_eps": 1e-6, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                "sliding_window": 16, "hidden_activation": "gelu_pytorch_tanh"}),
}


def cache_dir() -> Path:
    d = llamacpp.cache_root() / "hfmodels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(*parts: Any) -> str:
    import transformers

    blob = json.dumps([GENERATOR_VERSION, transformers.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def tokenizer_model() -> Path:
    """A SentencePiece BPE tokenizer.model (N_VOCAB pieces, byte fallback, <unk>/<s>/</s> = 0/1/2)."""
    import sentencepiece as spm

    path = cache_dir() / f"spm-{N_VOCAB}-{_key('spm', N_VOCAB, spm.__version__)}.model"
    if path.is_file():
        return path
    with _locked(path.stem):
        if not path.is_file():
            buf = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(TEXT.read_text().splitlines()), model_writer=buf, vocab_size=N_VOCAB,
                model_type="bpe", byte_fallback=True, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                minloglevel=2)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
    return path


def hf_config(arch: str) -> Any:
    """The transformers config of the tiny arch model."""
    import transformers

    cls_name, hf_arch, extra = ARCH_CONFIG[arch]
    kw = {**DIMS, **extra, "vocab_size": N_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
          "architectures": [hf_arch], "torch_dtype": "float32"}
    return getattr(transformers, cls_name)(**kw)


def _redraw(model: Any, arch: str, seed: int) -> None:
    """Weights with O(1) activations: matrices N(0, 1/in), norms 1 + N(0, 0.1²) as applied (Gemma
    stores w with 1 + w applied), biases N(0, 0.1²), embeddings N(0, 1/d) (Gemma, which scales its
    input embeddings by √d and ties its head: N(0, 0.25/d))."""
    import torch

    rng = np.random.default_rng(seed)
    gemma = arch.startswith("gemma")
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is the same Parameter: visited once
            shape = tuple(p.shape)
            if name.endswith("embed_tokens.weight"):
                v = rng.standard_normal(shape) * ((0.5 if gemma else 1.0) / math.sqrt(d))
            elif "norm" in name:
                v = (0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(shape)
            elif p.ndim == 1:
                v = 0.1 * rng.standard_normal(shape)
            else:
                v = rng.standard_normal(shape) / math.sqrt(shape[1])
            p.copy_(torch.from_numpy(v.astype(np.float32)))


def hf_model_dir(arch: str, seed: int = 0) -> Path:
    """Cached directory of the tiny HF model: config.json, model.safetensors, tokenizer.model."""
    import transformers

    cfg = hf_config(arch)
    out = cache_dir() / f"hf-{arch}-s{seed}-{_key(arch, seed, cfg.to_dict())}"
    if (out / "config.json").is_file():
        return out
    with _locked(out.name):
        if (out / "config.json").is_file():
            return out
        import torch

        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(seed)
        model = getattr(transformers, ARCH_CONFIG[arch][1])(cfg).to(torch.float32)
        _redraw(model, arch, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(tokenizer_model(), tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
             "unk_token": "<unk>", "model_max_length": DIMS["max_position_embeddings"]}))
        os.replace(tmp, out)
    return out


def converter_env() -> dict[str, str]:
    """Environment for llama.cpp's convert_*.py: its own gguf-py first (as the scripts arrange)."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    return env


def run_converter(script: str, *args: str | os.PathLike, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py with this Python."""
    cmd = [sys.executable, str(llamacpp.source_dir() / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=converter_env(),
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return proc


def hf_gguf(arch: str, seed: int = 0) -> Path:
    """Cached F32 GGUF of the tiny HF model, written by llama.cpp's convert_hf_to_gguf.py."""
    src = hf_model_dir(arch, seed)
    path = cache_dir() / f"{src.name}-{llamacpp.VERSION}-F32.gguf"
    if path.is_file():
        return path
    with _locked(path.stem):
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            try:
                run_converter("convert_hf_to_gguf.py", src, "--outtype", "f32", "--outfile", tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return path


def load_hf_model(arch: str, seed: int = 0) -> Any:
    """transformers' model of hf_model_dir(arch), float32, eval mode (the eager attention, which
    applies Gemma's soft-capping)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_model_dir(arch, seed), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


if __name__ == "__main__":  # python tests/hfmodels.py llama -> the HF dir and its GGUF
    a = sys.argv[1] if len(sys.argv) > 1 else "llama"
    print(hf_model_dir(a))
    print(hf_gguf(a))
