"""Data pipeline speed: tokenising + masking a dataset, and assembling batches, on the default model's
tokenizer. Prints figures; the baseline for batch assembly is the straightforward per-row, per-window
copy loop (measured in the same run), to show what the vectorised gather buys.

    python bench/data.py [--copies 50] [--ctx 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ggtrain.samples import sample_path

from ggtrain.dataset.batches import Batch, Batches
from ggtrain.dataset.samples import DataOptions, prepare_data
from ggtrain.gguf.defaults import default_model_path
from ggtrain.gguf.modelfile import ModelFile
from ggtrain.text.tokenizer import Tokenizer


def loop_get(b: Batches, epoch: int, index: int, n_rows: int) -> Batch:
    """Baseline: copy window by window (what get() did before it became one gather)."""
    p = b.plan(epoch)
    r0, r1 = index, min(index + n_rows, p.n_rows)
    B, C = r1 - r0, b.ctx
    tokens = np.zeros((B, C), np.int32)
    targets = np.zeros((B, C), np.int32)
    mask = np.zeros((B, C), np.float32)
    positions = np.zeros((B, C), np.int32)
    segments = np.zeros((B, C), np.int32)
    ar = np.arange(C, dtype=np.int32)
    for r in range(B):
        off = 0
        for k, w in enumerate(range(p.row_ptr[r0 + r], p.row_ptr[r0 + r + 1]), 1):
            s = b.data.samples[p.win_sample[w]]
            a, e = int(p.win_start[w]), int(p.win_stop[w])
            n = e - a
            tokens[r, off:off + n] = s.ids[a:e]
            targets[r, off:off + n] = s.ids[a + 1:e + 1]
            mask[r, off:off + n] = s.train[a + 1:e + 1]
            positions[r, off:off + n] = ar[:n]
            segments[r, off:off + n] = k
            if a > 0 and s.ids[0] == b.data.bos_id:
                tokens[r, off] = b.data.bos_id
            off += n
        positions[r, off:] = ar[:C - off]
    return Batch(tokens, targets, mask, positions, segments, epoch, index)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=50, help="copies of data/alpaca.json (40 samples each)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    tok = Tokenizer.from_model_file(ModelFile(default_model_path()))
    rows = json.loads(sample_path("alpaca.json").read_text()) * args.copies
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "alpaca.json"
        f.write_text(json.dumps(rows))
        opts = DataOptions(train_data=f, ctx=args.ctx)
        t = time.perf_counter()
        prep = prepare_data(opts, tok)
        dt = time.perf_counter() - t
    n_tok = prep.train.n_tokens
    print(f"prepare (read + tokenise + masks): {len(rows)} samples, {n_tok:,} tokens in {dt:.2f} s "
          f"= {n_tok / dt:,.0f} tokens/s")

    b = Batches(prep.train, args.batch, opts)
    t = time.perf_counter()
    n_rows = b.rows_in_epoch(0)
    dt_plan = time.perf_counter() - t
    print(f"epoch plan (windows, shuffle, packing): {n_rows} rows of {args.ctx} in {dt_plan * 1e3:.1f} ms")

    def timed(fn) -> float:
        t = time.perf_counter()
        for i in range(0, n_rows, args.batch):
            fn(b, 0, i, args.batch)
        return time.perf_counter() - t

    for i in range(0, n_rows, args.batch):  # same result both ways
        x, y = b.get(0, i, args.batch), loop_get(b, 0, i, args.batch)
        assert all(np.array_equal(getattr(x, k), getattr(y, k))
                   for k in ("tokens", "targets", "mask", "positions", "segments"))
    best_g = min(timed(Batches.get) for _ in range(3))
    best_l = min(timed(loop_get) for _ in range(3))
    n_b = -(-n_rows // args.batch)
    print(f"batch assembly, gather:   {n_b} batches in {best_g * 1e3:.1f} ms = "
          f"{n_rows * args.ctx / best_g:,.0f} positions/s")
    print(f"batch assembly, loop:     {n_b} batches in {best_l * 1e3:.1f} ms = "
          f"{n_rows * args.ctx / best_l:,.0f} positions/s (baseline)")
    print(f"gather / loop speed-up:   {best_l / best_g:.1f}x")


if __name__ == "__main__":
    main()
