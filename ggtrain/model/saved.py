"""Declared shapes of what the forward saves for the backward, and the bytes they take.

A structure saved for backward (BlockCache, LoraCache) is a dataclass whose array fields declare
`saved(...)` as their metadata: each names its shape in the dims of `block_dims` (and "in", "r"
for a LoRA input) and, where it exists only for some models, the HParams option (or the LoRA
setting) it depends on. ggtrain.train.memory computes the step-memory estimate from these
declarations, so a field added here is in the estimate at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from ggtrain.kernels.loss import CE_CHUNK  # noqa: F401  (the loss's chunk, also named here for the model)

F32 = 4  # every saved array is float32


def saved(*shape: str, when: str | None = None, alias: bool = False) -> dict[str, Any]:
    """The declaration of a saved float32 array, as a dataclass field's metadata: its `shape` (dim
    names); when: the option under which it holds an array of its own (otherwise it is None, or a
    view of one counted elsewhere); alias: always such a view.

        h: np.ndarray = field(metadata=saved("T", "d"))
    """
    return {"shape": shape, "when": when, "alias": alias}


def block_dims(hp: Any, T: int) -> dict[str, int]:
    """The dims saved shapes are declared in: T tokens and the block's sizes from HParams."""
    return {"T": int(T), "d": int(hp.n_embd), "n_head": int(hp.n_head), "n_head_kv": int(hp.n_head_kv),
            "head_dim": int(hp.head_dim), "head_dim_v": int(hp.head_dim_v), "ff": int(hp.n_ff)}


def _counted(f: Field, options: Any) -> bool:
    meta = f.metadata
    if "shape" not in meta or meta["alias"]:
        return False
    return not meta["when"] or bool(options[meta["when"]] if isinstance(options, Mapping)
                                    else getattr(options, meta["when"]))


def saved_bytes(cls: type, dims: Mapping[str, int], options: Any, names: Iterable[str] | None = None) -> int:
    """Bytes of the arrays of one `cls` (a dataclass of saved() fields) at these dims, or of the fields
    `names` only. options: the HParams (or a mapping) that says which `when` fields exist."""
    chosen = None if names is None else set(names)
    return sum(math.prod(dims[s] for s in f.metadata["shape"]) * F32 for f in fields(cls)
               if (chosen is None or f.name in chosen) and _counted(f, options))


def check_shapes(obj: Any, dims: Mapping[str, int]) -> None:
    """ValueError for a saved array whose shape is not its declared one (tests: the declarations hold)."""
    for f in fields(obj):
        a = getattr(obj, f.name)
        if "shape" not in f.metadata or a is None:
            continue
        want = tuple(dims[s] for s in f.metadata["shape"])
        if a.shape != want or a.dtype.itemsize != F32:
            raise ValueError(f"{type(obj).__name__}.{f.name}: {a.dtype} {a.shape}, declared float32 {want}")


@dataclass
class LoraCache:
    """What the backward of one LoRA term needs: its input and its projection ("in": the adapted
    weight's input size, "r": the rank)."""

    xd: np.ndarray = field(metadata=saved("T", "in", when="dropout"))  # drop(x); x itself without dropout
    h: np.ndarray = field(metadata=saved("T", "r"))  # xd·Aᵀ
    mask: np.ndarray | None = field(metadata=saved("T", "in", when="dropout"))  # inverted dropout's


@dataclass
class BlockCheckpoint:
    """What a block keeps under checkpointing; the rest is recomputed in backward. Its input, and the
    outputs of the two projections that the recompute then skips: attn_output's (before any
    post-norm) and ffn_down's (before its post-norm: only models with post-norms read it, the others
    need no ffn_down output in backward at all). 2 of a block's 7 products, for two (T, d) arrays.
    With keep_ffn also ffn_gate's and ffn_up's outputs, two (T, n_ff) arrays: the recompute then
    skips 4 of the 7 products, about half the block's product FLOPs."""

    x: np.ndarray = field(metadata=saved("T", "d"))  # the block's input
    o: np.ndarray = field(metadata=saved("T", "d"))  # a·Woᵀ (+ its LoRA)
    f: np.ndarray | None = field(metadata=saved("T", "d", when="has_post_norms"))  # m·Wdᵀ (+ its LoRA)
    g: np.ndarray | None = field(default=None, metadata=saved("T", "ff", when="keep_ffn"))  # h2·Wgᵀ (+ LoRA)
    u: np.ndarray | None = field(default=None, metadata=saved("T", "ff", when="keep_ffn"))  # h2·Wuᵀ (+ LoRA)

    @classmethod
    def nbytes(cls, hp: Any, T: int, keep_ffn: bool = False) -> int:
        options = {"has_post_norms": bool(hp.has_post_norms), "keep_ffn": keep_ffn}
        return saved_bytes(cls, block_dims(hp, T), options)


