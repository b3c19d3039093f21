"""LoRA: which projections are adapted, the trainable A/B matrices, and the math of one LoRA term.

For an adapted base weight W (out, in), a LoRA pair adds a low-rank update:
    y = x·Wᵀ + scale · (drop(x)·Aᵀ)·Bᵀ,   A (r, in), B (out, r), scale = alpha / r
which is `W' = W + scale · B·A` once merged. Init follows PEFT (init_lora_weights=True):
A ~ kaiming_uniform_(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0, so training starts at the base.
Dropout is PEFT's: inverted dropout (keep with 1-p, scale by 1/(1-p)) on the LoRA branch's input only.

All parameters live in one flat float32 buffer (`LoraWeights.flat`) with per-tensor views, so the
optimizer and the checkpoint handle a single array; `LoraWeights.zeros_like()` gives gradients of
the same layout. `lora_linear_forward` / `lora_linear_backward` are one term's forward/backward pair;
`lora_shared_addends` (what the base products add as they store their outputs) / `lora_shared_backward`
the same for terms that share their input (q/k/v, gate/up: one x·[A_q; A_k; A_v]ᵀ product), which the
model's blocks use; ggtrain.model.linear.LoraLinear (a
base weight with its terms) is the layer for everything else.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.kernels.lowrank import lowrank_dy_products
from ggtrain.model.saved import LoraCache

# Adaptable projections, in the order the block computes them; "output" is the LM head.
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
DEFAULT_TARGETS = TARGETS[:-1]
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def target_of(name: str) -> tuple[int | None, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q'); 'output.weight' -> (None, 'output'); else GGTrainError."""
    m = _BLOCK_NAME.match(name)
    if m and m.group(2) in TARGETS[:-1]:
        return int(m.group(1)), m.group(2)
    if name == "output.weight":
        return None, "output"
    raise GGTrainError(f"tensor '{name}' is not a projection ggtrain can adapt "
                       f"(targets: {', '.join(TARGETS)})")


def tensor_name(target: str, layer: int | None) -> str:
    return "output.weight" if target == "output" else f"blk.{layer}.{target}.weight"


