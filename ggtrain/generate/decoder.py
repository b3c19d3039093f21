"""Incremental decoding over ggtrain.model: the prompt prefilled in one batched pass, then a token a
step, each step attending over the KV cache (the prefix is never recomputed).

    dec = Decoder(model, n_ctx=4096)        # cache and per-layer objects made once
    logits = dec.eval(prompt_ids)           # positions 0 .. len-1, logits (vocab,) of the last
    logits = dec.eval([next_id])            # position len
    dec.truncate(n)                         # forget positions >= n (0: start over)

A block is the model's own (Model.block_forward's order: norm, q/k/v through the LoraLinear with
every adapter's fixed term, q/k norms, rope, attention, output, post-norms, the gated FFN); what
is new is only that k and v go into the cache and the queries attend over it
(kernels.kvattention). Adapters are the model's: `model.adapters` at their scales (and a trainable
LoRA, applied as a fixed term as it stands), so y = W x + Σ scale_i · (alpha_i / r_i) · B_i A_i x as
llama.cpp combines them. The base products run int8 (VNNI, as llama.cpp) where matmul resolves
to "int8", f32 elsewhere; the model itself is not switched (it may be training meanwhile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.generate.kvcache import KVCache
from ggtrain.gguf.arch import ROPE_NEOX
from ggtrain.kernels.activation import geglu_forward, swiglu_forward
from ggtrain.kernels.attention import attention_forward
from ggtrain.kernels.kvattention import attention_cached
from ggtrain.kernels.norm import rmsnorm_forward
from ggtrain.kernels.rope import rope_forward
from ggtrain.model.linear import LoraLinear, QWeight
from ggtrain.model.saved import PROJECTIONS
from ggtrain.model.transformer import Model, require_matmul, resolve_matmul


def _own_linear(lin: LoraLinear, matmul: str) -> LoraLinear:
    """lin with a QWeight of its own (same bytes, not copied), so the path chosen here leaves the model's alone."""
    base = QWeight(lin.base.data, lin.base.qtype, lin.base.shape)
    base.int8 = matmul == "int8" and kernels.int8_supported(base.qtype)
    base.compute = "bf16" if matmul == "bf16" else "f32"
    return LoraLinear(base, lin.terms, lin.bias)


@dataclass
class _Block:
    """What one layer's step needs, gathered once."""

    lin: dict[str, LoraLinear]  # projection -> its LoraLinear (adapters' terms included)
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    attn_post_norm: np.ndarray | None
    ffn_post_norm: np.ndarray | None
    window: int  # sliding window, 0 = global
    rope: np.ndarray  # (n_ctx, n_rot/2, 2): the cos/sin table of every position


class Decoder:
    """A decoding session over `model` with a KV cache of n_ctx positions."""

    def __init__(self, model: Model, n_ctx: int, matmul: str = "auto") -> None:
        hp = self.hp = model.hp
        if n_ctx < 1:
            raise GGTrainError(f"context size {n_ctx}: must be at least 1")
        self.model = model
        self.n_ctx = int(n_ctx)
        self.n_past = 0
        self.matmul, self.matmul_why = resolve_matmul(matmul)
        require_matmul(self.matmul)
        ropes = model._rope_tables(np.arange(self.n_ctx, dtype=np.int32))  # one table per (base, scale)
        self.blocks = []
        for il, L in enumerate(model.layers):
            lin = {t: _own_linear(model.linear(il, t), self.matmul) for t in PROJECTIONS}
            self.blocks.append(_Block(lin, L.attn_norm, L.ffn_norm, L.q_norm, L.k_norm, L.attn_post_norm,
                                      L.ffn_post_norm, hp.n_swa if hp.is_swa(il) else 0, ropes[il]))
        self.head = _own_linear(model.output_head(), self.matmul)
        self.cache = KVCache(hp, self.n_ctx)
        self.kv_bytes = self.cache.nbytes
        self._neox = hp.rope_type == ROPE_NEOX
        self._geglu = hp.ffn_act == "gelu_tanh"

    def warmup(self) -> None:
        """Evaluate two tokens and a step, then start over, as llama.cpp warms up before its first
        decode: pages in the mmap'd weights and compiles the kernels before anything is timed."""
        self.eval([0, 0])
        self.eval([0])
        self.truncate(0)

    def truncate(self, n: int) -> None:
        """Forget positions >= n (truncate(0) starts over); the cache's rows are reused."""
        if n < 0:
            raise ValueError(f"truncate({n})")
        self.n_past = min(self.n_past, int(n))

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append tokens at positions n_past.. (one batched pass however many) -> f32 logits (vocab,)
        of the last one."""
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1)
        n, p0 = int(ids.shape[0]), self.n_past
        if n == 0:
            raise ValueError("Decoder.eval needs at least one token")
        if p0 + n > self.n_ctx:
            raise GGTrainError(f"context full: {p0} tokens held + {n} new > the context size {self.n_ctx} "
                               "(raise -c/--ctx-size)")
        x = self.model.embed(ids)
        for il, blk in enumerate(self.blocks):
            x = self._block(il, blk, x, p0)
        self.n_past = p0 + n  # only once every layer holds the new positions (an interrupt leaves it as it was)
        hp = self.hp
        hf, _ = rmsnorm_forward(x[n - 1:], self.model.output_norm, hp.norm_eps)
        z = self.head.matmul(hf)[0]
        if hp.final_softcap:
            cap = np.float32(hp.final_softcap)
            z = cap * np.tanh(z / cap)
        return z

    def _block(self, il: int, b: _Block, x: np.ndarray, p0: int) -> np.ndarray:
        hp, lin = self.hp, b.lin
        n = x.shape[0]
        eps = hp.norm_eps
        h, _ = rmsnorm_forward(x, b.attn_norm, eps)
        q = lin["attn_q"].forward(h)[0].reshape(n, hp.n_head, hp.head_dim)
        k = lin["attn_k"].forward(h)[0].reshape(n, hp.n_head_kv, hp.head_dim)
        v = lin["attn_v"].forward(h)[0].reshape(n, hp.n_head_kv, hp.head_dim_v)
        if b.q_norm is not None:
            q, _ = rmsnorm_forward(q, b.q_norm, eps)
            k, _ = rmsnorm_forward(k, b.k_norm, eps)
        rope = b.rope[p0:p0 + n]
        q = rope_forward(q, rope, self._neox)
        k = rope_forward(k, rope, self._neox)
        self.cache.store(il, p0, k, v)
        if p0 == 0 and n > 1:  # a fresh prompt: the training forward's attention (AVX512 kernel) is the fastest
            a, _ = attention_forward(q, k, v, hp.attn_scale, hp.attn_softcap, b.window)
        else:
            a = attention_cached(q, self.cache.k[il], self.cache.v[il], p0, hp.attn_scale, hp.attn_softcap,
                                 b.window)
        o = lin["attn_output"].forward(a.reshape(n, hp.n_head * hp.head_dim_v))[0]
        if b.attn_post_norm is not None:
            o, _ = rmsnorm_forward(o, b.attn_post_norm, eps)
        x = x + o
        h, _ = rmsnorm_forward(x, b.ffn_norm, eps)
        g = lin["ffn_gate"].forward(h)[0]
        u = lin["ffn_up"].forward(h)[0]
        m = geglu_forward(g, u) if self._geglu else swiglu_forward(g, u)
        f = lin["ffn_down"].forward(m)[0]
        if b.ffn_post_norm is not None:
            f, _ = rmsnorm_forward(f, b.ffn_post_norm, eps)
        x += f
        return x
