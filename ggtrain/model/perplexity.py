"""Perplexity by llama-perplexity's method (tools/perplexity/perplexity.cpp).

The text is tokenized once with BOS/EOS as the vocabulary says (no special-token parsing), cut into
chunks of n_ctx tokens (the tail that does not fill a chunk is dropped); each chunk's first token
is replaced by BOS when the vocabulary adds one, and only the second half of the chunk is scored
(positions n_ctx/2 .. n_ctx-2 predicting the next token), so every scored token has context.
    PPL = exp(mean nll),  +/- PPL · sqrt((mean nll² - mean nll²) / (count - 1))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ggtrain.errors import GGTrainError
from ggtrain.model.transformer import Batch, Model


@dataclass
class ChunkResult:
    """Running figures after chunk `index` (1-based), as llama-perplexity prints them."""

    index: int
    n_chunks: int
    ppl: float  # running estimate over all chunks so far
    nll_sum: float
    nll2_sum: float
    count: int

    @property
    def error(self) -> float:
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 and self.count > 1 else float("nan")


def chunk_batch(tokens: np.ndarray, starts: list[int], n_ctx: int, bos_id: int | None) -> Batch:
    """Rows of n_ctx tokens from `starts`, BOS first, the second half's next tokens as trained targets."""
    first = n_ctx // 2
    rows = np.stack([tokens[s:s + n_ctx] for s in starts]).astype(np.int32)
    targets = np.full_like(rows, -1)
    targets[:, :-1] = rows[:, 1:]  # original tokens: position 0 may become BOS below, targets never do
    if bos_id is not None:
        rows[:, 0] = bos_id
    mask = np.zeros(rows.shape, dtype=np.float32)
    mask[:, first:n_ctx - 1] = 1.0
    return Batch.from_rows(rows, targets, mask)


def perplexity_chunks(model: Model, tokens: np.ndarray, n_ctx: int, n_batch: int,
                      bos_id: int | None, n_chunks: int = -1) -> Iterator[ChunkResult]:
    """Yields the running estimate after each chunk. n_batch tokens are evaluated per forward
    (n_batch // n_ctx chunks side by side, as llama-perplexity's n_seq)."""
    if n_ctx < 4:
        raise GGTrainError(f"context size {n_ctx} is too small for perplexity (at least 4)")
    if len(tokens) < 2 * n_ctx:
        raise GGTrainError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
                           f"{n_ctx}; the text tokenizes to only {len(tokens)}")
    total = len(tokens) // n_ctx
    total = total if n_chunks < 0 else min(n_chunks, total)
    n_seq = max(1, n_batch // n_ctx)
    nll = nll2 = 0.0
    count = 0
    for i in range(0, total, n_seq):
        starts = [(i + s) * n_ctx for s in range(min(n_seq, total - i))]
        batch = chunk_batch(tokens, starts, n_ctx, bos_id)
        _, state = model.forward(batch, train=False)
        losses = state.loss_state.losses.reshape(len(starts), n_ctx)[:, n_ctx // 2:n_ctx - 1]
        for s in range(len(starts)):
            nll += float(losses[s].sum())
            nll2 += float(np.square(losses[s]).sum())
            count += losses.shape[1]
            yield ChunkResult(i + s + 1, total, math.exp(nll / count), nll, nll2, count)


def perplexity(model: Model, tokens: np.ndarray, n_ctx: int, n_batch: int, bos_id: int | None,
               on_chunk: Callable[[ChunkResult], None] | None = None) -> ChunkResult:
    """The final estimate (the last chunk's running figures)."""
    last = None
    for r in perplexity_chunks(model, tokens, n_ctx, n_batch, bos_id):
        if on_chunk is not None:
            on_chunk(r)
        last = r
    assert last is not None
    return last
