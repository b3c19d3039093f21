"""Architectures ggtrain trains, and their hyper-parameters read from GGUF metadata.

Defaults and key names follow llama.cpp's loader (src/llama-model.cpp and src/models/*.cpp), so a
file means the same thing to both. Gemma's RMSNorm "1 + w" is already folded into the stored norm
weights by llama.cpp's converter, so every architecture here uses plain `x / rms * w`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ggtrain.errors import GGTrainError
from ggtrain.gguf.modelfile import ModelFile

ROPE_NORM = 0  # rotate pairs (2i, 2i+1): llama
ROPE_NEOX = 2  # rotate pairs (i, i + d/2): qwen2, qwen3, gemma

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
_ROPE_TYPE = {"llama": ROPE_NORM, "qwen2": ROPE_NEOX, "qwen3": ROPE_NEOX, "gemma2": ROPE_NEOX,
              "gemma3": ROPE_NEOX}
# Sliding-window layer pattern n: layer il is local when il % n < n - 1 (llama.cpp set_swa_pattern).
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


@dataclass
class HParams:
    """Everything the forward pass needs to know about a model's shape and numerics.

    It alone says which norms and options an architecture has (has_qk_norm, has_post_norms, ...):
    the model loads the tensors it names and the memory estimate counts what they keep."""

    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    head_dim_v: int
    n_ff: int
    norm_eps: float
    rope_type: int
    n_rot: int
    rope_freq_base: float
    rope_freq_scale: float  # 1 / linear scaling factor
    rope_scaling_type: str  # none | linear | yarn | llama3 (llama3 factors come from rope_freqs.weight)
    rope_scaling_orig_ctx: int
    rope_freq_base_swa: float
    rope_freq_scale_swa: float
    n_swa: int  # sliding window size, 0 = none
    swa_layers: list[bool] = field(default_factory=list)  # per layer: uses the sliding window
    attn_softcap: float = 0.0  # 0 = none
    final_softcap: float = 0.0
    attn_scale: float = 0.0  # multiplier of q·k; 1/sqrt(head_dim) unless the architecture says
    embd_scale: float = 1.0  # Gemma scales token embeddings by sqrt(n_embd)
    has_qk_norm: bool = False  # qwen3, gemma3: per-head RMSNorm of q and k (attn_q_norm, attn_k_norm)
    has_post_norms: bool = False  # Gemma: post-attention and post-FFN RMSNorm
    ffn_act: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    tied_output: bool = False

    def is_swa(self, il: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[il]

    def rope_base_scale(self, il: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of layer il: Gemma's local layers have their own."""
        if self.is_swa(il):
            return self.rope_freq_base_swa, self.rope_freq_scale_swa
        return self.rope_freq_base, self.rope_freq_scale


def _scalar_or_uniform(mf: ModelFile, key: str, value: Any) -> int:
    """head_count may be a per-layer array; ggtrain needs it the same on every layer."""
    if hasattr(value, "__len__") and not isinstance(value, str):
        vals = {int(v) for v in value}
        if len(vals) != 1:
            raise GGTrainError(f"{mf.path}: {key} differs between layers ({sorted(vals)}); "
                               "per-layer head counts are not supported")
        return vals.pop()
    return int(value)


