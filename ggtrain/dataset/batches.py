"""Tokenized samples as batches: cut them into --ctx windows, pack windows into rows (each with its
own segment id and positions from 0), and serve batches in a seeded order with a resumable
(epoch, index) position.

The pieces, for a sample (ggtrain.dataset.samples) of n tokens `ids` with per-token flags `train`:
    pairs       j = 0 .. n-2: input ids[j] -> target ids[j+1], loss weight train[j+1]
    window      a contiguous range of pairs [a, b), b - a <= ctx; a sample with more than ctx pairs
                is split on a grid of ctx (or cut to its first window with --truncate)
    row         ctx positions holding one window (padded) or several packed ones
                (--fill-with-next-samples, the default): positions restart at 0 and the segment id
                changes at every window, so attention never crosses a sample boundary
    batch       `Batch` of B rows: tokens, targets, mask, positions, segments, all (B, ctx)

A window that starts inside a sample (a > 0) gets BOS as its first input in place of ids[a] when the
sample itself starts with BOS, so every row starts the way the model saw text in pretraining.
Windows without a single trained target are dropped: with no context across rows they add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ggtrain.dataset.samples import (
    RNG_OFFSETS,
    RNG_SHUFFLE,
    DataOptions,
    Prepared,
    Sample,
    TemplateLike,
    TokenData,
    TokenizerLike,
    prepare_data,
)
from ggtrain.errors import GGTrainError


@dataclass
class Batch:
    """What one trainer step consumes. Row r, position i: input tokens[r, i] predicts targets[r, i]."""

    tokens: np.ndarray       # int32 (B, ctx) input ids
    targets: np.ndarray      # int32 (B, ctx) next-token ids
    mask: np.ndarray         # float32 (B, ctx) 1 where the target is trained, else 0
    positions: np.ndarray    # int32 (B, ctx) position within the sample window, from 0
    segments: np.ndarray     # int32 (B, ctx) 1, 2, ... per window in the row; 0 = padding
    epoch: int = 0           # data position of the first row (for logs)
    index: int = 0

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_trained(self) -> int:
        return int(self.mask.sum())

    def split(self, rows: int) -> list[Batch]:
        """Micro-batches of at most `rows` rows (the memory monitor's unit), in order."""
        return [Batch(self.tokens[i:i + rows], self.targets[i:i + rows], self.mask[i:i + rows],
                      self.positions[i:i + rows], self.segments[i:i + rows], self.epoch, self.index + i)
                for i in range(0, self.n_rows, rows)]


@dataclass
class EpochPlan:
    """The rows of one epoch: row k holds windows win_*[row_ptr[k]:row_ptr[k+1]] in order."""

    win_sample: np.ndarray   # int64 (W,) sample index of each window
    win_start: np.ndarray    # int64 (W,) first pair a
    win_stop: np.ndarray     # int64 (W,) end pair b (exclusive)
    row_ptr: np.ndarray      # int64 (R+1,)
    n_split: int             # samples longer than ctx (split or truncated)
    n_dropped: int           # windows dropped for having no trained target
    n_cut_tokens: int        # targets lost to --truncate

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1


def plan_windows(samples: list[Sample], ctx: int, truncate: bool, rng: np.random.Generator | None
                 ) -> tuple[list[tuple[int, int, int]], int, int, int]:
    """Windows (sample, a, b) of every sample in order; rng given = --sample-random-offsets."""
    windows: list[tuple[int, int, int]] = []
    n_split = n_dropped = n_cut = 0
    for si, s in enumerate(samples):
        p = s.n_targets
        if p <= ctx:
            windows.append((si, 0, p))
            continue
        n_split += 1
        tcum = np.concatenate([[0], np.cumsum(s.train[1:], dtype=np.int64)])  # trained targets in [0, j)
        if truncate:
            a = int(rng.integers(0, p - ctx + 1)) if rng is not None else 0
            cand = [(a, a + ctx)]
            n_cut += p - ctx
        else:
            # llama.cpp starts a sample at a random offset; here the split grid moves instead, so no
            # token is lost and the window boundaries differ from epoch to epoch.
            r = int(rng.integers(0, ctx)) if rng is not None else 0
            cuts = [0] + list(range(r if r else ctx, p, ctx)) + [p]
            cand = [(cuts[k], cuts[k + 1]) for k in range(len(cuts) - 1) if cuts[k + 1] > cuts[k]]
        for a, b in cand:
            if tcum[b] - tcum[a] > 0:
                windows.append((si, a, b))
            else:
                n_dropped += 1
    return windows, n_split, n_dropped, n_cut


def pack_rows(lengths: np.ndarray, ctx: int, fill: bool) -> np.ndarray:
    """row_ptr (R+1,) for windows of these lengths, in order: next-fit packing, or one a row.

    Next-fit (close the row when the next window does not fit) keeps the shuffled order and never
    cuts a window, so a response is never separated from its prompt; the padding it leaves is
    reported by `ggtrain data`.
    """
    if not fill:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    ptr = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > ctx:
            ptr.append(i)
            used = 0
        used += n
    ptr.append(len(lengths))
    return np.asarray(ptr if len(lengths) else [0], dtype=np.int64)


class Batches:
    """Seeded, resumable batches over TokenData.

    Epoch e: the windows (with --sample-random-offsets, drawn anew from (seed, e)) are shuffled with
    (seed, e) and packed into rows; batch k is rows [k*B, (k+1)*B) (the last batch of an epoch may
    be shorter). `state()` / `load_state()` carry the position (epoch, index of the next row): the
    same seed and state give the same batches, so a resumed run sees exactly the data it would have.
    """

    def __init__(self, data: TokenData, batch_size: int, opts: DataOptions, shuffle: bool = True):
        if batch_size < 1:
            raise GGTrainError(f"batch size {batch_size}: expected at least 1")
        self.data = data
        self.batch_size = batch_size
        self.ctx = opts.ctx
        self.seed = opts.seed & 0xFFFFFFFF
        self.fill = opts.fill_with_next_samples
        self.random_offsets = opts.sample_random_offsets and shuffle
        self.truncate = opts.truncate
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._plans: dict[int, EpochPlan] = {}
        # All samples end to end: a batch is one gather from these.
        lens = np.array([len(x.ids) for x in data.samples], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)   # (S,)
        self._ids = np.concatenate([x.ids for x in data.samples]).astype(np.int32)      # (N,)
        self._train = np.concatenate([x.train for x in data.samples])                   # bool (N,)

    # -- plans
    def plan(self, epoch: int) -> EpochPlan:
        """The rows of an epoch (cached: the current and the next one)."""
        p = self._plans.get(epoch)
        if p is not None:
            return p
        off_rng = np.random.default_rng([self.seed, RNG_OFFSETS, epoch]) if self.random_offsets else None
        wins, n_split, n_dropped, n_cut = plan_windows(self.data.samples, self.ctx, self.truncate, off_rng)
        w = np.asarray(wins, dtype=np.int64).reshape(-1, 3)
        if self.shuffle:
            w = w[np.random.default_rng([self.seed, RNG_SHUFFLE, epoch]).permutation(len(w))]
        row_ptr = pack_rows(w[:, 2] - w[:, 1], self.ctx, self.fill)
        p = EpochPlan(w[:, 0].copy(), w[:, 1].copy(), w[:, 2].copy(), row_ptr, n_split, n_dropped, n_cut)
        self._plans = {k: v for k, v in self._plans.items() if k in (epoch - 1, epoch)}
        self._plans[epoch] = p
        return p

    def rows_in_epoch(self, epoch: int = 0) -> int:
        return self.plan(epoch).n_rows

    def steps_in_epoch(self, epoch: int = 0) -> int:
        return math.ceil(self.rows_in_epoch(epoch) / self.batch_size)

    def total_steps(self, epochs: int) -> int:
        """Steps in epochs 0 .. epochs-1 (for a schedule planned over the whole run)."""
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    # -- position
    def state(self) -> dict[str, int]:
        """The position to checkpoint: the next batch starts at row `index` of epoch `epoch`."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise GGTrainError(f"the checkpoint's data seed {state['seed']} differs from --seed {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def next(self) -> Batch:
        """The next batch; after an epoch's last batch the position moves to the next epoch."""
        n = self.rows_in_epoch(self.epoch)
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
            n = self.rows_in_epoch(self.epoch)
        b = self.get(self.epoch, self.index, self.batch_size)
        self.index += b.n_rows
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
        return b

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """Every batch of one epoch in order (validation: one pass, no shuffle with shuffle=False)."""
        n = self.rows_in_epoch(epoch)
        for i in range(0, n, self.batch_size):
            yield self.get(epoch, i, self.batch_size)

    # -- assembly
    def get(self, epoch: int, index: int, n_rows: int) -> Batch:
        """Rows [index, index + n_rows) of an epoch as a Batch (fewer at the epoch's end).

        One gather from the flat token array: every (row, column) of every window is computed
        with numpy index arithmetic, no loop over rows, windows or tokens.
        """
        p = self.plan(epoch)
        r0, r1 = index, min(index + n_rows, p.n_rows)
        if r0 >= r1:
            raise IndexError(f"row {index} is past the end of epoch {epoch} ({p.n_rows} rows)")
        B, C = r1 - r0, self.ctx
        w0, w1 = int(p.row_ptr[r0]), int(p.row_ptr[r1])
        start, stop = p.win_start[w0:w1], p.win_stop[w0:w1]            # int64 (W,)
        lens = stop - start
        W = w1 - w0
        row_of_win = np.repeat(np.arange(B), np.diff(p.row_ptr[r0:r1 + 1]))     # (W,)
        excl = np.cumsum(lens) - lens                                  # first column if rows were one
        first_win = p.row_ptr[r0:r1] - w0                              # (B,) first window of each row
        col0 = excl - excl[first_win][row_of_win]                      # (W,) first column in its row
        seg = np.arange(W) - first_win[row_of_win] + 1                 # (W,) 1, 2, ... within the row
        win_of_tok = np.repeat(np.arange(W), lens)                     # (T,)
        pos = np.arange(len(win_of_tok)) - np.repeat(excl, lens)       # (T,) position in its window
        src = self._offsets[p.win_sample[w0:w1]][win_of_tok] + start[win_of_tok] + pos   # input index
        row = row_of_win[win_of_tok]
        col = col0[win_of_tok] + pos

        tokens = np.zeros((B, C), np.int32)
        targets = np.zeros((B, C), np.int32)
        mask = np.zeros((B, C), np.float32)
        segments = np.zeros((B, C), np.int32)
        # Padding (segment 0, masked) counts its own positions from 0 after the row's last window.
        used = np.bincount(row_of_win, weights=lens, minlength=B).astype(np.int64)
        positions = (np.arange(C)[None, :] - used[:, None]).astype(np.int32)
        flat = row * C + col                                           # (T,) index into a (B, C) array
        tokens.ravel()[flat] = self._ids[src]
        targets.ravel()[flat] = self._ids[src + 1]
        mask.ravel()[flat] = self._train[src + 1]
        positions.ravel()[flat] = pos
        segments.ravel()[flat] = seg[win_of_tok]
        bos = self.data.bos_id
        if bos is not None:
            # A window starting inside a sample that begins with BOS gets BOS as its first input.
            cont = (start > 0) & (self._ids[self._offsets[p.win_sample[w0:w1]]] == bos)
            tokens[row_of_win[cont], col0[cont]] = bos
        return Batch(tokens, targets, mask, positions, segments, epoch, index)


def load_batches(opts: DataOptions, tok: TokenizerLike, batch_size: int, mf: Any = None,
                 tmpl: TemplateLike | None = None) -> tuple[Batches, Batches | None, Prepared]:
    """What the trainer calls: training batches (shuffled per epoch from --seed) and, with
    --val-data / --val-split, validation batches (fixed order: iterate `val.epoch_batches(0)`)."""
    prep = prepare_data(opts, tok, mf, tmpl)
    train = Batches(prep.train, batch_size, opts)
    val = Batches(prep.val, batch_size, opts, shuffle=False) if prep.val is not None else None
    return train, val, prep


# --- what `ggtrain data` reports -----------------------------------------------------------------------

@dataclass
class DataStats:
    n_samples: int
    n_tokens: int
    n_trained: int
    max_len: int
    n_split: int
    n_dropped: int
    n_cut_tokens: int
    n_rows: int
    n_windows: int
    n_positions_used: int
    n_trained_in_rows: int


def data_stats(data: TokenData, opts: DataOptions) -> DataStats:
    """Counts for the first epoch's layout (no shuffle: the layout's totals do not depend on it)."""
    b = Batches(data, 1, replace(opts, sample_random_offsets=False), shuffle=False)
    p = b.plan(0)
    lens = p.win_stop - p.win_start
    tcum = np.concatenate([[0], np.cumsum(b._train, dtype=np.int64)])  # trained tokens before index i
    first = b._offsets[p.win_sample] + p.win_start + 1                  # first target of each window
    trained_in_rows = int((tcum[first + lens] - tcum[first]).sum())
    return DataStats(
        n_samples=len(data.samples), n_tokens=data.n_tokens, n_trained=data.n_trained,
        max_len=max(len(s.ids) for s in data.samples), n_split=p.n_split, n_dropped=p.n_dropped,
        n_cut_tokens=p.n_cut_tokens, n_rows=p.n_rows, n_windows=len(lens),
        n_positions_used=int(lens.sum()), n_trained_in_rows=trained_in_rows)
