"""The LoRA layer: a frozen base weight with its adapter terms, owning forward, backward, the head's
chunked products and merge.

    y = x·W'ᵀ + bias,   W' = W + Σ sᵢ·Bᵢ·Aᵢ   (never merged in memory: W stays in its GGUF type)

Each term is one adapter on this weight: A (r, in), B (out, r), its scale and dropout, and whether
it is trained. At most one term is trainable (the run's LoRA); the others are fixed (inference
adapters loaded with --lora). The trainable term's dropout applies to its own input only (PEFT);
fixed terms never drop. The per-term math is ggtrain.model.lora's forward/backward pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ggtrain import kernels
from ggtrain.model.lora import LoraCache, LoraEntry, dropout_mask, lora_linear_backward, lora_linear_forward


class QWeight:
    """A frozen base weight W (rows, cols) kept in its GGUF type; products go through qmatmul in
    f32, or with `compute` "bf16" with X and W rounded to bf16 (f32 accumulation), or when int8 is
    set — only for types with an int8 form — through qmatmul_int8 (inference only)."""

    def __init__(self, data: np.ndarray, qtype: int, shape: tuple[int, int]):
        self.data, self.qtype, self.shape = data, qtype, shape
        self.int8 = False
        self.compute = "f32"  # the qmatmul compute type: "f32" or "bf16"

    def round_input(self, x: np.ndarray) -> np.ndarray:
        """x as this weight's products read it: rounded to bf16 once (uint16) under bf16, so products
        sharing an input (q, k, v; gate, up) share the rounding; x itself otherwise."""
        return kernels.to_bf16(x) if self.compute == "bf16" and not self.int8 else x

    def matmul(self, x: np.ndarray, r0: int = 0, r1: int | None = None,
               addend: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """x (T, cols) f32, or its round_input -> x·W[r0:r1]ᵀ (T, r1-r0) (+ u·v for an addend (u, v),
        a LoRA branch: kernels.qmatmul's)."""
        if self.int8:
            y = kernels.qmatmul_int8(x, self.data[r0:r1], self.qtype)
            if addend is not None:
                y += addend[0] @ addend[1]
            return y
        return kernels.qmatmul(x, self.data[r0:r1], self.qtype, compute=self.compute, addend=addend)

    def lse_chunk(self, x: np.ndarray, r0: int, r1: int, targets: np.ndarray, softcap: float,
                  run_max: np.ndarray, run_sum: np.ndarray, tgt_logit: np.ndarray) -> bool:
        """As a head: fold rows r0:r1's logits for x straight into the cross-entropy's running stats
        (kernels.qmatmul_int8_lse) and say True; False where that is not this weight's path (f32)."""
        if not self.int8:
            return False
        kernels.qmatmul_int8_lse(x, self.data[r0:r1], self.qtype, r0, targets, softcap, run_max, run_sum,
                                 tgt_logit)
        return True

    def matmul_t(self, dy: np.ndarray, r0: int = 0, r1: int | None = None, out: np.ndarray | None = None,
                 addend: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """dy (T, r1-r0) -> dy·W[r0:r1] (T, cols) (+ u·v for an addend), written into `out` when given."""
        return kernels.qmatmul_backward_input(dy, self.data[r0:r1], self.qtype, out=out, compute=self.compute,
                                              addend=addend)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """W[ids] dequantized: f32 (len(ids), cols)."""
        return kernels.get_rows(self.data, self.qtype, ids)


@dataclass(frozen=True)
class LoraTerm:
    """One adapter on a linear: adds scale · (drop(x)·Aᵀ)·Bᵀ to its output."""

    A: np.ndarray  # f32 (r, in)
    B: np.ndarray  # f32 (out, r)
    scale: float
    dropout: float = 0.0  # only the trainable term drops
    trainable: bool = False

    @classmethod
    def of(cls, entry: LoraEntry, scale: float = 1.0, trainable: bool = False) -> LoraTerm:
        """The term of a LoraWeights entry applied at `scale` (an adapter's --lora-scaled factor)."""
        return cls(entry.A, entry.B, entry.scale * scale, entry.dropout if trainable else 0.0, trainable)


class LoraLinear:
    """A frozen base weight W (out, in) with its LoRA terms (and an optional bias)."""

    def __init__(self, base: QWeight, terms: Sequence[LoraTerm] = (), bias: np.ndarray | None = None):
        self.base, self.terms, self.bias = base, tuple(terms), bias
        self.shape = base.shape
        trainable = [t for t in self.terms if t.trainable]
        if len(trainable) > 1:
            raise ValueError(f"a linear has at most one trainable LoRA term, got {len(trainable)}")
        self.trainable = trainable[0] if trainable else None

    # -- training: the whole output, its backward ------------------------------------------------
    def forward(self, x: np.ndarray, rng: np.random.Generator | None = None,
                keep: bool = False, x_base: np.ndarray | None = None,
                addend: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, LoraCache | None]:
        """x (T, in) -> y (T, out), and with keep the trainable term's LoraCache (None without one).

        rng draws the trainable term's dropout mask (None: no dropout, as in evaluation). x_base: x as
        the base product reads it (base.round_input(x), shared with other projections of the same x);
        the LoRA terms always take the f32 x. addend: a LoRA branch computed outside (the caller's
        lora_shared_addends), added by the base product."""
        y = self.base.matmul(x if x_base is None else x_base, addend=addend)
        if self.bias is not None:
            y += self.bias
        cache = None
        for t in self.terms:
            mask = dropout_mask(rng, x.shape, t.dropout) if t.trainable and rng is not None else None
            y, lc = lora_linear_forward(x, y, t.A, t.B, t.scale, mask)
            if t.trainable and keep:
                cache = lc
        return y, cache

    def backward(self, dy: np.ndarray, cache: LoraCache | None, grad: LoraEntry | None = None,
                 out: np.ndarray | None = None, addend: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """dy (T, out) -> dL/dx (T, in), written into `out` when given (a buffer reused across calls);
        the trainable term's dA, dB are added into `grad` (its entry in the gradient buffer).

        cache is what forward(keep=True) returned; the trainable term needs it, and `grad`. addend: a
        LoRA branch's input gradient computed outside (lora_shared_backward's), added by the base
        product."""
        dx = self.base.matmul_t(dy, out=out, addend=addend)
        for t in self.terms:
            if t.trainable:
                if cache is None or grad is None:
                    raise ValueError("a trainable LoRA term's backward needs its forward's cache and grad")
                _, _, dx_lora = lora_linear_backward(dy, cache.xd, t.A, t.B, t.scale, cache, dA_out=grad.A,
                                                     dB_out=grad.B)
                dx += dx_lora
            else:
                dx += (dy @ t.B * np.float32(t.scale)) @ t.A
        return dx

    # -- the head: rows r0:r1 of W' (cross-entropy chunks) ---------------------------------------
    def matmul(self, x: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """x (T, in) -> x·W'[r0:r1]ᵀ (T, r1-r0), fixed terms applied (no bias, no dropout)."""
        y = self.base.matmul(x, r0, r1)
        for t in self.terms:
            y, _ = lora_linear_forward(x, y, t.A, t.B[r0:r1], t.scale)
        return y

    @property
    def takes_bf16(self) -> bool:
        """Whether matmul_t also reads dy already rounded to bf16 (uint16): the base computes in bf16
        and no term multiplies dy (the terms' products are f32)."""
        return self.base.compute == "bf16" and not self.base.int8 and not self.terms

    def round_input(self, x: np.ndarray) -> np.ndarray:
        """x as matmul reads it for every chunk of rows: the base's rounding when no term reads x."""
        return x if self.terms else self.base.round_input(x)

    def matmul_t(self, dy: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """dy (T, r1-r0) -> dy·W'[r0:r1] (T, in); dy may be bf16 bits when takes_bf16."""
        dx = self.base.matmul_t(dy, r0, r1)
        for t in self.terms:
            dx += (dy @ t.B[r0:r1] * np.float32(t.scale)) @ t.A
        return dx

    def lse_chunk(self, x: np.ndarray, r0: int, r1: int, targets: np.ndarray, softcap: float,
                  run_max: np.ndarray, run_sum: np.ndarray, tgt_logit: np.ndarray) -> bool:
        """The base's fused int8 log-sum-exp when no term changes the logits (see QWeight.lse_chunk)."""
        if self.terms:
            return False
        return self.base.lse_chunk(x, r0, r1, targets, softcap, run_max, run_sum, tgt_logit)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """W'[ids]: f32 (len(ids), in) (the cross-entropy's target rows)."""
        w = self.base.rows(ids)
        for t in self.terms:
            w += (t.B[ids] * np.float32(t.scale)) @ t.A
        return w

    # -- merge -----------------------------------------------------------------------------------
    def merged_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 of W' = W + Σ s·B·A as f32 (r1-r0, in): what a merged model stores."""
        return self.rows(np.arange(r0, r1, dtype=np.int64))
