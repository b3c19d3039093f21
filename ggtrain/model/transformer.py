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
checkpointing (the default) a block keeps only its input and recomputes the rest in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.gguf.arch import ROPE_NEOX, HParams, read_hparams
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.kernels.activation import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from ggtrain.kernels.attention import attention_backward, attention_forward
from ggtrain.kernels.loss import CrossEntropyStats, cross_entropy_backward, cross_entropy_forward
from ggtrain.kernels.norm import rmsnorm_backward, rmsnorm_forward
from ggtrain.kernels.rope import rope_backward, rope_cache, rope_forward
from ggtrain.model.lora import LoraWeights, dropout_mask, lora_linear_backward, lora_linear_forward

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class QWeight:
    """A frozen base weight W (rows, cols) kept in its GGUF type; products go through qmatmul
    (or, when int8 is set — only for types with an int8 form — qmatmul_int8: inference only)."""

    def __init__(self, data: np.ndarray, qtype: int, shape: tuple[int, int]):
        self.data, self.qtype, self.shape = data, qtype, shape
        self.int8 = False

    def matmul(self, x: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """x (T, cols) -> x·W[r0:r1]ᵀ (T, r1-r0)."""
        if self.int8:
            return kernels.qmatmul_int8(x, self.data[r0:r1], self.qtype)
        return kernels.qmatmul(x, self.data[r0:r1], self.qtype)

    def lse_chunk(self, x: np.ndarray, r0: int, r1: int, targets: np.ndarray, softcap: float,
                  run_max: np.ndarray, run_sum: np.ndarray, tgt_logit: np.ndarray) -> bool:
        """As a head: fold rows r0:r1's logits for x straight into the cross-entropy's running stats
        (kernels.qmatmul_int8_lse) and say True; False where that is not this weight's path (f32)."""
        if not self.int8:
            return False
        kernels.qmatmul_int8_lse(x, self.data[r0:r1], self.qtype, r0, targets, softcap, run_max, run_sum, tgt_logit)
        return True

    def matmul_t(self, dy: np.ndarray, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None,
                 accumulate: bool = False) -> np.ndarray:
        """dy (T, r1-r0) -> dy·W[r0:r1] (T, cols)."""
        return kernels.qmatmul_backward_input(dy, self.data[r0:r1], self.qtype, out=out, accumulate=accumulate)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return kernels.get_rows(self.data, self.qtype, ids)


class LoraHead:
    """The output head W plus fixed (inference) LoRA updates: W' = W + Σ s·B·A, never merged.

    Serves the cross-entropy's chunked products: rows r0:r1 of W' are W[r0:r1] + Σ s·B[r0:r1]·A.
    """

    def __init__(self, base: QWeight, loras: list[tuple[np.ndarray, np.ndarray, float]]):
        self.base, self.loras, self.shape = base, loras, base.shape

    def matmul(self, x: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        y = self.base.matmul(x, r0, r1)
        for A, B, s in self.loras:
            y += (x @ A.T * np.float32(s)) @ B[r0:r1].T
        return y

    def matmul_t(self, dy: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        dx = self.base.matmul_t(dy, r0, r1)
        for A, B, s in self.loras:
            dx += (dy @ B[r0:r1] * np.float32(s)) @ A
        return dx

    def rows(self, ids: np.ndarray) -> np.ndarray:
        w = self.base.rows(ids)
        for A, B, s in self.loras:
            w += (B[ids] * np.float32(s)) @ A
        return w


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
    """A LoRA applied at some scale: the trainable one (scale 1) or loaded ones for inference."""

    lora: LoraWeights
    scale: float = 1.0


@dataclass
class StepState:
    """What backward needs from forward."""

    batch: Batch
    block_inputs: list[np.ndarray]  # per layer: its input x (T, d)
    caches: list[dict | None]  # per layer: intermediates, None when checkpointed
    final_x: np.ndarray  # (T, d) input of the output norm
    final_rstd: np.ndarray
    final_h: np.ndarray  # (T, d) normed: the loss's input
    loss_state: CrossEntropyStats
    ropes: dict[int, np.ndarray] = field(default_factory=dict)
    step_seed: int = 0
    train: bool = True


MATMUL_MODES = ("f32", "int8")


class Model:
    """A GGUF model's frozen base plus LoRA adapters: forward, loss, backward.

    matmul "f32" (the default, and the only mode training accepts) multiplies by dequantized f32
    tiles; "int8" quantizes activations to int8 as llama.cpp does (qmatmul_int8), for evaluation.
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
        self.trainable: LoraWeights | None = None
        self.dropout = True
        self.matmul = "f32"
        self.set_matmul(matmul)

    def warmup(self) -> None:
        """One tiny evaluation forward (2 tokens), as llama.cpp runs before its first decode: pages in
        the mmap'd weights and pays first-call costs before anything is timed."""
        ids = np.zeros((1, 2), dtype=np.int32)
        self.forward(Batch.from_rows(ids, ids, np.ones(ids.shape, np.float32)), train=False)

    def base_weights(self) -> list[QWeight]:
        return [self.tok_embd, self.head] + [w for layer in self.layers for w in layer.w.values()]

    def set_matmul(self, mode: str) -> None:
        """Switch every base product to "f32" or "int8" (int8 needs kernels.int8_available())."""
        if mode not in MATMUL_MODES:
            raise GGTrainError(f"matmul mode {mode!r}: expected one of {', '.join(MATMUL_MODES)}")
        if mode == "int8" and not kernels.int8_available():
            raise GGTrainError("int8 matmul needs a CPU with AVX512-VNNI (this one has none); use f32")
        self.matmul = mode
        for w in self.base_weights():  # F32/F16/BF16 weights keep the f32 product
            w.int8 = mode == "int8" and kernels.int8_supported(w.qtype)

    def _load_layer(self, il: int) -> Layer:
        mf, p = self.mf, f"blk.{il}."
        w = {}
        for name in PROJECTIONS:
            t = mf.tensor(p + name + ".weight")
            w[name] = QWeight(t.data, t.qtype, t.shape)
        bias = {n: _vector(mf, p + n + ".bias") for n in ("attn_q", "attn_k", "attn_v")
                if p + n + ".bias" in mf.tensors}
        layer = Layer(_vector(mf, p + "attn_norm.weight"), w, bias, _vector(mf, p + "ffn_norm.weight"))
        if self.hp.has_qk_norm or p + "attn_q_norm.weight" in mf.tensors:
            layer.q_norm = _vector(mf, p + "attn_q_norm.weight")
            layer.k_norm = _vector(mf, p + "attn_k_norm.weight")
        if self.hp.has_post_norms:
            layer.attn_post_norm = _vector(mf, p + "post_attention_norm.weight")
            layer.ffn_post_norm = _vector(mf, p + "post_ffw_norm.weight")
        return layer

    # -- adapters ------------------------------------------------------------------------------
    def _loras(self, name: str) -> list[tuple[np.ndarray, np.ndarray, float, float, bool]]:
        """(A, B, scale, dropout, trainable) for every adapter touching base tensor `name`."""
        out = []
        for ad in self.adapters:
            if name in ad.lora:
                e = ad.lora[name]
                out.append((e.A, e.B, e.scale * ad.scale, 0.0, False))
        if self.trainable is not None and name in self.trainable:
            e = self.trainable[name]
            out.append((e.A, e.B, e.scale, e.dropout, True))
        return out

    def output_head(self) -> QWeight | LoraHead:
        """The LM head, with any inference adapters' output.weight LoRA applied on the fly."""
        if self.trainable is not None and "output.weight" in self.trainable:
            raise GGTrainError("training a LoRA on the output head is not supported yet (use --rank-output 0)")
        loras = [(A, B, s) for A, B, s, _, _ in self._loras("output.weight")]
        return LoraHead(self.head, loras) if loras else self.head

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

    # -- one linear with LoRA ------------------------------------------------------------------
    def _linear_forward(self, x: np.ndarray, w: QWeight, name: str, bias: np.ndarray | None,
                        rng: np.random.Generator | None, cache: dict | None) -> np.ndarray:
        y = w.matmul(x)
        if bias is not None:
            y += bias
        for A, B, scale, p, trainable in self._loras(name):
            mask = dropout_mask(rng, x.shape, p) if (trainable and rng is not None and self.dropout) else None
            y, lc = lora_linear_forward(x, y, A, B, scale, mask)
            if trainable and cache is not None:
                cache["lora:" + name] = lc
        return y

    def _linear_backward(self, dy: np.ndarray, x: np.ndarray, w: QWeight, name: str, cache: dict,
                         grads: LoraWeights | None) -> np.ndarray:
        dx = w.matmul_t(dy)
        lc = cache.get("lora:" + name)
        if lc is not None and grads is not None:
            e, g = self.trainable[name], grads[name]
            _, _, dx_lora = lora_linear_backward(dy, x, e.A, e.B, e.scale, lc, dA_out=g.A, dB_out=g.B)
            dx += dx_lora
        return dx

    # -- block ---------------------------------------------------------------------------------
    def block_forward(self, il: int, x: np.ndarray, batch: Batch, rope: np.ndarray,
                      rng: np.random.Generator | None, keep: bool) -> tuple[np.ndarray, dict | None]:
        """x (T, d) -> (T, d). keep=True returns the intermediates backward needs."""
        hp, L = self.hp, self.layers[il]
        T = x.shape[0]
        c: dict | None = {} if keep else None
        neox = hp.rope_type == ROPE_NEOX
        p = f"blk.{il}."

        h, rstd1 = rmsnorm_forward(x, L.attn_norm, hp.norm_eps)
        q = self._linear_forward(h, L.w["attn_q"], p + "attn_q.weight", L.bias.get("attn_q"), rng, c)
        k = self._linear_forward(h, L.w["attn_k"], p + "attn_k.weight", L.bias.get("attn_k"), rng, c)
        v = self._linear_forward(h, L.w["attn_v"], p + "attn_v.weight", L.bias.get("attn_v"), rng, c)
        q = q.reshape(T, hp.n_head, hp.head_dim)
        k = k.reshape(T, hp.n_head_kv, hp.head_dim)
        v = v.reshape(T, hp.n_head_kv, hp.head_dim_v)
        if L.q_norm is not None:
            q_pre, k_pre = q, k
            q, rstd_q = rmsnorm_forward(q, L.q_norm, hp.norm_eps)
            k, rstd_k = rmsnorm_forward(k, L.k_norm, hp.norm_eps)
        qr = rope_forward(q, rope, neox)
        kr = rope_forward(k, rope, neox)
        window = hp.n_swa if hp.is_swa(il) else 0
        a, att = attention_forward(qr, kr, v, hp.attn_scale, hp.attn_softcap, window, batch.segments)
        a2 = a.reshape(T, hp.n_head * hp.head_dim_v)
        o = self._linear_forward(a2, L.w["attn_output"], p + "attn_output.weight", None, rng, c)
        if L.attn_post_norm is not None:
            o_pre = o
            o, rstd_po = rmsnorm_forward(o, L.attn_post_norm, hp.norm_eps)
        x2 = x + o

        h2, rstd2 = rmsnorm_forward(x2, L.ffn_norm, hp.norm_eps)
        g = self._linear_forward(h2, L.w["ffn_gate"], p + "ffn_gate.weight", None, rng, c)
        u = self._linear_forward(h2, L.w["ffn_up"], p + "ffn_up.weight", None, rng, c)
        m = geglu_forward(g, u) if hp.ffn_act == "gelu_tanh" else swiglu_forward(g, u)
        f = self._linear_forward(m, L.w["ffn_down"], p + "ffn_down.weight", None, rng, c)
        if L.ffn_post_norm is not None:
            f_pre = f
            f, rstd_pf = rmsnorm_forward(f, L.ffn_post_norm, hp.norm_eps)
        x3 = x2 + f

        if keep:
            c.update(x=x, h=h, rstd1=rstd1, qr=qr, kr=kr, v=v, a=a, a2=a2, att=att, x2=x2, h2=h2,
                     rstd2=rstd2, g=g, u=u, m=m)
            if L.q_norm is not None:
                c.update(q_pre=q_pre, k_pre=k_pre, rstd_q=rstd_q, rstd_k=rstd_k)
            if L.attn_post_norm is not None:
                c.update(o_pre=o_pre, rstd_po=rstd_po, f_pre=f_pre, rstd_pf=rstd_pf)
        return x3, c

    def block_backward(self, il: int, dx3: np.ndarray, c: dict, batch: Batch, rope: np.ndarray,
                       grads: LoraWeights | None) -> np.ndarray:
        """dL/dx3 (T, d) -> dL/dx (T, d); adds the block's LoRA gradients into grads."""
        hp, L = self.hp, self.layers[il]
        T = dx3.shape[0]
        neox = hp.rope_type == ROPE_NEOX
        p = f"blk.{il}."

        # x3 = x2 + f
        df = dx3
        if L.ffn_post_norm is not None:
            df = rmsnorm_backward(df, c["f_pre"], L.ffn_post_norm, c["rstd_pf"])
        dm = self._linear_backward(df, c["m"], L.w["ffn_down"], p + "ffn_down.weight", c, grads)
        if hp.ffn_act == "gelu_tanh":
            dg, du = geglu_backward(dm, c["g"], c["u"])
        else:
            dg, du = swiglu_backward(dm, c["g"], c["u"])
        dh2 = self._linear_backward(dg, c["h2"], L.w["ffn_gate"], p + "ffn_gate.weight", c, grads)
        dh2 += self._linear_backward(du, c["h2"], L.w["ffn_up"], p + "ffn_up.weight", c, grads)
        dx2 = dx3 + rmsnorm_backward(dh2, c["x2"], L.ffn_norm, c["rstd2"])

        # x2 = x + o
        do = dx2
        if L.attn_post_norm is not None:
            do = rmsnorm_backward(do, c["o_pre"], L.attn_post_norm, c["rstd_po"])
        da2 = self._linear_backward(do, c["a2"], L.w["attn_output"], p + "attn_output.weight", c, grads)
        da = da2.reshape(T, hp.n_head, hp.head_dim_v)
        window = hp.n_swa if hp.is_swa(il) else 0
        dqr, dkr, dv = attention_backward(da, c["qr"], c["kr"], c["v"], c["a"], c["att"], hp.attn_scale,
                                          hp.attn_softcap, window, batch.segments)
        dq = rope_backward(dqr, rope, neox)
        dk = rope_backward(dkr, rope, neox)
        if L.q_norm is not None:
            dq = rmsnorm_backward(dq, c["q_pre"], L.q_norm, c["rstd_q"])
            dk = rmsnorm_backward(dk, c["k_pre"], L.k_norm, c["rstd_k"])
        dq = dq.reshape(T, -1)
        dk = dk.reshape(T, -1)
        dv = dv.reshape(T, -1)
        dh = self._linear_backward(dq, c["h"], L.w["attn_q"], p + "attn_q.weight", c, grads)
        dh += self._linear_backward(dk, c["h"], L.w["attn_k"], p + "attn_k.weight", c, grads)
        dh += self._linear_backward(dv, c["h"], L.w["attn_v"], p + "attn_v.weight", c, grads)
        return dx2 + rmsnorm_backward(dh, c["x"], L.attn_norm, c["rstd1"])

    # -- whole model ---------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T,) -> x (T, d) f32, Gemma-scaled."""
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tok_embd.shape[0]):
            raise GGTrainError(f"{self.mf.path}: token id out of range 0..{self.tok_embd.shape[0] - 1}")
        x = self.tok_embd.rows(tokens.astype(np.int64))
        if self.hp.embd_scale != 1.0:
            x *= np.float32(self.hp.embd_scale)
        return x

    def _rng(self, step_seed: int, il: int) -> np.random.Generator | None:
        # Dropout masks are drawn from (step seed, layer): recomputation redraws the very same.
        if self.trainable is None or not self.dropout:
            return None
        return np.random.default_rng([step_seed, il])

    def forward(self, batch: Batch, train: bool = True, checkpointing: bool = True,
                step_seed: int = 0, chunk: int = 16384) -> tuple[float, StepState]:
        """Mean cross-entropy over the trained targets of `batch`, and the state backward needs.

        train=False keeps nothing for backward and uses no dropout (evaluation, perplexity).
        Training needs the f32 matmul (int8 has no backward).
        """
        if train and self.matmul != "f32":
            raise GGTrainError(f"training needs the f32 matmul, not {self.matmul} (it has no backward)")
        hp = self.hp
        ropes = self._rope_tables(batch.positions)
        x = self.embed(batch.tokens)
        inputs: list[np.ndarray] = []
        caches: list[dict | None] = []
        for il in range(hp.n_layer):
            if train:
                inputs.append(x)
            rng = self._rng(step_seed, il) if train else None
            x, c = self.block_forward(il, x, batch, ropes[il], rng, keep=train and not checkpointing)
            caches.append(c)
        hf, rstd = rmsnorm_forward(x, self.output_norm, hp.norm_eps)
        if train:  # dL/dh comes in the same pass over the vocabulary (one head GEMM fewer)
            loss, loss_state = cross_entropy_forward(hf, self.output_head(), batch.targets, batch.mask,
                                                     final_softcap=hp.final_softcap, chunk=chunk, with_grad=True)
        else:
            loss, loss_state = self._scored_rows_loss(hf, batch, chunk)
        state = StepState(batch, inputs, caches, x, rstd, hf, loss_state, ropes, step_seed, train)
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
        for il in reversed(range(hp.n_layer)):
            c = state.caches[il]
            if c is None:  # checkpointed: recompute this block's intermediates
                _, c = self.block_forward(il, state.block_inputs[il], state.batch, state.ropes[il],
                                          self._rng(state.step_seed, il), keep=True)
            dx = self.block_backward(il, dx, c, state.batch, state.ropes[il], grads)
            state.caches[il] = None
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
