"""The transformer over a quantized GGUF base with f32 LoRA: forward, loss and backward.

One step sees a flat batch of T tokens (B sequences of ctx tokens laid end to end); `positions`
restart per sample and `segments` keep attention inside a sample, so packing and batching are the
same thing to the model. Per block (llama, qwen2, qwen3, gemma2, gemma3):

    h  = rmsnorm(x, attn_norm)                      x (T, d)
    q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ (+bias, +LoRA)    (T, Hq·hd), (T, Hkv·hd), (T, Hkv·hdv)
    q, k = rmsnorm per head (qwen3, gemma3)
    q, k = rope(q), rope(k)
    a  = attention(q, k, v)                         causal, GQA, sliding window, soft-cap
    o  = a·Woᵀ (+LoRA); o = rmsnorm(o) (gemma)     (T, d)
    x2 = x + o
    h2 = rmsnorm(x2, ffn_norm)
    m  = act(h2·Wgᵀ) * (h2·Wuᵀ) (+LoRA)             (T, ff)   SwiGLU or GeGLU(tanh)
    f  = m·Wdᵀ (+LoRA); f = rmsnorm(f) (gemma)
    x3 = x2 + f
then rmsnorm(x, output_norm) and the chunked cross-entropy over the (tied or separate) head.

Only LoRA matrices and activations get gradients; base weights stay quantized and frozen. With
checkpointing (the default) a block keeps only its input and its attn_output and ffn_down outputs
(BlockCheckpoint; keep_ffn: the gate and up outputs too) and recomputes the rest in backward, the
products whose outputs it kept excepted.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.gguf.arch import ROPE_NEOX, HParams, read_hparams
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.kernels.activation import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from ggtrain.kernels.attention import attention_backward, attention_forward
from ggtrain.kernels.loss import CE_CHUNK, CrossEntropyStats, cross_entropy_backward, cross_entropy_forward
from ggtrain.kernels.norm import rmsnorm_backward, rmsnorm_forward
from ggtrain.kernels.rope import rope_backward, rope_cache, rope_forward
from ggtrain.model.linear import LoraLinear, LoraTerm, QWeight
from ggtrain.model.lora import (
    LoraEntry,
    LoraWeights,
    dropout_mask,
    lora_input_cache,
    lora_linear_forward,
    lora_shared_addends,
    lora_shared_backward,
    tensor_name,
)
from ggtrain.model.saved import PROJECTIONS, BlockCache, BlockCheckpoint, LoraCache


def _vector(mf: ModelFile, name: str) -> np.ndarray:
    """A small 1-D tensor (norm weight, bias) as f32."""
    t = mf.tensor(name)
    return kernels.dequantize(t.data, t.qtype).reshape(-1).astype(np.float32)


@dataclass
class Layer:
    """The frozen weights of one block."""

    attn_norm: np.ndarray
    w: dict[str, QWeight]  # projection -> weight
    bias: dict[str, np.ndarray]  # qwen2: attn_q/attn_k/attn_v biases
    ffn_norm: np.ndarray
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None


@dataclass
class Batch:
    """One flat batch: T tokens, the targets they predict and which targets are trained."""

    tokens: np.ndarray  # int32 (T,)
    targets: np.ndarray  # int32 (T,)
    mask: np.ndarray  # float32 (T,) 1 = trained target
    positions: np.ndarray  # int32 (T,) restart per sample
    segments: np.ndarray  # int32 (T,) attention stays within a segment

    @classmethod
    def from_rows(cls, tokens: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                  positions: np.ndarray | None = None, segments: np.ndarray | None = None) -> Batch:
        """(B, ctx) arrays -> one flat batch; each row its own segment unless segments are given."""
        tokens = np.asarray(tokens, dtype=np.int32)
        b, n = tokens.shape
        if positions is None:
            positions = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))
        if segments is None:
            segments = np.broadcast_to(np.arange(b, dtype=np.int32)[:, None], (b, n))
        else:  # make segment ids unique across rows
            segments = np.asarray(segments, dtype=np.int64) + (np.arange(b)[:, None] * (int(np.max(segments)) + 1))
        return cls(tokens.reshape(-1).copy(), np.asarray(targets, dtype=np.int32).reshape(-1).copy(),
                   np.asarray(mask, dtype=np.float32).reshape(-1).copy(),
                   np.ascontiguousarray(positions, dtype=np.int32).reshape(-1),
                   np.ascontiguousarray(segments, dtype=np.int32).reshape(-1))


@dataclass
class Adapter:
    """A fixed (inference) LoRA applied at some scale (--lora, --lora-scaled)."""

    lora: LoraWeights
    scale: float = 1.0


@dataclass
class StepState:
    """What backward needs from forward."""

    batch: Batch
    block_inputs: list[np.ndarray]  # per layer: its input x (T, d)
    caches: list[BlockCache | BlockCheckpoint | None]  # per layer: what its backward needs (a checkpoint:
    # the rest is recomputed)
    final_x: np.ndarray  # (T, d) input of the output norm
    final_rstd: np.ndarray
    final_h: np.ndarray  # (T, d) normed: the loss's input
    loss_state: CrossEntropyStats
    ropes: dict[int, np.ndarray] = field(default_factory=dict)
    seed: np.random.SeedSequence = field(default_factory=lambda: np.random.SeedSequence(0))
    train: bool = True


MATMUL_MODES = ("f32", "bf16", "int8")
TRAINING_MODES = ("f32", "bf16")  # the modes with a backward


def require_matmul(mode: str) -> None:
    """GGTrainError unless `mode` runs on this CPU (ValueError for a name that is no mode)."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"matmul mode {mode!r}: expected one of {', '.join(MATMUL_MODES)}")
    if mode == "int8" and not kernels.int8_available():
        raise GGTrainError("int8 matmul needs a CPU with AVX512-VNNI (this one has none); use f32")
    if mode == "bf16" and not kernels.bf16_available():
        raise GGTrainError("bf16 compute needs a CPU with AVX512-BF16 (this one has none, or GGTRAIN_BF16=0 / "
                           "GGTRAIN_AVX512=0 turned it off); use f32")


