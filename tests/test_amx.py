"""The AMX-BF16 kernel (kernels/bf16mm_amx.pyx, amx_bf16mm.h) and the emulation that proves it here.

This machine kind is sometimes an AMD Zen 5 without AMX: the real module is compiled there but
never run. The same kernel text is built a second time against kernels/amx_emulate.h's C tile
instructions (bf16mm_amxemu_avx512bf16), which runs on any AVX512-BF16 CPU. Proven:
- the emulation itself: TDPBF16PS on a hand-checked case (the SDM's separate even and odd sums
  round differently from a sequential sum; DAZ on bf16 inputs; FTZ on results), bit for bit
  against a numpy model of the SDM pseudocode on random tiles, and a tile instruction without a
  configuration faulting (SIGILL), as #UD does on the CPU;
- the kernel on the emulated tiles ("emulated") and, where the CPU has AMX and Linux grants the
  tile state, on the real ones ("amx"): for every supported type, forward and backward (also +=),
  token tails (T not a multiple of 32), K not a multiple of 32 (and odd), column tails, K in
  several tiles, 1 and 2 threads: against float64 within test_bf16's bounds, and within twice
  the f32 summation bound of the vdpbf16ps kernel (both are within that bound of the exact
  product of the rounded inputs; their summation orders differ, so not bit for bit);
- on the emulated tiles, bit for bit against a numpy model of the kernel's summation order
  (per k tile, per 16 pairs: the even and odd sums, then their sum, then the tile's sum added to
  the output): the data layout and every tail are exactly what the instructions were given;
- a whole training step on the AMX kernel: loss and LoRA gradients as near the f32 path's as
  test_compute asks of the bf16 path;
- the choice: amx_available()/amx_missing(), Linux's arch_prctl refusal (on a CPU that claims AMX
  but whose kernel refuses: faked here by claiming the CPU features; the refusal is the real
  syscall's), GGTRAIN_AMX=0/1 and bad values, GGTRAIN_AVX512=0, and the start-up line.
The emulation is slow (scalar C): the shapes here are small.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ggtrain.kernels import variants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from loras import refused
from test_bf16 import ALL_TYPES, U32, check_product, dequant, rne, widen
from test_bf16 import test_low_rank_addend_joins_the_product as addend_check
from test_compute import GRAD_COS, GRAD_REL, finetune, step_gradients
from test_qmatmul import make_weight
from tinymodels import tiny_model

from ggtrain import kernels
from ggtrain.errors import GGTrainError
from ggtrain.threads import default_threads, set_threads

EMU = kernels.variant_module(kernels.AMX_EMULATED_MODULE)  # None on a CPU without AVX512-BF16
KERNELS = ["emulated"] + (["amx"] if kernels.amx_available() else [])
FLT_MIN = np.float32(1.17549435e-38)


@pytest.fixture
def amx_kernel(request, monkeypatch) -> str:
    """compute="bf16" on the AMX kernel: the emulated tiles, or the CPU's (GGTRAIN_AMX=1)."""
    if request.param == "emulated":
        monkeypatch.setattr(kernels, "_amx_module", lambda: EMU)
    else:
        monkeypatch.setenv("GGTRAIN_AMX", "1")
    return request.param


def on_kernels(fn):
    return pytest.mark.parametrize("amx_kernel", KERNELS, indirect=True)(fn)


def no_emulation() -> None:
    """Without AVX512-BF16 neither bf16 kernel nor the emulated twin runs: both say so."""
    assert EMU is None and not kernels.amx_available()
    assert kernels.amx_missing() == kernels.bf16_missing()


def test_both_builds_of_the_one_source() -> None:
    """On x86 both modules are built from bf16mm_amx.pyx: the real one (the "amx" row: imported by
    the kernels only where the CPU has AMX; importing it runs no tile instruction) and the
    emulated one (the "avx512bf16" row)."""
    if EMU is None:
        return no_emulation()
    import importlib
    real = importlib.import_module(f"ggtrain.kernels.{kernels.AMX_MODULE}")
    assert EMU.EMULATED and not real.EMULATED
    assert (EMU.MICRO_ROWS, EMU.MICRO_COLS, EMU.TILE_K) == (real.MICRO_ROWS, real.MICRO_COLS, real.TILE_K) == (
        32, kernels.BF16_COLS, kernels.BF16_K)
    assert (kernels.variant_module(kernels.AMX_MODULE) is not None) == variants.runs_on("amx", variants.cpu_features())
    assert variants.VARIANTS["amx"].cpu[-2:] == ("amx_tile", "amx_bf16")
    assert set(variants.VARIANTS["avx512bf16"].flags) < set(variants.VARIANTS["amx"].flags)


