"""The KV cache of a decoding session: per layer, the keys (after q/k norm and rope) and the values of
every position evaluated so far, f32, allocated once for n_ctx positions.

    k[il] (n_ctx, Hkv, head_dim), v[il] (n_ctx, Hkv, head_dim_v)

Positions are slots: position p lives in row p, so truncating the sequence is only moving n_past
back (rows past it are overwritten by the next tokens). Its size is fixed by n_ctx:
2 · n_layer · n_ctx · Hkv · head_dim · 4 bytes (Gemma 3 270M at 4096: 144 MiB).
"""

from __future__ import annotations

import numpy as np
import psutil

from ggtrain.errors import GGTrainError
from ggtrain.gguf.arch import HParams
from ggtrain.train.memory import format_bytes


class KVCache:
    """Keys and values of positions 0 .. n_ctx-1 for every layer."""

    def __init__(self, hp: HParams, n_ctx: int) -> None:
        if n_ctx < 1:
            raise ValueError(f"KV cache of {n_ctx} positions")
        need, avail = self.bytes_for(hp, n_ctx), psutil.virtual_memory().available
        if need > avail:  # refused before allocating, rather than dying of it (generate, chat, previews alike)
            raise GGTrainError(f"-c/--ctx-size {n_ctx}: the KV cache would take {format_bytes(need)}, more than "
                               f"the {format_bytes(avail)} of memory available; give a smaller -c")
        self.n_ctx = n_ctx
        # np.zeros: pages are taken from the OS as positions fill, not all at once
        self.k = [np.zeros((n_ctx, hp.n_head_kv, hp.head_dim), np.float32) for _ in range(hp.n_layer)]
        self.v = [np.zeros((n_ctx, hp.n_head_kv, hp.head_dim_v), np.float32) for _ in range(hp.n_layer)]

    @staticmethod
    def bytes_for(hp: HParams, n_ctx: int) -> int:
        """What a cache of n_ctx positions holds, in bytes (before allocating it)."""
        return 4 * n_ctx * hp.n_layer * hp.n_head_kv * (hp.head_dim + hp.head_dim_v)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def store(self, il: int, p0: int, k: np.ndarray, v: np.ndarray) -> None:
        """Layer il's keys k (n, Hkv, D) and values v (n, Hkv, Dv) of positions p0 .. p0+n-1."""
        n = k.shape[0]
        self.k[il][p0:p0 + n] = k
        self.v[il][p0:p0 + n] = v