# The block's projections in the order it computes them (each one a LoraLinear).
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def projection_shapes(hp: Any) -> dict[str, tuple[int, int]]:
    """target -> (out, in) of its base weight, from HParams alone ("output": the LM head)."""
    d, ff = int(hp.n_embd), int(hp.n_ff)
    q, kv, kv_v = int(hp.n_head) * int(hp.head_dim), int(hp.n_head_kv) * int(hp.head_dim), \
        int(hp.n_head_kv) * int(hp.head_dim_v)
    a = int(hp.n_head) * int(hp.head_dim_v)
    return {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv_v, d), "attn_output": (d, a),
            "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff), "output": (int(hp.n_vocab), d)}


@dataclass(kw_only=True)
class BlockCache:
    """What block_forward keeps for block_backward (Model.block_forward documents each step)."""

    x: np.ndarray = field(metadata=saved("T", "d", alias=True))  # the block's input (counted as such)
    h: np.ndarray = field(metadata=saved("T", "d"))  # attn_norm(x)
    rstd1: np.ndarray = field(metadata=saved("T"))
    # q and k before their per-head norms (qwen3, gemma3)
    q_pre: np.ndarray | None = field(metadata=saved("T", "n_head", "head_dim", when="has_qk_norm"))
    k_pre: np.ndarray | None = field(metadata=saved("T", "n_head_kv", "head_dim", when="has_qk_norm"))
    rstd_q: np.ndarray | None = field(metadata=saved("T", "n_head", when="has_qk_norm"))
    rstd_k: np.ndarray | None = field(metadata=saved("T", "n_head_kv", when="has_qk_norm"))
    qr: np.ndarray = field(metadata=saved("T", "n_head", "head_dim"))  # q, k after RoPE
    kr: np.ndarray = field(metadata=saved("T", "n_head_kv", "head_dim"))
    v: np.ndarray = field(metadata=saved("T", "n_head_kv", "head_dim_v"))
    a: np.ndarray = field(metadata=saved("T", "n_head", "head_dim_v"))  # attention output
    lse: np.ndarray = field(metadata=saved("n_head", "T"))  # attention's log-sum-exp
    o_pre: np.ndarray | None = field(metadata=saved("T", "d", when="has_post_norms"))  # a·Woᵀ (gemma)
    rstd_po: np.ndarray | None = field(metadata=saved("T", when="has_post_norms"))
    x2: np.ndarray = field(metadata=saved("T", "d"))  # x + o
    h2: np.ndarray = field(metadata=saved("T", "d"))  # ffn_norm(x2)
    rstd2: np.ndarray = field(metadata=saved("T"))
    g: np.ndarray = field(metadata=saved("T", "ff"))  # gate, up and act(gate)·up
    u: np.ndarray = field(metadata=saved("T", "ff"))
    m: np.ndarray = field(metadata=saved("T", "ff"))
    f_pre: np.ndarray | None = field(metadata=saved("T", "d", when="has_post_norms"))  # m·Wdᵀ (gemma)
    rstd_pf: np.ndarray | None = field(metadata=saved("T", when="has_post_norms"))
    lora: dict[str, LoraCache] = field(default_factory=dict)  # projection -> its trainable term's cache

    # block_backward's widest point, besides this cache: the gradients shaped like these fields are
    # live at once (dx3 and, with post-norms, df beside dm, dg, du at the activation's backward).
    BACKWARD_PEAK: ClassVar[tuple[str, ...]] = ("x2", "f_pre", "g", "u", "m")

    @classmethod
    def nbytes(cls, hp: Any, lora_targets: Mapping[str, Any], T: int) -> int:
        """Bytes one block keeps at T tokens: the declared arrays present under `hp`'s options, plus each
        trained projection's LoraCache (lora_targets: target -> TargetSpec with rank and dropout)."""
        n = saved_bytes(cls, block_dims(hp, T), hp)
        shapes = projection_shapes(hp)
        for t, spec in lora_targets.items():
            if t in PROJECTIONS:
                n += saved_bytes(LoraCache, {"T": int(T), "in": shapes[t][1], "r": int(spec.rank)},
                                 {"dropout": spec.dropout > 0})
        return n

    @classmethod
    def backward_peak_bytes(cls, hp: Any, T: int) -> int:
        """Bytes of the gradients block_backward holds at its widest point (BACKWARD_PEAK)."""
        return saved_bytes(cls, block_dims(hp, T), hp, cls.BACKWARD_PEAK)