@dataclass(frozen=True)
class TargetSpec:
    """LoRA settings of one target module; rank 0 means the target is not adapted."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclass
class LoraConfig:
    """Which targets are adapted and how: target -> TargetSpec (only targets with rank > 0)."""

    targets: dict[str, TargetSpec] = field(default_factory=dict)

    @classmethod
    def make(cls, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
             targets: Iterable[str] = DEFAULT_TARGETS, ranks: Mapping[str, int] | None = None,
             alphas: Mapping[str, float] | None = None,
             dropouts: Mapping[str, float] | None = None) -> LoraConfig:
        """Every target in `targets` gets rank r (alpha defaults to r: scale 1), dropout p;
        `ranks` / `alphas` / `dropouts` override per target (the --rank-wq ... flags; rank 0 drops
        the target, and a rank given for a target outside `targets` adds it)."""
        ranks, alphas, dropouts = dict(ranks or {}), dict(alphas or {}), dict(dropouts or {})
        chosen = list(targets)
        for t in list(ranks) + list(alphas) + list(dropouts) + chosen:
            if t not in TARGETS:
                raise GGTrainError(f"unknown LoRA target '{t}' (targets: {', '.join(TARGETS)})")
        chosen += [t for t in ranks if t not in chosen]
        specs = {}
        for t in TARGETS:  # canonical order
            if t not in chosen:
                continue
            rank = int(ranks.get(t, r))
            a = float(alphas.get(t, alpha if alpha is not None else rank))
            p = float(dropouts.get(t, dropout))
            if rank < 0:
                raise GGTrainError(f"LoRA rank of {t} must be >= 0, got {rank}")
            if not 0.0 <= p < 1.0:
                raise GGTrainError(f"LoRA dropout of {t} must be in [0, 1), got {p}")
            if rank and a <= 0:
                raise GGTrainError(f"LoRA alpha of {t} must be > 0, got {a}")
            if rank:
                specs[t] = TargetSpec(rank, a, p)
        if not specs:
            raise GGTrainError("LoRA config adapts no tensor (every rank is 0)")
        return cls(specs)

    def to_dict(self) -> dict[str, Any]:
        return {t: {"rank": s.rank, "alpha": s.alpha, "dropout": s.dropout} for t, s in self.targets.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        return cls({t: TargetSpec(int(v["rank"]), float(v["alpha"]), float(v.get("dropout", 0.0)))
                    for t, v in d.items()})


def target_shapes(tensors: Mapping[str, Any], config: LoraConfig, n_layer: int,
                  source: str = "base model") -> dict[str, tuple[int, int]]:
    """Base tensor name -> (out, in) for every tensor the config adapts, in forward order.

    `tensors` is ModelFile.tensors (or any name -> object with .shape (out, in)). A target missing
    from the base is a GGTrainError naming it (e.g. "output" on a model with tied embeddings,
    which llama.cpp cannot apply an adapter to).
    """
    shapes: dict[str, tuple[int, int]] = {}
    for il in range(n_layer):
        for t in config.targets:
            if t != "output":
                shapes[tensor_name(t, il)] = (0, 0)
    if "output" in config.targets:
        shapes["output.weight"] = (0, 0)
    for name in shapes:
        if name not in tensors:
            hint = " (the model ties its output head to the token embeddings)" if name == "output.weight" else ""
            raise GGTrainError(f"{source}: has no tensor '{name}' to adapt{hint}")
        shape = tuple(int(s) for s in tensors[name].shape)
        if len(shape) != 2:
            raise GGTrainError(f"{source}: tensor '{name}' has shape {shape}, expected a matrix")
        shapes[name] = (shape[0], shape[1])
    return shapes


@dataclass(frozen=True)
class LoraEntry:
    """One adapted tensor: its views into the flat buffer and its settings."""

    name: str  # base tensor, e.g. "blk.3.attn_q.weight"
    A: np.ndarray  # f32 (r, in) view
    B: np.ndarray  # f32 (out, r) view
    alpha: float
    dropout: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraWeights:
    """The trainable LoRA parameters of a model: base tensor name -> LoraEntry, one flat f32 buffer.

    Layout of `flat`: for each entry in order, A (r·in values) then B (out·r values).
    """

    def __init__(self, layout: Mapping[str, tuple[int, int, int, float, float]], flat: np.ndarray | None = None):
        """layout: name -> (out, in, r, alpha, dropout), in order. flat: an existing buffer to view."""
        total = sum(r * (o + i) for o, i, r, _, _ in layout.values())
        if flat is None:
            flat = np.zeros(total, dtype=np.float32)
        if flat.dtype != np.float32 or flat.shape != (total,) or not flat.flags.c_contiguous:
            raise ValueError(f"flat buffer must be contiguous float32 ({total},), got {flat.dtype} {flat.shape}")
        self.flat = flat
        self.layout = dict(layout)
        self.entries: dict[str, LoraEntry] = {}
        pos = 0
        for name, (o, i, r, alpha, p) in self.layout.items():
            if r <= 0:
                raise ValueError(f"{name}: rank must be > 0")
            a = flat[pos:pos + r * i].reshape(r, i)
            pos += r * i
            b = flat[pos:pos + o * r].reshape(o, r)
            pos += o * r
            self.entries[name] = LoraEntry(name, a, b, float(alpha), float(p))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def init(cls, config: LoraConfig, shapes: Mapping[str, tuple[int, int]], seed: int = 0) -> LoraWeights:
        """PEFT init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0. Each tensor draws from its own stream
        seeded by (seed, name), so adding or dropping a target does not change the others."""
        layout = {}
        for name, (o, i) in shapes.items():
            spec = config.targets[target_of(name)[1]]
            layout[name] = (o, i, spec.rank, spec.alpha, spec.dropout)
        lw = cls(layout)
        for name, e in lw.entries.items():
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            bound = 1.0 / math.sqrt(e.A.shape[1])  # kaiming_uniform_(a=sqrt(5)): gain·sqrt(3/fan_in)
            e.A[...] = rng.uniform(-bound, bound, size=e.A.shape).astype(np.float32)
        return lw

    def zeros_like(self) -> LoraWeights:
        """A buffer of the same layout filled with zeros (gradients, optimizer moments)."""
        return LoraWeights(self.layout)

    # -- access ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> LoraEntry:
        return self.entries[name]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_params(self) -> int:
        return self.flat.size

    def tensors(self) -> dict[str, np.ndarray]:
        """'NAME.lora_a' -> A view, 'NAME.lora_b' -> B view (the GGUF adapter's tensor names)."""
        out = {}
        for name, e in self.entries.items():
            out[f"{name}.lora_a"] = e.A
            out[f"{name}.lora_b"] = e.B
        return out

    def delta(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """float64 (out, in) merged update scale · B·A of one tensor, or of its `rows` (merge, tests)."""
        e = self.entries[name]
        return e.scale * (e.B[rows].astype(np.float64) @ e.A.astype(np.float64))

    def layout_dict(self) -> dict[str, list]:
        """JSON-able layout, for checkpoints."""
        return {n: list(v) for n, v in self.layout.items()}

    @classmethod
    def from_layout_dict(cls, d: Mapping[str, Any], flat: np.ndarray | None = None) -> LoraWeights:
        return cls({n: (int(v[0]), int(v[1]), int(v[2]), float(v[3]), float(v[4])) for n, v in d.items()}, flat)


# -- one LoRA term: forward and backward ---------------------------------------------------------
def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float) -> np.ndarray | None:
    """Inverted-dropout mask f32 `shape`: 0 with probability p, else 1/(1-p). None when p == 0."""
    if p <= 0.0:
        return None
    keep = rng.random(shape, dtype=np.float32) >= np.float32(p)
    return keep.astype(np.float32) * np.float32(1.0 / (1.0 - p))


def _add_product(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float = 1.0, trans_b: bool = False) -> None:
    """c += alpha · a · op(b) in place, for the (T, out) / (T, in) sums: f32 through kernels/gemm (sgemm
    with beta = 1: no (T, out) temporary, no second pass to add it); other dtypes (the tests' float64)
    with numpy. The small products (T, r), (r, in), (out, r) stay numpy's `@`, which is as fast there."""
    if a.dtype == b.dtype == c.dtype == np.float32:
        from ggtrain.kernels.gemm import gemm  # on first use: it loads scipy's BLAS
        gemm(a, b, c, alpha, 1.0, False, trans_b, kernels.get_num_threads())
        return
    p = a @ (b.T if trans_b else b)
    if alpha != 1.0:
        p *= c.dtype.type(alpha)
    c += p


def _stacked(mats: Sequence[np.ndarray]) -> np.ndarray:
    return mats[0] if len(mats) == 1 else np.concatenate(mats)


def lora_shared_addends(x: np.ndarray, As: Sequence[np.ndarray], Bs: Sequence[np.ndarray],
                        scales: Sequence[float]) -> tuple[list[LoraCache], list[tuple[np.ndarray, np.ndarray]]]:
    """LoRA terms that share their input x (T, in) (q/k/v of one norm's output, gate/up): term i adds
    scales[i] · (x·A_iᵀ)·B_iᵀ to its base output. x·[A_1; A_2; …]ᵀ is one (T, Σr) product (x is read
    once); each term's cache holds its columns h_i of it, and its addend is (h_i (T, r), s_i·B_iᵀ
    (r, out)): the low-rank product kernels.qmatmul adds as it stores the base output."""
    ranks = [A.shape[0] for A in As]
    h = x @ _stacked(As).T  # (T, Σr)
    caches, addends, off = [], [], 0
    for B, s, r in zip(Bs, scales, ranks):
        hi = h[:, off:off + r]
        caches.append(LoraCache(x, hi, None))
        addends.append((hi, np.ascontiguousarray((B * B.dtype.type(s)).T)))
        off += r
    return caches, addends


def lora_shared_backward(dys: Sequence[np.ndarray], As: Sequence[np.ndarray], Bs: Sequence[np.ndarray],
                         scales: Sequence[float], caches: Sequence[LoraCache], dAs: Sequence[np.ndarray],
                         dBs: Sequence[np.ndarray], dx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The backward of lora_shared_addends' terms (or of one term with dropout): adds each term's dA_i (r, in)
    into dAs[i], dB_i (out, r) into dBs[i] and the LoRA part of dL/dx, Σ_i dx_i, into dx (T, in).
    The caches share their input xd (a single term may carry its dropout mask). dx None (no dropout
    mask): that part is returned instead as the addend (dh (T, Σr), [A_1; A_2; …]) for the base's
    input-gradient product to add (kernels.qmatmul_backward_input's addend)."""
    xd = caches[0].xd
    ranks = [A.shape[0] for A in As]
    dh = np.empty((xd.shape[0], sum(ranks)), dtype=np.result_type(xd, dys[0]))
    off = 0
    for dy, B, s, c, dB, r in zip(dys, Bs, scales, caches, dBs, ranks):
        lowrank_dy_products(dy, B, c.h, s, dh[:, off:off + r], dB)  # dh_i = s·dy_i·B_i, dB_i += s·dy_iᵀ·h_i
        off += r
    dA = dh.T @ xd  # one pass over xd for every term's dA
    off = 0
    for acc, r in zip(dAs, ranks):
        acc += dA[off:off + r]
        off += r
    mask = caches[0].mask
    if dx is None:
        if mask is not None:
            raise ValueError("a LoRA term with a dropout mask adds its dx itself: pass dx")
        return dh, _stacked(As)
    if mask is None:
        _add_product(dh, _stacked(As), dx)  # dx += dh·[A_1; A_2; …]
    else:  # dropout: the branch's dx is masked before it joins the base's
        dx += (dh @ As[0]) * mask
    return None


def lora_linear_forward(x: np.ndarray, base_y: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float,
                        dropout_mask: np.ndarray | None = None) -> tuple[np.ndarray, LoraCache]:
    """y = base_y + scale · (drop(x)·Aᵀ)·Bᵀ.

    x (T, in) f32, base_y (T, out) f32 (= x·Wᵀ from the quantized base; updated IN PLACE and returned
    as y, to spare a (T, out) buffer), A (r, in), B (out, r), dropout_mask (T, in) or None.
    """
    cache = lora_input_cache(x, A, dropout_mask)
    _add_product(cache.h, B, base_y, alpha=scale, trans_b=True)  # y += s · h·Bᵀ
    return base_y, cache


def lora_input_cache(x: np.ndarray, A: np.ndarray, dropout_mask: np.ndarray | None = None) -> LoraCache:
    """One term's LoraCache for input x (T, in): drop(x) and drop(x)·Aᵀ (T, r) (the forward's first
    product; also what a checkpointed block's recompute needs where it skips the base product)."""
    xd = x * dropout_mask if dropout_mask is not None else x
    return LoraCache(xd, xd @ A.T, dropout_mask)


def lora_linear_backward(dy: np.ndarray, x: np.ndarray, A: np.ndarray, B: np.ndarray, scale: float,
                         cache: LoraCache, dA_out: np.ndarray | None = None,
                         dB_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the LoRA branch. dy (T, out), x (T, in) -> dA (r, in), dB (out, r), dx_lora (T, in).

    dx_lora is only the LoRA part of dL/dx; the base part dy·W comes from
    ggtrain.kernels.qmatmul_backward_input. dA_out / dB_out: buffers to ADD the gradients into
    (gradient accumulation over micro-batches); they are returned as dA, dB.
    x is not read (cache.xd holds the LoRA input); it is in the signature so every *_backward takes
    its forward's inputs.
    """
    dt = np.result_type(dy, cache.xd)
    dA = dA_out if dA_out is not None else np.zeros(A.shape, dtype=dt)
    dB = dB_out if dB_out is not None else np.zeros(B.shape, dtype=dt)
    dx = np.zeros((dy.shape[0], A.shape[1]), dtype=dt)
    lora_shared_backward([dy], [A], [B], [scale], [cache], [dA], [dB], dx)
    return dA, dB, dx
