"""AdamW, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

AdamW follows torch.optim.AdamW (decoupled weight decay p ← p·(1 − lr·wd), bias-corrected moments,
eps added after the square root), which is also what llama.cpp's old `finetune` did with
--adam-alpha (lr), --adam-beta1/2, --adam-decay (wd) and --adam-gclip. Parameters are a dict of
float32 arrays updated in place (LoraWeights.flat as {"lora": flat} is one array for everything).

The schedule is the old finetune's shape (common/train.cpp's `learning_schedule`): linear
warmup step/warmup for step < warmup, then cosine decay from 1 to cos_decay_min over
cos_decay_steps (finetune's restarts and --adam-min-alpha floor are not offered: the CLI refuses
those flags). Steps are 1-based optimizer iterations (finetune's opt->iter), so the first warmup
step's multiplier is 1/warmup, not 0. Unlike finetune, the cosine is counted from the end of the warmup (as --cos-decay-steps' help says) and from 0 at its first
step: a run without warmup takes its first step at the full --learning-rate, not already decayed
(a 1-step run used to train at the minimum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ggtrain.errors import GGTrainError

_CHUNK = 1 << 20  # elements per float64 chunk in the norm (bounded scratch memory)


def _sumsq(g: np.ndarray) -> float:
    """Sum of squares accumulated in float64 without a full float64 copy of g."""
    flat = g.reshape(-1)
    total = 0.0
    for i in range(0, flat.size, _CHUNK):
        c = flat[i:i + _CHUNK].astype(np.float64)
        total += float(np.dot(c, c))
    return total


def global_grad_norm(grads: Mapping[str, np.ndarray] | Iterable[np.ndarray]) -> float:
    """L2 norm of all gradients taken together (float64)."""
    arrays = grads.values() if isinstance(grads, Mapping) else grads
    return math.sqrt(sum(_sumsq(g) for g in arrays))


def clip_grad_norm(grads: Mapping[str, np.ndarray] | Iterable[np.ndarray], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_: scale all grads in place by max_norm / (norm + 1e-6) when that
    is < 1. Returns the norm before clipping. max_norm <= 0 disables clipping (finetune's gclip 0)."""
    arrays = list(grads.values() if isinstance(grads, Mapping) else grads)
    norm = global_grad_norm(arrays)
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in arrays:
                g *= np.float32(coef)
    return norm


@dataclass(frozen=True)
class Schedule:
    """Learning rate at each (1-based) optimizer step: warmup, then cosine decay (finetune semantics)."""

    lr: float = 1e-3  # --adam-alpha / --learning-rate
    warmup: int = 100  # --warmup
    cos_decay_steps: int = 1000  # --cos-decay-steps (<= 0: no decay)
    cos_decay_min: float = 0.1  # --cos-decay-min: multiplier reached at the end of the decay

    def multiplier(self, step: int) -> float:
        """finetune's learning_schedule(step, ...) / lr: in [cos_decay_min, 1] after the warmup."""
        if step < self.warmup:
            return step / self.warmup
        if self.cos_decay_steps <= 0:
            return 1.0
        return _cosine_decay(self.decay_position(step), self.cos_decay_steps, self.cos_decay_min)

    def __call__(self, step: int) -> float:
        return self.lr * self.multiplier(step)

    def decay_position(self, step: int) -> int:
        """Steps into the cosine: 0 at the first step after the warmup (the first step without one)."""
        return max(0, step - max(self.warmup, 1))

    @staticmethod
    def whole_run_decay(total_steps: int, warmup: int) -> int:
        """cos_decay_steps that ends the cosine exactly at a run's last step (0: no decay to do)."""
        return max(0, total_steps - max(warmup, 1))


def _cosine_decay(step: int, decay_steps: int, minimum: float) -> float:
    step = min(step, decay_steps)
    c = 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - minimum) * c + minimum


class AdamW:
    """torch.optim.AdamW over a dict of float32 arrays, updated in place.

    opt = AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt.step(grads, lr=schedule(opt.t + 1))   # grads: same names and shapes as params
    """

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        for name, p in params.items():
            if p.dtype != np.float32 or not p.flags.c_contiguous or not p.flags.writeable:
                raise ValueError(f"AdamW parameter '{name}' must be a writable contiguous float32 array")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise GGTrainError(f"Adam betas must be in [0, 1), got {betas}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise GGTrainError(f"AdamW lr, eps and weight decay must be >= 0 (lr {lr}, eps {eps}, "
                               f"weight decay {weight_decay})")
        self.params = dict(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), \
            float(weight_decay)
        self.t = 0  # optimizer steps taken
        self.m = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: np.zeros_like(p) for n, p in self.params.items()}
        self._tmp = {n: np.empty_like(p) for n, p in self.params.items()}

    def step(self, grads: Mapping[str, np.ndarray], lr: float | None = None) -> None:
        """One AdamW update of every parameter with its gradient; lr overrides self.lr (schedules)."""
        if grads.keys() != self.params.keys():
            raise ValueError(f"gradients {sorted(grads)} do not match parameters {sorted(self.params)}")
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1.0 - b1 ** self.t
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        step_size = np.float32(lr / bc1)
        for name, p in self.params.items():
            g, m, v, tmp = grads[name], self.m[name], self.v[name], self._tmp[name]
            if self.weight_decay:
                p *= np.float32(1.0 - lr * self.weight_decay)
            m *= np.float32(b1)  # m = b1·m + (1 - b1)·g
            np.multiply(g, np.float32(1.0 - b1), out=tmp)
            m += tmp
            v *= np.float32(b2)  # v = b2·v + (1 - b2)·g²
            np.multiply(g, g, out=tmp)
            tmp *= np.float32(1.0 - b2)
            v += tmp
            np.sqrt(v, out=tmp)  # denom = sqrt(v) / sqrt(1 - b2^t) + eps
            tmp *= np.float32(1.0 / bc2_sqrt)
            tmp += np.float32(self.eps)
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp

    def state_dict(self) -> dict[str, Any]:
        """Copies of everything needed to continue exactly: step count, hyper-parameters, moments."""
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "m": {n: a.copy() for n, a in self.m.items()}, "v": {n: a.copy() for n, a in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict(); a moment whose name or shape differs from the parameters is refused."""
        for key in ("m", "v"):
            got = state[key]
            if got.keys() != self.params.keys():
                raise GGTrainError(f"optimizer state holds {sorted(got)}, the parameters are "
                                   f"{sorted(self.params)}")
            for n, a in got.items():
                if a.shape != self.params[n].shape:
                    raise GGTrainError(f"optimizer state '{key}' of '{n}' has shape {a.shape}, the parameter "
                                       f"has {self.params[n].shape}")
        for key in ("m", "v"):
            for n, a in state[key].items():
                getattr(self, key)[n][...] = a
        self.t = int(state["t"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), \
            float(state["weight_decay"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
