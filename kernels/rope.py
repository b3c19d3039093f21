"""Rotary position embedding, forward/backward, with ggml's semantics (ggml-cpu/ops.cpp rope_f32).

    theta_i = pos * base^(-2i/n_rot) / freq_factors[i]           i = 0 .. n_rot/2 - 1
    YaRN (ext_factor != 0): theta_i mixes the interpolated freq_scale·theta and the extrapolated theta
    with ggml's ramp over the correction dims; mscale = attn_factor · (1 + 0.1 ln(1/freq_scale)).
    normal layout (llama):            (x[2i], x[2i+1])          rotated by theta_i, times mscale
    NeoX layout (qwen2/3, gemma):     (x[i],  x[i + n_rot/2])   rotated by theta_i, times mscale
    dims n_rot .. head_dim-1 pass through unchanged.

Split in two so a step computes the cos/sin table once and every layer (q and k, forward and
backward) reuses it: `rope_cache(pos, ...)` -> (T, n_rot/2, 2) [cos·mscale, sin·mscale], then
`rope_forward(x, cache, neox)` / `rope_backward(dy, cache, neox)`. The backward is the transpose of
the forward's linear map: the rotation by -theta with the same mscale (ggml_rope_back's sin_sign).

Positions come per token (int32), so packed samples restart their positions. Gemma 3's separate
local/global bases are two caches. The table mirrors ggml's float32 arithmetic (theta_scale = powf,
theta *= theta_scale per pair) so angles match llama.cpp's to the last bit at large positions.
"""

import math

import numpy as np
from ggtrain.kernels import PARALLEL_MIN  # smaller arrays run on the calling thread
from numba import njit, prange


def _yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    # ggml_rope_yarn_corr_dim (ggml.c), in float32 like the C code
    f = np.float32
    return float(f(n_dims) * np.log(f(n_ctx_orig) / (f(n_rot) * f(2) * f(math.pi))) / (f(2) * np.log(f(base))))


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the first and last rotated pair index of the YaRN ramp."""
    start = math.floor(_yarn_corr_dim(n_dims, n_ctx_orig, beta_fast, freq_base))
    end = math.ceil(_yarn_corr_dim(n_dims, n_ctx_orig, beta_slow, freq_base))
    return float(max(0.0, start)), float(min(n_dims - 1.0, end))


@njit(cache=True)  # serial: once per step, T × n_rot/2 entries; waking the thread pool would cost more
def _rope_cache(pos, n_half, theta_scale, freq_scale, ff, corr0, corr1, ext_factor, attn_factor, cache):
    # pos: (T,) int32; ff: (n_half,) f32 (ones when absent); cache: (T, n_half, 2) f32
    # float32 throughout, like ggml_rope_cache_init / rope_yarn.
    one = np.float32(1.0)
    for t in range(pos.shape[0]):
        theta = np.float32(pos[t])
        for i in range(n_half):
            theta_extrap = np.float32(theta / ff[i])
            theta_interp = np.float32(freq_scale * theta_extrap)
            th = theta_interp
            mscale = attn_factor
            if ext_factor != 0.0:
                y = np.float32((np.float32(i) - corr0) / max(np.float32(0.001), np.float32(corr1 - corr0)))
                ramp = np.float32(one - min(one, max(np.float32(0.0), y)))
                ramp_mix = np.float32(ramp * ext_factor)
                th = np.float32(theta_interp * (one - ramp_mix) + theta_extrap * ramp_mix)
                mscale = np.float32(mscale * np.float32(one + np.float32(0.1) * np.float32(math.log(one / freq_scale))))
            cache[t, i, 0] = np.float32(math.cos(th)) * mscale
            cache[t, i, 1] = np.float32(math.sin(th)) * mscale
            theta = np.float32(theta * theta_scale)


def rope_cache(
    pos: np.ndarray,
    n_rot: int,
    freq_base: float = 10000.0,
    freq_scale: float = 1.0,
    ext_factor: float = 0.0,
    attn_factor: float = 1.0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    n_ctx_orig: int = 0,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """pos (T,) int -> cache f32 (T, n_rot/2, 2) holding [cos, sin]·mscale per token and pair.

    Arguments are those of ggml_rope_ext: freq_scale = 1/linear-scaling factor, ext_factor > 0 turns
    YaRN on (corr dims from n_ctx_orig, beta_fast, beta_slow), attn_factor scales the result,
    freq_factors (n_rot/2,) f32 is llama3's rope_freqs.weight (theta divided by it)."""
    if n_rot % 2:
        raise ValueError(f"rope: n_rot must be even, got {n_rot}")
    n_half = n_rot // 2
    pos = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
    if freq_factors is None:
        ff = np.ones(n_half, dtype=np.float32)
    else:
        ff = np.ascontiguousarray(freq_factors, dtype=np.float32).reshape(-1)
        if ff.shape[0] < n_half:
            raise ValueError(f"rope: freq_factors has {ff.shape[0]} entries, need n_rot/2 = {n_half}")
    if ext_factor != 0 and n_ctx_orig <= 0:
        raise ValueError("rope: YaRN (ext_factor != 0) needs n_ctx_orig > 0")
    corr0, corr1 = yarn_corr_dims(n_rot, n_ctx_orig, freq_base, beta_fast, beta_slow) if ext_factor != 0 else (0.0, 0.0)
    theta_scale = np.float32(np.float32(freq_base) ** np.float32(-2.0 / n_rot))
    cache = np.empty((pos.shape[0], n_half, 2), dtype=np.float32)
    _rope_cache(pos, n_half, theta_scale, np.float32(freq_scale), ff, np.float32(corr0), np.float32(corr1),
                np.float32(ext_factor), np.float32(attn_factor), cache)
    return cache