# ---- the emulated instruction ------------------------------------------------------------------

def bf16_bits(values) -> np.ndarray:
    v = np.asarray(values, np.float32)
    bits = v.view(np.uint32) >> 16
    assert np.array_equal((bits << 16).view(np.float32), v), "not bf16 values"
    return bits.astype(np.uint16)


def ftz(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < FLT_MIN, np.copysign(np.float32(0), x), x).astype(np.float32)


def sdm_tdpbf16ps(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The SDM pseudocode in numpy: c (M, N) f32 + a (M, K pairs) · b (K pairs, N), bf16 bits. The
    products of two bf16 are exact in f32 (normal range), so each FMA is one f32 addition."""
    fa, fb = ftz(widen(a).astype(np.float32)), ftz(widen(b).astype(np.float32))  # DAZ
    even = np.zeros(c.shape, np.float32)
    odd = np.zeros(c.shape, np.float32)
    for k in range(a.shape[1] // 2):
        even = ftz(even + ftz(fa[:, 2 * k, None] * fb[None, k, 0::2]))
        odd = ftz(odd + ftz(fa[:, 2 * k + 1, None] * fb[None, k, 1::2]))
    return ftz(ftz(c) + ftz(even + odd))


def test_emulated_tdpbf16ps_hand_checked() -> None:
    """1 × 1 output, 2 pairs: a = (4096, 1 | 1, 1), b = (4096, 1 | 1, 1). Even products 2^24 and 1,
    odd products 1 and 1: the even sum 2^24 + 1 is a tie and rounds to even, 2^24; the odd sum is
    2; so c = 2^24 + 2 (a sequential sum, vdpbf16ps' order, would give 2^24). Then DAZ: a denormal
    bf16 times 2^100 adds nothing (2^-33 without DAZ); FTZ: 2^-70 · 2^-70 = 2^-140 is flushed."""
    if EMU is None:
        return no_emulation()
    c = np.zeros((1, 1), np.float32)
    EMU.tile_dot(c, bf16_bits([[4096, 1, 1, 1]]), bf16_bits([[4096, 1], [1, 1]]))
    assert c[0, 0] == 2.0 ** 24 + 2
    c = np.full((1, 1), 3, np.float32)  # accumulates onto c
    EMU.tile_dot(c, bf16_bits([[2, 1]]), bf16_bits([[5, 7]]))
    assert c[0, 0] == 3 + 10 + 7
    denormal = np.array([[0x0001, 0]], np.uint16)  # 2^-133 as bf16
    c = np.zeros((1, 1), np.float32)
    EMU.tile_dot(c, denormal, bf16_bits([[2.0 ** 100, 0]]))
    assert c[0, 0] == 0
    c = np.zeros((1, 1), np.float32)
    EMU.tile_dot(c, bf16_bits([[2.0 ** -70, 0]]), bf16_bits([[2.0 ** -70, 0]]))
    assert c[0, 0] == 0 and np.float32(2.0 ** -70) * np.float32(2.0 ** -70) > 0


@pytest.mark.parametrize("M, K, N", [(16, 16, 16), (5, 3, 7), (16, 1, 1), (1, 16, 16)])
def test_emulated_tdpbf16ps_against_numpy(M: int, K: int, N: int) -> None:
    """Random bf16 tiles (values over many binades) and accumulators: bit for bit the SDM model."""
    if EMU is None:
        return no_emulation()
    rng = np.random.default_rng(M * 100 + K * 10 + N)

    def values(shape):
        return bf16_bits(widen(rne(rng.standard_normal(shape, dtype=np.float32)
                                   * np.float32(2.0) ** rng.integers(-20, 20, shape).astype(np.float32))))

    a, b = values((M, 2 * K)), values((K, 2 * N))
    c0 = rng.standard_normal((M, N), dtype=np.float32)
    c = c0.copy()
    EMU.tile_dot(c, a, b)
    want = sdm_tdpbf16ps(c0, a, b)
    assert np.array_equal(c.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match="do not fit one tile"):
        EMU.tile_dot(np.zeros((17, 1), np.float32), np.zeros((17, 2), np.uint16), np.zeros((1, 2), np.uint16))


def test_a_tile_instruction_without_configuration_faults() -> None:
    """Without ldtilecfg the first tile instruction faults (#UD on the CPU, SIGILL in the emulation
    too): the kernel tests below therefore prove that every thread configures its tiles."""
    if EMU is None:
        return no_emulation()
    modules = [kernels.AMX_EMULATED_MODULE] + ([kernels.AMX_MODULE] if kernels.amx_available() else [])
    for name in modules:
        code = textwrap.dedent(f"""
            import numpy as np
            from ggtrain import kernels
            if {name!r} == kernels.AMX_MODULE:
                assert kernels.amx_available()  # asks Linux for the tile state
            m = kernels.variant_module({name!r})
            c = np.zeros((1, 1), np.float32); a = np.zeros((1, 2), np.uint16); b = np.zeros((1, 2), np.uint16)
            m.tile_dot(c, a, b)
            print("configured ok", flush=True)
            m.tile_dot(c, a, b, configure=False)
            print("not reached", flush=True)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert r.returncode == -signal.SIGILL, (name, r.returncode, r.stderr[-2000:])
        assert r.stdout.split() == ["configured", "ok"]


# ---- the kernel ----------------------------------------------------------------------------------

def amx_model(a: np.ndarray, b: np.ndarray, tile_k: int, acc: np.ndarray | None = None) -> np.ndarray:
    """The AMX kernel's sums in numpy: a (T, K), b (K, N) bf16 values as f32. Per k tile (pairs
    padded with zeros to a multiple of 16), per 16 pairs one tdpbf16ps (sdm: even and odd sums,
    then their sum added to the tile's sum from 0); the tile's sum added to the output (or to acc)."""
    T, K = a.shape
    out = acc
    for k0 in range(0, K, tile_k):
        kc = min(tile_k, K - k0)
        kp16 = (kc + 31) // 32 * 16  # pairs, rounded up to 16
        ak = np.zeros((T, 2 * kp16), np.float32)
        bk = np.zeros((2 * kp16, b.shape[1]), np.float32)
        ak[:, :kc], bk[:kc] = a[:, k0:k0 + kc], b[k0:k0 + kc]
        tile = np.zeros((T, b.shape[1]), np.float32)
        for q in range(0, 2 * kp16, 32):
            even = np.zeros_like(tile)
            odd = np.zeros_like(tile)
            for k in range(q, q + 32, 2):
                even = ftz(even + ak[:, k, None] * bk[None, k])
                odd = ftz(odd + ak[:, k + 1, None] * bk[None, k + 1])
            tile = ftz(tile + ftz(even + odd))
        out = tile if out is None else ftz(out + tile)
    return out


def shapes_for(qt: Q) -> list[tuple[int, int, int]]:
    """(rows, n, tokens): a column tail (70 = 64 + 6 rows; 33), K over the 32-value tile step and not
    a multiple of it, odd where the block allows (F32 45 and 301 columns; 33 and 70 rows give
    backward kp of 17 and 35 pairs), tokens below one 32-row block and over one."""
    block = GGML_QUANT_SIZES[qt][0]
    n = 512 if block == 256 else 96 if block == 32 else 301
    return [(70, n, 13), (33, max(block, 45 if block == 1 else block), 45)]


def run_both(w: np.ndarray, qt: Q, T: int, rng: np.random.Generator) -> list[tuple]:
    """Forward, backward and backward += on the kernel in use: (what, backward, got, a, b, acc)."""
    wf = dequant(w, qt)
    rows, n = wf.shape
    x = rng.standard_normal((T, n), dtype=np.float32)
    dy = rng.standard_normal((T, rows), dtype=np.float32)
    acc = rng.standard_normal((T, n), dtype=np.float32)
    out = acc.copy()
    kernels.qmatmul_backward_input(dy, w, qt, out=out, accumulate=True, compute="bf16")
    return [(f"{qt.name} forward T={T}", False, kernels.qmatmul(x, w, qt, compute="bf16"), x, wf.T, None),
            (f"{qt.name} backward T={T}", True, kernels.qmatmul_backward_input(dy, w, qt, compute="bf16"), dy, wf,
             None),
            (f"{qt.name} backward += T={T}", True, out, dy, wf, acc)]


def vdpbf16ps(fn, *args):
    """fn(*args) on the vdpbf16ps kernel (no AMX module, whichever the test runs on)."""
    saved = kernels._amx_module
    kernels._amx_module = lambda: None
    try:
        return fn(*args)
    finally:
        kernels._amx_module = saved


@on_kernels
@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.name)
def test_every_type_against_float64_and_vdpbf16ps(amx_kernel: str, qt: Q) -> None:
    if EMU is None:
        return no_emulation()
    assert kernels.bf16_kernel() == "amx" or amx_kernel == "emulated"
    for rows, n, T in shapes_for(qt):
        w = make_weight(qt, rows, n, np.random.default_rng(int(qt) + rows))
        results = run_both(w, qt, T, np.random.default_rng(T))
        reference = vdpbf16ps(run_both, w, qt, T, np.random.default_rng(T))
        for (what, backward, got, a, b, acc), (_, _, vdp, *_) in zip(results, reference):
            check_product(got, a, b, f"{amx_kernel} {what}", acc=acc)
            # both within the f32 bound of the rounded product: within twice it of each other
            K = a.shape[1]
            ar, br = widen(rne(a)), widen(rne(np.ascontiguousarray(b)))
            f32_bound = (min(K, max(kernels.BF16_MAX_TILE_K)) + -(-K // kernels.BF16_K) + 2) * U32 * (
                np.abs(ar) @ np.abs(br) + (0 if acc is None else np.abs(acc)))
            assert (np.abs(got.astype(np.float64) - vdp) <= 2 * f32_bound).all(), f"{what}: off the vdpbf16ps kernel"
            if amx_kernel == "emulated":
                tile_k = kernels.plan(backward, rows, n, T, qt, compute="bf16")[0 if backward else 1]
                want = amx_model(ar.astype(np.float32), br.astype(np.float32), tile_k, acc)
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{what}: off the tile model"


@on_kernels
@pytest.mark.parametrize("qt, n, rows, T", [(Q.F32, 2051, 40, 5), (Q.Q8_0, 64, 1100, 5), (Q.Q4_K, 256, 300, 70)],
                         ids=["F32-K-over-2048", "Q8_0-rows-over-1024", "Q4_K-3-blocks-of-32"])
def test_k_in_several_tiles_and_threads(amx_kernel: str, qt: Q, n: int, rows: int, T: int) -> None:
    """K in several k tiles (the last one short and, for F32, odd), more tokens than one block;
    the activations as f32 or as to_bf16's uint16 give the same floats; 1 and 2 threads bit for bit
    (each thread configures its own tiles: the emulation's state is per thread)."""
    if EMU is None:
        return no_emulation()
    rng = np.random.default_rng(n + rows)
    w = make_weight(qt, rows, n, rng)
    x = rng.standard_normal((T, n), dtype=np.float32)
    dy = rng.standard_normal((T, rows), dtype=np.float32)
    out = {}
    try:
        for th in (1, 2):
            set_threads(th)
            out[th] = (kernels.qmatmul(x, w, qt, compute="bf16"), kernels.qmatmul_backward_input(dy, w, qt, compute="bf16"))
        assert np.array_equal(kernels.qmatmul(kernels.to_bf16(x), w, qt, compute="bf16"), out[2][0])
        assert np.array_equal(kernels.qmatmul_backward_input(kernels.to_bf16(dy), w, qt, compute="bf16"), out[2][1])
    finally:
        set_threads(default_threads())
    assert np.array_equal(out[1][0], out[2][0]) and np.array_equal(out[1][1], out[2][1])
    wf = dequant(w, qt)
    check_product(out[2][0], x, wf.T, f"{qt.name} forward")
    check_product(out[2][1], dy, wf, f"{qt.name} backward")
    if amx_kernel == "emulated":
        ar = widen(rne(x)).astype(np.float32)
        want = amx_model(ar, widen(rne(np.ascontiguousarray(wf.T))).astype(np.float32),
                         kernels.plan(False, rows, n, T, qt, compute="bf16")[1])
        assert np.array_equal(out[2][0].view(np.uint32), want.view(np.uint32))


@on_kernels
def test_weights_and_activations_are_rounded_bit_exactly(amx_kernel: str) -> None:
    """X = I gives bf16(W)ᵀ exactly, and an F32 identity weight bf16(X): one non-zero term each."""
    if EMU is None:
        return no_emulation()
    rng = np.random.default_rng(4)
    w = make_weight(Q.Q4_K, 40, 256, rng)
    want = widen(rne(dequant(w, Q.Q4_K))).astype(np.float32)
    assert np.array_equal(kernels.qmatmul(np.eye(256, dtype=np.float32), w, Q.Q4_K, compute="bf16"), want.T)
    assert np.array_equal(kernels.qmatmul_backward_input(np.eye(40, dtype=np.float32), w, Q.Q4_K, compute="bf16"),
                          want)
    x = rng.standard_normal((35, 67), dtype=np.float32)
    eye = np.eye(67, dtype=np.float32).view(np.uint8)
    assert np.array_equal(kernels.qmatmul(x, eye, Q.F32, compute="bf16"), widen(rne(x)).astype(np.float32))


@on_kernels
@pytest.mark.parametrize("qt, rows, n, T", [(Q.Q4_K, 200, 2560, 37), (Q.Q8_0, 130, 640, 7), (Q.Q5_0, 64, 2080, 13)],
                         ids=["Q4_K-k-tiles", "Q8_0-col-tail", "Q5_0"])
def test_low_rank_addend_joins_the_tiles(amx_kernel: str, monkeypatch, qt: Q, rows: int, n: int, T: int) -> None:
    """The LoRA addend u·v is added by the AMX micro-kernel as it stores (TAKES_ADDEND: the second
    BLAS pass never runs), at the last k tile only: test_bf16's float64 checks, forward, backward and
    accumulate, k tiles, token and column tails, on the tiles."""
    if EMU is None:
        return no_emulation()

    def second_pass(addend: object, out: object) -> None:
        assert addend is None, "the AMX kernel left the addend to a second pass"
    monkeypatch.setattr(kernels, "_add_addend", second_pass)
    addend_check("bf16", qt, rows, n, T)


@on_kernels
def test_a_training_step_on_the_amx_kernel(amx_kernel: str) -> None:
    """A whole-model step (the block projections forward and back, q/k/v sharing one rounding, the
    head into the cross-entropy and back) on the AMX kernel: the loss and the LoRA gradients as near
    the f32 path's as test_compute asks of the bf16 path, and a kernel that really ran (its
    gradients differ from vdpbf16ps' in the last bits, as its summation order does)."""
    if EMU is None:
        return no_emulation()
    path = tiny_model("llama", "Q4_K")
    loss32, g32 = vdpbf16ps(step_gradients, path, "f32")
    _, g_v = vdpbf16ps(step_gradients, path, "bf16")
    loss_a, g_a = step_gradients(path, "bf16")
    rel = float(np.linalg.norm(g_a - g32) / np.linalg.norm(g32))
    cos = float(g_a @ g32 / (np.linalg.norm(g_a) * np.linalg.norm(g32)))
    assert abs(loss_a - loss32) <= 5e-3 * abs(loss32)
    assert rel <= GRAD_REL and cos >= GRAD_COS, (rel, cos)
    assert not np.array_equal(g_a, g_v)
    assert np.linalg.norm(g_a - g_v) <= GRAD_REL * np.linalg.norm(g32)


# ---- which kernel runs, and why ------------------------------------------------------------------

def test_amx_choice_on_this_cpu(monkeypatch) -> None:
    """What this CPU has decides; GGTRAIN_AMX=0 forces vdpbf16ps, =1 requires AMX, anything else is
    refused by name; GGTRAIN_AVX512=0 turns AMX off too."""
    has = variants.runs_on("amx", variants.cpu_features())
    if not kernels.bf16_available():
        assert kernels.bf16_kernel() is None and not kernels.amx_available()
    elif has and kernels.amx_available():
        assert kernels.bf16_kernel() == "amx" and kernels.amx_missing() is None
    else:
        assert kernels.bf16_kernel() == "vdpbf16ps"
        if not has:
            assert "this CPU has no AMX-BF16 tiles" in kernels.amx_missing()
            assert "amx_bf16" in kernels.amx_missing() or "amx_tile" in kernels.amx_missing()
        monkeypatch.setenv("GGTRAIN_AMX", "1")
        with pytest.raises(GGTrainError, match=r"GGTRAIN_AMX=1: the AMX-BF16 kernel does not run here \(.+\)"):
            kernels.bf16_kernel()
        with pytest.raises(GGTrainError, match="GGTRAIN_AMX=1"):
            kernels.qmatmul(np.ones((2, 32), np.float32), make_weight(Q.Q8_0, 4, 32, np.random.default_rng(0)),
                            Q.Q8_0, compute="bf16")
    monkeypatch.setenv("GGTRAIN_AMX", "0")
    assert kernels.amx_missing() == "GGTRAIN_AMX=0 turns the AMX kernel off"
    assert kernels.bf16_kernel() == ("vdpbf16ps" if kernels.bf16_available() else None)
    monkeypatch.setenv("GGTRAIN_AMX", "yes")
    with pytest.raises(GGTrainError, match="GGTRAIN_AMX='yes': expected 0 .* or 1"):
        kernels.amx_available()
    monkeypatch.delenv("GGTRAIN_AMX")
    monkeypatch.setenv("GGTRAIN_AVX512", "0")
    assert kernels.amx_missing() == "GGTRAIN_AVX512=0 turns the AVX512 and AMX kernels off"
    assert kernels.bf16_kernel() is None


def test_linux_refusing_the_tile_state_falls_back_to_vdpbf16ps(monkeypatch) -> None:
    """A CPU that claims AMX (faked: the features are this CPU's plus amx_tile, amx_bf16) on a
    kernel that refuses the tile state (the real arch_prctl: refused here, where the CPU has no
    AMX): the AMX kernel is not available, with the errno's reason, and vdpbf16ps runs."""
    if not kernels.bf16_available():
        return no_emulation()
    real = variants.cpu_features()
    monkeypatch.setattr(variants, "cpu_features", lambda: real | {"amx_tile", "amx_bf16"})
    monkeypatch.setattr(kernels, "_tile_state", {})
    amx = kernels.variant_module(kernels.AMX_MODULE)
    assert amx is not None and not amx.EMULATED  # the real module (imports; runs no tile instruction)
    err = amx.request_tile_state()
    if err == 0:  # an AMX CPU whose kernel grants it
        assert kernels.amx_available() and kernels.bf16_kernel() == "amx"
        return
    assert not variants.runs_on("amx", real)
    why = kernels.amx_missing()
    assert why == ("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: "
                   f"{os.strerror(err)})")
    assert kernels._tile_state == {"errno": err}  # asked once, remembered
    assert kernels.bf16_kernel() == "vdpbf16ps"
    w = make_weight(Q.Q8_0, 4, 32, np.random.default_rng(0))
    assert kernels.qmatmul(np.ones((2, 32), np.float32), w, Q.Q8_0, compute="bf16").shape == (2, 4)
    monkeypatch.setenv("GGTRAIN_AMX", "1")
    with pytest.raises(GGTrainError, match="GGTRAIN_AMX=1: .*Linux refused the AMX tile state"):
        kernels.qmatmul(np.ones((2, 32), np.float32), w, Q.Q8_0, compute="bf16")


def test_finetune_start_up_line_names_the_bf16_kernel(tmp_path: Path) -> None:
    """The compute line says which bf16 kernel runs and why; GGTRAIN_AMX=1 where AMX does not run
    is one error line, exit 2, before anything is written."""
    if not kernels.bf16_available():
        return no_emulation()
    model = tiny_model("llama", "Q8_0")
    r = finetune(model, tmp_path / "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("compute:"))
    if kernels.amx_available():
        assert line.endswith("kernel: AMX-BF16 tiles (tdpbf16ps))"), line
    elif kernels.bf16_slower():  # an Intel CPU: auto keeps f32 over its vdpbf16ps
        assert line == f"compute: f32 products with the base weights (auto: {kernels.bf16_slower()})"
    else:
        assert line == ("compute: bf16 products with the base weights (auto: this CPU has AVX512-BF16 dot "
                        f"products; kernel: AVX512-BF16 vdpbf16ps, not AMX: {kernels.amx_missing()})")
    r = finetune(model, tmp_path / "forced", "--compute", "bf16", env={"GGTRAIN_AMX": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("(--compute bf16; kernel: AVX512-BF16 vdpbf16ps, not AMX: GGTRAIN_AMX=0 turns the AMX kernel off)"
            in r.stderr)
    if not kernels.amx_available():
        line = refused(finetune(model, tmp_path / "no", env={"GGTRAIN_AMX": "1"}))
        assert line == f"ggtrain: error: GGTRAIN_AMX=1: the AMX-BF16 kernel does not run here ({kernels.amx_missing()})"
        assert not (tmp_path / "no").exists()