def bf16_kernel_text() -> str:
    """Which kernel the bf16 products run on, and why, for the start-up line (GGTrainError for
    GGTRAIN_AMX=1 where AMX does not run)."""
    if kernels.bf16_kernel() == "amx":
        return "kernel: AMX-BF16 tiles (tdpbf16ps)"
    return f"kernel: AVX512-BF16 vdpbf16ps, not AMX: {kernels.amx_missing()}"


def resolve_matmul(requested: str, training: bool = False) -> tuple[str, str]:
    """(mode, why) for a --compute/--matmul value: "auto" is int8 for inference on a CPU with
    AVX512-VNNI (llama.cpp's activations), else bf16 where it has AVX512-BF16 (training always, as
    int8 has no backward) unless kernels.bf16_slower() says f32 is faster, else f32; a named mode is
    taken as given (set_matmul checks it runs here).
    `why` is what the start-up line prints (for bf16, also which kernel: AMX tiles or vdpbf16ps)."""
    if requested not in ("auto", *MATMUL_MODES) or (training and requested == "int8"):
        allowed = ("auto", *TRAINING_MODES) if training else ("auto", *MATMUL_MODES)
        raise ValueError(f"compute {requested!r}: expected one of {', '.join(allowed)}")
    if requested != "auto":
        if requested == "bf16" and kernels.bf16_available():
            return requested, f"--compute bf16; {bf16_kernel_text()}"
        return requested, f"--compute {requested}"
    if not training and kernels.int8_available():
        return "int8", "auto: this CPU has AVX512-VNNI (llama.cpp's int8 activations)"
    if training and kernels.bf16_kernel() is not None:
        slower = kernels.bf16_slower()
        if slower:
            return "f32", f"auto: {slower}"
        return "bf16", f"auto: this CPU has AVX512-BF16 dot products; {bf16_kernel_text()}"
    if not training:
        return "f32", "auto: this CPU has no AVX512-VNNI"
    return "f32", f"auto: {kernels.bf16_missing()}"