@njit(cache=True, fastmath=True)
def _rope_row(x, cache, neox, sign, y, t):
    # token t of x, y (T, H, hd); cache (T, n_half, 2); sign = +1 forward, -1 backward (rotation by -theta)
    H, hd = x.shape[1], x.shape[2]
    n_half = cache.shape[1]
    for h in range(H):
        for i in range(n_half):
            c = cache[t, i, 0]
            s = sign * cache[t, i, 1]
            if neox:
                a = i
                b = i + n_half
            else:
                a = 2 * i
                b = 2 * i + 1
            x0 = x[t, h, a]
            x1 = x[t, h, b]
            y[t, h, a] = x0 * c - x1 * s
            y[t, h, b] = x0 * s + x1 * c
        for i in range(2 * n_half, hd):
            y[t, h, i] = x[t, h, i]


@njit(cache=True)
def _rope_serial(x, cache, neox, sign, y):
    for t in range(x.shape[0]):
        _rope_row(x, cache, neox, sign, y, t)


@njit(cache=True, parallel=True)
def _rope_parallel(x, cache, neox, sign, y):
    for t in prange(x.shape[0]):
        _rope_row(x, cache, neox, sign, y, t)


def _apply(x: np.ndarray, cache: np.ndarray, neox: bool, sign: float) -> np.ndarray:
    if x.ndim != 3 or x.shape[0] != cache.shape[0] or 2 * cache.shape[1] > x.shape[2]:
        raise ValueError(f"rope: x {x.shape} does not fit cache {cache.shape} (want x (T, H, hd), n_rot <= hd)")
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    run = _rope_parallel if x.size >= PARALLEL_MIN else _rope_serial
    run(x, cache.astype(x.dtype, copy=False), bool(neox), x.dtype.type(sign), y)
    return y


def rope_forward(x: np.ndarray, cache: np.ndarray, neox: bool) -> np.ndarray:
    """x (T, H, hd), cache (T, n_rot/2, 2) from rope_cache -> y (T, H, hd); neox picks the layout."""
    return _apply(x, cache, neox, 1.0)


def rope_backward(dy: np.ndarray, cache: np.ndarray, neox: bool) -> np.ndarray:
    """dy (T, H, hd) -> dx (T, H, hd): the transpose of the forward, a rotation by -theta."""
    return _apply(dy, cache, neox, -1.0)