def read_hparams(mf: ModelFile) -> HParams:
    """HParams of a model file; GGTrainError naming the file for anything unsupported or missing."""
    arch = mf.architecture
    if arch not in SUPPORTED_ARCHS:
        raise GGTrainError(f"{mf.path}: unsupported architecture '{arch}' "
                           f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def req(name: str) -> Any:
        key = f"{arch}.{name}"
        if key not in mf.metadata:
            raise GGTrainError(f"{mf.path}: missing metadata key {key}")
        return mf.metadata[key]

    def opt(name: str, default: Any) -> Any:
        return mf.metadata.get(f"{arch}.{name}", default)

    n_embd = int(req("embedding_length"))
    n_layer = int(req("block_count"))
    n_head = _scalar_or_uniform(mf, f"{arch}.attention.head_count", req("attention.head_count"))
    n_head_kv = _scalar_or_uniform(mf, f"{arch}.attention.head_count_kv",
                                   opt("attention.head_count_kv", n_head))
    n_ff = _scalar_or_uniform(mf, f"{arch}.feed_forward_length", req("feed_forward_length"))
    head_dim = int(opt("attention.key_length", n_embd // n_head))
    head_dim_v = int(opt("attention.value_length", n_embd // n_head))
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise GGTrainError(f"{mf.path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")

    if "token_embd.weight" not in mf.tensors:
        raise GGTrainError(f"{mf.path}: tensor 'token_embd.weight' is missing")
    n_vocab = int(opt("vocab_size", mf.tensors["token_embd.weight"].shape[0]))

    scaling_type = str(opt("rope.scaling.type", "linear"))
    factor = float(opt("rope.scaling.factor", opt("rope.scale_linear", 0.0)) or 0.0)
    freq_scale = 1.0 / factor if factor else 1.0
    if scaling_type == "linear" and freq_scale == 1.0:
        scaling_type = "none"
    if "rope_freqs.weight" in mf.tensors and scaling_type in ("none", "linear"):
        scaling_type = "llama3"  # llama 3.1+ ship their per-dimension factors as a tensor
    if scaling_type not in ("none", "linear", "yarn", "llama3"):
        raise GGTrainError(f"{mf.path}: unsupported rope scaling type '{scaling_type}'")
    n_ctx_train = int(opt("context_length", 2048))
    freq_base = float(opt("rope.freq_base", 10000.0))

    hp = HParams(
        arch=arch, n_vocab=n_vocab, n_ctx_train=n_ctx_train, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v, n_ff=n_ff,
        norm_eps=float(req("attention.layer_norm_rms_epsilon")), rope_type=_ROPE_TYPE[arch],
        n_rot=int(opt("rope.dimension_count", head_dim)), rope_freq_base=freq_base,
        rope_freq_scale=freq_scale, rope_scaling_type=scaling_type,
        rope_scaling_orig_ctx=int(opt("rope.scaling.original_context_length", n_ctx_train)),
        rope_freq_base_swa=freq_base, rope_freq_scale_swa=freq_scale, n_swa=0,
        # llama.cpp's gemma2 always uses token_embd as its head, even if a file has output.weight.
        tied_output=arch == "gemma2" or "output.weight" not in mf.tensors,
    )
    hp.attn_scale = 1.0 / math.sqrt(head_dim)

    if arch in ("qwen3", "gemma3"):  # both normalise q and k per head (attn_q_norm/attn_k_norm)
        hp.has_qk_norm = True
    if arch in ("gemma2", "gemma3"):
        hp.embd_scale = math.sqrt(n_embd)
        hp.has_post_norms = True
        hp.ffn_act = "gelu_tanh"
        # llama.cpp: 27B (46 layers in Gemma 2, 62 in Gemma 3) scales by n_embd/n_head, the others
        # by head_dim (gemma_pytorch config).
        is_27b = n_layer == (46 if arch == "gemma2" else 62)
        hp.attn_scale = 1.0 / math.sqrt(n_embd // n_head if is_27b else head_dim)
        # llama.cpp's defaults when the file is silent: Gemma 2 caps at 30, Gemma 3 does not.
        hp.final_softcap = float(opt("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0))
        n_swa = int(opt("attention.sliding_window", 4096 if arch == "gemma2" else 0))
        if n_swa > 0:
            hp.n_swa = n_swa
            pattern = opt("attention.sliding_window_pattern", _SWA_PATTERN[arch])
            if hasattr(pattern, "__len__"):
                hp.swa_layers = [bool(v) for v in pattern][:n_layer]
            else:
                p = int(pattern)
                hp.swa_layers = [p == 0 or il % p < p - 1 for il in range(n_layer)]
        if arch == "gemma2":
            hp.attn_softcap = float(opt("attn_logit_softcapping", 50.0))
            hp.rope_freq_base_swa = float(opt("rope.freq_base_swa", freq_base))
        else:
            # Gemma 3's local layers: base 10000 and no scaling unless the file says otherwise.
            hp.rope_freq_base_swa = float(opt("rope.freq_base_swa", 10000.0))
            hp.rope_freq_scale_swa = 1.0
    return hp
