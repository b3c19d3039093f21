"""Choosing the next token: llama.cpp's default sampler chain (common/sampling.cpp, 0.3.36).

llama.cpp runs, in this order: penalties, dry, top_n_sigma, top_k, typical_p, top_p, min_p, xtc,
temperature, then draws from the distribution that is left. Of these the flags name penalties
(--repeat-penalty, --repeat-last-n), top_k, top_p, min_p and temperature; dry, top_n_sigma, typical_p
and xtc are off by default and are not offered. Each step is skipped exactly when llama.cpp skips it:

    penalties   repeat_last_n == 0 or repeat_penalty == 1     (over the last repeat_last_n tokens)
    top_k       top_k <= 0                                    (keeps the k largest, sorted)
    top_p       top_p >= 1                                    (smallest prefix with mass >= top_p)
    min_p       min_p <= 0                                    (logit >= max logit + log(min_p))
    temperature temp <= 0 keeps only the largest logit: greedy

The penalty divides a positive logit by repeat_penalty and multiplies a non-positive one (so a
repeated token always becomes less likely). Probabilities are float32 softmaxes over the candidates
left, as llama.cpp computes them; the draw uses a seeded numpy Generator, so one seed gives one
sequence of tokens (not llama.cpp's: its generator is std::mt19937).
Everything is vectorised over the vocabulary (262k entries for Gemma 3): argpartition for top-k,
no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ggtrain.errors import GGTrainError

RANDOM_SEED = -1  # llama.cpp's LLAMA_DEFAULT_SEED as the flag takes it: a fresh seed per run


@dataclass(frozen=True)
class SamplingParams:
    """The sampling flags, with llama.cpp's defaults and names (common/common.h)."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = RANDOM_SEED

    def __post_init__(self) -> None:
        if not (np.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise GGTrainError(f"--repeat-penalty {self.repeat_penalty}: must be a finite number above 0")
        if self.repeat_last_n < 0:
            raise GGTrainError(f"--repeat-last-n {self.repeat_last_n}: must be 0 (off) or more")
        if not (self.seed == RANDOM_SEED or 0 <= self.seed < 2**32):
            raise GGTrainError(f"--seed {self.seed}: must be from 0 to {2**32 - 1}, or -1 for a random seed")

    @property
    def greedy(self) -> bool:
        return self.temp <= 0


GREEDY = SamplingParams(temp=0.0)


def fresh_seed() -> int:
    """A random 32-bit seed (what seed -1 becomes; printed so the run can be repeated)."""
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """logits with every token among the last `last_n` of history penalised once (however often it
    occurs): positive logits divided by `penalty`, the others multiplied. A new array when anything
    changes; `logits` itself is never written."""
    if last_n == 0 or penalty == 1.0 or len(history) == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
    out = logits.copy()
    vals = out[recent]
    p = np.float32(penalty)
    out[recent] = np.where(vals <= 0, vals * p, vals / p)
    return out


def _softmax_f32(x: np.ndarray) -> np.ndarray:
    """llama.cpp's softmax over the candidates in their order: float32 exp, a running float32 sum."""
    e = np.exp(x - x.max(), dtype=np.float32)
    return e / np.cumsum(e, dtype=np.float32)[-1]


def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, logits) that top-k, top-p and min-p leave, in the order llama.cpp holds them:
    sorted by descending logit once top-k or top-p has run, vocabulary order otherwise."""
    ids: np.ndarray | None = None
    x = logits
    sorted_ = False
    n = x.shape[0]
    if params.top_k > 0:
        k = min(params.top_k, n)
        part = np.argpartition(x, n - k)[n - k:] if k < n else np.arange(n)  # the k largest
        ids = part[np.argsort(-x[part], kind="stable")]
        x = x[ids]
        sorted_ = True
    if params.top_p < 1.0:
        if not sorted_:
            ids = np.argsort(-x, kind="stable")
            x = x[ids]
            sorted_ = True
        cum = np.cumsum(_softmax_f32(x), dtype=np.float32)
        reached = np.flatnonzero(cum >= np.float32(params.top_p))
        keep = int(reached[0]) + 1 if reached.size else x.shape[0]
        ids, x = ids[:keep], x[:keep]  # type: ignore[index]
    if params.min_p > 0.0:
        floor = np.float32(x.max()) + np.float32(np.log(np.float32(params.min_p)))
        keep_mask = x >= floor
        if sorted_:
            keep_mask[0] = True  # llama.cpp's sorted form always keeps the first
        sel = np.flatnonzero(keep_mask)
        if sel.size == 0:  # min_p above 1: llama.cpp falls back to its sorted form, keeping the largest
            sel = np.array([int(np.argmax(x))])
        ids = sel if ids is None else ids[sel]
        x = x[sel]
    if ids is None:
        ids = np.arange(n)
    return ids, x


class Sampler:
    """llama.cpp's default chain for one run; `seed` is the seed in use (a fresh one for -1)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = fresh_seed() if params.seed == RANDOM_SEED else int(params.seed)
        self.rng = np.random.default_rng(self.seed)

    def distribution(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the draw chooses from: the chain up to and including the temperature."""
        p = self.params
        x = apply_repeat_penalty(np.asarray(logits, dtype=np.float32), history, p.repeat_penalty, p.repeat_last_n)
        if p.greedy:  # temperature <= 0 leaves only the largest logit
            return np.array([int(np.argmax(x))]), np.ones(1)
        ids, cand = candidates(x, p)
        z = cand / np.float32(p.temp)
        e = np.exp(z - z.max(), dtype=np.float32).astype(np.float64)
        return ids, e / e.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token for f32 logits (vocab,); history: the tokens in the context so far (prompt
        and generated), whose last repeat_last_n the repeat penalty looks at."""
        ids, probs = self.distribution(logits, history)
        u = self.rng.random()  # one draw per token, as llama.cpp's dist does, greedy or not
        if ids.size == 1:
            return int(ids[0])
        i = int(np.searchsorted(np.cumsum(probs), u, side="left"))
        return int(ids[min(i, ids.size - 1)])