class Model:
    """A GGUF model's frozen base plus LoRA adapters: forward, loss, backward.

    `adapters` are fixed LoRAs applied at inference; the LoRA being trained is given once, by
    `with_trainable(lora)`, which returns the model that trains it (this one is left as it is).
    matmul "f32" (the default) multiplies by dequantized f32 tiles; "bf16" rounds the activations (or
    output gradients) and the dequantized tiles to bf16 for the products with the frozen base, which
    accumulate in f32 (AVX512-BF16 CPUs; everything else stays f32); both train. "int8" quantizes
    activations to int8 as llama.cpp does (qmatmul_int8), for evaluation only.
    """

    def __init__(self, mf: ModelFile, hp: HParams | None = None, matmul: str = "f32"):
        self.mf = mf
        self.hp = hp or read_hparams(mf)
        hp = self.hp
        t = mf.tensor("token_embd.weight")
        self.tok_embd = QWeight(t.data, t.qtype, t.shape)
        self.output_norm = _vector(mf, "output_norm.weight")
        out = mf.tensors.get("output.weight", t)
        self.head = QWeight(out.data, out.qtype, out.shape)
        self.rope_freqs = _vector(mf, "rope_freqs.weight") if "rope_freqs.weight" in mf.tensors else None
        self.layers = [self._load_layer(il) for il in range(hp.n_layer)]
        self.adapters: list[Adapter] = []  # inference-time adapters (not trained)
        self._trainable: LoraWeights | None = None
        self.matmul = "f32"
        self.set_matmul(matmul)

    @property
    def trainable(self) -> LoraWeights | None:
        """The LoRA this model trains (forward keeps its inputs, backward gives its gradients)."""
        return self._trainable

    def with_trainable(self, lora: LoraWeights) -> Model:
        """This model training `lora`: the same frozen weights (not copied) and the same adapters;
        self is not changed."""
        m = copy.copy(self)
        m._trainable = lora
        m.adapters = list(self.adapters)
        return m

    def warmup(self) -> None:
        """One tiny evaluation forward (2 tokens), as llama.cpp runs before its first decode: pages in
        the mmap'd weights and pays first-call costs before anything is timed."""
        ids = np.zeros((1, 2), dtype=np.int32)
        self.forward(Batch.from_rows(ids, ids, np.ones(ids.shape, np.float32)), train=False)

    def base_weights(self) -> list[QWeight]:
        return [self.tok_embd, self.head] + [w for layer in self.layers for w in layer.w.values()]

    def set_matmul(self, mode: str) -> None:
        """Switch every base product to "f32", "bf16" (needs kernels.bf16_available()) or "int8"
        (needs kernels.int8_available(); F32/F16/BF16 weights keep the f32 product)."""
        require_matmul(mode)
        self.matmul = mode
        for w in self.base_weights():
            w.int8 = mode == "int8" and kernels.int8_supported(w.qtype)
            w.compute = "bf16" if mode == "bf16" else "f32"

    def _load_layer(self, il: int) -> Layer:
        mf, p, hp = self.mf, f"blk.{il}.", self.hp
        w = {}
        for name in PROJECTIONS:
            t = mf.tensor(p + name + ".weight")
            w[name] = QWeight(t.data, t.qtype, t.shape)
        bias = {n: _vector(mf, p + n + ".bias") for n in ("attn_q", "attn_k", "attn_v")
                if p + n + ".bias" in mf.tensors}
        layer = Layer(_vector(mf, p + "attn_norm.weight"), w, bias, _vector(mf, p + "ffn_norm.weight"))
        if hp.has_qk_norm:
            layer.q_norm = _vector(mf, p + "attn_q_norm.weight")
            layer.k_norm = _vector(mf, p + "attn_k_norm.weight")
        if hp.has_post_norms:
            layer.attn_post_norm = _vector(mf, p + "post_attention_norm.weight")
            layer.ffn_post_norm = _vector(mf, p + "post_ffw_norm.weight")
        return layer

    # -- the LoRA layers -----------------------------------------------------------------------
    def linear(self, il: int | None, target: str, trainable: bool = True) -> LoraLinear:
        """Projection `target` of block il ("output", il None: the LM head) with every adapter on it:
        the inference adapters' terms, then the trainable LoRA's (left out with trainable=False)."""
        name = tensor_name(target, il)
        if target == "output":
            base, bias = self.head, None
        else:
            base, bias = self.layers[il].w[target], self.layers[il].bias.get(target)
        terms = [LoraTerm.of(ad.lora[name], ad.scale) for ad in self.adapters if name in ad.lora]
        if trainable and self._trainable is not None and name in self._trainable:
            terms.append(LoraTerm.of(self._trainable[name], trainable=True))
        return LoraLinear(base, terms, bias)

    def _trained(self, il: int, targets: Sequence[str]) -> list[tuple[int, LoraEntry]]:
        """(index in targets, trainable LoRA entry) of the targets of block il that are trained."""
        lw = self._trainable
        return [] if lw is None else [(i, lw[tensor_name(t, il)]) for i, t in enumerate(targets)
                                      if tensor_name(t, il) in lw]

    def project(self, il: int, targets: Sequence[str], x: np.ndarray, rng: np.random.Generator | None,
                keep: bool, caches: dict[str, LoraCache], kept: Sequence[np.ndarray | None] | None = None
                ) -> list[np.ndarray | None]:
        """The projections `targets` of block il that share their input x (T, in): q/k/v, gate/up, or a
        single one. Each base product (with bias and inference adapters) by itself, all reading one
        rounding of x under bf16 (QWeight.round_input); the trained LoRA terms' first products together
        (lora_shared_addends: x·[A_q; A_k; A_v]ᵀ is one product), their second added by the base
        products as they store their outputs (no second pass over the outputs). A term with
        dropout (rng given) draws its own mask, in target order, and runs alone. keep: the trained
        terms' caches go into `caches` by target. kept: the outputs, kept by a checkpoint (None where
        nothing reads one): no product is made, the caches (and masks) are made as they would be."""
        trained = self._trained(il, targets)
        dropped = [(i, e) for i, e in trained if rng is not None and e.dropout > 0.0]
        together = [(i, e) for i, e in trained if not (rng is not None and e.dropout > 0.0)]
        addends: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if together:  # added by the base products as they store their outputs
            lcs, adds = lora_shared_addends(x, [e.A for _, e in together], [e.B for _, e in together],
                                            [e.scale for _, e in together])
            addends = {i: a for (i, _), a in zip(together, adds)}
            if keep:
                caches.update((targets[i], lc) for (i, _), lc in zip(together, lcs))
        if kept is not None:
            for i, e in dropped:
                lc = lora_input_cache(x, e.A, dropout_mask(rng, x.shape, e.dropout))
                if keep:
                    caches[targets[i]] = lc
            return list(kept)
        xb = self.layers[il].w[targets[0]].round_input(x)  # one bf16 rounding of x for all of them (or x)
        ys = [self.linear(il, t, trainable=False).forward(x, x_base=xb, addend=addends.get(i))[0]
              for i, t in enumerate(targets)]
        del xb
        for i, e in dropped:
            _, lc = lora_linear_forward(x, ys[i], e.A, e.B, e.scale, dropout_mask(rng, x.shape, e.dropout))
            if keep:
                caches[targets[i]] = lc
        return ys

    def project_back(self, il: int, targets: Sequence[str], dys: Sequence[np.ndarray],
                     caches: dict[str, LoraCache], grads: LoraWeights,
                     scratch: np.ndarray | None = None) -> np.ndarray:
        """The backward of project(): dL/dx (T, in) summed over the targets; the trained terms' dA, dB
        added into grads. The base products after the first are written into `scratch` (T, in) when
        given (a buffer reused across calls), then added; the trained terms' LoRA parts are one
        product per group of terms sharing their input, added by the first base product (kernels'
        addend) or, for a term with dropout, after them."""
        groups: dict[int, list[int]] = {}  # id(input) -> indices of the terms reading it
        trained = self._trained(il, targets)
        for i, _ in trained:
            groups.setdefault(id(caches[targets[i]].xd), []).append(i)
        entries = dict(trained)
        addend, masked = None, []
        for idx in groups.values():  # the group without dropout (at most one: they all read x) is added
            cs = [caches[targets[i]] for i in idx]  # by the first base product, a masked one after it
            if addend is None and cs[0].mask is None:
                es = [entries[i] for i in idx]
                addend = lora_shared_backward([dys[i] for i in idx], [e.A for e in es], [e.B for e in es],
                                              [e.scale for e in es], cs, [grads[e.name].A for e in es],
                                              [grads[e.name].B for e in es], None)
            else:
                masked.append(idx)
        dx = self.linear(il, targets[0], trainable=False).backward(dys[0], None, addend=addend)
        for t, dy in zip(targets[1:], dys[1:]):
            dx += self.linear(il, t, trainable=False).backward(dy, None, out=scratch)
        for idx in masked:
            es = [entries[i] for i in idx]
            lora_shared_backward([dys[i] for i in idx], [e.A for e in es], [e.B for e in es],
                                 [e.scale for e in es], [caches[targets[i]] for i in idx],
                                 [grads[e.name].A for e in es], [grads[e.name].B for e in es], dx)
        return dx

    def output_head(self) -> LoraLinear:
        """The LM head, with any inference adapters' output.weight LoRA applied on the fly."""
        head = self.linear(None, "output")
        if head.trainable is not None:
            raise ValueError("training a LoRA on the output head is not supported yet (use --rank-output 0)")
        return head

    # -- rope ----------------------------------------------------------------------------------
    def _rope_tables(self, positions: np.ndarray) -> dict[int, np.ndarray]:
        """One cos/sin table per distinct (base, scale) among the layers (Gemma: local and global)."""
        hp = self.hp
        tables: dict[tuple[float, float], np.ndarray] = {}
        per_layer = {}
        ext = 1.0 if hp.rope_scaling_type == "yarn" else 0.0
        for il in range(hp.n_layer):
            base, scale = hp.rope_base_scale(il)
            key = (base, scale)
            if key not in tables:
                tables[key] = rope_cache(positions, hp.n_rot, freq_base=base, freq_scale=scale,
                                         ext_factor=ext, n_ctx_orig=hp.rope_scaling_orig_ctx,
                                         freq_factors=self.rope_freqs)
            per_layer[il] = tables[key]
        return per_layer

    # -- block ---------------------------------------------------------------------------------
    def block_forward(self, il: int, x: np.ndarray, batch: Batch, rope: np.ndarray,
                      rng: np.random.Generator | None, keep: bool, checkpoint: bool = False,
                      recompute: BlockCheckpoint | None = None, keep_ffn: bool = False
                      ) -> tuple[np.ndarray | None, BlockCache | BlockCheckpoint | None]:
        """x (T, d) -> (T, d). keep=True also returns what backward needs (rng: dropout masks);
        checkpoint=True only what a checkpoint keeps (BlockCheckpoint; keep_ffn: with the gate and up
        outputs). recompute: the block's checkpoint, in backward (keep=True): its kept outputs are
        not made again, nor the ffn_down product that nothing reads without post-norms (the output
        is then None)."""
        hp, L = self.hp, self.layers[il]
        T = x.shape[0]
        neox = hp.rope_type == ROPE_NEOX
        lora: dict[str, LoraCache] = {}

        h, rstd1 = rmsnorm_forward(x, L.attn_norm, hp.norm_eps)
        q, k, v = self.project(il, ("attn_q", "attn_k", "attn_v"), h, rng, keep, lora)
        q = q.reshape(T, hp.n_head, hp.head_dim)
        k = k.reshape(T, hp.n_head_kv, hp.head_dim)
        v = v.reshape(T, hp.n_head_kv, hp.head_dim_v)
        q_pre = k_pre = rstd_q = rstd_k = None
        if hp.has_qk_norm:
            q_pre, k_pre = q, k
            q, rstd_q = rmsnorm_forward(q, L.q_norm, hp.norm_eps)
            k, rstd_k = rmsnorm_forward(k, L.k_norm, hp.norm_eps)
        qr = rope_forward(q, rope, neox)
        kr = rope_forward(k, rope, neox)
        window = hp.n_swa if hp.is_swa(il) else 0
        a, lse = attention_forward(qr, kr, v, hp.attn_scale, hp.attn_softcap, window, batch.segments)
        (o,) = self.project(il, ("attn_output",), a.reshape(T, hp.n_head * hp.head_dim_v), rng, keep, lora,
                            None if recompute is None else [recompute.o])
        o_out = o
        o_pre = rstd_po = None
        if hp.has_post_norms:
            o_pre = o
            o, rstd_po = rmsnorm_forward(o, L.attn_post_norm, hp.norm_eps)
        x2 = x + o

        h2, rstd2 = rmsnorm_forward(x2, L.ffn_norm, hp.norm_eps)
        g, u = self.project(il, ("ffn_gate", "ffn_up"), h2, rng, keep, lora,
                            None if recompute is None or recompute.g is None else [recompute.g, recompute.u])
        m = geglu_forward(g, u) if hp.ffn_act == "gelu_tanh" else swiglu_forward(g, u)
        (f,) = self.project(il, ("ffn_down",), m, rng, keep, lora, None if recompute is None else [recompute.f])
        f_pre = rstd_pf = None
        if hp.has_post_norms:
            f_pre = f
            f, rstd_pf = rmsnorm_forward(f, L.ffn_post_norm, hp.norm_eps)
        x3 = x2 + f if f is not None else None
        if checkpoint:
            return x3, BlockCheckpoint(x=x, o=o_out, f=f_pre, g=g if keep_ffn else None, u=u if keep_ffn else None)
        if not keep:
            return x3, None
        return x3, BlockCache(x=x, h=h, rstd1=rstd1, q_pre=q_pre, k_pre=k_pre, rstd_q=rstd_q, rstd_k=rstd_k,
                              qr=qr, kr=kr, v=v, a=a, lse=lse, o_pre=o_pre, rstd_po=rstd_po, x2=x2, h2=h2,
                              rstd2=rstd2, g=g, u=u, m=m, f_pre=f_pre, rstd_pf=rstd_pf, lora=lora)

    def block_backward(self, il: int, dx3: np.ndarray, c: BlockCache, batch: Batch, rope: np.ndarray,
                       grads: LoraWeights) -> np.ndarray:
        """dL/dx3 (T, d) -> dL/dx (T, d); adds the block's LoRA gradients into grads. The input
        gradients of q, k, v (and of gate, up) are summed into one buffer, each base product written
        into one reused scratch buffer (no new (T, d) array per projection), their LoRA parts added in
        one product (project_back). (Not accumulate=True into the
        sum itself: qmatmul adds its partial sums to `out`, which rounds differently from a product
        added whole, and training would no longer be bit-identical.)"""
        hp, L = self.hp, self.layers[il]
        T = dx3.shape[0]
        neox = hp.rope_type == ROPE_NEOX

        # x3 = x2 + f
        df = dx3
        if hp.has_post_norms:
            df = rmsnorm_backward(df, c.f_pre, L.ffn_post_norm, c.rstd_pf)
        dm = self.project_back(il, ("ffn_down",), [df], c.lora, grads)
        if hp.ffn_act == "gelu_tanh":
            dg, du = geglu_backward(dm, c.g, c.u)
        else:
            dg, du = swiglu_backward(dm, c.g, c.u)
        del dm, df
        scratch = np.empty_like(dx3)  # (T, d): reused for every base product added into a sum
        dh2 = self.project_back(il, ("ffn_gate", "ffn_up"), [dg, du], c.lora, grads, scratch)
        del dg, du
        dx2 = rmsnorm_backward(dh2, c.x2, L.ffn_norm, c.rstd2)
        dx2 += dx3
        del dh2

        # x2 = x + o
        do = dx2
        if hp.has_post_norms:
            do = rmsnorm_backward(do, c.o_pre, L.attn_post_norm, c.rstd_po)
        da = self.project_back(il, ("attn_output",), [do], c.lora, grads).reshape(T, hp.n_head, hp.head_dim_v)
        del do
        window = hp.n_swa if hp.is_swa(il) else 0
        dqr, dkr, dv = attention_backward(da, c.qr, c.kr, c.v, c.a, c.lse, hp.attn_scale, hp.attn_softcap,
                                          window, batch.segments)
        del da
        dq = rope_backward(dqr, rope, neox)
        dk = rope_backward(dkr, rope, neox)
        del dqr, dkr
        if hp.has_qk_norm:
            dq = rmsnorm_backward(dq, c.q_pre, L.q_norm, c.rstd_q)
            dk = rmsnorm_backward(dk, c.k_pre, L.k_norm, c.rstd_k)
        dh = self.project_back(il, ("attn_q", "attn_k", "attn_v"), [dq.reshape(T, -1), dk.reshape(T, -1),
                                                                  dv.reshape(T, -1)], c.lora, grads, scratch)
        del dq, dk, dv, scratch
        dx = rmsnorm_backward(dh, c.x, L.attn_norm, c.rstd1)
        dx += dx2
        return dx

    # -- whole model ---------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T,) -> x (T, d) f32, Gemma-scaled."""
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tok_embd.shape[0]):
            raise GGTrainError(f"{self.mf.path}: token id out of range 0..{self.tok_embd.shape[0] - 1}")
        x = self.tok_embd.rows(tokens.astype(np.int64))
        if self.hp.embd_scale != 1.0:
            x *= np.float32(self.hp.embd_scale)
        return x

    def _rng(self, seed: np.random.SeedSequence, il: int) -> np.random.Generator | None:
        # Dropout masks come from the step's seed and the layer (the seed's il-th child): the
        # checkpointed backward's recomputation redraws the very same.
        if self._trainable is None:
            return None
        return np.random.default_rng(np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, il)))

    def forward(self, batch: Batch, train: bool = True, checkpointing: bool = True,
                step_seed: int | np.random.SeedSequence = 0,
                chunk: int = CE_CHUNK, keep_ffn: bool = False) -> tuple[float, StepState]:
        """Mean cross-entropy over the trained targets of `batch`, and the state backward needs.

        train=False keeps nothing for backward and uses no dropout (evaluation, perplexity).
        keep_ffn: checkpoints also keep the FFN's gate and up outputs (BlockCheckpoint): more memory,
        4 of a block's 7 products skipped in the recompute instead of 2; the same gradients.
        Training needs the f32 matmul (int8 has no backward). step_seed: the dropout masks' seed.
        """
        if train and self.matmul not in TRAINING_MODES:
            raise ValueError(f"training needs the f32 or bf16 matmul, not {self.matmul} (it has no backward)")
        hp = self.hp
        seed = step_seed if isinstance(step_seed, np.random.SeedSequence) else \
            np.random.SeedSequence(step_seed)
        ropes = self._rope_tables(batch.positions)
        x = self.embed(batch.tokens)
        inputs: list[np.ndarray] = []
        caches: list[BlockCache | BlockCheckpoint | None] = []
        for il in range(hp.n_layer):
            if train:
                inputs.append(x)
            rng = self._rng(seed, il) if train else None
            x, c = self.block_forward(il, x, batch, ropes[il], rng, keep=train and not checkpointing,
                                      checkpoint=train and checkpointing, keep_ffn=keep_ffn)
            caches.append(c)
        hf, rstd = rmsnorm_forward(x, self.output_norm, hp.norm_eps)
        if train:  # dL/dh comes in the same pass over the vocabulary (one head GEMM fewer)
            loss, loss_state = cross_entropy_forward(hf, self.output_head(), batch.targets, batch.mask,
                                                     final_softcap=hp.final_softcap, chunk=chunk, with_grad=True)
        else:
            loss, loss_state = self._scored_rows_loss(hf, batch, chunk)
        state = StepState(batch, inputs, caches, x, rstd, hf, loss_state, ropes, seed, train)
        return float(loss), state

    def _scored_rows_loss(self, hf: np.ndarray, batch: Batch, chunk: int) -> tuple[float, CrossEntropyStats]:
        """Evaluation: the head (most of a forward's work) runs only on rows whose target is scored;
        per-token losses come back full length, 0 elsewhere."""
        rows = np.flatnonzero(batch.mask)
        loss, st = cross_entropy_forward(np.ascontiguousarray(hf[rows]), self.output_head(), batch.targets[rows],
                                         batch.mask[rows], final_softcap=self.hp.final_softcap, chunk=chunk)
        losses = np.zeros(hf.shape[0])
        losses[rows] = st.losses
        st.losses = losses
        return loss, st

    def backward(self, state: StepState, grads: LoraWeights, dloss: float = 1.0) -> None:
        """Adds dloss · dL/dA, dL/dB of the trainable LoRA into grads (same layout as self.trainable).

        dloss weights this micro-batch's mean loss within a larger batch (gradient accumulation)."""
        if not state.train:
            raise ValueError("backward needs a forward run with train=True")
        hp = self.hp
        dhf = cross_entropy_backward(state.final_h, self.output_head(), state.loss_state, dloss)
        dx = rmsnorm_backward(dhf, state.final_x, self.output_norm, state.final_rstd)
        del dhf
        for il in reversed(range(hp.n_layer)):
            c = state.caches[il]
            if isinstance(c, BlockCheckpoint):  # checkpointed: recompute what it did not keep
                _, c = self.block_forward(il, c.x, state.batch, state.ropes[il], self._rng(state.seed, il),
                                          keep=True, recompute=c)
            dx = self.block_backward(il, dx, c, state.batch, state.ropes[il], grads)
            state.caches[il] = c = None
            state.block_inputs[il] = None  # type: ignore[call-overload]

    def logits(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        """Full-vocabulary logits (len(rows), n_vocab) at the given token rows (tests, inspection)."""
        hp = self.hp
        ropes = self._rope_tables(batch.positions)
        x = self.embed(batch.tokens)
        for il in range(hp.n_layer):
            x, _ = self.block_forward(il, x, batch, ropes[il], None, keep=False)
        hf, _ = rmsnorm_forward(x[rows], self.output_norm, hp.norm_eps)
        z = self.output_head().matmul(np.ascontiguousarray(hf))
        if hp.final_softcap:
            z = np.float32(hp.final_softcap) * np.tanh(z / np.float32(hp.final_softcap))
        return z
